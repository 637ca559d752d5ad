"""The avatar stage on real portraits (dlib detector + landmarks): the bundled portrait, a tall photo made
from it and its odd variants (tests/material.py)."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync.avatar import (
    PRECOMPUTE_VERSION,
    AvatarCache,
    FaceDetector,
    align_crop,
    default_detector,
    precompute_avatar,
)
from lipsync.avatar.align import FACE_FRACTION, inter_ocular
from lipsync.errors import NoFaceFound
from lipsync.types import Avatar, Image
from tests.material import PORTRAIT_MODES, TALL_SIZE, Material

try:
    from lipsync.io.image import load_image
except ImportError:  # io/ not there yet: decode the same way (EXIF applied, RGB)
    load_image = None


def decode(path: Path) -> tuple[Image, bytes]:
    data = path.read_bytes()
    if load_image is not None:
        return load_image(data), data
    import io

    from PIL import Image as PILImage
    from PIL import ImageOps

    with PILImage.open(io.BytesIO(data)) as im:
        fmt = im.format
        pixels = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return Image(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), format=fmt), data


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return default_detector()


@pytest.fixture
def cache(tmp_path: Path) -> AvatarCache:
    return AvatarCache(tmp_path / "avatars", PRECOMPUTE_VERSION)


@pytest.fixture(scope="module")
def tall(detector: FaceDetector, material: Material, tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    """The avatar of faces/tall.jpg: a 910x1137 photo with the face off-centre."""
    image, data = decode(material.path("faces/tall.jpg"))
    cache = AvatarCache(tmp_path_factory.mktemp("tall"), PRECOMPUTE_VERSION)
    return precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)[0]


def assert_talking_head(avatar: Avatar) -> None:
    """Plausible landmarks and framing in crop coordinates."""
    lm = avatar.landmarks.astype(np.float64)
    size = avatar.size
    assert avatar.image.shape == (size, size, 3)
    eyes_y = lm[36:48, 1].mean()
    nose_y = lm[30, 1]
    mouth_y = lm[48:68, 1].mean()
    chin_y = lm[8, 1]
    assert eyes_y < nose_y < mouth_y < chin_y  # upright face
    right_eye_x, left_eye_x = lm[36:42, 0].mean(), lm[42:48, 0].mean()
    assert right_eye_x < left_eye_x  # not mirrored
    iod = inter_ocular(lm) / size
    assert 0.12 < iod < 0.30
    lo, hi = lm.min(axis=0), lm.max(axis=0)
    assert max(hi - lo) / size == pytest.approx(FACE_FRACTION, abs=0.03)
    assert eyes_y / size == pytest.approx(0.40, abs=0.03)
    assert np.all(lm > 0) and np.all(lm < size)


def judge_boxes(rgb: np.ndarray) -> list:
    """What the independent judge does: dlib HOG, upsampled once, on our output frame."""
    import dlib

    return list(dlib.get_frontal_face_detector()(np.ascontiguousarray(rgb), 1))


# --- the two photos -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["portrait.png", "tall.jpg"])
def test_faces_become_talking_heads(
    name: str, detector: FaceDetector, cache: AvatarCache, material: Material, tmp_path: Path
) -> None:
    image, data = decode(material.path(f"faces/{name}"))
    avatar, hit = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert hit is False
    assert_talking_head(avatar)
    assert avatar.source_size == (image.width, image.height)
    # The portrait smiles with teeth showing.
    assert avatar.teeth_visible_rest is True
    assert 0.05 < avatar.mouth_open_rest < 0.5
    # The judge finds exactly one face in the crop, around our landmarks.
    boxes = judge_boxes(avatar.image)
    assert len(boxes) == 1
    cx, cy = avatar.landmarks[:, 0].mean(), avatar.landmarks[:, 1].mean()
    b = boxes[0]
    assert b.left() < cx < b.right() and b.top() < cy < b.bottom()
    # Warm: same avatar from disk, no detection.
    again, hit = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert hit is True
    np.testing.assert_array_equal(again.image, avatar.image)
    cv2.imwrite(str(tmp_path / f"{name}.crop.png"), cv2.cvtColor(avatar.image, cv2.COLOR_RGB2BGR))


def test_landmarks_match_a_full_resolution_dlib_pass(detector: FaceDetector, material: Material) -> None:
    # Our downscaled search + refined box must give landmarks as good as dlib on the full image.
    import dlib

    image, _ = decode(material.path("faces/tall.jpg"))
    box, lm = detector.find_face(image.pixels)
    reference_rect = max(dlib.get_frontal_face_detector()(image.pixels, 1), key=lambda r: r.area())
    ref = detector.landmarks(image.pixels, type(box)(reference_rect.left(), reference_rect.top(),
                                                     reference_rect.right() + 1, reference_rect.bottom() + 1))
    iod = inter_ocular(ref)
    assert np.linalg.norm(lm - ref, axis=1).mean() / iod < 0.03


# --- unusual but valid -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [*PORTRAIT_MODES, "exif_rotated.jpg"])
def test_unusual_variants_of_the_portrait_work(
    name: str, detector: FaceDetector, cache: AvatarCache, material: Material, tall: Avatar
) -> None:
    image, data = decode(material.path(f"unusual/{name}"))
    avatar, _ = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert_talking_head(avatar)
    assert avatar.source_size == TALL_SIZE
    # Same photo as tall.jpg: the same framing, within a few pixels, and the same picture.
    np.testing.assert_allclose(avatar.crop_box, tall.crop_box, atol=6)
    assert np.linalg.norm(avatar.landmarks - tall.landmarks, axis=1).mean() < 0.03 * inter_ocular(tall.landmarks)
    grey = cv2.cvtColor(avatar.image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    ref = cv2.cvtColor(tall.image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert np.corrcoef(grey.ravel(), ref.ravel())[0, 1] > 0.95  # upright, not mirrored


def test_exif_rotated_face_comes_out_upright(detector: FaceDetector, cache: AvatarCache, material: Material) -> None:
    image, data = decode(material.path("unusual/exif_rotated.jpg"))
    avatar, _ = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    meta = cache.face_meta(avatar.id)
    # Whatever turn was needed is recorded, and the recorded source frame matches it.
    turned = np.rot90(image.pixels, meta.quarter_turns)
    assert meta.source_size == (turned.shape[1], turned.shape[0]) == avatar.source_size
    assert_talking_head(avatar)


def test_two_faces_takes_the_largest(detector: FaceDetector, cache: AvatarCache, material: Material) -> None:
    image, data = decode(material.path("unusual/two_faces.png"))
    boxes = detector.detect(image.pixels)
    assert len(boxes) >= 2
    assert [b.area for b in boxes] == sorted((b.area for b in boxes), reverse=True)
    # Two faces (the portrait pasted twice): one box in each half of the picture.
    halves = {int((b.x0 + b.x1) / 2 > image.width / 2) for b in boxes}
    assert halves == {0, 1}
    box, _lm = detector.find_face(image.pixels)
    assert abs(box.area - boxes[0].area) < 0.25 * boxes[0].area
    assert box.area > 1.3 * max(b.area for b in boxes[1:])
    assert (box.x0 + box.x1) / 2 > image.width / 2  # the larger face is on the right
    avatar, _ = precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert avatar.crop_box[0] > image.width / 2 - 100
    assert_talking_head(avatar)


# --- refused -------------------------------------------------------------------------------
def test_landscape_is_refused_with_no_face_found(detector: FaceDetector, cache: AvatarCache, material: Material) -> None:
    image, data = decode(material.path("bad/noface.png"))
    with pytest.raises(NoFaceFound) as info:
        precompute_avatar(image, cache=cache, detector=detector, source_bytes=data)
    assert info.value.code == "no_face"
    assert "no face" in info.value.message and "\n" not in info.value.message
    assert not cache.contains(image.sha256)


def test_blank_image_is_refused(detector: FaceDetector) -> None:
    with pytest.raises(NoFaceFound):
        detector.find_upright_face(np.full((600, 400, 3), 128, np.uint8))


# --- small faces, concurrency ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.4, 0.22])
def test_small_face_in_a_large_photo_is_found(
    scale: float, detector: FaceDetector, material: Material, tall: Avatar
) -> None:
    # A "full-body" shot: the portrait shrunk and placed low in a big plain frame.
    image, _ = decode(material.path("faces/tall.jpg"))
    small = cv2.resize(image.pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.full((2600, 2000, 3), (96, 112, 128), np.uint8)
    y, x = 1400, 800
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    face = detector.find_upright_face(canvas)
    assert face.quarter_turns == 0
    assert x < face.box.x0 < face.box.x1 < x + small.shape[1]
    aligned = align_crop(face.pixels, face.landmarks, 512)
    # Same framing as the full-size portrait, relative to the face.
    lm = aligned.landmarks
    assert np.linalg.norm(lm - tall.landmarks, axis=1).mean() < 0.08 * inter_ocular(tall.landmarks)


def test_detector_is_safe_to_share_between_threads(detector: FaceDetector, material: Material) -> None:
    images = [decode(material.path(f"faces/{n}"))[0].pixels for n in ("tall.jpg", "portrait.png")]
    expected = [detector.find_face(im) for im in images]
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                box, lm = detector.find_face(images[i % 2])
                if box != expected[i % 2][0] or not np.array_equal(lm, expected[i % 2][1]):
                    mismatches.append(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches
