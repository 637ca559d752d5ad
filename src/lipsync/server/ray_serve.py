"""Scale-out on Ray Serve: the same FastAPI app, one engine per replica.

Run it (one command; it starts a local Ray cluster, or joins ``--address``/``RAY_ADDRESS``)::

    lipsync serve --ray --ray-config deploy/serve.yaml

or with Serve's own CLI (then set the proxy middleware yourself, on every ``ray start`` too)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=lipsync.server.ray_proxy:proxy_middlewares \\
        serve run deploy/serve.yaml

What a replica guarantees:

* **Routable only when ready.** Its constructor reads settings from ``LIPSYNC_*`` *on its own
  node* and loads the engine (raising on failure, e.g. ``LIPSYNC_ENGINE=sadtalker`` without
  checkpoints); the app's lifespan then warms it up synchronously (a real generate of silence),
  and Serve's first ``check_health`` must pass before the replica gets traffic. ``check_health``
  keeps reporting a failed engine, so Serve shows the replica UNHEALTHY and replaces it; it also
  fails when, since the last check, requests only ended in internal errors (``FAILING_STREAK``).
* **Bounded queues.** A replica takes ``max_ongoing_requests`` (one rendering + one decoding its
  upload) and queues nothing itself; the proxy queues at most ``max_queued_requests``, beyond
  which the client gets 503 ``busy`` JSON with Retry-After (see ``ray_proxy``).
* **Cancellation.** A client that hangs up is counted ``client_closed``; the request keeps its
  replica slot until its job has actually stopped, so Serve never routes to a replica whose
  worker is still busy.
* **One avatar store** for every node (``ray_cluster.SharedAvatarPipeline``) and cluster-wide
  ``/stats`` and ``/metrics`` (every replica's series, labelled ``replica``).
* **Clean start, graceful drain.** Work directories left by dead replicas are removed at start;
  on shutdown Serve stops routing to the replica and waits ``graceful_shutdown_timeout_s`` for
  its requests before the app's lifespan stops the job queue.

``ray`` is imported only when these functions are called; the rest of the package never needs it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import EngineUnavailable
from ..settings import Settings

log = logging.getLogger("lipsync.server")

#: In-flight requests per replica: one rendering plus one being decoded/precomputed.
DEFAULT_MAX_ONGOING_REQUESTS = 2
WORKDIR_PREFIX = "lipsync-server-"
OWNER_FILE = "owner.pid"
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "serve.yaml"


class RayServeOptions(BaseSettings):
    """Operator knobs for the Serve deployment (environment ``LIPSYNC_RAY_*``).

    In a Serve config file the same knobs are the deployment's own fields (``num_replicas``,
    ``autoscaling_config``, ``max_queued_requests``...) and ``http_options.request_timeout_s``.
    """

    model_config = SettingsConfigDict(env_prefix="LIPSYNC_RAY_", extra="forbid")

    app_name: str = Field("lipsync", description="Serve application (and deployment) name.")
    num_replicas: int = Field(1, ge=1, le=1024, description="Fixed replica count (no autoscaling).")
    min_replicas: int | None = Field(None, ge=0, description="Autoscaling lower bound.")
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling upper bound; enables autoscaling.")
    target_ongoing_requests: float = Field(
        1.0, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    max_ongoing_requests: int = Field(
        DEFAULT_MAX_ONGOING_REQUESTS, ge=1, le=64, description="Requests a replica takes at once."
    )
    max_queued_requests: int = Field(
        8, ge=1, description="Requests the proxy queues beyond that; more get 503 busy."
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="Proxy end-to-end timeout (504); default: LIPSYNC_REQUEST_TIMEOUT_S + 30."
    )
    health_check_period_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="Drain time per replica; default: LIPSYNC_GRACEFUL_SHUTDOWN_S."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 with LIPSYNC_ENGINE=sadtalker).")
    shared_avatars: bool = Field(True, description="One avatar store across nodes (a Ray actor).")

    @model_validator(mode="after")
    def _bounds(self) -> RayServeOptions:
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def autoscaling_config(self) -> dict | None:
        if self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        return {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }

    def proxy_timeout_s(self, settings: Settings) -> float:
        return self.request_timeout_s or settings.request_timeout_s + 30.0


def _serve_module():
    try:
        from ray import serve
    except ModuleNotFoundError:
        raise EngineUnavailable(
            "Ray Serve is not installed; install it with: pip install 'lipsync-server[ray]'"
        ) from None
    return serve


def replica_settings(settings: Settings, max_ongoing_requests: int) -> Settings:
    """Per-replica settings: one worker, and room for what Ray may send.

    Ray sends at most ``max_ongoing_requests`` at once, but it counts a request whose client
    hung up as finished as soon as it is cancelled, while its job may still be winding down
    (until its next chunk). So the queue has room for as many such jobs again: a request routed
    meanwhile waits for the worker instead of getting a spurious 503 ``busy``.
    """
    if not 1 <= max_ongoing_requests <= 64:
        raise ValueError("max_ongoing_requests must be between 1 and 64")
    return settings.model_copy(update={"workers": 1, "queue_size": 2 * max_ongoing_requests - 1})


def deployment_options(options: RayServeOptions, settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment`` / ``.options`` from the knobs."""
    autoscaling = options.autoscaling_config()
    out: dict[str, Any] = {
        "name": options.app_name,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "graceful_shutdown_timeout_s": (
            options.graceful_shutdown_timeout_s
            if options.graceful_shutdown_timeout_s is not None
            else settings.graceful_shutdown_s
        ),
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if autoscaling is not None:
        out["autoscaling_config"] = autoscaling
    else:
        out["num_replicas"] = options.num_replicas
    return out


# ---------------------------------------------------------------------------------- clean start
def remove_stale_workdirs(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Delete work directories (half-written ``.part.mp4`` outputs...) of replicas that died.

    A replica writes its pid into its work directory; a directory whose owner process no longer
    exists on this host is removed. Directories without an owner file are left alone.
    """
    import psutil

    removed: list[Path] = []
    root = Path(tmp or tempfile.gettempdir())
    for entry in root.glob(f"{WORKDIR_PREFIX}*"):
        owner = entry / OWNER_FILE
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or psutil.pid_exists(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log.info("removed %d stale work directories of stopped replicas", len(removed))
    return removed


# ---------------------------------------------------------------------------------- health
#: Internal errors with nothing served in between (across health checks) that mark an engine
#: that broke after start-up (lost GPU, corrupted state) as unhealthy, so Serve replaces it.
FAILING_STREAK = 3


def engine_failure(before: tuple[int, int], now: tuple[int, int]) -> str | None:
    """Why the replica is unhealthy, from ``(served, internal_errors)`` at two health checks."""
    served = now[0] - before[0]
    failed = now[1] - before[1]
    if served == 0 and failed >= FAILING_STREAK:
        return f"engine failing: {failed} internal errors and nothing served since the last health check"
    return None


# ---------------------------------------------------------------------------------- the replica
def _replica_identity() -> tuple[str, dict]:
    import ray
    from ray import serve

    try:
        ctx = serve.get_replica_context()
        replica, app = ctx.replica_id.unique_id, ctx.app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests)
        replica, app = f"pid{os.getpid()}", None
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return replica, {"app": app, "node_id": node, "pid": os.getpid(), "host": os.uname().nodename}


class LipSyncReplicaBase:
    """One engine behind the lip-sync HTTP API (decorated into a Serve deployment lazily)."""

    def __init__(
        self,
        overrides: dict[str, Any] | None = None,
        max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
        shared_avatars: bool = True,
        engines: dict[str, str] | None = None,
    ) -> None:
        from ..engines.base import register_engine
        from ..pipeline import LipSyncPipeline
        from .app import create_app
        from .ray_cluster import SharedAvatarPipeline, StatsPusher, get_cluster_actor

        logging.getLogger("lipsync").setLevel(logging.INFO)
        for name, target in (engines or {}).items():
            register_engine(name, target)
        # Settings come from LIPSYNC_* on *this* node, plus what the deployer set explicitly.
        settings = replica_settings(Settings(**(overrides or {})), max_ongoing_requests)
        remove_stale_workdirs()
        self.replica_id, info = _replica_identity()
        self.cluster = get_cluster_actor()
        # Load the engine here, so a broken one fails the replica's start-up (Serve retries it and
        # reports the error) instead of answering 503 to everything.
        pipeline = LipSyncPipeline.from_settings(settings)
        if shared_avatars:
            pipeline = SharedAvatarPipeline(pipeline, self.cluster)
        # The lifespan (run by Serve before the first health check) warms up synchronously.
        self.api = create_app(settings, pipeline=pipeline, background_startup=False)
        self.runtime = self.api.state.runtime
        self.info = {**info, "engine": settings.engine}
        self.pusher = StatsPusher(
            self.cluster, self.replica_id, self.info, self.runtime.stats_snapshot, _rss_bytes
        )
        self._started = False
        self._health_counts = (0, 0)

    def __serve_build_asgi_app__(self):
        from .ray_ingress import ClusterMonitoringApp

        return ClusterMonitoringApp(self.api, self)

    def check_health(self) -> None:
        """Raise (so Serve marks the replica unhealthy) unless its engine is loaded and warm."""
        rt = self.runtime
        if rt.status == "failed":
            reason = rt.startup_error.message if rt.startup_error else "unknown error"
            raise RuntimeError(f"lipsync replica start-up failed: {reason}")
        if rt.status == "starting":
            raise RuntimeError("lipsync replica is still loading")
        requests = rt.stats_snapshot()["requests"]
        now = (requests["served"], requests["failed_by_reason"].get("internal_error", 0))
        broken = engine_failure(self._health_counts, now)
        if broken:
            raise RuntimeError(broken)
        self._health_counts = now
        if not self._started:
            self._started = True
            if rt.workdir is not None:
                (rt.workdir / OWNER_FILE).write_text(str(os.getpid()))
            # Known to the cluster view before Serve routes anything here.
            self.pusher.push(force=True, wait=True)
            self.pusher.start()

    def cluster_state(self) -> dict:
        import ray

        self.pusher.push(force=True, wait=True)
        return ray.get(self.cluster.cluster.remote(self.info.get("app")), timeout=30)

    def __del__(self) -> None:
        # Serve calls this after the app's lifespan shutdown (jobs drained): a final stats push.
        pusher = getattr(self, "pusher", None)
        if pusher is not None and getattr(self, "_started", False):
            self._started = False
            pusher.stop()


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


_DEPLOYMENT = None


def replica_deployment():
    """The Serve deployment class (created on first use, so importing needs no Ray)."""
    global _DEPLOYMENT
    serve = _serve_module()  # checked on every call: Ray may have gone since the class was made
    if _DEPLOYMENT is None:

        @serve.deployment(name="lipsync", max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS)
        @serve.ingress()
        class LipSyncReplica(LipSyncReplicaBase):
            """One engine behind the lip-sync HTTP API."""

        _DEPLOYMENT = LipSyncReplica
    return _DEPLOYMENT


def explicit_overrides(settings: Settings | None) -> dict[str, Any]:
    """The settings fields to force on every replica: those set in code or on the command line.

    Values the driver merely read from its own ``LIPSYNC_*`` environment are left out, so each
    replica reads its own node's environment (cache directory, engine, device...).
    """
    if settings is None:
        return {}
    from_env = Settings()
    return {
        k: v
        for k, v in settings.model_dump(mode="json", exclude_unset=True).items()
        if k not in from_env.model_fields_set or getattr(from_env, k) != getattr(settings, k)
    }


def build_app(
    settings: Settings | None = None,
    options: RayServeOptions | None = None,
    *,
    engines: dict[str, str] | None = None,
    runtime_env: dict[str, Any] | None = None,
    resources: dict[str, float] | None = None,
    **knobs: Any,
):
    """A bound Ray Serve application (pass it to ``serve.run``).

    Only the settings fields set explicitly on ``settings`` (not read from the driver's
    environment) travel to the replicas; the rest is read from ``LIPSYNC_*`` on each replica's node. ``knobs`` override ``options`` fields
    (``num_replicas=2``, ``max_replicas=4``...). ``engines`` registers extra engines on the replicas;
    ``runtime_env`` is the replicas' Ray runtime environment (e.g. ``{"env_vars": {...}}``) and
    ``resources`` custom Ray resources each replica needs (e.g. to pin it to some nodes).
    """
    options = options or RayServeOptions()
    if knobs:
        options = RayServeOptions(**{**options.model_dump(exclude_unset=True), **knobs})
    explicit = explicit_overrides(settings)
    reference = settings or Settings()
    deployment_kw = deployment_options(options, reference)
    if runtime_env:
        deployment_kw["ray_actor_options"]["runtime_env"] = runtime_env
    if resources:
        deployment_kw["ray_actor_options"]["resources"] = resources
    deployment = replica_deployment().options(**deployment_kw)
    return deployment.bind(explicit, options.max_ongoing_requests, options.shared_avatars, engines)


def app_builder(args: dict[str, Any] | None = None):
    """Entry for ``serve run`` / Serve config files (``import_path: lipsync.server.ray_serve:app_builder``).

    ``args`` may hold ``RayServeOptions`` fields; the deployment section of the config file
    overrides them as usual. Everything else comes from ``LIPSYNC_*`` on the replicas' nodes.
    """
    args = dict(args or {})
    overrides = args.pop("settings", None) or {}
    settings = Settings(**overrides) if overrides else None
    return build_app(settings, RayServeOptions(**args))


def http_options(settings: Settings, options: RayServeOptions) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "request_timeout_s": options.proxy_timeout_s(settings),
        "keep_alive_timeout_s": 5,
    }


def run(settings: Settings | None = None, *, blocking: bool = True, **knobs: Any):
    """Start Serve's HTTP proxy on ``settings.host:settings.port`` and deploy the app."""
    serve = _serve_module()
    settings = settings or Settings()
    options = RayServeOptions(**knobs)
    serve.start(http_options=http_options(settings, options))
    return serve.run(build_app(settings, options), name=options.app_name, route_prefix="/", blocking=blocking)


# ---------------------------------------------------------------------------------- lipsync serve --ray
def load_config(path: str | os.PathLike | None, settings: Settings, options: RayServeOptions) -> dict:
    """A Serve deploy config (the ``serve run`` YAML schema): ``path``, or one built from the knobs."""
    explicit = explicit_overrides(settings)
    if path is not None:
        import yaml

        with open(path) as f:
            config = yaml.safe_load(f)
        if explicit:  # command-line settings (--engine...) reach the replicas too
            for app in config.get("applications", []):
                app.setdefault("args", {}).setdefault("settings", {}).update(explicit)
        return config
    dep = deployment_options(options, settings)
    dep.pop("name")
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(settings, options),
        "applications": [
            {
                "name": options.app_name,
                "route_prefix": "/",
                "import_path": "lipsync.server.ray_serve:app_builder",
                "args": {"settings": explicit} if explicit else {},
                "deployments": [{"name": "lipsync", **dep}],
            }
        ],
    }


def serve_cli(settings: Settings, config_path: str | None = None, *, address: str | None = None) -> None:
    """``lipsync serve --ray``: deploy, serve until SIGINT/SIGTERM, then drain and shut down.

    Sets the proxy middleware (chunked-body limits, JSON errors) before Ray starts, so it holds
    for a local cluster; a cluster started with ``ray start`` needs
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the environment of every ``ray start``.
    """
    from .ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    _serve_module()
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    options = RayServeOptions()
    config = ServeDeploySchema.model_validate(load_config(config_path, settings, options))
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, namespace="serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from ray import serve

    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
        )
        client.deploy_apps(config, _blocking=False)
        http = config.http_options
        log.warning("lipsync on Ray Serve: http://%s:%s (Ctrl-C to drain and stop)", http.host, http.port)
        stop.wait()
        log.warning("stopping: draining replicas (up to their graceful_shutdown_timeout_s)")
        # Deleting the applications first lets replicas finish their requests (Serve waits up to
        # graceful_shutdown_timeout_s); serve.shutdown alone stops the proxies at once.
        for app in config.applications:
            serve.delete(app.name, _blocking=True)
    finally:
        try:
            serve.shutdown()
        finally:
            from .ray_cluster import kill_cluster_actor

            kill_cluster_actor()
            ray.shutdown()
