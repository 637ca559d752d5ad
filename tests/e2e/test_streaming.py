"""stream=true: fragmented MP4 that arrives while later chunks are still rendering."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx

from tests.e2e.conftest import LiveServer, mp4_facts, wav_bytes
from tests.waiting import wait_for

SLOW = {"LIPSYNC_ENGINE": "fake", "LIPSYNC_FAKE_CHUNK_DELAY_S": "0.5", "LIPSYNC_CHUNK_SECONDS": "1.0"}


def test_stream_decodes_to_every_frame(live_server: LiveServer, material) -> None:
    wav = material.path("speech/speech_7s.wav")
    arrivals: list[float] = []
    parts: list[bytes] = []
    with live_server.client() as client:
        t0 = time.monotonic()
        with client.stream(
            "POST", "/generate", files={"audio": ("a.wav", wav.read_bytes())}, data={"stream": "true"}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "video/mp4"
            for part in r.iter_raw():
                arrivals.append(time.monotonic() - t0)
                parts.append(part)
    data = b"".join(parts)
    facts = mp4_facts(data)
    assert "moof" in facts.top_boxes, "expected a fragmented MP4"
    assert facts.video_codec == "h264" and (facts.width, facts.height) == (512, 512)
    assert facts.audio_codec == "aac"
    assert abs(facts.frames - 7.1 * 25) <= 1.5, facts.frames
    assert len(arrivals) > 1 and arrivals[0] < arrivals[-1]


def test_first_bytes_arrive_while_later_chunks_still_render(server_factory, tmp_path) -> None:
    hold = tmp_path / "hold"  # while it exists, the last chunk (index 3) waits
    server = server_factory(engine="fake", env={**SLOW, "LIPSYNC_FAKE_HOLD": str(hold),
                                                 "LIPSYNC_FAKE_HOLD_FROM_CHUNK": "3"})
    audio = wav_bytes(4.0)  # four 1 s chunks
    videos_before = server.stats()["generated"]["videos"]
    hold.touch()
    with server.client() as client, client.stream(
        "POST", "/generate", files={"audio": ("a.wav", audio)}, params={"stream": "true"}
    ) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        # The last chunk cannot render while held, so these bytes were sent while the job was
        # still running (a server that buffered the whole video would never send them).
        first = next(chunks)
        stats = server.stats()
        assert stats["queue"]["in_flight"] == 1
        assert stats["generated"]["videos"] == videos_before
        hold.unlink()
        rest = b"".join(chunks)
    assert mp4_facts(first + rest).frames == 100
    wait_for(lambda: server.stats()["generated"]["videos"] == videos_before + 1)


def _send_and_hang_up(server: LiveServer, path: str, audio: bytes, *, wait_for_bytes: bool) -> None:
    """Upload, optionally read the first bytes, then close the socket mid-job."""
    u = urlparse(server.url)
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        if wait_for_bytes:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        wait_for(lambda: server.stats()["queue"]["in_flight"] == 1)


def test_client_disconnect_stops_the_render(server_factory) -> None:
    server = server_factory(engine="fake", env=SLOW)
    audio = wav_bytes(60.0)  # 60 chunks x 0.5 s = 30 s of render if nobody stopped it
    # Streamed: the client hangs up after the first fragment.
    _send_and_hang_up(server, "/generate?stream=true", audio, wait_for_bytes=True)
    wait_for(lambda: server.stats()["queue"]["in_flight"] == 0)
    # Not streamed: the client gives up while the job runs.
    _send_and_hang_up(server, "/generate", audio, wait_for_bytes=False)
    wait_for(lambda: server.stats()["queue"]["in_flight"] == 0)
    stats = server.stats()
    assert stats["requests"]["by_endpoint"]["POST /generate"]["failed"] == {"client_disconnected": 2}
    assert stats["generated"]["videos"] == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
