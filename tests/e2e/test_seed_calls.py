"""The three calls existing clients make (PowerShell in the issue), against a real server process."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import httpx

from tests.conftest import need
from tests.e2e.conftest import LiveServer, mp4_facts


def _raw_request(
    server: LiveServer, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Exactly the bytes we choose on the wire (httpx would add a Content-Type for forms)."""
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def check_video(data: bytes, audio_seconds: float) -> None:
    facts = mp4_facts(data)
    assert facts.top_boxes[0] == "ftyp"
    assert "moov" in facts.top_boxes and "mdat" in facts.top_boxes
    assert facts.top_boxes.index("moov") < facts.top_boxes.index("mdat"), "not faststart"
    assert facts.video_codec == "h264"
    assert (facts.width, facts.height) == (512, 512)
    assert round(facts.fps) == 25
    assert facts.audio_codec == "aac"
    assert abs(facts.frames - audio_seconds * 25) <= 1.5, (facts.frames, audio_seconds)


def test_health(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["ready"] is True
    assert body["engine"] == "classic" and body["device"] == "cpu"
    assert body["models_loaded"] and body["warmed_up"]
    assert body["default_avatar"]["ready"] and len(body["default_avatar"]["id"]) == 64
    assert body["version"]


def test_precompute_with_no_body_at_all(live_server: LiveServer) -> None:
    default_id = httpx.get(f"{live_server.url}/health").json()["default_avatar"]["id"]
    # Invoke-RestMethod -Method Post: no body, no Content-Type.
    status, headers, body = _raw_request(live_server, "POST", "/precompute", headers={"Content-Length": "0"})
    assert status == 200, body
    result = json.loads(body)
    assert result["avatar_id"] == default_id
    assert result["default"] is True and result["precompute_s"] > 0
    assert headers["x-request-id"]
    assert httpx.get(f"{live_server.url}/health").status_code == 200


def test_generate_multipart_audio(live_server: LiveServer, material) -> None:
    wav = material.path("speech/speech_3s.wav")
    with live_server.client() as client:
        r = client.post("/generate", files={"audio": ("test_audio.wav", wav.read_bytes(), "audio/wav")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert "lipsync.mp4" in r.headers["content-disposition"]
    for stage in ("audio", "precompute", "motion", "render", "encode", "total"):
        assert f"{stage};dur=" in r.headers["server-timing"]
    check_video(r.content, float(r.headers["x-audio-seconds"]))
    assert abs(float(r.headers["x-audio-seconds"]) - 3.0) < 0.1


def test_generate_with_curl_form_upload(live_server: LiveServer, material, tmp_path) -> None:
    need(shutil.which("curl"), "curl is not installed (.ci/run installs it)")
    wav = material.path("speech/speech_3s.wav")
    out = tmp_path / "test_output.mp4"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            str(out),
            "-w",
            "%{http_code}",
            "--max-time",
            "120",
            "-F",
            f"audio=@{wav}",
            f"{live_server.url}/generate",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "200"
    check_video(out.read_bytes(), 3.0)


def test_classic_server_never_loads_torch(live_server: LiveServer) -> None:
    maps = Path(f"/proc/{live_server.proc.pid}/maps")
    need(maps, "needs Linux /proc to see the server's loaded libraries")
    assert httpx.get(f"{live_server.url}/health").status_code == 200
    assert "libtorch" not in maps.read_text()
