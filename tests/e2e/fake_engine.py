"""A fast engine for server end-to-end tests, plugged into the real pipeline.

It "renders" the avatar crop with the mouth region darkened in proportion to the chunk's
loudness: cheap, deterministic, and real frames for the real encoder. ``LIPSYNC_FAKE_CHUNK_DELAY_S``
(environment, because the server runs in its own process) adds a sleep per chunk, so tests can
make jobs slow enough to fill the queue or to be interrupted. ``LIPSYNC_FAKE_HOLD`` names a file:
while it exists, chunks from ``LIPSYNC_FAKE_HOLD_FROM_CHUNK`` (default 0) on wait, so a test holds
jobs at a known point (create the file once the server is ready: the warm-up renders too) and
lets them go by deleting it when it has checked what it wanted (an event, not a clock).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np

from lipsync.engines.base import Engine, RenderSession
from lipsync.settings import Settings
from lipsync.types import AudioChunk, Avatar, Frames, MotionOptions

DELAY_ENV = "LIPSYNC_FAKE_CHUNK_DELAY_S"
HOLD_ENV = "LIPSYNC_FAKE_HOLD"
HOLD_FROM_ENV = "LIPSYNC_FAKE_HOLD_FROM_CHUNK"
#: A hold nobody releases lets the job go after this long (the test has failed by then anyway).
HOLD_LIMIT_S = 300.0


def _wait_while_held(chunk: AudioChunk) -> None:
    hold = os.environ.get(HOLD_ENV)
    if not hold or chunk.index < int(os.environ.get(HOLD_FROM_ENV, "0") or 0):
        return
    end = time.monotonic() + HOLD_LIMIT_S
    while Path(hold).exists() and time.monotonic() < end:
        time.sleep(0.02)


class FakeSession(RenderSession):
    def __init__(self, avatar: Avatar, options: MotionOptions, delay_s: float) -> None:
        base = avatar.image
        if base.shape[0] != options.size:
            base = cv2.resize(
                np.ascontiguousarray(base), (options.size, options.size), interpolation=cv2.INTER_AREA
            )
        self.base = np.ascontiguousarray(base)
        self.delay_s = delay_s
        s = options.size
        self.mouth = (slice(int(s * 0.62), int(s * 0.75)), slice(int(s * 0.38), int(s * 0.62)))

    def render(self, chunk: AudioChunk) -> Frames:
        _wait_while_held(chunk)
        if self.delay_s:
            time.sleep(self.delay_s)
        own = chunk.own
        per_frame = max(1, len(own) // max(1, chunk.n_frames))
        frames = np.repeat(self.base[None], chunk.n_frames, axis=0)
        for i in range(chunk.n_frames):
            part = own[i * per_frame : (i + 1) * per_frame]
            loudness = float(np.sqrt(np.mean(part**2))) if part.size else 0.0
            shade = 1.0 - min(0.8, loudness * 4.0)
            frames[i][self.mouth] = (frames[i][self.mouth] * shade).astype(np.uint8)
        return Frames(first_index=chunk.first_frame, data=frames)


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    @classmethod
    def from_settings(cls, settings: Settings) -> FakeEngine:
        return cls(delay_s=float(os.environ.get(DELAY_ENV, "0") or 0))

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "chunk_delay_s": self.delay_s}

    def start(
        self, avatar: Avatar, options: MotionOptions, total_frames: int, *, assets: Path | None = None
    ) -> RenderSession:
        return FakeSession(avatar, options, self.delay_s)
