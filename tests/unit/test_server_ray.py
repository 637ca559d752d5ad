"""Ray Serve wrapper: settings per replica, and a clear error when ray is not installed."""

from __future__ import annotations

import sys

import pytest

from lipsync.errors import EngineUnavailable
from lipsync.server.ray_serve import build_app, replica_settings
from lipsync.settings import Settings


def test_replica_takes_only_what_ray_sends_it() -> None:
    s = replica_settings(Settings(workers=4, queue_size=16), max_ongoing_requests=2)
    assert (s.workers, s.queue_size) == (1, 1)
    s = replica_settings(Settings(), max_ongoing_requests=1)
    assert (s.workers, s.queue_size) == (1, 0)
    with pytest.raises(ValueError):
        replica_settings(Settings(), max_ongoing_requests=0)


def test_missing_ray_is_a_clear_error(monkeypatch) -> None:
    # ray hidden whether or not it is installed: a None entry makes "import ray" fail
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(EngineUnavailable, match=r"lipsync-server\[ray\]"):
        build_app(Settings())
