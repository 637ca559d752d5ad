"""The tests' own input files (tests/material.py) are what their docstring says, and reproducible."""
from __future__ import annotations

import io
import struct
import wave
import zlib

import PIL.Image
import pytest

from tests.material import NAMES, TALL_SIZE, Material


@pytest.mark.parametrize("name", NAMES)
def test_every_file_is_made_the_same_way_twice(name, tmp_path):
    a = Material(tmp_path / "a").bytes(name)
    b = Material(tmp_path / "b").bytes(name)
    assert a and a == b  # seeded: a failure always reproduces with the same bytes


def test_the_bomb_is_a_real_400_megapixel_png(material):
    data = material.bytes("bad/bomb_20000x20000.png")
    assert len(data) < 100_000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):  # length, type, body, CRC
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (20_000, 20_000, 1, 0)  # 1-bit greyscale
    # every row really is there: a filter byte and 2500 bytes of pixels each
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + width // 8)


def test_photos_have_the_documented_shapes(material):
    with PIL.Image.open(material.path("faces/tall.jpg")) as im:
        assert im.size == TALL_SIZE and im.format == "JPEG"
    with PIL.Image.open(material.path("unusual/exif_rotated.jpg")) as im:
        assert im.size == TALL_SIZE[::-1] and im.getexif()[0x0112] == 8  # stored turned a quarter
    with PIL.Image.open(material.path("unusual/cmyk.jpg")) as im:
        assert im.mode == "CMYK"
    with PIL.Image.open(material.path("unusual/rgba.png")) as im:
        assert im.mode == "RGBA" and im.getextrema()[3] == (0, 255)


def test_speech_cuts_have_their_lengths(material):
    for name, seconds in (("speech/speech_3s.wav", 3.0), ("speech/speech_7s.wav", 7.1)):
        with wave.open(io.BytesIO(material.bytes(name))) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
            assert w.getnframes() == round(seconds * 16_000)
