"""Padded batch shapes (``shapes.py``): on CUDA every network call runs at one of a few batch sizes
that warm-up has already shown cuDNN. Checked here on the CPU by switching the padding on: the
shapes the networks see, and that padding changes no output row.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the sadtalker extra)")

from lipsync.engines.sadtalker.audio2exp import Audio2Exp
from lipsync.engines.sadtalker.audio2pose import Audio2Pose
from lipsync.engines.sadtalker.coeffs import CONTEXT_SECONDS, EXP_BATCH_BUCKET, CoefficientGenerator
from lipsync.engines.sadtalker.render import MAPPING_SLICE
from lipsync.engines.sadtalker.shapes import call_padded, pad_rows, shape_bucket
from lipsync.types import MotionOptions
from tests.sadtalker.chunking import chunks, speechlike
from tests.sadtalker.test_coeffs import _source
from tests.sadtalker.test_parity_render import TINY
from tests.sadtalker.test_render_runtime import tiny_case


@pytest.mark.parametrize(("n", "cap", "bucket"), [
    (0, 8, 1), (1, 8, 1), (2, 8, 2), (3, 8, 4), (5, 8, 8), (8, 8, 8), (9, 8, 16), (17, 8, 24),
    (6, 12, 8), (9, 12, 12), (75, 128, 128), (62, 256, 64), (1, 1, 1), (3, 1, 3),
])
def test_shape_bucket_is_the_next_power_of_two_up_to_the_cap_then_its_multiples(n, cap, bucket):
    assert shape_bucket(n, cap) == bucket


def test_at_most_log2_cap_plus_one_shapes_below_the_cap():
    assert sorted({shape_bucket(n, 32) for n in range(1, 33)}) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError):
        shape_bucket(-1, 8)
    with pytest.raises(ValueError):
        shape_bucket(3, 0)


def test_pad_rows_repeats_the_last_row():
    rows = torch.arange(6.0).reshape(3, 2)
    out = pad_rows(rows, 5)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out[:3], rows)
    torch.testing.assert_close(out[3:], rows[-1:].expand(2, 2))
    assert pad_rows(rows, 3) is rows and pad_rows(rows, 2) is rows


def test_call_padded_pads_every_row_tensor_and_cuts_the_result_back():
    seen = []

    def fn(a, b):
        seen.append((a.shape[0], b.shape[0]))
        return a + b

    a, b = torch.arange(5.0), torch.ones(5)
    torch.testing.assert_close(call_padded(fn, 16, True, a, b), a + b)
    torch.testing.assert_close(call_padded(fn, 16, False, a, b), a + b)
    assert seen == [(8, 8), (5, 5)]


class _Shapes:
    """Records the batch sizes the generator and the mapping net are called with."""

    def __init__(self, renderer) -> None:
        self.generator: list[int] = []
        self.mapping: list[int] = []
        gen, mapping = renderer.generate, renderer.mapping.forward

        def generate(state, kp):
            self.generator.append(kp.shape[0])
            return gen(state, kp)

        def forward(windows):
            self.mapping.append(windows.shape[0])
            return mapping(windows)

        renderer.generate = generate
        renderer.mapping.forward = forward


@pytest.fixture()
def tiny():  # its own renderer per test: the tests switch padding on and wrap its methods
    return tiny_case(5, 10)


def test_padded_batches_draw_the_same_frames_at_bucket_shapes(tiny):
    renderer, state, coeffs = tiny
    plain = renderer.render(state, coeffs, context_before=1, context_after=2)  # 7 frames: 4 + 3
    shapes = _Shapes(renderer)
    renderer.pad_batches = True
    padded = renderer.render(state, coeffs, context_before=1, context_after=2)
    assert shapes.generator == [4, 4]  # the 3-frame tail ran as 4
    assert shapes.mapping == [8]  # 7 windows ran as 8
    assert padded.shape == plain.shape == (7, TINY, TINY, 3)
    assert np.abs(padded.astype(int) - plain.astype(int)).max() <= 1  # batch-size rounding of the convs


def test_warm_shapes_runs_each_bucket_once_and_nothing_without_padding(tiny):
    renderer, state, _ = tiny
    shapes = _Shapes(renderer)
    assert renderer.warm_shapes(state) == []
    assert shapes.generator == [] and shapes.mapping == []
    renderer.pad_batches = True
    assert renderer.warm_shapes(state, output_size=2 * TINY, pixel_format="yuv420p", windows=16) == [1, 2, 4]
    assert shapes.generator == [1, 2, 4]
    assert sorted(set(shapes.mapping)) == [1, 2, 4, 8, 16]
    # what a request then runs is among the warmed shapes
    before = set(shapes.generator), set(shapes.mapping)
    for n in range(1, 12):
        renderer.render(state, np.zeros((n, 70), np.float32), output_size=2 * TINY, pixel_format="yuv420p")
    assert set(shapes.generator) == before[0]
    assert set(shapes.mapping) <= before[1] | {16}
    assert MAPPING_SLICE >= 16


def test_padded_audio2exp_batches_give_the_same_coefficients():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = Audio2Exp().eval()
    seen: list[int] = []
    predict = net.predict

    def recording(windows, ref, ratio):
        seen.append(windows.shape[0])
        return predict(windows, ref, ratio)

    net.predict = recording
    wav = speechlike(3.4, seed=2)
    out = {}
    for pad in (False, True):
        gen = CoefficientGenerator(net, None, _source(2), MotionOptions(still=True, blink=True), seed=3)
        gen.pad_batches = pad
        seen.clear()
        out[pad] = np.concatenate([gen.process(c) for c in chunks(wav, 40, CONTEXT_SECONDS)])
        sizes = list(seen)
        if pad:
            assert all(s in (1, 2, 4, 8, 16, 32, 64, EXP_BATCH_BUCKET) for s in sizes), sizes
        else:
            assert 40 in sizes, sizes  # a chunk's own frames, unpadded
    assert CoefficientGenerator(net, None, _source(2), MotionOptions(still=True)).pad_batches is False  # CPU
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)


def test_padded_audio2pose_encoder_batches_give_the_same_head_motion():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        pose = Audio2Pose().eval()
        torch.nn.init.normal_(pose.netG.decoder.classbias)
        exp = Audio2Exp().eval()
    seen: list[int] = []
    encode = pose.encode_audio

    def recording(windows):
        seen.append(windows.shape[0])
        return encode(windows)

    pose.encode_audio = recording
    wav = speechlike(2.6, seed=4)
    out = {}
    for pad in (False, True):
        gen = CoefficientGenerator(exp, pose, _source(4), MotionOptions(still=False), seed=5)
        gen.pad_batches = pad
        seen.clear()
        out[pad] = np.concatenate([gen.process(c) for c in chunks(wav, 30, CONTEXT_SECONDS)])
        assert (set(seen) <= {1, 2, 4, 8, 16, 32, 64, EXP_BATCH_BUCKET}) == pad, seen
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)
