"""Every bad file is refused with its exact HTTP status and JSON code; every odd file works.

The files come from tests/material.py. Afterwards the server is still healthy and earlier avatars
are still served from the cache.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.e2e.conftest import LiveServer, mp4_facts, wav_bytes
from tests.material import BAD, BAD_IMAGES, UNUSUAL_AUDIO, UNUSUAL_IMAGES

#: What /generate answers for each bad file sent as the audio: (status, code), or 200 (accepted).
#: The statuses are lipsync.server.errors.STATUS for the error the io/ stage raises.
AS_AUDIO: dict[str, tuple[int, str | None]] = {
    "bad.wav": (422, "corrupt_media"),  # fmt chunk size runs past the file
    "null.wav": (422, "empty_audio"),
    "evil.wav": (422, "corrupt_media"),  # a chunk size past the end of the file
    "awful.wav": (422, "corrupt_media"),  # sample rate and byte rate disagree
    "truncated.wav": (422, "corrupt_media"),
    "random.wav": (415, "unsupported_media"),
    "png_named.wav": (415, "unsupported_media"),  # content decides, not the name
    "huge_header.wav": (200, None),  # read as the 1 s it really holds
    "noface.png": (415, "unsupported_media"),  # an image is not audio
    "bomb_20000x20000.png": (415, "unsupported_media"),
    "truncated.jpg": (415, "unsupported_media"),
    "text.png": (415, "unsupported_media"),
}
#: ... and for each bad image sent as a portrait (POST /avatars, /generate image=, /precompute).
AS_IMAGE: dict[str, tuple[int, str]] = {
    "noface.png": (422, "no_face"),
    "bomb_20000x20000.png": (413, "image_too_large"),
    "truncated.jpg": (422, "corrupt_media"),
    "text.png": (415, "unsupported_media"),
}
assert sorted(AS_AUDIO) == sorted(BAD) and sorted(AS_IMAGE) == sorted(BAD_IMAGES)


def _assert_refused(r: httpx.Response, name: str, expected: tuple[int, str]) -> None:
    assert (r.status_code, r.headers.get("x-error-code")) == expected, f"{name}: HTTP {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), name
    body = r.json()
    assert body["code"] == expected[1], body
    assert body["message"] and "\n" not in body["message"] and "Traceback" not in body["message"], body


@pytest.fixture(scope="module")
def baseline_avatar(live_server: LiveServer, material) -> str:
    """An avatar uploaded before the bad input, which must still work afterwards."""
    face = material.bytes("faces/portrait.jpg")
    r = httpx.post(f"{live_server.url}/avatars", files={"image": ("a.jpg", face)}, timeout=120)
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


@pytest.mark.parametrize("name", BAD)
def test_bad_file_as_audio(live_server: LiveServer, baseline_avatar: str, material, name: str) -> None:
    data = material.bytes(f"bad/{name}")
    with live_server.client() as client:
        r = client.post("/generate", files={"audio": (name, data)})
    expected = AS_AUDIO[name]
    if expected[0] == 200:
        assert r.status_code == 200, r.text[:300]
        assert mp4_facts(r.content).frames == 25
        return
    _assert_refused(r, name, expected)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_file_as_image(live_server: LiveServer, baseline_avatar: str, material, name: str) -> None:
    data = material.bytes(f"bad/{name}")
    expected = AS_IMAGE[name]
    with live_server.client() as client:
        _assert_refused(client.post("/avatars", files={"image": (name, data)}), name, expected)
        inline = client.post("/generate", files={"audio": ("a.wav", wav_bytes(0.5)), "image": (name, data)})
        _assert_refused(inline, name, expected)
        _assert_refused(client.post("/precompute", files={"image": (name, data)}), name, expected)


@pytest.mark.parametrize("name", UNUSUAL_AUDIO)
def test_unusual_audio_works(live_server: LiveServer, material, name: str) -> None:
    data = material.bytes(f"unusual/{name}")
    with live_server.client() as client:
        r = client.post("/generate", files={"audio": (name, data)})
    assert r.status_code == 200, f"{name}: {r.text[:300]}"
    facts = mp4_facts(r.content)
    seconds = float(r.headers["x-audio-seconds"])
    assert seconds > 0.5
    assert abs(facts.frames - seconds * 25) <= 1.5
    assert (facts.width, facts.height, facts.video_codec, facts.audio_codec) == (512, 512, "h264", "aac")


@pytest.mark.parametrize("name", UNUSUAL_IMAGES)
def test_unusual_image_works_as_avatar(live_server: LiveServer, material, name: str) -> None:
    data = material.bytes(f"unusual/{name}")
    with live_server.client() as client:
        created = client.post("/avatars", files={"image": (name, data)})
        assert created.status_code in (200, 201), f"{name}: {created.text[:300]}"
        avatar_id = created.json()["id"]
        assert avatar_id == hashlib.sha256(data).hexdigest()
        r = client.post(
            "/generate", files={"audio": ("a.wav", wav_bytes(1.0))}, data={"avatar_id": avatar_id}
        )
    assert r.status_code == 200, f"{name}: {r.text[:300]}"
    assert mp4_facts(r.content).frames == 25


def test_server_and_cache_survive_the_bad_input(live_server: LiveServer, baseline_avatar: str) -> None:
    with live_server.client() as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["ready"]
        ids = [a["id"] for a in client.get("/avatars").json()["avatars"]]
        assert baseline_avatar in ids
        r = client.post(
            "/generate", files={"audio": ("a.wav", wav_bytes(1.0))}, data={"avatar_id": baseline_avatar}
        )
        assert r.status_code == 200 and r.headers["x-avatar-cache"] == "hit"
        stats = client.get("/stats").json()
    assert "internal_error" not in stats["requests"]["failed_by_reason"]
    assert stats["cache"]["avatars"] == len(ids)
