"""Idle clips (lipsync.idle): the loop's tail cross-fades into its head so the last frame equals
the first; the real classic pipeline renders, encodes and caches them per avatar and options."""

from __future__ import annotations

import itertools

import av
import numpy as np
import pytest

from lipsync.errors import AvatarNotFound, InvalidInput
from lipsync.idle import (
    CROSSFADE_SECONDS,
    MAX_SECONDS,
    MIN_SECONDS,
    idle_clip,
    idle_frame_counts,
    idle_key,
    linear_blend,
    loop_frames,
    morph_blend,
)
from lipsync.types import MotionOptions


def _ramp_frames(count: int) -> list[np.ndarray]:
    """Frames whose every pixel is the frame's index: a stand-in for ever-changing motion."""
    return [np.full((4, 4, 3), (2 * r) % 250, dtype=np.uint8) for r in range(count)]


@pytest.mark.parametrize(("n", "k"), [(10, 2), (25, 5), (100, 15)])
def test_loop_frames_closes_exactly_and_keeps_the_middle(n: int, k: int) -> None:
    rendered = _ramp_frames(n + k - 1)
    out = list(loop_frames(iter(rendered), n, k))
    assert len(out) == n
    np.testing.assert_array_equal(out[-1], out[0])
    np.testing.assert_array_equal(out[0], rendered[k - 1])
    for j in range(n - k + 1):  # untouched until the fade starts
        np.testing.assert_array_equal(out[j], rendered[k - 1 + j])
    # during the fade each frame lies between its own frame and its partner leading into out[0]
    for j in range(n - k, n):
        lo = min(rendered[k - 1 + j][0, 0, 0], rendered[j - n + k][0, 0, 0])
        hi = max(rendered[k - 1 + j][0, 0, 0], rendered[j - n + k][0, 0, 0])
        assert lo <= out[j][0, 0, 0] <= hi


def test_loop_frames_fade_is_monotone_towards_the_head() -> None:
    n, k = 30, 8
    out = [int(f[0, 0, 0]) for f in loop_frames(iter(_ramp_frames(n + k - 1)), n, k)]
    tail = out[n - k :]
    # a ramp's tail blends down towards the head's value step by step: no jump anywhere
    assert all(b <= a for a, b in itertools.pairwise(tail))
    steps = np.abs(np.diff(out + [out[0]]))
    assert steps.max() <= 2 * (n + k) / (k - 1) + 1


@pytest.mark.parametrize("pixel_format", ["rgb24", "yuv420p"])
def test_morph_blend_moves_instead_of_doubling(pixel_format: str) -> None:
    """Half-way between a face and the same face 4 px to the right, the morph shows it 2 px to
    the right (a plain cross-fade shows both, half-transparent)."""
    import cv2

    from lipsync.pipeline import bundled_sample

    rgb = cv2.cvtColor(cv2.imread(str(bundled_sample("portrait.png"))), cv2.COLOR_BGR2RGB)
    a, b, half = rgb, np.roll(rgb, 4, axis=1), np.roll(rgb, 2, axis=1)
    if pixel_format == "yuv420p":
        a, b, half = (cv2.cvtColor(x, cv2.COLOR_RGB2YUV_I420) for x in (a, b, half))
    assert morph_blend(a, b, 0.0, pixel_format=pixel_format) is a
    assert morph_blend(a, b, 1.0, pixel_format=pixel_format) is b
    inner = (slice(40, -40), slice(40, -40))
    morph = morph_blend(a, b, 0.5, pixel_format=pixel_format)
    linear = linear_blend(a, b, 0.5)
    assert morph.shape == a.shape and morph.dtype == np.uint8
    err_morph = np.abs(morph[inner].astype(float) - half[inner]).mean()
    err_linear = np.abs(linear[inner].astype(float) - half[inner]).mean()
    assert err_morph < 0.75 * err_linear, (err_morph, err_linear)


def test_frame_counts_and_bounds() -> None:
    n, k = idle_frame_counts(4, 25)
    assert n == 100 and k == round(CROSSFADE_SECONDS * 25)
    n, k = idle_frame_counts(MIN_SECONDS, 25)
    assert k <= n // 2
    for bad in (0, MIN_SECONDS - 0.01, MAX_SECONDS + 0.01, 3600):
        with pytest.raises(InvalidInput):
            idle_frame_counts(bad, 25)


def test_key_depends_on_what_changes_the_frames() -> None:
    base = MotionOptions()
    assert idle_key("classic", base, 4) == idle_key("classic", MotionOptions(lip_scale=2.0), 4)
    others = {
        idle_key("classic", MotionOptions(still=False), 4),
        idle_key("classic", MotionOptions(blink=False), 4),
        idle_key("classic", MotionOptions(size=256), 4),
        idle_key("classic", MotionOptions(expression_scale=1.0), 4),
        idle_key("classic", base, 5),
        idle_key("sadtalker", base, 4),
    }
    assert idle_key("classic", base, 4) not in others and len(others) == 6


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        assert not container.streams.audio
        return [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    from lipsync.pipeline import LipSyncPipeline

    pipe = LipSyncPipeline.from_settings(cache_dir=tmp_path_factory.mktemp("idle-cache"))
    return pipe, pipe.default_avatar()


def test_classic_idle_clip_loops_moves_and_is_cached(classic) -> None:
    pipe, avatar = classic
    options = pipe.motion_options(still=False, expression_scale=1.0, size=256)
    clip = idle_clip(pipe, avatar.id, seconds=2, options=options)
    assert not clip.cache_hit and clip.frames == 50
    frames = _decode(clip.path)
    assert len(frames) == 50 and frames[0].shape == (256, 256, 3)
    loop = _psnr(frames[0], frames[-1])
    middle = _psnr(frames[0], frames[len(frames) // 2])
    # first == last up to H.264 noise; the head has moved by the middle (not a frozen picture)
    assert loop >= 36.0, loop
    assert middle < loop - 6.0, (middle, loop)
    # the jump at the loop point is no bigger than the ordinary frame-to-frame motion
    steps = [np.abs(a - b).mean() for a, b in itertools.pairwise(frames)]
    assert np.abs(frames[-1] - frames[0]).mean() <= 1.5 * max(steps)
    again = idle_clip(pipe, avatar.id, seconds=2, options=options)
    assert again.cache_hit and again.path == clip.path
    assert clip.path.is_relative_to(pipe.cache.root)
    other = idle_clip(pipe, avatar.id, seconds=2, options=pipe.motion_options(still=True, size=256))
    assert not other.cache_hit and other.path != clip.path
    # still head, silent: the lips stay together as at rest, the mouth region never changes
    still = _decode(other.path)
    mouth = avatar.landmarks[48:68] * (256 / avatar.size)
    (x0, y0), (x1, y1) = np.floor(mouth.min(0)).astype(int) - 4, np.ceil(mouth.max(0)).astype(int) + 4
    crops = [f[y0:y1, x0:x1] for f in still]
    assert max(np.abs(c - crops[0]).mean() for c in crops) < 3.0


def test_stopped_idle_clip_leaves_nothing_cached(classic) -> None:
    pipe, avatar = classic

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop

    options = pipe.motion_options(size=96, blink=False)
    with pytest.raises(Stop):
        idle_clip(pipe, avatar.id, seconds=3, options=options, progress=stop)
    directory = pipe.cache.engine_dir(avatar.id, pipe.engine.name, pipe.engine.precompute_version)
    key = idle_key(pipe.engine.name, options, 3)
    assert not any(key in p.name for p in directory.iterdir())
    assert not idle_clip(pipe, avatar.id, seconds=3, options=options).cache_hit


def test_idle_clip_unknown_avatar_and_deleted_avatar(classic) -> None:
    import io

    from PIL import Image, ImageOps

    from lipsync.pipeline import bundled_sample

    pipe, _avatar = classic
    with pytest.raises(AvatarNotFound):
        idle_clip(pipe, "0" * 64, seconds=1)
    with pytest.raises(AvatarNotFound):
        idle_clip(pipe, "../../etc", seconds=1)
    # a second face (the sample mirrored): its clip lives in its cache entry and goes with it
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(bundled_sample("portrait.png")).convert("RGB")).save(buf, "PNG")
    mirrored, _ = pipe.add_avatar(buf.getvalue())
    clip = idle_clip(pipe, mirrored.id, seconds=1, options=pipe.motion_options(size=128))
    assert clip.path.is_file()
    assert pipe.delete_avatar(mirrored.id)
    assert not clip.path.exists()
    with pytest.raises(AvatarNotFound):
        idle_clip(pipe, mirrored.id, seconds=1)
