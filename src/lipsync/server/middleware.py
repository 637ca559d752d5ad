"""Pure-ASGI middleware: request ids, stats and access log, and the request-body limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched and the body
limit can answer before the body is read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import size_text
from .errors import ERROR_CODE_HEADER, internal_error_response, json_error

log = logging.getLogger("lipsync.server")
access_log = logging.getLogger("lipsync.server.access")

REQUEST_ID_HEADER = "X-Request-ID"
#: Stats reason for a request cancelled because its client closed the connection.
CLIENT_CLOSED = "client_closed"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Paths that are monitoring or documentation, not API work: left out of the request counters.
UNCOUNTED_PATHS = frozenset(
    {"/health", "/stats", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


class StreamAborted(Exception):
    """A streamed response failed after its headers were sent.

    The only honest signal left is to drop the connection (an unterminated chunked body), so the
    client cannot mistake a truncated video for a complete one. ``code`` classifies it in stats.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _endpoint_name(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """``"POST /generate"``: the route template, so ids in paths do not make new series."""
    route = scope.get("route")
    if route is None:
        # Answered before routing (e.g. the body limit): find the route the request was for.
        probe = {**scope, "path_params": {}}
        route = next((r for r in routes if r.matches(probe)[0] == Match.FULL), None)
    path = getattr(route, "path", None)
    return f"{scope.get('method', '?')} {path}" if path else "unmatched"


class RequestContextMiddleware:
    """Outermost layer: X-Request-ID, access log, request counters, last-resort 500 JSON."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        record: Callable[[str, int, str | None], None],
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.record = record
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given and _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        t0 = time.perf_counter()
        status = 0
        error_code: str | None = None
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, error_code, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                error_code = headers.get(ERROR_CODE_HEADER)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except StreamAborted as exc:
            error_code = exc.code
            log.warning(
                "stream aborted after its headers were sent (rid=%s): %s: %s",
                request_id,
                exc.code,
                exc.message,
            )
            # Returning without finishing the body makes the server drop the connection
            # (uvicorn logs "ASGI callable returned without completing response").
        except asyncio.CancelledError:
            # The server cancelled the request because its connection closed (Ray Serve's proxy
            # does this when the client hangs up): not a server error.
            error_code = CLIENT_CLOSED
            status = status or 499
            raise
        except Exception as exc:
            error_code = "internal_error"
            log.error(
                "internal error on %s %s (rid=%s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
                exc_info=exc,
            )
            if not started:
                status = 500
                response = internal_error_response(request_id)
                response.headers[REQUEST_ID_HEADER] = request_id
                await response(scope, receive, send)
        finally:
            error_code = state.get("error_code", error_code)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            path = scope.get("path", "")
            if path not in UNCOUNTED_PATHS:
                self.record(_endpoint_name(scope, self.routes), status or 500, error_code)
            access_log.info(
                "%s %s %s %d %.1fms rid=%s%s",
                _client(scope),
                scope.get("method"),
                path,
                status,
                elapsed_ms,
                request_id,
                f" code={error_code}" if error_code else "",
            )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 JSON, without reading past the limit.

    A declared Content-Length over the limit is refused before the app runs. A chunked (or lying)
    body is counted as it is received; at the first byte past the limit the app's ``receive``
    raises, and whatever the app then answers is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, scope: Scope):
        response = json_error(
            413,
            "payload_too_large",
            f"request body is larger than the {size_text(self.max_bytes)} limit "
            "(LIPSYNC_MAX_UPLOAD_BYTES per file, plus the form's overhead)",
            detail={"limit_bytes": self.max_bytes},
            request_id=scope.get("state", {}).get("request_id"),
            headers={"Connection": "close"},
        )
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                declared_bytes = -1
            if declared_bytes > self.max_bytes:
                await self._too_large(scope)(scope, receive, send)
                return

        received = 0
        overflowed = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, overflowed
            if overflowed:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflowed:
                # The app answered after its receive failed (e.g. "error parsing the body");
                # the real answer is ours.
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not overflowed:
                raise
        if overflowed and not started:
            scope.setdefault("state", {})["error_code"] = "payload_too_large"
            await self._too_large(scope)(scope, receive, send)
