"""io/audio: format detection, WAV header validation, decoding, limits, and chunking."""

from __future__ import annotations

import builtins
import io
import math
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from lipsync.errors import (
    AudioTooLong,
    CorruptMedia,
    EmptyAudio,
    InvalidInput,
    LipsyncError,
    PayloadTooLarge,
    UnsupportedMedia,
)
from lipsync.io import audio as audio_mod
from lipsync.io import decode_audio, frame_to_sample, iter_chunks
from lipsync.types import AudioClip
from tests.material import REENCODED_SPEECH

SR = 16000
PCM, FLOAT, ALAW, EXTENSIBLE = 0x0001, 0x0003, 0x0006, 0xFFFE
KS_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


# --- test material, written here ------------------------------------------------------------------
def sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def encode_pcm(x: np.ndarray, tag: int, bits: int) -> bytes:
    """(n, channels) float in [-1, 1) -> interleaved little-endian sample bytes."""
    if tag == FLOAT:
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    scale = 2 ** (bits - 1)
    ints = np.clip(np.round(x * scale), -scale, scale - 1).astype(np.int64)
    if bits == 24:
        u = (ints & 0xFFFFFF).astype("<u4").tobytes()
        return b"".join(u[i : i + 3] for i in range(0, len(u), 4))
    return ints.astype("<i2" if bits == 16 else "<i4").tobytes()


def fmt_body(tag: int, channels: int, rate: int, bits: int, *, extensible: bool = False) -> bytes:
    align = channels * bits // 8
    if extensible:
        return struct.pack(
            "<HHIIHHHHI", EXTENSIBLE, channels, rate, rate * align, align, bits, 22, bits, 0
        ) + (struct.pack("<H", tag) + KS_SUFFIX)
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)


def chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
    pad = b"\x00" if len(body) % 2 else b""
    return cid + struct.pack("<I", len(body) if size is None else size) + body + pad


def riff(*chunks: bytes, riff_size: int | None = None, magic: bytes = b"RIFF") -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def wav_bytes(
    x: np.ndarray,
    rate: int,
    *,
    tag: int = PCM,
    bits: int = 16,
    extensible: bool = False,
    data_size: int | None = None,
) -> bytes:
    x = x.reshape(len(x), -1)
    return riff(
        chunk(b"fmt ", fmt_body(tag, x.shape[1], rate, bits, extensible=extensible)),
        chunk(b"data", encode_pcm(x, tag, bits), size=data_size),
    )


def encode_with_pyav(container: str, codec: str, x: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """Mono float signal -> compressed file bytes (the signal on every channel), with FFmpeg's
    own encoders."""
    buf = io.BytesIO()
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(buf, "w", format=container) as out:
        # FFmpeg calls its native Vorbis encoder experimental; fine for test material.
        stream = out.add_stream(codec, rate=rate, options={"strict": "experimental"})
        stream.layout = layout
        audio_format = stream.codec_context.codec.audio_formats[0]
        frame_size = stream.codec_context.frame_size or 1024
        pcm = np.clip(x, -1, 1)
        for start in range(0, len(pcm), frame_size):
            piece = pcm[start : start + frame_size]
            if audio_format.name.startswith("s16"):
                piece = (piece * 32767).astype(np.int16)
            elif audio_format.name.startswith("s32"):
                piece = (piece * 2147483647).astype(np.int32)
            else:
                piece = piece.astype(np.float32)
            planes = np.repeat(piece[None, :], channels, axis=0)
            arr = planes if audio_format.is_planar else planes.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(arr), format=audio_format.name, layout=layout
            )
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def assert_refused(exc_type: type[LipsyncError], source, **kw) -> LipsyncError:
    with pytest.raises(exc_type) as info:
        decode_audio(source, **kw)
    msg = info.value.message
    assert msg and "\n" not in msg and "Traceback" not in msg
    return info.value


# --- WAV variants ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_pcm_wav_at_target_rate_decodes_exactly(bits):
    x = sine(0.5, SR)
    clip = decode_audio(wav_bytes(x, SR, bits=bits))
    assert clip.sample_rate == SR and len(clip.samples) == len(x)
    scale = 128 if bits == 8 else 2 ** (bits - 1)
    expected = np.clip(np.round(x * scale), -scale, scale - 1) / scale
    tol = 1e-7 if bits == 32 else 0.0  # a 32-bit integer does not fit a float32 mantissa
    np.testing.assert_allclose(clip.samples, expected, rtol=0, atol=tol)
    assert clip.samples.dtype == np.float32 and not clip.samples.flags.writeable


@pytest.mark.parametrize("bits", [32, 64])
def test_float_wav(bits):
    x = sine(0.5, SR, amp=0.9)
    clip = decode_audio(wav_bytes(x, SR, tag=FLOAT, bits=bits))
    np.testing.assert_allclose(clip.samples, x.astype(np.float32), atol=1e-7)


@pytest.mark.parametrize(("tag", "bits"), [(PCM, 16), (PCM, 24), (FLOAT, 32)])
def test_wave_format_extensible(tag, bits):
    x = sine(0.25, SR)
    clip = decode_audio(wav_bytes(x, SR, tag=tag, bits=bits, extensible=True))
    np.testing.assert_allclose(clip.samples, x, atol=2.0 ** -(bits - 2) if tag == PCM else 1e-7)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_odd_rates_are_resampled_to_16k(rate):
    x = sine(1.0, rate)
    clip = decode_audio(wav_bytes(x, rate))
    assert clip.sample_rate == SR
    assert abs(len(clip.samples) - SR) <= 2
    assert dominant_frequency(clip.samples, SR) == pytest.approx(440, abs=2)
    assert rms(clip.samples[800:-800]) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def test_other_target_rate():
    clip = decode_audio(wav_bytes(sine(1.0, 44100), 44100), sample_rate=22050)
    assert clip.sample_rate == 22050 and abs(len(clip.samples) - 22050) <= 2


def test_stereo_is_downmixed_with_equal_weights():
    x = sine(0.5, SR)
    stereo = np.stack([x, -0.5 * x], axis=1)
    clip = decode_audio(wav_bytes(stereo, SR, bits=24))
    np.testing.assert_allclose(clip.samples, 0.25 * x, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 6, 8])
def test_many_channels_without_a_layout_do_not_clip(channels):
    x = sine(0.25, SR, amp=0.8)
    clip = decode_audio(wav_bytes(np.repeat(x[:, None], channels, axis=1), SR))
    np.testing.assert_allclose(clip.samples, x, atol=1e-4)


def test_rf64_with_ds64_chunk():
    x = sine(0.5, SR)
    data = encode_pcm(x[:, None], PCM, 16)
    ds64 = struct.pack("<QQQI", 0, len(data), len(x), 0)
    blob = riff(
        chunk(b"ds64", ds64),
        chunk(b"fmt ", fmt_body(PCM, 1, SR, 16)),
        chunk(b"data", data, size=0xFFFFFFFF),
        riff_size=0xFFFFFFFF,
        magic=b"RF64",
    )
    clip = decode_audio(blob)
    np.testing.assert_allclose(clip.samples, x, atol=1 / 32768)


@pytest.mark.parametrize("codec", ["pcm_alaw", "pcm_mulaw"])
def test_companded_wav(codec):
    x = sine(0.5, SR)
    clip = decode_audio(encode_with_pyav("wav", codec, x, SR))
    assert len(clip.samples) == len(x)
    assert np.max(np.abs(clip.samples - x)) < 0.02


def test_chunks_around_data_are_skipped_and_odd_sizes_padded():
    x = sine(0.25, SR)
    blob = riff(
        chunk(b"LIST", b"INFOxyz"),  # odd size: a pad byte follows
        chunk(b"fmt ", fmt_body(PCM, 1, SR, 16)),
        chunk(b"fact", struct.pack("<I", len(x))),
        chunk(b"data", encode_pcm(x[:, None], PCM, 16)),
        chunk(b"id3 ", b"\x00" * 10),
    )
    assert len(decode_audio(blob).samples) == len(x)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_streaming_length_placeholder_reads_what_is_there(placeholder):
    x = sine(0.75, SR)
    blob = wav_bytes(x, SR, data_size=placeholder)
    clip = decode_audio(blob)
    assert len(clip.samples) == len(x)


def test_streaming_placeholder_still_honours_max_seconds_before_decoding(monkeypatch):
    monkeypatch.setattr(audio_mod, "_decode", lambda *a, **k: pytest.fail("decoded a too-long file"))
    blob = wav_bytes(sine(2.0, SR), SR, data_size=0xFFFFFFFF)
    err = assert_refused(AudioTooLong, blob, max_seconds=1.5)
    assert "2.0 s" in err.message


def test_truncated_wav_is_refused_with_the_numbers():
    x = sine(1.0, SR)
    blob = wav_bytes(x, SR)[: 44 + 8000]
    err = assert_refused(CorruptMedia, blob)
    assert "truncated" in err.message and "1.00 s" in err.message and "0.25 s" in err.message


def test_header_longer_than_limit_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(audio_mod, "_decode", lambda *a, **k: pytest.fail("decoded a too-long file"))
    err = assert_refused(AudioTooLong, wav_bytes(sine(1.0, SR), SR), max_seconds=0.5)
    assert "1.0 s" in err.message and "0.5 s" in err.message


def test_exactly_max_seconds_is_accepted():
    assert decode_audio(wav_bytes(sine(1.0, SR), SR), max_seconds=1.0).duration == pytest.approx(1.0)


def _fmt_with(**fields) -> bytes:
    values = {"tag": PCM, "channels": 1, "rate": SR, "byte_rate": 2 * SR, "align": 2, "bits": 16}
    values.update(fields)
    return struct.pack("<HHIIHH", *values.values())


GOOD_DATA = chunk(b"data", b"\x00\x01" * 100)


@pytest.mark.parametrize(
    ("blob", "exc_type", "needle"),
    [
        (riff(chunk(b"fmt ", _fmt_with(channels=0)), GOOD_DATA), CorruptMedia, "0 channels"),
        (riff(chunk(b"fmt ", _fmt_with(align=3)), GOOD_DATA), CorruptMedia, "block align"),
        (riff(chunk(b"fmt ", _fmt_with(byte_rate=12345)), GOOD_DATA), CorruptMedia, "bytes/s"),
        (riff(chunk(b"fmt ", _fmt_with(rate=0)), GOOD_DATA), CorruptMedia, "0 Hz"),
        (riff(chunk(b"fmt ", _fmt_with(bits=0, align=0, byte_rate=0)), GOOD_DATA), CorruptMedia, "0-bit"),
        (riff(chunk(b"fmt ", _fmt_with(bits=12)), GOOD_DATA), UnsupportedMedia, "12-bit"),
        (riff(chunk(b"fmt ", _fmt_with(tag=FLOAT)), GOOD_DATA), UnsupportedMedia, "16-bit float"),
        (riff(chunk(b"fmt ", _fmt_with(tag=0x0002)), GOOD_DATA), UnsupportedMedia, "ADPCM"),
        (riff(chunk(b"fmt ", _fmt_with(tag=0x1234)), GOOD_DATA), UnsupportedMedia, "0x1234"),
        (
            riff(chunk(b"fmt ", _fmt_with(channels=9, align=18, byte_rate=18 * SR)), GOOD_DATA),
            UnsupportedMedia,
            "9 channels",
        ),
        (riff(chunk(b"fmt ", _fmt_with(rate=1000, byte_rate=2000)), GOOD_DATA), UnsupportedMedia, "1000 Hz"),
        (riff(chunk(b"fmt ", b"\x01\x00\x01\x00\x80\x3e\x00\x00")), CorruptMedia, "fmt chunk is 8 bytes"),
        (riff(chunk(b"fmt ", b"\xff" * 16, size=0x66666666)), CorruptMedia, "claims"),
        (riff(chunk(b"fmt ", _fmt_with(tag=EXTENSIBLE))), CorruptMedia, "extensible"),
        (riff(GOOD_DATA, chunk(b"fmt ", _fmt_with())), CorruptMedia, "before any fmt"),
        (riff(chunk(b"fmt ", _fmt_with())), CorruptMedia, "no data chunk"),
        (riff(chunk(b"LIST", b"abcd")), CorruptMedia, "no fmt chunk"),
        (riff(chunk(b"fmt ", _fmt_with()), chunk(b"fmt ", _fmt_with()), GOOD_DATA), CorruptMedia, "two fmt"),
        (
            riff(chunk(b"fmt ", _fmt_with()), b"\x00\xffxy" + b"\x10\x00\x00\x00" + b"z" * 16, GOOD_DATA),
            CorruptMedia,
            "garbage",
        ),
        (riff(chunk(b"fmt ", _fmt_with()), chunk(b"JUNK", b"", size=10**9), GOOD_DATA), CorruptMedia, "JUNK"),
        (riff(chunk(b"fmt ", _fmt_with()), chunk(b"data", b"")), EmptyAudio, "no audio samples"),
        (riff(chunk(b"fmt ", _fmt_with()), chunk(b"data", b"\x01")), EmptyAudio, "no audio samples"),
        (
            riff(chunk(b"fmt ", _fmt_with()), chunk(b"data", b"\x01\x02" * 10, size=4000)),
            CorruptMedia,
            "truncated",
        ),
        (
            b"RF64"
            + b"\xff" * 4
            + b"WAVE"
            + chunk(b"fmt ", _fmt_with())
            + chunk(b"data", b"\x00" * 8, size=0xFFFFFFFF),
            CorruptMedia,
            "ds64",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_broken_wav_headers_are_refused(blob, exc_type, needle):
    err = assert_refused(exc_type, blob)
    assert needle in err.message


# --- format detection -----------------------------------------------------------------------------------
COMPRESSED = [
    ("mp3", "libmp3lame", 44100, 1),
    ("mp3", "libmp3lame", 22050, 2),
    ("flac", "flac", 16000, 1),
    ("ogg", "libopus", 48000, 1),
    ("ogg", "vorbis", 44100, 2),  # FFmpeg's own Vorbis encoder only does stereo
    ("ipod", "aac", 44100, 1),  # .m4a
    ("adts", "aac", 22050, 1),
    ("webm", "libopus", 48000, 2),
]


@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels"),
    COMPRESSED,
    ids=[f"{c}-{k}-{n}ch" for c, k, _, n in COMPRESSED],
)
def test_compressed_formats_decode(container, codec, rate, channels):
    x = sine(1.0, rate)
    clip = decode_audio(encode_with_pyav(container, codec, x, rate, channels))
    # Codecs add priming/padding of up to a frame or two where the container does not trim it.
    assert clip.duration == pytest.approx(1.0, abs=0.08)
    assert dominant_frequency(clip.samples, SR) == pytest.approx(440, abs=3)
    assert rms(clip.samples[1600:-1600]) == pytest.approx(0.5 / math.sqrt(2), rel=0.1)


def test_content_decides_not_the_name(tmp_path):
    mp3 = encode_with_pyav("mp3", "libmp3lame", sine(1.0, 44100), 44100)
    named_wav = tmp_path / "speech.wav"
    named_wav.write_bytes(mp3)
    assert decode_audio(named_wav).duration == pytest.approx(1.0, abs=0.08)
    png = tmp_path / "image.wav"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    assert "PNG" in assert_refused(UnsupportedMedia, png).message


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [("mp3", "libmp3lame", 44100), ("flac", "flac", 16000), ("adts", "aac", 22050)],
)
def test_id3_tag_in_front(container, codec, rate):
    encoded = encode_with_pyav(container, codec, sine(1.0, rate), rate)
    body = encoded[_id3_len(encoded) :] if encoded.startswith(b"ID3") else encoded
    tag_payload = b"TIT2" + struct.pack(">I", 6) + b"\x00\x00" + b"\x03hello" + b"\x00" * 500
    size = len(tag_payload)
    synchsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    tagged = b"ID3\x04\x00\x00" + synchsafe + tag_payload + body
    assert decode_audio(tagged).duration == pytest.approx(1.0, abs=0.08)


def _id3_len(b: bytes) -> int:
    return 10 + ((b[6] << 21) | (b[7] << 14) | (b[8] << 7) | b[9])


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"GIF89a" + b"\x00" * 100, "GIF"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "JPEG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 100, "WebP"),
        (b"FORM\x00\x00\x00\x00AIFF" + b"\x00" * 100, "AIFF"),
        (b"%PDF-1.4\n" + b"\x00" * 100, "PDF"),
        (b"hello, this is plain text and not audio\n" * 4, "text"),
        (bytes(range(7, 200)), "unrecognised data"),
    ],
)
def test_other_content_is_unsupported_and_named(blob, needle):
    assert needle in assert_refused(UnsupportedMedia, blob).message


def test_empty_input_is_empty_audio():
    assert_refused(EmptyAudio, b"")


def test_video_without_audio_track_is_unsupported():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert "no audio track" in assert_refused(UnsupportedMedia, buf.getvalue()).message


def test_garbage_after_an_mp3_sync_word_is_refused_cleanly():
    rng = np.random.default_rng(7)
    blob = b"\xff\xfb\x90\x64" + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    with pytest.raises(LipsyncError) as info:
        decode_audio(blob)
    assert isinstance(info.value, (CorruptMedia, EmptyAudio)) and "\n" not in info.value.message


def test_truncated_mp3_gives_what_is_there():
    mp3 = encode_with_pyav("mp3", "libmp3lame", sine(2.0, 44100), 44100)
    clip = decode_audio(mp3[: len(mp3) // 2])
    assert 0.7 < clip.duration < 1.3


# --- limits ----------------------------------------------------------------------------------------------
def test_compressed_audio_over_the_limit_stops_during_decoding():
    mp3 = encode_with_pyav("mp3", "libmp3lame", sine(6.0, 44100), 44100)
    err = assert_refused(AudioTooLong, mp3, max_seconds=2.0)
    stopped_at = float(err.message.split("stopped decoding at ")[1].split(" s")[0])
    assert 2.0 <= stopped_at < 3.0  # it did not decode all 6 s first


def test_max_bytes_for_bytes_input():
    blob = wav_bytes(sine(0.5, SR), SR)
    err = assert_refused(PayloadTooLarge, blob, max_bytes=len(blob) - 1)
    assert err.detail["size"] == len(blob)
    assert decode_audio(blob, max_bytes=len(blob)).duration == pytest.approx(0.5)


def test_max_bytes_for_a_path_is_checked_before_opening(tmp_path, monkeypatch):
    path = tmp_path / "big.wav"
    path.write_bytes(wav_bytes(sine(0.5, SR), SR))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            pytest.fail("opened a file that stat() already showed to be too large")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    assert_refused(PayloadTooLarge, path, max_bytes=100)


def test_missing_path_and_directory_are_invalid_input(tmp_path):
    assert "not found" in assert_refused(InvalidInput, tmp_path / "nope.wav").message
    assert "not a regular file" in assert_refused(InvalidInput, tmp_path).message


def test_ffmpeg_logs_stay_off_the_terminal(capfd):
    rng = np.random.default_rng(3)
    blob = b"\xff\xfb\x90\x64" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    previous = av.logging.get_level()
    try:
        av.logging.set_level(av.logging.VERBOSE)  # as if someone turned FFmpeg logging on
        with pytest.raises(LipsyncError):
            decode_audio(blob)
        decode_audio(encode_with_pyav("mp3", "libmp3lame", sine(0.5, 44100), 44100))
    finally:
        av.logging.set_level(previous)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- the bad and unusual files of tests/material.py --------------------------------------------------------
BAD_AUDIO = {
    "bad.wav": CorruptMedia,
    "null.wav": EmptyAudio,
    "evil.wav": CorruptMedia,
    # Its sample-rate field (1092676 Hz) disagrees with its byte rate: a broken header.
    "awful.wav": CorruptMedia,
    "truncated.wav": CorruptMedia,
    "random.wav": UnsupportedMedia,
    "png_named.wav": UnsupportedMedia,
}


@pytest.mark.parametrize("name", sorted(BAD_AUDIO))
def test_bad_audio_files_are_refused(material, name):
    err = assert_refused(BAD_AUDIO[name], material.path(f"bad/{name}"))
    assert len(err.message) < 200


def test_huge_header_is_accepted_as_its_real_second(material):
    # It claims ~2 GB of audio: a streaming writer's placeholder; the file holds 1 s.
    clip = decode_audio(material.path("bad/huge_header.wav"))
    assert clip.duration == pytest.approx(1.0, abs=1e-3)
    assert rms(clip.samples) > 0.01


@pytest.mark.parametrize("name", REENCODED_SPEECH)
def test_unusual_audio_matches_the_reference_speech(material, name):
    reference = decode_audio(material.path("speech/speech_7s.wav"))
    clip = decode_audio(material.path(f"unusual/{name}"))
    assert clip.sample_rate == SR
    assert clip.duration == pytest.approx(reference.duration, abs=0.05)
    n = min(len(clip.samples), len(reference.samples))

    def envelope(s: np.ndarray) -> np.ndarray:  # loudness per 20 ms
        return np.sqrt(np.mean(s[: n - n % 320].reshape(-1, 320) ** 2, axis=1))

    # Same recording: the loudness envelopes agree closely whatever the codec.
    assert np.corrcoef(envelope(clip.samples), envelope(reference.samples))[0, 1] > 0.95


def test_silence_is_three_quiet_seconds(material):
    clip = decode_audio(material.path("unusual/silence_3s.wav"))
    assert clip.duration == pytest.approx(3.0, abs=0.01)
    assert rms(clip.samples) < 1e-3


# --- chunking ----------------------------------------------------------------------------------------------
def _padded_reference(samples: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Independent zero-padded slice: pad the whole clip generously, then index."""
    pad = max(0, -start, stop - len(samples))
    padded = np.concatenate([np.zeros(pad), samples, np.zeros(pad)])
    return padded[start + pad : stop + pad]


def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


@pytest.mark.parametrize(
    ("n_samples", "rate", "fps", "chunk_seconds", "context"),
    [
        (int(7.1 * 16000), 16000, 25, 3.0, (0.2, 0.2)),
        (3 * 16000, 16000, 25, 3.0, (0.2, 0.2)),
        (16000 + 123, 16000, 25, 3.0, (0.2, 0.2)),  # n_frames rounds down: tail goes to context
        (16000 + 500, 16000, 25, 3.0, (0.2, 0.2)),  # rounds up: last frame zero-padded
        (160_481, 22050, 30, 2.3, (0.0, 0.5)),
        (50_000, 16000, 24, 0.28, (0.1, 0.0)),
        (1, 16000, 25, 3.0, (0.2, 0.2)),
        (0, 16000, 25, 3.0, (0.2, 0.2)),
    ],
)
def test_chunks_tile_the_clip_and_carry_exact_context(n_samples, rate, fps, chunk_seconds, context):
    rng = np.random.default_rng(n_samples)
    clip = AudioClip(samples=rng.uniform(-1, 1, n_samples).astype(np.float32), sample_rate=rate)
    chunks = list(iter_chunks(clip, fps=fps, chunk_seconds=chunk_seconds, context=context))
    total = clip.n_frames(fps)
    per_chunk = int(Fraction(str(chunk_seconds)) * fps)
    before, after = round(context[0] * rate), round(context[1] * rate)

    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert sum(c.n_frames for c in chunks) == total
    assert all(c.n_frames == per_chunk for c in chunks[:-1]) and 0 < chunks[-1].n_frames <= per_chunk
    frame_start = 0
    for c in chunks:
        assert c.first_frame == frame_start and c.fps == fps and c.sample_rate == rate
        assert c.context_before == before and c.context_after == after
        s0 = _round_half_up(Fraction(c.first_frame * rate, fps))
        s1 = _round_half_up(Fraction((c.first_frame + c.n_frames) * rate, fps))
        assert len(c.own) == s1 - s0
        np.testing.assert_array_equal(c.samples[:before], _padded_reference(clip.samples, s0 - before, s0))
        np.testing.assert_array_equal(
            c.samples[len(c.samples) - after :], _padded_reference(clip.samples, s1, s1 + after)
        )
        frame_start += c.n_frames

    end = _round_half_up(Fraction(total * rate, fps))
    np.testing.assert_array_equal(
        np.concatenate([c.own for c in chunks]), _padded_reference(clip.samples, 0, end)
    )


def test_inner_chunks_are_views_of_the_clip():
    clip = AudioClip(
        samples=np.random.default_rng(0).uniform(-1, 1, 10 * SR).astype(np.float32), sample_rate=SR
    )
    chunks = list(iter_chunks(clip))
    assert len(chunks) == 4
    assert np.shares_memory(chunks[1].samples, clip.samples)
    assert np.shares_memory(chunks[2].samples, clip.samples)
    assert not np.shares_memory(chunks[0].samples, clip.samples)  # padded before the start
    assert all(not c.samples.flags.writeable for c in chunks)


def test_default_chunking_is_75_frames_of_640_samples():
    clip = AudioClip(samples=np.zeros(int(7.1 * SR), np.float32), sample_rate=SR)
    chunks = list(iter_chunks(clip))
    assert [c.n_frames for c in chunks] == [75, 75, 28]
    assert [len(c.own) for c in chunks] == [75 * 640, 75 * 640, 28 * 640]
    assert all(len(c.samples) == len(c.own) + 2 * 3200 for c in chunks)
    assert chunks[1].start_seconds == pytest.approx(3.0)


@pytest.mark.parametrize(("rate", "fps"), [(16000, 25), (16000, 30), (44100, 24), (22050, 29), (8000, 60)])
def test_frame_to_sample_rounds_half_up(rate, fps):
    for i in range(0, 2000, 7):
        assert frame_to_sample(i, rate, fps) == _round_half_up(Fraction(i * rate, fps))


def test_bad_chunking_arguments_are_programming_errors():
    clip = AudioClip(samples=np.zeros(SR, np.float32), sample_rate=SR)
    for kwargs in ({"fps": 0}, {"chunk_seconds": 0}, {"context": (-0.1, 0.2)}):
        with pytest.raises(ValueError):
            list(iter_chunks(clip, **kwargs))
