"""ASGI middleware for Ray Serve's HTTP proxy: body limits that hold for chunked uploads, and
JSON answers for the errors the proxy itself produces.

Ray Serve 2.60's proxy reads a request body from the client as fast as it arrives and queues it,
unbounded, until the replica pulls it (``proxy_asgi_receive`` in ``ray/serve/_private/proxy.py``).
A replica-side limit therefore cannot stop a chunked upload (no Content-Length): the proxy has
already taken it. This middleware runs *inside the proxy* (Serve loads it from the import path in
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``; ``lipsync serve --ray`` sets it) and:

* refuses a declared ``Content-Length`` over the limit with 413 before reading anything;
* counts a chunked body as it streams; at the first byte past the limit it ends the body for the
  proxy (the replica then sees an oversized, truncated body and answers 413 itself, counting it
  as ``payload_too_large``), stops reading from the client (uvicorn's flow control then pauses the
  socket) and makes sure the client gets a 413 JSON with ``Connection: close``. It also stops
  reading a body the replica has already answered (e.g. 400 for a malformed multipart). At most
  ``limit`` bytes per request are ever held, and after a large body the freed memory is handed
  back to the OS (``malloc_trim``), so the proxy's RSS returns to where it was;
* rewrites the proxy's own plain-text errors into the API's JSON shape: back-pressure beyond
  ``max_queued_requests`` (503) becomes ``busy`` with Retry-After, the proxy's
  ``request_timeout_s`` (408) becomes 504 ``timeout``, no replica available becomes 503
  ``not_ready``, and a request whose replica died before answering becomes 503
  ``replica_unavailable`` with Retry-After; the proxy's own 404 (no application on the path:
  not deployed yet or being deleted on shutdown) becomes 503 ``not_ready``.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import size_text

log = logging.getLogger("lipsync.server")

#: Environment variable Ray Serve reads (in the proxy process) for extra proxy middleware.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "lipsync.server.ray_proxy:proxy_middlewares"
ERROR_CODE_HEADER = "x-error-code"
#: After a request whose body was at least this large, free memory is handed back to the OS.
TRIM_AFTER_BYTES = 4 * 1024 * 1024


def release_free_memory() -> bool:
    """Give the C allocator's free pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Large request bodies are held as many big ``bytes`` chunks; once freed, glibc keeps most of
    that heap mapped, so the process's RSS would stay at its high-water mark for ever.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middleware list, with limits from ``LIPSYNC_*`` on this node."""
    from ..settings import Settings
    from .app import MULTIPART_OVERHEAD_BYTES

    settings = Settings()
    limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    log.info("lipsync proxy middleware: request bodies limited to %d bytes", limit)
    return [Middleware(ProxyGuardMiddleware, max_body_bytes=limit)]


def _json_message(status: int, code: str, message: str, headers: dict[str, str]) -> tuple[Message, Message]:
    import json

    body = json.dumps({"code": code, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw.append((ERROR_CODE_HEADER.encode(), code.encode()))
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return (
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


class ProxyGuardMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> tuple[Message, Message]:
        return _json_message(
            413,
            "payload_too_large",
            f"request body is larger than the {size_text(self.max_body_bytes)} limit "
            "(LIPSYNC_MAX_UPLOAD_BYTES per file, plus the form's overhead)",
            {"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            for message in self._too_large():
                await send(message)
            return

        received = 0
        overflowed = False
        started = False
        replaced = False
        finished = False
        never = asyncio.Event()
        body_complete = [False]

        def done_reading_ok() -> bool:
            # Once the replica has answered, the rest of an unread body is not worth taking in
            # (the proxy would otherwise queue all of it); a fully read body still lets
            # ``receive`` report the client's disconnect.
            return body_complete[0]

        async def counted_receive() -> Message:
            nonlocal received, overflowed
            if overflowed or (started and not done_reading_ok()):
                # The body was cut off: wait for the end of the request without reading more
                # from the client. The proxy cancels this call when the response is complete.
                await never.wait()
            # After a complete body this returns ``http.disconnect`` when the client hangs up,
            # which is how the proxy learns to cancel the replica's work.
            message = await receive()
            if message["type"] == "http.request":
                body_complete[0] = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and message.get("more_body", False):
                    overflowed = True
                    # Forward what crossed the limit and end the body: the replica sees it is
                    # too large; nothing more is read from the client.
                    return {**message, "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced, finished
            if replaced:
                return
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if overflowed and status != 413:
                    replaced = True
                    for m in self._too_large():
                        await send(m)
                    return
                if overflowed or not body_complete[0]:
                    # Part of the body is still unread: this connection cannot carry another request.
                    headers["Connection"] = "close"
                if ERROR_CODE_HEADER not in headers:
                    mapped = _map_proxy_error(status, headers)
                    if mapped is not None:
                        replaced = True
                        for m in mapped:
                            await send(m)
                        return
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        finally:
            never.set()
            if received >= TRIM_AFTER_BYTES:
                release_free_memory()
        if not started:
            # The proxy gave up without answering: the replica died (or its actor was lost)
            # while handling this request.
            for m in (
                self._too_large()
                if overflowed
                else _json_message(
                    503,
                    "replica_unavailable",
                    "the replica handling this request stopped before answering; retry",
                    {"Retry-After": "1"},
                )
            ):
                await send(m)
        elif not finished and not replaced:
            log.debug("proxy response ended without a final body message")


def _map_proxy_error(status: int, headers: MutableHeaders) -> tuple[Message, Message] | None:
    """The proxy's own error answers (plain text, no X-Error-Code) in the API's JSON shape."""
    if status == 503:
        retry = headers.get("retry-after")
        if retry is not None:
            return _json_message(
                503,
                "busy",
                "all replicas are busy and the queue is full (max_queued_requests); try again later",
                {"Retry-After": retry},
            )
        return _json_message(
            503, "not_ready", "no replica is ready to take the request; retry shortly", {"Retry-After": "5"}
        )
    if status == 404:
        # The proxy's own 404: no application serves this path (not deployed yet, or deleted
        # while shutting down). The app's own 404s carry X-Error-Code and never get here.
        return _json_message(
            503, "not_ready", "no application is serving this path (starting or shutting down); retry",
            {"Retry-After": "5"},
        )
    if status == 408:
        return _json_message(
            504, "timeout", "the request took longer than the proxy's request_timeout_s", {}
        )
    if status == 500:
        return _json_message(
            503,
            "replica_unavailable",
            "the replica handling this request failed before answering; retry",
            {"Retry-After": "1"},
        )
    return None
