"""Phone recognition for the classic engine: PocketSphinx in all-phone mode.

PocketSphinx (CMU, PyPI ``pocketsphinx>=5``) ships its US-English acoustic model (5.1k-senone
continuous HMM, 39 ARPAbet phones plus SIL) and a phone trigram LM (``en-us-phone.lm.bin``) inside
the wheel, so nothing is downloaded at run time. All-phone mode decodes phones directly, without
words, which is what a mouth needs and which works on any language: Russian speech decoded with
English phones gives the right phone *class* (open vowel, bilabial, rounded, fricative), and the
mouth shape follows the class.

The input is level-normalised first (the 99.5th percentile of |x| scaled to 0.3 of full scale), so
the result does not depend on the recording level. Decoding is deterministic: cepstral mean
normalisation is per utterance ("batch"), so nothing carries over from the previous clip.

Speed: about 0.065 s of CPU per second of speech. Clips of PIECE_SPLIT_SECONDS or more are cut
into utterances of 4-8 s at their quietest moments (the cut points depend on the audio alone,
never on the machine) and the utterances are decoded on DECODE_THREADS threads. The PocketSphinx
C API is called through ``ctypes`` (the functions the wheel's extension module exports), which
releases the GIL, so the pieces really run in parallel; the Cython binding holds the GIL for a
whole decode. Where those symbols are missing the Cython binding decodes the whole clip as one
utterance (the same result as the C path for clips under PIECE_SPLIT_SECONDS). Measured on 60 s
of the bundled speech (2-core machine shared with other work, old and new interleaved): 3.2 s ->
2.1 s of wall time, for about 15 % more CPU time (the two decoders share the caches); a busy
server with no idle core gains nothing from the second thread.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import itertools
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#: Sample rate of the acoustic model (Hz).
SAMPLE_RATE = 16_000
#: Frame rate of the decoder's segmentation (frames per second; 10 ms shift).
DECODER_FPS = 100
#: Level normalisation: this percentile of |x| is scaled to NORM_LEVEL of full scale.
NORM_PERCENTILE = 99.5
NORM_LEVEL = 0.3
#: Decoder settings: language weight and phone insertion penalty of the phone LM (CMU's
#: recommended all-phone values: lw 2.0, pip 0.1); beam and phone beam 1e-20 (narrower than the
#: decoder's default 1e-48).
LANGUAGE_WEIGHT = 2.0
PHONE_INSERTION_PENALTY = 0.1
BEAM = 1e-20
#: Clips this long or longer are decoded as max(2, ceil(duration / PIECE_MAX_SECONDS)) separate
#: utterances (so 4-8 s each), cut at the quietest PIECE_QUIET_SECONDS window within
#: PIECE_SEARCH_SECONDS of each even split point (see ``piece_bounds``).
PIECE_SPLIT_SECONDS = 8.0
PIECE_MAX_SECONDS = 8.0
PIECE_SEARCH_SECONDS = 1.5
PIECE_QUIET_SECONDS = 0.2
#: Threads decoding the pieces of a clip (shared by all requests of the process).
DECODE_THREADS = max(1, min(2, os.cpu_count() or 1))

#: The phone set the acoustic model knows (ARPAbet without stress, plus SIL for silence).
PHONES = (
    "SIL", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW",
    "V", "W", "Y", "Z", "ZH",
)


@dataclass(frozen=True)
class PhoneSegment:
    """One recognised phone: ARPAbet label (``SIL`` for silence/noise), start and end in seconds."""

    phone: str
    start: float
    end: float


_local = threading.local()  # one decoder per thread: a decoder is not thread-safe


def _model_dir() -> str:
    import pocketsphinx

    return os.path.join(os.path.dirname(pocketsphinx.__file__), "model", "en-us")


def _config() -> dict:
    m = _model_dir()
    return {"hmm": os.path.join(m, "en-us"), "allphone": os.path.join(m, "en-us-phone.lm.bin"),
            "lw": LANGUAGE_WEIGHT, "pip": PHONE_INSERTION_PENALTY, "beam": BEAM, "pbeam": BEAM,
            "samprate": SAMPLE_RATE, "cmn": "batch", "remove_noise": False, "loglevel": "FATAL",
            "backtrace": False}


#: PocketSphinx releases whose C API the ctypes path was written and tested against.
_C_API_RELEASE = re.compile(r"5\.1\.\d+$")

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # False: the C API is not reachable, use the Cython binding


def _c_api() -> ctypes.CDLL | None:
    """PocketSphinx's C API (``pocketsphinx.h``) from the wheel's extension module, or None."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                # The ctypes signatures below are those of PocketSphinx 5.1 (pocketsphinx.h); other
                # releases may change them, so they use the Cython binding instead.
                if not _C_API_RELEASE.match(importlib.metadata.version("pocketsphinx")):
                    raise ImportError("untested PocketSphinx release")
                from pocketsphinx import _pocketsphinx

                lib = ctypes.CDLL(_pocketsphinx.__file__)  # CDLL: the GIL is released in each call
                vp, cint = ctypes.c_void_p, ctypes.c_int
                for name, res, args in (
                    ("ps_config_init", vp, [vp]), ("ps_config_parse_json", vp, [vp, ctypes.c_char_p]),
                    ("ps_config_free", cint, [vp]), ("ps_init", vp, [vp]), ("ps_free", cint, [vp]),
                    ("ps_reinit_feat", cint, [vp, vp]), ("ps_start_utt", cint, [vp]),
                    ("ps_end_utt", cint, [vp]),
                    ("ps_seg_iter", vp, [vp]), ("ps_seg_next", vp, [vp]),
                    ("ps_seg_word", ctypes.c_char_p, [vp]),
                    ("ps_seg_frames", None, [vp, ctypes.POINTER(cint), ctypes.POINTER(cint)]),
                    ("ps_seg_free", None, [vp]),
                    ("ps_get_config", vp, [vp]), ("ps_config_set_str", vp, [vp, ctypes.c_char_p, ctypes.c_char_p]),
                    ("ps_get_fe", vp, [vp]), ("fe_start_utt", cint, [vp]), ("fe_get_output_size", cint, [vp]),
                    ("fe_process_utt", cint, [vp, vp, ctypes.c_size_t, ctypes.POINTER(vp),
                                              ctypes.POINTER(ctypes.c_int32)]),
                    ("fe_end_utt", ctypes.c_int32, [vp, vp, ctypes.POINTER(ctypes.c_int32)]),
                    ("ckd_free_2d", None, [vp]),
                    ("ps_process_cep", cint, [vp, vp, cint, cint, cint]),
                ):
                    f = getattr(lib, name)
                    f.restype, f.argtypes = res, args
                _lib = lib
            except (ImportError, OSError, AttributeError, importlib.metadata.PackageNotFoundError):
                _lib = False
        return _lib or None


class _CDecoder:
    """A PocketSphinx decoder driven through the C API (the GIL is released in every call).

    Its feature module does no cepstral mean normalisation: ``cepstra`` gives the front end's
    MFCCs and ``decode`` takes them already normalised, so that the pieces of one clip share the
    whole clip's mean (see ``batch_cmn``).
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        config = lib.ps_config_init(None)
        try:
            if not config or not lib.ps_config_parse_json(config, json.dumps(_config()).encode()):
                raise RuntimeError("PocketSphinx rejected the decoder configuration")
            self._ps = lib.ps_init(config)  # keeps its own reference to the configuration
        finally:
            if config:
                lib.ps_config_free(config)
        if not self._ps:
            raise RuntimeError("PocketSphinx failed to initialise")
        # The model's feat.params sets "cmn batch" when the decoder starts; the mean is ours now.
        # It takes effect at the next ps_reinit_feat, done before every utterance.
        lib.ps_config_set_str(lib.ps_get_config(self._ps), b"cmn", b"none")
        if lib.ps_reinit_feat(self._ps, None) < 0:
            raise RuntimeError("PocketSphinx failed to set up its front end")

    def __del__(self) -> None:
        if getattr(self, "_ps", None):
            self._lib.ps_free(self._ps)

    def cepstra(self, pcm: np.ndarray) -> np.ndarray:
        """(frames, 13) float32 MFCCs of int16 ``pcm``, exactly as ``ps_process_raw`` makes them
        for a whole utterance (frames every 10 ms, the last one from the partial tail)."""
        lib, pcm = self._lib, np.ascontiguousarray(pcm, dtype="<i2")
        # A fresh front end: fe_start_utt alone leaves state that changed the first frame after
        # another clip (measured), and the result must depend on this clip only.
        if lib.ps_reinit_feat(self._ps, None) < 0:
            raise RuntimeError("PocketSphinx failed to set up its front end")
        fe = lib.ps_get_fe(self._ps)
        ncep = lib.fe_get_output_size(fe)
        lib.fe_start_utt(fe)
        block, n = ctypes.c_void_p(), ctypes.c_int32()
        if lib.fe_process_utt(fe, pcm.ctypes.data, len(pcm), ctypes.byref(block), ctypes.byref(n)) < 0:
            raise RuntimeError("PocketSphinx failed to compute features")
        try:
            out = np.zeros((n.value + 1, ncep), np.float32)
            if n.value:  # ckd_calloc_2d: a row-pointer array over one contiguous block
                rows = ctypes.cast(block, ctypes.POINTER(ctypes.POINTER(ctypes.c_float)))
                out[: n.value] = np.ctypeslib.as_array(rows[0], shape=(n.value * ncep,)).reshape(-1, ncep)
        finally:
            lib.ckd_free_2d(block)
        tail = ctypes.c_int32()
        lib.fe_end_utt(fe, out[n.value:].ctypes.data, ctypes.byref(tail))
        return out[: n.value + tail.value]

    def decode(self, cepstra: np.ndarray) -> list[tuple[str, int, int]]:
        """Phone segments (label, first frame, last frame) of one utterance of normalised MFCCs."""
        lib, ps = self._lib, self._ps
        cep = np.array(cepstra, dtype=np.float32, order="C")  # the decoder may write into it
        rows = (ctypes.c_void_p * max(1, len(cep)))(*(cep.ctypes.data + i * cep.strides[0] for i in range(len(cep))))
        # Fresh front end and feature state for every utterance: nothing carries over.
        if lib.ps_reinit_feat(ps, None) < 0 or lib.ps_start_utt(ps) < 0:
            raise RuntimeError("PocketSphinx failed to start an utterance")
        if lib.ps_process_cep(ps, rows, len(cep), 0, 1) < 0:
            raise RuntimeError("PocketSphinx failed to decode the audio")
        if lib.ps_end_utt(ps) < 0:
            raise RuntimeError("PocketSphinx failed to end the utterance")
        out = []
        sf, ef = ctypes.c_int(), ctypes.c_int()
        it = lib.ps_seg_iter(ps)
        while it:  # ps_seg_next frees the iterator when it returns NULL
            lib.ps_seg_frames(it, ctypes.byref(sf), ctypes.byref(ef))
            out.append((lib.ps_seg_word(it).decode("utf-8"), sf.value, ef.value))
            it = lib.ps_seg_next(it)
        return out


def batch_cmn(cepstra: np.ndarray) -> np.ndarray:
    """Cepstral mean normalisation over the whole clip, as PocketSphinx's "batch" CMN does it
    (``cmn.c``: the mean of the frames whose c0 is not negative, summed in frame order in float32,
    subtracted from every frame), so a clip decoded in one piece is bit-identical to
    ``ps_process_raw`` with ``cmn=batch``."""
    c = np.asarray(cepstra, dtype=np.float32)
    keep = c[c[:, 0] >= 0]
    if not len(keep):
        return c.copy()
    mean = np.cumsum(keep, axis=0, dtype=np.float32)[-1] / np.float32(len(keep))
    return (c - mean.astype(np.float32)).astype(np.float32)


class _CythonDecoder:
    """The same decoder through the Cython binding (holds the GIL while decoding)."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._d = Decoder(**_config())

    def decode_raw(self, pcm: np.ndarray) -> list[tuple[str, int, int]]:
        d = self._d
        # Fresh front end (cepstral mean and noise statistics) for every utterance: without it
        # an utterance decodes differently depending on the one before it.
        d.reinit_feat()
        d.start_utt()
        d.process_raw(np.ascontiguousarray(pcm, dtype="<i2").tobytes(), full_utt=True)
        d.end_utt()
        return [(s.word, s.start_frame, s.end_frame) for s in d.seg()]


def _decoder():
    """This thread's decoder (created on first use; about 30 MB and 0.2 s each)."""
    d = getattr(_local, "decoder", None)
    if d is None:
        lib = _c_api()
        d = _CDecoder(lib) if lib is not None else _CythonDecoder()
        _local.decoder = d
    return d


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="phones")
        return _pool


def normalise(samples: np.ndarray) -> np.ndarray:
    """``samples`` (float, [-1, 1]) as int16 PCM at a fixed level (see NORM_PERCENTILE)."""
    x = np.asarray(samples, dtype=np.float64)
    ref = float(np.percentile(np.abs(x), NORM_PERCENTILE)) if len(x) else 0.0
    if ref > 1e-6:
        x = x * (NORM_LEVEL / ref)
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


def piece_bounds(pcm: np.ndarray) -> list[int]:
    """Sample indices [0, c1, ..., len(pcm)] cutting ``pcm`` into the utterances decoded separately.

    Clips shorter than PIECE_SPLIT_SECONDS stay whole. Longer ones get
    max(2, ceil(duration / PIECE_MAX_SECONDS)) pieces; each cut sits at the centre of the
    quietest PIECE_QUIET_SECONDS window (10 ms frame energy) within PIECE_SEARCH_SECONDS of its
    even split point (on a 10 ms grid, so pieces start on decoder frame boundaries).
    """
    n = len(pcm)
    hop = SAMPLE_RATE // DECODER_FPS
    if n < PIECE_SPLIT_SECONDS * SAMPLE_RATE:
        return [0, n]
    k = max(2, math.ceil(n / (PIECE_MAX_SECONDS * SAMPLE_RATE)))
    frames = n // hop
    x = pcm[: frames * hop].astype(np.float64).reshape(frames, hop)
    energy = (x * x).sum(axis=1)
    w = max(1, round(PIECE_QUIET_SECONDS * DECODER_FPS))
    window = np.convolve(energy, np.ones(w), mode="valid")  # window j covers frames j .. j + w - 1
    reach = round(PIECE_SEARCH_SECONDS * DECODER_FPS)
    bounds = [0]
    for i in range(1, k):
        ideal = round(i * frames / k) - w // 2
        lo, hi = max(0, ideal - reach), min(len(window), ideal + reach + 1)
        j = lo + int(np.argmin(window[lo:hi]))  # first of equals: deterministic
        bounds.append((j + w // 2) * hop)
    bounds.append(n)
    return bounds


def recognize(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> list[PhoneSegment]:
    """Phone segments covering the clip, in time order.

    ``samples``: mono float audio in [-1, 1] at 16 kHz (raises ``ValueError`` for another rate).
    Gaps the decoder leaves (filler models) come back as ``SIL``. Long clips are decoded as
    several utterances in parallel (``piece_bounds``) sharing the whole clip's cepstral mean; the
    result depends on the audio alone. Needs ``pocketsphinx``.
    """
    if int(sample_rate) != SAMPLE_RATE:
        raise ValueError(f"phone recognition needs {SAMPLE_RATE} Hz audio, got {sample_rate}")
    pcm = normalise(samples)
    if len(pcm) < SAMPLE_RATE // 10:  # under 0.1 s: nothing a recogniser can say
        return [PhoneSegment("SIL", 0.0, len(pcm) / SAMPLE_RATE)]
    hop = SAMPLE_RATE // DECODER_FPS
    d = _decoder()
    if isinstance(d, _CythonDecoder):  # no C API: the whole clip, one utterance, GIL held
        return _segments([(0, d.decode_raw(pcm))])
    cep = batch_cmn(d.cepstra(pcm))
    frames = [b // hop for b in piece_bounds(pcm)]
    frames[-1] = len(cep)
    pieces = [(a, cep[a:b]) for a, b in itertools.pairwise(frames)]
    if len(pieces) == 1:
        return _segments([(0, d.decode(cep))])
    decoded = _executor().map(lambda piece: _decoder().decode(piece[1]), pieces)
    return _segments(list(zip((a for a, _ in pieces), decoded)))


def _segments(decoded: list[tuple[int, list[tuple[str, int, int]]]]) -> list[PhoneSegment]:
    """Decoder output of consecutive pieces (first frame, segments) as phone segments in seconds;
    unknown labels (fillers) and adjacent silences merged into one ``SIL``."""
    known = set(PHONES)
    out: list[PhoneSegment] = []
    for offset, segs in decoded:
        for word, start_frame, end_frame in segs:
            label = word if word in known else "SIL"
            start, end = (start_frame + offset) / DECODER_FPS, (end_frame + 1 + offset) / DECODER_FPS
            if out and out[-1].phone == "SIL" and label == "SIL":
                out[-1] = PhoneSegment("SIL", out[-1].start, end)
            else:
                out.append(PhoneSegment(label, start, end))
    return out
