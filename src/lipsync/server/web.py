"""The web page at ``/``: plain HTML, CSS and JavaScript modules shipped inside the package.

No bundler and nothing fetched from elsewhere: ``static/`` holds the files as they are served
(``index.html``, ``app.css``, ``*.js`` ES modules). The page talks only to this server's API
(``/avatars``, ``/generate``, ``/avatars/{id}/idle.mp4``...); its Content-Security-Policy says so.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .avatar_media import router as avatar_media_router

STATIC_DIR = Path(str(resources.files("lipsync.server") / "static"))

#: Only this server: scripts, styles, images and media from here, recordings as blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


class _StaticFiles(StaticFiles):
    """Static files that browsers revalidate (cheap: ETag), so an upgrade is never half-seen."""

    async def get_response(self, path, scope):  # type: ignore[override]
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def include_web(app: FastAPI) -> None:
    """Add the page (``/``, ``/static/*``) and the avatar media endpoints to ``app``."""
    app.include_router(avatar_media_router)
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
