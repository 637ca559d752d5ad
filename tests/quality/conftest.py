"""Quality-gate material: ../shared assets, the judges, prepared real clips (cached).

Missing material FAILS the test in CI (env ``CI`` set) and skips it elsewhere, with the reason.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ..conftest import REPO

SHARED = REPO.parent / "shared"
REALSYNC = SHARED / "eval" / "realsync.py"
LIPEVAL = SHARED / "eval" / "lipeval.py"
CASES = REPO / ".cache" / "realsync"  # prepared real clips, reused across runs


def missing(reason: str):
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"quality material missing in CI: {reason}")
    pytest.skip(reason)


def require_shared_module() -> None:
    """Called at the top of each quality module: without ``../shared`` at all, the module is ONE
    skip saying why (its judges and real clips live there), not one skip per case; in CI it is a
    collection failure instead."""
    if SHARED.is_dir():
        return
    reason = f"{SHARED} is absent: the quality gate's judges and real speech live in ../shared"
    if os.environ.get("CI"):
        pytest.fail(f"quality material missing in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def material(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        missing(f"{p} is absent (../shared beside the repo)")
    return p


def real_case(name: str) -> Path:
    """The prepared case directory of a real clip (realsync.py prepare, cached under .cache)."""
    material("eval", "realsync.py")
    material("assets", "real", name + ".mp4")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from build_corpus import prepare
    finally:
        sys.path.pop(0)
    return prepare(SHARED, CASES, name)


def realsync_module():
    material("eval", "realsync.py")
    import importlib.util

    spec = importlib.util.spec_from_file_location("realsync_judge", REALSYNC)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
