"""CoefficientGenerator: chunked Audio2Coeff with continuous blinks and head pose, still mode, scaling.

Networks have seeded random weights (PyTorch's default init); where only one network matters the
other is a small stand-in, to keep these tests fast.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the sadtalker extra)")

from lipsync.engines.sadtalker import audio as A
from lipsync.engines.sadtalker.audio2exp import Audio2Exp
from lipsync.engines.sadtalker.audio2pose import Audio2Pose
from lipsync.engines.sadtalker.coeffs import (
    BLINK_GAP_SECONDS,
    CONTEXT_SECONDS,
    FIRST_BLINK_SECONDS,
    CoefficientGenerator,
)
from lipsync.engines.sadtalker.face3d import FaceCoefficients
from lipsync.errors import ConfigError, InvalidInput
from lipsync.types import MotionOptions
from tests.sadtalker.chunking import FPS, chunks, speechlike, total_frames


def _source(seed: int = 0) -> FaceCoefficients:
    rng = np.random.default_rng(seed)
    coeff = rng.standard_normal((1, 73)).astype(np.float32) * 0.2
    return FaceCoefficients(full_3dmm=np.zeros((1, 257), np.float32), coeff_3dmm=coeff)


class RecordingExp(torch.nn.Module):
    """Stand-in for Audio2Exp: a cheap function of the audio, recording the blink ratios it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.ratios: list[np.ndarray] = []

    def predict(self, windows: torch.Tensor, ref: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        self.ratios.append(ratio.cpu().numpy().copy())
        return windows.mean(dim=3)[:, 0, :64] * self.weight + ref + ratio[:, None]


@pytest.fixture(scope="module")
def exp_net() -> Audio2Exp:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return Audio2Exp().eval()


@pytest.fixture(scope="module")
def pose_net() -> Audio2Pose:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = Audio2Pose()
        torch.nn.init.normal_(net.netG.decoder.classbias)  # upstream initialises it with randn
        return net.eval()


def _run(gen: CoefficientGenerator, wav: np.ndarray, sizes, **kw) -> np.ndarray:
    return np.concatenate([gen.process(c) for c in chunks(wav, sizes, CONTEXT_SECONDS, **kw)])


# --- still mode, expression ------------------------------------------------------------------
def test_still_mode_never_runs_audio2pose_and_keeps_the_source_pose():
    spy = mock.create_autospec(Audio2Pose, instance=True)
    source = _source()
    gen = CoefficientGenerator(RecordingExp(), spy, source, MotionOptions(still=True), seed=3)
    wav = speechlike(4.0)
    out = _run(gen, wav, 75)
    assert out.shape == (total_frames(wav), 70) and out.dtype == np.float32
    assert spy.mock_calls == []
    np.testing.assert_array_equal(out[:, 64:], np.repeat(source.coeff_3dmm[:, 64:70], len(out), axis=0))
    assert np.ptp(out[:, :64], axis=0).max() > 0.1  # the expression does follow the audio


def test_still_mode_needs_no_audio2pose_but_head_motion_does():
    wav = speechlike(1.0)
    gen = CoefficientGenerator(RecordingExp(), None, _source(), MotionOptions(still=True))
    assert _run(gen, wav, 75).shape == (25, 70)
    with pytest.raises(ConfigError, match="Audio2Pose"):
        CoefficientGenerator(RecordingExp(), None, _source(), MotionOptions(still=False))


@pytest.mark.slow
def test_expression_is_the_network_output_times_the_expression_scale(exp_net):
    """Upstream multiplies the predicted coefficients (get_facerender_data: 3dmm[:, :64] *= scale)."""
    wav = speechlike(1.6, seed=1)
    n = total_frames(wav)
    source = _source(1)
    windows = torch.from_numpy(A.mel_windows(A.mel_spectrogram(wav[: A.clip_samples(n)]), 0, n, FPS))
    expected = exp_net.predict(windows, torch.from_numpy(source.exp.copy()), torch.zeros(n)).numpy()
    for scale in (1.0, 0.3):
        gen = CoefficientGenerator(exp_net, None, source, MotionOptions(expression_scale=scale, blink=False))
        out = _run(gen, wav, 30)
        np.testing.assert_allclose(out[:, :64], scale * expected, rtol=0, atol=1e-5)
    assert np.abs(expected).max() > 0.1


@pytest.mark.slow
def test_chunking_does_not_change_expression_or_blinks(exp_net):
    wav = speechlike(3.4, seed=2)
    outs = []
    for sizes in ([75], [40, 13, 1], [total_frames(wav)]):
        gen = CoefficientGenerator(exp_net, None, _source(), MotionOptions(blink=True), seed=11)
        outs.append(_run(gen, wav, sizes))
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outs[2], outs[0], rtol=0, atol=1e-5)


# --- blinks ----------------------------------------------------------------------------------
def _blink_ratio(seconds: float, sizes, *, seed: int = 5, blink: bool = True) -> tuple[np.ndarray, int]:
    exp = RecordingExp()
    gen = CoefficientGenerator(exp, None, _source(), MotionOptions(blink=blink), seed=seed)
    silence = np.zeros(int(seconds * 16000), np.float32)
    n_chunks = len(list(chunks(silence, sizes, CONTEXT_SECONDS)))
    _run(gen, silence, sizes)
    return np.concatenate(exp.ratios), n_chunks


def _onsets(ratio: np.ndarray) -> np.ndarray:
    closed = ratio > 0
    return np.flatnonzero(closed & ~np.concatenate([[False], closed[:-1]]))


def test_blinks_follow_one_natural_schedule_not_the_chunks():
    ratio, n_chunks = _blink_ratio(60.0, 75)
    onsets = _onsets(ratio)
    # Upstream's shape (peak fully closed), 2-5 s apart: 11..30 blinks a minute.
    assert ratio.max() == 1.0 and np.all(np.isin(ratio, np.float32([0.0, 0.5, 0.9, 1.0])))
    assert 11 <= len(onsets) <= 30
    gaps = np.diff(onsets) / FPS
    assert gaps.min() >= BLINK_GAP_SECONDS[0] and gaps.max() <= BLINK_GAP_SECONDS[1] + 0.2 + 1e-9
    assert FIRST_BLINK_SECONDS[0] <= onsets[0] / FPS <= FIRST_BLINK_SECONDS[1]
    # Not one per chunk, nor at a fixed place inside chunks.
    per_chunk = np.bincount(onsets // 75, minlength=n_chunks)
    assert set(per_chunk) != {1}
    assert len(set(onsets % 75)) > len(onsets) // 2
    # The same schedule whatever the chunking (blinks that straddle a border included).
    np.testing.assert_array_equal(_blink_ratio(60.0, [40, 7, 75])[0], ratio)
    np.testing.assert_array_equal(_blink_ratio(60.0, 1500)[0], ratio)


def test_blink_schedule_depends_on_the_seed_and_can_be_off():
    a, _ = _blink_ratio(20.0, 75, seed=1)
    b, _ = _blink_ratio(20.0, 75, seed=2)
    assert not np.array_equal(_onsets(a), _onsets(b))
    np.testing.assert_array_equal(_blink_ratio(20.0, 75, seed=1)[0], a)
    off, _ = _blink_ratio(20.0, 75, blink=False)
    assert not off.any()


def test_without_a_seed_the_audio_seeds_the_motion():
    def ratio(wav: np.ndarray) -> np.ndarray:
        exp = RecordingExp()
        _run(CoefficientGenerator(exp, None, _source(), MotionOptions(seed=None), seed=None), wav, 75)
        return np.concatenate(exp.ratios)

    a, b = speechlike(20.0, seed=1), speechlike(20.0, seed=2)
    np.testing.assert_array_equal(ratio(a), ratio(a.copy()))
    assert not np.array_equal(_onsets(ratio(a)), _onsets(ratio(b)))


# --- head pose -------------------------------------------------------------------------------
def _pose(pose_net, wav, sizes, *, seed=4, style=0, restart=False) -> np.ndarray:
    options = MotionOptions(still=False, blink=False)
    if not restart:
        gen = CoefficientGenerator(RecordingExp(), pose_net, _source(), options, pose_style=style, seed=seed)
        return _run(gen, wav, sizes)[:, 64:]
    # What naive chunking does: every chunk starts afresh (noise restarted, pose from the source).
    out = []
    for c in chunks(wav, sizes, CONTEXT_SECONDS):
        gen = CoefficientGenerator(RecordingExp(), pose_net, _source(), options, pose_style=style, seed=seed)
        out.append(gen.process(c)[:, 64:])
    return np.concatenate(out)


@pytest.mark.slow
def test_head_pose_is_continuous_across_chunk_borders(pose_net):
    wav = speechlike(4.8, seed=3)
    size = 40
    pose = _pose(pose_net, wav, size)
    assert pose.shape == (120, 6)
    assert np.abs(pose - _source().pose).max() > 0.05  # the head does move
    steps = np.linalg.norm(np.diff(pose, axis=0), axis=1)
    border = np.arange(size, len(pose), size) - 1  # step from a chunk's last frame to the next's first
    inside = np.delete(steps, border)
    typical = min(np.percentile(inside, 90), 3 * np.median(inside))
    assert steps[border].max() <= typical
    # The check has teeth: restarting per chunk, as upstream-style chunking would, jumps at borders.
    naive = np.linalg.norm(np.diff(_pose(pose_net, wav, size, restart=True), axis=0), axis=1)
    assert naive[border].max() > 3 * typical


@pytest.mark.slow
def test_head_pose_is_seeded_and_styled(pose_net):
    wav = speechlike(2.0, seed=4)
    a = _pose(pose_net, wav, 25, seed=1)
    np.testing.assert_array_equal(_pose(pose_net, wav, 25, seed=1), a)
    assert np.abs(_pose(pose_net, wav, 25, seed=2) - a).max() > 1e-3
    assert np.abs(_pose(pose_net, wav, 25, seed=1, style=30) - a).max() > 1e-3
    # A seed in the options wins over the engine's fallback seed.
    options = MotionOptions(still=False, blink=False, seed=1)
    gen = CoefficientGenerator(RecordingExp(), pose_net, _source(), options, seed=99)
    np.testing.assert_array_equal(_run(gen, wav, 25)[:, 64:], a)


# --- misuse ----------------------------------------------------------------------------------
def test_bad_pose_style_and_out_of_order_chunks_are_refused():
    with pytest.raises(InvalidInput, match="pose style"):
        CoefficientGenerator(RecordingExp(), None, _source(), MotionOptions(), pose_style=46)
    gen = CoefficientGenerator(RecordingExp(), None, _source(), MotionOptions())
    cut = list(chunks(speechlike(2.0), 20, CONTEXT_SECONDS))
    gen.process(cut[0])
    with pytest.raises(ValueError, match="in order"):
        gen.process(cut[2])
