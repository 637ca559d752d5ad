"""The HTTP app in-process (Starlette TestClient) around a fake pipeline: routes, errors, limits,
queue, stats. The real pipeline and a real uvicorn process are covered by tests/e2e."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from lipsync.errors import (
    AudioTooLong,
    AvatarNotFound,
    Busy,
    CorruptMedia,
    ImageTooLarge,
    JobTimeout,
    NoFaceFound,
    UnsupportedMedia,
)
from lipsync.server import create_app
from lipsync.settings import Settings
from tests.e2e.fakes import FACE_PNG, NOFACE_PNG, FakePipeline, wav_bytes
from tests.waiting import returns_within, wait_for

WAV = wav_bytes(2.5)
STAGES = ("precompute", "audio", "motion", "render", "encode")


@pytest.fixture
def make_client(tmp_path) -> Iterator[Callable[..., tuple[TestClient, FakePipeline]]]:
    clients: list[TestClient] = []

    def make(pipeline: FakePipeline | None = None, *, background: bool = False, **settings_kw):
        settings = Settings(cache_dir=tmp_path / "cache", **settings_kw)
        pipe = pipeline or FakePipeline(settings)
        pipe.settings = settings
        app = create_app(settings, pipeline=pipe, background_startup=background)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, pipe

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()[0]


def _stats(client: TestClient) -> dict:
    r = client.get("/stats")
    assert r.status_code == 200
    return r.json()


def _generate_counts(client: TestClient) -> dict:
    return _stats(client)["requests"]["by_endpoint"].get("POST /generate", {"served": 0, "failed": {}})


# ------------------------------------------------------------------------------ seed calls
def test_seed_calls(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["ready"] and body["status"] == "ok"
    assert body["engine"] == "fake" and body["device"] == "cpu"
    assert body["models_loaded"] and body["warmed_up"] and body["default_avatar"]["ready"]
    assert body["version"]

    # PowerShell's Invoke-RestMethod -Method Post sends no body and no Content-Type.
    pre = client.post("/precompute", content=b"")
    assert pre.status_code == 200, pre.text
    assert pre.json()["avatar_id"] == body["default_avatar"]["id"]
    assert pre.json()["source"] == "bundled"

    gen = client.post("/generate", files={"audio": ("test_audio.wav", WAV, "audio/wav")})
    assert gen.status_code == 200, gen.text
    assert gen.headers["content-type"] == "video/mp4"
    assert "filename=" in gen.headers["content-disposition"]
    assert gen.content.startswith(b"FAKEMP4;") and gen.content.count(b"chunk") == 3
    assert gen.headers["x-frames"] == str(round(2.5 * 25))
    timing = gen.headers["server-timing"]
    for stage in (*STAGES, "queue", "total"):
        assert f"{stage};dur=" in timing
    assert gen.headers["x-request-id"]


def test_dotnet_multipart_flavour_from_powershell(client: TestClient) -> None:
    """PowerShell's -Form (.NET MultipartFormDataContent) quotes nothing and adds filename*."""
    boundary = "5b1c6a0e-3f2d-4e8a-9c1b-7d2e6f4a8b90"
    body = (
        (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            "Content-Disposition: form-data; name=audio; filename=test_audio.wav; "
            "filename*=utf-8''test_audio.wav\r\n\r\n"
        ).encode()
        + WAV
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = client.post(
        "/generate", content=body, headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert r.content.count(b"chunk") == 3


def test_generate_does_not_leave_files_behind(make_client) -> None:
    client, _ = make_client()
    runtime = client.app.state.runtime
    for _ in range(3):
        assert client.post("/generate", files={"audio": ("a.wav", WAV)}).status_code == 200
    assert list(runtime.workdir.iterdir()) == []


def test_options_reach_the_pipeline_and_are_validated(make_client) -> None:
    client, pipe = make_client()
    seen = {}
    original = pipe.generate

    def spy(audio, output, **kw):
        seen.update(kw)
        return original(audio, output, **kw)

    pipe.generate = spy
    r = client.post(
        "/generate",
        files={"audio": ("a.wav", WAV)},
        data={"expression_scale": "1.5", "still": "false", "size": "256"},
    )
    assert r.status_code == 200, r.text
    opts = seen["options"]
    assert (opts.expression_scale, opts.still, opts.size) == (1.5, False, 256)

    bad = client.post("/generate", files={"audio": ("a.wav", WAV)}, data={"size": "255"})
    assert bad.status_code == 422
    assert bad.json()["code"] == "invalid_input"
    assert bad.json()["detail"]["errors"][0]["field"] == "size"
    # out of range in every way at once: the answer gives the whole range, not the first limit
    # pydantic happened to check ("multiple of 2" for 10**20, "<= 3" for NaN)
    for field, value, range_text in (("size", "99999999999999999999999", "64..1024, even"),
                                     ("expression_scale", "nan", "0.0..3.0")):
        r = client.post("/generate", files={"audio": ("a.wav", WAV)}, data={field: value})
        assert r.status_code == 422, r.text
        assert r.json()["message"] == f"field {field!r}: must be {range_text}", r.json()

    both = client.post(
        "/generate",
        files={"audio": ("a.wav", WAV), "image": ("f.png", FACE_PNG)},
        data={"avatar_id": "a" * 64},
    )
    assert both.status_code == 422 and "either" in both.json()["message"]


def test_missing_audio_is_a_json_422(client: TestClient) -> None:
    r = client.post("/generate")
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_input"
    assert r.json()["detail"]["errors"][0]["field"] == "audio"
    empty = client.post("/generate", files={"audio": ("a.wav", b"")})
    assert empty.status_code == 422 and empty.json()["code"] == "empty_audio"


# ------------------------------------------------------------------------------ error mapping
@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UnsupportedMedia("a PNG where audio was expected"), 415, "unsupported_media"),
        (CorruptMedia("truncated WAV"), 422, "corrupt_media"),
        (NoFaceFound("no face"), 422, "no_face"),
        (AudioTooLong("too long"), 413, "audio_too_long"),
        (ImageTooLarge("400 Mpx"), 413, "image_too_large"),
        (AvatarNotFound("unknown avatar"), 404, "avatar_not_found"),
        (JobTimeout("too slow"), 504, "timeout"),
        (Busy("full", retry_after_s=7), 503, "busy"),
    ],
)
def test_errors_map_to_status_and_json(make_client, error, status, code) -> None:
    client, pipe = make_client()

    def fail(audio):
        raise error

    pipe.load_audio = fail
    for params in ({}, {"stream": "true"}):
        r = client.post("/generate", files={"audio": ("a.wav", WAV)}, params=params)
        assert r.status_code == status
        body = r.json()
        assert body["code"] == code
        assert body["message"] == error.message
        assert body["request_id"] == r.headers["x-request-id"]
        if status == 503:
            assert r.headers["retry-after"] == "7"
    assert _generate_counts(client)["failed"] == {code: 2}
    assert client.get("/health").status_code == 200


def test_unexpected_exception_is_a_logged_500_json(make_client, caplog) -> None:
    client, pipe = make_client()

    def bug(audio):
        raise RuntimeError("a bug")

    pipe.load_audio = bug
    r = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    assert "a bug" not in r.text, "internal details must stay in the log"
    assert any("a bug" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)
    assert _generate_counts(client)["failed"] == {"internal_error": 1}


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.put("/generate")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------ streaming
def test_stream_sends_the_rendered_chunks(make_client) -> None:
    client, _ = make_client()
    with client.stream("POST", "/generate", files={"audio": ("a.wav", WAV)}, data={"stream": "true"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "video/mp4"
        assert "content-length" not in r.headers
        body = b"".join(r.iter_bytes())
    assert body == b"FAKEMP4;chunk0:25;chunk1:25;chunk2:12;"
    stats = _stats(client)
    assert stats["generated"]["videos"] == 1  # the start-up warm-up is not a request
    assert stats["requests"]["by_endpoint"]["POST /generate"] == {"served": 1, "failed": {}}


# ------------------------------------------------------------------------------ avatars
def test_avatar_crud(make_client) -> None:
    client, _ = make_client()
    created = client.post("/avatars", files={"image": ("face.png", FACE_PNG, "image/png")})
    assert created.status_code == 201, created.text
    avatar_id = created.json()["id"]
    assert avatar_id == hashlib.sha256(FACE_PNG).hexdigest()
    assert created.json()["cache_hit"] is False

    again = client.post("/avatars", files={"image": ("face.png", FACE_PNG)})
    assert again.status_code == 200 and again.json()["cache_hit"] is True
    # the answer to the upload carries the same info as the avatar's own entry
    info, own = created.json()["info"], client.get(f"/avatars/{avatar_id}").json()["info"]
    assert info and info.keys() == own.keys() and info["source_size"] == own["source_size"]

    listed = client.get("/avatars").json()
    ids = [a["id"] for a in listed["avatars"]]
    assert avatar_id in ids and listed["default_id"] in ids and listed["count"] == len(ids)
    assert client.get(f"/avatars/{avatar_id}").json()["id"] == avatar_id

    gen = client.post("/generate", files={"audio": ("a.wav", WAV)}, data={"avatar_id": avatar_id})
    assert gen.status_code == 200 and gen.headers["x-avatar-id"] == avatar_id

    deleted = client.delete(f"/avatars/{avatar_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": avatar_id, "deleted": True}
    assert client.delete(f"/avatars/{avatar_id}").status_code == 404
    missing = client.get(f"/avatars/{avatar_id}")
    assert missing.status_code == 404 and "POST /precompute" in missing.json()["message"]
    gone = client.post("/generate", files={"audio": ("a.wav", WAV)}, data={"avatar_id": avatar_id})
    assert gone.status_code == 404 and gone.json()["code"] == "avatar_not_found"


def test_generate_with_an_uploaded_image(make_client) -> None:
    client, _ = make_client()
    r = client.post("/generate", files={"audio": ("a.wav", WAV), "image": ("face.png", FACE_PNG)})
    assert r.status_code == 200
    assert r.headers["x-avatar-id"] == hashlib.sha256(FACE_PNG).hexdigest()
    assert r.headers["x-avatar-cache"] == "miss"
    noface = client.post("/generate", files={"audio": ("a.wav", WAV), "image": ("cat.png", NOFACE_PNG)})
    assert noface.status_code == 422 and noface.json()["code"] == "no_face"


def test_default_avatar_cannot_be_deleted_but_can_be_replaced(client: TestClient) -> None:
    default_id = client.get("/health").json()["default_avatar"]["id"]
    r = client.delete(f"/avatars/{default_id}")
    assert r.status_code == 409 and r.json()["code"] == "avatar_in_use"
    pre = client.post("/precompute", files={"image": ("face.png", FACE_PNG)})
    assert pre.status_code == 200 and pre.json()["source"] == "upload"
    new_id = pre.json()["avatar_id"]
    assert client.get("/health").json()["default_avatar"]["id"] == new_id
    assert client.delete(f"/avatars/{default_id}").status_code == 200


@pytest.mark.parametrize(
    "bad_id",
    ["..", "..%2F..%2Fetc", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "ABC", "a" * 63, "a" * 64 + "%00", "x" * 300],
)
def test_malformed_avatar_ids_never_reach_the_pipeline(make_client, bad_id: str) -> None:
    client, pipe = make_client()
    seen: list[str] = []
    pipe.get_avatar = lambda avatar_id: seen.append(avatar_id)  # type: ignore[assignment]
    pipe.delete_avatar = lambda avatar_id: seen.append(avatar_id)  # type: ignore[assignment]
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/avatars/{bad_id}")
        if r.request.url.path == "/":  # the client resolved "/avatars/.." to the web page
            assert r.status_code == (200 if method == "GET" else 405)
            continue
        assert r.status_code in (404, 405, 422), r.text
        assert r.json()["code"] in ("not_found", "invalid_input", "avatar_not_found", "method_not_allowed")
    r = client.post("/generate", files={"audio": ("a.wav", WAV)}, data={"avatar_id": bad_id})
    assert r.status_code == 422
    assert seen == []


def test_a_malformed_avatar_id_is_told_what_an_id_looks_like(client: TestClient) -> None:
    # not pydantic's regular expression: the user is told where a real id comes from
    upper = hashlib.sha256(b"x").hexdigest().upper()
    for r in (client.post("/generate", files={"audio": ("a.wav", WAV)}, data={"avatar_id": "nosuch"}),
              client.get(f"/avatars/{upper}")):
        assert r.status_code == 422, r.text
        message = r.json()["message"]
        assert "64 lower-case hex characters" in message and "POST /precompute" in message, message
        assert "pattern" not in message


def test_a_json_body_is_told_to_use_multipart(client: TestClient) -> None:
    r = client.post("/generate", json={"audio": "x"})
    assert r.status_code == 415, r.text
    assert r.json()["code"] == "unsupported_media"
    assert "multipart/form-data" in r.json()["message"] and "application/json" in r.json()["message"]
    # without any body the missing field is still what is named
    assert client.post("/generate").json()["detail"]["errors"][0]["field"] == "audio"


def test_a_generated_video_carries_no_validators(client: TestClient) -> None:
    # made for this request and deleted once sent: Last-Modified (the temp file's mtime, which
    # may read later than Date) and ETag would only invite revalidation that cannot work
    r = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert int(r.headers["content-length"]) == len(r.content) > 0
    assert "last-modified" not in r.headers and "etag" not in r.headers


# ------------------------------------------------------------------------------ limits
def test_declared_body_over_the_limit_is_refused_before_the_app(make_client) -> None:
    client, pipe = make_client(max_upload_bytes=4096)
    big = wav_bytes(5.0)  # 160 kB
    r = client.post("/generate", files={"audio": ("a.wav", big)})
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"
    # the limit in words a person can act on: MiB, the exact bytes and the setting behind it
    limit = r.json()["detail"]["limit_bytes"]
    assert f"MiB ({limit} bytes)" in r.json()["message"] and "LIPSYNC_MAX_UPLOAD_BYTES" in r.json()["message"]
    assert pipe.calls == ["generate"]  # only the start-up warm-up ran
    assert _generate_counts(client)["failed"] == {"payload_too_large": 1}


def test_chunked_body_over_the_limit_is_refused(make_client) -> None:
    client, pipe = make_client(max_upload_bytes=4096)
    boundary = "XyZ"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield head
        for _ in range(40):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/generate", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "payload_too_large"
    assert pipe.calls == ["generate"]


def test_upload_within_the_limit_passes(make_client) -> None:
    client, _ = make_client(max_upload_bytes=200_000)
    assert client.post("/generate", files={"audio": ("a.wav", wav_bytes(5.0))}).status_code == 200


def test_audio_duration_limit(make_client) -> None:
    client, _ = make_client(max_audio_seconds=2.0)
    r = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert r.status_code == 413 and r.json()["code"] == "audio_too_long"


# ------------------------------------------------------------------------------ queue and time limits
def test_full_queue_answers_503_with_retry_after_at_once(make_client) -> None:
    client, pipe = make_client(workers=1, queue_size=1)
    pipe.render_gate.clear()
    results: list[int] = []

    def call() -> None:
        results.append(client.post("/generate", files={"audio": ("a.wav", WAV)}).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    threads[0].start()
    assert pipe.renders_started.acquire(timeout=5)  # the first job holds the only worker
    threads[1].start()
    wait_for(lambda: client.get("/stats").json()["queue"]["depth"] >= 1, what="a queued job")

    # 503 at once: the render gate stays shut until below, so a request that waited for the
    # queue to drain would never return.
    r = returns_within(lambda: client.post("/generate", files={"audio": ("a.wav", WAV)}), what="a third request")
    assert r.status_code == 503
    assert r.json()["code"] == "busy"
    assert int(r.headers["retry-after"]) >= 1
    stats = client.get("/stats").json()
    assert (stats["queue"]["in_flight"], stats["queue"]["depth"]) == (1, 1)

    pipe.render_gate.set()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 200]
    counts = _generate_counts(client)
    assert counts == {"served": 2, "failed": {"busy": 1}}


def test_request_time_limit_gives_504_and_frees_the_worker(make_client) -> None:
    # 3 chunks x 1 s of sleep can never fit in the 1.5 s limit; the last request (no sleep, a few
    # ms of work) keeps 1.5 s of room for a busy machine.
    client, pipe = make_client(request_timeout_s=1.5)
    pipe.chunk_delay_s = 1.0
    r = client.post("/generate", files={"audio": ("a.wav", wav_bytes(3.0))})
    assert r.status_code == 504 and r.json()["code"] == "timeout"
    pipe.chunk_delay_s = 0.0
    wait_for(lambda: not client.get("/stats").json()["queue"]["in_flight"],
             what="the timed-out job stopping at its next chunk")
    assert client.post("/generate", files={"audio": ("a.wav", wav_bytes(0.5))}).status_code == 200
    assert list(client.app.state.runtime.workdir.iterdir()) == []


# ------------------------------------------------------------------------------ lifecycle
def test_not_ready_until_startup_finishes(make_client) -> None:
    gate = threading.Event()
    client, _ = make_client(FakePipeline(warmup_gate=gate), background=True)
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "starting"
    assert r.headers["retry-after"]
    g = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert g.status_code == 503 and g.json()["code"] == "not_ready" and g.headers["retry-after"]
    gate.set()
    assert client.app.state.runtime.ready_event.wait(60)
    assert client.get("/health").status_code == 200
    assert client.post("/generate", files={"audio": ("a.wav", WAV)}).status_code == 200


def test_failed_startup_is_reported(make_client) -> None:
    from lipsync.errors import CheckpointError

    client, _ = make_client(
        FakePipeline(warmup_error=CheckpointError("checkpoint missing: x.pth")), background=True
    )
    assert client.app.state.runtime.ready_event.wait(60)
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "failed"
    assert r.json()["error"]["code"] == "checkpoint_error"
    g = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert g.status_code == 503 and "checkpoint missing" in g.json()["message"]


def test_draining_refuses_new_jobs(client: TestClient) -> None:
    client.app.state.runtime.begin_shutdown()
    r = client.post("/generate", files={"audio": ("a.wav", WAV)})
    assert r.status_code == 503 and r.json()["code"] == "shutting_down" and r.headers["retry-after"]
    h = client.get("/health")
    assert h.status_code == 503 and h.json()["status"] == "shutting_down"


# ------------------------------------------------------------------------------ observability
def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/health", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    r = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32


def test_stats_and_metrics_count_the_same_requests(client: TestClient) -> None:
    assert client.post("/generate", files={"audio": ("a.wav", WAV)}).status_code == 200
    assert client.post("/generate", files={"audio": ("a.wav", b"junk")}).status_code == 415
    client.get("/health")  # monitoring calls are not counted as API requests
    stats = _stats(client)
    assert stats["requests"]["by_endpoint"]["POST /generate"] == {
        "served": 1,
        "failed": {"unsupported_media": 1},
    }
    assert "GET /health" not in stats["requests"]["by_endpoint"]
    for stage in ("audio", "render", "encode", "precompute"):
        assert stats["stages"][stage]["count"] >= 1 and stats["stages"][stage]["p95"] > 0
    assert stats["cache"]["avatars"] >= 1
    assert stats["uptime_s"] > 0

    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    served = [
        s.value
        for s in families["lipsync_requests"].samples
        if s.labels.get("endpoint") == "POST /generate" and s.labels.get("outcome") == "served"
    ]
    assert served == [1.0]
    render_count = [
        s.value
        for s in families["lipsync_stage_seconds"].samples
        if s.name.endswith("_count") and s.labels["stage"] == "render"
    ]
    assert render_count == [stats["stages"]["render"]["count"]]


def test_openapi_documents_the_uploads(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body_ref = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]["$ref"]
    body = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert body["required"] == ["audio"]
    assert {"audio", "avatar_id", "image", "expression_scale", "still", "size", "stream"} <= set(
        body["properties"]
    )
    assert "video/mp4" in schema["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert "application/json" in schema["paths"]["/generate"]["post"]["responses"]["415"]["content"]
    assert client.get("/docs").status_code == 200


def test_api_docs_pages_need_nothing_from_elsewhere(client: TestClient) -> None:
    """/docs (Swagger UI) and /redoc load their scripts and styles from this server: a
    self-hosted box often has no route to a CDN, and the pages were blank there."""
    import re

    host_url = re.compile(r"""(?:src|href)=["'](?:https?:)?//""")
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], page
        assert not host_url.search(r.text), (page, host_url.search(r.text))
        assets = re.findall(r"""(?:src|href)=["'](/[^"']+\.(?:js|css))["']""", r.text)
        assert assets, page
        for asset in assets:
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 10_000, asset
