"""Waiting in tests without fixed sleeps or tight clocks.

The machine that runs the suite may be a loaded two-core box: tests wait for a condition (an
event, a counter) with a generous bound, and never assert that something took less than N s.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a test waits for something that normally takes milliseconds before calling it a hang.
PATIENCE_S = 60.0


def wait_for(condition: Callable[[], object], timeout: float = PATIENCE_S, what: str = "condition") -> None:
    """Poll ``condition`` (every 20 ms) until it is true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} not reached within {timeout:.0f} s"
        time.sleep(0.02)


def returns_within(fn: Callable[[], T], timeout: float = PATIENCE_S, what: str = "the call") -> T:
    """Run ``fn`` on a helper thread; its result (or exception), or fail if it is still running after
    ``timeout`` s. For calls that must answer *without waiting for* something the test holds back
    (a gate that only opens later): a call that waited would never return, so the bound is only
    there to turn that hang into a failure, not to time the call."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} was still waiting after {timeout:.0f} s: it must not wait"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
