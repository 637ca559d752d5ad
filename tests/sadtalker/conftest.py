"""Session fixtures for the SadTalker engine tests.

``random_checkpoints`` builds the random-weight checkpoint directory once per test session
(about 0.8 GB: the real 256 set's size) and deletes it when the session ends. Tests that need it
skip with the reason when torch or the upstream reference package is unavailable, and fail with
it in CI (tests.conftest.need).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import need, need_module


@dataclass(frozen=True)
class RandomCheckpoints:
    ckpt: object  # lipsync.engines.sadtalker.checkpoints.SadTalkerCheckpoints
    modules: dict  # upstream reference modules by part name (see factory.make_random_checkpoints)

    @property
    def directory(self) -> Path:
        return self.ckpt.directory


def require_torch():
    return need_module("torch", "torch is not installed (the sadtalker extra)")


def require_upstream():
    """The upstream reference sources unpacked from the pinned wheel (see upstream.py)."""
    require_torch()
    from tests.sadtalker.upstream import UpstreamUnavailable, upstream_root

    try:
        upstream_root()
    except (UpstreamUnavailable, OSError) as e:
        need(False, f"upstream SadTalker reference unavailable: {e}")


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory) -> RandomCheckpoints:
    require_upstream()
    from tests.sadtalker.factory import make_random_checkpoints

    directory = tmp_path_factory.mktemp("sadtalker_ckpt")
    ckpt, modules = make_random_checkpoints(directory, size=256, preprocess="crop", seed=0)
    yield RandomCheckpoints(ckpt=ckpt, modules=modules)
    shutil.rmtree(directory, ignore_errors=True)  # 0.8 GB; pytest would keep it for 3 sessions
