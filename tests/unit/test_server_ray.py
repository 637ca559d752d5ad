"""Ray Serve wrapper: settings per replica, and a clear error when ray is not installed."""

from __future__ import annotations

import importlib.util

import pytest

from lipsync.errors import EngineUnavailable
from lipsync.server.ray_serve import build_app, replica_settings
from lipsync.settings import Settings


def test_replica_takes_only_what_ray_sends_it() -> None:
    # One worker; room for what Ray sends plus as many cancelled jobs still winding down.
    s = replica_settings(Settings(workers=4, queue_size=16), max_ongoing_requests=2)
    assert (s.workers, s.queue_size) == (1, 3)
    s = replica_settings(Settings(), max_ongoing_requests=1)
    assert (s.workers, s.queue_size) == (1, 1)
    with pytest.raises(ValueError):
        replica_settings(Settings(), max_ongoing_requests=0)


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_missing_ray_is_a_clear_error() -> None:
    with pytest.raises(EngineUnavailable, match=r"lipsync-server\[ray\]"):
        build_app(Settings())
