"""Shared fixtures: where the test material beside the repo lives, and small generated inputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPSYNC_SHARED", REPO.parent / "shared"))
ASSETS = SHARED / "assets"
LIPEVAL = SHARED / "eval" / "lipeval.py"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when the material is absent."""
    p = ASSETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"test material {p} is absent (../shared beside the repo)")
    return p


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture(scope="session")
def tone_wav(tmp_path_factory) -> Path:
    """1.2 s of a 220 Hz tone with an amplitude envelope, 16 kHz mono 16-bit."""
    import wave

    sr = 16000
    t = np.arange(int(1.2 * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path
