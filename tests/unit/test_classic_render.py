"""The classic renderer: motion controls must show up as the right mouth/eye geometry.

Geometry is measured the way the independent judge does it: dlib's 68 landmarks on the
rendered frame (inner-lip gap and mouth width over the inter-ocular distance).
"""
from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from lipsync.avatar import AvatarCache, default_detector, precompute_avatar
from lipsync.engines.classic.engine import ClassicEngine
from lipsync.engines.classic.render import FaceRenderer
from lipsync.engines.classic.rig import MouthRig, build_mouth_rig
from lipsync.io import load_image
from lipsync.pipeline import bundled_sample


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    cache = AvatarCache(tmp_path_factory.mktemp("cache"), "test")
    av, _ = precompute_avatar(load_image(bundled_sample("portrait.png")), cache=cache)
    return av


@pytest.fixture(scope="module")
def renderer(avatar):
    return FaceRenderer(np.asarray(avatar.image), build_mouth_rig(np.asarray(avatar.image), avatar.landmarks))


def _rgb(frames, i=0):
    return cv2.cvtColor(np.ascontiguousarray(frames.data[i]), cv2.COLOR_YUV2RGB_I420)


def _render(renderer, jaw=0.0, lip_round=0.0, lip_close=0.0, blink=0.0, brow=0.0, head=None):
    one = lambda v: np.array([v], np.float32)  # noqa: E731
    return renderer.render(0, one(jaw), one(lip_round), one(lip_close), one(blink), one(brow),
                           None if head is None else np.array([head], np.float32))


def _geometry(rgb):
    det = default_detector()
    _, lm = det.find_face(rgb)
    iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
    gap = np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in ((61, 67), (62, 66), (63, 65))]) / iod
    width = np.linalg.norm(lm[48] - lm[54]) / iod
    eye = np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in ((37, 41), (38, 40), (43, 47), (44, 46))]) / iod
    return gap, width, eye


def test_lip_gap_follows_jaw(renderer):
    gaps = [_geometry(_rgb(_render(renderer, jaw=j)))[0] for j in (0.0, 0.35, 0.7, 1.0)]
    assert all(b > a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] < 0.05, "jaw 0 must close the lips, even on a portrait smiling with teeth"
    assert gaps[-1] - gaps[0] > 0.2, gaps


def test_lip_close_overrides_jaw(renderer):
    open_gap = _geometry(_rgb(_render(renderer, jaw=0.8)))[0]
    pressed = _geometry(_rgb(_render(renderer, jaw=0.8, lip_close=1.0)))[0]
    assert pressed < 0.05 < open_gap


def test_rounding_narrows_and_spreading_widens(renderer):
    widths = [_geometry(_rgb(_render(renderer, jaw=0.4, lip_round=r)))[1] for r in (1.0, 0.0, -1.0)]
    assert widths[0] < widths[1] - 0.05, widths
    assert widths[2] > widths[1] + 0.02, widths


def test_blink_closes_the_eyes(renderer):
    open_eye = _geometry(_rgb(_render(renderer, jaw=0.3)))[2]
    closed_eye = _geometry(_rgb(_render(renderer, jaw=0.3, blink=1.0)))[2]
    assert closed_eye < 0.5 * open_eye, (open_eye, closed_eye)


def test_only_the_face_regions_change(renderer):
    base = cv2.cvtColor(renderer.base_yuv, cv2.COLOR_YUV2RGB_I420)
    frame = _rgb(_render(renderer, jaw=1.0, lip_round=0.5, blink=1.0, brow=1.0))
    changed = np.any(frame != base, axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any()
    mx0, my0, mx1, my1 = renderer.rig.roi
    ex0, ey0, ex1, ey1 = renderer.rig.eye_roi
    inside = ((xs >= mx0) & (xs < mx1) & (ys >= my0) & (ys < my1)) | (
        (xs >= ex0) & (xs < ex1) & (ys >= ey0) & (ys < ey1))
    assert inside.all(), "pixels outside the mouth and eye regions must stay the portrait's"
    # the mouth region is a minority of the picture: the background is untouched
    assert changed.mean() < 0.3


def test_patch_cache_returns_what_a_fresh_render_would(renderer, avatar):
    jaw = np.linspace(0, 1, 12, dtype=np.float32)
    args = (jaw, np.sin(jaw * 5).astype(np.float32), np.zeros(12, np.float32),
            np.zeros(12, np.float32), np.full(12, 0.2, np.float32))
    renderer.clear_caches()
    first = renderer.render(0, *args).data.copy()
    second = renderer.render(0, *args).data  # served from the patch cache
    fresh = FaceRenderer(np.asarray(avatar.image), renderer.rig).render(0, *args).data
    assert np.array_equal(first, second)
    assert np.array_equal(first, fresh)


def test_renderer_is_safe_to_share_between_threads(renderer):
    rng = np.random.default_rng(3)
    inputs = [tuple(rng.random(20, dtype=np.float32) for _ in range(5)) for _ in range(4)]
    expected = [renderer.render(0, *a).data.copy() for a in inputs]
    renderer.clear_caches()
    results: list = [None] * len(inputs)

    def work(k):
        results[k] = renderer.render(0, *inputs[k]).data.copy()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_head_motion_moves_the_face_not_the_corners(renderer):
    still = _rgb(_render(renderer, jaw=0.2))
    moved = _rgb(_render(renderer, jaw=0.2, head=(3.0, 2.0, 3.0)))
    face = slice(int(renderer.rig.origin[1]) - 150, int(renderer.rig.origin[1]) + 40)
    assert np.abs(moved[face].astype(int) - still[face]).mean() > 2.0
    # far corners (background) stay put
    assert np.abs(moved[:20, :20].astype(int) - still[:20, :20]).mean() < 1.0


def test_rig_survives_disk_round_trip_and_damage(avatar, tmp_path):
    engine = ClassicEngine()
    engine.prepare_avatar(avatar, tmp_path)
    path = tmp_path / f"rig_{avatar.size}.npz"
    rig = MouthRig.load(path)
    assert rig is not None and np.array_equal(rig.fields, build_mouth_rig(
        np.asarray(avatar.image), avatar.landmarks).fields)
    path.write_bytes(b"not a rig")
    assert MouthRig.load(path) is None
    r = engine.renderer(avatar, avatar.size, tmp_path)  # rebuilt, never trusted
    assert MouthRig.load(path) is not None
    assert len(_render(r, jaw=0.5)) == 1


def test_other_output_sizes_scale_the_rig(avatar):
    engine = ClassicEngine()
    r = engine.renderer(avatar, 256)
    frames = _render(r, jaw=0.8)
    assert frames.data.shape == (1, 384, 256)
    gap = _geometry(cv2.resize(_rgb(frames), (512, 512)))[0]
    assert gap > 0.15
