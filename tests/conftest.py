"""Shared fixtures and the rule for missing material.

* ``material`` (session): input files the tests make themselves (tests/material.py) - every
  unit, pipeline, server and SadTalker test gets its files from there or from tests/data.
* ``shared_path`` / ``shared``: a file of ``../shared`` (the quality judges and real-speech
  material only).
* ``need(condition, reason)``: what a test cannot run without. Outside CI a missing thing skips
  the test with the reason; in CI (environment variable ``CI`` set) it fails with it.
* In CI every other skip fails too, unless the test is marked ``@pytest.mark.allow_skip(reason)``
  (something no CI machine can have, e.g. CUDA): a CI run never passes by skipping.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.material import Material

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPSYNC_SHARED", REPO.parent / "shared"))
ASSETS = SHARED / "assets"
LIPEVAL = SHARED / "eval" / "lipeval.py"
#: CI sets CI (to "true" or "1"); an empty value or "0"/"false" means a developer's run.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(condition: object, reason: str) -> None:
    """Stop the test unless ``condition`` holds: skip with ``reason``, or fail with it in CI.

    ``condition`` is a ``Path`` (it must exist) or anything truthy.
    """
    ok = condition.exists() if isinstance(condition, Path) else bool(condition)
    if ok:
        return
    if IN_CI:
        pytest.fail(f"missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, reason: str):
    """``pytest.importorskip`` that fails in CI: the imported module, or skip/fail with ``reason``."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"{reason} ({e})")


def shared_path(*parts: str) -> Path:
    """A file under ../shared/assets; skips (fails in CI) with the reason when it is absent."""
    p = ASSETS.joinpath(*parts)
    need(p, f"test material {p} is absent (../shared beside the repo)")
    return p


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture(scope="session")
def material(tmp_path_factory) -> Material:
    """Test input files made on first use (see tests/material.py for the list)."""
    return Material(tmp_path_factory.mktemp("material"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_skip(reason): the test may skip even in CI, for the reason given (e.g. CUDA only)",
    )
    if IN_CI:
        # A module that cannot be collected (or skips whole, see below) fails, and the other
        # modules still run, so one CI log shows every problem.
        config.option.continue_on_collection_errors = True


def _skip_reason(report) -> str:
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("allow_skip") is not None:
        return
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI={os.environ.get('CI')}), which must not happen: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module skipped at import (``pytest.importorskip`` at the top) fails in CI too."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and isinstance(collector, pytest.Module):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"module skipped in CI (CI={os.environ.get('CI')}), which must not happen: {reason}"


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
