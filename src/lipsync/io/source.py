"""What the user sent, before any decoding: size limits, safe opening, and recognising the
content by its first bytes (magic numbers), never by its name.

Both loaders use this: the audio decoder to pick a demuxer, the image loader to say what it
got instead of a picture ("found WAV audio"), so a refusal names the real content.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Literal, Union

from ..errors import InvalidInput, PayloadTooLarge

#: What a loader accepts: the file's bytes, or a path to it.
Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


# --- reading ---------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """``n`` bytes for a message: "12.3 MB"."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def regular_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """``os.stat`` of ``path``, or ``InvalidInput`` saying what is wrong with it: missing, a
    directory, a device, pipe or socket (``/dev/null`` is not "not found"), or unreadable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInput(f"{what} not found: {path}", path=str(path)) from None
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path}: {e.strerror}", path=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{what} expected, got a directory, not a regular file: {path}", path=str(path))
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{what} expected, got a device, pipe or socket, not a regular file: {path}",
                           path=str(path))
    return st


@contextmanager
def open_source(source: Source, *, max_bytes: int | None, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """A seekable binary stream over ``source`` and its size in bytes.

    Paths are size-checked with ``stat`` before a byte is read, and opened by Python rather than
    handed to FFmpeg, so a name like ``concat:a|b`` or ``http://...`` is only ever a file name.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(what, len(data), max_bytes)
        yield io.BytesIO(data), len(data)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
    path = os.fspath(source)
    st = regular_file(path, what)
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_large(what, st.st_size, max_bytes)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path}: {e.strerror}", path=str(path)) from None
    with f:
        yield f, st.st_size


def _too_large(what: str, size: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{what} is {human_bytes(size)} ({size} bytes), more than the {human_bytes(max_bytes)} limit",
        size=size,
        limit=max_bytes,
    )


def read_source(source: Source, *, max_bytes: int | None, what: str) -> bytes:
    """All of ``source``'s bytes, refusing more than ``max_bytes`` without reading them all."""
    with open_source(source, max_bytes=max_bytes, what=what) as (f, _size):
        if isinstance(f, io.BytesIO):
            return f.getvalue()
        # Read one byte past the limit: a file that grew since stat() is still caught.
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(what, len(data), max_bytes)
    return data


# --- recognising -------------------------------------------------------------------------------
MediaKind = Literal["audio", "image", "video", "other"]

# Bytes worth reading before sniffing: enough for an Ogg first page's codec id.
SNIFF_BYTES = 128


@dataclass(frozen=True)
class Sniffed:
    """What the leading bytes say a file is.

    ``kind`` is a short stable id ("wav", "mp3", "png", "text", "unknown", ...), ``media`` the
    broad class and ``description`` a phrase for error messages ("a PNG image").
    """

    kind: str
    media: MediaKind
    description: str


def _mpeg_audio_sync(b: bytes) -> bool:
    """An MPEG-1/2/2.5 layer I-III frame header (the start of a bare MP3/MP2)."""
    if len(b) < 4 or b[0] != 0xFF or (b[1] & 0xE0) != 0xE0:
        return False
    version = (b[1] >> 3) & 0x3
    layer = (b[1] >> 1) & 0x3
    bitrate_index = b[2] >> 4
    rate_index = (b[2] >> 2) & 0x3
    return version != 1 and layer != 0 and bitrate_index != 0xF and rate_index != 0x3


def _adts_sync(b: bytes) -> bool:
    """An ADTS header (raw AAC): 12-bit sync, layer bits 00."""
    return len(b) >= 7 and b[0] == 0xFF and (b[1] & 0xF6) == 0xF0 and ((b[2] >> 2) & 0xF) < 13


def _ogg_codec(b: bytes) -> str | None:
    """The codec id at the start of an Ogg stream's first page, if it is there."""
    if len(b) < 28:
        return None
    n_segments = b[26]
    payload = b[27 + n_segments : 27 + n_segments + 8]
    if payload.startswith(b"OpusHead"):
        return "opus"
    if payload.startswith(b"\x01vorbis"):
        return "vorbis"
    if payload.startswith(b"\x7fFLAC"):
        return "flac"
    if payload.startswith(b"Speex"):
        return "speex"
    if payload.startswith(b"\x80theora"):
        return "theora"
    return None


def _looks_like_text(b: bytes) -> bool:
    if not b:
        return False
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = b[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return printable >= 0.95 * len(text)


def sniff(head: bytes) -> Sniffed:
    """Classify ``head`` (the first ``SNIFF_BYTES`` or more bytes of a file)."""
    b = bytes(head)
    if not b:
        return Sniffed("empty", "other", "an empty file")
    four = b[:4]
    if four in (b"RIFF", b"RF64", b"BW64"):
        sub = b[8:12]
        if sub == b"WAVE":
            return Sniffed("wav" if four == b"RIFF" else "rf64", "audio", "WAV audio")
        if sub == b"WEBP":
            return Sniffed("webp", "image", "a WebP image")
        if sub == b"AVI ":
            return Sniffed("avi", "video", "an AVI video")
        return Sniffed("riff", "other", f"a RIFF file of type {sub!r}")
    if b.startswith(b"ID3"):
        return Sniffed("id3", "audio", "MP3 audio (ID3-tagged)")
    if four == b"fLaC":
        return Sniffed("flac", "audio", "FLAC audio")
    if four == b"OggS":
        codec = _ogg_codec(b)
        if codec in ("opus", "vorbis", "flac", "speex"):
            return Sniffed(f"ogg-{codec}", "audio", f"Ogg {codec.capitalize()} audio")
        if codec == "theora":
            return Sniffed("ogg-theora", "video", "an Ogg Theora video")
        return Sniffed("ogg", "other", "an Ogg stream of an unknown codec")
    if b[4:8] == b"ftyp":
        brand = b[8:12].decode("latin-1").strip()
        if brand in ("heic", "heix", "heim", "heis", "avif", "avis", "mif1", "msf1"):
            return Sniffed("heif", "image", "a HEIF/AVIF image")
        if brand in ("M4A", "M4B", "M4P"):
            return Sniffed("mp4", "audio", f"MPEG-4 audio (brand {brand})")
        return Sniffed("mp4", "video", f"an MPEG-4/QuickTime file (brand {brand!r})")
    if four == b"\x1a\x45\xdf\xa3":
        return Sniffed("matroska", "video", "a Matroska/WebM file")
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("png", "image", "a PNG image")
    if b.startswith(b"\xff\xd8\xff"):
        return Sniffed("jpeg", "image", "a JPEG image")
    if b.startswith((b"GIF87a", b"GIF89a")):
        return Sniffed("gif", "image", "a GIF image")
    if b.startswith((b"II*\x00", b"MM\x00*")):
        return Sniffed("tiff", "image", "a TIFF image")
    if b.startswith(b"BM") and len(b) >= 14:
        return Sniffed("bmp", "image", "a BMP image")
    if b.startswith(b"\x00\x00\x01\x00"):
        return Sniffed("ico", "image", "an ICO image")
    if four == b"FORM" and b[8:12] in (b"AIFF", b"AIFC"):
        return Sniffed("aiff", "audio", "AIFF audio")
    if four == b".snd":
        return Sniffed("au", "audio", "Sun AU audio")
    if b.startswith(b"#!AMR"):
        return Sniffed("amr", "audio", "AMR audio")
    if four == b"caff":
        return Sniffed("caf", "audio", "Core Audio (CAF) audio")
    if four == b"MThd":
        return Sniffed("midi", "audio", "a MIDI file")
    if b.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return Sniffed("asf", "audio", "a Windows Media (ASF/WMA) file")
    if four == b"wvpk":
        return Sniffed("wavpack", "audio", "WavPack audio")
    if four == b"%PDF":
        return Sniffed("pdf", "other", "a PDF document")
    if four == b"PK\x03\x04":
        return Sniffed("zip", "other", "a ZIP archive")
    if b.startswith(b"\x1f\x8b"):
        return Sniffed("gzip", "other", "a gzip archive")
    if _adts_sync(b):
        return Sniffed("aac", "audio", "AAC audio (ADTS)")
    if _mpeg_audio_sync(b):
        return Sniffed("mp3", "audio", "MP3 audio")
    if _looks_like_text(b):
        return Sniffed("text", "other", "text")
    return Sniffed("unknown", "other", f"unrecognised data (starts with {b[:8].hex(' ')})")
