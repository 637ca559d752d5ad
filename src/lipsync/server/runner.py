"""Running the app under uvicorn with graceful shutdown wired to our job queue."""

from __future__ import annotations

import copy
import errno
import logging
import socket
from types import FrameType

from ..errors import ConfigError, LipsyncError
from ..settings import Settings, load_settings
from .app import create_app
from .runtime import ServerRuntime

log = logging.getLogger("lipsync.server")


def _log_config(level: str) -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["lipsync"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """On SIGTERM/SIGINT, refuse new jobs (503 shutting_down) before uvicorn starts draining."""

        def __init__(self, config: uvicorn.Config, runtime: ServerRuntime) -> None:
            super().__init__(config)
            self.runtime = runtime

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.runtime.begin_shutdown()
            super().handle_exit(sig, frame)

    return GracefulServer


def check_listen_address(host: str, port: int) -> None:
    """Raise ``ConfigError`` (setting ``port`` or ``host``) when ``host:port`` cannot be bound,
    e.g. another server already listens there; checked before any model loads, so a taken port
    is one clear line at once instead of uvicorn's log after start-up. Binds with SO_REUSEADDR,
    as uvicorn does, and closes at once (a later race is still reported by uvicorn)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({e.strerror})",
                          setting="host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            hint = ("another server is listening there; stop it or choose another --port "
                    "(LIPSYNC_PORT)" if e.errno == errno.EADDRINUSE else e.strerror)
            raise ConfigError(f"cannot listen on {host}:{port}: {hint}", setting="port") from None


def serve(settings: Settings | None = None, *, log_level: str = "info") -> None:
    """Serve the API on ``settings.host:settings.port`` until SIGTERM/SIGINT.

    Models load in the background after the port opens (``/health`` is 503 until ready). On a
    signal, new jobs get 503 ``shutting_down`` while running ones finish, for at most
    ``settings.graceful_shutdown_s``. Raises ``ConfigError`` at once if the address cannot be
    bound (``check_listen_address``), and the ``LipsyncError`` if start-up fails (unknown
    engine, missing checkpoints, unusable default avatar), after the server has stopped.
    """
    import uvicorn

    settings = settings or load_settings()
    check_listen_address(settings.host, settings.port)
    app = create_app(settings)
    runtime: ServerRuntime = app.state.runtime
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level=log_level,
        log_config=_log_config(log_level),
        access_log=False,  # our middleware logs each request with its X-Request-ID
        timeout_graceful_shutdown=settings.graceful_shutdown_s,  # type: ignore[arg-type]
        timeout_keep_alive=5,
    )
    server = _server_class()(config, runtime)

    def stop_on_failure(error: LipsyncError) -> None:
        server.should_exit = True

    runtime.on_startup_failure = stop_on_failure
    server.run()
    if runtime.startup_error is not None:
        raise runtime.startup_error
