"""Our renderer networks (mapping, keypoints, generator, FaceRenderer) against upstream SadTalker's.

Upstream modules (PyPI ``sadtalker-z==0.1.6``, see ``upstream.py``) are built at real size with
seeded random weights - batch-norm statistics randomised too, so folding them is exercised -
their state dicts are loaded strictly into ours, and both run on the same inputs in fp32 on the
CPU. The upstream frame reference is its own ``make_animation``.

The tests at the end use a tiny renderer (same classes, small widths) and need no upstream code:
chunked rendering with context rows, batch invariance, the fp16 frame path and paste-back.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import need

torch = pytest.importorskip("torch", reason="torch is not installed (the sadtalker extra)")

from lipsync.engines.sadtalker.generator import (
    OcclusionAwareSPADEGenerator,
    fold_batchnorms,
)
from lipsync.engines.sadtalker.keypoints import KPDetector, transform_keypoints
from lipsync.engines.sadtalker.mapping import MappingNet
from lipsync.engines.sadtalker.render import (
    FaceRenderer,
    frames_to_uint8,
    make_paste_target,
    paste_back,
    semantic_windows,
)
from lipsync.errors import CheckpointError

# upstream src/config/facerender.yaml (facerender_still.yaml differs only in mapping coeff_nc: 73)
COMMON = {"num_kp": 15, "image_channel": 3, "feature_channel": 32, "estimate_jacobian": False}
KP_PARAMS = {
    "temperature": 0.1,
    "block_expansion": 32,
    "max_features": 1024,
    "scale_factor": 0.25,
    "num_blocks": 5,
    "reshape_channel": 16384,
    "reshape_depth": 16,
}
GEN_PARAMS = {
    "block_expansion": 64,
    "max_features": 512,
    "num_down_blocks": 2,
    "reshape_channel": 32,
    "reshape_depth": 16,
    "num_resblocks": 6,
    "estimate_occlusion_map": True,
    "dense_motion_params": {
        "block_expansion": 32,
        "max_features": 1024,
        "num_blocks": 5,
        "reshape_depth": 16,
        "compress": 4,
    },
}
MAPPING_PARAMS = {"coeff_nc": 70, "descriptor_nc": 1024, "layer": 3, "num_kp": 15, "num_bins": 66}
SIZE = 256
RADIUS = 13  # upstream's semantic_radius


def _upstream(name: str):
    from tests.sadtalker.upstream import UpstreamUnavailable, upstream_module

    try:
        return upstream_module(name)
    except (UpstreamUnavailable, OSError) as e:
        need(False, f"upstream SadTalker wheel unavailable: {e}")


def _randomise_batchnorm(module: torch.nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.4 + 0.8)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _source_image(size: int = SIZE) -> np.ndarray:
    """A smooth synthetic 'portrait': gradients and a bright ellipse (deterministic)."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    face = ((x - 0.5) ** 2 / 0.09 + (y - 0.45) ** 2 / 0.16) < 1
    img = np.stack([0.3 + 0.4 * x, 0.2 + 0.5 * y, 0.5 - 0.3 * x * y], axis=-1)
    img[face] = img[face] * 0.4 + np.array([0.8, 0.6, 0.5]) * 0.6
    return (img * 255).round().astype(np.uint8)


def _coefficients(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    exp = rng.normal(0, 0.6, (n, 64))
    angles = rng.normal(0, 0.15, (n, 3))
    trans = rng.normal(0, 0.05, (n, 3))
    return np.concatenate([exp, angles, trans], axis=1).astype(np.float32)


def _reference_target_windows(coeffs: np.ndarray, frame: int) -> np.ndarray:
    """Upstream's transform_semantic_target: rows frame-13..frame+13 clamped to the clip, (70, 27)."""
    index = [min(max(i, 0), len(coeffs) - 1) for i in range(frame - RADIUS, frame + RADIUS + 1)]
    return coeffs[index].T


@pytest.fixture(scope="module")
def upstream():
    generator_mod = _upstream("facerender.modules.generator")
    kp_mod = _upstream("facerender.modules.keypoint_detector")
    mapping_mod = _upstream("facerender.modules.mapping")
    animation = _upstream("facerender.modules.make_animation")
    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(99)
    nets = {
        "generator": generator_mod.OcclusionAwareSPADEGenerator(**GEN_PARAMS, **COMMON),
        "kp_extractor": kp_mod.KPDetector(**KP_PARAMS, **COMMON),
        "mapping": mapping_mod.MappingNet(**MAPPING_PARAMS),
    }
    for net in nets.values():
        _randomise_batchnorm(net, gen)
        net.eval()
    return nets, animation


@pytest.fixture(scope="module")
def renderer(upstream):
    nets, _ = upstream
    weights = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
    return FaceRenderer.from_weights(weights, size=SIZE, device="cpu", fp16=True, batch_size=2)


@pytest.fixture(scope="module")
def source(renderer):
    image = _source_image()
    coeff = _coefficients(1, seed=5)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return image, coeff, tensor, renderer.prepare_source(image, coeff)


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# --- loading --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_our_modules_have_upstreams_parameter_names(upstream):
    nets, _ = upstream
    ours = {
        "generator": OcclusionAwareSPADEGenerator(),
        "kp_extractor": KPDetector(),
        "mapping": MappingNet(),
    }
    for name, net in nets.items():
        theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in ours[name].state_dict().items()}
        assert mine == theirs, name
    full = _upstream("facerender.modules.mapping").MappingNet(**{**MAPPING_PARAMS, "coeff_nc": 73})
    assert {k: v.shape for k, v in MappingNet(coeff_nc=73).state_dict().items()} == {
        k: v.shape for k, v in full.state_dict().items()
    }


@pytest.mark.slow
def test_from_weights_reports_mismatched_weights(upstream):
    nets, _ = upstream
    weights = {name: dict(net.state_dict()) for name, net in nets.items()}
    broken = dict(weights, generator={k: v for k, v in weights["generator"].items() if "G_middle_3" not in k})
    with pytest.raises(CheckpointError, match="generator") as info:
        FaceRenderer.from_weights(broken)
    assert "G_middle_3" in str(info.value.detail)
    with pytest.raises(CheckpointError, match="mapping"):
        FaceRenderer.from_weights({k: v for k, v in weights.items() if k != "mapping"})
    wrong = dict(weights, mapping=dict(weights["mapping"], **{"fc_t.weight": torch.zeros(4, 1024)}))
    with pytest.raises(CheckpointError, match="shape"):
        FaceRenderer.from_weights(wrong)


# --- keypoints and mapping --------------------------------------------------------------------------
def test_keypoint_math_matches_upstream():
    animation = _upstream("facerender.modules.make_animation")
    gen = torch.Generator().manual_seed(3)
    from lipsync.engines.sadtalker.mapping import HeadMotion

    motion = HeadMotion(
        yaw=torch.randn(4, 66, generator=gen) * 3,
        pitch=torch.randn(4, 66, generator=gen) * 3,
        roll=torch.randn(4, 66, generator=gen) * 3,
        t=torch.randn(4, 3, generator=gen),
        exp=torch.randn(4, 45, generator=gen) * 0.1,
    )
    kp = torch.rand(4, 15, 3, generator=gen) * 2 - 1
    he = {
        "yaw": motion.yaw,
        "pitch": motion.pitch,
        "roll": motion.roll,
        "t": motion.t.clone(),
        "exp": motion.exp,
    }
    expected = animation.keypoint_transformation({"value": kp}, he)["value"]
    assert _max_diff(transform_keypoints(kp, motion), expected) < 1e-5
    # Canonical keypoints of one source broadcast over a batch of poses.
    single = transform_keypoints(kp[:1], motion)
    he = {
        "yaw": motion.yaw,
        "pitch": motion.pitch,
        "roll": motion.roll,
        "t": motion.t.clone(),
        "exp": motion.exp,
    }
    assert (
        _max_diff(single, animation.keypoint_transformation({"value": kp[:1].expand(4, -1, -1)}, he)["value"])
        < 1e-5
    )


@pytest.mark.slow
def test_mapping_and_keypoints_match_upstream(upstream, renderer, source):
    nets, animation = upstream
    _image, coeff, tensor, state = source
    with torch.no_grad():
        kp_canonical = nets["kp_extractor"](tensor)["value"]
        source_semantics = torch.from_numpy(np.repeat(coeff[:, :70].T, 2 * RADIUS + 1, axis=1))[None]
        he_source = nets["mapping"](source_semantics)
        kp_source = animation.keypoint_transformation({"value": kp_canonical}, he_source)["value"]
    assert _max_diff(state.kp_canonical, kp_canonical) <= 1e-4
    assert _max_diff(state.kp_source, kp_source) <= 1e-4
    # keypoints spread over the volume, so the comparison is not of constants
    assert float(kp_canonical.std()) > 1e-3

    # Rows 4..8 of a 12-frame clip, given with 4 rows of context before and 3 after.
    clip = _coefficients(12, seed=6)
    ours = renderer.driving_keypoints(state, clip, context_before=4, context_after=3)
    assert ours.shape == (5, 15, 3)
    with torch.no_grad():
        for row, frame in enumerate(range(4, 9)):
            window = torch.from_numpy(_reference_target_windows(clip, frame))[None]
            he = nets["mapping"](window)
            ours_motion = renderer.mapping(window)
            for key in ("yaw", "pitch", "roll", "t", "exp"):
                assert _max_diff(getattr(ours_motion, key), he[key]) <= 1e-4, key
            expected = animation.keypoint_transformation({"value": kp_canonical}, he)["value"]
            assert _max_diff(ours[row], expected[0]) <= 1e-4


# --- dense motion and frames -----------------------------------------------------------------------
def _upstream_feature_3d(generator, image: torch.Tensor) -> torch.Tensor:
    """The first half of upstream's generator forward (its encoder), step by step."""
    out = generator.first(image)
    for block in generator.down_blocks:
        out = block(out)
    out = generator.second(out)
    bs, _, h, w = out.shape
    return generator.resblocks_3d(out.view(bs, generator.reshape_channel, generator.reshape_depth, h, w))


@pytest.mark.slow
def test_dense_motion_matches_upstream(upstream, renderer, source):
    nets, _animation = upstream
    _image, _coeff, tensor, state = source
    kp_driving = renderer.driving_keypoints(state, _coefficients(2, seed=8))
    with torch.no_grad():
        feature = _upstream_feature_3d(nets["generator"], tensor)
        assert _max_diff(state.generator.feature_3d, feature) <= 1e-4
        expected = nets["generator"].dense_motion_network(
            feature=feature.repeat(2, 1, 1, 1, 1),
            kp_driving={"value": kp_driving},
            kp_source={"value": state.kp_source.repeat(2, 1, 1)},
        )
        ours = renderer.generator.dense_motion_network.motion(
            state.generator.motion, state.kp_source, kp_driving, state.source_gaussians
        )
    assert _max_diff(ours.mask, expected["mask"]) <= 1e-4
    assert _max_diff(ours.occlusion_map, expected["occlusion_map"]) <= 1e-4
    assert _max_diff(ours.deformation, expected["deformation"]) <= 1e-4
    # the two frames move differently, and the motion is not the identity
    assert _max_diff(ours.deformation[0], ours.deformation[1]) > 1e-3
    assert _max_diff(ours.deformation[0], state.generator.motion.identity) > 1e-3


@pytest.mark.slow
def test_frames_match_upstream_make_animation(upstream, renderer, source):
    nets, animation = upstream
    _image, coeff, tensor, state = source
    clip = _coefficients(6, seed=9)
    first, count = 2, 2  # render rows 2 and 3; the others are context
    target = np.stack([_reference_target_windows(clip, f) for f in range(first, first + count)])[None]
    source_semantics = np.repeat(coeff[:, :70].T, 2 * RADIUS + 1, axis=1)[None]
    expected = animation.make_animation(
        tensor,
        torch.from_numpy(source_semantics),
        torch.from_numpy(target),
        nets["generator"],
        nets["kp_extractor"],
        None,
        nets["mapping"],
    )[0]  # (count, 3, S, S)

    kp_driving = renderer.driving_keypoints(
        state, clip, context_before=first, context_after=len(clip) - first - count
    )
    ours = renderer.generate(state, kp_driving)
    assert ours.shape == expected.shape
    assert _max_diff(ours, expected) <= 1e-3
    assert _max_diff(ours[0], ours[1]) > 1e-4  # frames differ: the comparison is not of a constant

    # render() = driving_keypoints + generate + this conversion (its batching is tested on the tiny renderer)
    frames = frames_to_uint8(ours).numpy()
    assert frames.shape == (count, SIZE, SIZE, 3) and frames.dtype == np.uint8
    expected_u8 = (expected.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.int16)
    assert np.abs(frames.astype(np.int16) - expected_u8).max() <= 1


# --- tiny renderer: chunking, batching, precision, paste-back ---------------------------------------
TINY = 64


def _tiny_generator() -> OcclusionAwareSPADEGenerator:
    return OcclusionAwareSPADEGenerator(
        feature_channel=4,
        block_expansion=8,
        max_features=16,
        num_down_blocks=2,
        reshape_channel=4,
        reshape_depth=4,
        num_resblocks=1,
        dense_motion_params={
            "block_expansion": 4,
            "max_features": 32,
            "num_blocks": 3,
            "reshape_depth": 4,
            "compress": 2,
        },
        decoder_params={"out_channels": 8, "hidden": 8},
    )


def _tiny_renderer(batch_size: int = 4, coeff_nc: int = 70) -> FaceRenderer:
    torch.manual_seed(7)
    kp = KPDetector(block_expansion=4, max_features=32, num_blocks=3, reshape_channel=32 * 4, reshape_depth=4)
    gen = _tiny_generator()
    mapping = MappingNet(coeff_nc=coeff_nc, descriptor_nc=32)
    gen_rng = torch.Generator().manual_seed(11)
    for net in (kp, gen, mapping):
        _randomise_batchnorm(net, gen_rng)
    return FaceRenderer(kp, gen, mapping, size=TINY, batch_size=batch_size).to_runtime("cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (spinning worker threads only cost time on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    renderer = _tiny_renderer()
    state = renderer.prepare_source(_source_image(96), _coefficients(1, seed=1))  # resized to 64
    return renderer, state


def test_semantic_windows_clamp_at_clip_ends():
    coeffs = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    windows = semantic_windows(coeffs, 0, 10)
    assert windows.shape == (10, 3, 27)
    for frame in range(10):
        expected = [min(max(i, 0), 9) for i in range(frame - 13, frame + 14)]
        assert windows[frame, 0].tolist() == expected
    assert semantic_windows(coeffs, 4, 2)[1, 2].tolist() == [min(max(i, 0), 9) for i in range(5 - 13, 5 + 14)]
    with pytest.raises(ValueError):
        semantic_windows(coeffs, 0, 2, window=26)


def test_chunked_render_with_context_equals_whole_clip(tiny):
    renderer, state = tiny
    clip = _coefficients(40, seed=2)
    whole = renderer.render(state, clip)
    kp_whole = renderer.driving_keypoints(state, clip)
    assert whole.shape == (40, TINY, TINY, 3)
    # chunks of 15 frames, each with up to 13 rows of context on both sides (as the engine passes them)
    parts = []
    for start in range(0, 40, 15):
        stop = min(start + 15, 40)
        lo, hi = max(0, start - 13), min(40, stop + 13)
        chunk, before, after = clip[lo:hi], start - lo, hi - stop
        kp_chunk = renderer.driving_keypoints(state, chunk, context_before=before, context_after=after)
        assert _max_diff(kp_chunk, kp_whole[start:stop]) < 1e-6
        parts.append(renderer.render(state, chunk, context_before=before, context_after=after))
    # equal up to float rounding (batches are composed differently)
    assert np.abs(np.concatenate(parts).astype(int) - whole.astype(int)).max() <= 1
    # without context the chunk borders would differ (the windows are clamped at the chunk's ends)
    no_context = renderer.driving_keypoints(state, clip[15:30])
    assert _max_diff(no_context, kp_whole[15:30]) > 1e-3
    # and frames really depend on the coefficients
    assert np.abs(whole[0].astype(int) - whole[20].astype(int)).max() > 0


def test_mapping_slices_do_not_change_keypoints(tiny, monkeypatch):
    renderer, state = tiny
    clip = _coefficients(30, seed=8)
    whole = renderer.driving_keypoints(state, clip, context_before=3, context_after=2)
    import lipsync.engines.sadtalker.render as render_module

    monkeypatch.setattr(render_module, "MAPPING_SLICE", 7)
    sliced = renderer.driving_keypoints(state, clip, context_before=3, context_after=2)
    assert sliced.shape == (25, 15, 3)
    assert _max_diff(sliced, whole) < 1e-6


def test_batch_size_does_not_change_frames(tiny):
    renderer, state = tiny
    clip = _coefficients(7, seed=3)
    batched = renderer.render(state, clip)
    renderer.batch_size = 1
    try:
        single = renderer.render(state, clip)
    finally:
        renderer.batch_size = 4
    assert np.abs(batched.astype(int) - single.astype(int)).max() <= 1


def test_folding_batchnorm_keeps_the_generator_output(one_thread):
    image = torch.from_numpy(_source_image(TINY)).permute(2, 0, 1)[None].float() / 255
    kp_s = torch.rand(1, 15, 3, generator=torch.Generator().manual_seed(2)) - 0.5
    kp_d = kp_s + 0.05 * torch.randn(2, 15, 3, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    gen = _tiny_generator().eval()
    _randomise_batchnorm(gen, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = gen(image, kp_d, kp_s)["prediction"]
        fold_batchnorms(gen)
        after = gen(image, kp_d, kp_s)["prediction"]
        fold_batchnorms(gen)  # idempotent
        again = gen(image, kp_d, kp_s)["prediction"]
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in gen.dense_motion_network.hourglass.modules())
    assert _max_diff(before, after) < 1e-4
    assert torch.equal(after, again)
    assert float(before.std()) > 1e-4


def test_fp16_frame_path_stays_close_to_fp32(tiny):
    """The CUDA half-precision layout, run on the CPU: convs in fp16, motion math in fp32."""
    renderer, state = tiny
    clip = _coefficients(3, seed=4)
    kp = renderer.driving_keypoints(state, clip)
    reference = renderer.generate(state, kp).float()
    reference_motion = renderer.generator.dense_motion_network.motion(
        state.generator.motion, state.kp_source, kp, state.source_gaussians
    )
    half = _tiny_renderer().to_runtime("cpu", frame_dtype=torch.float16)
    assert half.frame_dtype == torch.float16
    assert half.generator.decoder.up_1.conv_0.weight.dtype == torch.float16
    assert half.mapping.fc_t.weight.dtype == torch.float32  # coefficient nets stay fp32
    assert half.kp_extractor.kp.weight.dtype == torch.float32
    assert half.generator.first.conv.weight.dtype == torch.float32  # source half too
    half_state = half.prepare_source(_source_image(96), _coefficients(1, seed=1))
    assert half_state.generator.feature_3d.dtype == torch.float32
    half_kp = half.driving_keypoints(half_state, clip)
    assert half_kp.dtype == torch.float32 and _max_diff(half_kp, kp) < 1e-6
    with torch.inference_mode():
        motion = half.generator.dense_motion_network.motion(
            half_state.generator.motion, half_state.kp_source, half_kp, half_state.source_gaussians
        )
    assert motion.deformation.dtype == torch.float32
    assert _max_diff(motion.deformation, reference_motion.deformation) < 1e-4  # the warp is not degraded
    frames = half.generate(half_state, half_kp)
    assert frames.dtype == torch.float16
    error = (frames.float() - reference).abs()
    assert float(error.mean()) < 5e-3 and float(error.max()) < 0.1
    assert half.render(half_state, clip).dtype == np.uint8


def test_channels_last_layout_gives_the_same_frames(tiny):
    """The CUDA layout (channels-last convs and activations), run on the CPU in fp32."""
    renderer, state = tiny
    clip = _coefficients(3, seed=6)
    reference = renderer.generate(state, renderer.driving_keypoints(state, clip))
    nhwc = _tiny_renderer().to_runtime("cpu", channels_last=True)
    assert nhwc.generator.decoder.fc.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.generator.dense_motion_network.mask.weight.is_contiguous(memory_format=torch.channels_last_3d)
    nhwc_state = nhwc.prepare_source(_source_image(96), _coefficients(1, seed=1))
    frames = nhwc.generate(nhwc_state, nhwc.driving_keypoints(nhwc_state, clip))
    assert _max_diff(frames, reference) < 1e-4  # other conv kernels: rounding only


def test_render_validates_its_inputs(tiny):
    renderer, state = tiny
    with pytest.raises(ValueError, match="coeffs"):
        renderer.render(state, np.zeros((5, 64), np.float32))
    with pytest.raises(ValueError, match="context"):
        renderer.render(state, np.zeros((5, 70), np.float32), context_before=3, context_after=3)
    with pytest.raises(ValueError, match="NaN"):
        renderer.render(state, np.full((2, 70), np.nan, np.float32))
    assert renderer.render(state, np.zeros((4, 70), np.float32), context_before=4).shape == (0, TINY, TINY, 3)
    with pytest.raises(ValueError, match="uint8"):
        renderer.prepare_source(np.zeros((64, 64), np.uint8), np.zeros(70))
    full = _tiny_renderer(coeff_nc=73)
    with pytest.raises(ValueError, match="73"):
        full.prepare_source(_source_image(TINY), np.zeros((1, 70)))


def test_full_mapping_appends_the_source_crop_parameters(tiny):
    _renderer, _ = tiny
    full = _tiny_renderer(coeff_nc=73)
    source = np.concatenate([_coefficients(1, seed=1), [[0.9, 0.1, -0.2]]], axis=1)
    state = full.prepare_source(_source_image(TINY), source)
    assert state.coeff_extra.tolist() == pytest.approx([0.9, 0.1, -0.2])
    clip = _coefficients(3, seed=2)
    kp = full.driving_keypoints(state, clip)
    rows = torch.cat([torch.from_numpy(clip), torch.tensor([[0.9, 0.1, -0.2]]).expand(3, 3)], dim=1)
    expected = transform_keypoints(state.kp_canonical, full.mapping(semantic_windows(rows, 0, 3)))
    assert _max_diff(kp, expected) < 1e-6
    # extra columns the caller passes are ignored: upstream always takes the source's crop params
    with_extra = np.concatenate([clip, np.ones((3, 3), np.float32)], axis=1)
    assert _max_diff(full.driving_keypoints(state, with_extra), expected) < 1e-6


# --- paste-back ---------------------------------------------------------------------------------------
def _portrait(h: int = 120, w: int = 90) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 40
    img[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    img[..., 2] = 90
    return img


def test_paste_back_blends_the_crop_into_the_portrait(one_thread):
    original = _portrait()
    crops = np.full((2, 64, 64, 3), 250, np.uint8)
    out = paste_back(crops, (20.0, 30.0, 70.0, 80.0), original)
    assert out.shape == (2, 120, 90, 3)
    assert (out[:, 55, 45] == 250).all()  # box centre: the rendered crop
    assert np.array_equal(out[0, :25], original[:25])  # outside the box: untouched
    assert np.array_equal(out[1, :, :15], original[:, :15])
    # across the box edge the image goes smoothly from the portrait to the crop
    row = out[0, 55, 20:46, 0].astype(int)
    assert row[0] < 100 and row[-1] == 250 and np.all(np.diff(row) >= 0)


def test_paste_back_handles_boxes_past_the_edge_and_frame_scaling(one_thread):
    original = _portrait()
    crops = np.full((1, 32, 32, 3), 200, np.uint8)
    out = paste_back(crops, (-20.0, 80.0, 40.0, 140.0), original)  # past the left and bottom edges
    assert out.shape == (1, 120, 90, 3)
    assert out[0, 110, 10, 0] == 200
    assert np.array_equal(out[0, :75], original[:75])
    scaled = paste_back(crops, (20.0, 30.0, 70.0, 80.0), original, frame_size=(45, 60))
    assert scaled.shape == (1, 60, 45, 3)
    assert scaled[0, 27, 22, 0] == 200
    with pytest.raises(ValueError):
        paste_back(crops, (50.0, 30.0, 20.0, 80.0), original)
    with pytest.raises(ValueError):
        paste_back(crops, (200.0, 200.0, 300.0, 300.0), original)


def test_render_with_paste_target_gives_full_frames(tiny):
    renderer, state = tiny
    original = _portrait(160, 128)
    target = make_paste_target(original, (32.0, 40.0, 96.0, 104.0), device=renderer.device)
    clip = _coefficients(3, seed=5)
    crops = renderer.render(state, clip)
    full = renderer.render(state, clip, paste=target)
    assert full.shape == (3, 160, 128, 3)
    assert np.array_equal(full[:, :30], np.broadcast_to(original[:30], (3, 30, 128, 3)))
    # the box centre holds the rendered crop (64 px crop, 64 px box: same pixels)
    assert np.abs(full[:, 72, 64].astype(int) - crops[:, 32, 32].astype(int)).max() <= 1


def test_render_resizes_crops_on_the_device(tiny):
    renderer, state = tiny
    clip = _coefficients(2, seed=7)
    crops = renderer.render(state, clip)
    big = renderer.render(state, clip, output_size=128)
    assert big.shape == (2, 128, 128, 3)
    # enlarged bicubic (a = -0.75, half-pixel centres), as cv2.INTER_CUBIC on the host; the
    # device works on the unrounded frames, hence a level or two at the sharpest edges
    import cv2

    expected = np.stack([cv2.resize(c, (128, 128), interpolation=cv2.INTER_CUBIC) for c in crops])
    diff = np.abs(big.astype(int) - expected.astype(int))
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 2
    assert renderer.render(state, clip, output_size=TINY).tolist() == crops.tolist()
    assert renderer.render(state, clip[:1], context_before=1, output_size=96).shape == (0, 96, 96, 3)
