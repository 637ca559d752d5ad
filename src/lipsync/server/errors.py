"""The one place our error types become HTTP answers.

Every error the service sends is a JSON body ``{"code", "message", "detail"?, "request_id"?}``
with the status from ``STATUS`` below; ``Busy`` and its subclasses add ``Retry-After``. The code is
repeated in the ``X-Error-Code`` header so middleware (stats, access log) can classify a response
without parsing its body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AudioTooLong,
    AvatarNotFound,
    Busy,
    CheckpointError,
    ConfigError,
    CorruptMedia,
    EmptyAudio,
    EngineUnavailable,
    ImageTooLarge,
    InvalidInput,
    JobTimeout,
    LipsyncError,
    NoFaceFound,
    PayloadTooLarge,
    ShuttingDown,
    UnsupportedMedia,
)
from ..options import option_error_text

log = logging.getLogger("lipsync.server")

ERROR_CODE_HEADER = "X-Error-Code"


# --- errors only the service raises ------------------------------------------------------------
class NotReady(Busy):
    """Start-up (model load, warm-up, default avatar) has not finished yet."""

    code = "not_ready"


class AvatarInUse(InvalidInput):
    """The default avatar cannot be deleted while it is the default."""

    code = "avatar_in_use"


class ClientDisconnected(LipsyncError):
    """The client went away before its video was finished; the job was stopped."""

    code = "client_disconnected"


class JobCancelled(Exception):
    """Raised inside a worker to stop a job whose client left or whose deadline passed.

    Not a ``LipsyncError``: it never reaches a client, the route turns it into the real reason.
    """


# Most specific class wins (looked up along the exception's MRO).
STATUS: dict[type[LipsyncError], int] = {
    UnsupportedMedia: 415,
    CorruptMedia: 422,
    EmptyAudio: 422,
    NoFaceFound: 422,
    AudioTooLong: 413,
    ImageTooLarge: 413,
    PayloadTooLarge: 413,
    AvatarInUse: 409,
    InvalidInput: 422,
    AvatarNotFound: 404,
    NotReady: 503,
    ShuttingDown: 503,
    Busy: 503,
    JobTimeout: 504,
    ClientDisconnected: 499,  # nginx's "client closed request"; the client never sees it
    EngineUnavailable: 503,
    CheckpointError: 503,
    ConfigError: 500,
    LipsyncError: 500,
}

# FastAPI/Starlette's own HTTP errors (unknown route, wrong method) get codes too.
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media",
    422: "invalid_input",
}


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    code: str = Field(description="Machine-readable reason, e.g. 'no_face', 'busy', 'unsupported_media'.")
    message: str = Field(description="One-line human explanation.")
    detail: dict[str, Any] | None = Field(None, description="Structured extras (field names, limits...).")
    request_id: str | None = Field(None, description="The X-Request-ID of the failed request.")


def status_for(exc: LipsyncError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _request_id(request: Request | None) -> str | None:
    if request is None:
        return None
    return request.scope.get("state", {}).get("request_id")


def json_error(
    status: int,
    code: str,
    message: str,
    *,
    detail: dict | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if detail:
        body["detail"] = _jsonable(detail)
    if request_id:
        body["request_id"] = request_id
    all_headers = {ERROR_CODE_HEADER: code}
    if headers:
        all_headers.update(headers)
    return JSONResponse(body, status_code=status, headers=all_headers)


def error_response(exc: LipsyncError, request: Request | None = None) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, Busy):
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
    return json_error(
        status_for(exc),
        exc.code,
        exc.message,
        detail=exc.detail or None,
        request_id=_request_id(request),
        headers=headers,
    )


def _jsonable(value: Any) -> Any:
    """Details may hold paths, tuples or bytes; make them JSON without failing."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


AVATAR_ID_HINT = (
    "not an avatar id: expected the 64 lower-case hex characters that POST /avatars or "
    "POST /precompute returned (`lipsync precompute` prints the same id)"
)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _field_message(loc: list[str], err: dict) -> str:
    if loc and loc[-1] == "avatar_id" and err.get("type") == "string_pattern_mismatch":
        return AVATAR_ID_HINT
    return option_error_text(loc[-1], err) if loc else str(err.get("msg", "invalid"))


def _validation_summary(errors: list[dict]) -> tuple[str, list[dict]]:
    items = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        items.append(
            {
                "field": ".".join(loc) or None,
                "message": _field_message(loc, err),
                "type": str(err.get("type", "")),
            }
        )
    if not items:
        return "invalid request", items
    first = items[0]
    where = f"field {first['field']!r}: " if first["field"] else ""
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return f"{where}{first['message']}{more}", items


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure to a JSON body in the same shape."""

    @app.exception_handler(LipsyncError)
    async def _lipsync_error(request: Request, exc: LipsyncError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        in_body = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
        if in_body and content_type and content_type not in FORM_TYPES:
            # e.g. a JSON body: every form field then reads as missing, which names the wrong fault
            return json_error(
                415, "unsupported_media",
                f"{request.url.path} takes multipart/form-data (curl -F field=@file ...); got {content_type}",
                request_id=_request_id(request),
            )
        message, items = _validation_summary(errors)
        return json_error(
            422, "invalid_input", message, detail={"errors": items}, request_id=_request_id(request)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return json_error(
            exc.status_code, code, message, request_id=_request_id(request), headers=dict(exc.headers or {})
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error_response(_request_id(request))


def internal_error_response(request_id: str | None) -> JSONResponse:
    return json_error(
        500, "internal_error", "internal server error; see the server log", request_id=request_id
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error statuses a route can answer."""
    descriptions = {
        400: "Malformed request body",
        404: "Unknown avatar",
        409: "Conflict",
        413: "Too large (body, audio duration, image pixels)",
        415: "Unsupported media",
        422: "Invalid or corrupt input, or no face found",
        499: "Client disconnected",
        503: "Busy, not ready or shutting down (see Retry-After)",
        504: "Request time limit exceeded",
        500: "Internal error",
    }
    # Inline JSON schema (not ``model=``): FastAPI would list a model under the route's own media
    # type, which for /generate is video/mp4, while errors are always JSON.
    schema = ErrorBody.model_json_schema()
    return {
        s: {"description": descriptions.get(s, "Error"), "content": {"application/json": {"schema": schema}}}
        for s in statuses
    }
