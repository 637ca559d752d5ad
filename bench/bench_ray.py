"""Ray Serve throughput: requests per minute with 1 and 2 replicas, and proxy/replica memory
under oversized chunked uploads.

    PYTHONPATH=src .venv/bin/python bench/bench_ray.py                       # 1 and 2 replicas
    PYTHONPATH=src .venv/bin/python bench/bench_ray.py --replicas 1 2 --clients 4 --requests 24
    PYTHONPATH=src .venv/bin/python bench/bench_ray.py --uploads 10          # + chunked 413 RSS

Starts a local Ray instance (one logical CPU per replica), Serve's proxy on a free loopback port
with the product's proxy middleware, deploys the classic engine (settings from ``LIPSYNC_*``)
with N replicas, warms every replica, then posts ``--requests`` copies of the bundled 10 s speech
clip from ``--clients`` concurrent clients and reports requests per minute (and seconds of
video per wall-clock second), latency p50/p95 and every outcome. Prints a markdown table and,
with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "src" / "lipsync" / "assets" / "speech.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_load(url: str, audio: bytes, clients: int, total: int) -> dict:
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    outcomes: Counter = Counter()

    def worker() -> None:
        nonlocal issued
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if issued >= total:
                        return
                    issued += 1
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/generate", files={"audio": ("speech.wav", audio, "audio/wav")})
                    code = "ok" if r.status_code == 200 else r.headers.get("x-error-code", f"http_{r.status_code}")
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    outcomes[code] += 1
                    if code == "ok":
                        latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = outcomes["ok"]
    lat = sorted(latencies)
    return {
        "requests": total,
        "ok": ok,
        "outcomes": dict(outcomes),
        "wall_s": round(wall, 2),
        "requests_per_min": round(60 * ok / wall, 1),
        "p50_s": round(statistics.median(lat), 2) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2) if lat else None,
    }


def chunked_upload(port: int, path: str, total: int, chunk: int = 256 * 1024) -> tuple[int, int]:
    import select

    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    ).encode()
    part = (
        b'--b\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
    )
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + b"%x\r\n" % len(part) + part + b"\r\n")
        payload = b"\0" * chunk
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n" % len(payload) + payload + b"\r\n")
                sent += len(payload)
        except OSError:
            pass
        sock.settimeout(60)
        response = b""
        try:
            while b"\r\n" not in response:
                data = sock.recv(4096)
                if not data:
                    break
                response += data
        except OSError:
            pass
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1") else 0
    return status, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--audio", type=Path, default=SPEECH)
    ap.add_argument("--uploads", type=int, default=0, help="oversized chunked uploads to measure RSS with")
    ap.add_argument("--upload-mb", type=int, default=200)
    ap.add_argument("--no-proxy-middleware", action="store_true", help="measure Serve's proxy without it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lipsync.server.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    tmp = Path(tempfile.mkdtemp(prefix="lipsync-bench-ray-"))
    if not args.no_proxy_middleware:
        os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    os.environ.setdefault("LIPSYNC_RAY_STORE_DIR", str(tmp / "store"))
    import ray
    from ray import serve

    from lipsync.server.ray_cluster import kill_cluster_actor
    from lipsync.server.ray_serve import build_app
    from lipsync.settings import Settings

    ray.init(
        num_cpus=max(args.replicas),
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}},
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    audio = args.audio.read_bytes()
    import io
    import wave

    try:
        with wave.open(io.BytesIO(audio)) as w:
            audio_s = w.getnframes() / w.getframerate()
    except wave.Error:
        audio_s = float("nan")
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
        for n in args.replicas:
            settings = Settings(cache_dir=tmp / "cache")
            t0 = time.perf_counter()
            serve.run(build_app(settings, num_replicas=n, max_queued_requests=64), name="lipsync", route_prefix="/")
            deploy_s = time.perf_counter() - t0
            run_load(url, audio, clients=n, total=n)  # warm every replica
            row = {"replicas": n, "clients": args.clients, "deploy_s": round(deploy_s, 1)}
            row.update(run_load(url, audio, args.clients, args.requests))
            row["video_s_per_s"] = round(row["ok"] * audio_s / row["wall_s"], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.uploads:
            stats = httpx.get(f"{url}/stats", timeout=60).json()
            replica_pid = next(iter(stats["cluster"]["replicas"].values()))["pid"]
            node = ray.get_runtime_context().get_node_id()
            proxy = ray.get_actor(f"SERVE_PROXY_ACTOR-{node}", namespace="serve")
            proxy_pid = ray.get(proxy.__ray_call__.remote(lambda _s: os.getpid()))
            rss = lambda pid: psutil.Process(pid).memory_info().rss / 2**20
            before = (rss(proxy_pid), rss(replica_pid))
            full_before = {n: psutil.Process(p).memory_full_info() for n, p in (("proxy", proxy_pid), ("replica", replica_pid))}
            results = []
            trace = []
            for _ in range(args.uploads):
                results.append(chunked_upload(port, "/generate", args.upload_mb * 2**20))
                trace.append((round(rss(proxy_pid)), round(rss(replica_pid))))
            print("RSS (proxy, replica) MB after each upload:", trace, file=sys.stderr)
            for name, pid in (("proxy", proxy_pid), ("replica", replica_pid)):
                info = psutil.Process(pid).memory_full_info()
                b = full_before[name]
                print(f"{name}: private (USS) {b.uss / 2**20:.0f} -> {info.uss / 2**20:.0f} MB, shared pages "
                      f"(libraries, Ray object store) {b.shared / 2**20:.0f} -> {info.shared / 2**20:.0f} MB",
                      file=sys.stderr)
            time.sleep(2)
            after = (rss(proxy_pid), rss(replica_pid))
            rows.append({
                "uploads": args.uploads,
                "upload_mb": args.upload_mb,
                "statuses": dict(Counter(s for s, _ in results)),
                "sent_mb_max": round(max(b for _, b in results) / 2**20, 1),
                "proxy_rss_mb": [round(before[0]), round(after[0])],
                "replica_rss_mb": [round(before[1]), round(after[1])],
                "proxy_middleware": not args.no_proxy_middleware,
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        kill_cluster_actor()
        ray.shutdown()

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, classic engine, {args.audio.name} "
          f"({audio_s:.1f} s), {args.clients} clients\n")
    print("| replicas | requests | ok | wall s | requests/min | video s per s | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "replicas" in r:
            print(f"| {r['replicas']} | {r['requests']} | {r['ok']} | {r['wall_s']} | {r['requests_per_min']} | "
                  f"{r['video_s_per_s']} | {r['p50_s']} | {r['p95_s']} |")
    for r in rows:
        if "uploads" in r:
            print(f"\n{r['uploads']} chunked uploads of {r['upload_mb']} MB: {r['statuses']}, at most "
                  f"{r['sent_mb_max']} MB sent; proxy RSS {r['proxy_rss_mb'][0]} -> {r['proxy_rss_mb'][1]} MB, "
                  f"replica RSS {r['replica_rss_mb'][0]} -> {r['replica_rss_mb'][1]} MB")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
