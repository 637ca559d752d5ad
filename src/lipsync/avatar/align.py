"""Square talking-head crop around a face, and the mouth's rest state.

The crop is axis-aligned (no in-plane rotation): an engine pastes its frames back into the
source with a plain resize + offset, and a slightly tilted head stays slightly tilted, which is
what the user uploaded. Framing follows the usual talking-head crops (FOMM / SadTalker "crop"):
the 68-point face box fills about half the crop, the eyes sit at ~40 % of the height, so the
whole head, the hair and some neck and shoulders are visible and the chin has room to drop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Fraction of the crop side taken by the larger side of the 68-landmark bounding box.
FACE_FRACTION = 0.47
#: Height of the eye line in the crop, as a fraction of the crop side (from the top).
EYE_LINE = 0.40

# dlib 68-point indices
RIGHT_EYE = slice(36, 42)  # subject's right eye, image left
LEFT_EYE = slice(42, 48)
INNER_LIP = slice(60, 68)
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))

# Teeth: bright, nearly grey pixels inside the inner lips. Thresholds on OpenCV's 8-bit HSV.
_TEETH_MAX_SATURATION = 90  # lips and tongue are clearly red; enamel is not
_TEETH_MIN_VALUE = 110
_TEETH_MIN_SHARE = 0.25  # share of the inner-lip area that must look like teeth
_TEETH_MIN_GAP = 0.04  # inner-lip gap / eye distance below which the mouth counts as shut


@dataclass(frozen=True)
class AlignedFace:
    """A square crop of the source around one face.

    ``crop_box`` is the square in source pixels (x0, y0, x1, y1), exclusive ends, possibly reaching
    outside the image (that part of the crop is padding). ``landmarks`` are in crop pixels.
    """

    crop: np.ndarray  # (size, size, 3) uint8 RGB
    crop_box: tuple[float, float, float, float]
    landmarks: np.ndarray  # (68, 2) float32
    mouth_open_rest: float
    teeth_visible_rest: bool

    def __post_init__(self) -> None:
        for name in ("crop", "landmarks"):
            a = getattr(self, name)
            if a.flags.writeable:
                a = a.view()
                a.flags.writeable = False
                object.__setattr__(self, name, a)

    @property
    def size(self) -> int:
        return int(self.crop.shape[0])


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lm = np.asarray(landmarks, dtype=np.float64)
    return lm[RIGHT_EYE].mean(axis=0), lm[LEFT_EYE].mean(axis=0)


def inter_ocular(landmarks: np.ndarray) -> float:
    """Distance between the two eye centres (the scale every mouth measure is divided by)."""
    right, left = eye_centres(landmarks)
    return float(np.linalg.norm(left - right))


def mouth_open_ratio(landmarks: np.ndarray) -> float:
    """Mean inner-lip gap of the pairs (61,67), (62,66), (63,65) over the eye distance.

    Scale-free, so source and crop landmarks give the same value; it is the same measure the
    independent judge (lipeval) uses for mouth opening.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    iod = inter_ocular(lm)
    if iod <= 0:
        return 0.0
    gap = np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in INNER_LIP_PAIRS])
    return float(gap / iod)


def teeth_visible(crop: np.ndarray, landmarks: np.ndarray) -> bool:
    """Whether the inner-lip polygon 60..67 is mostly bright, low-saturation pixels (teeth)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if mouth_open_ratio(lm) < _TEETH_MIN_GAP:
        return False
    poly = np.round(lm[INNER_LIP]).astype(np.int32)
    x0, y0 = np.maximum(poly.min(axis=0), 0)
    x1, y1 = poly.max(axis=0) + 1
    h, w = crop.shape[:2]
    x1, y1 = min(int(x1), w), min(int(y1), h)
    if x1 <= x0 or y1 <= y0:
        return False
    patch = np.ascontiguousarray(crop[y0:y1, x0:x1])
    mask = np.zeros(patch.shape[:2], np.uint8)
    cv2.fillPoly(mask, [poly - np.array([x0, y0], np.int32)], 1)
    inside = mask.astype(bool)
    n = int(inside.sum())
    if n < 4:
        return False
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)[inside]
    teeth = (hsv[:, 1] <= _TEETH_MAX_SATURATION) & (hsv[:, 2] >= _TEETH_MIN_VALUE)
    return bool(teeth.mean() >= _TEETH_MIN_SHARE)


def crop_square(landmarks: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side) of the crop square in source pixels for these source landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    lo, hi = lm.min(axis=0), lm.max(axis=0)
    face = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    side = max(8, round(face / FACE_FRACTION))
    right, left = eye_centres(lm)
    eye_y = (right[1] + left[1]) / 2.0
    cx = (lo[0] + hi[0]) / 2.0
    x0 = round(cx - side / 2.0)
    y0 = round(eye_y - EYE_LINE * side)
    return x0, y0, side


def _outside_distance(inside: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Distance (output pixels) of each crop pixel from the ``inside`` rectangle (x0, y0, x1,
    y1 in crop pixels, where the source image is): 0 inside, growing outwards."""
    x0, y0, x1, y1 = inside
    outside = np.ones((size, size), np.uint8)
    outside[y0:y1, x0:x1] = 0
    return cv2.distanceTransform(outside, cv2.DIST_L2, 3)


def _soften_padding(crop: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Replace the replicated border pixels by a smooth backdrop grown from the image.

    Replicated edges are streaks that run straight out of the image (a cut forehead becomes a
    skin-coloured bar). Instead, the padding gets a normalised-convolution fill computed on a
    small copy: each outside pixel is a Gaussian-weighted mean of the nearby image pixels, with
    the widest kernel only where nothing is near. Within ~5 % of the seam the replicated pixels
    fade into that fill, so the transition is invisible.
    """
    size = crop.shape[0]
    small_side = 64
    inside = (distance <= 0).astype(np.float32)
    small = cv2.resize(crop.astype(np.float32) * inside[..., None], (small_side, small_side),
                       interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(inside, (small_side, small_side), interpolation=cv2.INTER_AREA)
    fill = np.zeros_like(small)
    todo = np.ones((small_side, small_side), bool)
    for sigma in (1.0, 3.0, 8.0, 20.0, 48.0):
        num = cv2.GaussianBlur(small, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        den = cv2.GaussianBlur(small_mask, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        ok = todo & (den > (0.15 if sigma < 48.0 else 1e-6))
        fill[ok] = num[ok] / den[ok][:, None]
        todo &= ~ok
    if todo.any():  # nothing of the image anywhere near (cannot happen for a real crop)
        fill[todo] = crop.reshape(-1, 3).mean(axis=0)
    fill = cv2.GaussianBlur(fill, (0, 0), 1.5)
    fill_big = cv2.resize(fill, (size, size), interpolation=cv2.INTER_CUBIC)
    w = np.clip(distance / max(2.0, 0.05 * size), 0.0, 1.0)[..., None]
    out = crop * (1.0 - w) + fill_big * w
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def align_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int = 512) -> AlignedFace:
    """Cut the talking-head square around ``landmarks`` (source pixels) out of ``rgb``.

    Where the square extends past the image, the missing part becomes a smooth backdrop grown
    from the nearby image (see ``_soften_padding``): featureless, so it can neither look like a
    second, mirrored face to a detector (as reflection padding of a face cut by the border
    can) nor show the streaks of edge replication.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"expected finite (68, 2) landmarks, got {lm.shape}")
    if size < 8:
        raise ValueError(f"crop size {size} is too small")
    h, w = rgb.shape[:2]
    x0, y0, side = crop_square(lm)
    x1, y1 = x0 + side, y0 + side
    scale = size / side

    # The part of the square that lies inside the image.
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 <= sx0 or sy1 <= sy0:
        raise ValueError("crop square does not overlap the image")
    region = np.ascontiguousarray(rgb[sy0:sy1, sx0:sx1])
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    if (sx0, sy0, sx1, sy1) == (x0, y0, x1, y1):
        crop = cv2.resize(region, (size, size), interpolation=interp) if side != size else region.copy()
    else:
        # Resize only the image part, then pad at output size: a huge face in a huge photo
        # never builds the padded square at source resolution. Rounding the inner edges moves
        # them by at most half an output pixel.
        ix0, iy0 = round((sx0 - x0) * scale), round((sy0 - y0) * scale)
        ix1 = max(ix0 + 1, min(size, round((sx1 - x0) * scale)))
        iy1 = max(iy0 + 1, min(size, round((sy1 - y0) * scale)))
        inner = cv2.resize(region, (ix1 - ix0, iy1 - iy0), interpolation=interp)
        padded = cv2.copyMakeBorder(inner, iy0, size - iy1, ix0, size - ix1, cv2.BORDER_REPLICATE)
        crop = _soften_padding(padded, _outside_distance((ix0, iy0, ix1, iy1), size))

    # Pixel-centre mapping, the same one cv2.resize uses.
    crop_lm = ((lm - np.array([x0, y0], np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    return AlignedFace(
        crop=np.ascontiguousarray(crop),
        crop_box=(float(x0), float(y0), float(x1), float(y1)),
        landmarks=crop_lm,
        mouth_open_rest=mouth_open_ratio(crop_lm),
        teeth_visible_rest=teeth_visible(crop, crop_lm),
    )


def crop_to_source(landmarks: np.ndarray, crop_box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Map crop-pixel points back into source pixels (inverse of the mapping in ``align_crop``)."""
    x0, y0, x1, _ = crop_box
    side = x1 - x0
    pts = np.asarray(landmarks, dtype=np.float64)
    return ((pts + 0.5) * (side / size) - 0.5 + np.array([x0, y0])).astype(np.float32)
