"""``lipsync serve --ray --ray-config deploy/serve.yaml`` as an operator runs it: it serves the
shipped config (port changed to a free one), a request in flight when the driver gets SIGTERM
still completes, and then the app, its proxy and the local Ray cluster are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port, wav_bytes

if os.environ.get("CI"):
    import ray.serve  # noqa: F401 - in CI a missing ray[serve] must fail, not skip
else:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (lipsync-server[ray])")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def test_serve_ray_runs_the_shipped_config_and_drains_on_sigterm(tmp_path) -> None:
    import psutil

    port = free_port()
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    deployment = config["applications"][0]["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "LIPSYNC_CACHE_DIR": str(tmp_path / "cache"),
        "LIPSYNC_RAY_STORE_DIR": str(tmp_path / "store"),
    }
    env.pop("RAY_ADDRESS", None)  # always a fresh local cluster
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lipsync.cli import main; main()", "serve", "--ray", "--ray-config", str(cfg)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < end, "never became ready"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # The proxy middleware is active: a chunked body over the limit is refused by it too.
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["ready"] and health["engine"] == "classic"
        children = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert children, "the driver started no Ray processes?"

        # A request in flight when the driver is told to stop still gets its video.
        result: dict = {}
        started = threading.Event()

        def long_request() -> None:
            started.set()
            r = httpx.post(f"{url}/generate", files={"audio": ("a.wav", wav_bytes(60.0))}, timeout=300)
            result["status"] = r.status_code
            result["bytes"] = len(r.content)
            result["finished"] = time.monotonic()

        worker = threading.Thread(target=long_request)
        worker.start()
        started.wait(10)
        time.sleep(0.5)  # let the request reach the replica
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        worker.join(300)
        assert result.get("status") == 200 and result["bytes"] > 10_000, result
        assert result["finished"] > stopped_at  # it really was in flight when the driver stopped
        assert proc.wait(240) == 0, (tmp_path / "serve.log").read_text()[-4000:]
        # The app is gone with its driver: nothing listens any more, no Ray process is left.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
        _gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
