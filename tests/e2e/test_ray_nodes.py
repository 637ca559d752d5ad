"""Avatars across nodes: a two-node Ray cluster on this machine, each node with its own
``LIPSYNC_CACHE_DIR`` and Ray temp dir. An avatar uploaded through a replica on one node is
generated with and deleted through a replica on the other, and the delete holds on both.

The nodes are ``ray start --block`` processes (stopping them stops everything they started);
one Serve application per node (pinned by a custom resource) so a request can be aimed at a
node; one proxy on the head node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, wav_bytes

if os.environ.get("CI"):
    from ray import serve
else:
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (lipsync-server[ray])")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PORTRAIT = REPO / "src" / "lipsync" / "assets" / "portrait.png"


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict]:
    import ray

    from lipsync.server.ray_cluster import kill_cluster_actor
    from lipsync.server.ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    root = Path(tempfile.mkdtemp(prefix="lr", dir="/tmp"))  # short: Ray's socket paths must fit
    gcs_port, http_port = free_port(), free_port()
    base = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # loopback-only test cluster
        PROXY_CALLBACK_ENV: PROXY_CALLBACK,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "LIPSYNC_RAY_STORE_DIR": str(root / "store"),
    }
    nodes = []
    try:
        nodes.append(
            _start_node(
                ["--head", f"--port={gcs_port}", "--num-cpus=2", '--resources={"node_a": 2}',
                 "--include-dashboard=false", f"--temp-dir={root / 'ta'}",
                 f"--dashboard-agent-listen-port={free_port()}"],
                {**base, "LIPSYNC_CACHE_DIR": str(root / "cache-a")},
                root / "head.log",
            )
        )
        address = f"127.0.0.1:{gcs_port}"
        os.environ["RAY_AUTH_MODE"] = "disabled"
        end = time.monotonic() + 180
        while subprocess.run(
            [RAY, "status", f"--address={address}"], env=base, capture_output=True, check=False
        ).returncode:
            assert nodes[0].poll() is None and time.monotonic() < end, (root / "head.log").read_text()[-3000:]
            time.sleep(1)
        nodes.append(
            _start_node(
                [f"--address={address}", "--num-cpus=2", '--resources={"node_b": 2}',
                 f"--temp-dir={root / 'tb'}", f"--dashboard-agent-listen-port={free_port()}"],
                {**base, "LIPSYNC_CACHE_DIR": str(root / "cache-b")},
                root / "worker.log",
            )
        )
        ray.init(address=address, namespace="lipsync-e2e-nodes")
        end = time.monotonic() + 180
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert nodes[1].poll() is None and time.monotonic() < end, (root / "worker.log").read_text()[-3000:]
            time.sleep(1)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
        yield {"url": f"http://127.0.0.1:{http_port}", "root": root}
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                kill_cluster_actor()
                ray.shutdown()
        finally:
            os.environ.pop("RAY_AUTH_MODE", None)
            for proc in reversed(nodes):
                _stop(proc)
            shutil.rmtree(root, ignore_errors=True)


def _other_portrait() -> bytes:
    """The bundled portrait mirrored: a face the default avatar is not."""
    import io

    from PIL import Image, ImageOps

    out = io.BytesIO()
    ImageOps.mirror(Image.open(PORTRAIT).convert("RGB")).save(out, format="PNG")
    return out.getvalue()


def _cached_ids(cache_dir: Path) -> set[str]:
    if not cache_dir.exists():
        return set()
    return {p.name for p in cache_dir.rglob("*") if p.is_dir() and len(p.name) == 64}


def test_avatar_uploaded_on_one_node_generates_and_deletes_on_the_other(two_nodes) -> None:
    from lipsync.server.ray_serve import build_app
    from lipsync.settings import Settings

    url, root = two_nodes["url"], two_nodes["root"]
    for name, resource in (("na", "node_a"), ("nb", "node_b")):
        # No cache_dir here: each replica reads LIPSYNC_CACHE_DIR on its own node.
        settings = Settings(engine="fake", chunk_seconds=0.5)
        serve.run(
            build_app(settings, engines={"fake": "tests.e2e.fake_engine:FakeEngine"}, app_name=name,
                      num_cpus=0.5, resources={resource: 1}),
            name=name,
            route_prefix=f"/{name}",
        )
    with httpx.Client(base_url=url, timeout=180) as client:
        nodes = {
            name: {r["node_id"] for r in client.get(f"/{name}/stats").json()["cluster"]["replicas"].values()}
            for name in ("na", "nb")
        }
        created = client.post("/na/avatars", files={"image": ("face.png", _other_portrait(), "image/png")})
        assert created.status_code == 201, created.text
        avatar_id = created.json()["id"]
        assert avatar_id in _cached_ids(root / "cache-a") and avatar_id not in _cached_ids(root / "cache-b")

        # Node B has never seen it: found through the store, rebuilt into B's own cache.
        listed = client.get(f"/nb/avatars/{avatar_id}")
        assert listed.status_code == 200, listed.text
        video = client.post("/nb/generate", data={"avatar_id": avatar_id},
                            files={"audio": ("a.wav", wav_bytes(1.0), "audio/wav")})
        assert video.status_code == 200, video.text
        assert video.headers["x-avatar-id"] == avatar_id and video.content[4:8] == b"ftyp"
        assert avatar_id in _cached_ids(root / "cache-b")

        # Deleted through node B: gone for node A too (its stale local copy is dropped).
        assert client.delete(f"/nb/avatars/{avatar_id}").status_code == 200
        gone = client.post("/na/generate", data={"avatar_id": avatar_id},
                           files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
        assert gone.status_code == 404 and gone.json()["code"] == "avatar_not_found", gone.text
        assert client.get(f"/na/avatars/{avatar_id}").status_code == 404
        assert avatar_id not in _cached_ids(root / "cache-a")
    # The two applications really ran on two different nodes.
    assert nodes["na"] and nodes["nb"] and nodes["na"].isdisjoint(nodes["nb"]), nodes
