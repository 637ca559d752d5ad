"""Request counters and per-stage timings, served as JSON (/stats) and Prometheus text (/metrics).

One ``ServerStats`` object is the single source of truth; the Prometheus collector reads the same
snapshot at scrape time, so the two endpoints can never disagree. Percentiles are computed over
the most recent ``window`` samples of each stage (counts and means over all of them).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from ..types import StageTimes
from .jobs import QueueState

STAGES: tuple[str, ...] = ("precompute", "audio", "motion", "render", "encode")
QUANTILES: tuple[float, ...] = (0.5, 0.95)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class StageSeries:
    window: int = 2048
    count: int = 0
    total: float = 0.0
    recent: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    def summary(self) -> dict[str, float | int]:
        if not self.count:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0}
        values = sorted(self.recent)
        return {
            "count": self.count,
            "mean": self.total / self.count,
            "p50": _quantile(values, 0.5),
            "p95": _quantile(values, 0.95),
        }


@dataclass
class EndpointCounts:
    served: int = 0
    failed: dict[str, int] = field(default_factory=dict)


class ServerStats:
    """Thread-safe counters; written from routes, workers and middleware."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, window: int = 2048) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self._endpoints: dict[str, EndpointCounts] = {}
        self._stages = {s: StageSeries(window=window) for s in STAGES}
        self._cache_hits = 0
        self._cache_misses = 0
        self._videos = 0
        self._frames = 0
        self._audio_seconds = 0.0

    # ------------------------------------------------------------------ recording
    def record_request(self, endpoint: str, status: int, error_code: str | None) -> None:
        with self._lock:
            counts = self._endpoints.setdefault(endpoint, EndpointCounts())
            if status < 400 and error_code is None:
                counts.served += 1
            else:
                reason = error_code or f"http_{status}"
                counts.failed[reason] = counts.failed.get(reason, 0) + 1

    def record_stages(self, times: StageTimes, *, skip_zero: bool = True) -> None:
        """Add one request's stage times (stages the request did not run are left out)."""
        with self._lock:
            for stage, seconds in times.as_dict().items():
                if skip_zero and seconds <= 0.0:
                    continue
                self._stages[stage].add(float(seconds))

    def record_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._cache_hits += 1
            else:
                self._cache_misses += 1

    def record_video(self, frames: int, audio_seconds: float) -> None:
        with self._lock:
            self._videos += 1
            self._frames += int(frames)
            self._audio_seconds += float(audio_seconds)

    # ------------------------------------------------------------------ reading
    def uptime_s(self) -> float:
        return self._clock() - self.started

    def snapshot(self, queue: QueueState, avatars_cached: int | None) -> dict:
        with self._lock:
            endpoints = {
                k: {"served": v.served, "failed": dict(v.failed)} for k, v in sorted(self._endpoints.items())
            }
            stages = {k: s.summary() for k, s in self._stages.items()}
            cache = {"hits": self._cache_hits, "misses": self._cache_misses}
            generated = {
                "videos": self._videos,
                "frames": self._frames,
                "audio_seconds": round(self._audio_seconds, 3),
            }
        failed_by_reason: dict[str, int] = {}
        for counts in endpoints.values():
            for reason, n in counts["failed"].items():
                failed_by_reason[reason] = failed_by_reason.get(reason, 0) + n
        return {
            "uptime_s": round(self.uptime_s(), 3),
            "requests": {
                "served": sum(c["served"] for c in endpoints.values()),
                "failed": sum(failed_by_reason.values()),
                "failed_by_reason": dict(sorted(failed_by_reason.items())),
                "by_endpoint": endpoints,
            },
            "stages": stages,
            "cache": {**cache, "avatars": avatars_cached},
            "generated": generated,
            "queue": {
                "depth": queue.waiting,
                "in_flight": queue.in_flight,
                "workers": queue.workers,
                "capacity": queue.capacity,
                "accepting": queue.accepting,
            },
        }


class _StatsCollector:
    """Exposes a ``ServerStats`` snapshot as Prometheus metric families at scrape time."""

    def __init__(self, snapshot: Callable[[], dict], ready: Callable[[], bool]) -> None:
        self._snapshot = snapshot
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        requests = CounterMetricFamily(
            "lipsync_requests",
            "API requests by endpoint and outcome",
            labels=["endpoint", "outcome", "reason"],
        )
        for endpoint, counts in snap["requests"]["by_endpoint"].items():
            requests.add_metric([endpoint, "served", ""], counts["served"])
            for reason, n in counts["failed"].items():
                requests.add_metric([endpoint, "failed", reason], n)
        yield requests

        stage = Metric("lipsync_stage_seconds", "Seconds per pipeline stage per request", "summary")
        for name, s in snap["stages"].items():
            for q, key in zip(QUANTILES, ("p50", "p95"), strict=True):
                stage.add_sample("lipsync_stage_seconds", {"stage": name, "quantile": str(q)}, s[key])
            stage.add_sample("lipsync_stage_seconds_count", {"stage": name}, s["count"])
            stage.add_sample("lipsync_stage_seconds_sum", {"stage": name}, s["mean"] * s["count"])
        yield stage

        cache = snap["cache"]
        yield CounterMetricFamily(
            "lipsync_avatar_cache_hits", "Avatar precompute cache hits", value=cache["hits"]
        )
        yield CounterMetricFamily(
            "lipsync_avatar_cache_misses", "Avatar precompute cache misses", value=cache["misses"]
        )
        if cache["avatars"] is not None:
            yield GaugeMetricFamily(
                "lipsync_avatars_cached", "Avatars in the on-disk cache", value=cache["avatars"]
            )
        gen = snap["generated"]
        yield CounterMetricFamily("lipsync_videos", "Videos generated", value=gen["videos"])
        yield CounterMetricFamily("lipsync_frames", "Video frames rendered", value=gen["frames"])
        yield CounterMetricFamily(
            "lipsync_audio_seconds", "Seconds of speech rendered", value=gen["audio_seconds"]
        )
        q = snap["queue"]
        yield GaugeMetricFamily("lipsync_queue_depth", "Jobs waiting for a worker", value=q["depth"])
        yield GaugeMetricFamily("lipsync_jobs_in_flight", "Jobs running", value=q["in_flight"])
        yield GaugeMetricFamily("lipsync_workers", "Configured concurrent jobs", value=q["workers"])
        yield GaugeMetricFamily(
            "lipsync_ready",
            "1 when start-up finished and the server takes work",
            value=1.0 if self._ready() else 0.0,
        )
        yield GaugeMetricFamily(
            "lipsync_uptime_seconds", "Seconds since the app started", value=snap["uptime_s"]
        )


def metrics_registry(snapshot: Callable[[], dict], ready: Callable[[], bool]) -> CollectorRegistry:
    """A registry of our own (not the global one) so several apps in one process do not clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(snapshot, ready))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, fds
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
