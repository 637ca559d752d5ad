#!/usr/bin/env python3
"""Fit the classic engine's viseme model (``viseme_model.json``) on the dev split's real speakers.

For every dev clip of ``corpus/manifest.json`` (prepared by ``scripts/build_corpus.py`` with
``realsync.py prepare``: speech.wav + the real inner-lip opening and mouth width per 25 fps frame)
the phones are recognised (``lipsync.engines.classic.phones``) and turned into dominance-weighted
phone evidence per frame (``visemes.phone_weights``). Then, for each (lead, theta) on a small grid:

* jaw targets = ridge regression of the real opening (per clip scaled to its 10th..95th
  percentiles) on the phone evidence; scored by leave-one-speaker-out correlation;
* round targets = ridge regression of the real mouth width (per clip z-scored; narrower = rounder),
  scored the same way.

The best grid point is refit on all dev clips; targets are scaled so silence is 0 and the most
open phone 1 (rounding: the roundest phone +1). Bilabial closure, labiodental contact and teeth
are phonetic facts (``visemes.phonetic_targets``). Deterministic: same inputs, same JSON.

    python scripts/fit_visemes.py [--cases .cache/realsync] [--out PATH] [--tiny]

``--tiny`` fits on two clips with one grid point (seconds; the CI check that the script runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lipsync.engines.classic import phones as ph
from lipsync.engines.classic import visemes as vz

FPS = 25
LEADS = (-0.04, -0.02, 0.0, 0.02, 0.04, 0.06)
THETAS = (15.0, 25.0, 40.0, 60.0)
ROUND_THETA_BEFORE = (5.0, 8.0, 12.0)
RIDGES = (3.0, 10.0, 30.0)
#: Dominance strength of vowels relative to consonants (Cohen-Massaro alpha), searched.
VOWEL_ALPHAS = (1.0, 2.0, 4.0)
#: Phonetic priors the ridge shrinks towards (a phone seen rarely keeps its textbook shape):
#: openness on the scaled-opening axis (0 = a speaker's 10th percentile, 1 = their 95th), after
#: the vowel-height classes of Ladefoged & Johnson, "A Course in Phonetics"; rounding -1..1.
OPEN_PRIOR = {"AA": 1.0, "AE": 0.9, "AH": 0.7, "AO": 0.85, "AW": 0.9, "AY": 0.9, "EH": 0.7, "ER": 0.45,
              "EY": 0.6, "IH": 0.45, "IY": 0.3, "OW": 0.6, "OY": 0.7, "UH": 0.4, "UW": 0.3, "HH": 0.5,
              "F": 0.15, "V": 0.15, "TH": 0.25, "DH": 0.25, "S": 0.25, "Z": 0.25, "SH": 0.3, "ZH": 0.3,
              "CH": 0.3, "JH": 0.3, "T": 0.35, "D": 0.35, "N": 0.35, "L": 0.4, "K": 0.4, "G": 0.4,
              "NG": 0.4, "R": 0.35, "W": 0.2, "Y": 0.3, "SIL": 0.05}
ROUND_PRIOR = {"UW": 1.0, "OW": 0.8, "AO": 0.6, "OY": 0.6, "UH": 0.5, "W": 1.0, "ER": 0.4, "R": 0.3,
               "SH": 0.4, "ZH": 0.4, "CH": 0.4, "JH": 0.4, "IY": -1.0, "IH": -0.5, "EY": -0.6,
               "EH": -0.3, "AE": -0.3, "S": -0.3, "Z": -0.3}
DEFAULT_OUT = ROOT / "src" / "lipsync" / "engines" / "classic" / "viseme_model.json"


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != ph.SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def load_cases(cases: Path, tiny: bool) -> list[dict]:
    manifest = json.loads((ROOT / "corpus" / "manifest.json").read_text())
    dev = [c for c in manifest["real"]["clips"] if c["split"] == "dev"]
    if tiny:
        dev = dev[:2]
    out = []
    for c in dev:
        d = cases / c["name"]
        if not (d / "reference.json").exists():
            raise SystemExit(f"missing prepared clip {d} (run scripts/build_corpus.py first)")
        ref = json.loads((d / "reference.json").read_text())
        samples = read_wav(d / "speech.wav")
        out.append({"name": c["name"], "speaker": c["speaker"], "segments": ph.recognize(samples),
                    "opening": np.array(ref["opening"]), "width": np.array(ref["width"]), "samples": samples})
    return out


def scaled_opening(op: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(op, [10, 95])
    return (op - lo) / max(hi - lo, 1e-6)


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(x.std(), 1e-6)


def alphas(vowel_alpha: float) -> dict[str, float]:
    return {p: vowel_alpha for p in vz.VOWELS} if vowel_alpha != 1.0 else {}


def evidence(case: dict, lead: float, theta: float, theta_before: float, va: float = 1.0) -> np.ndarray:
    n = len(case["opening"])
    sub = (np.arange(n * vz.SUBSAMPLES) + 0.5) / (FPS * vz.SUBSAMPLES) + lead
    w = vz.phone_weights(case["segments"], sub, theta, theta_before, alphas(va))
    return w.reshape(n, vz.SUBSAMPLES, -1).mean(axis=1)


def ridge(x: np.ndarray, y: np.ndarray, lam: float, prior: np.ndarray) -> np.ndarray:
    """Ridge regression shrunk towards ``prior``. Weight rows sum to 1, so there is no
    intercept: each coefficient is a phone's own target."""
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y + lam * prior)


def loso(cases: list[dict], xs: list[np.ndarray], ys: list[np.ndarray], lam: float, prior: np.ndarray) -> float:
    """Mean over held-out speakers of the correlation of the prediction with the real track."""
    speakers = sorted({c["speaker"] for c in cases})
    if len(speakers) < 2:
        x, y = np.concatenate(xs), np.concatenate(ys)
        return float(np.corrcoef(x @ ridge(x, y, lam, prior), y)[0, 1])
    scores = []
    for s in speakers:
        tr = [i for i, c in enumerate(cases) if c["speaker"] != s]
        te = [i for i, c in enumerate(cases) if c["speaker"] == s]
        coef = ridge(np.concatenate([xs[i] for i in tr]), np.concatenate([ys[i] for i in tr]), lam, prior)
        for i in te:
            p = xs[i] @ coef
            if p.std() > 0:
                scores.append(float(np.corrcoef(p, ys[i])[0, 1]))
    return float(np.mean(scores))


def fit(cases: list[dict], tiny: bool) -> dict:
    leads, thetas, rthetas, ridges, vas = (((0.02,), (25.0,), (8.0,), (10.0,), (1.0,)) if tiny
                                           else (LEADS, THETAS, ROUND_THETA_BEFORE, RIDGES, VOWEL_ALPHAS))
    open_prior = np.array([OPEN_PRIOR.get(p, 0.0) for p in ph.PHONES])
    # width is z-scored: a rounder mouth is narrower, so the prior is minus the rounding
    width_prior = -np.array([ROUND_PRIOR.get(p, 0.0) for p in ph.PHONES])
    y_open = [scaled_opening(c["opening"]) for c in cases]
    y_width = [zscore(c["width"]) for c in cases]
    best_jaw = max((loso(cases, [evidence(c, L, t, t, va) for c in cases], y_open, lam, open_prior), L, t, lam, va)
                   for L in leads for t in thetas for lam in ridges for va in vas)
    _, lead, theta, lam, va = best_jaw
    best_round = max((loso(cases, [evidence(c, lead, theta, tb, va) for c in cases], y_width, rl, width_prior), tb, rl)
                     for tb in rthetas for rl in ridges)
    _, theta_round_before, lam_round = best_round

    x = np.concatenate([evidence(c, lead, theta, theta, va) for c in cases])
    jaw = np.clip(ridge(x, np.concatenate(y_open), lam, open_prior), 0.0, None)
    jaw = jaw / max(float(jaw.max()), 1e-6)  # the most open phone opens fully
    xr = np.concatenate([evidence(c, lead, theta, theta_round_before, va) for c in cases])
    width = ridge(xr, np.concatenate(y_width), lam_round, width_prior)
    rnd = np.clip(-width, -1.0, 1.0)
    targets = {}
    for i, p in enumerate(ph.PHONES):
        t = {"jaw": round(float(jaw[i]), 4), "round": round(float(rnd[i]), 4)}
        t.update(vz.phonetic_targets(p))
        if p in vz.BILABIAL or p == "SIL":  # lips together: shut for P/B/M, at rest in pauses
            t["jaw"] = 0.0
        if p == "SIL":
            t["round"] = 0.0
        targets[p] = t
    return {
        "lead_s": lead,
        "theta": {"jaw": theta, "round": theta, "close": 60.0, "labiodental": 60.0, "teeth": theta},
        "theta_before": {"jaw": theta, "round": theta_round_before, "close": 60.0, "labiodental": 60.0,
                         "teeth": theta},
        "alpha": alphas(va),
        "targets": targets,
        "meta": {"fitted_by": "scripts/fit_visemes.py" + (" --tiny" if tiny else ""),
                 "dev_clips": [c["name"] for c in cases],
                 "loso_corr_opening": round(best_jaw[0], 4), "loso_corr_width": round(best_round[0], 4),
                 "ridge_jaw": lam, "ridge_round": lam_round, "fps": FPS},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=Path, default=ROOT / ".cache" / "realsync")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    model = fit(load_cases(a.cases, a.tiny), a.tiny)
    vz.VisemeModel.from_dict(model)  # validates
    a.out.write_text(json.dumps(model, indent=1, sort_keys=True) + "\n")
    print(json.dumps(model["meta"] | {"lead_s": model["lead_s"], "theta": model["theta"]["jaw"],
                                      "theta_round_before": model["theta_before"]["round"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
