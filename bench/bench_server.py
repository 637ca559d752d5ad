"""HTTP server benchmark: time to first byte of a streamed clip, throughput at 1/2/4 clients, RSS.

    PYTHONPATH=src .venv/bin/python bench/bench_server.py            # classic engine, defaults
    PYTHONPATH=src .venv/bin/python bench/bench_server.py --clients 1 2 4 --requests 6 --workers 2

Starts ``python -m lipsync.server`` on a free port with its own cache directory, waits for
/health, then measures over real HTTP and prints a markdown table (and --json for the raw numbers).
The server's resident memory is sampled (psutil, every 50 ms) while each load level runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
from typing_extensions import Self

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPSYNC_SHARED", REPO.parent / "shared")) / "assets"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / float(w.getframerate())


def speech(name: str, fallback_seconds: float) -> bytes:
    """A shared speech clip, or a synthetic one of similar length if ../shared is absent."""
    path = SHARED / "speech" / name
    if path.exists():
        return path.read_bytes()
    import numpy as np

    sr = 16_000
    t = np.arange(int(fallback_seconds * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * 160 * t) * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


class Server:
    def __init__(self, engine: str, workers: int, queue_size: int, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
                "LIPSYNC_PORT": str(self.port),
                "LIPSYNC_HOST": "127.0.0.1",
                "LIPSYNC_ENGINE": engine,
                "LIPSYNC_WORKERS": str(workers),
                "LIPSYNC_QUEUE_SIZE": str(queue_size),
                "LIPSYNC_CACHE_DIR": str(workdir / "cache"),
            }
        )
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync.server"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("server not ready in time")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class RssSampler:
    def __init__(self, server: Server, period_s: float = 0.05) -> None:
        self.server = server
        self.period_s = period_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mb())
            self._stop.wait(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Ttfb:
    clip_s: float
    runs: int
    ttfb_median_s: float
    ttfb_min_s: float
    total_median_s: float
    nonstream_total_median_s: float


def measure_ttfb(server: Server, audio: bytes, runs: int) -> Ttfb:
    firsts, totals, plain = [], [], []
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for _ in range(runs):
            t0 = time.perf_counter()
            with client.stream(
                "POST", "/generate", files={"audio": ("a.wav", audio)}, data={"stream": "true"}
            ) as r:
                r.raise_for_status()
                it = r.iter_raw()
                next(it)
                firsts.append(time.perf_counter() - t0)
                for _ in it:
                    pass
            totals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.post("/generate", files={"audio": ("a.wav", audio)}).raise_for_status()
            plain.append(time.perf_counter() - t0)
    return Ttfb(
        clip_s=round(wav_seconds(audio), 2),
        runs=runs,
        ttfb_median_s=statistics.median(firsts),
        ttfb_min_s=min(firsts),
        total_median_s=statistics.median(totals),
        nonstream_total_median_s=statistics.median(plain),
    )


@dataclass
class Load:
    clients: int
    requests: int
    ok: int
    busy: int
    wall_s: float
    requests_per_min: float
    audio_s_per_wall_s: float
    latency_p50_s: float
    latency_max_s: float
    rss_peak_mb: float


def measure_load(server: Server, audio: bytes, clients: int, per_client: int) -> Load:
    seconds = wav_seconds(audio)
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = client.post("/generate", files={"audio": ("a.wav", audio)})
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    with RssSampler(server) as rss:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    ok = statuses.count(200)
    return Load(
        clients=clients,
        requests=len(statuses),
        ok=ok,
        busy=statuses.count(503),
        wall_s=wall,
        requests_per_min=60 * ok / wall,
        audio_s_per_wall_s=ok * seconds / wall,
        latency_p50_s=statistics.median(latencies) if latencies else float("nan"),
        latency_max_s=max(latencies) if latencies else float("nan"),
        rss_peak_mb=rss.peak,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="classic")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=6, help="requests per client per load level")
    ap.add_argument("--workers", type=int, default=2, help="LIPSYNC_WORKERS of the server")
    ap.add_argument("--queue-size", type=int, default=8, help="LIPSYNC_QUEUE_SIZE of the server")
    ap.add_argument("--ttfb-runs", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    ttfb_audio = speech("en_espeak.wav", 10.0)
    load_audio = speech("en_librivox_0880.wav", 3.0)
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        server = Server(args.engine, args.workers, args.queue_size, Path(tmp))
        try:
            ready_s = server.wait_ready()
            idle_rss = server.rss_mb()
            ttfb = measure_ttfb(server, ttfb_audio, args.ttfb_runs)
            loads = [measure_load(server, load_audio, c, args.requests) for c in args.clients]
            stats = httpx.get(f"{server.url}/stats", timeout=30).json()
        finally:
            server.stop()

    cpu = f"{psutil.cpu_count(logical=True)} CPU, {platform.processor() or platform.machine()}"
    print(
        f"\nlipsync-server benchmark: engine={args.engine}, workers={args.workers}, "
        f"queue_size={args.queue_size}, {cpu}; ready after {ready_s:.1f} s; idle RSS {idle_rss:.0f} MiB\n"
    )
    print("| streamed clip | TTFB median | TTFB min | stream total | non-streamed total |")
    print("|---|---|---|---|---|")
    print(
        f"| {ttfb.clip_s:.1f} s | {ttfb.ttfb_median_s:.3f} s | {ttfb.ttfb_min_s:.3f} s | "
        f"{ttfb.total_median_s:.2f} s | {ttfb.nonstream_total_median_s:.2f} s |"
    )
    print(
        "\n| clients | requests (3.0 s clip) | 200 / 503 | requests/min | audio s per wall s | "
        "latency p50 | latency max | server RSS peak |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for load in loads:
        print(
            f"| {load.clients} | {load.requests} | {load.ok} / {load.busy} | {load.requests_per_min:.1f} | "
            f"{load.audio_s_per_wall_s:.2f} | {load.latency_p50_s:.2f} s | {load.latency_max_s:.2f} s | "
            f"{load.rss_peak_mb:.0f} MiB |"
        )
    stages = stats["stages"]
    print(
        "\nper-stage mean over the run (s): "
        + ", ".join(f"{k} {v['mean']:.3f}" for k, v in stages.items() if v["count"])
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ttfb": asdict(ttfb),
                    "loads": [asdict(x) for x in loads],
                    "ready_s": ready_s,
                    "idle_rss_mb": idle_rss,
                    "stages": stages,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
