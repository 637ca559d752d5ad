"""Avatar media for the web page: a thumbnail, a loopable idle clip, and "make default".

- ``GET /avatars/{id}/image``: a small JPEG of the cached aligned crop (the face as it is
  animated), from the pipeline's verified avatar cache entry.
- ``GET /avatars/{id}/idle.mp4?seconds=N``: the avatar at rest, looping without a jump (see
  ``lipsync.idle``); rendered on the job queue on first request, then served from the cache.
- ``POST /avatars/{id}/default``: makes a cached avatar the default one, from its stored source
  bytes (the same as ``POST /precompute`` with that image, without sending it again).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import cv2
import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from .. import idle
from ..errors import JobTimeout
from ..types import AvatarId
from .errors import ClientDisconnected, JobCancelled, error_responses
from .runtime import get_runtime
from .schemas import AVATAR_ID_PATTERN, PrecomputeOut

router = APIRouter(tags=["avatars"])

#: Thumbnail edge bounds and default (pixels).
THUMB_MIN, THUMB_MAX, THUMB_DEFAULT = 32, 512, 192
JPEG_QUALITY = 85

AvatarIdParam = Annotated[str, PathParam(pattern=AVATAR_ID_PATTERN, description="An avatar id (SHA-256).")]


@router.get(
    "/avatars/{avatar_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
              "description": "JPEG thumbnail of the aligned face crop"},
        **error_responses(404, 422, 503),
    },
)
def avatar_image(
    request: Request,
    avatar_id: AvatarIdParam,
    size: Annotated[int, Query(ge=THUMB_MIN, le=THUMB_MAX, description="Edge of the square thumbnail.")] = (
        THUMB_DEFAULT
    ),
) -> Response:
    """A ``size`` x ``size`` JPEG thumbnail of the avatar's aligned face crop."""
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    avatar = pipeline.get_avatar(AvatarId(avatar_id))  # AvatarNotFound (404) if unknown
    rgb = np.ascontiguousarray(avatar.image)
    interp = cv2.INTER_AREA if size < rgb.shape[0] else cv2.INTER_CUBIC
    small = cv2.resize(rgb, (size, size), interpolation=interp)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise RuntimeError("JPEG encoding of the thumbnail failed")
    # The id is the SHA-256 of the portrait: its crop never changes while the entry exists.
    return Response(jpeg.tobytes(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/avatars/{avatar_id}/idle.mp4",
    response_class=FileResponse,
    responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
              "description": "H.264 MP4 without audio whose last frame equals its first"},
        **error_responses(404, 422, 503, 504),
    },
)
async def avatar_idle(
    request: Request,
    avatar_id: AvatarIdParam,
    seconds: Annotated[
        float, Query(ge=idle.MIN_SECONDS, le=idle.MAX_SECONDS, description="Loop length in seconds.")
    ] = 4.0,
    expression_scale: Annotated[
        float | None, Query(ge=0.0, le=3.0, description="Brows/head motion strength.")
    ] = None,
    still: Annotated[bool | None, Query(description="No head motion.")] = None,
    blink: Annotated[bool | None, Query(description="Natural random blinks.")] = None,
    size: Annotated[int | None, Query(ge=64, le=1024, multiple_of=2, description="Width = height.")] = None,
) -> FileResponse:
    """A loopable idle clip of the avatar: lips together, blinks, slight head motion unless
    ``still``; its last frame equals its first. Cached per avatar and options."""
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    options = pipeline.motion_options(expression_scale=expression_scale, still=still, blink=blink, size=size)
    timeout_s = rt.settings.request_timeout_s
    started = time.monotonic()

    def work(token) -> idle.IdleClip:
        # A page that changes its options drops the clip it no longer wants: stop rendering it.
        return pipeline.idle_clip(AvatarId(avatar_id), seconds=seconds, options=options,
                                  progress=lambda _done, _total: token.raise_if_cancelled())

    job = rt.job_queue().submit(work)  # Busy (503 + Retry-After) when full
    watcher = asyncio.create_task(_cancel_when_gone(request, job.token))
    try:
        clip = await asyncio.wait_for(asyncio.shield(job.wait_async()), timeout=timeout_s)
    except asyncio.TimeoutError:
        job.token.cancel("timeout")
        raise JobTimeout(f"the request took longer than the {timeout_s:g} s limit", limit_s=timeout_s) from None
    except JobCancelled:
        raise ClientDisconnected("the client disconnected; the idle clip was not rendered") from None
    except asyncio.CancelledError:
        job.token.cancel("client_disconnected")
        raise
    finally:
        watcher.cancel()
    return FileResponse(
        clip.path,
        media_type="video/mp4",
        headers={
            "Cache-Control": "no-cache",
            "X-Idle-Cache": "hit" if clip.cache_hit else "miss",
            "X-Frames": str(clip.frames),
            "Server-Timing": f"total;dur={(time.monotonic() - started) * 1000:.1f}",
        },
    )


async def _cancel_when_gone(request: Request, token) -> None:
    """Cancel the job when the client hangs up before its answer is ready."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            token.cancel("client_disconnected")
            return
        await asyncio.sleep(0.05)  # a GET has no body: only empty messages until a disconnect


@router.post(
    "/avatars/{avatar_id}/default",
    response_model=PrecomputeOut,
    responses=error_responses(404, 422, 503, 504),
)
async def make_default(request: Request, avatar_id: AvatarIdParam) -> PrecomputeOut:
    """Make a cached avatar the default one (used when a request names none)."""
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    timeout_s = rt.settings.request_timeout_s

    def work(_token):
        t0 = time.perf_counter()
        avatar = pipeline.make_default(AvatarId(avatar_id))  # AvatarNotFound if unknown
        return avatar, time.perf_counter() - t0

    job = rt.job_queue().submit(work)
    try:
        avatar, seconds = await asyncio.wait_for(asyncio.shield(job.wait_async()), timeout=timeout_s)
    except asyncio.TimeoutError:
        job.token.cancel("timeout")
        raise JobTimeout(f"the request took longer than the {timeout_s:g} s limit", limit_s=timeout_s) from None
    rt.default_avatar_id = avatar.id
    return PrecomputeOut(avatar_id=avatar.id, default=True, source="upload", precompute_s=round(seconds, 4))
