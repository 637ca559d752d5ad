"""Portrait -> cached ``Avatar``: detection, landmarks and crop run once per portrait.

Cold path: find the face (trying turned views if the photo is not upright), cut the
talking-head square, store it. Warm path: one verified read of a PNG and two small files.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..types import Avatar, Image
from .align import align_crop
from .cache import ID_PATTERN, AvatarCache, FaceMeta
from .detect import FaceDetector, default_detector

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

#: Bump when detection, framing or the stored files change: old entries are then ignored.
PRECOMPUTE_VERSION = "1"
#: Sub-directory of ``Settings.cache_dir`` that holds the avatar cache.
AVATAR_CACHE_SUBDIR = "avatars"

# Striped locks: threads of one process precomputing the same portrait wait for the first
# instead of repeating its work (other processes may repeat it; the cache keeps one copy).
_LOCKS = tuple(threading.Lock() for _ in range(64))


def open_cache(settings: Settings) -> AvatarCache:
    """The avatar cache configured by ``settings`` (``cache_dir/avatars``, ``max_avatars``)."""
    return AvatarCache(Path(settings.cache_dir) / AVATAR_CACHE_SUBDIR, PRECOMPUTE_VERSION, settings.max_avatars,
                       max_image_pixels=settings.max_image_pixels)


def precompute_avatar(
    image: Image,
    *,
    cache: AvatarCache,
    detector: FaceDetector | None = None,
    size: int = 512,
    force: bool = False,
    source_bytes: bytes | None = None,
) -> tuple[Avatar, bool]:
    """The avatar for ``image`` and whether it came from the cache.

    ``source_bytes``: the uploaded file (its SHA-256 must be ``image.sha256``), kept in the
    entry for engines that paste back into the full picture; without it the oriented pixels
    are stored as PNG. ``force`` drops an existing entry and rebuilds it. An entry built at
    another ``size`` is rebuilt from its stored landmarks (no detection). Raises
    ``NoFaceFound`` when the image has no usable face.
    """
    if size < 64 or size % 2:
        raise ValueError(f"avatar size must be even and >= 64, got {size}")
    if source_bytes is not None and hashlib.sha256(source_bytes).hexdigest() != image.sha256:
        raise ValueError("source_bytes do not match image.sha256")
    avatar_id = image.sha256
    if not isinstance(avatar_id, str) or not ID_PATTERN.fullmatch(avatar_id):
        raise ValueError("image.sha256 must be 64 lowercase hex digits")
    with _LOCKS[int(avatar_id[:8], 16) % len(_LOCKS)]:
        if force:
            cache.delete(avatar_id)
            loaded = None
        else:
            loaded = cache.load_with_meta(avatar_id)
        if loaded is not None:
            avatar, meta = loaded
            if avatar.size == size:
                return avatar, True
            log.info("avatar %s cached at %d px, rebuilding at %d px", avatar_id[:12], avatar.size, size)
            return _rebuild_from_meta(image, meta, cache=cache, size=size, source_bytes=source_bytes), False

        face = (detector or default_detector()).find_upright_face(image.pixels)
        aligned = align_crop(face.pixels, face.landmarks, size)
        avatar = Avatar(
            id=avatar_id,
            image=aligned.crop,
            landmarks=aligned.landmarks,
            crop_box=aligned.crop_box,
            source_size=(int(face.pixels.shape[1]), int(face.pixels.shape[0])),
            mouth_open_rest=aligned.mouth_open_rest,
            teeth_visible_rest=aligned.teeth_visible_rest,
        )
        stored = _store(cache, image, avatar, source_bytes, face.landmarks, face.quarter_turns)
        return stored, False


def _rebuild_from_meta(
    image: Image, meta: FaceMeta, *, cache: AvatarCache, size: int, source_bytes: bytes | None
) -> Avatar:
    upright = np.ascontiguousarray(np.rot90(image.pixels, meta.quarter_turns))
    if meta.source_landmarks is None or (upright.shape[1], upright.shape[0]) != tuple(meta.source_size):
        raise ValueError("cached avatar does not match this image")
    aligned = align_crop(upright, meta.source_landmarks, size)
    avatar = Avatar(
        id=image.sha256,
        image=aligned.crop,
        landmarks=aligned.landmarks,
        crop_box=aligned.crop_box,
        source_size=meta.source_size,
        mouth_open_rest=aligned.mouth_open_rest,
        teeth_visible_rest=aligned.teeth_visible_rest,
    )
    cache.delete(image.sha256)
    return _store(cache, image, avatar, source_bytes, meta.source_landmarks, meta.quarter_turns)


def _store(
    cache: AvatarCache,
    image: Image,
    avatar: Avatar,
    source_bytes: bytes | None,
    source_landmarks: np.ndarray,
    quarter_turns: int,
) -> Avatar:
    if source_bytes is not None:
        data, fmt = source_bytes, image.format
    else:
        ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image.pixels), cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError("PNG encoding of the source failed")
        data, fmt = png.tobytes(), "PNG"
    return cache.store(
        avatar, source_bytes=data, source_format=fmt, source_landmarks=source_landmarks, quarter_turns=quarter_turns
    )
