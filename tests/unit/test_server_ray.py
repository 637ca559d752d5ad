"""Ray Serve pieces that need no Ray cluster: knobs, config file, proxy middleware, cluster state."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lipsync.errors import AvatarNotFound, EngineUnavailable
from lipsync.server.ray_cluster import ClusterState, SharedAvatarPipeline, cluster_view, merge_snapshots
from lipsync.server.ray_proxy import ProxyGuardMiddleware
from lipsync.server.ray_serve import (
    OWNER_FILE,
    WORKDIR_PREFIX,
    RayServeOptions,
    build_app,
    deployment_options,
    load_config,
    remove_stale_workdirs,
    replica_deployment,
    replica_settings,
)
from lipsync.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_replica_takes_only_what_ray_sends_it() -> None:
    # One worker; room for what Ray sends plus as many cancelled jobs still winding down.
    s = replica_settings(Settings(workers=4, queue_size=16), max_ongoing_requests=2)
    assert (s.workers, s.queue_size) == (1, 3)
    s = replica_settings(Settings(), max_ongoing_requests=1)
    assert (s.workers, s.queue_size) == (1, 1)
    with pytest.raises(ValueError):
        replica_settings(Settings(), max_ongoing_requests=0)


def test_missing_ray_is_a_clear_error(monkeypatch) -> None:
    # The deployment class may already be cached from an earlier test (CI order): make it so
    # when Ray is here, so the check cannot hide behind the cache.
    if importlib.util.find_spec("ray") is not None:
        replica_deployment()
    # ray hidden whether or not it is installed: a None entry makes "import ray" fail
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(EngineUnavailable, match=r"lipsync-server\[ray\]"):
        build_app(Settings())


# ---------------------------------------------------------------------------------- knobs
def test_knobs_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIPSYNC_RAY_MAX_REPLICAS", "4")
    monkeypatch.setenv("LIPSYNC_RAY_MIN_REPLICAS", "2")
    monkeypatch.setenv("LIPSYNC_RAY_TARGET_ONGOING_REQUESTS", "1.5")
    monkeypatch.setenv("LIPSYNC_RAY_MAX_QUEUED_REQUESTS", "3")
    monkeypatch.setenv("LIPSYNC_RAY_NUM_GPUS", "1")
    opts = deployment_options(RayServeOptions(), Settings(graceful_shutdown_s=12))
    assert opts["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 1.5,
    }
    assert "num_replicas" not in opts
    assert opts["max_queued_requests"] == 3
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert opts["graceful_shutdown_timeout_s"] == 12


def test_fixed_replicas_and_timeout_default() -> None:
    options = RayServeOptions(num_replicas=3)
    opts = deployment_options(options, Settings())
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    # The proxy's end-to-end limit sits above the replica's own request timeout.
    assert options.proxy_timeout_s(Settings(request_timeout_s=60)) == 90
    with pytest.raises(ValueError):
        RayServeOptions(min_replicas=5, max_replicas=2)


def test_only_explicit_settings_are_forced_on_replicas(monkeypatch, tmp_path) -> None:
    from lipsync.server.ray_serve import explicit_overrides

    monkeypatch.setenv("LIPSYNC_CACHE_DIR", str(tmp_path / "driver-cache"))
    monkeypatch.setenv("LIPSYNC_ENGINE", "classic")
    # Read from the driver's environment: left for each node's own environment.
    assert explicit_overrides(Settings()) == {}
    # Given in code / on the command line: forced.
    got = explicit_overrides(Settings(engine="sadtalker", port=7100))
    assert got == {"engine": "sadtalker", "port": 7100}
    assert explicit_overrides(None) == {}


def test_shipped_config_is_valid_and_on_port_7002() -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    from ray.serve.schema import ServeDeploySchema

    raw = load_config(REPO / "deploy" / "serve.yaml", Settings(), RayServeOptions())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.port == 7002
    assert config.http_options.request_timeout_s > Settings().request_timeout_s
    app = config.applications[0]
    assert app.import_path == "lipsync.server.ray_serve:app_builder" and app.route_prefix == "/"
    dep = app.deployments[0]
    assert dep.max_queued_requests > 0 and dep.autoscaling_config["max_replicas"] >= 2
    # Command-line settings reach the replicas through the application args.
    raw = load_config(REPO / "deploy" / "serve.yaml", Settings(engine="sadtalker"), RayServeOptions())
    assert raw["applications"][0]["args"]["settings"] == {"engine": "sadtalker"}
    # Without a file the same schema is built from the knobs.
    built = ServeDeploySchema.model_validate(load_config(None, Settings(port=7100), RayServeOptions(num_replicas=2)))
    assert built.http_options.port == 7100 and built.applications[0].deployments[0].num_replicas == 2


# ---------------------------------------------------------------------------------- clean start
def test_stale_workdirs_of_dead_replicas_are_removed(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{WORKDIR_PREFIX}stale"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(str(dead.pid))
    (stale / "x.part.mp4").write_bytes(b"half")
    alive = tmp_path / f"{WORKDIR_PREFIX}alive"
    alive.mkdir()
    (alive / OWNER_FILE).write_text(str(os.getppid()))
    unowned = tmp_path / f"{WORKDIR_PREFIX}plain"
    unowned.mkdir()
    assert remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and unowned.exists()


# ---------------------------------------------------------------------------------- proxy middleware
def _run_asgi(app, scope: dict, body_chunks: list[bytes], per_chunk_s: float = 0.0):
    """Drive an ASGI app with a chunked body; returns (sent messages, bytes the app pulled)."""
    sent: list[dict] = []
    pulled = {"bytes": 0, "calls": 0}

    async def main():
        chunks = list(body_chunks)

        async def receive():
            pulled["calls"] += 1
            if chunks:
                await asyncio.sleep(per_chunk_s)  # a client sending at a finite rate
                data = chunks.pop(0)
                pulled["bytes"] += len(data)
                return {"type": "http.request", "body": data, "more_body": bool(chunks)}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    asyncio.run(main())
    return sent, pulled


def _scope(headers: dict[str, str] | None = None) -> dict:
    return {
        "type": "http",
        "method": "POST",
        "path": "/generate",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


class _Replica:
    """Stands in for the proxy + replica: reads the whole body, then answers like our app."""

    def __init__(self, limit: int | None = None, status: int = 200, headers=None, answer: bool = True):
        self.limit, self.status, self.headers, self.answer = limit, status, headers or [], answer
        self.seen = 0

    async def __call__(self, scope, receive, send):
        while True:
            m = await receive()
            self.seen += len(m.get("body", b""))
            if not m.get("more_body"):
                break
        if not self.answer:
            return
        status = 413 if self.limit is not None and self.seen > self.limit else self.status
        await send({"type": "http.response.start", "status": status, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


def _status_and_json(sent: list[dict]) -> tuple[int, dict, dict]:
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, (json.loads(body) if headers.get("content-type") == "application/json" else {})


def test_proxy_refuses_declared_oversize_before_reading() -> None:
    inner = _Replica()
    sent, pulled = _run_asgi(
        ProxyGuardMiddleware(inner, max_body_bytes=1000), _scope({"content-length": "5000"}), [b"x" * 5000]
    )
    status, headers, body = _status_and_json(sent)
    assert status == 413 and body["code"] == "payload_too_large" and headers["connection"] == "close"
    assert pulled["calls"] == 0 and inner.seen == 0


def test_proxy_stops_reading_a_chunked_body_at_the_limit() -> None:
    inner = _Replica(limit=1000)
    chunks = [b"x" * 300] * 100  # 30 kB offered, 1 kB allowed
    sent, pulled = _run_asgi(ProxyGuardMiddleware(inner, max_body_bytes=1000), _scope(), chunks)
    status, headers, _body = _status_and_json(sent)
    assert status == 413 and headers["connection"] == "close"
    # Read up to the first chunk past the limit, and not one chunk more.
    assert pulled["bytes"] == 1200 and inner.seen == 1200


def test_proxy_stops_reading_once_the_replica_has_answered() -> None:
    class EagerProxy:
        """Like Serve's proxy: one task pumps the client's body while the replica answers."""

        async def __call__(self, scope, receive, send):
            async def pump():
                while (await receive()).get("more_body"):
                    pass

            task = asyncio.create_task(pump())
            await asyncio.sleep(0.01)
            await send({"type": "http.response.start", "status": 400, "headers": [(b"x-error-code", b"invalid_input")]})
            await send({"type": "http.response.body", "body": b"bad multipart", "more_body": False})
            await asyncio.sleep(0.4)  # the response goes out while the client keeps sending
            task.cancel()

    sent, pulled = _run_asgi(
        ProxyGuardMiddleware(EagerProxy(), max_body_bytes=10**9), _scope(), [b"x" * 1000] * 2000, per_chunk_s=0.001
    )
    assert sent[0]["status"] == 400
    # The pump read freely for ~10 ms before the answer (a few dozen chunks at most); after it,
    # nothing more was read, so the proxy never took in the other ~2 MB.
    assert pulled["bytes"] < 150 * 1000, pulled


def test_proxy_answers_413_even_if_the_replica_limit_is_larger() -> None:
    inner = _Replica(limit=None, status=400, headers=[(b"x-error-code", b"invalid_input")])
    sent, _ = _run_asgi(ProxyGuardMiddleware(inner, max_body_bytes=500), _scope(), [b"y" * 400] * 5)
    status, _, body = _status_and_json(sent)
    assert status == 413 and body["code"] == "payload_too_large"


def test_proxy_passes_small_bodies_and_app_answers() -> None:
    inner = _Replica(limit=1000, headers=[(b"content-type", b"video/mp4")])
    sent, _pulled = _run_asgi(ProxyGuardMiddleware(inner, max_body_bytes=1000), _scope(), [b"z" * 100] * 3)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok" and inner.seen == 300


@pytest.mark.parametrize(
    ("status", "headers", "want_status", "want_code", "retry"),
    [
        (503, [(b"retry-after", b"3")], 503, "busy", "3"),  # Serve: max_queued_requests exceeded
        (503, [], 503, "not_ready", "5"),  # Serve: no replica available
        (408, [], 504, "timeout", None),  # Serve: http_options.request_timeout_s
        (500, [], 503, "replica_unavailable", "1"),
        (404, [], 503, "not_ready", "5"),  # Serve: no application on the path (deleted on shutdown)
    ],
)
def test_proxy_errors_become_api_json(status, headers, want_status, want_code, retry) -> None:
    inner = _Replica(status=status, headers=headers)
    sent, _ = _run_asgi(ProxyGuardMiddleware(inner, max_body_bytes=1000), _scope(), [b"a"])
    got_status, got_headers, body = _status_and_json(sent)
    assert (got_status, body["code"], got_headers.get("retry-after")) == (want_status, want_code, retry)
    assert got_headers["x-error-code"] == want_code


def test_proxy_keeps_the_replicas_own_errors() -> None:
    inner = _Replica(status=503, headers=[(b"x-error-code", b"busy"), (b"retry-after", b"7")])
    sent, _ = _run_asgi(ProxyGuardMiddleware(inner, max_body_bytes=1000), _scope(), [b"a"])
    assert sent[0]["status"] == 503 and sent[1]["body"] == b"ok"


def test_proxy_answers_when_the_replica_died_without_answering() -> None:
    sent, _ = _run_asgi(ProxyGuardMiddleware(_Replica(answer=False), max_body_bytes=1000), _scope(), [b"a"])
    status, headers, body = _status_and_json(sent)
    assert status == 503 and body["code"] == "replica_unavailable" and headers["retry-after"] == "1"


# ---------------------------------------------------------------------------------- cluster stats
def _snap(served: int, failed: dict[str, int], in_flight: int = 0, render: tuple[int, float] = (0, 0.0)) -> dict:
    n, mean = render
    return {
        "uptime_s": 10.0 + served,
        "requests": {
            "served": served,
            "failed": sum(failed.values()),
            "failed_by_reason": dict(failed),
            "by_endpoint": {"POST /generate": {"served": served, "failed": dict(failed)}},
        },
        "stages": {"render": {"count": n, "mean": mean, "p50": mean, "p95": mean * 2}},
        "cache": {"hits": served, "misses": 1, "avatars": 2},
        "generated": {"videos": served, "frames": 25 * served, "audio_seconds": float(served)},
        "queue": {"depth": 0, "in_flight": in_flight, "workers": 1, "capacity": 4, "accepting": True},
    }


def test_merge_sums_counters_and_weights_means() -> None:
    merged = merge_snapshots([_snap(3, {"busy": 1}, 1, (3, 1.0)), _snap(1, {"client_closed": 2}, 0, (1, 3.0))])
    assert merged["requests"]["served"] == 4 and merged["requests"]["failed"] == 3
    assert merged["requests"]["failed_by_reason"] == {"busy": 1, "client_closed": 2}
    assert merged["requests"]["by_endpoint"]["POST /generate"]["failed"] == {"busy": 1, "client_closed": 2}
    assert merged["stages"]["render"]["count"] == 4
    assert merged["stages"]["render"]["mean"] == pytest.approx((3 * 1.0 + 1 * 3.0) / 4)
    assert merged["stages"]["render"]["p95"] == 6.0
    assert merged["queue"]["in_flight"] == 1 and merged["queue"]["workers"] == 2
    assert merged["generated"]["frames"] == 100 and merged["cache"]["avatars"] == 2


def test_cluster_counters_never_go_backwards_when_a_replica_goes(tmp_path) -> None:
    state = ClusterState(str(tmp_path))
    state.report("a", {"node_id": "n1"}, _snap(5, {}))
    state.report("b", {"node_id": "n2"}, _snap(2, {"busy": 1}, in_flight=1))
    before = cluster_view(state.cluster())
    assert before["requests"]["served"] == 7 and before["cluster"]["live_replicas"] == 2
    state.retire("b")
    after = cluster_view(state.cluster())
    assert after["requests"]["served"] == 7 and after["requests"]["failed"] == 1
    assert after["queue"]["in_flight"] == 0 and after["cluster"]["retired_replicas"] == 1


def test_cluster_metrics_label_each_replica(tmp_path) -> None:
    from lipsync.server.ray_ingress import render_cluster_metrics

    state = ClusterState(str(tmp_path))
    state.report("a", {"resident_memory_bytes": 1000}, _snap(5, {}))
    state.report("b", {"resident_memory_bytes": 2000}, _snap(2, {}))
    state.retire("b")
    state.report("c", {"resident_memory_bytes": 3000}, _snap(1, {}))
    text = render_cluster_metrics(state.cluster()).decode()
    assert 'lipsync_requests_total{endpoint="POST /generate",outcome="served",reason="",replica="a"} 5.0' in text
    assert 'replica="retired"} 2.0' in text and 'replica="c"} 1.0' in text
    assert 'lipsync_replica_resident_memory_bytes{replica="c"} 3000.0' in text
    assert 'lipsync_jobs_in_flight{replica="retired"}' not in text  # gauges of gone replicas are dropped


# ---------------------------------------------------------------------------------- avatar store
class _LocalPipeline:
    """The avatar half of a LipSyncPipeline, over a dict standing in for one node's cache."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.builds = 0
        self.cache = SimpleNamespace(
            contains=lambda i: i in self.entries,
            delete=lambda i: self.entries.pop(i, None) is not None,
            source_bytes=lambda i: self.entries[i],
        )

    def add_avatar(self, image: bytes, *, force: bool = False):
        avatar_id = hashlib.sha256(image).hexdigest()
        hit = avatar_id in self.entries
        if not hit:
            self.builds += 1
            self.entries[avatar_id] = image
        return SimpleNamespace(id=avatar_id), hit

    def get_avatar(self, avatar_id: str):
        if avatar_id not in self.entries:
            raise AvatarNotFound("missing", avatar_id=avatar_id)
        return SimpleNamespace(id=avatar_id)

    def delete_avatar(self, avatar_id: str) -> bool:
        return self.entries.pop(avatar_id, None) is not None

    def list_avatars(self):
        return [{"id": i} for i in self.entries]

    def generate(self, audio, output, *, avatar=None, **kw):
        assert not isinstance(avatar, str), "ids must be resolved through the store first"
        return SimpleNamespace(avatar_id=avatar.id)


def test_avatar_uploaded_on_one_node_is_found_and_deleted_from_another(tmp_path) -> None:
    store = ClusterState(str(tmp_path / "store"))
    node_a, node_b = _LocalPipeline(), _LocalPipeline()
    a, b = SharedAvatarPipeline(node_a, store, call=lambda x: x), SharedAvatarPipeline(node_b, store, call=lambda x: x)
    avatar, _ = a.add_avatar(b"portrait bytes")
    from lipsync.types import AvatarId

    assert b.generate(b"audio", "out.mp4", avatar=AvatarId(avatar.id)).avatar_id == avatar.id
    assert node_b.builds == 1  # rebuilt from the store for the generate
    assert b.get_avatar(avatar.id).id == avatar.id and node_b.builds == 1
    assert [i["id"] for i in b.list_avatars()] == [avatar.id]
    assert b.delete_avatar(avatar.id)
    with pytest.raises(AvatarNotFound):
        a.get_avatar(avatar.id)  # node A's local copy is stale: dropped, 404
    assert avatar.id not in node_a.entries
    # The store survives an actor restart (its directory is read back).
    c, _ = b.add_avatar(b"another portrait")
    assert ClusterState(str(tmp_path / "store")).get_avatar(c.id) == b"another portrait"


def test_cluster_view_is_per_application(tmp_path) -> None:
    state = ClusterState(str(tmp_path))
    state.report("a", {"app": "one"}, _snap(5, {}))
    state.report("b", {"app": "two"}, _snap(2, {}))
    state.retire("b")
    assert cluster_view(state.cluster("one"))["requests"]["served"] == 5
    assert cluster_view(state.cluster("two"))["requests"]["served"] == 2
    assert cluster_view(state.cluster())["requests"]["served"] == 7


def test_health_check_fails_when_the_engine_breaks_after_start() -> None:
    from lipsync.server.ray_serve import FAILING_STREAK, engine_failure

    assert engine_failure((10, 0), (10, FAILING_STREAK)) is not None  # only internal errors
    assert engine_failure((10, 0), (11, FAILING_STREAK)) is None  # something still works
    assert engine_failure((10, 0), (10, FAILING_STREAK - 1)) is None  # not a streak yet
    assert engine_failure((10, 2), (25, 2)) is None


def test_avatar_store_keeps_the_most_recently_used(tmp_path) -> None:
    ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    store = ClusterState(str(tmp_path), max_entries=2)
    store.put_avatar(ids[0], b"0")
    store.put_avatar(ids[1], b"1")
    assert store.get_avatar(ids[0]) == b"0"  # used: now the most recent
    store.put_avatar(ids[2], b"2")
    assert store.avatar_ids() == sorted([ids[0], ids[2]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ids[0], ids[2]])


def test_cluster_stats_and_metrics_routes_and_their_fallback(tmp_path) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from lipsync.server.ray_ingress import ClusterMonitoringApp

    state = ClusterState(str(tmp_path))
    state.report("other", {"app": "x"}, _snap(4, {}))

    class Replica:
        replica_id, info = "me", {"app": "x"}
        runtime = SimpleNamespace(stats_snapshot=lambda: _snap(1, {"busy": 1}))
        broken = False

        def cluster_state(self):
            if self.broken:
                raise ConnectionError("actor restarting")
            state.report("me", self.info, self.runtime.stats_snapshot())
            return state.cluster("x")

    replica = Replica()
    app = ClusterMonitoringApp(PlainTextResponse("api"), replica)
    client = TestClient(app)  # no lifespan: the stand-in API is a plain response
    assert client.get("/stats").json()["requests"]["served"] == 5  # both replicas
    assert client.get("/stats?scope=replica").json()["requests"]["served"] == 1
    assert 'replica="other"' in client.get("/metrics").text
    assert client.get("/generate").text == "api"  # everything else is the API
    replica.broken = True
    fallback = client.get("/stats")
    assert fallback.status_code == 200 and fallback.json()["requests"]["served"] == 1
    assert "unavailable" in fallback.json()["cluster"]["error"]
