"""The FastAPI application: lifespan (load + warm up once), shared runtime state, middleware.

``create_app`` builds an app around a pipeline that is created in the background when the app
starts, so the port opens at once and ``/health`` answers 503 ("starting") until models are loaded,
warmed up and the default avatar is precomputed. Tests pass their own ``pipeline_factory``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request

from ..errors import LipsyncError, ShuttingDown
from ..settings import Settings
from ..types import AudioClip
from .errors import NotReady, install_error_handlers
from .jobs import JobQueue
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .stats import ServerStats, metrics_registry

log = logging.getLogger("lipsync.server")

#: Multipart framing around the uploaded files, on top of ``max_upload_bytes`` of file content.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Seconds of silence generated once at start-up, so the first request pays no lazy init
#: (codec setup, engine kernels, caches) anywhere in the path.
WARMUP_AUDIO_S = 0.4

PipelineFactory = Callable[[Settings], Any]


def package_version() -> str:
    import lipsync

    version = getattr(lipsync, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("lipsync-server")
    except PackageNotFoundError:
        return "0+unknown"


def _default_pipeline_factory(settings: Settings):
    from ..pipeline import LipSyncPipeline

    return LipSyncPipeline.from_settings(settings)


class ServerRuntime:
    """Everything the routes share: settings, the pipeline, the job queue, stats, start-up state."""

    def __init__(
        self, settings: Settings, pipeline_factory: PipelineFactory, *, warm_generate: bool = True
    ) -> None:
        self.settings = settings
        self.pipeline_factory = pipeline_factory
        self.warm_generate = warm_generate
        self.version = package_version()
        self.stats = ServerStats()
        self.queue: JobQueue | None = None
        self.pipeline: Any = None
        self.status = "starting"  # -> ready | failed; draining on shutdown
        self.models_loaded = False
        self.warmed_up = False
        self.warmup_s: float | None = None
        self.startup_error: LipsyncError | None = None
        self.default_avatar_id: str | None = None
        self.engine_info: dict[str, Any] = {}
        self.workdir: Path | None = None
        self.ready_event = threading.Event()
        #: Called (from the loader thread) when start-up fails, e.g. to stop the server process.
        self.on_startup_failure: Callable[[LipsyncError], None] | None = None
        self._loader: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, background: bool = True) -> None:
        self.queue = JobQueue(self.settings.workers, self.settings.queue_size)
        self.workdir = Path(tempfile.mkdtemp(prefix="lipsync-server-"))
        if background:
            self._loader = threading.Thread(target=self._load, name="lipsync-startup", daemon=True)
            self._loader.start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            pipeline = self.pipeline_factory(self.settings)
            self.models_loaded = True
            self.engine_info = dict(pipeline.engine.describe())
            t0 = time.perf_counter()
            pipeline.warmup()
            if self.warm_generate:
                self._warm_generate(pipeline)
            self.warmup_s = time.perf_counter() - t0
            self.default_avatar_id = pipeline.default_avatar().id
            self.pipeline = pipeline
            self.warmed_up = True
            if self.status == "starting":
                self.status = "ready"
            log.info(
                "ready: engine=%s device=%s warm-up %.2f s, default avatar %s",
                self.engine_info.get("engine"),
                self.engine_info.get("device"),
                self.warmup_s,
                self.default_avatar_id,
            )
        except BaseException as exc:
            error = (
                exc
                if isinstance(exc, LipsyncError)
                else LipsyncError(f"start-up failed: {type(exc).__name__}: {exc}")
            )
            self.startup_error = error
            self.status = "failed"
            log.error("start-up failed: %s", error.message, exc_info=not isinstance(exc, LipsyncError))
            if self.on_startup_failure is not None:
                self.on_startup_failure(error)
        finally:
            self.ready_event.set()

    def _warm_generate(self, pipeline) -> None:
        rate = int(getattr(pipeline.engine, "sample_rate", 16_000))
        silence = AudioClip(np.zeros(int(WARMUP_AUDIO_S * rate), dtype=np.float32), rate)
        assert self.workdir is not None
        target = self.workdir / "warmup.mp4"
        try:
            pipeline.generate(silence, target)
        finally:
            target.unlink(missing_ok=True)

    def begin_shutdown(self) -> None:
        """Stop taking new jobs (503 shutting_down); running and queued ones still finish."""
        if self.status != "draining" and self.queue is not None:
            state = self.queue.state()
            log.info(
                "shutting down: refusing new jobs; %d running and %d queued will finish",
                state.in_flight,
                state.waiting,
            )
        self.status = "draining"
        if self.queue is not None:
            self.queue.close()

    def stop(self) -> None:
        self.begin_shutdown()
        if self.queue is not None:
            self.queue.shutdown(timeout=self.settings.graceful_shutdown_s)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ for routes
    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def require_ready(self):
        """The pipeline, or the 503 that explains why there is none to use yet."""
        if self.status == "draining":
            raise ShuttingDown("server is shutting down; retry on another instance", retry_after_s=5)
        if self.status == "failed":
            reason = self.startup_error.message if self.startup_error else "unknown error"
            raise NotReady(f"server failed to start: {reason}", retry_after_s=30)
        if self.status != "ready" or self.pipeline is None:
            raise NotReady("server is starting (loading models, warming up); retry shortly", retry_after_s=2)
        return self.pipeline

    def job_queue(self) -> JobQueue:
        if self.queue is None:
            raise NotReady("server is starting; retry shortly")
        return self.queue

    def avatars_cached(self) -> int | None:
        if self.pipeline is None:
            return None
        try:
            return len(self.pipeline.list_avatars())
        except Exception:
            log.warning("could not list the avatar cache", exc_info=True)
            return None

    def stats_snapshot(self) -> dict:
        return self.stats.snapshot(self.job_queue().state(), self.avatars_cached())


def create_app(
    settings: Settings | None = None,
    *,
    pipeline_factory: PipelineFactory | None = None,
    pipeline: Any = None,
    background_startup: bool = True,
    warm_generate: bool = True,
) -> FastAPI:
    """The lip-sync HTTP service.

    ``settings`` default to the environment (``LIPSYNC_*``). The pipeline is built by
    ``pipeline_factory(settings)`` (default ``LipSyncPipeline.from_settings``) or given ready-made
    as ``pipeline``; either way it is warmed up in the app's lifespan, in the background unless
    ``background_startup`` is False.
    """
    from .routes import router

    settings = settings or Settings()
    if pipeline is not None:

        def pipeline_factory(_settings: Settings, _given=pipeline):
            return _given

    runtime = ServerRuntime(
        settings, pipeline_factory or _default_pipeline_factory, warm_generate=warm_generate
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start(background=background_startup)
        try:
            yield
        finally:
            # uvicorn has already waited (up to its graceful timeout) for open requests.
            await anyio.to_thread.run_sync(runtime.stop)

    app = FastAPI(
        title="lipsync-server",
        version=runtime.version,
        description=(
            "Portrait + speech in, lip-synced H.264/AAC MP4 out. POST /generate with a multipart "
            "`audio` file; every error is JSON `{code, message}`; 503 answers carry Retry-After."
        ),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics_registry = metrics_registry(runtime.stats_snapshot, lambda: runtime.ready)
    install_error_handlers(app)
    app.include_router(router)
    from .web import include_web  # the page at / and the avatar media it uses (issue 9)

    include_web(app)
    _accurate_multipart_schemas(app)
    # Added last = outermost: request ids and stats see everything, including 413s.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    app.add_middleware(RequestContextMiddleware, record=runtime.stats.record_request, routes=router.routes)
    return app


def _accurate_multipart_schemas(app: FastAPI) -> None:
    """Make the multipart body schemas say what the routes accept.

    FastAPI gives optional form fields a ``null`` alternative, but a multipart field cannot be
    null, only absent; advertising ``null`` makes clients (and schemathesis) send the text "null"
    where a file or number belongs. And /generate's "avatar_id or image" rule is added.
    """
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        for name, component in schema.get("components", {}).get("schemas", {}).items():
            if not name.startswith("Body_"):
                continue
            for prop in component.get("properties", {}).values():
                variants = prop.get("anyOf")
                if variants and any(v.get("type") == "null" for v in variants):
                    kept = [v for v in variants if v.get("type") != "null"]
                    del prop["anyOf"]
                    if len(kept) == 1:
                        prop.update(kept[0])
                    else:
                        prop["anyOf"] = kept
                if "contentMediaType" in prop or prop.get("format") == "binary":
                    prop["minLength"] = 1  # an empty upload is refused (empty_audio / invalid_input)
        # /generate takes an avatar_id or an image upload, never both.
        body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        component = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
        component["not"] = {"required": ["avatar_id", "image"]}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def get_runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime
