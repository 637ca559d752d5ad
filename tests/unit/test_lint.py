"""The code base is ruff-clean under the project's own ``[tool.ruff]`` configuration.

Runs the same command a developer would (``python -m ruff check src tests bench scripts``) from
the repository root, so a new finding fails here with ruff's report in the message.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATHS = ("src", "tests", "bench", "scripts")


def test_ruff_check_is_clean():
    if importlib.util.find_spec("ruff") is None:
        reason = "ruff is not installed (it comes with the 'test' extra: pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(f"lint tool missing in CI: {reason}")
        pytest.skip(reason)
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *PATHS],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"ruff check failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
