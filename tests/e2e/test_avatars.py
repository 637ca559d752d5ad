"""Avatar upload/list/delete over HTTP, and ids that try to leave the cache directory."""

from __future__ import annotations

import hashlib
import http.client
import json
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.conftest import LiveServer, wav_bytes

TRAVERSALS = [
    "..%2F..%2Fetc",
    "..%2F..%2Fetc%2Fpasswd",
    "%2E%2E%2F%2E%2E%2Fcanary",
    "..",
    "%2e%2e",
    "..%5C..%5Ccanary",
    "%2F..%2F..%2Fcanary",
    "....%2F%2F....%2F%2Fcanary",
    "canary%00",
]


def _raw(server: LiveServer, method: str, path: str) -> tuple[int, bytes]:
    """Send the path exactly as written: clients like httpx would normalise the dots away."""
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_avatar_lifecycle(live_server: LiveServer, material) -> None:
    face = material.bytes("faces/tall.jpg")
    expected_id = hashlib.sha256(face).hexdigest()
    with live_server.client() as client:
        created = client.post("/avatars", files={"image": ("tall.jpg", face, "image/jpeg")})
        assert created.status_code in (200, 201), created.text
        assert created.json()["id"] == expected_id
        again = client.post("/avatars", files={"image": ("tall.jpg", face)})
        assert again.status_code == 200 and again.json()["cache_hit"] is True

        listed = client.get("/avatars").json()
        assert expected_id in [a["id"] for a in listed["avatars"]]
        info = client.get(f"/avatars/{expected_id}").json()
        assert info["info"]["source_size"] == [910, 1137]

        gen = client.post(
            "/generate", files={"audio": ("a.wav", wav_bytes(1.0))}, data={"avatar_id": expected_id}
        )
        assert gen.status_code == 200, gen.text
        assert gen.headers["x-avatar-id"] == expected_id
        assert gen.headers["x-avatar-cache"] == "hit"

        deleted = client.delete(f"/avatars/{expected_id}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert client.get(f"/avatars/{expected_id}").status_code == 404
        assert client.delete(f"/avatars/{expected_id}").status_code == 404
        gone = client.post(
            "/generate", files={"audio": ("a.wav", wav_bytes(1.0))}, data={"avatar_id": expected_id}
        )
        assert gone.status_code == 404 and gone.json()["code"] == "avatar_not_found"
        assert expected_id not in [a["id"] for a in client.get("/avatars").json()["avatars"]]


def test_generate_with_an_image_upload(live_server: LiveServer, material) -> None:
    face = material.bytes("faces/portrait.png")
    with live_server.client() as client:
        r = client.post("/generate", files={"audio": ("a.wav", wav_bytes(1.0)), "image": ("a.png", face)})
    assert r.status_code == 200, r.text
    assert r.headers["x-avatar-id"] == hashlib.sha256(face).hexdigest()


def test_default_avatar_is_protected(live_server: LiveServer) -> None:
    default_id = httpx.get(f"{live_server.url}/health").json()["default_avatar"]["id"]
    r = httpx.delete(f"{live_server.url}/avatars/{default_id}")
    assert r.status_code == 409 and r.json()["code"] == "avatar_in_use"


@pytest.mark.parametrize("bad_id", TRAVERSALS)
def test_ids_cannot_reach_outside_the_cache(live_server: LiveServer, bad_id: str) -> None:
    canary = live_server.cache_dir.parent / "canary"
    canary.write_text("must survive")
    for method in ("GET", "DELETE"):
        status, body = _raw(live_server, method, f"/avatars/{bad_id}")
        assert status in (404, 405, 422), (method, bad_id, status, body)
        assert json.loads(body)["code"]
    with live_server.client() as client:
        r = client.post(
            "/generate",
            files={"audio": ("a.wav", wav_bytes(0.5))},
            data={"avatar_id": bad_id.replace("%2F", "/")},
        )
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"
    assert canary.read_text() == "must survive"
    assert httpx.get(f"{live_server.url}/health").status_code == 200
