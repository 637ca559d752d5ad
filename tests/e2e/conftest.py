"""End-to-end fixtures: a real ``uvicorn`` server process on 127.0.0.1:<free port>.

The server runs ``python -m tests.e2e.launch`` (the product's ``python -m lipsync.server`` plus the
test engine registered), with its own cache directory and settings from the environment.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = float(os.environ.get("LIPSYNC_E2E_READY_TIMEOUT", "240"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    cache_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120.0), **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/stats", timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_server(
    workdir: Path, *, engine: str = "classic", env: dict[str, str] | None = None, wait_ready: bool = True
) -> LiveServer:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = workdir / "cache"
    log_path = workdir / f"server-{port}.log"
    # A developer's own LIPSYNC_* settings (default avatar, cache) must not leak into the test server.
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_") or k == "LIPSYNC_SHARED"}
    full_env = {
        **base,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "PYTHONUNBUFFERED": "1",
        "LIPSYNC_HOST": "127.0.0.1",
        "LIPSYNC_PORT": str(port),
        "LIPSYNC_CACHE_DIR": str(cache_dir),
        "LIPSYNC_ENGINE": engine,
        **(env or {}),
    }
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.launch"],
        cwd=REPO,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    server = LiveServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        proc=proc,
        log_path=log_path,
        cache_dir=cache_dir,
        env=full_env,
    )
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: LiveServer, timeout: float = READY_TIMEOUT_S) -> dict:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            pytest.fail(
                f"server exited with {server.proc.returncode} before it was ready:\n{server.log()[-4000:]}"
            )
        try:
            r = httpx.get(f"{server.url}/health", timeout=5)
            last = r
            if r.status_code == 200:
                return r.json()
            if r.json().get("status") == "failed":
                server.stop()
                pytest.fail(f"server start-up failed: {r.json().get('error')}\n{server.log()[-4000:]}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(
        f"server not ready after {timeout:.0f} s (last: {last and last.text}):\n{server.log()[-4000:]}"
    )


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    """The product as shipped: classic engine, default settings, its own cache."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    server.stop()
    assert_clean_log(server)


@pytest.fixture
def server_factory(tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """Servers with special settings (slow fake engine, tiny limits); stopped after the test."""
    servers: list[LiveServer] = []

    def make(**kw) -> LiveServer:
        server = start_server(tmp_path / f"s{len(servers)}", **kw)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()
    for s in servers:
        assert_clean_log(s)


def assert_clean_log(server: LiveServer) -> None:
    """No request may have ended in an unhandled exception (they are logged with a traceback)."""
    log = server.log()
    assert "Traceback" not in log, f"server log of {server.url} has a traceback:\n{log[-4000:]}"


def wav_bytes(seconds: float, sample_rate: int = 16_000) -> bytes:
    """Speech-like test audio: a tone with a syllable-rate envelope and pauses."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.4 * np.sin(2 * np.pi * 180 * t) * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@dataclass(frozen=True)
class Mp4Facts:
    brands: bytes
    top_boxes: tuple[str, ...]
    video_codec: str
    width: int
    height: int
    fps: float
    frames: int
    audio_codec: str | None
    duration_s: float


def mp4_facts(data: bytes) -> Mp4Facts:
    """Container facts of an MP4 (top-level boxes, codecs, decoded frame count) via PyAV."""
    import av

    boxes = []
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        boxes.append(kind)
        if size < 8:
            break
        pos += size
    with av.open(io.BytesIO(data)) as container:
        v = container.streams.video[0]
        a = container.streams.audio[0] if container.streams.audio else None
        frames = sum(1 for _ in container.decode(video=0))
        duration = float(container.duration or 0) / 1e6
        return Mp4Facts(
            brands=data[8:12],
            top_boxes=tuple(boxes),
            video_codec=v.codec_context.name,
            width=v.codec_context.width,
            height=v.codec_context.height,
            fps=float(v.average_rate or v.guessed_rate or 0),
            frames=frames,
            audio_codec=a.codec_context.name if a is not None else None,
            duration_s=duration,
        )
