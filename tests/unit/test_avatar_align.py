"""Crop geometry, padding and rest-mouth measures on synthetic faces (no detector needed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync.avatar.align import (
    EYE_LINE,
    FACE_FRACTION,
    align_crop,
    crop_square,
    crop_to_source,
    inter_ocular,
    mouth_open_ratio,
    teeth_visible,
)


def synthetic_landmarks(cx: float, cy: float, iod: float, mouth_gap: float = 0.0) -> np.ndarray:
    """A frontal dlib-68 layout: eye midpoint at (cx, cy), eye centres ``iod`` apart, inner lips
    ``mouth_gap`` apart (source pixels). Proportions roughly those of an average face."""
    u = iod
    pts = np.zeros((68, 2), np.float64)
    # jaw 0..16: a U from ear level (at the eyes) down to the chin at 1.45 u below the eyes
    t = np.linspace(0, np.pi, 17)
    pts[0:17, 0] = cx - 1.0 * u * np.cos(t)
    pts[0:17, 1] = cy + 0.05 * u + 1.4 * u * np.sin(t)
    # brows 17..26
    pts[17:22, 0] = cx + np.linspace(-0.95, -0.15, 5) * u
    pts[22:27, 0] = cx + np.linspace(0.15, 0.95, 5) * u
    pts[17:27, 1] = cy - 0.35 * u
    # nose 27..35
    pts[27:31, 0] = cx
    pts[27:31, 1] = cy + np.linspace(0.0, 0.6, 4) * u
    pts[31:36, 0] = cx + np.linspace(-0.25, 0.25, 5) * u
    pts[31:36, 1] = cy + 0.7 * u
    # eyes 36..47: hexagons around (cx -/+ u/2, cy)
    ang = np.array([180, 135, 45, 0, -45, -135]) * np.pi / 180
    for start, ex in ((36, cx - u / 2), (42, cx + u / 2)):
        pts[start:start + 6, 0] = ex + 0.2 * u * np.cos(ang)
        pts[start:start + 6, 1] = cy - 0.08 * u * np.sin(ang)
    # mouth: outer 48..59, inner 60..67, centred 1.0 u below the eyes
    my = cy + 1.0 * u
    outer = np.linspace(0, 2 * np.pi, 13)[:-1]
    pts[48:60, 0] = cx - 0.45 * u * np.cos(outer)
    pts[48:60, 1] = my - (0.12 * u + mouth_gap / 2) * np.sin(outer)
    half = mouth_gap / 2
    pts[60] = (cx - 0.35 * u, my)
    pts[61:64, 0] = cx + np.array([-0.15, 0.0, 0.15]) * u
    pts[61:64, 1] = my - half
    pts[64] = (cx + 0.35 * u, my)
    pts[65:68, 0] = cx + np.array([0.15, 0.0, -0.15]) * u
    pts[65:68, 1] = my + half
    return pts.astype(np.float32)


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_synthetic_landmarks_helper_is_sane() -> None:
    lm = synthetic_landmarks(100, 100, 40, mouth_gap=8)
    assert inter_ocular(lm) == pytest.approx(40, rel=1e-5)
    assert mouth_open_ratio(lm) == pytest.approx(8 / 40, rel=1e-5)


def test_crop_is_square_and_frames_a_talking_head() -> None:
    rgb = noise_image(1200, 1000)
    lm = synthetic_landmarks(500, 450, 100)
    face = align_crop(rgb, lm, size=512)

    x0, y0, x1, y1 = face.crop_box
    assert x1 - x0 == y1 - y0  # square in source pixels
    assert face.crop.shape == (512, 512, 3) and face.crop.dtype == np.uint8
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32

    lo, hi = face.landmarks.min(axis=0), face.landmarks.max(axis=0)
    face_fraction = max(hi - lo) / 512
    assert 0.45 <= face_fraction <= 0.55
    assert face_fraction == pytest.approx(FACE_FRACTION, abs=0.01)
    eye_y = (face.landmarks[36:48, 1].mean() + 0.5) / 512
    assert eye_y == pytest.approx(EYE_LINE, abs=0.01)
    # centred horizontally on the face, chin well inside with room below for neck/shoulders
    assert (lo[0] + hi[0]) / 2 / 512 == pytest.approx(0.5, abs=0.01)
    assert face.landmarks[8, 1] / 512 < 0.8


def test_crop_pixels_come_from_the_source_square() -> None:
    # Pick a face size whose square is exactly 512 px in the source: the crop is a plain cut-out.
    rgb = noise_image(1200, 1200, seed=1)
    for iod in np.arange(90.0, 130.0, 0.05):
        lm = synthetic_landmarks(600, 560, float(iod))
        x0, y0, side = crop_square(lm)
        if side == 512:
            break
    assert side == 512
    face = align_crop(rgb, lm, size=512)
    assert face.crop_box == (x0, y0, x0 + 512, y0 + 512)
    np.testing.assert_array_equal(face.crop, rgb[y0:y0 + 512, x0:x0 + 512])
    np.testing.assert_allclose(face.landmarks, lm - np.array([x0, y0]), atol=1e-3)


def test_landmark_mapping_round_trips() -> None:
    rgb = noise_image(900, 700)
    lm = synthetic_landmarks(350, 380, 70, mouth_gap=10)
    for size in (256, 512, 1024):  # shrinking and enlarging
        face = align_crop(rgb, lm, size=size)
        back = crop_to_source(face.landmarks, face.crop_box, size)
        np.testing.assert_allclose(back, lm, atol=1e-3)
        assert face.mouth_open_rest == pytest.approx(mouth_open_ratio(lm), rel=1e-4)


def test_enlarging_a_small_face_is_smooth() -> None:
    # A flat-coloured source stays flat whichever interpolation is used (no ringing on flat).
    rgb = np.full((300, 300, 3), 137, np.uint8)
    face = align_crop(rgb, synthetic_landmarks(150, 140, 20), size=512)
    assert face.crop.min() == 137 and face.crop.max() == 137


def test_face_at_the_image_edge_is_padded_smoothly() -> None:
    # Busy texture, face in the top-left corner: the square reaches outside the image.
    rgb = noise_image(600, 600, seed=2)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 1.0)
    lm = synthetic_landmarks(60, 70, 60)
    face = align_crop(rgb, lm, size=512)
    x0, y0, x1, y1 = face.crop_box
    assert x0 < 0 and y0 < 0 and x1 > 0 and y1 > 0
    assert face.crop.shape == (512, 512, 3)

    scale = 512 / (x1 - x0)
    pad_x, pad_y = int(-x0 * scale), int(-y0 * scale)
    lap = np.abs(cv2.Laplacian(cv2.cvtColor(face.crop, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F))
    inside = lap[pad_y + 20:, pad_x + 20:].mean()
    above = lap[: pad_y - 40, pad_x + 40:].mean()  # padding above the image
    left = lap[pad_y + 40:, : pad_x - 40].mean()  # padding left of it
    assert above < 0.05 * inside and left < 0.05 * inside  # featureless: no texture, no streaks
    # Padding colours stay within what the image holds (no black or invented colours).
    corner = face.crop[: pad_y - 40, : pad_x - 40].reshape(-1, 3)
    assert corner.min() >= 0.5 * rgb.mean() - 10 and corner.max() <= rgb.max()


def test_padded_crop_keeps_the_image_part_in_place() -> None:
    # Smooth gradients: each crop pixel inside the image must show the source pixel that the
    # landmark mapping says is there, so landmarks and pixels agree on the padded path too.
    yy, xx = np.mgrid[0:500, 0:400].astype(np.float32)
    rgb = np.dstack([xx * 0.6, yy * 0.5, (xx + yy) * 0.28]).astype(np.uint8)
    lm = synthetic_landmarks(70, 90, 70)
    for size in (256, 1024):  # shrinking and enlarging
        face = align_crop(rgb, lm, size=size)
        x0, y0, x1, _ = face.crop_box
        assert x0 < 0 and y0 < 0
        scale = size / (x1 - x0)
        for cy, cx in ((0.7, 0.6), (0.5, 0.9), (0.95, 0.5)):  # fractions of the crop
            px, py = int(cx * size), int(cy * size)
            sx = (px + 0.5) / scale - 0.5 + x0
            sy = (py + 0.5) / scale - 0.5 + y0
            assert 2 <= sx < 398 and 2 <= sy < 498  # well inside the image
            expected = rgb[round(sy), round(sx)].astype(int)
            np.testing.assert_allclose(face.crop[py, px].astype(int), expected, atol=3)


def test_padding_does_not_continue_edges_or_mirror_the_face() -> None:
    # A sharp bright disc cut by the left border. Reflection padding would mirror it (a second
    # half face), replication would extend its edges as streaks; either gives sharp edges in
    # the padding. The fill may carry the disc's colour, but only as a soft glow.
    rgb = np.full((400, 400, 3), 40, np.uint8)
    cv2.circle(rgb, (0, 200), 90, (230, 230, 230), -1)
    lm = synthetic_landmarks(30, 180, 60)
    face = align_crop(rgb, lm, size=512)
    x0, _, x1, _ = face.crop_box
    pad_x = int(-x0 * 512 / (x1 - x0))
    assert pad_x > 80
    grey = cv2.cvtColor(face.crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    grad = np.hypot(gx, gy)
    disc_edge = grad[:, pad_x + 5:].max()  # the disc outline inside the image
    padding = grad[:, : pad_x - 30].max()
    assert padding < 0.15 * disc_edge


def test_mouth_open_ratio_is_gap_over_eye_distance() -> None:
    closed = synthetic_landmarks(200, 200, 50, mouth_gap=0)
    opened = synthetic_landmarks(200, 200, 50, mouth_gap=15)
    assert mouth_open_ratio(closed) == pytest.approx(0.0, abs=1e-6)
    assert mouth_open_ratio(opened) == pytest.approx(15 / 50, rel=1e-4)
    # scale-free
    assert mouth_open_ratio(opened * 3) == pytest.approx(15 / 50, rel=1e-4)


def _mouth_picture(colour: tuple[int, int, int], gap: float) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((512, 512, 3), (200, 150, 130), np.uint8)  # skin
    lm = synthetic_landmarks(256, 200, 120, mouth_gap=gap)
    cv2.fillPoly(img, [np.round(lm[48:60]).astype(np.int32)], (170, 60, 70))  # lips
    cv2.fillPoly(img, [np.round(lm[60:68]).astype(np.int32)], colour)
    return img, lm


def test_teeth_visible_detects_bright_grey_between_the_lips() -> None:
    teeth, lm = _mouth_picture((235, 232, 225), gap=30)
    assert teeth_visible(teeth, lm)
    dark, lm = _mouth_picture((40, 20, 25), gap=30)  # open mouth, dark interior
    assert not teeth_visible(dark, lm)
    tongue, lm = _mouth_picture((200, 80, 90), gap=30)  # bright but saturated
    assert not teeth_visible(tongue, lm)
    shut, lm = _mouth_picture((235, 232, 225), gap=0)  # closed: nothing between the lips
    assert not teeth_visible(shut, lm)


def test_align_reports_rest_mouth_state() -> None:
    img, lm = _mouth_picture((235, 232, 225), gap=30)
    face = align_crop(img, lm, size=512)
    assert face.teeth_visible_rest is True
    assert face.mouth_open_rest == pytest.approx(30 / 120, rel=1e-3)


def test_aligned_face_is_read_only() -> None:
    face = align_crop(noise_image(400, 400), synthetic_landmarks(200, 180, 50), size=128)
    with pytest.raises(ValueError):
        face.crop[0, 0, 0] = 1
    with pytest.raises(ValueError):
        face.landmarks[0, 0] = 1


@pytest.mark.parametrize(
    "rgb, lm",
    [
        (np.zeros((100, 100), np.uint8), synthetic_landmarks(50, 50, 20)),  # grey, not RGB
        (np.zeros((100, 100, 3), np.float32), synthetic_landmarks(50, 50, 20)),
        (np.zeros((100, 100, 3), np.uint8), np.zeros((5, 2), np.float32)),
        (np.zeros((100, 100, 3), np.uint8), np.full((68, 2), np.nan, np.float32)),
    ],
)
def test_align_rejects_bad_input(rgb: np.ndarray, lm: np.ndarray) -> None:
    with pytest.raises(ValueError):
        align_crop(rgb, lm, size=128)
