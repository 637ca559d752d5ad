"""The web page's routes in-process (TestClient around the fake pipeline): the page and its static
files, avatar thumbnails, make-default, idle clips (bounds, 404, busy). The real pipeline behind
them is covered by tests/unit/test_idle.py and tests/e2e/test_web.py."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lipsync.server import create_app
from lipsync.settings import Settings
from tests.e2e.fakes import FACE_PNG, FakePipeline, wav_bytes

UNKNOWN = "e" * 64


@pytest.fixture
def make_client(tmp_path) -> Iterator:
    clients: list[TestClient] = []

    def make(**settings_kw) -> tuple[TestClient, FakePipeline]:
        settings = Settings(cache_dir=tmp_path / "cache", **settings_kw)
        pipe = FakePipeline(settings)
        client = TestClient(create_app(settings, pipeline=pipe, background_startup=False),
                            raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, pipe

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_page_and_static_files(make_client) -> None:
    client, _ = make_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/app.js">' in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/nope.js").status_code == 404
    # the page is not an API endpoint: it stays out of the OpenAPI schema
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/avatars/{avatar_id}/idle.mp4" in paths


def test_thumbnail(make_client) -> None:
    client, _ = make_client()
    default_id = client.get("/avatars").json()["default_id"]
    r = client.get(f"/avatars/{default_id}/image", params={"size": 40})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (40, 40)
    r = client.get(f"/avatars/{UNKNOWN}/image")
    assert r.status_code == 404 and r.json()["code"] == "avatar_not_found"
    for size in (8, 4096):
        assert client.get(f"/avatars/{default_id}/image", params={"size": size}).status_code == 422
    assert client.get("/avatars/not-an-id/image").status_code in (404, 422)


def test_make_default(make_client) -> None:
    client, _ = make_client()
    created = client.post("/avatars", files={"image": ("face.png", FACE_PNG)}).json()
    assert not created["default"]
    r = client.post(f"/avatars/{created['id']}/default")
    assert r.status_code == 200 and r.json()["avatar_id"] == created["id"]
    assert client.get("/avatars").json()["default_id"] == created["id"]
    assert client.get("/health").json()["default_avatar"]["id"] == created["id"]
    r = client.post(f"/avatars/{UNKNOWN}/default")
    assert r.status_code == 404 and r.json()["code"] == "avatar_not_found"


def test_idle_clip_bounds_and_answer(make_client) -> None:
    client, _ = make_client()
    default_id = client.get("/avatars").json()["default_id"]
    for seconds in (0, 0.99, 10.01, "x"):
        r = client.get(f"/avatars/{default_id}/idle.mp4", params={"seconds": seconds})
        assert r.status_code == 422 and r.json()["code"] == "invalid_input", seconds
    r = client.get(f"/avatars/{default_id}/idle.mp4", params={"size": 63})
    assert r.status_code == 422
    r = client.get(f"/avatars/{default_id}/idle.mp4", params={"seconds": 2, "still": "false"})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.headers["x-frames"] == "50" and r.content == b"fake idle clip 50"
    r = client.get(f"/avatars/{UNKNOWN}/idle.mp4")
    assert r.status_code == 404 and r.json()["code"] == "avatar_not_found"


def test_idle_clip_when_busy_is_503_with_retry_after(make_client) -> None:
    client, pipe = make_client(workers=1, queue_size=0)
    default_id = client.get("/avatars").json()["default_id"]
    while pipe.renders_started.acquire(blocking=False):
        pass  # the start-up warm-up render counted too
    pipe.render_gate.clear()
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(client.post("/generate", files={"audio": ("a.wav", wav_bytes(1.0))}).status_code)
    )
    worker.start()
    assert pipe.renders_started.acquire(timeout=5)  # the only worker is taken
    r = client.get(f"/avatars/{default_id}/idle.mp4")
    assert r.status_code == 503 and r.json()["code"] == "busy"
    assert int(r.headers["retry-after"]) >= 1
    pipe.render_gate.set()
    worker.join(10)
    assert results == [200]
    assert client.get(f"/avatars/{default_id}/idle.mp4").status_code == 200
