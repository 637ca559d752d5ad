"""avatar/: face detection, landmarks, talking-head crop and the on-disk avatar cache.

``precompute_avatar(image, cache=...)`` is the entry point: it returns the cached ``Avatar``
for a decoded portrait, building it (once) when it is not cached yet.
"""
from __future__ import annotations

from .align import AlignedFace, align_crop, crop_to_source, mouth_open_ratio, teeth_visible
from .cache import (
    ID_PATTERN,
    AvatarCache,
    AvatarInfo,
    FaceMeta,
    validate_avatar_id,
    write_file_atomic,
)
from .detect import FaceDetector, UprightFace, default_detector
from .precompute import PRECOMPUTE_VERSION, open_cache, precompute_avatar

__all__ = [
    "ID_PATTERN",
    "PRECOMPUTE_VERSION",
    "AlignedFace",
    "AvatarCache",
    "AvatarInfo",
    "FaceDetector",
    "FaceMeta",
    "UprightFace",
    "align_crop",
    "crop_to_source",
    "default_detector",
    "mouth_open_ratio",
    "open_cache",
    "precompute_avatar",
    "teeth_visible",
    "validate_avatar_id",
    "write_file_atomic",
]
