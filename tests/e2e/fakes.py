"""A stand-in for ``LipSyncPipeline`` with the same public API, for in-process server tests.

It decodes WAV with the standard library and "renders" one tagged byte chunk per second of
audio, optionally sleeping per chunk and blocking on a gate, so tests control timing exactly
without any of the real stages. Error behaviour mirrors the real pipeline's error types.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lipsync.errors import (
    AudioTooLong,
    AvatarNotFound,
    CorruptMedia,
    EmptyAudio,
    InvalidInput,
    JobTimeout,
    NoFaceFound,
    UnsupportedMedia,
)
from lipsync.settings import Settings
from lipsync.types import AudioClip, Avatar, AvatarId, GenerateResult, MotionOptions, StageTimes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: An "image" the fake accepts: PNG magic plus a label (the fake never decodes pixels).
FACE_PNG = PNG_MAGIC + b"fake portrait with a face"
NOFACE_PNG = PNG_MAGIC + b"noface: a cat"
DEFAULT_PORTRAIT = PNG_MAGIC + b"bundled default portrait"


def wav_bytes(seconds: float, sample_rate: int = 16_000, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(x.tobytes())
    return buf.getvalue()


@dataclass(frozen=True)
class FakeAvatarInfo:
    id: str
    created: float
    source_size: tuple[int, int]
    last_used: float


class FakeEngineInfo:
    name = "fake"
    sample_rate = 16_000

    def describe(self) -> dict:
        return {"engine": "fake", "device": "cpu", "note": "test double"}


def _avatar(avatar_id: str) -> Avatar:
    return Avatar(
        id=avatar_id,
        image=np.zeros((8, 8, 3), np.uint8),
        landmarks=np.zeros((68, 2), np.float32),
        crop_box=(0.0, 0.0, 8.0, 8.0),
        source_size=(8, 8),
        mouth_open_rest=0.0,
        teeth_visible_rest=False,
    )


class FakePipeline:
    """Duck-typed ``LipSyncPipeline``: ``generate``, ``stream``, avatars, ``warmup``..."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        chunk_delay_s: float = 0.0,
        warmup_gate: threading.Event | None = None,
        warmup_error: Exception | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.engine = FakeEngineInfo()
        self.chunk_delay_s = chunk_delay_s
        #: While cleared, every render blocks before its first chunk (for queue-full tests).
        self.render_gate = threading.Event()
        self.render_gate.set()
        self.renders_started = threading.Semaphore(0)
        self.warmup_gate = warmup_gate
        self.warmup_error = warmup_error
        self.avatars: dict[str, FakeAvatarInfo] = {}
        self.default_id: str | None = None
        self.closed_streams = 0
        self.chunks_rendered = 0
        self.calls: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(30)
        if self.warmup_error is not None:
            raise self.warmup_error
        self.default_avatar()

    def motion_options(self, **overrides) -> MotionOptions:
        values = {k: v for k, v in overrides.items() if v is not None}
        try:
            return replace(self.settings.request, **values)  # MotionOptions validates its limits
        except ValueError as e:
            raise InvalidInput(f"invalid option: {e}") from None

    # ------------------------------------------------------------------ avatars
    def add_avatar(self, image: bytes, *, force: bool = False) -> tuple[Avatar, bool]:
        if not isinstance(image, bytes):
            raise TypeError("the server must hand uploads to the pipeline as bytes")
        if not image.startswith(PNG_MAGIC):
            raise UnsupportedMedia("not an image: expected JPEG, PNG or WebP")
        if b"noface" in image:
            raise NoFaceFound("no face found in the image")
        avatar_id = hashlib.sha256(image).hexdigest()
        hit = avatar_id in self.avatars and not force
        now = time.time()
        self.avatars[avatar_id] = FakeAvatarInfo(avatar_id, now, (8, 8), now)
        return _avatar(avatar_id), hit

    def get_avatar(self, avatar_id: str) -> Avatar:
        if avatar_id not in self.avatars:
            raise AvatarNotFound(f"no avatar with id {avatar_id!r}")
        return _avatar(avatar_id)

    def list_avatars(self) -> list[FakeAvatarInfo]:
        return list(self.avatars.values())

    def delete_avatar(self, avatar_id: str) -> bool:
        return self.avatars.pop(avatar_id, None) is not None

    def default_avatar(self) -> Avatar:
        avatar, _ = self.add_avatar(DEFAULT_PORTRAIT)
        self.default_id = avatar.id
        return avatar

    def precompute(self, image: bytes | None = None, *, force: bool = True) -> Avatar:
        avatar, _ = self.add_avatar(image if image is not None else DEFAULT_PORTRAIT, force=force)
        self.default_id = avatar.id
        return avatar

    def _resolve(self, avatar) -> tuple[Avatar, bool]:
        if avatar is None:
            return self.default_avatar(), True
        if isinstance(avatar, Avatar):
            return avatar, True
        if isinstance(avatar, AvatarId):  # before bytes/str: an id is a str, never a path
            return self.get_avatar(avatar), True
        if isinstance(avatar, bytes):
            return self.add_avatar(avatar)
        raise TypeError(f"the server handed the pipeline an avatar of type {type(avatar).__name__}")

    # ------------------------------------------------------------------ audio
    def load_audio(self, audio) -> AudioClip:
        if isinstance(audio, AudioClip):
            return audio
        if not isinstance(audio, bytes):
            raise TypeError("the server must hand uploads to the pipeline as bytes")
        if not audio.startswith(b"RIFF"):
            raise UnsupportedMedia("not audio: expected WAV")
        try:
            with wave.open(io.BytesIO(audio)) as w:
                n = w.getnframes()
                rate = w.getframerate()
                raw = w.readframes(n)
        except (wave.Error, EOFError, struct.error) as e:
            raise CorruptMedia(f"broken WAV: {e}") from None
        samples = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768
        if samples.size == 0:
            raise EmptyAudio("the audio has no samples")
        clip = AudioClip(samples, rate)
        if clip.duration > self.settings.max_audio_seconds:
            raise AudioTooLong(
                f"audio is {clip.duration:.1f} s; the limit is {self.settings.max_audio_seconds:g} s"
            )
        return clip

    # ------------------------------------------------------------------ rendering
    def _chunks(
        self, clip: AudioClip, opts: MotionOptions, deadline: float | None
    ) -> Iterator[tuple[int, bytes]]:
        self.renders_started.release()
        self.render_gate.wait(60)
        total = clip.n_frames(opts.fps)
        done = 0
        index = 0
        while done < total:
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout("generation took longer than the limit")
            if self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)
            n = min(opts.fps, total - done)
            done += n
            self.chunks_rendered += 1
            yield n, f"chunk{index}:{n};".encode()
            index += 1

    def generate(
        self,
        audio,
        output,
        *,
        avatar=None,
        options: MotionOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
        **overrides,
    ) -> GenerateResult:
        self.calls.append("generate")
        t0 = time.perf_counter()
        clip = self.load_audio(audio)
        t1 = time.perf_counter()
        av, hit = self._resolve(avatar)
        opts = options or self.motion_options(**overrides)
        body = bytearray(b"FAKEMP4;")
        frames = 0
        total = clip.n_frames(opts.fps)
        for n, data in self._chunks(clip, opts, deadline):
            body += data
            frames += n
            if progress is not None:
                progress(frames, total)
        Path(output).write_bytes(bytes(body))
        t2 = time.perf_counter()
        return GenerateResult(
            avatar_id=av.id,
            frames=frames,
            fps=opts.fps,
            audio_seconds=clip.duration,
            output=Path(output),
            avatar_cache_hit=hit,
            times=StageTimes(audio=t1 - t0, precompute=0.001, render=t2 - t1, encode=0.001),
        )

    def stream(
        self,
        audio,
        *,
        avatar=None,
        options: MotionOptions | None = None,
        deadline: float | None = None,
        on_done: Callable[[GenerateResult], None] | None = None,
        **overrides,
    ) -> Iterator[bytes]:
        self.calls.append("stream")
        clip = self.load_audio(audio)  # eager, like the real pipeline: errors before any byte
        av, hit = self._resolve(avatar)
        opts = options or self.motion_options(**overrides)

        def chunks() -> Iterator[bytes]:
            frames = 0
            t0 = time.perf_counter()
            try:
                yield b"FAKEMP4;"
                for n, data in self._chunks(clip, opts, deadline):
                    frames += n
                    yield data
            finally:
                self.closed_streams += 1
            if on_done is not None:
                on_done(
                    GenerateResult(
                        avatar_id=av.id,
                        frames=frames,
                        fps=opts.fps,
                        audio_seconds=clip.duration,
                        output=None,
                        avatar_cache_hit=hit,
                        times=StageTimes(render=time.perf_counter() - t0),
                    )
                )

        return chunks()
