"""io/image: accepted formats, pixel limits, EXIF orientation, mode conversion, corrupt files."""

from __future__ import annotations

import builtins
import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from lipsync.errors import (
    CorruptMedia,
    ImageTooLarge,
    InvalidInput,
    LipsyncError,
    PayloadTooLarge,
    UnsupportedMedia,
)
from lipsync.io import load_image, to_rgb
from tests.material import PORTRAIT_MODES, UNUSUAL_IMAGES


# --- test material, written here ------------------------------------------------------------------
def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """An RGB image with no symmetry, so any flip or rotation shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 3) % 256], axis=2).astype(np.uint8)


def encode(im: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions but carries almost no data (a decompression bomb's
    shape: decoding it would allocate width * height * 3 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def assert_refused(exc_type: type[LipsyncError], source, **kw) -> LipsyncError:
    with pytest.raises(exc_type) as info:
        load_image(source, **kw)
    msg = info.value.message
    assert msg and "\n" not in msg and "Traceback" not in msg
    return info.value


# --- accepted formats ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "kw", "lossless"),
    [("PNG", {}, True), ("WEBP", {"lossless": True}, True), ("JPEG", {"quality": 95}, False)],
)
def test_accepted_formats_round_trip(fmt, kw, lossless):
    rgb = gradient()
    data = encode(PIL.Image.fromarray(rgb), fmt, **kw)
    image = load_image(data)
    assert image.format == fmt
    assert image.pixels.shape == rgb.shape and image.pixels.dtype == np.uint8
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert not image.pixels.flags.writeable
    diff = np.abs(image.pixels.astype(int) - rgb.astype(int))
    assert diff.max() == 0 if lossless else diff.mean() < 3


def test_path_and_bytes_give_the_same_image(tmp_path):
    data = encode(PIL.Image.fromarray(gradient()), "PNG")
    path = tmp_path / "portrait.gif"  # the name is irrelevant
    path.write_bytes(data)
    a, b = load_image(path), load_image(data)
    assert a.sha256 == b.sha256 and np.array_equal(a.pixels, b.pixels)


# --- modes -----------------------------------------------------------------------------------------------
def test_grey_and_bilevel_become_three_equal_channels():
    grey = gradient()[:, :, 0]
    for mode in ("L", "1"):
        im = PIL.Image.fromarray(grey).convert(mode)
        out = load_image(encode(im, "PNG")).pixels
        assert out.shape == (*grey.shape, 3)
        assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 1], out[:, :, 2])
        expected = np.asarray(im.convert("L"))
        assert np.array_equal(out[:, :, 0], expected)


def test_rgba_is_composited_over_white():
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = np.array([0, 128, 255])[None, :]
    out = load_image(encode(PIL.Image.fromarray(rgba, "RGBA"), "PNG")).pixels
    assert out.shape == (4, 3, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)  # fully transparent -> background
    assert tuple(out[0, 2]) == (200, 100, 0)  # opaque -> unchanged
    half = out[0, 1].astype(int)
    expected = [(c * 128 + 255 * 127) / 255 for c in (200, 100, 0)]
    assert np.allclose(half, expected, atol=1)


def test_grey_with_alpha_is_composited():
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 10
    la[..., 1] = [[0, 255], [255, 0]]
    out = load_image(encode(PIL.Image.fromarray(la, "LA"), "PNG")).pixels
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [10] * 3


def test_palette_with_transparent_index():
    p = PIL.Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1, 0])
    data = encode(p, "PNG", transparency=1)
    assert PIL.Image.open(io.BytesIO(data)).mode == "P"
    out = load_image(data).pixels
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [255, 0, 0]]


def test_cmyk_jpeg_becomes_rgb():
    rgb = gradient()
    cmyk = PIL.Image.fromarray(rgb).convert("CMYK")
    out = load_image(encode(cmyk, "JPEG", quality=95)).pixels
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4


def test_16_bit_grey_png_is_scaled_not_clipped():
    grey16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    im = PIL.Image.fromarray(grey16)  # mode I;16
    data = encode(im, "PNG")
    out = load_image(data).pixels
    np.testing.assert_array_equal(out[:, :, 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", np.array([[0, 65535], [32896, 257]], np.int32), [[0, 255], [128, 1]]),
        ("I", np.array([[0, 255], [100, 7]], np.int32), [[0, 255], [100, 7]]),
        ("F", np.array([[0.0, 1.0], [0.5, 0.25]], np.float32), [[0, 255], [128, 64]]),
        ("F", np.array([[0.0, 255.0], [300.0, -4.0]], np.float32), [[0, 255], [255, 0]]),
    ],
)
def test_high_depth_modes_scale_into_bytes(mode, values, expected):
    im = PIL.Image.fromarray(values, mode)
    out = to_rgb(im)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 2], np.array(expected, np.uint8))


# --- EXIF orientation ---------------------------------------------------------------------------------------
# What each EXIF Orientation value means, written as the numpy operation that takes the stored
# pixels to the displayed picture (EXIF 2.3, tag 0x0112).
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # needs 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # needs 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAY))
def test_exif_orientation_is_applied(orientation):
    stored = gradient(30, 50)
    im = PIL.Image.fromarray(stored)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    out = load_image(encode(im, "PNG", exif=exif.tobytes())).pixels
    np.testing.assert_array_equal(out, DISPLAY[orientation](stored))


def test_broken_exif_does_not_block_the_picture_or_print_warnings(recwarn):
    rgb = gradient()
    data = encode(PIL.Image.fromarray(rgb), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*garbage")
    image = load_image(data)
    assert image.pixels.shape == rgb.shape
    assert [str(w.message) for w in recwarn] == []


# --- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "needle"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")]
)
def test_other_image_formats_are_unsupported(fmt, needle):
    data = encode(PIL.Image.fromarray(gradient()), fmt)
    err = assert_refused(UnsupportedMedia, data)
    assert needle in err.message and "JPEG, PNG or WebP" in err.message


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40, "WAV audio"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 100, "MP3"),
        (b"just some words, not a picture\n" * 3, "text"),
        (b"\x00\x01\x02\x03\x04\x05\xfe\xfd" * 4, "unrecognised"),
        (b"", "empty"),
    ],
)
def test_non_images_are_unsupported_and_named(blob, needle):
    assert needle in assert_refused(UnsupportedMedia, blob).message


def test_png_bomb_header_is_refused_before_decoding():
    err = assert_refused(ImageTooLarge, png_header_only(30000, 30000))  # past Pillow's own hard limit
    assert "900,000,000" in err.message and "40,000,000" in err.message


@pytest.mark.parametrize(("w", "h"), [(8000, 6000), (9500, 9500)])
def test_pixel_limit_from_header(w, h):
    # 48 Mpx is under Pillow's warning threshold (our check); 90.25 Mpx triggers its warning,
    # which must become our error, not a printed warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = assert_refused(ImageTooLarge, png_header_only(w, h))
    assert f"{w * h:,}" in err.message and "40,000,000" in err.message


def test_pillow_guard_still_applies_above_its_threshold_and_says_so():
    err = assert_refused(ImageTooLarge, png_header_only(9500, 9500), max_pixels=10**9)
    assert "90,250,000" in err.message and f"{PIL.Image.MAX_IMAGE_PIXELS:,}" in err.message


def test_custom_pixel_limit():
    data = encode(PIL.Image.fromarray(gradient(100, 100)), "PNG")
    err = assert_refused(ImageTooLarge, data, max_pixels=5000)
    assert "10,000" in err.message and "5,000" in err.message
    assert load_image(data, max_pixels=10_000).width == 100


def test_pillow_global_state_is_left_alone():
    before = (PIL.Image.MAX_IMAGE_PIXELS, PIL.ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert_refused(ImageTooLarge, png_header_only(9500, 9500))
    load_image(encode(PIL.Image.fromarray(gradient()), "PNG"))
    after = (PIL.Image.MAX_IMAGE_PIXELS, PIL.ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert before == after


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_corrupt(fmt):
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # incompressible, so a cut bites
    data = encode(PIL.Image.fromarray(noisy), fmt)
    err = assert_refused(CorruptMedia, data[: len(data) // 2])
    assert "truncated or corrupt" in err.message or "broken header" in err.message


def test_png_signature_with_garbage_is_corrupt():
    err = assert_refused(CorruptMedia, b"\x89PNG\r\n\x1a\n" + b"\x13\x37" * 50)
    assert "PNG" in err.message


def test_max_bytes_for_bytes_input():
    data = encode(PIL.Image.fromarray(gradient()), "PNG")
    err = assert_refused(PayloadTooLarge, data, max_bytes=len(data) - 1)
    assert err.detail["size"] == len(data)
    assert load_image(data, max_bytes=len(data)).height == 48


def test_max_bytes_for_a_path_is_checked_before_opening(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(encode(PIL.Image.fromarray(gradient()), "PNG"))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            pytest.fail("opened a file that stat() already showed to be too large")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    assert_refused(PayloadTooLarge, path, max_bytes=100)


def test_missing_file_is_invalid_input(tmp_path):
    assert "not found" in assert_refused(InvalidInput, tmp_path / "absent.png").message


# --- the bad and unusual files of tests/material.py --------------------------------------------------------
BAD_IMAGES = {
    "bomb_20000x20000.png": ImageTooLarge,
    "truncated.jpg": CorruptMedia,
    "text.png": UnsupportedMedia,
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_files_are_refused(material, name):
    err = assert_refused(BAD_IMAGES[name], material.path(f"bad/{name}"))
    assert len(err.message) < 200


def test_bomb_message_names_the_pixels(material):
    # A real PNG of 20000x20000 1-bit pixels (50 kB compressed): refused from its header.
    err = assert_refused(ImageTooLarge, material.path("bad/bomb_20000x20000.png"))
    assert "400,000,000" in err.message


def test_landscape_without_a_face_is_a_valid_image(material):
    # A fine PNG without a face: io/ loads it; avatar/ is the stage that refuses it (NoFaceFound).
    image = load_image(material.path("bad/noface.png"))
    assert image.format == "PNG" and image.pixels.shape == (300, 451, 3)


@pytest.mark.parametrize("name", UNUSUAL_IMAGES)
def test_unusual_images_load_as_rgb(material, name):
    image = load_image(material.path(f"unusual/{name}"))
    assert image.pixels.ndim == 3 and image.pixels.shape[2] == 3 and image.pixels.dtype == np.uint8


@pytest.mark.parametrize("name", PORTRAIT_MODES)
def test_unusual_images_show_the_same_portrait(material, name):
    reference = load_image(material.path("faces/tall.jpg")).pixels.astype(float).mean(axis=2)
    grey = load_image(material.path(f"unusual/{name}")).pixels.astype(float).mean(axis=2)
    assert grey.shape == reference.shape
    assert np.abs(grey - reference).mean() < 6


def test_exif_rotated_photo_comes_out_in_display_orientation(material):
    path = material.path("unusual/exif_rotated.jpg")
    with PIL.Image.open(path) as raw:
        orientation = raw.getexif().get(0x0112, 1)
        stored = np.asarray(raw.convert("RGB"))
    assert orientation != 1
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, DISPLAY[orientation](stored))
    h, w = stored.shape[:2]
    assert (image.height, image.width) == ((w, h) if orientation >= 5 else (h, w))
    # and it is the upright photo (JPEG-compressed twice, so close rather than equal)
    upright = load_image(material.path("faces/tall.jpg")).pixels.astype(float)
    assert np.abs(image.pixels.astype(float) - upright).mean() < 4
