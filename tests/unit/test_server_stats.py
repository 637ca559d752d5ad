"""Stats: percentiles, request classification, and the Prometheus view of the same numbers."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lipsync.server.jobs import QueueState
from lipsync.server.stats import ServerStats, StageSeries, metrics_registry, render_metrics
from lipsync.types import StageTimes

QUEUE = QueueState(workers=2, capacity=6, in_flight=1, waiting=3, accepting=True)


def test_stage_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(7)
    values = rng.exponential(0.2, size=501)
    series = StageSeries()
    for v in values:
        series.add(float(v))
    s = series.summary()
    assert s["count"] == 501
    assert np.isclose(s["mean"], values.mean())
    assert np.isclose(s["p50"], np.percentile(values, 50))
    assert np.isclose(s["p95"], np.percentile(values, 95))


def test_percentiles_use_the_recent_window_but_counts_everything() -> None:
    series = StageSeries(window=10)
    for _ in range(100):
        series.add(5.0)
    for _ in range(10):
        series.add(1.0)
    s = series.summary()
    assert s["count"] == 110
    assert np.isclose(s["mean"], (100 * 5.0 + 10 * 1.0) / 110)
    assert s["p50"] == s["p95"] == 1.0


def test_requests_are_classified_and_totals_add_up() -> None:
    stats = ServerStats()
    for _ in range(3):
        stats.record_request("POST /generate", 200, None)
    stats.record_request("POST /generate", 503, "busy")
    stats.record_request("POST /generate", 503, "busy")
    stats.record_request("POST /generate", 415, "unsupported_media")
    stats.record_request("POST /avatars", 422, "no_face")
    stats.record_request("GET /nope", 404, None)  # no code header: classified by status
    stats.record_request("POST /generate", 200, "client_disconnected")  # stream that was cut
    snap = stats.snapshot(QUEUE, avatars_cached=4)
    req = snap["requests"]
    assert req["by_endpoint"]["POST /generate"] == {
        "served": 3,
        "failed": {"busy": 2, "unsupported_media": 1, "client_disconnected": 1},
    }
    assert req["failed_by_reason"] == {
        "busy": 2,
        "client_disconnected": 1,
        "http_404": 1,
        "no_face": 1,
        "unsupported_media": 1,
    }
    assert req["served"] == 3
    assert req["failed"] == sum(req["failed_by_reason"].values()) == 6
    assert snap["queue"] == {"depth": 3, "in_flight": 1, "workers": 2, "capacity": 6, "accepting": True}
    assert snap["cache"]["avatars"] == 4


def test_stage_times_skip_stages_a_request_did_not_run() -> None:
    stats = ServerStats()
    stats.record_stages(StageTimes(audio=0.1, render=0.5, encode=0.2))
    stats.record_stages(StageTimes(precompute=1.5))
    stages = stats.snapshot(QUEUE, None)["stages"]
    assert set(stages) == {"precompute", "audio", "motion", "render", "encode"}
    assert stages["render"]["count"] == 1 and np.isclose(stages["render"]["mean"], 0.5)
    assert stages["precompute"]["count"] == 1 and np.isclose(stages["precompute"]["p95"], 1.5)
    assert stages["motion"]["count"] == 0


def test_prometheus_text_parses_and_agrees_with_the_snapshot() -> None:
    stats = ServerStats()
    stats.record_request("POST /generate", 200, None)
    stats.record_request("POST /generate", 503, "busy")
    stats.record_stages(StageTimes(audio=0.1, render=0.4))
    stats.record_stages(StageTimes(audio=0.3, render=0.6))
    stats.record_cache(True)
    stats.record_cache(False)
    stats.record_cache(False)
    registry = metrics_registry(lambda: stats.snapshot(QUEUE, 2), lambda: True)
    text = render_metrics(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert (
        samples[
            (
                "lipsync_requests_total",
                (("endpoint", "POST /generate"), ("outcome", "failed"), ("reason", "busy")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "lipsync_requests_total",
                (("endpoint", "POST /generate"), ("outcome", "served"), ("reason", "")),
            )
        ]
        == 1
    )
    assert samples[("lipsync_stage_seconds_count", (("stage", "render"),))] == 2
    assert np.isclose(samples[("lipsync_stage_seconds_sum", (("stage", "audio"),))], 0.4)
    assert np.isclose(samples[("lipsync_stage_seconds", (("quantile", "0.5"), ("stage", "render")))], 0.5)
    assert samples[("lipsync_avatar_cache_hits_total", ())] == 1
    assert samples[("lipsync_avatar_cache_misses_total", ())] == 2
    assert samples[("lipsync_avatars_cached", ())] == 2
    assert samples[("lipsync_queue_depth", ())] == 3
    assert samples[("lipsync_jobs_in_flight", ())] == 1
    assert samples[("lipsync_ready", ())] == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
