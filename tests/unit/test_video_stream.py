"""Fragmented-MP4 streaming: bytes per write() batch, decodable stream, zero A/V offset, boxes."""

from __future__ import annotations

import struct
import threading
from fractions import Fraction

import numpy as np
import pytest

from lipsync.options import EncoderOptions
from lipsync.types import Frames
from lipsync.video import AAC_SAMPLE_RATE, Mp4Writer, stream_mp4
from lipsync.video.stream import (
    NON_SYNC_SAMPLE_FLAGS,
    SYNC_SAMPLE_FLAGS,
    VIDEO_TICKS_PER_FRAME,
    AudioTrack,
    FragmentedMp4Muxer,
    Sample,
    VideoTrack,
    annexb_to_length_prefixed,
    avc_decoder_configuration,
    split_annexb,
)
from tests.unit.test_video_encode import (
    FPS,
    H,
    W,
    av_offset_seconds,
    boxes,
    decode,
    find,
    rgb_batches,
    rgb_frames,
    speech_like,
    to_i420,
    top_level_boxes,
)


def trun_entries(traf) -> tuple[int, int, list[tuple[int, ...]]]:
    """(tfdt, data_offset, per-sample fields) of a traf written by stream.py."""
    tfdt = struct.unpack(">Q", find(traf[3], b"tfdt")[0][2][4:12])[0]
    payload = find(traf[3], b"trun")[0][2]
    flags = struct.unpack(">I", payload[:4])[0] & 0xFFFFFF
    count, offset = struct.unpack(">Ii", payload[4:12])
    per_sample = (flags & 0xF00).bit_count()
    fields = [
        struct.unpack(f">{per_sample}I", payload[12 + 4 * per_sample * i : 12 + 4 * per_sample * (i + 1)])
        for i in range(count)
    ]
    return tfdt, offset, fields


def track_id(traf) -> int:
    return struct.unpack(">I", find(traf[3], b"tfhd")[0][2][4:8])[0]


class RecordingWriter:
    """A queue-like sink: remembers every write() and is safe to call from another thread."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self._lock:
            self.chunks.append(bytes(data))
        return len(data)

    @property
    def size(self) -> int:
        with self._lock:
            return sum(map(len, self.chunks))

    def data(self) -> bytes:
        with self._lock:
            return b"".join(self.chunks)


# --- the stream ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded_stream():
    """45 frames in batches of 20/20/5 with 2 s of speech, sizes recorded after every write()."""
    clip = speech_like(1.8, seed=7)
    sink = RecordingWriter()
    sizes, batches = [], list(rgb_batches(45, 20))
    with Mp4Writer(sink, width=W, height=H, audio=clip, fragmented=True, background=False) as writer:
        for batch in batches:
            before = sink.size
            writer.write(batch)
            sizes.append((before, sink.size))
    sizes.append((sizes[-1][1], sink.size))  # close()
    return clip, sink, sizes, batches


def test_each_write_delivers_its_fragment(recorded_stream):
    _, sink, sizes, batches = recorded_stream
    data = sink.data()
    for before, after in sizes[:-1]:
        assert after > before, sizes  # bytes arrive during each write(), not at the end
    first = data[: sizes[0][1]]
    assert top_level_boxes(first) == ["ftyp", "moov", "moof", "mdat"]
    for (before, after), batch in zip(sizes, batches):
        piece = data[before:after]
        tree = boxes(piece)
        moof = find(tree, b"moof")[0]
        assert [b[0] for b in tree][-2:] == [b"moof", b"mdat"]
        video = next(t for t in find([moof], b"moof", b"traf") if track_id(t) == 1)
        tfdt, _, samples = trun_entries(video)
        # exactly this batch's frames, starting at its first index
        assert len(samples) == len(batch)
        assert tfdt == batch.first_index * VIDEO_TICKS_PER_FRAME


def test_fragments_carry_their_audio(recorded_stream):
    _, sink, sizes, batches = recorded_stream
    data = sink.data()
    for (before, after), batch in zip(sizes, batches):
        moof = find(boxes(data[before:after]), b"moof")[0]
        audio = [t for t in find([moof], b"moof", b"traf") if track_id(t) == 2]
        if len(batch) * AAC_SAMPLE_RATE // FPS < 4 * 1024:
            continue  # too short a batch to be sure a whole AAC frame came out of the encoder
        tfdt, _, samples = trun_entries(audio[0])
        audio_end = (tfdt + sum(s[0] for s in samples) - 1024) / AAC_SAMPLE_RATE
        video_end = (batch.first_index + len(batch)) / FPS
        # Audio reaches the video's end up to what the pipeline must hold back: an incomplete
        # AAC frame (< 1024 samples), the encoder's frame of delay plus its 1024 priming samples,
        # and the resampler's 24-sample filter delay. That rest follows in the next fragment.
        assert video_end - (3 * 1024 + 24) / AAC_SAMPLE_RATE <= audio_end <= video_end


def test_stream_decodes_with_all_frames_and_audio(recorded_stream):
    clip, sink, _, _ = recorded_stream
    info = decode(sink.data())
    assert len(info["frames"]) == 45
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["fps"] == FPS
    assert info["audio_codec"] == "aac"
    assert abs(av_offset_seconds(info, clip)) <= 0.001
    # the clip is 1.8 s, the video 1.8 s: decoded audio covers it, padded to whole AAC frames
    assert 1.8 * AAC_SAMPLE_RATE <= len(info["audio"]) < 1.8 * AAC_SAMPLE_RATE + 1024


def test_stream_pictures_match_the_input(recorded_stream):
    _, sink, _, batches = recorded_stream
    frames = decode(sink.data())["frames"]
    source = np.concatenate([b.data for b in batches])
    mse = np.mean((frames.astype(float) - source.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30


def test_stream_mp4_yields_each_batch_before_pulling_the_next():
    events: list[str] = []

    def produce():
        for batch in rgb_batches(30, 10):
            events.append(f"batch {batch.first_index}")
            yield batch

    chunks = []
    for chunk in stream_mp4(produce(), width=W, height=H, audio=speech_like(1.2)):
        events.append("bytes")
        chunks.append(chunk)
    assert events[:4] == ["batch 0", "bytes", "batch 10", "bytes"]
    assert top_level_boxes(chunks[0])[:2] == ["ftyp", "moov"]
    info = decode(b"".join(chunks))
    assert len(info["frames"]) == 30 and info["has_audio"]


def test_stream_mp4_with_background_encoding():
    clip = speech_like(1.6, seed=4)
    chunks = list(stream_mp4(rgb_batches(40, 10), width=W, height=H, audio=clip, background=True))
    info = decode(b"".join(chunks))
    assert len(info["frames"]) == 40
    assert abs(av_offset_seconds(info, clip)) <= 0.001


@pytest.mark.parametrize("fragmented", [False, True])
def test_slower_preset_high_profile(tmp_path, fragmented):
    """preset=veryfast: High profile (avcC carries chroma/bit-depth fields) and, in files,
    B-frames; both must decode frame-exact."""
    path = tmp_path / "hi.mp4"
    with Mp4Writer(path, width=W, height=H, encoder=EncoderOptions(preset="veryfast"),
                   fragmented=fragmented) as writer:
        for batch in rgb_batches(30, 10):
            writer.write(batch)
    info = decode(path)
    assert len(info["frames"]) == 30
    assert info["video_pts"] == [Fraction(i, FPS) for i in range(30)]
    avcc = next(b for b in _walk(boxes(path.read_bytes())) if b[0] == b"avcC")[2]
    assert avcc[1] == 100  # High


def _walk(tree):
    for box in tree:
        yield box
        if box[0] == b"stsd":  # sample entries sit after the stsd header and a fixed prefix
            entry = box[2][8:]
            prefix = 8 + 78 if entry[4:8] == b"avc1" else 8 + 28
            yield from _walk(boxes(entry, prefix, int.from_bytes(entry[:4], "big")))
        yield from _walk(box[3])


def test_stream_without_audio():
    data = b"".join(stream_mp4(rgb_batches(12, 4), width=W, height=H))
    info = decode(data)
    assert not info["has_audio"] and len(info["frames"]) == 12
    moov = find(boxes(data), b"moov")
    assert len(find(moov, b"moov", b"trak")) == 1


def test_yuv420p_stream():
    rgb = rgb_frames(0, 20)
    data = b"".join(
        stream_mp4(
            [Frames(0, to_i420(rgb[:10]), "yuv420p"), Frames(10, to_i420(rgb[10:]), "yuv420p")],
            width=W,
            height=H,
        )
    )
    assert len(decode(data)["frames"]) == 20


def test_keyframes_start_fragments_but_not_every_tiny_batch():
    data = b"".join(stream_mp4(rgb_batches(100, 5), width=W, height=H))
    sync = []
    for moof in find(boxes(data), b"moof"):
        _, _, samples = trun_entries(find(moof[3], b"traf")[0])
        sync += [flags == SYNC_SAMPLE_FLAGS for _, flags in samples]
        assert all(flags in (SYNC_SAMPLE_FLAGS, NON_SYNC_SAMPLE_FLAGS) for _, flags in samples)
    # keyframes at the first fragment boundary >= 1 s after the last keyframe: frames 0, 25, 50, 75
    assert [i for i, s in enumerate(sync) if s] == [0, 25, 50, 75]


def test_background_streaming_writer(tmp_path):
    clip = speech_like(2.0, seed=2)
    sink = RecordingWriter()
    with Mp4Writer(sink, width=W, height=H, audio=clip, fragmented=True, background=True) as writer:
        for batch in rgb_batches(50, 10):
            writer.write(batch)
    info = decode(sink.data())
    assert len(info["frames"]) == 50
    assert abs(av_offset_seconds(info, clip)) <= 0.001


@pytest.mark.parametrize("fragmented", [False, True])
def test_other_frame_rate(tmp_path, fragmented):
    """30 fps: 16 kHz speech no longer divides into whole samples per frame."""
    clip = speech_like(1.0, seed=5)
    path = tmp_path / "30.mp4"
    with Mp4Writer(path, width=W, height=H, fps=30, audio=clip, fragmented=fragmented) as writer:
        for batch in rgb_batches(31, 7):
            writer.write(batch)
    info = decode(path)
    assert info["fps"] == 30 and len(info["frames"]) == 31
    assert abs(av_offset_seconds(info, clip)) <= 0.001
    assert 31 / 30 * AAC_SAMPLE_RATE <= len(info["audio"]) < 31 / 30 * AAC_SAMPLE_RATE + 1024


def test_fragmented_file_target(tmp_path):
    path = tmp_path / "s.mp4"
    with Mp4Writer(path, width=W, height=H, fragmented=True) as writer:
        for batch in rgb_batches(15, 5):
            writer.write(batch)
    assert top_level_boxes(path.read_bytes())[:3] == ["ftyp", "moov", "moof"]
    assert len(decode(path)["frames"]) == 15
    with pytest.raises(KeyError), Mp4Writer(path, width=W, height=H, fragmented=True) as writer:
        writer.write(next(rgb_batches(5, 5)))
        raise KeyError("boom")
    assert not path.exists()


def test_stream_consumer_stopping_early_closes_cleanly():
    stream = stream_mp4(rgb_batches(40, 10), width=W, height=H, audio=speech_like(1.6))
    first = next(stream)
    stream.close()  # GeneratorExit inside the writer's with-block must not raise
    assert top_level_boxes(first)[:2] == ["ftyp", "moov"]


# --- boxes ---------------------------------------------------------------------------------
SPS = bytes.fromhex("6742c01eda020041a6a0c0c0a80000030008000003019478b175")
PPS = bytes.fromhex("68ce3c80")


def test_annexb_split_and_length_prefix():
    stream = (
        b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01\x65\x88\x84\x00\x00\x03\x01"
    )
    assert split_annexb(stream) == [SPS, PPS, b"\x65\x88\x84\x00\x00\x03\x01"]
    converted = annexb_to_length_prefixed(stream)
    assert converted[:4] == struct.pack(">I", len(SPS)) and converted[4 : 4 + len(SPS)] == SPS
    assert len(converted) == 3 * 4 + len(SPS) + len(PPS) + 7


def test_avc_decoder_configuration():
    record = avc_decoder_configuration(b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS)
    assert record[:4] == bytes([1, 0x42, 0xC0, 0x1E])  # version, profile, compatibility, level
    assert record[4] == 0xFF and record[5] == 0xE1  # 4-byte NAL lengths, one SPS
    assert record[6:8] == struct.pack(">H", len(SPS)) and record[8 : 8 + len(SPS)] == SPS
    assert record[8 + len(SPS)] == 1 and record[-len(PPS) :] == PPS
    high = bytearray(SPS)
    high[1] = 100
    assert (
        avc_decoder_configuration(b"\x00\x00\x01" + bytes(high) + b"\x00\x00\x01" + PPS)[-4:]
        == b"\xfd\xf8\xf8\x00"
    )
    with pytest.raises(ValueError):
        avc_decoder_configuration(b"\x00\x00\x01" + PPS)


def test_init_segment_edit_list_hides_the_priming():
    sink = RecordingWriter()
    muxer = FragmentedMp4Muxer(
        sink.write,
        VideoTrack(64, 48, 25, b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS),
        AudioTrack(AAC_SAMPLE_RATE, 1, bytes.fromhex("1308"), priming=1024, bitrate=96000),
    )
    assert muxer.write_fragment([], []) == 0 and sink.size == 0
    video = [Sample(b"V" * (10 + i), i * 512, 512, sync=i == 0) for i in range(3)]
    audio = [Sample(b"A" * (5 + i), i * 1024, 1024) for i in range(2)]
    muxer.write_fragment(video, audio)
    tree = boxes(sink.data())
    elst = find(tree, b"moov", b"trak", b"edts", b"elst")
    assert len(elst) == 1  # audio only
    _, count, duration, media_time, rate, _ = struct.unpack(">IIIihh", elst[0][2])
    assert (count, duration, media_time, rate) == (1, 0, 1024, 1)
    mdhd = find(tree, b"moov", b"trak", b"mdia", b"mdhd")
    assert [struct.unpack(">I", m[2][12:16])[0] for m in mdhd] == [25 * 512, AAC_SAMPLE_RATE]


def test_media_segment_offsets_point_at_the_samples():
    sink = RecordingWriter()
    muxer = FragmentedMp4Muxer(
        sink.write,
        VideoTrack(64, 48, 25, b"\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS),
        AudioTrack(AAC_SAMPLE_RATE, 1, bytes.fromhex("1308"), 1024, 96000),
    )
    muxer.write_fragment([Sample(b"first", 0, 512)], [Sample(b"a0", 0, 1024)])
    start = sink.size
    video = [Sample(bytes([i]) * (20 + i), (1 + i) * 512, 512, sync=False) for i in range(4)]
    audio = [Sample(bytes([100 + i]) * (7 + i), (1 + i) * 1024, 1024 if i < 2 else 300) for i in range(3)]
    muxer.write_fragment(video, audio)
    piece = sink.data()[start:]
    tree = boxes(piece)
    moof = find(tree, b"moof")[0]
    assert struct.unpack(">I", find(moof[3], b"mfhd")[0][2][4:8])[0] == 2
    for traf, samples in zip(find(moof[3], b"traf"), (video, audio)):
        tfdt, offset, fields = trun_entries(traf)
        assert tfdt == samples[0].time
        pos = moof[1] + offset
        for s, f in zip(samples, fields):
            size = f[0] if track_id(traf) == 1 else f[1]
            assert size == len(s.data) and piece[pos : pos + size] == s.data
            pos += size
        if track_id(traf) == 2:
            assert [f[0] for f in fields] == [1024, 1024, 300]
        else:
            assert all(f[1] == NON_SYNC_SAMPLE_FLAGS for f in fields)
