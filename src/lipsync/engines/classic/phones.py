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
Cost: about 0.05 s per second of speech on one core.
"""
from __future__ import annotations

import os
import threading
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
#: recommended all-phone values: lw 2.0, pip 0.1), wide beams (short clips, exact search).
LANGUAGE_WEIGHT = 2.0
PHONE_INSERTION_PENALTY = 0.1
BEAM = 1e-20

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


_local = threading.local()  # one decoder per thread: a Decoder is not thread-safe


def _model_dir() -> str:
    import pocketsphinx

    return os.path.join(os.path.dirname(pocketsphinx.__file__), "model", "en-us")


def _decoder():
    d = getattr(_local, "decoder", None)
    if d is None:
        from pocketsphinx import Decoder

        m = _model_dir()
        d = Decoder(hmm=os.path.join(m, "en-us"), allphone=os.path.join(m, "en-us-phone.lm.bin"),
                    lw=LANGUAGE_WEIGHT, pip=PHONE_INSERTION_PENALTY, beam=BEAM, pbeam=BEAM,
                    samprate=SAMPLE_RATE, cmn="batch", remove_noise=False, loglevel="FATAL", backtrace=False)
        _local.decoder = d
    return d


def normalise(samples: np.ndarray) -> np.ndarray:
    """``samples`` (float, [-1, 1]) as int16 PCM at a fixed level (see NORM_PERCENTILE)."""
    x = np.asarray(samples, dtype=np.float64)
    ref = float(np.percentile(np.abs(x), NORM_PERCENTILE)) if len(x) else 0.0
    if ref > 1e-6:
        x = x * (NORM_LEVEL / ref)
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


def recognize(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> list[PhoneSegment]:
    """Phone segments covering the clip, in time order.

    ``samples``: mono float audio in [-1, 1] at 16 kHz (raises ``ValueError`` for another rate).
    Gaps the decoder leaves (filler models) come back as ``SIL``. Needs ``pocketsphinx``.
    """
    if int(sample_rate) != SAMPLE_RATE:
        raise ValueError(f"phone recognition needs {SAMPLE_RATE} Hz audio, got {sample_rate}")
    pcm = normalise(samples)
    if len(pcm) < SAMPLE_RATE // 10:  # under 0.1 s: nothing a recogniser can say
        return [PhoneSegment("SIL", 0.0, len(pcm) / SAMPLE_RATE)]
    d = _decoder()
    # Fresh front end (cepstral mean and noise statistics) for every clip: without it a clip
    # decodes differently depending on the clip before it.
    d.reinit_feat()
    d.start_utt()
    d.process_raw(pcm.tobytes(), full_utt=True)
    d.end_utt()
    known = set(PHONES)
    out: list[PhoneSegment] = []
    for s in d.seg():
        label = s.word if s.word in known else "SIL"
        start, end = s.start_frame / DECODER_FPS, (s.end_frame + 1) / DECODER_FPS
        if out and out[-1].phone == "SIL" and label == "SIL":
            out[-1] = PhoneSegment("SIL", out[-1].start, end)
        else:
            out.append(PhoneSegment(label, start, end))
    return out
