"""Cluster-wide state for Ray Serve replicas: one avatar store and one stats registry.

Both live in one small named, detached Ray actor (``ClusterState``) that every replica on every
node finds by name, so:

* **Avatars**: the portrait *source bytes* of every avatar are kept by the actor (and written to a
  directory on the head node, ``LIPSYNC_RAY_STORE_DIR`` there, so an actor restart loses
  nothing; the least recently used beyond ``LIPSYNC_MAX_AVATARS`` are dropped). Replicas keep their own
  node-local precompute cache (``LIPSYNC_CACHE_DIR`` on that node) and rebuild an entry from the
  source bytes on a miss. Upload, generate and delete work from any node: ``SharedAvatarPipeline``
  asks the store before trusting the local cache, so a DELETE on one node is a 404 on all.
* **Stats**: each replica pushes its ``/stats`` snapshot (and its resident memory) when it changes,
  at most every ``STATS_PUSH_S``. The cluster view sums the live replicas plus the last snapshot
  of every replica that went away (``retired``), so summed counters never go backwards.

Nothing here imports ``ray`` at module level except inside functions: the pure helpers
(``merge_snapshots``) are unit-tested without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("lipsync.server")

#: Name and namespace of the detached actor every replica shares.
CLUSTER_ACTOR_NAME = "lipsync_cluster_state"
CLUSTER_NAMESPACE = "lipsync"
#: A replica whose last report is older than this is taken as gone and folded into "retired".
REPLICA_EXPIRY_S = 30.0
#: How often a replica checks whether its counters changed (and pushes them if so).
STATS_PUSH_S = 0.5
#: A push is sent at least this often even when nothing changed (liveness of the entry).
STATS_HEARTBEAT_S = 5.0
_ID = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------- merging
def _add_counts(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict):
            _add_counts(into.setdefault(key, {}), value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value


def merge_snapshots(snapshots: list[dict]) -> dict:
    """Sum ``/stats`` snapshots of several replicas into one of the same shape.

    Counters (requests, cache, generated, queue depth/in-flight/workers/capacity) are summed;
    stage ``count`` is summed and ``mean`` weighted by count; ``p50``/``p95`` are the largest of the
    replicas' (an upper bound: exact cluster percentiles would need every sample); ``uptime_s`` is
    the oldest replica's; ``accepting`` is true if any replica accepts; ``avatars`` is the largest
    node-local count (they are copies of one store, not distinct avatars).
    """
    if not snapshots:
        return {
            "uptime_s": 0.0,
            "requests": {"served": 0, "failed": 0, "failed_by_reason": {}, "by_endpoint": {}},
            "stages": {},
            "cache": {"hits": 0, "misses": 0, "avatars": None},
            "generated": {"videos": 0, "frames": 0, "audio_seconds": 0.0},
            "queue": {"depth": 0, "in_flight": 0, "workers": 0, "capacity": 0, "accepting": False},
        }
    requests: dict = {}
    generated: dict = {}
    queue: dict = {}
    cache = {"hits": 0, "misses": 0}
    stages: dict[str, dict] = {}
    avatars: int | None = None
    for snap in snapshots:
        _add_counts(requests, snap["requests"])
        _add_counts(generated, snap["generated"])
        _add_counts(queue, {k: v for k, v in snap["queue"].items() if k != "accepting"})
        cache["hits"] += snap["cache"]["hits"]
        cache["misses"] += snap["cache"]["misses"]
        if snap["cache"].get("avatars") is not None:
            avatars = max(avatars or 0, int(snap["cache"]["avatars"]))
        for name, s in snap["stages"].items():
            acc = stages.setdefault(name, {"count": 0, "total": 0.0, "p50": 0.0, "p95": 0.0})
            acc["count"] += s["count"]
            acc["total"] += s["mean"] * s["count"]
            acc["p50"] = max(acc["p50"], s["p50"])
            acc["p95"] = max(acc["p95"], s["p95"])
    requests.setdefault("failed_by_reason", {})
    requests.setdefault("by_endpoint", {})
    for counts in requests["by_endpoint"].values():
        counts.setdefault("served", 0)
        counts.setdefault("failed", {})
    requests["failed_by_reason"] = dict(sorted(requests["failed_by_reason"].items()))
    queue["accepting"] = any(s["queue"].get("accepting") for s in snapshots)
    if "audio_seconds" in generated:
        generated["audio_seconds"] = round(generated["audio_seconds"], 3)
    return {
        "uptime_s": max(s["uptime_s"] for s in snapshots),
        "requests": requests,
        "stages": {
            name: {
                "count": a["count"],
                "mean": a["total"] / a["count"] if a["count"] else 0.0,
                "p50": a["p50"],
                "p95": a["p95"],
            }
            for name, a in stages.items()
        },
        "cache": {**cache, "avatars": avatars},
        "generated": generated,
        "queue": queue,
    }


def _counters_only(snapshot: dict) -> dict:
    """What a retired replica still contributes: its counters, not its (now empty) queue."""
    out = dict(snapshot)
    out["queue"] = {"depth": 0, "in_flight": 0, "workers": 0, "capacity": 0, "accepting": False}
    out["cache"] = {**snapshot["cache"], "avatars": None}
    return out


# ---------------------------------------------------------------------------------- the actor
class ClusterState:
    """The body of the detached actor (a plain class, so it is testable in-process).

    ``store_dir`` keeps one file per avatar id (the portrait's source bytes); it is read back
    when the actor (re)starts.
    """

    def __init__(self, store_dir: str | None = None, max_entries: int | None = None) -> None:
        # Defaults are read here, i.e. on the head node where the actor runs.
        self.store_dir = Path(store_dir or default_store_dir())
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.max_entries = int(max_entries or os.environ.get("LIPSYNC_MAX_AVATARS", "1000"))
        self._avatars: dict[str, bytes] = {}  # least recently used first
        files = [p for p in self.store_dir.iterdir() if p.is_file()]
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            if _ID.match(path.name):
                self._avatars[path.name] = path.read_bytes()
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        self._replicas: dict[str, dict] = {}
        self._retired: dict[str, dict] = {}

    # ------------------------------------------------------------------ avatars
    def put_avatar(self, avatar_id: str, source: bytes) -> bool:
        """Keep an avatar's source bytes; False if it was already there."""
        if not _ID.match(avatar_id):
            raise ValueError(f"not an avatar id: {avatar_id!r}")
        if avatar_id in self._avatars:
            self._touch(avatar_id)
            return False
        tmp = self.store_dir / f"{avatar_id}.tmp"
        tmp.write_bytes(source)
        os.replace(tmp, self.store_dir / avatar_id)
        self._avatars[avatar_id] = source
        while len(self._avatars) > self.max_entries:  # the least recently used go, as in the caches
            self.delete_avatar(next(iter(self._avatars)))
        return True

    def _touch(self, avatar_id: str) -> None:
        self._avatars[avatar_id] = self._avatars.pop(avatar_id)
        with contextlib.suppress(OSError):
            os.utime(self.store_dir / avatar_id)

    def get_avatar(self, avatar_id: str) -> bytes | None:
        if avatar_id in self._avatars:
            self._touch(avatar_id)
        return self._avatars.get(avatar_id)

    def has_avatar(self, avatar_id: str) -> bool:
        return avatar_id in self._avatars

    def delete_avatar(self, avatar_id: str) -> bool:
        found = self._avatars.pop(avatar_id, None) is not None
        if _ID.match(avatar_id):
            (self.store_dir / avatar_id).unlink(missing_ok=True)
        return found

    def avatar_ids(self) -> list[str]:
        return sorted(self._avatars)

    # ------------------------------------------------------------------ stats
    def report(self, replica: str, info: dict, snapshot: dict) -> None:
        self._replicas[replica] = {"info": info, "snapshot": snapshot, "at": time.monotonic()}

    def retire(self, replica: str) -> None:
        entry = self._replicas.pop(replica, None)
        if entry is not None:
            self._retired[replica] = {"app": entry["info"].get("app"), "stats": _counters_only(entry["snapshot"])}

    def _expire(self) -> None:
        now = time.monotonic()
        for replica in [r for r, e in self._replicas.items() if now - e["at"] > REPLICA_EXPIRY_S]:
            self.retire(replica)

    def cluster(self, app: str | None = None) -> dict:
        """Live replicas (info + snapshot + seconds since the report) and retired replicas' stats,
        of one Serve application (``info["app"]``) or of all."""
        self._expire()
        now = time.monotonic()
        return {
            "replicas": {
                r: {**e["info"], "report_age_s": round(now - e["at"], 3), "stats": e["snapshot"]}
                for r, e in sorted(self._replicas.items())
                if app is None or e["info"].get("app") == app
            },
            "retired": [e["stats"] for e in self._retired.values() if app is None or e["app"] == app],
        }


def cluster_view(state: dict) -> dict:
    """``/stats`` for the whole deployment: the merged snapshot plus a per-replica breakdown."""
    live = [r["stats"] for r in state["replicas"].values()]
    merged = merge_snapshots(live + state["retired"])
    merged["cluster"] = {
        "replicas": {
            r: {k: v for k, v in e.items() if k != "stats"}
            | {
                "requests": {
                    "served": e["stats"]["requests"]["served"],
                    "failed": e["stats"]["requests"]["failed"],
                },
                "queue": e["stats"]["queue"],
            }
            for r, e in state["replicas"].items()
        },
        "live_replicas": len(live),
        "retired_replicas": len(state["retired"]),
    }
    return merged


def get_cluster_actor(store_dir: str | None = None):
    """The shared actor handle (created on the head node on first use; one per cluster)."""
    import ray

    cls = ray.remote(ClusterState)
    return cls.options(
        name=CLUSTER_ACTOR_NAME,
        namespace=CLUSTER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=3,
        # Kept on the head node, next to its store directory.
        resources={"node:__internal_head__": 0.001},
    ).remote(store_dir)


def default_store_dir() -> str:
    """``LIPSYNC_RAY_STORE_DIR``, else ``ray-avatar-store`` in the user cache, on the head node."""
    given = os.environ.get("LIPSYNC_RAY_STORE_DIR")
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lipsync", "ray-avatar-store")


def kill_cluster_actor() -> bool:
    """Remove the shared actor (its store directory stays); True if there was one."""
    import ray

    try:
        actor = ray.get_actor(CLUSTER_ACTOR_NAME, namespace=CLUSTER_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


# ---------------------------------------------------------------------------------- replica side
class StatsPusher:
    """A daemon thread that pushes a replica's snapshot when it changed (or as a heartbeat)."""

    def __init__(
        self, actor, replica: str, info: dict, snapshot: Callable[[], dict], rss: Callable[[], int]
    ) -> None:
        self.actor = actor
        self.replica = replica
        self.info = info
        self._snapshot = snapshot
        self._rss = rss
        self._stop = threading.Event()
        self._last_key: Any = None
        self._last_push = 0.0
        self._thread = threading.Thread(target=self._run, name="lipsync-stats-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def push(self, *, force: bool = False, wait: bool = False) -> None:
        import ray

        snap = self._snapshot()
        key = (snap["requests"], snap["generated"], snap["queue"], snap["cache"])
        now = time.monotonic()
        if not force and key == self._last_key and now - self._last_push < STATS_HEARTBEAT_S:
            return
        info = {**self.info, "resident_memory_bytes": self._rss()}
        ref = self.actor.report.remote(self.replica, info, snap)
        self._last_key, self._last_push = key, now
        if wait:
            ray.get(ref, timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(STATS_PUSH_S):
            try:
                self.push()
            except Exception:  # the actor restarting must not kill the replica
                log.debug("stats push failed", exc_info=True)

    def stop(self) -> None:
        """Final push, then retire this replica's entry (its counters stay in the sum)."""
        import ray

        self._stop.set()
        try:
            self.push(force=True)
            ray.get(self.actor.retire.remote(self.replica), timeout=10)
        except Exception:
            log.warning("could not retire this replica's stats", exc_info=True)


class SharedAvatarPipeline:
    """A ``LipSyncPipeline`` whose avatars come from the cluster store, cached per node.

    Everything not overridden is delegated to the wrapped pipeline. ``store`` is the
    ``ClusterState`` actor handle (``call`` turns a remote call into its result; tests pass an
    in-process ``ClusterState`` and an identity ``call``).
    """

    def __init__(self, inner, store, call: Callable[[Any], Any] | None = None) -> None:
        self._inner = inner
        self._store = store
        self._call = call or _ray_get

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def _remote(self, method: str, *args):
        fn = getattr(self._store, method)
        return self._call(fn.remote(*args) if hasattr(fn, "remote") else fn(*args))

    def publish(self, avatar_id: str) -> None:
        """Make a locally cached avatar known cluster-wide (its source bytes go to the store)."""
        if not self._remote("has_avatar", avatar_id):
            self._remote("put_avatar", avatar_id, self._inner.cache.source_bytes(avatar_id))

    def warmup(self) -> None:
        self._inner.warmup()
        self.publish(self._inner.default_avatar().id)

    def add_avatar(self, image, *, force: bool = False):
        avatar, hit = self._inner.add_avatar(image, force=force)
        self.publish(avatar.id)
        return avatar, hit

    def get_avatar(self, avatar_id: str):
        from ..avatar.cache import validate_avatar_id
        from ..errors import AvatarNotFound

        validate_avatar_id(avatar_id)
        source = self._remote("get_avatar", avatar_id)
        if source is None:
            # Deleted (or never uploaded) cluster-wide: drop any stale local copy.
            self._inner.cache.delete(avatar_id)
            raise AvatarNotFound.unknown(avatar_id)
        if not self._inner.cache.contains(avatar_id):
            avatar, _ = self._inner.add_avatar(source)  # rebuild this node's precompute
            if avatar.id != avatar_id:  # the id is the SHA-256 of the source bytes
                raise AvatarNotFound(f"avatar {avatar_id!r} could not be rebuilt", avatar_id=avatar_id)
        return self._inner.get_avatar(avatar_id)

    def delete_avatar(self, avatar_id: str) -> bool:
        found = bool(self._remote("delete_avatar", avatar_id))
        local = self._inner.delete_avatar(avatar_id)
        return found or local

    def list_avatars(self):
        ids = self._remote("avatar_ids")
        local = {str(getattr(i, "id", None) or i["id"]): i for i in self._inner.list_avatars()}
        return [local.get(i, {"id": i, "cached_on_this_node": False}) for i in ids]

    def precompute(self, image=None, *, force: bool = True):
        avatar = self._inner.precompute(image, force=force)
        self.publish(avatar.id)
        return avatar

    def _by_id(self, kw: dict) -> dict:
        """An avatar named by id is looked up through the store (rebuilt here on a miss)."""
        from ..types import AvatarId

        ref = kw.get("avatar")
        if isinstance(ref, AvatarId):
            kw = {**kw, "avatar": self.get_avatar(ref)}
        return kw

    def generate(self, audio, output, **kw):
        result = self._inner.generate(audio, output, **self._by_id(kw))
        self.publish(result.avatar_id)
        return result

    def stream(self, audio, *, on_done=None, **kw):
        def done(result) -> None:
            self.publish(result.avatar_id)
            if on_done is not None:
                on_done(result)

        return self._inner.stream(audio, on_done=done, **self._by_id(kw))


def _ray_get(ref):
    import ray

    return ray.get(ref, timeout=60)
