"""The FastAPI application: lifespan (load + warm up once), middleware, error handlers.

``create_app`` builds an app around a pipeline that is created in the background when the app
starts, so the port opens at once and ``/health`` answers 503 ("starting") until models are loaded,
warmed up and the default avatar is precomputed. Tests pass their own ``pipeline_factory``. The
state the routes share lives in ``runtime.ServerRuntime`` (app.py and routes.py both import it,
never each other).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from ..settings import Settings, load_settings
from .errors import install_error_handlers
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .routes import router
from .runtime import PipelineFactory, ServerRuntime, ServingPipeline, default_pipeline_factory
from .stats import metrics_registry
from .web import include_web

#: Multipart framing around the uploaded files, on top of ``max_upload_bytes`` of file content.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def create_app(
    settings: Settings | None = None,
    *,
    pipeline_factory: PipelineFactory | None = None,
    pipeline: ServingPipeline | None = None,
    background_startup: bool = True,
    warm_generate: bool = True,
) -> FastAPI:
    """The lip-sync HTTP service.

    ``settings`` default to the environment (``LIPSYNC_*``; ``ConfigError`` naming the variable
    if one is invalid). The pipeline is built by
    ``pipeline_factory(settings)`` (default ``LipSyncPipeline.from_settings``) or given ready-made
    as ``pipeline``; either way it is warmed up in the app's lifespan, in the background unless
    ``background_startup`` is False.
    """
    settings = settings or load_settings()
    if pipeline is not None:

        def pipeline_factory(_settings: Settings, _given: ServingPipeline = pipeline) -> ServingPipeline:
            return _given

    runtime = ServerRuntime(
        settings, pipeline_factory or default_pipeline_factory, warm_generate=warm_generate
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start(background=background_startup)
        try:
            yield
        finally:
            # uvicorn has already waited (up to its graceful timeout) for open requests.
            await anyio.to_thread.run_sync(runtime.stop)

    # /docs and /redoc from files in the fastapi-offline wheel (Swagger UI 5, ReDoc), not from a
    # CDN: a self-hosted server is often on a host that cannot reach one.
    app = FastAPIOffline(
        title="lipsync-server",
        version=runtime.version,
        description=(
            "Portrait + speech in, lip-synced H.264/AAC MP4 out. POST /generate with a multipart "
            "`audio` file; every error is JSON `{code, message, request_id}` (and `detail` where there is more); 503 answers carry Retry-After."
        ),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics_registry = metrics_registry(runtime.stats_snapshot, lambda: runtime.ready)
    install_error_handlers(app)
    app.include_router(router)
    include_web(app)  # the page at / and the avatar media it uses
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
