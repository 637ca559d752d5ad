"""Behaviour under load and at the edges: bounded queue, time limit, body limit, graceful shutdown."""

from __future__ import annotations

import json
import signal
import socket
import threading
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.conftest import LiveServer, mp4_facts, wav_bytes
from tests.waiting import wait_for

# The test engine sleeps per chunk, so a job takes a known while without using CPU.
SLOW_ENGINE = {"LIPSYNC_ENGINE": "fake", "LIPSYNC_FAKE_CHUNK_DELAY_S": "0.5", "LIPSYNC_CHUNK_SECONDS": "1.0"}


def _generate_counts(server: LiveServer) -> dict:
    return server.stats()["requests"]["by_endpoint"].get("POST /generate", {"served": 0, "failed": {}})


def test_more_clients_than_workers_get_200_or_503(server_factory, tmp_path) -> None:
    hold = tmp_path / "hold"  # while it exists, every render waits
    server = server_factory(
        engine="fake",
        env={**SLOW_ENGINE, "LIPSYNC_WORKERS": "1", "LIPSYNC_QUEUE_SIZE": "1", "LIPSYNC_FAKE_HOLD": str(hold)},
    )
    hold.touch()  # the server is ready: its warm-up render is done
    clients = 6
    audio = wav_bytes(2.0)
    barrier = threading.Barrier(clients)
    responses: list[httpx.Response | BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        with server.client() as c:
            barrier.wait()
            try:
                r = c.post("/generate", files={"audio": ("a.wav", audio)})
            except BaseException as e:  # noqa: BLE001 - a lost request is a failure, kept for the assert
                r = e
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    # The first job holds the only worker and the second fills the one queue slot:
    # the other four are answered at once, however the machine staggers their arrival.
    wait_for(lambda: len(responses) == clients - 2, what="four answers while two jobs are held")
    with lock:
        early = list(responses)
    assert all(isinstance(r, httpx.Response) and r.status_code == 503 for r in early), early
    hold.unlink()
    for t in threads:
        t.join(120)
    assert len(responses) == clients, "a request got lost"
    assert all(isinstance(r, httpx.Response) for r in responses), responses
    statuses = sorted(r.status_code for r in responses)  # type: ignore[union-attr]
    assert set(statuses) <= {200, 503}, statuses
    ok = [r for r in responses if r.status_code == 200]  # type: ignore[union-attr]
    busy = [r for r in responses if r.status_code == 503]  # type: ignore[union-attr]
    assert (len(ok), len(busy)) == (2, 4), "one running, one queued, four refused"
    for r in busy:
        assert r.json()["code"] == "busy"
        assert int(r.headers["retry-after"]) >= 1
    for r in ok:
        assert mp4_facts(r.content).frames == 50

    counts = _generate_counts(server)
    assert counts["served"] == len(ok)
    assert counts["failed"] == {"busy": len(busy)}
    assert counts["served"] + sum(counts["failed"].values()) == clients
    stats = server.stats()
    assert stats["generated"]["videos"] == len(ok)
    assert (stats["queue"]["in_flight"], stats["queue"]["depth"]) == (0, 0)
    assert stats["stages"]["render"]["count"] == len(ok)


def test_request_time_limit(server_factory) -> None:
    # The limit (3 s) is far from both sides: the long jobs sleep 10 s in the engine whatever the
    # load, the short one 0.5 s, leaving 2.5 s for decoding and encoding on a busy machine.
    server = server_factory(engine="fake", env={**SLOW_ENGINE, "LIPSYNC_REQUEST_TIMEOUT_S": "3"})
    with server.client() as c:
        r = c.post("/generate", files={"audio": ("a.wav", wav_bytes(20.0))})  # 10 s of render
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        wait_for(lambda: server.stats()["queue"]["in_flight"] == 0, what="the timed-out job stopping")

        # Streamed: the limit strikes after the headers went out, so the only honest signal is
        # a body that never completes (no terminating chunk), never a truncated "valid" video.
        with c.stream(
            "POST", "/generate", files={"audio": ("a.wav", wav_bytes(20.0))}, data={"stream": "true"}
        ) as s:
            assert s.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in s.iter_raw():
                    pass
        wait_for(lambda: server.stats()["queue"]["in_flight"] == 0, what="the timed-out stream stopping")

        assert c.post("/generate", files={"audio": ("a.wav", wav_bytes(1.0))}).status_code == 200
    assert _generate_counts(server) == {"served": 1, "failed": {"timeout": 2}}


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            break
        rest += part
    return status, headers, rest[:length]


def test_body_limit_answers_before_the_body_is_read(server_factory) -> None:
    # The bundled default portrait (415 kB) must still fit: the pipeline applies the limit to it too.
    limit = 600_000
    server = server_factory(engine="fake", env={"LIPSYNC_MAX_UPLOAD_BYTES": str(limit)})
    u = urlparse(server.url)
    boundary = "lim1t"
    part_head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
    ).encode()

    # Declared length far over the limit; only a sliver of the body is ever sent.
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(
            (
                "POST /generate HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {50 * limit}\r\n\r\n"
            ).encode()
            + part_head
            + b"\0" * 1000
        )
        status, headers, body = _read_response(sock)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["code"] == "payload_too_large"

    # Chunked body with no declared length: refused once the count passes the limit.
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(
            (
                "POST /generate HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = part_head + b"\0" * 32_000
        sent = 0
        try:
            while sent < 3 * limit:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                chunk = b"\0" * 32_000
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before we finish: that is the point
        status, headers, body = _read_response(sock)
    assert status == 413
    assert json.loads(body)["code"] == "payload_too_large"

    # Under the limit still works, and the refusals were counted.
    with server.client() as c:
        assert c.post("/generate", files={"audio": ("a.wav", wav_bytes(1.0))}).status_code == 200
    assert _generate_counts(server) == {"served": 1, "failed": {"payload_too_large": 2}}


def test_graceful_shutdown_finishes_the_running_request(server_factory) -> None:
    server = server_factory(engine="fake", env={**SLOW_ENGINE, "LIPSYNC_GRACEFUL_SHUTDOWN_S": "30"})
    result: dict[str, object] = {}

    def long_request() -> None:
        with server.client() as c:
            try:
                result["response"] = c.post("/generate", files={"audio": ("a.wav", wav_bytes(4.0))})
            except BaseException as e:  # noqa: BLE001
                result["response"] = e

    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: server.stats()["queue"]["in_flight"] == 1, what="the long job running")
    server.proc.send_signal(signal.SIGTERM)

    def draining() -> bool:
        try:
            return httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "shutting_down"
        except httpx.TransportError:
            return True  # the listening socket is already closed

    wait_for(draining, what="the server to start shutting down")
    # New work is refused: either 503 shutting_down or the listening socket is already closed.
    try:
        r = httpx.post(f"{server.url}/generate", files={"audio": ("a.wav", wav_bytes(0.5))}, timeout=10)
        assert r.status_code == 503 and r.json()["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    t.join(60)
    response = result["response"]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert mp4_facts(response.content).frames == 100
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


def test_failed_startup_exits_with_a_one_line_error(server_factory) -> None:
    server = server_factory(engine="no-such-engine", wait_ready=False)
    assert server.proc.wait(120) == 2  # a configuration error (README: exit status 2)
    log = server.log()
    assert "error: unknown engine 'no-such-engine'" in log
    assert "Traceback" not in log
