"""The Ray Serve deployment answers the same API (only where ray[serve] is installed)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import free_port, wav_bytes

serve = pytest.importorskip(
    "ray.serve", reason="ray[serve] is not installed (optional extra lipsync-server[ray])"
)


@pytest.mark.slow
def test_ray_serve_deployment_generates(tmp_path) -> None:
    import httpx
    import ray

    from lipsync.server.ray_serve import build_app
    from lipsync.settings import Settings

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(Settings(cache_dir=tmp_path / "cache"), max_ongoing_requests=2), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        import time

        end = time.monotonic() + 240
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < end, "replica never became ready"
            time.sleep(0.5)
        r = httpx.post(f"{url}/generate", files={"audio": ("a.wav", wav_bytes(1.0))}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        bad = httpx.post(f"{url}/generate", files={"audio": ("a.wav", b"not audio")}, timeout=60)
        assert bad.status_code == 415 and bad.json()["code"] == "unsupported_media"
    finally:
        serve.shutdown()
        ray.shutdown()
