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
#: Articulators pooled by max over a frame's sub-samples (the rest: mean). Closure too: a frame
#: that a P/B/M segment reaches into is drawn shut, so a closure the recogniser placed a little
#: early or short still covers the frame where the lips meet (mean pooling left such frames
#: half open: on LibriVox 0870 with obama.jpg one M of seven read as open once the jaw had more
#: contrast; with max pooling all seven are shut, and the dev split's realsync figures stay
#: within noise: real_corr 0.381 -> 0.377, closed_agree 0.643 -> 0.633, open_agree 0.600 -> 0.582).
MAX_POOLED = ("labiodental", "close")
VOWELS = frozenset({"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"})
#: Teeth show for dental/alveolar fricatives and affricates and for spread front vowels.
TEETH = {"S": 1.0, "Z": 1.0, "SH": 0.9, "ZH": 0.9, "CH": 0.9, "JH": 0.9, "TH": 1.0, "DH": 0.9,
         "F": 0.8, "V": 0.8, "IY": 0.8, "IH": 0.6, "EY": 0.7, "EH": 0.6, "AE": 0.6, "T": 0.5, "D": 0.5,
         "N": 0.4, "Y": 0.6, "AY": 0.5}


@dataclass(frozen=True)
class VisemeModel:
    """Per-phone targets and dominance parameters (see module docstring)."""

    targets: dict[str, dict[str, float]]  # phone -> articulator -> target
    theta: dict[str, float]  # articulator -> decay rate (1/s) after a segment
    theta_before: dict[str, float]  # articulator -> decay rate (1/s) before a segment
    lead_s: float  # the mouth leads the sound by this much (s)
    alpha: dict[str, float]  # phone -> dominance strength (1 if absent)
    meta: dict

    @classmethod
    def from_dict(cls, d: dict) -> VisemeModel:
        targets = {p: {a: float(d["targets"].get(p, {}).get(a, 0.0)) for a in ARTICULATORS} for p in PHONES}
        return cls(targets, {a: float(v) for a, v in d["theta"].items()},
                   {a: float(v) for a, v in d["theta_before"].items()}, float(d["lead_s"]),
                   {p: float(v) for p, v in d.get("alpha", {}).items()}, dict(d.get("meta", {})))

    def to_dict(self) -> dict:
        return {"lead_s": self.lead_s, "theta": self.theta, "theta_before": self.theta_before,
                "alpha": self.alpha, "targets": self.targets, "meta": self.meta}

    def table(self, articulator: str) -> np.ndarray:
        """(len(PHONES),) targets of one articulator in PHONES order."""
        return np.array([self.targets[p][articulator] for p in PHONES])


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
                       model: VisemeModel | None = None) -> dict[str, np.ndarray]:
    """Per-video-frame articulator tracks for frames 0..n_frames-1 of a clip.

    Returns ``{"jaw", "round", "close", "labiodental", "teeth", "vowel"}`` -> (n_frames,) float
    arrays (jaw, close, labiodental, teeth in 0..1; round in -1..1; vowel: the share of the frame
    inside a recognised vowel). Each frame pools SUBSAMPLES
    evaluations over its own interval, shifted ``lead_s`` ahead: mean for jaw, round and teeth,
    max for labiodental contact and bilabial closure (a frame a closure reaches into is shut).
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
    out["jaw"] = np.clip(out["jaw"], 0.0, 1.0)
    out["round"] = np.clip(out["round"], -1.0, 1.0)
    for art in ("close", "labiodental", "teeth"):
        out[art] = np.clip(out[art], 0.0, 1.0)
    return out
