"""The one public entry: portrait + speech -> lip-synced MP4.

``LipSyncPipeline`` wires the stages together (io -> avatar -> engine -> video). Components are
passed into the constructor; ``from_settings`` builds them from configuration (loads the
engine's models once and opens the avatar cache). One pipeline serves many requests from many
threads: the engine is shared, each request gets its own render session.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from .avatar.cache import ID_PATTERN
from pydantic import ValidationError

from .errors import AvatarNotFound, ConfigError, InvalidInput, JobTimeout
from .fsutil import FILE_MODE
from .settings import Settings
from .types import AudioClip, Avatar, Frames, GenerateResult, MotionOptions, StageTimes

AudioSource = bytes | str | os.PathLike
ImageSource = bytes | str | os.PathLike
AvatarRef = Avatar | str | None
Progress = Callable[[int, int], None]

#: Resolution avatars are cropped and cached at; engines rescale to the requested output size.
AVATAR_SIZE = 512


def bundled_sample(name: str) -> Path:
    """Path of a sample file shipped inside the package (``portrait.png``, ``speech.wav``)."""
    return Path(str(resources.files("lipsync") / "assets" / name))


@dataclass
class _Timer:
    """Accumulates seconds per stage for one request."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt

    def result(self) -> StageTimes:
        return StageTimes(**{k: v for k, v in self.seconds.items() if k in StageTimes.__dataclass_fields__})


class LipSyncPipeline:
    """Portrait + speech in, MP4 out.

    >>> pipe = LipSyncPipeline.from_settings()            # doctest: +SKIP
    >>> pipe.generate("speech.wav", "talk.mp4", avatar="face.jpg")  # doctest: +SKIP
    """

    def __init__(self, *, settings: Settings, engine, cache, detector=None) -> None:
        self.settings = settings
        self.engine = engine
        self.cache = cache
        self._detector = detector
        self._default_source: ImageSource | None = settings.avatar
        self._default: Avatar | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> "LipSyncPipeline":
        """Build every component from settings (env ``LIPSYNC_*``), loading models once."""
        from .avatar import open_cache
        from .engines.base import load_engine

        values = {k: v for k, v in overrides.items() if v is not None}
        try:
            if settings is None:
                settings = Settings(**values)
            elif values:  # validated like the environment would be
                settings = Settings(**{**settings.model_dump(exclude_unset=True), **values})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            raise ConfigError(f"invalid setting {where}: {first.get('msg', 'bad value')}", setting=where) from None
        engine = load_engine(settings)
        return cls(settings=settings, engine=engine, cache=open_cache(settings))

    @property
    def detector(self):
        if self._detector is None:
            from .avatar import default_detector

            self._detector = default_detector()
        return self._detector

    def warmup(self) -> None:
        """Load lazy parts (face detector, engine kernels, default avatar) before serving."""
        self.engine.warmup()
        self.default_avatar()

    # ------------------------------------------------------------------ avatars
    def add_avatar(self, image: ImageSource, *, force: bool = False) -> tuple[Avatar, bool]:
        """Precompute (or find cached) the avatar of a portrait. Returns (avatar, cache_hit).

        Concurrent calls for the same portrait wait for the first instead of repeating it.
        """
        from .avatar import precompute_avatar
        from .io import load_image
        from .io.source import read_source

        data = read_source(image, max_bytes=_upload_limit(image, self.settings), what="image")
        if not force:  # warm path: the content hash finds the entry, no image decode needed
            cached = self.cache.load(hashlib.sha256(data).hexdigest())
            if cached is not None and cached.size == AVATAR_SIZE:
                return cached, self._prepare_for_engine(cached)
        img = load_image(data, max_pixels=self.settings.max_image_pixels)
        avatar, hit = precompute_avatar(img, cache=self.cache, detector=self.detector, size=AVATAR_SIZE,
                                        force=force, source_bytes=data)
        ready = self._prepare_for_engine(avatar, force=force)
        return avatar, hit and ready

    def _prepare_for_engine(self, avatar: Avatar, *, force: bool = False) -> bool:
        """Run the engine's own per-avatar precompute if its files are missing. True if cached."""
        directory = self.cache.engine_dir(avatar.id, self.engine.name, self.engine.precompute_version)
        if not force and self.engine.avatar_ready(directory):
            return True
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.prepare_avatar(avatar, directory)
        return False

    def get_avatar(self, avatar_id: str) -> Avatar:
        """A cached avatar by id (AvatarNotFound if unknown or its entry was corrupt)."""
        avatar = self.cache.load(avatar_id)  # validates the id; AvatarNotFound if malformed
        if avatar is None:
            raise AvatarNotFound(f"no avatar with id {avatar_id!r}; upload it first", avatar_id=avatar_id)
        self._prepare_for_engine(avatar)
        return avatar

    def delete_avatar(self, avatar_id: str) -> bool:
        if self._default is not None and self._default.id == avatar_id:
            self._default = None
        return self.cache.delete(avatar_id)

    def list_avatars(self):
        return self.cache.list()

    def default_avatar(self) -> Avatar:
        """The avatar used when a request names none: settings.avatar or the bundled sample."""
        current = self._default
        if current is not None and self.cache.contains(current.id):
            return current
        source = self._default_source or bundled_sample("portrait.png")
        self._default, _ = self.add_avatar(source)
        return self._default

    def precompute(self, image: ImageSource | None = None, *, force: bool = True) -> Avatar:
        """Rebuild the default avatar's precompute (``force`` drops the cached entry first).

        With ``image`` the uploaded portrait becomes the new default avatar.
        """
        source = image if image is not None else (self._default_source or bundled_sample("portrait.png"))
        avatar, _ = self.add_avatar(source, force=force)
        self._default = avatar
        if image is not None:
            # keep the bytes, not the caller's (maybe temporary) upload
            self._default_source = self.cache.source_bytes(avatar.id)
        return avatar

    def resolve_avatar(self, ref: AvatarRef) -> tuple[Avatar, bool]:
        """An Avatar from an Avatar, a cached id, an image path/bytes, or None (the default).

        A string that is not a cached avatar id is taken as a file path: never pass strings from
        untrusted clients here (the server passes ids to ``get_avatar`` and uploads as bytes).
        """
        if ref is None:
            hit = self._default is not None
            return self.default_avatar(), hit
        if isinstance(ref, Avatar):
            return ref, True
        if isinstance(ref, str) and ID_PATTERN.fullmatch(ref) and not os.path.exists(ref):
            return self.get_avatar(ref), True
        return self.add_avatar(ref)

    # ------------------------------------------------------------------ options
    def motion_options(self, **overrides) -> MotionOptions:
        """Per-request options: settings defaults with the given (non-None) overrides, validated."""
        s = self.settings
        values = dict(expression_scale=s.expression_scale, lip_scale=s.lip_scale, still=s.still,
                      blink=s.blink, size=s.size, fps=s.fps, seed=s.seed)
        unknown = set(overrides) - set(values)
        if unknown:
            raise InvalidInput(f"unknown option(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not 0.0 <= float(values["expression_scale"]) <= 3.0:
            raise InvalidInput("expression_scale must be between 0 and 3", field="expression_scale")
        if not 0.0 <= float(values["lip_scale"]) <= 3.0:
            raise InvalidInput("lip_scale must be between 0 and 3", field="lip_scale")
        size = int(values["size"])
        if not 64 <= size <= 1024 or size % 2:
            raise InvalidInput("size must be an even number of pixels between 64 and 1024", field="size")
        fps = int(values["fps"])
        if not 1 <= fps <= 60:
            raise InvalidInput("fps must be between 1 and 60", field="fps")
        return MotionOptions(expression_scale=float(values["expression_scale"]),
                             lip_scale=float(values["lip_scale"]), still=bool(values["still"]),
                             blink=bool(values["blink"]), size=size, fps=fps, seed=values["seed"])

    # ------------------------------------------------------------------ audio
    def load_audio(self, audio: AudioSource | AudioClip) -> AudioClip:
        from .io import decode_audio

        if isinstance(audio, AudioClip):
            return audio
        return decode_audio(audio, sample_rate=self.engine.sample_rate,
                            max_seconds=self.settings.max_audio_seconds,
                            max_bytes=_upload_limit(audio, self.settings))

    # ------------------------------------------------------------------ generation
    def render_frames(self, clip: AudioClip, avatar: Avatar, options: MotionOptions, *,
                      timer: _Timer | None = None, progress: Progress | None = None,
                      deadline: float | None = None) -> Iterator[Frames]:
        """Frames chunk by chunk (each chunk at most ``chunk_seconds`` of speech)."""
        from .io import iter_chunks

        if options.seed is None:  # same input -> same blinks and head motion
            digest = hashlib.sha256(clip.samples.tobytes()).digest()
            options = replace(options, seed=int.from_bytes(digest[:4], "little"))
        total = clip.n_frames(options.fps)
        assets = self.cache.engine_dir(avatar.id, self.engine.name, self.engine.precompute_version)
        session = self.engine.start(avatar, options, total, assets=assets)
        done = 0
        try:
            session.begin_clip(clip)  # whole-clip analysis (the engine's own time, in its first chunk)
            for chunk in iter_chunks(clip, fps=options.fps, chunk_seconds=self.settings.chunk_seconds,
                                     context=self.engine.context_for(options)):
                if deadline is not None and time.monotonic() > deadline:
                    raise JobTimeout(f"generation took longer than the {self.settings.request_timeout_s:g} s limit")
                batches = session.render_iter(chunk)
                engine_s = 0.0
                while True:
                    t0 = time.perf_counter()
                    frames = next(batches, None)
                    engine_s += time.perf_counter() - t0  # the engine's time only, not the consumer's
                    if frames is None:
                        break
                    done += len(frames)
                    yield frames
                    if progress is not None:
                        progress(done, total)
                if timer is not None:
                    split = getattr(session, "last_times", None)  # an engine's own motion/render split
                    for k, v in (split or {"render": engine_s}).items():
                        timer.add(k, v)
        finally:
            session.close()

    def _prepare(self, audio, avatar, options, overrides, timer):
        with timer.stage("audio"):
            clip = self.load_audio(audio)
        with timer.stage("precompute"):
            av, hit = self.resolve_avatar(avatar)
        opts = options if options is not None else self.motion_options(**overrides)
        return clip, av, hit, opts

    def _writer(self, target, clip: AudioClip, opts: MotionOptions, *, fragmented: bool):
        from .video import Mp4Writer

        s = self.settings
        return Mp4Writer(target, width=opts.size, height=opts.size, fps=opts.fps, audio=clip, crf=s.crf,
                         preset=s.preset, audio_bitrate=s.audio_bitrate, fragmented=fragmented)

    def generate(self, audio: AudioSource | AudioClip, output: str | os.PathLike, *,
                 avatar: AvatarRef = None, options: MotionOptions | None = None,
                 progress: Progress | None = None, deadline: float | None = None,
                 **overrides) -> GenerateResult:
        """Write a faststart MP4 of ``avatar`` speaking ``audio`` to ``output`` (atomically).

        ``overrides`` are MotionOptions fields (expression_scale, lip_scale, still, blink, size, fps,
        seed) applied on top of the settings' defaults.
        """
        timer = _Timer()
        clip, av, hit, opts = self._prepare(audio, avatar, options, overrides, timer)
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part.mp4", dir=output.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        frames_done = 0
        try:
            with self._writer(tmp, clip, opts, fragmented=False) as writer:
                for frames in self.render_frames(clip, av, opts, timer=timer, progress=progress,
                                                 deadline=deadline):
                    with timer.stage("encode"):
                        writer.write(frames)
                    frames_done += len(frames)
                with timer.stage("encode"):
                    writer.close()
            os.chmod(tmp, FILE_MODE)  # mkstemp made it 0600; a finished video is an ordinary file
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
        return GenerateResult(avatar_id=av.id, frames=frames_done, fps=opts.fps,
                              audio_seconds=clip.duration, output=output, times=timer.result(),
                              avatar_cache_hit=hit)

    def stream(self, audio: AudioSource | AudioClip, *, avatar: AvatarRef = None,
               options: MotionOptions | None = None, deadline: float | None = None,
               on_done: Callable[[GenerateResult], None] | None = None,
               **overrides) -> Iterator[bytes]:
        """Fragmented MP4 bytes, yielded as each chunk is rendered (first bytes after chunk 1).

        Decoding and avatar lookup happen before the first ``next()`` returns, so input errors
        surface before any byte is sent.
        """
        timer = _Timer()
        clip, av, hit, opts = self._prepare(audio, avatar, options, overrides, timer)
        return self._stream(clip, av, hit, opts, timer, deadline, on_done)

    def _stream(self, clip, av, hit, opts, timer, deadline, on_done) -> Iterator[bytes]:
        from .video import stream_mp4

        s = self.settings
        counted = [0]

        def frames() -> Iterator[Frames]:
            for batch in self.render_frames(clip, av, opts, timer=timer, deadline=deadline):
                counted[0] += len(batch)
                yield batch

        # background encoding: the next second renders while this one encodes; its bytes follow
        # one batch later, which costs tens of milliseconds of first-byte time at most
        chunks = stream_mp4(frames(), width=opts.size, height=opts.size, fps=opts.fps, audio=clip, crf=s.crf,
                            preset=s.preset, audio_bitrate=s.audio_bitrate, background=True)
        busy = 0.0
        while True:
            t0 = time.perf_counter()
            data = next(chunks, None)
            busy += time.perf_counter() - t0
            if data is None:
                break
            yield data
        engine = sum(timer.seconds.get(k, 0.0) for k in ("motion", "render"))
        timer.add("encode", max(0.0, busy - engine))
        if on_done is not None:
            on_done(GenerateResult(avatar_id=av.id, frames=counted[0], fps=opts.fps,
                                   audio_seconds=clip.duration, output=None, times=timer.result(),
                                   avatar_cache_hit=hit))


def _upload_limit(source, settings: Settings) -> int | None:
    """The upload size limit applies to bytes handed in (network uploads, API callers), not to
    the operator's own files such as the configured default portrait."""
    return settings.max_upload_bytes if isinstance(source, (bytes, bytearray, memoryview)) else None
