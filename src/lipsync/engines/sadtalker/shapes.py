"""Input shapes on CUDA: network calls padded to a few batch sizes.

With ``torch.backends.cudnn.benchmark`` on (``FaceRenderer.to_runtime`` on CUDA), cuDNN times
its convolution kernels the first time it sees an input shape. A request's chunks end in short
batches of any size, so unpadded every new tail length pays that timing again. Padded to
``shape_bucket`` sizes the shapes are few, and ``SadTalkerEngine.warmup`` times each of them
before serving. Measured on an H200 (eager, 512-px fp16, 10 s clip; README, *SadTalker on a
GPU*, runs 3 and 4): an avatar's first request streamed in 11.0 s before (5.9 s warm), 6.3 s
after (6.1 s warm); its first bytes came after 2.7 s before, 0.9 s after.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def shape_bucket(n: int, cap: int) -> int:
    """The batch a network call of ``n`` rows is padded to on CUDA: the smallest power of two
    >= ``n`` up to ``cap``, past it the next multiple of ``cap`` (so at most log2(cap) + 1
    shapes below ``cap``). Raises ValueError for ``n`` < 0 or ``cap`` < 1."""
    if n < 0 or cap < 1:
        raise ValueError(f"shape_bucket needs n >= 0 and cap >= 1, got {n}, {cap}")
    if n > cap:
        return -(-n // cap) * cap
    return min(cap, 1 << max(0, n - 1).bit_length())


def pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``rows`` (n, ...) with its last row repeated up to ``count`` rows (n >= 1, count >= n)."""
    n = rows.shape[0]
    if count <= n:
        return rows
    return torch.cat([rows, rows[-1:].expand(count - n, *rows.shape[1:])])


def call_padded(fn: Callable[..., torch.Tensor], cap: int, enabled: bool, *rows: torch.Tensor) -> torch.Tensor:
    """``fn(*rows)``; when ``enabled``, every ``rows`` tensor (n, ...) is first padded to
    ``shape_bucket(n, cap)`` rows and the result cut back to its first n rows (for networks whose
    rows are independent: eval mode, no batch statistics)."""
    if not enabled:
        return fn(*rows)
    n = rows[0].shape[0]
    size = shape_bucket(n, cap)
    return fn(*(pad_rows(r, size) for r in rows))[:n]
