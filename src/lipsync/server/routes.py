"""HTTP endpoints. Engine work goes through the bounded job queue; nothing blocks the event loop.

Routes that only read small state are plain ``def`` (Starlette's thread pool); routes that run
engine work are ``async def`` and await a future from ``JobQueue``, which answers ``Busy`` at once
when full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..errors import (
    AvatarNotFound,
    EmptyAudio,
    InvalidInput,
    JobTimeout,
    LipsyncError,
    PayloadTooLarge,
    size_text,
)
from ..options import MotionOptions
from ..types import AvatarId, GenerateResult, StageTimes
from .errors import AvatarInUse, ClientDisconnected, JobCancelled, error_responses
from .jobs import END_OF_STREAM, CancelToken, ChunkChannel, Job
from .middleware import StreamAborted
from .runtime import ServerRuntime, ServingPipeline, get_runtime
from .schemas import (
    AVATAR_ID_PATTERN,
    AvatarCreated,
    AvatarDeleted,
    AvatarList,
    AvatarOut,
    DefaultAvatarStatus,
    Health,
    PrecomputeOut,
    Stats,
    option_param,
)
from .stats import render_metrics

log = logging.getLogger("lipsync.server")
router = APIRouter()
T = TypeVar("T")

CANCEL_CLIENT_GONE = "client_disconnected"
CANCEL_TIMEOUT = "timeout"
MP4_RESPONSE = {
    "description": "The MP4 (H.264 + AAC). Fragmented MP4, sent as it renders, when stream=true.",
    "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
}


#: Per-request options a client may set in the /generate form (fps stays the server's).
FORM_OPTIONS = ("expression_scale", "lip_scale", "still", "blink", "size", "seed")
ExpressionScaleForm = option_param("expression_scale", Form)
LipScaleForm = option_param("lip_scale", Form)
StillForm = option_param("still", Form)
BlinkForm = option_param("blink", Form)
SizeForm = option_param("size", Form)
SeedForm = option_param("seed", Form)


class MP4Response(Response):
    media_type = "video/mp4"


class GeneratedFileResponse(FileResponse):
    """A file made for this one request: its length, no Last-Modified or ETag.

    Those two come from the temporary file's mtime. Nothing can revalidate against them
    (``Cache-Control: no-store``, the file is deleted once sent), and the mtime can read a
    second later than the ``Date`` header, which RFC 9110 section 8.8.2 forbids.
    """

    def set_stat_headers(self, stat_result: os.stat_result) -> None:
        self.headers.setdefault("content-length", str(stat_result.st_size))


class PrometheusResponse(Response):
    media_type = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------------------------- helpers
async def _read_upload(upload: UploadFile, what: str, limit: int) -> bytes:
    # The body-limit middleware already bounds the whole request; this names the field.
    data = await upload.read()
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the {what} upload is larger than the {size_text(limit)} limit", field=what, limit_bytes=limit
        )
    if not data:
        error = EmptyAudio if what == "audio" else InvalidInput
        raise error(f"the uploaded {what} file is empty", field=what)
    return data


async def _watch_disconnect(request: Request, token: CancelToken) -> None:
    """Cancel the job when the client hangs up while we are still working for it."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            token.cancel(CANCEL_CLIENT_GONE)
            return
        # The body is already read; a server may still hand over empty trailing messages.
        await asyncio.sleep(0.05)


def _cancelled_error(token: CancelToken, timeout_s: float) -> LipsyncError:
    if token.reason == CANCEL_CLIENT_GONE:
        return ClientDisconnected("the client disconnected; the job was stopped")
    return JobTimeout(f"the request took longer than the {timeout_s:g} s limit", limit_s=timeout_s)


async def _run_job(
    rt: ServerRuntime,
    request: Request,
    fn: Callable[[CancelToken], T],
    *,
    deadline: float,
    cleanup: Callable[[T], None] | None = None,
) -> tuple[T, Job]:
    """Run ``fn`` on a worker; answer 503 at once if the queue is full, 504 at the deadline."""
    job = rt.job_queue().submit(fn)
    waiter = job.wait_async()
    # If we stop waiting (timeout, client gone), the job's outcome is nobody's business any more;
    # retrieve it so asyncio does not log "exception was never retrieved".
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
    watcher = asyncio.create_task(_watch_disconnect(request, job.token))
    try:
        result = await asyncio.wait_for(asyncio.shield(waiter), timeout=max(0.0, deadline - time.monotonic()))
        return result, job
    except asyncio.TimeoutError:
        job.token.cancel(CANCEL_TIMEOUT)
        _abandon(job, cleanup)
        raise _cancelled_error(job.token, rt.settings.request_timeout_s) from None
    except JobCancelled:
        raise _cancelled_error(job.token, rt.settings.request_timeout_s) from None
    except asyncio.CancelledError:
        job.token.cancel(CANCEL_CLIENT_GONE)
        _abandon(job, cleanup)
        # Keep this request (and so its slot in the server's count of ongoing requests, e.g. Ray
        # Serve's max_ongoing_requests) until the worker has actually stopped the job.
        await _job_stopped(waiter, rt.settings.request_timeout_s)
        raise
    finally:
        watcher.cancel()


async def _job_stopped(waiter: asyncio.Future, limit_s: float) -> None:
    """Wait (at most ``limit_s``) until a cancelled job's worker is done with it."""
    with contextlib.suppress(BaseException):  # its outcome is nobody's business any more
        await asyncio.wait_for(asyncio.shield(waiter), timeout=limit_s)


def _abandon(job: Job, cleanup: Callable[[Any], None] | None) -> None:
    """Nobody will collect this job's result: release what it produces when it finishes."""

    def done(future) -> None:
        if cleanup is not None and not future.cancelled() and future.exception() is None:
            cleanup(future.result())

    job.future.add_done_callback(done)


def _server_timing(times: StageTimes, queue_s: float, total_s: float) -> str:
    parts = [f"{name};dur={seconds * 1000:.1f}" for name, seconds in times.as_dict().items()]
    parts += [f"queue;dur={queue_s * 1000:.1f}", f"total;dur={total_s * 1000:.1f}"]
    return ", ".join(parts)


def _record_result(rt: ServerRuntime, result: GenerateResult) -> None:
    rt.stats.record_stages(result.times)
    rt.stats.record_cache(result.avatar_cache_hit)
    rt.stats.record_video(result.frames, result.audio_seconds)


def _avatar_info(info: Any) -> dict[str, Any]:
    """Whatever the cache records about an avatar, as JSON-friendly values."""
    if is_dataclass(info):
        raw = {f.name: getattr(info, f.name) for f in fields(info)}
    elif isinstance(info, dict):
        raw = dict(info)
    else:
        raw = (
            {k: v for k, v in vars(info).items() if not k.startswith("_")}
            if hasattr(info, "__dict__")
            else {}
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("id", "directory", "path", "source_path", "image", "landmarks"):
            continue  # the id is top-level; server paths and arrays stay private
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            out[key] = list(value)
    return out


def _info_id(info: Any) -> str:
    return str(info["id"] if isinstance(info, dict) else info.id)


# ---------------------------------------------------------------------------------- health
@router.get(
    "/health",
    response_model=Health,
    tags=["service"],
    responses={503: {"model": Health, "description": "Starting, failed or shutting down"}},
)
def health(request: Request, response: Response) -> Health:
    """Liveness and readiness: 200 only once models are loaded, warmed up and the default avatar
    is precomputed; 503 while starting, after a failed start-up and while shutting down."""
    rt = get_runtime(request)
    status = {"ready": "ok", "draining": "shutting_down"}.get(rt.status, rt.status)
    if not rt.ready:
        response.status_code = 503
        response.headers["Retry-After"] = "2"
    queue = rt.queue
    return Health(
        status=status,
        ready=rt.ready,
        version=rt.version,
        engine=rt.engine_info.get("engine", rt.settings.engine),
        device=rt.engine_info.get("device"),
        engine_info=rt.engine_info,
        models_loaded=rt.models_loaded,
        warmed_up=rt.warmed_up,
        warmup_s=None if rt.warmup_s is None else round(rt.warmup_s, 3),
        default_avatar=DefaultAvatarStatus(id=rt.default_avatar_id, ready=rt.default_avatar_id is not None),
        workers=queue.workers if queue else rt.settings.workers,
        queue_size=queue.queue_size if queue else rt.settings.queue_size,
        uptime_s=round(rt.stats.uptime_s(), 3),
        error=rt.startup_error.to_dict() if rt.startup_error else None,
    )


# ---------------------------------------------------------------------------------- generate
@router.post(
    "/generate",
    response_class=MP4Response,
    tags=["generate"],
    responses={200: MP4_RESPONSE, **error_responses(400, 404, 413, 415, 422, 503, 504)},
)
async def generate(
    request: Request,
    audio: Annotated[UploadFile, File(description="Speech: WAV, MP3, OGG/Opus, FLAC, M4A...")],
    avatar_id: Annotated[
        str | None,
        Form(
            pattern=AVATAR_ID_PATTERN,
            description="A cached avatar (POST /avatars); default avatar if omitted.",
        ),
    ] = None,
    image: Annotated[
        UploadFile | None,
        File(description="A portrait to use instead of avatar_id (precomputed and cached)."),
    ] = None,
    expression_scale: ExpressionScaleForm = None,
    lip_scale: LipScaleForm = None,
    still: StillForm = None,
    blink: BlinkForm = None,
    size: SizeForm = None,
    seed: SeedForm = None,
    stream: Annotated[bool, Form(description="Send fragmented MP4 as chunks render.")] = False,
    stream_query: Annotated[bool | None, Query(alias="stream", description="Same as the form field.")] = None,
) -> Response:
    """Lip-synced MP4 of the avatar speaking ``audio``."""
    rt = get_runtime(request)
    received = time.monotonic()
    deadline = received + rt.settings.request_timeout_s
    pipeline = rt.require_ready()
    if avatar_id is not None and image is not None:
        raise InvalidInput("give either avatar_id or image, not both", field="avatar_id")
    options = pipeline.motion_options(
        expression_scale=expression_scale, lip_scale=lip_scale, still=still, blink=blink, size=size, seed=seed
    )
    limit = rt.settings.max_upload_bytes
    audio_bytes = await _read_upload(audio, "audio", limit)
    image_bytes = await _read_upload(image, "image", limit) if image is not None else None
    # An id is handed over as AvatarId (looked up in the cache, never read as a path), an upload
    # as bytes; the pipeline times the lookup as its "precompute" stage.
    avatar: AvatarId | bytes | None = AvatarId(avatar_id) if avatar_id is not None else image_bytes

    if stream or stream_query:
        return await _stream_response(rt, request, pipeline, audio_bytes, avatar, options, deadline)

    assert rt.workdir is not None
    output = rt.workdir / f"{uuid.uuid4().hex}.mp4"

    def work(token: CancelToken) -> GenerateResult:
        def progress(_done: int, _total: int) -> None:
            token.raise_if_cancelled()

        return pipeline.generate(
            audio_bytes, output, avatar=avatar, options=options, deadline=deadline, progress=progress
        )

    result, job = await _run_job(
        rt, request, work, deadline=deadline, cleanup=lambda r: Path(r.output).unlink(missing_ok=True)
    )
    _record_result(rt, result)
    queue_s = (job.started_at or received) - job.submitted_at
    headers = {
        "Server-Timing": _server_timing(result.times, queue_s, time.monotonic() - received),
        "X-Avatar-Id": result.avatar_id,
        "X-Avatar-Cache": "hit" if result.avatar_cache_hit else "miss",
        "X-Frames": str(result.frames),
        "X-Audio-Seconds": f"{result.audio_seconds:.3f}",
        "Cache-Control": "no-store",
    }
    return GeneratedFileResponse(
        output,
        media_type="video/mp4",
        filename="lipsync.mp4",
        headers=headers,
        background=BackgroundTask(output.unlink, missing_ok=True),
    )


async def _stream_response(
    rt: ServerRuntime,
    request: Request,
    pipeline: ServingPipeline,
    audio_bytes: bytes,
    avatar: AvatarId | bytes | None,
    options: MotionOptions,
    deadline: float,
) -> Response:
    """Fragmented MP4 from a worker thread, chunk by chunk, with back-pressure and cancellation.

    The response starts only once the first chunk (or an error) arrives, so input errors are
    still proper JSON answers; an error after that aborts the connection (see StreamAborted).
    """
    channel = ChunkChannel(asyncio.get_running_loop())

    def on_done(result: GenerateResult) -> None:
        _record_result(rt, result)

    def work(token: CancelToken) -> None:
        try:
            chunks = pipeline.stream(
                audio_bytes, avatar=avatar, options=options, deadline=deadline, on_done=on_done
            )
            try:
                for data in chunks:
                    if not channel.put(data, token):
                        return  # client gone or timed out; closing the iterator stops the render
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            channel.put(END_OF_STREAM, token)
        except BaseException as exc:  # noqa: BLE001 - handed to the request side
            channel.put(exc, token)

    job = rt.job_queue().submit(work)
    token = job.token
    state = request.scope.setdefault("state", {})

    async def next_item() -> object:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(channel.get(), timeout=left)

    try:
        first = await next_item()
    except asyncio.TimeoutError:
        token.cancel(CANCEL_TIMEOUT)
        raise _cancelled_error(token, rt.settings.request_timeout_s) from None
    except asyncio.CancelledError:
        token.cancel(CANCEL_CLIENT_GONE)
        raise
    if isinstance(first, JobCancelled):
        raise _cancelled_error(token, rt.settings.request_timeout_s)
    if isinstance(first, BaseException):
        raise first
    if first is END_OF_STREAM:  # nothing rendered (cannot happen for valid audio); say so plainly
        return MP4Response(b"")

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            yield first  # type: ignore[misc]
            while True:
                try:
                    item = await next_item()
                except asyncio.TimeoutError:
                    token.cancel(CANCEL_TIMEOUT)
                    state["error_code"] = "timeout"
                    raise StreamAborted(
                        "timeout", f"stream exceeded the {rt.settings.request_timeout_s:g} s limit"
                    ) from None
                if item is END_OF_STREAM:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    code = getattr(item, "code", "internal_error")
                    if isinstance(item, JobCancelled):
                        code = token.reason or "cancelled"
                    elif not isinstance(item, LipsyncError):
                        log.error("stream render failed", exc_info=item)
                    state["error_code"] = code
                    raise StreamAborted(code, str(getattr(item, "message", item)))
                yield item  # type: ignore[misc]
        finally:
            if not finished:
                token.cancel(CANCEL_CLIENT_GONE)
                state.setdefault("error_code", CANCEL_CLIENT_GONE)

    return StreamingResponse(
        body(),
        media_type="video/mp4",
        headers={
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            "Content-Disposition": 'attachment; filename="lipsync.mp4"',
            # Stage totals are unknown when the headers go out; what is known: the wait for a
            # worker and the time to the first fragment (decode + avatar + first chunk).
            "Server-Timing": _stream_server_timing(job),
        },
    )


def _stream_server_timing(job: Job) -> str:
    now = time.monotonic()
    queue_s = (job.started_at or now) - job.submitted_at
    return f"queue;dur={queue_s * 1000:.1f}, first_chunk;dur={(now - job.submitted_at) * 1000:.1f}"


# ---------------------------------------------------------------------------------- precompute
@router.post(
    "/precompute",
    response_model=PrecomputeOut,
    tags=["avatars"],
    responses=error_responses(400, 413, 415, 422, 503, 504),
)
async def precompute(
    request: Request,
    image: Annotated[UploadFile | None, File(description="A new default portrait (optional).")] = None,
) -> PrecomputeOut:
    """Rebuild the default avatar's face precompute (drops its cache entry first). With ``image``,
    that portrait becomes the default avatar. Works with no body at all."""
    rt = get_runtime(request)
    deadline = time.monotonic() + rt.settings.request_timeout_s
    pipeline = rt.require_ready()
    image_bytes = (
        await _read_upload(image, "image", rt.settings.max_upload_bytes) if image is not None else None
    )

    def work(token: CancelToken) -> tuple[Any, float]:
        t0 = time.perf_counter()
        avatar = pipeline.precompute(image_bytes, force=True)
        return avatar, time.perf_counter() - t0

    (avatar, seconds), _ = await _run_job(rt, request, work, deadline=deadline)
    rt.default_avatar_id = avatar.id
    rt.stats.record_stages(StageTimes(precompute=seconds))
    rt.stats.record_cache(False)
    if image_bytes is not None:
        source = "upload"
    else:
        source = "settings" if rt.settings.avatar else "bundled"
    return PrecomputeOut(avatar_id=avatar.id, source=source, precompute_s=round(seconds, 4))


# ---------------------------------------------------------------------------------- avatars
@router.post(
    "/avatars",
    response_model=AvatarCreated,
    status_code=201,
    tags=["avatars"],
    responses={
        200: {"model": AvatarCreated, "description": "Already cached"},
        **error_responses(400, 413, 415, 422, 503, 504),
    },
)
async def create_avatar(
    request: Request,
    response: Response,
    image: Annotated[UploadFile, File(description="A portrait (JPEG, PNG, WebP) with one clear face.")],
) -> AvatarCreated:
    """Precompute a portrait; its id is the SHA-256 of the uploaded bytes. 201 if new, 200 if cached."""
    rt = get_runtime(request)
    deadline = time.monotonic() + rt.settings.request_timeout_s
    pipeline = rt.require_ready()
    image_bytes = await _read_upload(image, "image", rt.settings.max_upload_bytes)

    def work(token: CancelToken) -> tuple[Any, bool, float, Any]:
        t0 = time.perf_counter()
        avatar, hit = pipeline.add_avatar(image_bytes)
        seconds = time.perf_counter() - t0
        # the same info GET /avatars gives (read here, in the worker: it touches the disk)
        info = next((i for i in pipeline.list_avatars() if _info_id(i) == avatar.id), None)
        return avatar, hit, seconds, info

    (avatar, hit, seconds, info), _ = await _run_job(rt, request, work, deadline=deadline)
    rt.stats.record_cache(hit)
    if not hit:
        rt.stats.record_stages(StageTimes(precompute=seconds))
    response.status_code = 200 if hit else 201
    return AvatarCreated(
        id=avatar.id, default=avatar.id == rt.default_avatar_id, cache_hit=hit, precompute_s=round(seconds, 4),
        info=_avatar_info(info) if info is not None else {},
    )


@router.get("/avatars", response_model=AvatarList, tags=["avatars"], responses=error_responses(503))
def list_avatars(request: Request) -> AvatarList:
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    items = [
        AvatarOut(id=_info_id(i), default=_info_id(i) == rt.default_avatar_id, info=_avatar_info(i))
        for i in pipeline.list_avatars()
    ]
    return AvatarList(avatars=items, count=len(items), default_id=rt.default_avatar_id)


AvatarIdParam = Annotated[str, PathParam(pattern=AVATAR_ID_PATTERN, description="An avatar id (SHA-256).")]


@router.get(
    "/avatars/{avatar_id}",
    response_model=AvatarOut,
    tags=["avatars"],
    responses=error_responses(404, 422, 503),
)
def get_avatar(request: Request, avatar_id: AvatarIdParam) -> AvatarOut:
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    for info in pipeline.list_avatars():
        if _info_id(info) == avatar_id:
            return AvatarOut(id=avatar_id, default=avatar_id == rt.default_avatar_id, info=_avatar_info(info))
    raise AvatarNotFound.unknown(avatar_id)


@router.delete(
    "/avatars/{avatar_id}",
    response_model=AvatarDeleted,
    tags=["avatars"],
    responses=error_responses(404, 409, 422, 503),
)
def delete_avatar(request: Request, avatar_id: AvatarIdParam) -> AvatarDeleted:
    """Remove a cached avatar. The default avatar cannot be deleted (replace it via /precompute)."""
    rt = get_runtime(request)
    pipeline = rt.require_ready()
    if avatar_id == rt.default_avatar_id:
        raise AvatarInUse(
            "this is the default avatar; replace it with POST /precompute first", avatar_id=avatar_id
        )
    if not pipeline.delete_avatar(AvatarId(avatar_id)):
        raise AvatarNotFound.unknown(avatar_id)
    return AvatarDeleted(id=avatar_id, deleted=True)


# ---------------------------------------------------------------------------------- monitoring
@router.get("/stats", response_model=Stats, tags=["service"])
def stats(request: Request) -> dict:
    """Requests served/failed by reason, per-stage timings, cache, queue, uptime."""
    return get_runtime(request).stats_snapshot()


@router.get(
    "/metrics",
    response_class=PrometheusResponse,
    tags=["service"],
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format",
        }
    },
)
def metrics(request: Request) -> PrometheusResponse:
    return PrometheusResponse(render_metrics(request.app.state.metrics_registry))
