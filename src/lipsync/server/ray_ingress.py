"""The ASGI app a Ray Serve replica exposes: the normal API, with cluster-wide monitoring.

Behind Serve's proxy a request reaches whichever replica is free, so a replica's own ``/stats``
and ``/metrics`` would alternate between replicas (counters going backwards for Prometheus).
Here ``GET /stats`` answers for the whole deployment (counters summed over live and retired
replicas, plus a per-replica breakdown under ``cluster``) and ``GET /metrics`` lists every
replica's series with a ``replica`` label (a replica that went away is folded into
``replica="retired"``, so ``sum by (...)`` never decreases). ``GET /stats?scope=replica`` is the
answering replica's own snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import parse_qs

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .ray_cluster import cluster_view, merge_snapshots
from .ray_proxy import TRIM_AFTER_BYTES, release_free_memory
from .stats import _StatsCollector

log = logging.getLogger("lipsync.server")


class ClusterMonitoringApp:
    def __init__(self, app: ASGIApp, replica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route_prefix
            path = path[len(root):]
        if scope["type"] == "http" and scope.get("method") == "GET" and path in ("/stats", "/metrics"):
            query = parse_qs(scope.get("query_string", b"").decode())
            if query.get("scope", [""])[0] != "replica":
                try:
                    state = await anyio.to_thread.run_sync(self.replica.cluster_state)
                except Exception as exc:  # noqa: BLE001 - the shared actor restarting: say so
                    log.warning("cluster stats unavailable: %s", exc)
                    state = {
                        "replicas": {
                            self.replica.replica_id: {
                                **self.replica.info,
                                "stats": self.replica.runtime.stats_snapshot(),
                            }
                        },
                        "retired": [],
                        "error": f"cluster view unavailable ({type(exc).__name__}); this replica only",
                    }
                if path == "/stats":
                    view = cluster_view(state)
                    if "error" in state:
                        view["cluster"]["error"] = state["error"]
                    response: Response = JSONResponse(view)
                else:
                    response = Response(
                        render_cluster_metrics(state), media_type="text/plain; version=0.0.4; charset=utf-8"
                    )
                await response(scope, receive, send)
                return
            if path == "/stats":
                response = JSONResponse(self.replica.runtime.stats_snapshot())
                await response(scope, receive, send)
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            if received >= TRIM_AFTER_BYTES:
                # Serve hands the body over in large pickled batches; give the freed heap back.
                release_free_memory()


class _Labelled:
    """Our collector's families for one replica's snapshot, each sample labelled ``replica``."""

    def __init__(self, replica: str, snapshot: dict, ready: bool) -> None:
        self.replica = replica
        self.inner = _StatsCollector(lambda: snapshot, lambda: ready)

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            yield from_samples(family, self.replica)


def from_samples(family: Metric, replica: str) -> Metric:
    out = Metric(family.name, family.documentation, family.type, family.unit)
    for s in family.samples:
        out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
    return out


class _ClusterCollector:
    def __init__(self, state: dict) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sources = [
            (r, e["stats"], True) for r, e in self.state["replicas"].items()
        ]
        if self.state["retired"]:
            sources.append(("retired", merge_snapshots(self.state["retired"]), False))
        for replica, snapshot, ready in sources:
            for family in _Labelled(replica, snapshot, ready).collect():
                if replica == "retired" and family.type == "gauge":
                    continue  # gauges of stopped replicas mean nothing
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                merged.samples.extend(family.samples)
        yield from families.values()
        rss = GaugeMetricFamily(
            "lipsync_replica_resident_memory_bytes", "Resident memory of each replica process", labels=["replica"]
        )
        for replica, entry in self.state["replicas"].items():
            if entry.get("resident_memory_bytes") is not None:
                rss.add_metric([replica], entry["resident_memory_bytes"])
        yield rss


def render_cluster_metrics(state: dict) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ClusterCollector(state))
    return generate_latest(registry)
