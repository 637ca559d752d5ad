"""Decode speech into one mono float32 ``AudioClip``, and cut it into chunks for the engines.

Accepted (decided by content, never by file name): WAV (RIFF/WAVE incl. WAVE_FORMAT_EXTENSIBLE,
RF64/BW64), MP3, Ogg Opus/Vorbis/FLAC, FLAC, MPEG-4 audio (M4A, or the audio track of an MP4)
and Matroska/WebM audio (what browsers' MediaRecorder produces). Anything else is refused with
``UnsupportedMedia`` naming what was found.

WAV headers are parsed and checked here before FFmpeg sees the file, because a WAV header can
promise anything; the decode itself is PyAV's, resampled once to mono at the requested rate.

WAV length policy:
* a data chunk that claims more bytes than the file holds is a truncated file and is refused
  (``CorruptMedia``) - silently playing half a recording would produce a half-finished video;
* except when the claim is a streaming placeholder (>= 0x7FFF0000 bytes, i.e. "about 2 or 4
  GiB"): writers that cannot seek back (FFmpeg to a pipe, arecord to stdout, live TTS
  servers) leave such a value, so the real length is what the file holds. ``huge_header.wav``
  in the shared test material is such a file and is accepted as its real 1 s.
* a valid clip of a few milliseconds is accepted: whether that is worth a video is the
  caller's policy, not the decoder's. Only zero samples is ``EmptyAudio``. (``awful.wav`` in
  the shared material is refused anyway: its sample-rate field, 1092676 Hz, disagrees with its
  byte rate, so its header is broken and its duration unknowable.)
* the fmt chunk must be self-consistent (block align = channels x bytes per sample, byte rate
  = rate x block align): the header is all there is to go on before decoding.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np

from ..errors import (
    AudioTooLong,
    CorruptMedia,
    EmptyAudio,
    LipsyncError,
    UnsupportedMedia,
)
from ..types import AudioChunk, AudioClip
from .source import SNIFF_BYTES, Sniffed, Source, open_source, sniff

log = logging.getLogger(__name__)

#: Human names of the accepted formats, for messages and API docs.
ACCEPTED_AUDIO = "WAV, MP3, OGG (Opus/Vorbis), FLAC, M4A/AAC or WebM"

# sniff kind -> FFmpeg demuxer. Forcing the demuxer (instead of letting FFmpeg probe) means a
# file can only ever be read as the format we recognised - never as, say, a playlist that
# makes FFmpeg open other files.
_DEMUXERS: dict[str, str] = {
    "wav": "wav",
    "rf64": "wav",
    "mp3": "mp3",
    "aac": "aac",
    "flac": "flac",
    "ogg-opus": "ogg",
    "ogg-vorbis": "ogg",
    "ogg-flac": "ogg",
    "mp4": "mp4",
    "matroska": "matroska",
}

# A WAV data size at or above this is the "length unknown" placeholder of a streaming writer.
_STREAMING_PLACEHOLDER = 0x7FFF_0000
# Chunks allowed before the data chunk; real files have a handful (fmt, fact, LIST, bext...).
_MAX_WAV_CHUNKS = 1024
_MAX_FMT_BYTES = 4096
_KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_FLOAT = 0x0003
_WAVE_FORMAT_ALAW = 0x0006
_WAVE_FORMAT_MULAW = 0x0007
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_WAVE_FORMAT_NAMES = {
    0x0002: "Microsoft ADPCM",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG audio",
    0x0055: "MP3",
    0x0161: "Windows Media Audio",
    0x1610: "AAC",
}
_MIN_RATE, _MAX_RATE = 4000, 192_000
_MAX_CHANNELS = 8
# Codec priming/padding and resampler rounding can make decoded audio run a little past the
# length a container implies; this much is trimmed instead of refused.
_DECODE_SLACK_SECONDS = 0.1


# --- recognising the format ----------------------------------------------------------------------
def _id3v2_end(f: BinaryIO, offset: int) -> int | None:
    """End of the ID3v2 tag at ``offset`` (10-byte header, synchsafe size, optional footer)."""
    f.seek(offset)
    header = f.read(10)
    if len(header) < 10 or not header.startswith(b"ID3") or any(b & 0x80 for b in header[6:10]):
        return None
    size = (header[6] << 21) | (header[7] << 14) | (header[8] << 7) | header[9]
    footer = 10 if header[5] & 0x10 else 0
    return offset + 10 + size + footer


def _identify(f: BinaryIO, size: int) -> Sniffed:
    """What the stream holds; ID3v2 tags in front are looked through (MP3, sometimes FLAC/AAC)."""
    f.seek(0)
    found = sniff(f.read(SNIFF_BYTES))
    if found.kind != "id3":
        return found
    offset = 0
    for _ in range(8):  # some taggers stack several tags
        end = _id3v2_end(f, offset)
        if end is None or end >= size:
            break
        offset = end
        f.seek(offset)
        inner = f.read(SNIFF_BYTES)
        # Zero padding after a tag is common; FFmpeg's MP3 reader resyncs past it.
        if inner.startswith(b"\x00"):
            break
        if not inner.startswith(b"ID3"):
            found_inner = sniff(inner)
            if found_inner.kind in ("flac", "aac"):
                return found_inner
            break
    # ID3 is an MP3 tag; anything not recognisable after it is left to the MP3 reader to judge.
    return Sniffed("mp3", "audio", "MP3 audio")


# --- WAV header validation --------------------------------------------------------------------------
@dataclass(frozen=True)
class WavInfo:
    """What a validated WAV header says, with the data length the file really supports."""

    encoding: str  # "pcm", "float", "alaw" or "mulaw"
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int
    data_offset: int
    data_bytes: int
    streamed: bool  # the header held a length placeholder; the length is what the file holds

    @property
    def frames(self) -> int:
        return self.data_bytes // self.block_align

    @property
    def duration(self) -> float:
        return self.frames / float(self.sample_rate)


@dataclass(frozen=True)
class _Fmt:
    encoding: str
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int


def _chunk_name(cid: bytes) -> str:
    return cid.decode("latin-1")


def _parse_fmt(body: bytes) -> _Fmt:
    tag, channels, rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise CorruptMedia(f"WAV fmt chunk is extensible but only {len(body)} bytes long (needs 40)")
        cb_size, valid_bits, _channel_mask = struct.unpack_from("<HHI", body, 16)
        sub_format = body[24:40]
        if cb_size < 22 or sub_format[2:] != _KSDATAFORMAT_SUFFIX:
            raise CorruptMedia("WAV fmt chunk is extensible but its sub-format GUID is not a known one")
        tag = struct.unpack_from("<H", sub_format)[0]
        if valid_bits > bits:
            raise CorruptMedia(f"WAV fmt chunk says {valid_bits} valid bits in {bits}-bit samples")
    if tag == _WAVE_FORMAT_PCM:
        encoding, allowed_bits = "pcm", (8, 16, 24, 32)
    elif tag == _WAVE_FORMAT_FLOAT:
        encoding, allowed_bits = "float", (32, 64)
    elif tag in (_WAVE_FORMAT_ALAW, _WAVE_FORMAT_MULAW):
        encoding, allowed_bits = ("alaw" if tag == _WAVE_FORMAT_ALAW else "mulaw"), (8,)
    else:
        name = _WAVE_FORMAT_NAMES.get(tag, "an unknown encoding")
        raise UnsupportedMedia(
            f"WAV audio encoded as {name} (format tag 0x{tag:04x}) is not supported; "
            "use PCM or float WAV, or send " + ACCEPTED_AUDIO,
            format_tag=tag,
        )
    if rate == 0:
        raise CorruptMedia("WAV fmt chunk says a sample rate of 0 Hz")
    if bits not in allowed_bits:
        if 0 < bits <= 64:
            raise UnsupportedMedia(
                f"WAV audio has {bits}-bit {encoding} samples; supported: "
                + ", ".join(f"{b}-bit" for b in allowed_bits),
                bits=bits,
            )
        raise CorruptMedia(f"WAV fmt chunk says {bits}-bit samples")
    if channels == 0:
        raise CorruptMedia("WAV fmt chunk says 0 channels")
    if channels > _MAX_CHANNELS:
        raise UnsupportedMedia(f"WAV audio has {channels} channels; at most {_MAX_CHANNELS} are supported")
    expected_align = channels * bits // 8
    if block_align != expected_align:
        raise CorruptMedia(
            f"WAV fmt chunk is inconsistent: block align {block_align}, expected {expected_align} "
            f"for {channels} x {bits}-bit"
        )
    if byte_rate != rate * block_align:
        raise CorruptMedia(
            f"WAV fmt chunk is inconsistent: {byte_rate} bytes/s, expected {rate * block_align} "
            f"for {rate} Hz x {block_align}-byte frames"
        )
    # Range last: a rate that disagrees with the byte rate is a broken header, not an exotic one.
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise UnsupportedMedia(
            f"WAV sample rate {rate} Hz is outside the supported {_MIN_RATE}..{_MAX_RATE} Hz"
        )
    return _Fmt(encoding, channels, rate, bits, block_align)


def parse_wav(f: BinaryIO, size: int) -> WavInfo:
    """Walk a RIFF/RF64 WAVE file's chunks and validate them, reading only headers.

    Raises ``CorruptMedia`` for a broken or lying header, ``UnsupportedMedia`` for encodings we
    do not decode, ``EmptyAudio`` for zero samples.
    """
    f.seek(0)
    riff_id = f.read(12)[:4]
    is_rf64 = riff_id in (b"RF64", b"BW64")
    fmt: _Fmt | None = None
    ds64_data_size: int | None = None
    pos = 12
    for _ in range(_MAX_WAV_CHUNKS):
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            break
        cid, csize = header[:4], struct.unpack("<I", header[4:])[0]
        if not all(0x20 <= c <= 0x7E for c in cid):
            raise CorruptMedia(f"WAV file has garbage where a chunk header should be (byte {pos})")
        body = pos + 8
        remaining = size - body
        if cid == b"data":
            if fmt is None:
                raise CorruptMedia("WAV data chunk comes before any fmt chunk")
            return _data_info(fmt, body, csize, remaining, is_rf64, ds64_data_size)
        if csize > remaining:
            raise CorruptMedia(
                f"WAV chunk {_chunk_name(cid)!r} at byte {pos} claims {csize} bytes "
                f"but only {remaining} follow"
            )
        if cid == b"fmt ":
            if fmt is not None:
                raise CorruptMedia("WAV file has two fmt chunks")
            if not 16 <= csize <= _MAX_FMT_BYTES:
                raise CorruptMedia(f"WAV fmt chunk is {csize} bytes long (16..{_MAX_FMT_BYTES} expected)")
            fmt = _parse_fmt(f.read(csize))
        elif cid == b"ds64" and is_rf64:
            if csize < 24:
                raise CorruptMedia(f"RF64 ds64 chunk is {csize} bytes long (at least 24 expected)")
            _riff_size, ds64_data_size, _sample_count = struct.unpack("<QQQ", f.read(24))
        pos = body + csize + (csize & 1)  # chunks are word-aligned
    else:
        raise CorruptMedia(f"WAV file has more than {_MAX_WAV_CHUNKS} chunks before its audio")
    if fmt is None:
        raise CorruptMedia("WAV file has no fmt chunk")
    raise CorruptMedia("WAV file has no data chunk")


def _data_info(
    fmt: _Fmt, offset: int, claimed: int, available: int, is_rf64: bool, ds64_data_size: int | None
) -> WavInfo:
    if is_rf64 and claimed == 0xFFFF_FFFF:
        if ds64_data_size is None:
            raise CorruptMedia("RF64 file has no ds64 chunk giving its data size")
        claimed = ds64_data_size
    streamed = False
    if claimed > available:
        if not is_rf64 and claimed >= _STREAMING_PLACEHOLDER:
            streamed, claimed = True, available
        else:
            bytes_per_second = fmt.sample_rate * fmt.block_align
            raise CorruptMedia(
                f"WAV file is truncated: its header promises {claimed / bytes_per_second:.2f} s of audio "
                f"({claimed} bytes) but the file holds {available / bytes_per_second:.2f} s ({available} bytes)"
            )
    info = WavInfo(
        encoding=fmt.encoding,
        channels=fmt.channels,
        sample_rate=fmt.sample_rate,
        bits_per_sample=fmt.bits_per_sample,
        block_align=fmt.block_align,
        data_offset=offset,
        data_bytes=claimed - claimed % fmt.block_align,
        streamed=streamed,
    )
    if info.frames == 0:
        raise EmptyAudio("WAV file holds no audio samples")
    return info


# --- decoding ----------------------------------------------------------------------------------
# FFmpeg sample format -> (scale to [-1, 1], offset) for the integer formats.
_INT_SCALE = {
    "u8": (1 / 128.0, -128.0),
    "s16": (1 / 32768.0, 0.0),
    "s32": (1 / 2147483648.0, 0.0),
    "s64": (1 / 9223372036854775808.0, 0.0),
}


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as mono float32: channels averaged with equal weight.

    Done here rather than in FFmpeg's resampler because its downmix matrix is unnormalised
    (stereo L=R=x gives 1.41x; a WAV's 8 channels without a layout give 2.2x), so it would
    clip exactly the files this must accept.
    """
    name = frame.format.name
    base = name[:-1] if frame.format.is_planar else name
    channels = len(frame.layout.channels)
    a = frame.to_ndarray()
    a = a if frame.format.is_planar else a.reshape(-1, channels).T
    if base in _INT_SCALE:
        scale, offset = _INT_SCALE[base]
        a = (a.astype(np.float32) + np.float32(offset)) * np.float32(scale)
    else:  # flt / dbl
        a = a.astype(np.float32, copy=False)
    return a[0] if channels == 1 else a.mean(axis=0, dtype=np.float32)


class _MonoResampler:
    """Mono float32 at ``rate`` from frames of any rate.

    Decoded frames are small (1152 samples for MP3), and each trip through FFmpeg's resampler
    costs about as much as decoding one, so input is batched to ``_BATCH`` samples first. The
    resampler is rebuilt if the input rate changes mid-stream (concatenated MP3s do that).
    """

    _BATCH = 16384

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._in_rate: int | None = None
        self._resampler: av.AudioResampler | None = None
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def push(self, mono: np.ndarray, in_rate: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        if in_rate != self._in_rate:
            out += self.flush()
            self._in_rate = in_rate
            self._resampler = (
                None
                if in_rate == self.rate
                else av.AudioResampler(format="flt", layout="mono", rate=self.rate)
            )
        if self._resampler is None:
            out.append(mono)
            return out
        self._pending.append(mono)
        self._pending_len += len(mono)
        if self._pending_len >= self._BATCH:
            out += self._resample_pending()
        return out

    def _resample_pending(self) -> list[np.ndarray]:
        assert self._resampler is not None and self._in_rate is not None
        if not self._pending:
            return []
        batch = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_len = [], 0
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(batch)[None, :], format="flt", layout="mono")
        frame.sample_rate = self._in_rate
        return [f.to_ndarray()[0] for f in self._resampler.resample(frame)]

    def flush(self) -> list[np.ndarray]:
        """Everything still held, including the resampler's filter tail."""
        if self._resampler is None:
            return []
        out = self._resample_pending()
        out += [f.to_ndarray()[0] for f in self._resampler.resample(None)]
        self._resampler = None
        self._in_rate = None
        return out


@contextmanager
def _ffmpeg_logs_captured() -> Iterator[list]:
    """Keep FFmpeg's log lines of this decode off the terminal.

    PyAV leaves FFmpeg logging off unless someone turned it on; if they did, this thread's lines
    are captured instead of printed and passed on to our logger at DEBUG level.
    """
    with av.logging.Capture(local=True) as logs:
        yield logs
    for level, name, message in logs:
        log.debug("ffmpeg %s (level %s): %s", name, level, message.strip())


def _decode(f: BinaryIO, found: Sniffed, sample_rate: int, max_seconds: float) -> np.ndarray:
    demuxer = _DEMUXERS[found.kind]
    max_samples = math.floor(max_seconds * sample_rate)
    hard_limit = max_samples + int(_DECODE_SLACK_SECONDS * sample_rate)
    pieces: list[np.ndarray] = []
    total = 0
    good_packets = bad_packets = 0
    resampler = _MonoResampler(sample_rate)

    def keep(arrays: list[np.ndarray]) -> None:
        nonlocal total
        for a in arrays:
            if len(a):
                pieces.append(a)
                total += len(a)
        if total > hard_limit:
            raise AudioTooLong(
                f"audio is longer than the {max_seconds:g} s limit (stopped decoding at {total / sample_rate:.1f} s)",
                limit_s=max_seconds,
            )

    f.seek(0)
    try:
        with _ffmpeg_logs_captured(), av.open(f, mode="r", format=demuxer) as container:
            if not container.streams.audio:
                raise UnsupportedMedia(f"{found.description} has no audio track")
            stream = container.streams.audio[0]
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    # Players skip a damaged packet and go on; so do we, unless most are damaged.
                    bad_packets += 1
                    continue
                good_packets += packet.size > 0
                for frame in frames:
                    keep(resampler.push(_frame_to_mono(frame), frame.sample_rate))
            keep(resampler.flush())
    except LipsyncError:
        raise
    except MemoryError:
        raise
    except av.FFmpegError as e:
        raise CorruptMedia(f"{found.description} could not be decoded: {_ffmpeg_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - any other decoder failure is still the file's fault
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CorruptMedia(f"{found.description} could not be decoded: {reason}") from None
    if bad_packets and bad_packets > good_packets:
        raise CorruptMedia(
            f"{found.description} is corrupt: {bad_packets} of {bad_packets + good_packets} packets failed to decode"
        )
    if total == 0:
        if bad_packets:
            raise CorruptMedia(f"{found.description} is corrupt: no audio could be decoded")
        raise EmptyAudio(f"{found.description} holds no audio samples")
    samples = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return samples[:max_samples]


def _ffmpeg_reason(e: av.FFmpegError) -> str:
    reason = e.strerror or str(e)
    return " ".join(str(reason).split())


def decode_audio(
    source: Source,
    *,
    sample_rate: int = 16000,
    max_seconds: float = 600.0,
    max_bytes: int | None = None,
) -> AudioClip:
    """Decode speech from bytes or a file path into mono float32 at ``sample_rate``.

    The format is recognised from the content. Raises ``PayloadTooLarge`` (more than
    ``max_bytes``, checked before reading), ``UnsupportedMedia``, ``CorruptMedia``,
    ``EmptyAudio`` or ``AudioTooLong`` (more than ``max_seconds``: refused from a WAV header
    before decoding, and for every format as soon as decoding passes the limit).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    with open_source(source, max_bytes=max_bytes, what="audio file") as (f, size):
        if size == 0:
            raise EmptyAudio("audio file is empty (0 bytes)")
        found = _identify(f, size)
        if found.kind not in _DEMUXERS:
            raise UnsupportedMedia(
                f"not a supported audio format: found {found.description}; send {ACCEPTED_AUDIO}",
                found=found.kind,
            )
        if found.kind in ("wav", "rf64"):
            info = parse_wav(f, size)
            if info.duration > max_seconds:
                raise AudioTooLong(
                    f"audio is {info.duration:.1f} s long, more than the {max_seconds:g} s limit",
                    seconds=round(info.duration, 3),
                    limit_s=max_seconds,
                )
            if info.streamed:
                log.debug(
                    "WAV header holds a streaming length placeholder; using the %d bytes present",
                    info.data_bytes,
                )
        samples = _decode(f, found, sample_rate, max_seconds)
    return AudioClip(samples=samples, sample_rate=sample_rate)


# --- chunking --------------------------------------------------------------------------------------
def frame_to_sample(frame_index: int, sample_rate: int, fps: int) -> int:
    """First audio sample of video frame ``frame_index``: round(i * sample_rate / fps).

    Exact integer arithmetic with halves rounded up, so every stage that maps frames to samples
    agrees to the sample whatever the rates.
    """
    return (2 * frame_index * sample_rate + fps) // (2 * fps)


def _window(samples: np.ndarray, start: int, stop: int) -> np.ndarray:  # also bool masks
    """``samples[start:stop]`` with zeros where the range runs past either end.

    A view of the clip when the range lies inside it; a fresh padded array only at the edges.
    """
    n = len(samples)
    if 0 <= start and stop <= n:
        return samples[start:stop]
    out = np.zeros(stop - start, dtype=samples.dtype)
    lo, hi = max(start, 0), min(stop, n)
    if hi > lo:
        out[lo - start : hi - start] = samples[lo:hi]
    return out


def iter_chunks(
    clip: AudioClip,
    *,
    fps: int = 25,
    chunk_seconds: float = 3.0,
    context: tuple[float, float] = (0.2, 0.2),
) -> Iterator[AudioChunk]:
    """Cut ``clip`` into chunks of ``floor(chunk_seconds * fps)`` video frames.

    Chunk k covers frames [k*F, min((k+1)*F, total)) with total = ``clip.n_frames(fps)``; its
    ``samples`` are exactly ``context[0]`` s of audio before, its own samples, and exactly
    ``context[1]`` s after, zero-padded past the clip's ends (the last chunk's own samples too,
    up to the end of its last frame). A clip's ``speech`` mask is cut the same way.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    if context[0] < 0 or context[1] < 0:
        raise ValueError(f"context must not be negative, got {context}")
    sr = clip.sample_rate
    total = clip.n_frames(fps)
    # The epsilon keeps e.g. 2.3 s * 30 fps = 68.99999999999999 at 69 frames.
    per_chunk = max(1, math.floor(chunk_seconds * fps + 1e-9))
    before = round(context[0] * sr)
    after = round(context[1] * sr)
    n_chunks = -(-total // per_chunk)
    for k in range(n_chunks):
        first = k * per_chunk
        stop = min(first + per_chunk, total)
        start_sample = frame_to_sample(first, sr, fps)
        stop_sample = frame_to_sample(stop, sr, fps)
        yield AudioChunk(
            index=k,
            samples=_window(clip.samples, start_sample - before, stop_sample + after),
            sample_rate=sr,
            fps=fps,
            first_frame=first,
            n_frames=stop - first,
            context_before=before,
            context_after=after,
            is_last=k == n_chunks - 1,
            speech=None if clip.speech is None else _window(clip.speech, start_sample - before, stop_sample + after),
        )
