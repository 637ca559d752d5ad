"""Fragmented MP4 (ISO BMFF) boxes for streaming: one init segment, then one moof+mdat per flush.

Why not FFmpeg's mov muxer here: it cuts a fragment only when the *next* packet reaches it, or on
``av_write_frame(ctx, NULL)``, which PyAV does not expose. Through PyAV a write() batch therefore
cannot end on a fragment boundary: with ``frag_keyframe`` every batch's bytes reach the client one
batch late (nothing at all after the first batch with ``delay_moov``), ``frag_every_frame`` yields a
fragment per packet and lost frames when decoded back, and without ``delay_moov`` the init segment
has no edit list, so the AAC encoder's priming plays as a 1024-sample A/V offset. Writing the few
boxes ourselves gives exact fragments and an exact priming edit.

The layout mirrors what FFmpeg writes with ``movflags=frag_keyframe+empty_moov+delay_moov+
default_base_moof`` (checked box by box): ftyp iso5, moov with empty sample tables and mvex/trex,
an ``elst`` of one edit (duration 0 = "to the end", media_time = AAC priming) on the audio track,
then per fragment a moof (mfhd, one traf per track with tfhd default-base-is-moof, tfdt v1, trun)
and an mdat holding the video samples followed by the audio samples. References: ISO/IEC 14496-12
(boxes), 14496-14 (esds), 14496-15 (avcC, length-prefixed NAL units).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Video track ticks per frame. 512 makes 12800 ticks/s at 25 fps, the timescale FFmpeg's mov
#: muxer picks too, so files and streams share timestamps.
VIDEO_TICKS_PER_FRAME = 512

_VIDEO_TRACK_ID = 1
_AUDIO_TRACK_ID = 2
_UNITY_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
_LANGUAGE_UND = 0x55C4  # ISO-639-2 "und", packed 3x5 bits
# trun sample_flags (ISO/IEC 14496-12 8.8.3.1): sample_depends_on=2 marks a sync sample;
# depends_on=1 plus sample_is_non_sync_sample marks a frame that needs earlier ones.
SYNC_SAMPLE_FLAGS = 0x02000000
NON_SYNC_SAMPLE_FLAGS = 0x01010000
_H264_HIGH_PROFILES = (100, 110, 122, 144)


@dataclass(frozen=True)
class VideoTrack:
    """H.264 stream parameters; ``extradata`` is the encoder's Annex B SPS and PPS."""

    width: int
    height: int
    fps: int
    extradata: bytes

    @property
    def timescale(self) -> int:
        return self.fps * VIDEO_TICKS_PER_FRAME


@dataclass(frozen=True)
class AudioTrack:
    """AAC-LC stream parameters; ``priming`` is the encoder delay in samples, hidden by an edit."""

    sample_rate: int
    channels: int
    audio_specific_config: bytes
    priming: int
    bitrate: int


@dataclass(frozen=True)
class Sample:
    """One coded frame. ``time`` is its decode time in the track timescale; for video ``data`` is
    already length-prefixed (``annexb_to_length_prefixed``)."""

    data: bytes
    time: int
    duration: int
    sync: bool = True


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes and trailing zero bytes removed)."""
    units: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else nxt
        # The zero that turns a 3-byte start code into a 4-byte one belongs to no NAL unit;
        # a NAL unit itself never ends in 0x00 (rbsp_trailing_bits).
        unit = data[begin:end].rstrip(b"\x00")
        if unit:
            units.append(unit)
        start = nxt
    return units


def annexb_to_length_prefixed(data: bytes) -> bytes:
    """Annex B (start codes, what libx264 emits) to the 4-byte length-prefixed form MP4 stores."""
    return b"".join(struct.pack(">I", len(u)) + u for u in split_annexb(data))


def avc_decoder_configuration(extradata: bytes) -> bytes:
    """The avcC payload (AVCDecoderConfigurationRecord) from Annex B SPS/PPS."""
    units = split_annexb(extradata)
    sps = [u for u in units if u[0] & 0x1F == 7]
    pps = [u for u in units if u[0] & 0x1F == 8]
    if not sps or not pps:
        raise ValueError("H.264 extradata holds no SPS/PPS; open the encoder with a global header")
    profile, compatibility, level = sps[0][1], sps[0][2], sps[0][3]
    record = bytes([1, profile, compatibility, level, 0xFC | 3, 0xE0 | len(sps)])
    record += b"".join(struct.pack(">H", len(u)) + u for u in sps)
    record += bytes([len(pps)]) + b"".join(struct.pack(">H", len(u)) + u for u in pps)
    if profile in _H264_HIGH_PROFILES:
        # High profiles carry chroma format and bit depths here. We only ever encode 8-bit 4:2:0
        # (chroma_format_idc 1, bit depths 8), so the values are fixed rather than parsed.
        record += bytes([0xFC | 1, 0xF8 | 0, 0xF8 | 0, 0])
    return record


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An MPEG-4 systems descriptor with the 4-byte size form FFmpeg and QuickTime write."""
    n = len(payload)
    size = bytes([0x80 | (n >> 21) & 0x7F, 0x80 | (n >> 14) & 0x7F, 0x80 | (n >> 7) & 0x7F, n & 0x7F])
    return bytes([tag]) + size + payload


def _empty_sample_tables() -> bytes:
    # In a fragmented file every sample lives in the fragments; the moov tables stay empty.
    return (
        _full_box(b"stts", 0, 0, struct.pack(">I", 0))
        + _full_box(b"stsc", 0, 0, struct.pack(">I", 0))
        + _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0))
        + _full_box(b"stco", 0, 0, struct.pack(">I", 0))
    )


def _data_information() -> bytes:
    return _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))


def _track_header(track_id: int, *, audio: bool, width: int = 0, height: int = 0) -> bytes:
    return _full_box(
        b"tkhd",
        0,
        0x000003,  # track_enabled | track_in_movie
        struct.pack(">IIIII", 0, 0, track_id, 0, 0),  # created, modified, id, reserved, duration
        struct.pack(">II", 0, 0),
        # layer, alternate_group (audio tracks form group 1), volume (1.0 for audio), reserved
        struct.pack(">hhHH", 0, 1 if audio else 0, 0x0100 if audio else 0, 0),
        _UNITY_MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )


def _media_header(timescale: int) -> bytes:
    return _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, _LANGUAGE_UND, 0))


def _handler(kind: bytes, name: bytes) -> bytes:
    return _full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, kind), b"\x00" * 12, name + b"\x00")


def _video_trak(video: VideoTrack) -> bytes:
    avc1 = _box(
        b"avc1",
        b"\x00" * 6,
        struct.pack(">H", 1),  # data_reference_index
        b"\x00" * 16,  # pre_defined, reserved, pre_defined[3]
        struct.pack(">HH", video.width, video.height),
        struct.pack(">II", 0x00480000, 0x00480000),  # 72 dpi
        struct.pack(">IH", 0, 1),  # reserved, frame_count
        b"\x00" * 32,  # compressorname
        struct.pack(">Hh", 0x0018, -1),  # depth, pre_defined
        _box(b"avcC", avc_decoder_configuration(video.extradata)),
    )
    stbl = _box(b"stbl", _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1), _empty_sample_tables())
    minf = _box(b"minf", _full_box(b"vmhd", 0, 1, b"\x00" * 8), _data_information(), stbl)
    mdia = _box(b"mdia", _media_header(video.timescale), _handler(b"vide", b"VideoHandler"), minf)
    tkhd = _track_header(_VIDEO_TRACK_ID, audio=False, width=video.width, height=video.height)
    return _box(b"trak", tkhd, mdia)


def _audio_trak(audio: AudioTrack) -> bytes:
    decoder_config = _descriptor(
        0x04,
        struct.pack(">BB", 0x40, 0x15)  # MPEG-4 Audio; stream type audio (5 << 2) | reserved bit
        + (0).to_bytes(3, "big")  # bufferSizeDB
        + struct.pack(">II", audio.bitrate, audio.bitrate)
        + _descriptor(0x05, audio.audio_specific_config),
    )
    es = _descriptor(
        0x03, struct.pack(">HB", _AUDIO_TRACK_ID, 0) + decoder_config + _descriptor(0x06, b"\x02")
    )
    mp4a = _box(
        b"mp4a",
        b"\x00" * 6,
        struct.pack(">H", 1),  # data_reference_index
        b"\x00" * 8,
        struct.pack(">HHHH", audio.channels, 16, 0, 0),
        struct.pack(">I", audio.sample_rate << 16),
        _full_box(b"esds", 0, 0, es),
    )
    stbl = _box(b"stbl", _full_box(b"stsd", 0, 0, struct.pack(">I", 1), mp4a), _empty_sample_tables())
    minf = _box(b"minf", _full_box(b"smhd", 0, 0, b"\x00" * 4), _data_information(), stbl)
    mdia = _box(b"mdia", _media_header(audio.sample_rate), _handler(b"soun", b"SoundHandler"), minf)
    # One edit that starts presentation after the encoder's priming samples: the first input
    # sample plays at t=0. Duration 0 = the edit runs to the end of all fragments.
    elst = _full_box(b"elst", 0, 0, struct.pack(">IIihh", 1, 0, audio.priming, 1, 0))
    return _box(b"trak", _track_header(_AUDIO_TRACK_ID, audio=True), _box(b"edts", elst), mdia)


def init_segment(video: VideoTrack, audio: AudioTrack | None) -> bytes:
    """ftyp + moov: everything a player needs before the first fragment."""
    ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5", b"iso6", b"mp41")
    next_track_id = (_AUDIO_TRACK_ID if audio else _VIDEO_TRACK_ID) + 1
    mvhd = _full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, 1000, 0),  # created, modified, timescale, duration (unknown)
        struct.pack(">IH", 0x00010000, 0x0100),  # rate 1.0, volume 1.0
        b"\x00" * 10,
        _UNITY_MATRIX,
        b"\x00" * 24,
        struct.pack(">I", next_track_id),
    )
    traks = [_video_trak(video)] + ([_audio_trak(audio)] if audio else [])
    trex = [
        _full_box(b"trex", 0, 0, struct.pack(">IIIII", tid, 1, 0, 0, 0))
        for tid in ([_VIDEO_TRACK_ID] + ([_AUDIO_TRACK_ID] if audio else []))
    ]
    return ftyp + _box(b"moov", mvhd, *traks, _box(b"mvex", *trex))


def _video_traf(samples: Sequence[Sample], data_offset: int) -> bytes:
    tfhd = _full_box(
        b"tfhd", 0, 0x020000 | 0x000008, struct.pack(">II", _VIDEO_TRACK_ID, VIDEO_TICKS_PER_FRAME)
    )
    tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", samples[0].time))
    entries = b"".join(
        struct.pack(">II", len(s.data), SYNC_SAMPLE_FLAGS if s.sync else NON_SYNC_SAMPLE_FLAGS)
        for s in samples
    )
    # data-offset | sample-size | sample-flags; the duration is tfhd's default (one frame)
    trun = _full_box(
        b"trun", 0, 0x000001 | 0x000200 | 0x000400, struct.pack(">Ii", len(samples), data_offset), entries
    )
    return _box(b"traf", tfhd, tfdt, trun)


def _audio_traf(samples: Sequence[Sample], data_offset: int) -> bytes:
    tfhd = _full_box(b"tfhd", 0, 0x020000 | 0x000020, struct.pack(">II", _AUDIO_TRACK_ID, SYNC_SAMPLE_FLAGS))
    tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", samples[0].time))
    entries = b"".join(struct.pack(">II", s.duration, len(s.data)) for s in samples)
    # data-offset | sample-duration (the last AAC frame is shorter) | sample-size
    trun = _full_box(
        b"trun", 0, 0x000001 | 0x000100 | 0x000200, struct.pack(">Ii", len(samples), data_offset), entries
    )
    return _box(b"traf", tfhd, tfdt, trun)


def _moof(
    sequence: int, video: Sequence[Sample], audio: Sequence[Sample], video_offset: int, audio_offset: int
) -> bytes:
    trafs = []
    if video:
        trafs.append(_video_traf(video, video_offset))
    if audio:
        trafs.append(_audio_traf(audio, audio_offset))
    return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)


def media_segment(sequence: int, video: Sequence[Sample], audio: Sequence[Sample]) -> bytes:
    """moof + mdat for the given samples (either list may be empty, not both)."""
    if not video and not audio:
        raise ValueError("a fragment needs at least one sample")
    video_bytes = sum(len(s.data) for s in video)
    # Offsets count from the moof's first byte (default-base-is-moof); the moof's size does not
    # depend on the offset values, so measure it once with placeholders.
    moof_size = len(_moof(sequence, video, audio, 0, 0))
    first = moof_size + 8  # mdat header
    moof = _moof(sequence, video, audio, first, first + video_bytes)
    mdat = _box(b"mdat", *(s.data for s in video), *(s.data for s in audio))
    return moof + mdat


class FragmentedMp4Muxer:
    """Writes an fMP4 stream through ``write``: the init segment with the first fragment, then one
    moof+mdat per ``write_fragment`` call, so each call's bytes leave at once."""

    def __init__(self, write: Callable[[bytes], object], video: VideoTrack, audio: AudioTrack | None) -> None:
        self._write = write
        self.video = video
        self.audio = audio
        self._sequence = 0
        self.bytes_written = 0

    def write_fragment(self, video: Sequence[Sample], audio: Sequence[Sample] = ()) -> int:
        """Write one fragment (nothing if both lists are empty); returns the bytes written."""
        if not video and not audio:
            return 0
        if audio and self.audio is None:
            raise ValueError("audio samples for a stream without an audio track")
        parts = [] if self._sequence else [init_segment(self.video, self.audio)]
        self._sequence += 1
        parts.append(media_segment(self._sequence, video, audio))
        data = b"".join(parts)
        self._write(data)
        self.bytes_written += len(data)
        return len(data)
