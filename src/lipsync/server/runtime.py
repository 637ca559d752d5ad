"""State the HTTP routes share (``ServerRuntime``) and the typed server-pipeline boundary
(``ServingPipeline``). ``app.py`` builds the app around a runtime, ``routes.py`` reads it through
``get_runtime``; neither imports the other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from fastapi import Request

from ..errors import LipsyncError, ShuttingDown
from ..options import MotionOptions
from ..settings import Settings
from ..types import AudioClip, Avatar, AvatarId, GenerateResult
from .errors import NotReady
from .jobs import JobQueue
from .stats import ServerStats

if TYPE_CHECKING:
    from ..avatar.cache import AvatarInfo

log = logging.getLogger("lipsync.server")

#: Seconds of silence generated once at start-up, so the first request pays no lazy init
#: (codec setup, engine kernels, caches) anywhere in the path.
WARMUP_AUDIO_S = 0.4



class EngineDescription(Protocol):
    """What the server reads of the pipeline's engine."""

    name: str
    sample_rate: int

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class ServingPipeline(Protocol):
    """The pipeline as the server uses it: ``LipSyncPipeline`` is one; test doubles and other
    hosts (Ray Serve) provide the same methods. Uploads are handed over as bytes and avatar ids
    as ``AvatarId``, never as strings a pipeline could take for a server-side path."""

    settings: Settings

    @property
    def engine(self) -> EngineDescription: ...

    def warmup(self) -> None: ...

    def default_avatar(self) -> Avatar: ...

    def motion_options(self, **overrides: Any) -> MotionOptions: ...

    def generate(
        self,
        audio: bytes | AudioClip,
        output: Path,
        *,
        avatar: Avatar | AvatarId | bytes | None = None,
        options: MotionOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
    ) -> GenerateResult: ...

    def stream(
        self,
        audio: bytes | AudioClip,
        *,
        avatar: Avatar | AvatarId | bytes | None = None,
        options: MotionOptions | None = None,
        deadline: float | None = None,
        on_done: Callable[[GenerateResult], None] | None = None,
    ) -> Iterator[bytes]: ...

    def add_avatar(self, image: bytes, *, force: bool = False) -> tuple[Avatar, bool]: ...

    def get_avatar(self, avatar_id: AvatarId) -> Avatar: ...

    def list_avatars(self) -> Sequence[AvatarInfo]: ...

    def delete_avatar(self, avatar_id: AvatarId) -> bool: ...

    def precompute(self, image: bytes | None = None, *, force: bool = True) -> Avatar: ...


PipelineFactory = Callable[[Settings], ServingPipeline]


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


def default_pipeline_factory(settings: Settings) -> ServingPipeline:
    """``LipSyncPipeline.from_settings`` (imported when first needed)."""
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
        self.pipeline: ServingPipeline | None = None
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

    def _warm_generate(self, pipeline: ServingPipeline) -> None:
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

    def require_ready(self) -> ServingPipeline:
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




def get_runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime
