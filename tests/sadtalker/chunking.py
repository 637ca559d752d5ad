"""Test helpers for the SadTalker audio tests: speech-like audio and AudioChunks cut like the pipeline's."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lipsync.types import AudioChunk

SR = 16_000
FPS = 25


def speechlike(seconds: float, *, seed: int = 0, sr: int = SR) -> np.ndarray:
    """Voiced syllables (harmonics of a gliding pitch, ~4 per second) with noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4.1 * t), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.23 * t + 1.0) > -0.7).astype(np.float64)
    noise = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)
    x = 0.25 * voiced * syllables * pauses + 0.05 * noise * pauses
    return x.astype(np.float32)


def total_frames(wav: np.ndarray, fps: int = FPS, sr: int = SR) -> int:
    """The pipeline's frame count: rounded to the nearest frame, at least one."""
    return max(1, round(len(wav) / sr * fps))


def chunks(
    wav: np.ndarray, chunk_frames: int | list[int], context: tuple[float, float], *,
    fps: int = FPS, sr: int = SR, frames: int | None = None,
) -> Iterator[AudioChunk]:
    """Cut ``wav`` into chunks of ``chunk_frames`` video frames (or the given sizes, cycled), each with
    up to ``context`` seconds of audio before and after, as a chunker would."""
    total = total_frames(wav, fps, sr) if frames is None else frames
    sizes = [chunk_frames] if isinstance(chunk_frames, int) else list(chunk_frames)
    before, after = (int(np.ceil(c * sr)) for c in context)
    first, index = 0, 0
    while first < total:
        n = min(sizes[index % len(sizes)], total - first)
        own_start = round(first * sr / fps)
        own_end = round((first + n) * sr / fps)
        lo = max(0, own_start - before)
        hi = min(len(wav), own_end + after)
        yield AudioChunk(
            index=index, samples=wav[lo:hi], sample_rate=sr, fps=fps, first_frame=first, n_frames=n,
            context_before=own_start - lo, context_after=max(0, hi - own_end), is_last=first + n >= total,
        )
        first += n
        index += 1
