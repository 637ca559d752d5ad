"""The Ray Serve deployment under the conditions an operator meets: failed start-up, a replica
killed under load, scaling 1 -> 2 under load, clients hanging up, oversized chunked uploads.

One local Ray instance for the module (4 logical CPUs on whatever the machine has), Serve's proxy
on a free loopback port with the product's proxy middleware, the fast test engine with a small
per-chunk delay so jobs last long enough to be interrupted. Every load is a bounded number of
requests; every wait is bounded.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, wav_bytes

if os.environ.get("CI"):
    from ray import serve  # in CI ray[serve] is installed: a missing one must fail, not skip
else:
    serve = pytest.importorskip(
        "ray.serve", reason="ray[serve] is not installed (optional extra lipsync-server[ray])"
    )

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 2 * 1024 * 1024  # LIPSYNC_MAX_UPLOAD_BYTES for this cluster (proxy and replicas)
CHUNK_DELAY_S = 0.15  # per 0.5 s audio chunk in the fake engine
FAKE = {"fake": "tests.e2e.fake_engine:FakeEngine"}
DEPLOY_TIMEOUT_S = 300


@dataclass
class RayServe:
    url: str
    tmp: Path
    apps: list[str] = field(default_factory=list)

    def deploy(self, name: str, *, delay_s: float = CHUNK_DELAY_S, **knobs):
        from lipsync.server.ray_serve import build_app
        from lipsync.settings import Settings

        settings = Settings(engine="fake", cache_dir=self.tmp / f"cache-{name}", chunk_seconds=0.5)
        app = build_app(
            settings,
            engines=FAKE,
            runtime_env={"env_vars": {"LIPSYNC_FAKE_CHUNK_DELAY_S": str(delay_s)}},
            app_name=name,
            num_cpus=0.5,
            **knobs,
        )
        if name not in self.apps:
            self.apps.append(name)
        return serve.run(app, name=name, route_prefix=f"/{name}")

    def replica_states(self, name: str) -> dict:
        return dict(serve.status().applications[name].deployments[name].replica_states)

    def cluster_stats(self, name: str) -> dict:
        r = httpx.get(f"{self.url}/{name}/stats", timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory) -> Iterator[RayServe]:
    import ray

    from lipsync.server.ray_cluster import kill_cluster_actor
    from lipsync.server.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    tmp = tmp_path_factory.mktemp("ray")
    # The proxy and replicas are Ray worker processes: they inherit this environment at ray.init.
    env = {
        PROXY_CALLBACK_ENV: PROXY_CALLBACK,
        "LIPSYNC_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "LIPSYNC_RAY_STORE_DIR": str(tmp / "store"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        namespace="lipsync-e2e",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        yield RayServe(url=f"http://127.0.0.1:{port}", tmp=tmp)
    finally:
        try:
            serve.shutdown()
            kill_cluster_actor()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------------------------- load
@dataclass
class Outcome:
    status: int
    code: str | None
    t: float


def _post_generate(client: httpx.Client, url: str, audio: bytes) -> Outcome:
    try:
        r = client.post(url, files={"audio": ("a.wav", audio, "audio/wav")})
    except httpx.HTTPError as exc:
        return Outcome(0, type(exc).__name__, time.monotonic())
    code = None
    if r.status_code != 200:
        code = r.headers.get("x-error-code") or f"http_{r.status_code}"
    else:
        assert r.headers["content-type"] == "video/mp4" and len(r.content) > 1000
    return Outcome(r.status_code, code, time.monotonic())


class Load:
    """``clients`` threads posting ``total`` requests between them, one at a time each."""

    def __init__(self, url: str, *, clients: int, total: int, seconds: float = 1.0) -> None:
        self.url = url
        self.audio = wav_bytes(seconds)
        self.total = total
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._issued = 0
        self.done_count = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _take(self) -> bool:
        with self._lock:
            if self._issued >= self.total:
                return False
            self._issued += 1
            return True

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while self._take():
                outcome = _post_generate(client, self.url, self.audio)
                with self._lock:
                    self.outcomes.append(outcome)
                self.done_count.release()

    def stop(self) -> None:
        """Issue no more requests (those under way finish)."""
        with self._lock:
            self.total = self._issued

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def wait_done(self, n: int, timeout: float = 300) -> None:
        """Block until ``n`` more requests have finished."""
        end = time.monotonic() + timeout
        for _ in range(n):
            assert self.done_count.acquire(timeout=max(0.1, end - time.monotonic())), "load stalled"

    def join(self, timeout: float = 400) -> list[Outcome]:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
            assert not t.is_alive(), "load did not finish in time"
        return self.outcomes


def _codes(outcomes: list[Outcome]) -> Counter:
    return Counter(o.code or "ok" for o in outcomes)


def _wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(every)


# ---------------------------------------------------------------------------------- tests
def test_failed_startup_shows_unhealthy_and_takes_no_traffic(ray_serve: RayServe) -> None:
    from lipsync.server.ray_serve import build_app
    from lipsync.settings import Settings

    broken = Settings(engine="sadtalker", checkpoints=ray_serve.tmp / "no-checkpoints", cache_dir=ray_serve.tmp / "c")
    with pytest.raises(RuntimeError) as failed:
        serve.run(build_app(broken, app_name="broken", num_cpus=0.25), name="broken", route_prefix="/broken")
    status = serve.status().applications["broken"]
    assert status.status in ("DEPLOY_FAILED", "UNHEALTHY"), status
    deployment = status.deployments["broken"]
    assert deployment.status in ("DEPLOY_FAILED", "UNHEALTHY")
    assert "checkpoint" in (deployment.message + str(failed.value)).lower()
    # No replica is up, so the proxy answers for it: JSON, not a replica's 503 per request.
    r = httpx.post(f"{ray_serve.url}/broken/generate", files={"audio": ("a.wav", wav_bytes(0.5))}, timeout=60)
    assert r.status_code == 503 and r.json()["code"] in ("not_ready", "replica_unavailable")
    serve.delete("broken")


def test_kill_one_of_two_replicas_under_load(ray_serve: RayServe) -> None:
    ray_serve.deploy("kill", num_replicas=2, max_ongoing_requests=2, max_queued_requests=32)
    stats = ray_serve.cluster_stats("kill")
    assert stats["cluster"]["live_replicas"] == 2, stats["cluster"]
    victim = next(iter(stats["cluster"]["replicas"].values()))["pid"]
    load = Load(f"{ray_serve.url}/kill/generate", clients=3, total=36).start()
    load.wait_done(6)
    os.kill(victim, signal.SIGKILL)
    outcomes = load.join()
    codes = _codes(outcomes)
    print(f"kill one of two replicas under load: {dict(codes)}")
    assert codes["not_ready"] == 0 and codes["busy"] == 0, codes
    # Only the requests in flight on the killed replica (at most max_ongoing_requests) may fail.
    failed = {k: v for k, v in codes.items() if k != "ok"}
    assert set(failed) <= {"replica_unavailable"} and sum(failed.values()) <= 2, codes
    # Serve replaces it; the replacement took no traffic before it was warm (no not_ready above).
    _wait_for(lambda: ray_serve.replica_states("kill") == {"RUNNING": 2}, DEPLOY_TIMEOUT_S, "a replacement replica")
    again = Load(f"{ray_serve.url}/kill/generate", clients=2, total=6).start().join()
    assert _codes(again) == Counter({"ok": 6})
    serve.delete("kill")


def test_scale_one_to_two_under_load(ray_serve: RayServe) -> None:
    ray_serve.deploy("scale", num_replicas=1, max_ongoing_requests=2, max_queued_requests=32)
    load = Load(f"{ray_serve.url}/scale/generate", clients=3, total=400).start()
    load.wait_done(4)
    ray_serve.deploy("scale", num_replicas=2, max_ongoing_requests=2, max_queued_requests=32)

    def both_serving():
        replicas = ray_serve.cluster_stats("scale")["cluster"]["replicas"].values()
        served = [r["requests"]["served"] for r in replicas]
        return len(served) == 2 and min(served) >= 3

    try:
        _wait_for(both_serving, DEPLOY_TIMEOUT_S, "the new replica to take traffic", every=1.0)
    finally:
        load.stop()
    outcomes = load.join()
    assert len(outcomes) < 400 and _codes(outcomes) == Counter({"ok": len(outcomes)}), _codes(outcomes)
    # Cluster-wide counters add up to what the clients saw.
    _wait_for(
        lambda: ray_serve.cluster_stats("scale")["requests"]["served"] == len(outcomes), 30, "summed counters"
    )
    serve.delete("scale")


def test_client_hanging_up_is_client_closed_and_frees_its_slot_only_when_stopped(ray_serve: RayServe) -> None:
    # 0.6 s per chunk: an abandoned job takes up to that long to notice and stop.
    ray_serve.deploy("cancel", delay_s=0.6, num_replicas=1, max_ongoing_requests=1, max_queued_requests=8)
    url = f"{ray_serve.url}/cancel/generate"
    long_audio = wav_bytes(8.0)  # 16 chunks x 0.6 s: still rendering when the client leaves
    with httpx.Client(timeout=httpx.Timeout(60, read=1.5)) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(url, files={"audio": ("a.wav", long_audio)})
    # Straight after: the abandoned job is still stopping; these wait for it, never "busy".
    with httpx.Client(timeout=120) as client:
        after = [_post_generate(client, url, wav_bytes(0.5)) for _ in range(3)]
    assert _codes(after) == Counter({"ok": 3}), _codes(after)

    def closed():
        reasons = ray_serve.cluster_stats("cancel")["requests"]["failed_by_reason"]
        return reasons if reasons.get("client_closed") else None

    try:
        reasons = _wait_for(closed, 30, "client_closed in /stats")
    except AssertionError:
        print(ray_serve.cluster_stats("cancel")["requests"])
        raise
    assert reasons == {"client_closed": 1}, reasons
    serve.delete("cancel")


def _proc_rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def _proxy_pid() -> int:
    """The pid of this cluster's (one-node) Serve proxy actor."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    proxy = ray.get_actor(f"SERVE_PROXY_ACTOR-{node}", namespace="serve")
    return int(ray.get(proxy.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))


def _chunked_upload(port: int, path: str, total: int, chunk: int = 256 * 1024) -> tuple[int, int, bytes]:
    """POST a chunked multipart body of ``total`` bytes; stop sending once the server answers.

    Returns (status, bytes sent, response head).
    """
    boundary = "lipsyncboundary"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        payload = part + b"\0" * (chunk - len(part))
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(b"%x\r\n" % len(payload) + payload + b"\r\n")
                sent += len(payload)
                payload = b"\0" * chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(60)
        response = b""
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
            # the JSON body is small and follows the head
            sock.settimeout(2)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (TimeoutError, ConnectionResetError, OSError):
            pass
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1") else 0
    return status, sent, response


def test_oversized_chunked_uploads_get_413_with_flat_memory(ray_serve: RayServe) -> None:
    ray_serve.deploy("upload", num_replicas=1)
    port = int(ray_serve.url.rsplit(":", 1)[1])
    replica_pid = next(iter(ray_serve.cluster_stats("upload")["cluster"]["replicas"].values()))["pid"]
    proxy_pid = _proxy_pid()
    # One first upload warms both processes' buffers; then measure ten more.
    assert _chunked_upload(port, "/upload/generate", 40 * UPLOAD_LIMIT)[0] == 413
    before = (_proc_rss(proxy_pid), _proc_rss(replica_pid))
    results = [_chunked_upload(port, "/upload/generate", 40 * UPLOAD_LIMIT) for _ in range(10)]
    after = (_proc_rss(proxy_pid), _proc_rss(replica_pid))
    for status, sent, response in results:
        assert status == 413, response[:300]
        assert b'"payload_too_large"' in response
        # Refused near the limit (plus what the kernel's socket buffers took), not at 80 MB.
        assert sent < UPLOAD_LIMIT + 16 * 1024 * 1024, sent
    growth_mb = [(a - b) / 2**20 for a, b in zip(after, before, strict=True)]
    print(f"RSS proxy {before[0] / 2**20:.0f} -> {after[0] / 2**20:.0f} MB, "
          f"replica {before[1] / 2**20:.0f} -> {after[1] / 2**20:.0f} MB, sent {[r[1] for r in results]}")
    assert max(growth_mb) < 40, growth_mb  # ten uploads of 80 MB each: flat, not +400 MB
    # The replica counted them as what they are.
    reasons = _wait_for(
        lambda: ray_serve.cluster_stats("upload")["requests"]["failed_by_reason"].get("payload_too_large", 0) >= 11
        and ray_serve.cluster_stats("upload")["requests"]["failed_by_reason"],
        30,
        "payload_too_large counted",
    )
    assert "http_500" not in reasons and "internal_error" not in reasons, reasons
    # A small upload on the same deployment still works, plain and streamed through the proxy.
    ok = httpx.post(f"{ray_serve.url}/upload/generate", files={"audio": ("a.wav", wav_bytes(0.5))}, timeout=120)
    assert ok.status_code == 200
    streamed = httpx.post(
        f"{ray_serve.url}/upload/generate?stream=true", files={"audio": ("a.wav", wav_bytes(2.0))}, timeout=120
    )
    assert streamed.status_code == 200 and streamed.content[4:8] == b"ftyp" and b"moof" in streamed.content
    serve.delete("upload")
