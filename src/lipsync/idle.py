"""Loopable idle clips: the avatar at rest between utterances, cached per avatar and options.

An idle clip is what the pipeline renders from silence (the engine keeps the lips together,
blinks, and with ``still=False`` lets the head drift slightly), made into a seamless loop by a
cross-fade of its tail into its head:

    rendered   R[0] ... R[k-2]  R[k-1]  R[k] ... R[n+k-2]        (n + k - 1 frames)
    clip       out[j] = R[k-1+j]                          for j < n - k
               out[j] = (1-w) R[k-1+j] + w R[j-n+k]       for n - k <= j < n,  w: 0 -> 1

so the tail's partner frames R[0..k-1] are the very frames that lead into the clip's first
frame, and ``out[n-1] == out[0]`` exactly (before encoding): a player that loops the clip shows
no jump, only the motion the engine made. The cross-fade ("video texture" loop, as in Schödl et
al., *Video Textures*, SIGGRAPH 2000, which cross-fades where a loop cannot be cut cleanly)
spans ``CROSSFADE_SECONDS``. A plain cross-fade of two head positions shows a double image, so
the blend is a flow-guided morph: dense optical flow (Farnebäck, OpenCV) between the two
frames, each warped part of the way towards the other before they are mixed, the way
frame-interpolation and morphing cross-dissolves avoid ghosting.

Clips are written atomically into the avatar's engine directory of the ``AvatarCache`` (so they
go when the avatar is deleted or the engine's precompute version changes), keyed by the options
and the idle version; a second request for the same clip reads the file.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .avatar.cache import validate_avatar_id
from .errors import AvatarNotFound, InvalidInput
from .fsutil import atomic_write
from .options import EncoderOptions
from .types import AudioClip, Frames, MotionOptions

#: Bumped whenever the clip a given key produces changes.
IDLE_VERSION = "2"
#: Bounds on the clip length the HTTP endpoint accepts (seconds).
MIN_SECONDS = 1.0
MAX_SECONDS = 10.0
#: Length of the tail-into-head cross-fade (seconds); at most half the clip.
CROSSFADE_SECONDS = 0.6
#: Frames handed to the encoder at a time.
_BATCH = 25

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class IdleClip:
    """A cached idle clip: ``path`` (faststart H.264 MP4, no audio track), ``frames`` (n, the last
    equal to the first), ``fps`` and whether it came from the cache."""

    path: Path
    frames: int
    fps: int
    cache_hit: bool


def idle_frame_counts(seconds: float, fps: int) -> tuple[int, int]:
    """(n, k): frames in the clip and frames in the cross-fade, for ``seconds`` at ``fps``.

    Raises ``InvalidInput`` when ``seconds`` is outside [MIN_SECONDS, MAX_SECONDS].
    """
    if not MIN_SECONDS <= float(seconds) <= MAX_SECONDS:
        raise InvalidInput(
            f"seconds must be between {MIN_SECONDS:g} and {MAX_SECONDS:g}", field="seconds"
        )
    n = max(2, round(float(seconds) * fps))
    k = max(2, min(round(CROSSFADE_SECONDS * fps), n // 2))
    return n, k


def idle_key(engine_name: str, options: MotionOptions, seconds: float) -> str:
    """The cache key of a clip: everything that changes its frames (lip_scale does not: silent)."""
    opts = asdict(options)
    opts.pop("lip_scale", None)
    text = json.dumps(
        {"v": IDLE_VERSION, "engine": engine_name, "seconds": round(float(seconds), 3), **opts},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


Blend = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def linear_blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """``(1 - w) a + w b``, rounded, for uint8 frames of any layout."""
    mixed = (1.0 - w) * a.astype(np.float32) + w * b.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def morph_blend(a: np.ndarray, b: np.ndarray, w: float, *, pixel_format: str = "rgb24") -> np.ndarray:
    """A flow-guided cross-dissolve of two frames (``w`` = 0 gives ``a``, 1 gives ``b``).

    Dense flow F from ``a`` to ``b`` (Farnebäck on grey, half resolution), then ``a`` is warped
    by ``w F`` and ``b`` by ``-(1 - w) F`` so both show the in-between position, and mixed.
    ``pixel_format`` is ``rgb24`` ((H, W, 3)) or ``yuv420p`` ((H * 3 / 2, W) planar I420).
    """
    import cv2

    if w <= 0.0:
        return a
    if w >= 1.0:
        return b
    yuv = pixel_format == "yuv420p"
    ra = cv2.cvtColor(a, cv2.COLOR_YUV2RGB_I420) if yuv else a
    rb = cv2.cvtColor(b, cv2.COLOR_YUV2RGB_I420) if yuv else b
    h, wd = ra.shape[:2]
    ga = cv2.cvtColor(np.ascontiguousarray(ra), cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(np.ascontiguousarray(rb), cv2.COLOR_RGB2GRAY)
    small = (max(16, wd // 2), max(16, h // 2))
    flow = cv2.calcOpticalFlowFarneback(cv2.resize(ga, small, interpolation=cv2.INTER_AREA),
                                        cv2.resize(gb, small, interpolation=cv2.INTER_AREA),
                                        None, 0.5, 3, 15, 3, 5, 1.2, 0)
    flow = cv2.resize(flow, (wd, h), interpolation=cv2.INTER_LINEAR) * np.float32(wd / small[0])
    ys, xs = np.mgrid[0:h, 0:wd].astype(np.float32)
    fx, fy = flow[..., 0], flow[..., 1]
    wa = cv2.remap(ra, xs - w * fx, ys - w * fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    wb = cv2.remap(rb, xs + (1.0 - w) * fx, ys + (1.0 - w) * fy, cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    mixed = linear_blend(wa, wb, w)
    return cv2.cvtColor(mixed, cv2.COLOR_RGB2YUV_I420) if yuv else mixed


def loop_frames(rendered: Iterator[np.ndarray], n: int, k: int, blend: Blend = linear_blend) -> Iterator[np.ndarray]:
    """The loop ``out[0..n-1]`` from ``n + k - 1`` rendered frames (see the module docstring).

    Frames are arrays of one layout; ``blend(frame, partner, w)`` mixes them (default: per
    sample). Holds only the first ``k`` frames in memory. The weight follows a smoothstep so the
    fade starts and ends without a kink; the last frame is the first one, exactly.
    """
    head: list[np.ndarray] = []
    for r, frame in enumerate(rendered):
        if r < k:
            head.append(frame)
        if r < k - 1:
            continue
        j = r - (k - 1)
        if j >= n:
            break
        if j < n - k:
            yield frame
            continue
        if j == n - 1:
            yield head[k - 1]  # exactly the first frame
            continue
        t = (j - (n - k)) / (k - 1)
        yield blend(frame, head[j - n + k], t * t * (3.0 - 2.0 * t))


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def idle_clip(pipeline, avatar_id: str, *, seconds: float = 4.0, options: MotionOptions | None = None,
              encoder: EncoderOptions | None = None,
              progress: Callable[[int, int], None] | None = None) -> IdleClip:
    """The idle clip of a cached avatar (rendered and cached on the first request).

    ``pipeline`` is a ``LipSyncPipeline``; ``options`` its ``motion_options(...)`` (defaults from
    settings); ``encoder`` defaults to ``settings.encoder``; ``progress(done, total)`` is called after each rendered batch and may raise to stop
    (nothing is cached then). Raises ``AvatarNotFound`` for an unknown id, ``InvalidInput`` for
    ``seconds`` out of range, engine errors as ``generate`` does.
    """
    from .video import Mp4Writer

    options = options if options is not None else pipeline.motion_options()
    n, k = idle_frame_counts(seconds, options.fps)
    avatar = pipeline.get_avatar(validate_avatar_id(avatar_id))  # AvatarNotFound if malformed
    engine = pipeline.engine
    directory = pipeline.cache.engine_dir(avatar.id, engine.name, engine.precompute_version)
    path = directory / f"idle-{idle_key(engine.name, options, seconds)}.mp4"
    with _lock_for(path):
        if path.is_file():
            return IdleClip(path=path, frames=n, fps=options.fps, cache_hit=True)
        rate = int(engine.sample_rate)
        total = n + k - 1
        silence = AudioClip(np.zeros(round(total * rate / options.fps), dtype=np.float32), rate)
        settings = pipeline.settings

        def rendered() -> Iterator[np.ndarray]:
            for batch in pipeline.render_frames(silence, avatar, options, progress=progress):
                fmt[0] = batch.pixel_format
                yield from batch.data

        fmt = ["rgb24"]

        def write(tmp: Path) -> None:
            with Mp4Writer(tmp, width=options.size, height=options.size, fps=options.fps, audio=None,
                           encoder=encoder or settings.encoder) as writer:
                pending: list[np.ndarray] = []
                written = 0
                def blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
                    return morph_blend(a, b, w, pixel_format=fmt[0])

                for frame in loop_frames(rendered(), n, k, blend):
                    pending.append(frame)
                    if len(pending) == _BATCH:
                        writer.write(Frames(written, np.stack(pending), fmt[0]))
                        written += len(pending)
                        pending = []
                if pending:
                    writer.write(Frames(written, np.stack(pending), fmt[0]))
                writer.close()

        try:
            atomic_write(path, write)
        except FileNotFoundError:  # the avatar was deleted while its clip rendered
            raise AvatarNotFound("avatar not found; upload the portrait again", avatar_id=avatar_id) from None
        return IdleClip(path=path, frames=n, fps=options.fps, cache_hit=False)
