"""The renderer and engine on a CUDA GPU: graph replay, pinned batch hand-off, I420, fp16.

Skipped without CUDA (CI has none); run on a GPU machine with
``python -m pytest tests/sadtalker/test_cuda.py``. Networks are our own at real size with
seeded random weights, saved in the official layout (no upstream code, nothing downloaded).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.sadtalker.conftest import require_torch

torch = require_torch()
pytestmark = [
    pytest.mark.allow_skip("CUDA only: no CI machine has a GPU"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

from lipsync.engines.sadtalker.render import FaceRenderer, frames_to_i420

SIZE = 256


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from bench_sadtalker import random_checkpoints

    return random_checkpoints(tmp_path_factory.mktemp("ckpt"), size=SIZE)


@pytest.fixture(scope="module")
def weights(checkpoints):
    from lipsync.engines.sadtalker.checkpoints import load_weights

    return load_weights(checkpoints)


def _inputs(seed: int, frames: int = 11):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return image, (rng.standard_normal((frames, 70)) * 0.1).astype(np.float32)


def _renderer(weights, **kw) -> FaceRenderer:
    kw.setdefault("batch_size", 4)
    return FaceRenderer.from_weights(weights, size=SIZE, device="cuda", fp16=True, upsample_slice=2, **kw)


def test_graph_replay_gives_the_eager_frames_for_full_and_short_batches_and_two_avatars(weights):
    graphed, eager = _renderer(weights, cuda_graphs=True), _renderer(weights)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    for seed in (1, 2, 1):  # two source states, interleaved: their graphs share one memory pool
        image, coeffs = _inputs(seed)
        out_g = graphed.render(graphed.prepare_source(image, np.zeros(70, np.float32)), coeffs).astype(float)
        out_e = eager.render(eager.prepare_source(image, np.zeros(70, np.float32)), coeffs).astype(float)
        assert out_g.shape == (11, SIZE, SIZE, 3)  # 4 + 4 + a short batch of 3 (padded in the graph)
        # fp16 kernels may differ between a batch of 3 and a padded 4: a level or two here and
        # there; stale or mixed-up keypoints would move whole frames as much as the motion does
        err = np.abs(out_g - out_e).mean(axis=(1, 2, 3))
        motion = np.abs(out_e[1:] - out_e[:-1]).mean()
        assert err.max() < 0.1 * motion, (err, motion)
    assert len(graphed._graphs) == 3  # one per state object (prepare_source made a new one each time)


@pytest.mark.parametrize("graphs", [False, True])
def test_batches_from_pinned_memory_are_each_their_own_frames(weights, graphs):
    renderer = _renderer(weights, cuda_graphs=graphs)
    image, coeffs = _inputs(3, frames=13)
    state = renderer.prepare_source(image, np.zeros(70, np.float32))
    parts = list(renderer.render_batches(state, coeffs))
    assert [len(p) for p in parts] == [4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(parts), renderer.render(state, coeffs))
    # a later render must not overwrite frames already handed out
    first = parts[0].copy()
    renderer.render(state, coeffs[::-1].copy())
    np.testing.assert_array_equal(parts[0], first)


def test_i420_on_the_gpu_matches_the_cpu_conversion(weights):
    import cv2

    renderer = _renderer(weights)
    image, coeffs = _inputs(4)
    state = renderer.prepare_source(image, np.zeros(70, np.float32))
    yuv = renderer.render(state, coeffs, pixel_format="yuv420p", output_size=512)
    rgb = renderer.render(state, coeffs, output_size=512)
    assert yuv.shape == (11, 768, 512) and rgb.shape == (11, 512, 512, 3)
    for got, frame in zip(yuv, rgb):  # luma from unrounded frames: within a level of cv2's
        ref = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
        assert np.abs(got[:512].astype(int) - ref[:512].astype(int)).max() <= 1
    ref = frames_to_i420(torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255).numpy()
    assert np.abs(yuv[:, 512:].astype(int) - ref[:, 512:].astype(int)).max() <= 1  # chroma


def test_fp16_frames_within_1e_2_of_fp32(weights):
    image, coeffs = _inputs(5, frames=8)
    got = {}
    for fp16 in (False, True):
        renderer = FaceRenderer.from_weights(weights, size=SIZE, device="cuda", fp16=fp16, batch_size=8,
                                             cuda_graphs=False)
        state = renderer.prepare_source(image, np.zeros(70, np.float32))
        torch.backends.cudnn.allow_tf32 = fp16  # the reference in true fp32
        try:
            with torch.inference_mode():
                got[fp16] = renderer.generate(state, renderer.driving_keypoints(state, coeffs)).float()
        finally:
            torch.backends.cudnn.allow_tf32 = True
    diff = (got[True] - got[False]).abs()
    assert float(diff.mean()) < 1e-2, (float(diff.mean()), float(diff.max()))


def _bundled_avatar(tmp_path):
    """The bundled portrait's avatar: detected here, or (on a GPU machine without dlib's wheels)
    read from the avatar cache named by LIPSYNC_TEST_AVATAR_CACHE, built beforehand elsewhere."""
    import os
    from pathlib import Path

    from lipsync.avatar import PRECOMPUTE_VERSION, AvatarCache

    root = os.environ.get("LIPSYNC_TEST_AVATAR_CACHE")
    if root:
        from lipsync.avatar import open_cache
        from lipsync.settings import Settings

        cache = open_cache(Settings(cache_dir=Path(root)))
        return cache.load(cache.list()[0].id), cache
    from lipsync.avatar import precompute_avatar
    from lipsync.io import load_image
    from lipsync.pipeline import bundled_sample

    path = bundled_sample("portrait.png")
    cache = AvatarCache(tmp_path, PRECOMPUTE_VERSION)
    return precompute_avatar(load_image(path), cache=cache, source_bytes=path.read_bytes())[0], cache


def test_engine_session_on_cuda_streams_i420_batches(checkpoints, tmp_path):
    from lipsync.engines.sadtalker.engine import SadTalkerEngine
    from lipsync.io import iter_chunks
    from lipsync.types import AudioClip, MotionOptions

    engine = SadTalkerEngine.from_checkpoints(checkpoints, device="cuda", batch_size=8, upsample_slice=2,
                                              cuda_graphs=True)
    assert engine.renderer.cuda_graphs and engine.describe()["cuda_graphs"]
    avatar, _ = _bundled_avatar(tmp_path)
    directory = tmp_path / "engine"
    engine.prepare_avatar(avatar, directory)
    clip = AudioClip(samples=np.random.default_rng(0).normal(0, 0.05, 32_000).astype(np.float32),
                     sample_rate=16_000)
    options = MotionOptions(size=512, seed=1)
    session = engine.start(avatar, options, clip.n_frames(25), assets=directory)
    got = []
    for chunk in iter_chunks(clip, fps=25, chunk_seconds=3.0, context=engine.context_for(options)):
        got += list(session.render_iter(chunk))
    assert sum(len(b) for b in got) == 50
    assert [b.first_index for b in got] == list(np.cumsum([0] + [len(b) for b in got[:-1]]))
    assert all(b.pixel_format == "yuv420p" and (b.width, b.height) == (512, 512) for b in got)
    assert max(len(b) for b in got) == 8


def test_eager_cuda_pads_short_batches_to_warmed_shapes_and_draws_the_same_frames(weights):
    renderer = _renderer(weights)
    assert renderer.pad_batches and not renderer.cuda_graphs
    image, coeffs = _inputs(6, frames=7)  # 4 + a tail of 3, run as 4
    state = renderer.prepare_source(image, np.zeros(70, np.float32))
    assert renderer.warm_shapes(state, output_size=2 * SIZE, pixel_format="yuv420p", windows=8) == [1, 2, 4]
    padded = renderer.render(state, coeffs).astype(float)
    renderer.pad_batches = False
    plain = renderer.render(state, coeffs).astype(float)
    err = np.abs(padded - plain).mean(axis=(1, 2, 3))
    motion = np.abs(plain[1:] - plain[:-1]).mean()
    assert err.max() < 0.1 * motion, (err, motion)
