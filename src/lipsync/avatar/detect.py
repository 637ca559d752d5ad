"""Face detection and 68-point landmarks with dlib (HOG detector + shape predictor).

The weights ship inside the ``face_recognition_models`` wheel, so nothing is downloaded. HOG
detection cost grows with the pixel count, so we search a downscaled copy first (longest side
640: ~30 ms for a 1 Mpx portrait on one core) and only climb to larger scales when nothing
convincing was found, which is how small faces in full-body photos are still found. Landmarks
are always fitted at full resolution, on a box refined by a second detection around the face.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import CheckpointError, NoFaceFound
from ..types import FaceBox

log = logging.getLogger(__name__)

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

#: Longest image side of the downscaled search passes, tried in order before native resolution.
#: The HOG window is 80 px, so they find faces down to ~12 %, 6 % and 3 % of the longest side.
SEARCH_SIDES: tuple[int, ...] = (640, 1280, 2560)
#: Images up to this longest side get a last pass upsampled 2x by dlib (faces down to ~40 px);
#: beyond it that pass would cost seconds and the native pass already reaches 80 px faces.
UPSAMPLE_MAX_SIDE = 2560
#: Largest search resolution of a quick look (used for the rotated views).
QUICK_MAX_SIDE = 1280
#: dlib detection score (margin over its threshold) we trust outright. Real frontal faces score
#: ~0.9-2.5; background clutter that fires (a helmet, a fist) scores ~0.0-0.2.
CONFIDENT_SCORE = 0.3
#: Smallest eye distance (source pixels) that still gives a usable, not hopelessly blurry, crop.
MIN_EYE_DISTANCE = 8.0
#: Width the face is scaled to for the refinement pass (HOG boxes are quantised to 8 px cells).
_REFINE_FACE_WIDTH = 200


def predictor_path() -> Path:
    """Where the 68-point model lives inside the installed ``face_recognition_models`` package.

    Its own ``pose_predictor_model_location()`` needs ``pkg_resources``, which setuptools >= 81
    no longer ships; locating the package without importing it works either way.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "face landmark model missing: install the 'face_recognition_models' package"
        )
    for base in spec.submodule_search_locations:
        path = Path(base) / "models" / PREDICTOR_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"face landmark model {PREDICTOR_FILE} not found in face_recognition_models")


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("expected an (H, W, 3) uint8 RGB array")
    return np.ascontiguousarray(rgb)


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def search_passes(width: int, height: int) -> list[tuple[float, int]]:
    """(downscale factor <= 1, dlib upsample count) per search pass, cheapest first."""
    longest = max(width, height)
    passes = [(side / longest, 0) for side in SEARCH_SIDES if side < longest]
    passes.append((1.0, 0))
    if longest <= UPSAMPLE_MAX_SIDE:
        passes.append((1.0, 1))
    return passes


class FaceDetector:
    """dlib's frontal HOG face detector plus the 68-point shape predictor.

    Thread safety: dlib's ``object_detector::operator()`` loads the image into its scanner
    member (documented as needing a lock for concurrent use), so detection runs under a lock.
    The shape predictor is documented as safe to share between threads and runs unlocked.
    """

    def __init__(self, detector: Any, predictor: Any) -> None:
        self._detector = detector
        self._predictor = predictor
        self._detect_lock = threading.Lock()

    @classmethod
    def load(cls, predictor_file: Path | None = None) -> FaceDetector:
        import dlib  # deferred: ~1 s of model loading is paid only by whoever needs faces

        path = predictor_file or predictor_path()
        try:
            predictor = dlib.shape_predictor(str(path))
        except RuntimeError as e:
            raise CheckpointError(f"cannot load face landmark model {path}: {e}") from None
        return cls(dlib.get_frontal_face_detector(), predictor)

    # --- detection ---------------------------------------------------------------------
    def _run(self, rgb: np.ndarray, scale: float, upsample: int) -> list[tuple[FaceBox, float]]:
        small = _resize(rgb, scale)
        with self._detect_lock:
            rects, scores, _ = self._detector.run(small, upsample, 0.0)
        # Exact per-axis factors: the small image's sides were rounded.
        sx, sy = small.shape[1] / rgb.shape[1], small.shape[0] / rgb.shape[0]
        out = []
        for r, s in zip(rects, scores):  # dlib rectangles have inclusive right/bottom
            box = FaceBox(r.left() / sx, r.top() / sy, (r.right() + 1) / sx, (r.bottom() + 1) / sy)
            out.append((box, float(s)))
        return out

    def _search(
        self, rgb: np.ndarray, passes: list[tuple[float, int]], allow_weak: bool
    ) -> list[tuple[FaceBox, float]]:
        """Run ``passes`` in order; stop at the first that finds a confident face.

        Returns that pass's confident faces, largest first. Passes go on while only low-score
        detections turn up (usually clutter); with ``allow_weak``, if no pass finds a confident
        face, the first weak detections are returned, best score first (trust the score, not
        the size, when the evidence is weak).
        """
        weak: list[tuple[FaceBox, float]] = []
        for scale, upsample in passes:
            found = self._run(rgb, scale, upsample)
            confident = [f for f in found if f[1] >= CONFIDENT_SCORE]
            if confident:
                return sorted(confident, key=lambda f: f[0].area, reverse=True)
            if found and not weak:
                weak = found
        return sorted(weak, key=lambda f: f[1], reverse=True) if allow_weak else []

    def detect_scored(self, rgb: np.ndarray) -> list[tuple[FaceBox, float]]:
        """Faces with their dlib scores (margin over dlib's threshold), largest first."""
        rgb = _check_rgb(rgb)
        return self._search(rgb, search_passes(rgb.shape[1], rgb.shape[0]), allow_weak=True)

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """Face boxes in source pixels, largest first (empty when there is none)."""
        return [box for box, _ in self.detect_scored(rgb)]

    def refine(self, rgb: np.ndarray, box: FaceBox) -> FaceBox:
        """Re-detect in a window around ``box`` with the face at ~200 px, for a tighter box.

        The coarse box from a downscaled pass is quantised to HOG cells of the small image; the
        shape predictor is sensitive to its box, so a sharper box gives steadier landmarks.
        """
        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        m = 0.6 * max(box.width, box.height)
        x0, y0 = max(0, int(box.x0 - m)), max(0, int(box.y0 - m))
        x1, y1 = min(w, math.ceil(box.x1 + m)), min(h, math.ceil(box.y1 + m))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return box
        window = rgb[y0:y1, x0:x1]
        scale = min(1.0, _REFINE_FACE_WIDTH / max(box.width, 1.0))
        upsample = 1 if box.width * scale < 100 else 0
        best, best_iou = box, 0.3  # a re-detection must clearly be the same face
        for cand, _ in self._run(np.ascontiguousarray(window), scale, upsample):
            cand = FaceBox(cand.x0 + x0, cand.y0 + y0, cand.x1 + x0, cand.y1 + y0)
            iou = _iou(cand, box)
            if iou > best_iou:
                best, best_iou = cand, iou
        return best

    # --- landmarks ---------------------------------------------------------------------
    def landmarks(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        """dlib's 68 points for the face in ``box`` (source pixels), (68, 2) float32."""
        import dlib

        rgb = _check_rgb(rgb)
        rect = dlib.rectangle(
            round(box.x0), round(box.y0), round(box.x1) - 1, round(box.y1) - 1
        )
        shape = self._predictor(rgb, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def find_face(self, rgb: np.ndarray) -> tuple[FaceBox, np.ndarray]:
        """The largest face and its landmarks, or ``NoFaceFound``."""
        rgb = _check_rgb(rgb)
        faces = self.detect(rgb)
        if not faces:
            raise _no_face()
        return self._fit(rgb, faces[0])

    def find_upright_face(self, rgb: np.ndarray) -> UprightFace:
        """Like ``find_face``, but also tries the image turned by 180, 90 and 270 degrees, so
        photos whose EXIF orientation is missing or wrong (tags 6 and 8 are often swapped)
        still work. The result says which turn found the face.

        Order, cheapest evidence first: quick upright passes (<= 1280 px), quick passes on the
        three turned views, then the expensive upright passes that find small faces.
        """
        rgb = _check_rgb(rgb)
        passes = search_passes(rgb.shape[1], rgb.shape[0])
        quick = [p for p in passes if _is_quick(p, rgb.shape)]
        faces = self._search(rgb, quick, allow_weak=False)
        if faces:
            box, lm = self._fit(rgb, faces[0][0])
            return UprightFace(0, rgb, box, lm)
        for quarter_turns in (2, 1, 3):
            turned = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
            turned_quick = [p for p in search_passes(turned.shape[1], turned.shape[0]) if _is_quick(p, turned.shape)]
            faces = self._search(turned, turned_quick, allow_weak=False)
            if faces:
                try:
                    box, lm = self._fit(turned, faces[0][0])
                except NoFaceFound:
                    continue
                log.info("face found with the image turned %d degrees", 90 * quarter_turns)
                return UprightFace(quarter_turns, turned, box, lm)
        slow = [p for p in passes if p not in quick]
        faces = self._search(rgb, slow, allow_weak=True) if slow else []
        if not faces:
            # The quick passes may have seen weak detections; the full search keeps them.
            faces = self._search(rgb, quick, allow_weak=True)
        if not faces:
            raise _no_face()
        box, lm = self._fit(rgb, faces[0][0])
        return UprightFace(0, rgb, box, lm)

    def _fit(self, rgb: np.ndarray, coarse: FaceBox) -> tuple[FaceBox, np.ndarray]:
        """Refined box + landmarks for a detection, checked for an animatable face."""
        box = self.refine(rgb, coarse)
        lm = self.landmarks(rgb, box)
        eye_r, eye_l = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
        eye_distance = float(np.linalg.norm(eye_l - eye_r))
        mouth_y = float(lm[48:68, 1].mean())
        if eye_distance < MIN_EYE_DISTANCE:
            raise NoFaceFound(
                f"the face is too small to animate ({box.width:.0f} px wide); use a closer photo",
                face_width=round(box.width),
            )
        if not mouth_y > max(eye_r[1], eye_l[1]):
            raise NoFaceFound("no upright face found in the image; rotate the photo so the face is upright")
        return box, lm


@dataclass(frozen=True)
class UprightFace:
    """A face found in ``pixels``: the source turned ``quarter_turns`` x 90 degrees
    counter-clockwise (``np.rot90``; 0 when it was upright as given)."""

    quarter_turns: int
    pixels: np.ndarray
    box: FaceBox
    landmarks: np.ndarray

    @property
    def rotation_degrees(self) -> int:
        return 90 * self.quarter_turns


def _no_face() -> NoFaceFound:
    return NoFaceFound("no face found in the image; use a well-lit photo with one face looking at the camera")


def _is_quick(p: tuple[float, int], shape: tuple[int, ...]) -> bool:
    scale, upsample = p
    return upsample == 0 and scale * max(shape[0], shape[1]) <= QUICK_MAX_SIDE + 0.5


def _iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


_default: FaceDetector | None = None
_default_lock = threading.Lock()


def default_detector() -> FaceDetector:
    """The process-wide detector, loaded on first use (once, even with concurrent callers)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = FaceDetector.load()
                log.info("face detector loaded")
    return _default
