"""The phone recognizer's speed machinery must not change what it recognizes.

PocketSphinx is driven through its C API so that decoding releases the GIL, and long clips are
decoded as utterances in parallel sharing the whole clip's cepstral mean. A clip decoded in one
piece must be exactly what the library's own binding gives; pieces must follow from the audio
alone (never from the thread count or the clip decoded before) and agree with the whole clip.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lipsync.engines.classic import phones
from lipsync.io import decode_audio
from lipsync.pipeline import bundled_sample

SR = phones.SAMPLE_RATE

pytestmark = pytest.mark.skipif(phones._c_api() is None, reason="pocketsphinx C API not exported by this wheel")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The bundled real speech (10.2 s: long enough to be decoded in two pieces)."""
    return decode_audio(bundled_sample("speech.wav")).samples


def _whole_clip(x: np.ndarray) -> list[phones.PhoneSegment]:
    """The clip as one utterance through the library's own Cython binding (batch CMN)."""
    return phones._segments([(0, phones._CythonDecoder().decode_raw(phones.normalise(x)))])


def _labels(segs, n):
    out = np.array(["SIL"] * n, dtype=object)
    for s in segs:
        out[round(s.start * 100):round(s.end * 100)] = s.phone
    return out


def test_one_piece_is_bit_identical_to_the_librarys_own_decode(speech):
    x = speech[: 5 * SR]
    assert len(phones.piece_bounds(phones.normalise(x))) == 2  # one piece
    assert phones.recognize(x) == _whole_clip(x)


def test_short_clips_stay_whole_and_long_ones_are_cut_in_pauses(speech):
    assert phones.piece_bounds(phones.normalise(speech[: int(7.9 * SR)])) == [0, int(7.9 * SR)]
    words = speech[: 3 * SR]
    gap = np.zeros(SR // 2, np.float32)
    x = np.concatenate([words, gap] * 6)  # 21 s: three pieces
    pcm = phones.normalise(x)
    b = phones.piece_bounds(pcm)
    assert len(b) == 4 and b[0] == 0 and b[-1] == len(x)
    period = len(words) + len(gap)
    for i, cut in enumerate(b[1:-1], start=1):
        assert cut % (SR // phones.DECODER_FPS) == 0  # on the decoder's frame grid
        assert abs(cut - i * len(x) / 3) <= phones.PIECE_SEARCH_SECONDS * SR
        assert cut % period >= len(words), "a cut must fall in a pause, not in the words"


def test_pieces_agree_with_the_whole_clip(speech):
    assert len(phones.piece_bounds(phones.normalise(speech))) == 3  # two pieces
    n = len(speech) // 160 + 2
    agree = np.mean(_labels(phones.recognize(speech), n) == _labels(_whole_clip(speech), n))
    assert agree >= 0.95, agree


def test_result_depends_on_the_audio_alone(speech, monkeypatch):
    first = phones.recognize(speech)
    phones.recognize(speech[::-1].copy())  # another clip in between
    assert phones.recognize(speech) == first
    monkeypatch.setattr(phones, "_pool", ThreadPoolExecutor(max_workers=1))
    assert phones.recognize(speech) == first  # one decoding thread: the same phones


def test_decoding_releases_the_gil(speech):
    """While a clip decodes in another thread this thread keeps running Python code."""
    import time

    x = speech[: int(7.5 * SR)]  # one piece: a single long call into the library
    cep = phones.batch_cmn(phones._decoder().cepstra(phones.normalise(x)))
    done = threading.Event()
    took = []

    def decode():
        d = phones._decoder()
        t0 = time.perf_counter()
        d.decode(cep)
        took.append(time.perf_counter() - t0)
        done.set()

    t = threading.Thread(target=decode)
    last, longest = time.perf_counter(), 0.0  # every stall counts, from before the thread starts
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    t.join()
    # With the GIL held (the Cython binding) this loop stalls for the whole decode; released, it
    # only ever waits a few of the interpreter's 5 ms switch intervals.
    assert longest < 0.25 * took[0], (longest, took[0])


def test_untested_pocketsphinx_release_uses_the_cython_binding(speech, monkeypatch):
    # The ctypes signatures are PocketSphinx 5.1's: another release must not be called through
    # them (a changed signature would crash the process), and the result stays the library's own.
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "5.2.0" if name == "pocketsphinx" else real_version(name))
    monkeypatch.setattr(phones, "_lib", None)
    assert phones._c_api() is None
    x = speech[: 5 * SR]
    assert phones.recognize(x) == _whole_clip(x)
    monkeypatch.setattr(phones, "_lib", None)  # found again (5.1) once the patch is undone
