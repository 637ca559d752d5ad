"""Phones -> articulator tracks: the shipped viseme model and the coarticulation rules."""
from __future__ import annotations

import numpy as np
import pytest

from lipsync.engines.classic import visemes as vz
from lipsync.engines.classic.phones import PHONES, PhoneSegment, normalise

FPS = 25


def test_shipped_model_loads_and_covers_every_phone():
    m = vz.load_model()
    assert set(m.targets) == set(PHONES)
    for p, t in m.targets.items():
        assert set(t) == set(vz.ARTICULATORS), p
        assert 0.0 <= t["jaw"] <= 1.0 and -1.0 <= t["round"] <= 1.0, p
    assert m.meta["fitted_by"].startswith("scripts/fit_visemes.py")
    assert "--tiny" not in m.meta["fitted_by"]  # the shipped weights come from the full fit
    assert 0.0 <= m.lead_s <= 0.1


def test_fitted_targets_follow_phonetics():
    m = vz.load_model()
    jaw = {p: t["jaw"] for p, t in m.targets.items()}
    rnd = {p: t["round"] for p, t in m.targets.items()}
    assert min(jaw["AA"], jaw["AY"], jaw["AE"]) > max(jaw["P"], jaw["B"], jaw["M"], jaw["SIL"]) + 0.3
    assert jaw["AA"] > jaw["IY"]
    assert min(rnd["W"], rnd["OW"]) > max(rnd["IY"], rnd["S"]) + 0.5
    for p in ("P", "B", "M"):
        assert m.targets[p]["close"] == 1.0
    for p in ("F", "V"):
        assert m.targets[p]["labiodental"] == 1.0


def _segs(*spec):
    out, t = [], 0.0
    for phone, dur in spec:
        out.append(PhoneSegment(phone, t, t + dur))
        t += dur
    return out


def test_lips_fully_shut_during_a_bilabial_between_open_vowels():
    segs = _segs(("SIL", 0.3), ("AA", 0.2), ("M", 0.08), ("AA", 0.2), ("SIL", 0.3))
    tr = vz.articulator_tracks(segs, 27, FPS)
    lead = vz.load_model().lead_s
    k = int((0.54 - lead) * FPS)  # the frame whose interval holds the middle of the M (mouth leads)
    assert tr["close"][k] == 1.0
    assert tr["jaw"][int(0.4 * FPS)] > 0.5 and tr["jaw"][:3].max() < 0.05  # opens ~0.1 s ahead


def test_rounding_is_anticipated():
    # The T before a UW is rounder than the same T before an IY, about 100 ms ahead of the vowel.
    rounded = vz.articulator_tracks(_segs(("SIL", 0.3), ("IY", 0.3), ("T", 0.12), ("UW", 0.3), ("SIL", 0.4)), 36, FPS)
    spread = vz.articulator_tracks(_segs(("SIL", 0.3), ("IY", 0.3), ("T", 0.12), ("IY", 0.3), ("SIL", 0.4)), 36, FPS)
    k = int((0.72 - 0.1) * FPS)  # 100 ms before the vowel
    assert rounded["round"][k] > spread["round"][k] + 0.1
    assert rounded["round"][int(0.85 * FPS)] > spread["round"][int(0.85 * FPS)] + 0.5


def test_labiodental_contact_for_f_and_v():
    segs = _segs(("SIL", 0.3), ("AA", 0.2), ("F", 0.12), ("AA", 0.2), ("SIL", 0.3))
    tr = vz.articulator_tracks(segs, 28, FPS)
    assert tr["labiodental"][int(0.55 * FPS)] >= 0.8
    assert tr["labiodental"][int(0.35 * FPS)] < 0.2


def test_tracks_are_bounded_and_shaped():
    segs = _segs(*[(p, 0.07) for p in PHONES])
    n = int(np.ceil(segs[-1].end * FPS))
    tr = vz.articulator_tracks(segs, n, FPS)
    for name, v in tr.items():
        assert v.shape == (n,) and np.isfinite(v).all(), name
    assert tr["round"].min() >= -1 and tr["round"].max() <= 1


def test_phone_weights_rows_sum_to_one():
    segs = _segs(("SIL", 0.2), ("AA", 0.2), ("B", 0.05))
    w = vz.phone_weights(segs, np.linspace(-1, 2, 50), 25.0, 10.0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)


def test_level_normalisation_ignores_recording_level():
    x = np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
    np.testing.assert_allclose(normalise(0.01 * x), normalise(0.5 * x), atol=1)  # one LSB


def test_recognizer_is_deterministic_and_finds_speech(material):
    from lipsync.engines.classic.phones import recognize
    from tests.unit.test_classic_motion import _real_speech

    x = _real_speech(material)
    a, b = recognize(x), recognize(x)
    assert a == b
    assert sum(s.phone != "SIL" for s in a) >= 10
    with pytest.raises(ValueError):
        recognize(x, 8000)
