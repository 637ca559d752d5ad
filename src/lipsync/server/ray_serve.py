"""Scale-out on Ray Serve: the same FastAPI app, one engine per replica.

    pip install 'lipsync-server[ray]'
    python -c "from lipsync.server.ray_serve import run; run(num_replicas=2)"

or, in a Serve config file, ``import_path: lipsync.server.ray_serve:app_builder``.

Each replica is a Ray actor process that builds the app (and so loads and warms its own engine)
when it starts. Ray's proxy queues and routes requests; a replica takes at most
``max_ongoing_requests`` (1-2: one rendering, one decoding its upload) and keeps no queue of its
own beyond that, so back-pressure lives in one place. Responses are streamed through the proxy
(``FileResponse`` sends 64 KiB chunks; ``stream=true`` sends fragments as they render), so large
videos never sit whole in Ray's object store.

``ray`` is imported only when these functions are called; the rest of the package never needs it.
"""

from __future__ import annotations

from typing import Any

from ..errors import EngineUnavailable
from ..settings import Settings

#: In-flight requests per replica: one rendering plus one being decoded/precomputed.
DEFAULT_MAX_ONGOING_REQUESTS = 2


def _serve_module():
    try:
        from ray import serve
    except ModuleNotFoundError:
        raise EngineUnavailable(
            "Ray Serve is not installed; install it with: pip install 'lipsync-server[ray]'"
        ) from None
    return serve


def replica_settings(settings: Settings, max_ongoing_requests: int) -> Settings:
    """Per-replica settings: one worker, and only as many waiting slots as Ray may send."""
    if not 1 <= max_ongoing_requests <= 64:
        raise ValueError("max_ongoing_requests must be between 1 and 64")
    return settings.model_copy(update={"workers": 1, "queue_size": max_ongoing_requests - 1})


def build_app(
    settings: Settings | None = None,
    *,
    num_replicas: int | str = 1,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    ray_actor_options: dict[str, Any] | None = None,
    name: str = "lipsync",
):
    """A bound Ray Serve application (pass it to ``serve.run``).

    ``num_replicas`` may be ``"auto"`` for Serve's autoscaling. For GPU replicas pass
    ``ray_actor_options={"num_gpus": 1}`` (and ``LIPSYNC_ENGINE=sadtalker``).
    """
    serve = _serve_module()
    settings = replica_settings(settings or Settings(), max_ongoing_requests)

    def asgi_app():
        # Runs on the replica, so the engine loads there and nothing unpicklable (threads,
        # locks, models) is ever shipped from the driver.
        from .app import create_app

        return create_app(settings)

    @serve.deployment(
        name=name,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        graceful_shutdown_timeout_s=settings.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=1.0,
    )
    @serve.ingress(asgi_app)
    class LipSyncReplica:
        """One engine behind the lip-sync HTTP API."""

    return LipSyncReplica.bind()


def app_builder(args: dict[str, Any] | None = None):
    """Entry for ``serve run`` / Serve config files: ``args`` may hold ``num_replicas`` and
    ``max_ongoing_requests``; everything else comes from ``LIPSYNC_*`` on the replicas' nodes."""
    args = dict(args or {})
    return build_app(
        Settings(),
        num_replicas=args.get("num_replicas", 1),
        max_ongoing_requests=int(args.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)),
    )


def run(settings: Settings | None = None, *, blocking: bool = True, **kw: Any):
    """Start Serve's HTTP proxy on ``settings.host:settings.port`` and deploy the app."""
    serve = _serve_module()
    settings = settings or Settings()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings, **kw), route_prefix="/", blocking=blocking)
