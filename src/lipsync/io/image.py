"""Load a portrait: JPEG, PNG or WebP (decided by content) -> EXIF-oriented RGB uint8 ``Image``.

Checks run cheapest first: byte size before reading, pixel count from the header before
decoding, then a full decode so truncation is found here and not three stages later.
Transparent images are composited over white - what a browser shows a cut-out portrait on.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..errors import CorruptMedia, ImageTooLarge, LipsyncError, UnsupportedMedia
from ..types import Image
from .source import SNIFF_BYTES, Source, read_source, sniff

#: Pillow format names we accept, and what we call them in ``Image.format``.
_FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow names multi-picture JPEGs (what many phone cameras write) "MPO"; it is a JPEG to us.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_ACCEPTED = "JPEG, PNG or WebP"
_BACKGROUND = 255  # white, for transparent pixels
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(source: Source, *, max_pixels: int = 40_000_000, max_bytes: int | None = None) -> Image:
    """Decode a JPEG/PNG/WebP from bytes or a path into RGB uint8, EXIF orientation applied.

    Raises ``PayloadTooLarge`` (more than ``max_bytes``, checked before reading),
    ``UnsupportedMedia`` (any other content), ``ImageTooLarge`` (more than ``max_pixels``,
    checked from the header before decoding) or ``CorruptMedia`` (truncated or broken data).
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data = read_source(source, max_bytes=max_bytes, what="image file")
    digest = hashlib.sha256(data).hexdigest()
    found = sniff(data[:SNIFF_BYTES])
    # Pillow's global settings stay as they are; only the warning filters change, and only for
    # the duration of this load (catch_warnings restores them, though it is process-wide while
    # it lasts): a bomb warning becomes our error, and Pillow's notes about damaged metadata
    # ("Corrupt EXIF data") stay off the user's terminal.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            with PIL.Image.open(io.BytesIO(data), formats=_FORMATS) as im:
                fmt = _FORMAT_ALIASES.get(im.format or "", im.format or "")
                width, height = im.size
                if width * height > max_pixels:
                    raise _too_large(width * height, max_pixels)
                im.load()  # the full decode: truncation and corrupt data surface here
                oriented = _exif_oriented(im)
                pixels = to_rgb(oriented)
        except LipsyncError:
            raise
        except PIL.UnidentifiedImageError:
            if found.kind in ("jpeg", "png", "webp"):
                raise CorruptMedia(f"{found.description} with a broken header could not be read") from None
            raise UnsupportedMedia(
                f"not a supported image format: found {found.description}; send a {_ACCEPTED} image",
                found=found.kind,
            ) from None
        except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as e:
            # Pillow's own guard fired first, so its threshold is the limit that applied.
            pillow_limit = PIL.Image.MAX_IMAGE_PIXELS or max_pixels
            raise _too_large(_pixels_in(str(e)), min(max_pixels, pillow_limit)) from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
            raise CorruptMedia(
                f"{found.description} is truncated or corrupt: {_one_line(e)}", format=found.kind
            ) from None
    return Image(pixels=pixels, sha256=digest, format=fmt)


def _too_large(pixels: int | None, limit: int) -> ImageTooLarge:
    if pixels is None:
        return ImageTooLarge(
            f"image has too many pixels to decode safely (the limit is {limit:,})", limit=limit
        )
    return ImageTooLarge(
        f"image has {pixels:,} pixels, more than the {limit:,} limit", pixels=pixels, limit=limit
    )


def _pixels_in(message: str) -> int | None:
    """The pixel count in Pillow's decompression-bomb message ("Image size (N pixels) ...")."""
    m = re.search(r"\((\d+) pixels\)", message)
    return int(m.group(1)) if m else None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _exif_oriented(im: PIL.Image.Image) -> PIL.Image.Image:
    """``im`` as it should be displayed, per its EXIF Orientation tag (rotated in place, so a
    large photo is not copied when there is nothing to do).

    Broken EXIF metadata does not make the picture unusable, so it falls back to the stored
    orientation instead of refusing the image.
    """
    try:
        PIL.ImageOps.exif_transpose(im, in_place=True)
    except (SyntaxError, ValueError, KeyError, TypeError, OSError, IndexError):
        pass
    return im


def to_rgb(im: PIL.Image.Image) -> np.ndarray:
    """Any Pillow mode as an (H, W, 3) uint8 RGB array.

    Alpha (RGBA, LA, P/L/RGB with a transparent colour) is composited over white. 16/32-bit
    integer and float grey are scaled into 0..255 instead of clipped, which Pillow's own
    ``convert`` would do (a 16-bit PNG would come out almost white).
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in _HIGH_DEPTH_MODES:
        grey = _high_depth_to_uint8(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        blended = (rgba[:, :, :3] * alpha + _BACKGROUND * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey uses the full 0..65535 range; "I" holds 16-bit PNG grey in older Pillow
    releases (or 8-bit values when nothing exceeds 255); "F" is taken as 0..1 if it fits there,
    else as 0..255."""
    x = a.astype(np.float64)
    if mode.startswith("I;16"):
        x = x / 257.0
    elif mode == "I":
        x = x / 257.0 if x.size and x.max() > 255 else x
    elif mode == "F":
        finite = x[np.isfinite(x)]
        x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        x = x * 255.0 if finite.size and finite.max() <= 1.0 else x
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
