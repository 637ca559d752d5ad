"""Test material the tests make themselves: bad, odd and ordinary input files.

Everything here is derived from the two samples bundled with the package
(``src/lipsync/assets/portrait.png``, the 512x512 astronaut portrait, and ``speech.wav``,
10.2 s of espeak-ng speech, 16 kHz mono 16-bit) or written byte by byte, so the unit, pipeline,
server and SadTalker tests run from a fresh clone. ``../shared`` only feeds the quality judges
and the real-speech material (tests/quality).

Use the session fixture ``material`` (tests/conftest.py): ``material.path("bad/null.wav")`` makes
the file on first use, in a folder of the session's tmp dir, and returns its path;
``material.bytes(name)`` returns its content. ``NAMES`` lists every name; the lists below say
what each file is and are the parameter lists of the tests (explicit, never globbed).

The names follow ../shared/assets' README where a file plays the same part there:

bad (must be refused with a clear error):
  bad.wav            fmt chunk with an absurd size (0x66666666)
  null.wav           valid header, zero samples
  evil.wav           an unknown chunk whose size field is ASCII text, running past the file
  awful.wav          44.1 kHz-ish: the sample-rate field (1092676 Hz) disagrees with the byte rate
  truncated.wav      header promises 7.1 s, the file ends after 3000 bytes
  random.wav         50 000 random bytes
  png_named.wav      a PNG image with a .wav name
  huge_header.wav    header claims ~2 GB, the file holds 1 s (accepted as that 1 s)
  noface.png         a valid picture of a landscape, no face in it
  bomb_20000x20000.png  a real 1-bit 20000x20000 PNG (400 Mpx) of ~50 kB: a decompression bomb
  truncated.jpg      the tall JPEG portrait cut after 20 000 bytes
  text.png           plain text with a .png name
unusual (odd but valid, must work):
  stereo48k_float.wav, u8_8k.wav, speech.mp3, speech.ogg (Opus), speech.flac, mp3_named.wav:
                     the 7.1 s speech cut below in other formats/rates/channels
  silence_3s.wav     3 s of near-silence (dither-level noise)
  gray.png, rgba.png, cmyk.jpg, exif_rotated.jpg: the tall portrait in other modes; the EXIF
                     one has its pixels turned a quarter and orientation tag 8 to undo it
  two_faces.png      the portrait's head twice: a smaller copy on the left, a larger on the right
faces:
  portrait.png       the bundled portrait (512x512 PNG, smiling with teeth)
  portrait.jpg       the same as a JPEG (another file, so another avatar id than the default)
  tall.jpg           a 260x325 crop of the portrait around the head, enlarged 3.5x to 910x1137,
                     JPEG with EXIF: a non-square close-up with a large face (a camera photo)
speech:
  speech_3s.wav, speech_7s.wav: the first 3.0 s and 7.1 s of the bundled speech (16 kHz mono s16)
"""

from __future__ import annotations

import io
import struct
import threading
import wave
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "lipsync" / "assets"
PORTRAIT = ASSETS / "portrait.png"
SPEECH = ASSETS / "speech.wav"
SR = 16_000

BAD_AUDIO = [
    "bad.wav",
    "null.wav",
    "evil.wav",
    "awful.wav",
    "truncated.wav",
    "random.wav",
    "png_named.wav",
    "huge_header.wav",
]
BAD_IMAGES = ["noface.png", "bomb_20000x20000.png", "truncated.jpg", "text.png"]
BAD = BAD_AUDIO + BAD_IMAGES
UNUSUAL_AUDIO = [
    "stereo48k_float.wav",
    "u8_8k.wav",
    "speech.mp3",
    "speech.ogg",
    "speech.flac",
    "mp3_named.wav",
    "silence_3s.wav",
]
#: Same recording as speech/speech_7s.wav, another container, codec, rate or channel count.
REENCODED_SPEECH = [n for n in UNUSUAL_AUDIO if n != "silence_3s.wav"]
UNUSUAL_IMAGES = ["gray.png", "rgba.png", "cmyk.jpg", "exif_rotated.jpg", "two_faces.png"]
#: The tall portrait in another pixel mode (same picture once loaded as RGB).
PORTRAIT_MODES = ["gray.png", "rgba.png", "cmyk.jpg"]
UNUSUAL = UNUSUAL_AUDIO + UNUSUAL_IMAGES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

TALL_SIZE = (910, 1137)  # width, height of faces/tall.jpg
TALL_CROP = (100, 20, 360, 345)  # the part of portrait.png it shows (x0, y0, x1, y1)


# --- helpers ---------------------------------------------------------------------------------
def wav_pcm16(samples: np.ndarray, rate: int = SR) -> bytes:
    """Float samples in [-1, 1] (mono) -> a 16-bit PCM WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes())
    return buf.getvalue()


def wav_header(*, rate: int, byte_rate: int, data_size: int, riff_size: int, fmt_size: int = 16,
               channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    """A canonical 44-byte RIFF/WAVE header with every size field chosen by the caller."""
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, align, bits)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", fmt_size) + fmt
            + b"data" + struct.pack("<I", data_size))


def speech_samples() -> np.ndarray:
    """The bundled speech as float32 in [-1, 1], 16 kHz mono."""
    with wave.open(str(SPEECH)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def encode_audio(fmt: str, codec: str, x: np.ndarray, rate: int) -> bytes:
    """Mono float signal -> compressed file bytes with FFmpeg's encoders (via PyAV)."""
    import av

    buf = io.BytesIO()
    # bitexact: no random Ogg serial number or encoder-version tags, so the bytes are reproducible
    with av.open(buf, "w", format=fmt, container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        sample_format = stream.codec_context.codec.audio_formats[0]
        frame_size = stream.codec_context.frame_size or 1024
        pcm = np.clip(x, -1, 1)
        for start in range(0, len(pcm), frame_size):
            piece = pcm[start:start + frame_size]
            if sample_format.name.startswith("s16"):
                piece = np.round(piece * 32767).astype(np.int16)
            elif sample_format.name.startswith("s32"):
                piece = np.round(piece * 2147483647).astype(np.int32)
            else:
                piece = piece.astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece[None, :]), format=sample_format.name,
                                               layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def image_bytes(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


# --- makers: name -> bytes -------------------------------------------------------------------
Maker = Callable[["Material"], bytes]
MAKERS: dict[str, Maker] = {}


def maker(name: str) -> Callable[[Maker], Maker]:
    def register(fn: Maker) -> Maker:
        MAKERS[name] = fn
        return fn
    return register


@maker("faces/portrait.png")
def _portrait(m: Material) -> bytes:
    return PORTRAIT.read_bytes()


@maker("faces/portrait.jpg")
def _portrait_jpg(m: Material) -> bytes:
    from PIL import Image

    with Image.open(PORTRAIT) as p:
        return image_bytes(p.convert("RGB"), "JPEG", quality=90)


@maker("faces/tall.jpg")
def _tall(m: Material) -> bytes:
    from PIL import Image

    with Image.open(PORTRAIT) as p:
        photo = p.convert("RGB").crop(TALL_CROP).resize(TALL_SIZE, Image.LANCZOS)
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: as stored
    exif[0x010F] = "lipsync tests"  # Make
    return image_bytes(photo, "JPEG", quality=92, exif=exif.tobytes())


def _tall_image(m: Material):
    from PIL import Image

    return Image.open(io.BytesIO(m.bytes("faces/tall.jpg"))).convert("RGB")


@maker("speech/speech_3s.wav")
def _speech_3s(m: Material) -> bytes:
    return wav_pcm16(speech_samples()[: 3 * SR])


@maker("speech/speech_7s.wav")
def _speech_7s(m: Material) -> bytes:
    return wav_pcm16(speech_samples()[: int(7.1 * SR)])


# bad audio
@maker("bad/bad.wav")
def _bad(m: Material) -> bytes:
    return wav_header(rate=SR, byte_rate=2 * SR, data_size=0, riff_size=36, fmt_size=0x66666666)


@maker("bad/null.wav")
def _null(m: Material) -> bytes:
    return wav_header(rate=SR, byte_rate=2 * SR, data_size=0, riff_size=36)


@maker("bad/evil.wav")
def _evil(m: Material) -> bytes:
    head = wav_header(rate=SR, byte_rate=2 * SR, data_size=0, riff_size=36)[:36]  # RIFF + fmt only
    return head + b"HURF" + b"9999" + b"x" * 5000  # size field 0x39393939: far past the end


@maker("bad/awful.wav")
def _awful(m: Material) -> bytes:
    n = 882  # 10 ms at 44.1 kHz, 16-bit
    return wav_header(rate=0x10AC44, byte_rate=88200, data_size=n, riff_size=36 + n) + bytes(n)


@maker("bad/truncated.wav")
def _truncated(m: Material) -> bytes:
    return m.bytes("speech/speech_7s.wav")[:3000]


@maker("bad/random.wav")
def _random(m: Material) -> bytes:
    return np.random.default_rng(20261203).integers(0, 256, 50_000, dtype=np.uint8).tobytes()


@maker("bad/png_named.wav")
def _png_named(m: Material) -> bytes:
    return PORTRAIT.read_bytes()


@maker("bad/huge_header.wav")
def _huge_header(m: Material) -> bytes:
    one_second = wav_pcm16(speech_samples()[:SR])[44:]
    return wav_header(rate=SR, byte_rate=2 * SR, data_size=0x7FFFF000, riff_size=0x7FFFFF00) + one_second


# bad images
@maker("bad/noface.png")
def _noface(m: Material) -> bytes:
    """A landscape: sky gradient, sun, two hills, grass texture - a real picture, no face."""
    from PIL import Image, ImageDraw

    w, h = 451, 300
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 220, 250]) * y) * np.ones((1, w, 1))
    im = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((330, 30, 390, 90), fill=(255, 230, 120))
    d.ellipse((-150, 170, 300, 480), fill=(70, 130, 60))
    d.ellipse((180, 200, 620, 520), fill=(60, 115, 55))
    px = np.asarray(im).astype(np.int16)
    noise = np.random.default_rng(5).integers(-12, 13, (h, w, 1))
    grass = px[..., 1:2] > px[..., 2:3]  # green ground only
    return image_bytes(Image.fromarray(np.clip(px + noise * grass, 0, 255).astype(np.uint8)), "PNG")


@maker("bad/bomb_20000x20000.png")
def _bomb(m: Material) -> bytes:
    width = height = 20_000
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + 1-bit pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


@maker("bad/truncated.jpg")
def _truncated_jpg(m: Material) -> bytes:
    return m.bytes("faces/tall.jpg")[:20_000]


@maker("bad/text.png")
def _text(m: Material) -> bytes:
    return b"this is not an image\n" * 10


# unusual audio: the 7.1 s cut re-encoded
def _speech7(m: Material) -> np.ndarray:
    with wave.open(io.BytesIO(m.bytes("speech/speech_7s.wav"))) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


@maker("unusual/stereo48k_float.wav")
def _stereo48k(m: Material) -> bytes:
    from scipy.signal import resample_poly

    x = resample_poly(_speech7(m), 3, 1).astype("<f4")
    frames = np.stack([x, 0.8 * x], axis=1).tobytes()  # two channels, slightly different levels
    fmt = struct.pack("<HHIIHH", 3, 2, 48_000, 48_000 * 8, 8, 32)  # IEEE float, stereo
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


@maker("unusual/u8_8k.wav")
def _u8_8k(m: Material) -> bytes:
    from scipy.signal import resample_poly

    x = resample_poly(_speech7(m), 1, 2)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes())
    return buf.getvalue()


@maker("unusual/speech.mp3")
def _mp3(m: Material) -> bytes:
    return encode_audio("mp3", "libmp3lame", _speech7(m), SR)


@maker("unusual/mp3_named.wav")
def _mp3_named(m: Material) -> bytes:
    return m.bytes("unusual/speech.mp3")


@maker("unusual/speech.ogg")
def _ogg(m: Material) -> bytes:
    return encode_audio("ogg", "libopus", _speech7(m), SR)


@maker("unusual/speech.flac")
def _flac(m: Material) -> bytes:
    return encode_audio("flac", "flac", _speech7(m), SR)


@maker("unusual/silence_3s.wav")
def _silence(m: Material) -> bytes:
    return wav_pcm16(np.random.default_rng(3).normal(0, 1e-4, 3 * SR))


# unusual images: the tall portrait in other modes
@maker("unusual/gray.png")
def _gray(m: Material) -> bytes:
    return image_bytes(_tall_image(m).convert("L"), "PNG")


@maker("unusual/rgba.png")
def _rgba(m: Material) -> bytes:
    from PIL import Image

    im = _tall_image(m).convert("RGBA")
    alpha = np.full((im.height, im.width), 255, np.uint8)
    alpha[:80, :80] = np.linspace(0, 255, 80, dtype=np.uint8)[None, :]  # a see-through corner
    im.putalpha(Image.fromarray(alpha))
    return image_bytes(im, "PNG")


@maker("unusual/cmyk.jpg")
def _cmyk(m: Material) -> bytes:
    return image_bytes(_tall_image(m).convert("CMYK"), "JPEG", quality=92)


@maker("unusual/exif_rotated.jpg")
def _exif_rotated(m: Material) -> bytes:
    from PIL import Image

    # Orientation 8 ("left-bottom"): the viewer turns the stored pixels 90 deg counter-clockwise,
    # so the camera stored the upright picture turned 90 deg clockwise.
    stored = _tall_image(m).transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    return image_bytes(stored, "JPEG", quality=92, exif=exif.tobytes())


@maker("unusual/two_faces.png")
def _two_faces(m: Material) -> bytes:
    from PIL import Image

    canvas = Image.new("RGB", (920, 512), (128, 120, 110))
    with Image.open(PORTRAIT) as p:
        head = p.convert("RGB").crop((110, 10, 350, 250))
        canvas.paste(head.resize((300, 300), Image.LANCZOS), (20, 150))  # the smaller face, left
        canvas.paste(head.resize((480, 480), Image.LANCZOS), (420, 16))  # the larger face, right
    return image_bytes(canvas, "PNG")


NAMES = sorted(MAKERS)
assert all(f"bad/{n}" in MAKERS for n in BAD) and all(f"unusual/{n}" in MAKERS for n in UNUSUAL)


class Material:
    """Makes each file on first use into ``root`` and keeps it for the session."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()

    def path(self, name: str) -> Path:
        if name not in MAKERS:
            raise KeyError(f"no test material called {name!r}; known: {', '.join(NAMES)}")
        p = self.root / name
        with self._lock:
            if not p.exists():
                data = MAKERS[name](self)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(p.name + ".part")
                tmp.write_bytes(data)
                tmp.replace(p)
        return p

    def bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()
