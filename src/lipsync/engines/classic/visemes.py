"""Phones -> articulator tracks (viseme targets with coarticulation) for the classic engine.

Each phone has a target per articulator, read from ``viseme_model.json`` (package data, written by
``scripts/fit_visemes.py``):

* ``jaw``   0..1 lip gap / jaw opening: FITTED, ridge regression of the real inner-lip opening of
  the dev-split speakers on the phone evidence (see the script).
* ``round`` -1..1 spread (-) / rounded (+): FITTED the same way on the real mouth width (narrower
  mouth = rounder).
* ``close`` 0..1 bilabial press (1 for P, B, M), ``labiodental`` 0..1 (F, V), ``teeth`` 0..1 teeth
  visibility: phonetic facts (place of articulation), not fitted.

Coarticulation follows Cohen & Massaro (1993, "Modeling coarticulation in synthetic visual
speech"): every phone segment exerts a dominance ``alpha * exp(-theta * d)`` over time, ``d`` the
distance in seconds to the segment (0 inside it); an articulator's value at time t is the
dominance-weighted mean of the targets. Rounding has a slower decay before its segment than after
it, so it is anticipated (about ``1 / theta_before`` s ahead). Lips are fully shut during P/B/M
whatever the neighbours. The whole mouth leads the sound by ``lead_s`` (measured on the real dev
clips by the fitting script).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .phones import PHONES, PhoneSegment

ARTICULATORS = ("jaw", "round", "close", "labiodental", "teeth")
#: Sub-samples per video frame at which the tracks are evaluated before pooling (10 ms at 25 fps).
SUBSAMPLES = 4
#: A segment's dominance is computed only this far (s) from it (exp(-theta * 0.5) is negligible).
DOMINANCE_REACH_S = 0.5

#: Phonetic (not fitted) targets: bilabial closure, labiodental contact, teeth visibility.
BILABIAL = frozenset({"P", "B", "M"})
LABIODENTAL = frozenset({"F", "V"})
#: Time (s) over which the jaw eases shut at the edges of a pause (VisemeModel.pause_min_s).
PAUSE_EASE_S = 0.08
#: ... and only where the sound is this far (dB, then a 6 dB ramp) below the clip's speech level.
PAUSE_QUIET_DB = 20.0
#: Articulators pooled by max over a frame's sub-samples (the rest: mean).
MAX_POOLED = ("labiodental",)
VOWELS = frozenset({"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"})
#: Teeth show for dental/alveolar fricatives and affricates and for spread front vowels.
TEETH = {"S": 1.0, "Z": 1.0, "SH": 0.9, "ZH": 0.9, "CH": 0.9, "JH": 0.9, "TH": 1.0, "DH": 0.9,
         "F": 0.8, "V": 0.8, "IY": 0.8, "IH": 0.6, "EY": 0.7, "EH": 0.6, "AE": 0.6, "T": 0.5, "D": 0.5,
         "N": 0.4, "Y": 0.6, "AY": 0.5}


# --- acoustic evidence (per video frame) ------------------------------------------------------
#: Band edges (Hz) of the acoustic evidence: voice bar, F1 region (low / high), F2, F3, frication.
ACOUSTIC_BANDS = ((80.0, 300.0), (300.0, 700.0), (700.0, 1300.0), (1300.0, 2300.0), (2300.0, 4000.0),
                  (4000.0, 7800.0))
#: Analysis windows: 32 ms Hann, four per video frame at 25 fps (hop = frame / 4).
ACOUSTIC_WINDOW_S = 0.032
#: Level range (dB below the clip's speech level, its 95th-percentile frame) mapped to 0..1.
ACOUSTIC_RANGE_DB = 50.0
#: Half-width (s) of the window a frame's level is compared with (syllable nucleus vs. margin).
ACOUSTIC_LOCAL_S = 0.16
#: Frames above this ``level`` (0..1) set the clip's mean band shares (see acoustic_features).
ACOUSTIC_SPEECH_LEVEL = 0.5
#: Frames of context on each side stacked into a frame's evidence.
ACOUSTIC_CONTEXT = 2
ACOUSTIC_NAMES = ("level", "local", "rise", "fall") + tuple(f"band{i}" for i in range(len(ACOUSTIC_BANDS)))


def acoustic_features(samples: np.ndarray, n_frames: int, fps: int, sample_rate: int = 16000) -> np.ndarray:
    """(n_frames, len(ACOUSTIC_NAMES) * (2 * ACOUSTIC_CONTEXT + 1)) level-free acoustic evidence.

    Per video frame (SUBSAMPLES Hann windows of ACOUSTIC_WINDOW_S over the frame's interval):
    ``level`` (frame power relative to the clip's 95th-percentile frame, 0 = ACOUSTIC_RANGE_DB
    below, 1 = at it), ``local`` (level minus the max level within ±ACOUSTIC_LOCAL_S: a syllable
    nucleus is 0, the consonant between two syllables negative), ``rise``/``fall`` (level change
    into / out of the frame), and the share of each ACOUSTIC_BANDS band in the frame's power (dB/30)
    less its mean over the clip's speech frames (spectral mean normalisation).
    Each row stacks these for frames t-ACOUSTIC_CONTEXT..t+ACOUSTIC_CONTEXT (edges repeated).
    Independent of the recording level; numpy only.
    """
    x = np.asarray(samples, dtype=np.float64)
    win = max(8, int(round(ACOUSTIC_WINDOW_S * sample_rate)))
    n_fft = 1 << int(np.ceil(np.log2(win)))
    centres = ((np.arange(n_frames * SUBSAMPLES) + 0.5) * sample_rate / (fps * SUBSAMPLES)).astype(np.int64)
    padded = np.concatenate([np.zeros(win), x, np.zeros(2 * win)])
    idx = centres[:, None] + np.arange(win)[None, :] + win - win // 2
    idx = np.minimum(idx, len(padded) - 1)
    spec = np.abs(np.fft.rfft(padded[idx] * np.hanning(win)[None, :], n_fft, axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    bands = np.stack([spec[:, (freqs >= lo) & (freqs < min(hi, sample_rate / 2))].sum(axis=1)
                      for lo, hi in ACOUSTIC_BANDS], axis=1)
    bands = bands.reshape(n_frames, SUBSAMPLES, -1).mean(axis=1) + 1e-10
    total = bands.sum(axis=1)
    lev_db = 10.0 * np.log10(total)
    speech = float(np.percentile(lev_db, 95)) if n_frames else 0.0
    level = np.clip((lev_db - speech) / ACOUSTIC_RANGE_DB + 1.0, 0.0, 1.0)
    half = max(1, int(round(ACOUSTIC_LOCAL_S * fps)))
    padl = np.concatenate([np.full(half, level[0] if n_frames else 0.0), level, np.full(half, level[-1] if n_frames else 0.0)])
    local = level - np.lib.stride_tricks.sliding_window_view(padl, 2 * half + 1).max(axis=1)
    prev = np.concatenate([level[:1], level[:-1]])
    nxt = np.concatenate([level[1:], level[-1:]])
    share = np.clip(10.0 * np.log10(bands / total[:, None]) / 30.0, -1.5, 0.0)
    # Per-clip spectral mean normalisation: the band shares relative to their mean over the clip's
    # speech frames (within half the range of its speech level), so a voice's or a microphone's
    # overall tilt does not open or close the mouth.
    voiced = level > ACOUSTIC_SPEECH_LEVEL
    if voiced.any():
        share = share - share[voiced].mean(axis=0)
    f = np.column_stack([level, local, level - prev, level - nxt, share])
    c = ACOUSTIC_CONTEXT
    fp = np.concatenate([np.repeat(f[:1], c, 0), f, np.repeat(f[-1:], c, 0)]) if n_frames else f
    return np.concatenate([fp[k: k + n_frames] for k in range(2 * c + 1)], axis=1)


@dataclass(frozen=True)
class VisemeModel:
    """Per-phone targets and dominance parameters (see module docstring)."""

    targets: dict[str, dict[str, float]]  # phone -> articulator -> target
    theta: dict[str, float]  # articulator -> decay rate (1/s) after a segment
    theta_before: dict[str, float]  # articulator -> decay rate (1/s) before a segment
    lead_s: float  # the mouth leads the sound by this much (s)
    alpha: dict[str, float]  # phone -> dominance strength (1 if absent)
    meta: dict
    #: (len(ACOUSTIC_NAMES) * (2 * ACOUSTIC_CONTEXT + 1),) weights of the acoustic evidence added
    #: to the jaw track (see ``acoustic_features``); None: phones only.
    acoustic_jaw: tuple[float, ...] | None = None
    #: Inside a recognised vowel (a syllable nucleus) the jaw is at least this open, whatever
    #: the neighbours pull it to (0..1; 0: no floor).
    vowel_jaw_floor: float = 0.0
    #: A recognised silence at least this long (s) is a pause: the jaw shuts inside it, easing in
    #: and out over PAUSE_EASE_S (0: silences only pull by their fitted target).
    pause_min_s: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> VisemeModel:
        targets = {p: {a: float(d["targets"].get(p, {}).get(a, 0.0)) for a in ARTICULATORS} for p in PHONES}
        return cls(targets, {a: float(v) for a, v in d["theta"].items()},
                   {a: float(v) for a, v in d["theta_before"].items()}, float(d["lead_s"]),
                   {p: float(v) for p, v in d.get("alpha", {}).items()}, dict(d.get("meta", {})),
                   _acoustic_weights(d.get("acoustic_jaw")), float(d.get("vowel_jaw_floor", 0.0)),
                   float(d.get("pause_min_s", 0.0)))

    def to_dict(self) -> dict:
        out = {"lead_s": self.lead_s, "theta": self.theta, "theta_before": self.theta_before,
               "alpha": self.alpha, "targets": self.targets, "meta": self.meta}
        if self.acoustic_jaw is not None:
            out["acoustic_jaw"] = list(self.acoustic_jaw)
        if self.vowel_jaw_floor:
            out["vowel_jaw_floor"] = self.vowel_jaw_floor
        if self.pause_min_s:
            out["pause_min_s"] = self.pause_min_s
        return out

    def table(self, articulator: str) -> np.ndarray:
        """(len(PHONES),) targets of one articulator in PHONES order."""
        return np.array([self.targets[p][articulator] for p in PHONES])


def _acoustic_weights(w) -> tuple[float, ...] | None:
    if w is None:
        return None
    size = len(ACOUSTIC_NAMES) * (2 * ACOUSTIC_CONTEXT + 1)
    if len(w) != size:
        raise ValueError(f"acoustic_jaw has {len(w)} weights, the acoustic evidence has {size} features")
    return tuple(float(v) for v in w)


def phonetic_targets(phone: str) -> dict[str, float]:
    """The non-fitted targets of ``phone``: close, labiodental, teeth (0..1)."""
    return {"close": 1.0 if phone in BILABIAL else 0.0, "labiodental": 1.0 if phone in LABIODENTAL else 0.0,
            "teeth": TEETH.get(phone, 0.0)}


@functools.lru_cache(maxsize=4)
def load_model(path: str | None = None) -> VisemeModel:
    """The shipped model (``viseme_model.json`` beside this module) or the JSON file at ``path``."""
    if path is None:
        text = resources.files(__package__).joinpath("viseme_model.json").read_text()
    else:
        text = Path(path).read_text()
    return VisemeModel.from_dict(json.loads(text))


def phone_weights(segments: list[PhoneSegment], times: np.ndarray, theta: float, theta_before: float,
                  alpha: dict[str, float] | None = None) -> np.ndarray:
    """(len(times), len(PHONES)) dominance-normalised phone weights (rows sum to 1).

    Row t is the weight each phone class has at ``times[t]`` (s): the sum of its segments'
    dominances ``alpha * exp(-theta * d)`` divided by the sum over all segments; ``d`` is the
    distance to the segment (0 inside), decaying at ``theta_before`` ahead of the segment.
    Times outside every segment's reach fall back to SIL.
    """
    index = {p: i for i, p in enumerate(PHONES)}
    times = np.asarray(times, dtype=np.float64)
    w = np.zeros((len(times), len(PHONES)))
    for s in segments:
        a, b = np.searchsorted(times, [s.start - DOMINANCE_REACH_S, s.end + DOMINANCE_REACH_S])
        if a >= b:
            continue
        t = times[a:b]
        before = np.maximum(s.start - t, 0.0)
        after = np.maximum(t - s.end, 0.0)
        dom = np.exp(-theta_before * before - theta * after)
        if alpha:
            dom = dom * alpha.get(s.phone, 1.0)
        w[a:b, index[s.phone]] += dom
    total = w.sum(axis=1)
    empty = total < 1e-12
    w[empty, 0] = 1.0
    total[empty] = 1.0
    return w / total[:, None]


def _inside(segments: list[PhoneSegment], phones: frozenset, times: np.ndarray) -> np.ndarray:
    """1.0 where ``times`` fall inside a segment of one of ``phones``."""
    out = np.zeros(len(times))
    for s in segments:
        if s.phone in phones:
            a, b = np.searchsorted(times, [s.start, s.end])
            out[a:b] = 1.0
    return out


def articulator_tracks(segments: list[PhoneSegment], n_frames: int, fps: int,
                       model: VisemeModel | None = None, acoustic: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-video-frame articulator tracks for frames 0..n_frames-1 of a clip.

    Returns ``{"jaw", "round", "close", "labiodental", "teeth", "vowel"}`` -> (n_frames,) float
    arrays (jaw, close, labiodental, teeth in 0..1; round in -1..1; vowel: the share of the frame
    inside a recognised vowel). Each frame pools SUBSAMPLES
    evaluations over its own interval, shifted ``lead_s`` ahead: mean for jaw, round and teeth,
    max for labiodental contact; closure by mean (a frame half in a closure is half closed).
    ``acoustic``: the clip's ``acoustic_features`` (n_frames rows); where the model has acoustic
    weights, their contribution is added to the jaw track.
    """
    model = model or load_model()
    sub = (np.arange(n_frames * SUBSAMPLES) + 0.5) / (fps * SUBSAMPLES) + model.lead_s
    out: dict[str, np.ndarray] = {}
    cache: dict[tuple[float, float], np.ndarray] = {}
    for art in ARTICULATORS:
        key = (model.theta[art], model.theta_before[art])
        if key not in cache:
            cache[key] = phone_weights(segments, sub, key[0], key[1], model.alpha)
        v = cache[key] @ model.table(art)
        if art == "close":
            v = np.maximum(v, _inside(segments, BILABIAL, sub))
        elif art == "labiodental":
            v = np.maximum(v, 0.8 * _inside(segments, LABIODENTAL, sub))
        v = v.reshape(n_frames, SUBSAMPLES)
        out[art] = v.max(axis=1) if art in MAX_POOLED else v.mean(axis=1)
    out["vowel"] = _inside(segments, VOWELS, sub).reshape(n_frames, SUBSAMPLES).mean(axis=1)
    if model.acoustic_jaw is not None and acoustic is not None:
        out["jaw"] = out["jaw"] + np.asarray(acoustic)[:n_frames] @ np.asarray(model.acoustic_jaw)
    if model.pause_min_s > 0:
        pauses = [s for s in segments if s.phone == "SIL" and s.end - s.start >= model.pause_min_s]
        inside = _inside(pauses, frozenset({"SIL"}), sub)
        half = max(1, int(round(PAUSE_EASE_S * fps * SUBSAMPLES / 2)))
        k = np.hanning(2 * half + 3)[1:-1]
        inside = np.convolve(np.pad(inside, half, mode="edge"), k / k.sum(), mode="valid")
        inside = inside.reshape(n_frames, SUBSAMPLES).mean(axis=1)
        if acoustic is not None:  # ... and quiet: a silence the recognizer hears in speech-level sound is not a pause
            below_db = ACOUSTIC_RANGE_DB * (1.0 - np.asarray(acoustic)[:n_frames, ACOUSTIC_CONTEXT * len(ACOUSTIC_NAMES)])
            inside = inside * np.clip((below_db - PAUSE_QUIET_DB) / 6.0, 0.0, 1.0)
        shut = 1.0 - inside
        out["jaw"] = out["jaw"] * shut
        out["teeth"] = out["teeth"] * shut
    if model.vowel_jaw_floor:
        out["jaw"] = np.maximum(out["jaw"], model.vowel_jaw_floor * out["vowel"])
    out["jaw"] = np.clip(out["jaw"], 0.0, 1.0)
    out["round"] = np.clip(out["round"], -1.0, 1.0)
    for art in ("close", "labiodental", "teeth"):
        out[art] = np.clip(out[art], 0.0, 1.0)
    return out
