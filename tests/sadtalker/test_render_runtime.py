"""The renderer's runtime paths on the CPU: the sliced decoder, batch-by-batch output, I420 made
on the device, and the memory model the engine sizes its batches with.

The CUDA-only halves (graph replay, pinned copies) are in ``test_cuda.py``.
"""

from __future__ import annotations

import weakref

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the sadtalker extra)")

from torch.utils._python_dispatch import TorchDispatchMode

from lipsync.engines.sadtalker.engine import ACTIVATION_BUDGET_BYTES, auto_batch_size, auto_upsample_slice
from lipsync.engines.sadtalker.render import FaceRenderer, frames_to_i420
from tests.sadtalker.test_parity_render import TINY, _tiny_renderer


# --- I420 on the device ---------------------------------------------------------------------------
def _planes(i420: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return i420[:h], i420[h:h + h // 4].reshape(h // 2, w // 2), i420[h + h // 4:].reshape(h // 2, w // 2)


def test_i420_luma_matches_cv2_and_chroma_is_the_bt601_of_each_2x2_mean():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    out = frames_to_i420(tensor).numpy()
    assert out.shape == (3, 72, 64) and out.dtype == np.uint8
    for frame, got in zip(rgb, out):
        ref = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
        y, u, v = _planes(got, 48, 64)
        np.testing.assert_allclose(y, ref[:48], atol=1)  # same BT.601 limited-range luma as cv2
        mean = frame.astype(np.float64).reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
        r, g, b = mean[..., 0], mean[..., 1], mean[..., 2]
        u_ref = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
        v_ref = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
        np.testing.assert_allclose(u, np.round(u_ref), atol=1)
        np.testing.assert_allclose(v, np.round(v_ref), atol=1)


def test_i420_of_flat_colours_matches_cv2_exactly_enough_and_rejects_odd_sizes():
    # on flat 2x2 blocks taking the mean and taking the top-left pixel agree: all planes within 1
    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 120, 90]],
                       np.uint8)
    rgb = np.repeat(np.repeat(colours[None, :, None, :], 4, axis=0), 4, axis=2).reshape(4, 24, 3)
    rgb = rgb.copy()
    got = frames_to_i420(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    np.testing.assert_allclose(got.astype(int), cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).astype(int), atol=1)
    with pytest.raises(ValueError, match="even"):
        frames_to_i420(torch.zeros(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        frames_to_i420(torch.zeros(3, 8, 8))


# --- the sliced decoder -------------------------------------------------------------------------
def tiny_case(seed: int, rows: int, batch_size: int = 4):
    """(renderer, source state, coefficient rows): a tiny random renderer and a random portrait."""
    renderer = _tiny_renderer(batch_size=batch_size)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (TINY, TINY, 3), dtype=np.uint8)
    state = renderer.prepare_source(image, rng.normal(0, 0.3, 70).astype(np.float32))
    return renderer, state, rng.normal(0, 0.3, (rows, 70)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return tiny_case(4, 11)


@pytest.mark.parametrize("step", [1, 3])
def test_slicing_the_upsampling_blocks_leaves_every_frame_unchanged(tiny, step):
    renderer, state, coeffs = tiny
    kp = renderer.driving_keypoints(state, coeffs[:4])
    renderer.generator.upsample_slice = None
    whole = renderer.generate(state, kp)
    try:
        renderer.generator.upsample_slice = step
        sliced = renderer.generate(state, kp)
    finally:
        renderer.generator.upsample_slice = None
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)


class _PeakStorage(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, counted from each op's outputs until released."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _drop(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key and key not in self._seen:
                    nbytes = t.untyped_storage().nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._drop, key, nbytes)
        return out


def test_slicing_lowers_the_batch_peak_as_the_memory_model_says():
    """Counted on real-size networks at 128 px: the per-frame split of the model (UPSAMPLE_SHARE)
    is what the sliced decoder actually saves, within a tenth."""
    from lipsync.engines.sadtalker.generator import OcclusionAwareSPADEGenerator
    from lipsync.engines.sadtalker.keypoints import KPDetector
    from lipsync.engines.sadtalker.mapping import MappingNet

    torch.manual_seed(0)
    renderer = FaceRenderer(KPDetector(), OcclusionAwareSPADEGenerator(), MappingNet(coeff_nc=70), size=128,
                            batch_size=4).to_runtime("cpu")
    state = renderer.prepare_source(np.full((128, 128, 3), 120, np.uint8), np.zeros(70, np.float32))
    kp = renderer.driving_keypoints(state, np.random.default_rng(0).normal(0, 0.1, (4, 70)).astype(np.float32))

    def peak(step):
        renderer.generator.upsample_slice = step
        with torch.inference_mode(), _PeakStorage() as mode:
            renderer.generate(state, kp)
        return mode.peak

    whole, one = peak(None), peak(1)
    renderer.generator.upsample_slice = None
    assert one < 0.5 * whole
    share = FaceRenderer.UPSAMPLE_SHARE
    predicted = ((1 - share) * 4 + share) / 4  # model: sliced peak / whole-batch peak
    assert abs(one / whole - predicted) < 0.1, (one / whole, predicted)


def test_batch_sizes_fit_the_activation_budget():
    for size in (256, 512):
        step = auto_upsample_slice(size, "cuda")
        batch = auto_batch_size(size, "cuda", fp16=True)
        assert FaceRenderer.batch_bytes(size, 2, batch, step) <= ACTIVATION_BUDGET_BYTES
        assert FaceRenderer.batch_bytes(size, 2, batch, step) < FaceRenderer.batch_bytes(size, 2, batch, None)
    assert auto_batch_size(512, "cuda", fp16=True) >= 8  # sliced: the batch 8 fits the budget
    assert auto_batch_size(512, "cpu", fp16=True) == 4


# --- batch by batch, RGB or I420 -----------------------------------------------------------------
def test_render_batches_hand_out_each_batch_and_add_up_to_render(tiny):
    renderer, state, coeffs = tiny
    parts = list(renderer.render_batches(state, coeffs, context_before=2, context_after=1))
    assert [len(p) for p in parts] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(parts),
                                  renderer.render(state, coeffs, context_before=2, context_after=1))


def test_i420_output_is_the_rgb_frames_converted(tiny):
    renderer, state, coeffs = tiny
    rgb = renderer.render(state, coeffs, output_size=96)
    yuv = renderer.render(state, coeffs, output_size=96, pixel_format="yuv420p")
    assert rgb.shape == (11, 96, 96, 3) and yuv.shape == (11, 144, 96)
    for frame, got in zip(rgb, yuv):
        ref = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
        # luma from the unrounded frames: within a level of cv2's from the rounded ones
        np.testing.assert_allclose(got[:96].astype(int), ref[:96].astype(int), atol=1)
    empty = renderer.render(state, coeffs[:3], context_before=3, pixel_format="yuv420p", output_size=96)
    assert empty.shape == (0, 144, 96)
    with pytest.raises(ValueError, match="pixel format"):
        renderer.render(state, coeffs, pixel_format="nv12")


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        _tiny_renderer().to_runtime("cpu", cuda_graphs=True)
    assert _tiny_renderer().cuda_graphs is False


@pytest.mark.slow
def test_compiled_renderer_draws_the_eager_frames():
    """torch.compile (inductor's CPU backend here; ~45 s on 2 cores) on the decoder and hourglass:
    the wiring the CUDA setting uses, frame for frame."""
    eager = _tiny_renderer(batch_size=4)
    compiled = _tiny_renderer(batch_size=4).to_runtime("cpu", compile=True)
    assert compiled.compiled and not eager.compiled
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (TINY, TINY, 3), dtype=np.uint8)
    coeffs = rng.normal(0, 0.3, (6, 70)).astype(np.float32)
    a = eager.render(eager.prepare_source(image, np.zeros(70, np.float32)), coeffs)
    state = compiled.prepare_source(image, np.zeros(70, np.float32))
    b = compiled.render(state, coeffs)  # a batch of 4 and a short one of 2
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # short batches are padded to the compiled shape: another remainder compiles nothing new
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert compiled.render(state, rng.normal(0, 0.3, (7, 70)).astype(np.float32)).shape[0] == 7
    assert counters["stats"]["unique_graphs"] == graphs
