"""The one public entry: portrait + speech -> lip-synced MP4.

``LipSyncPipeline`` wires the stages together (io -> avatar -> engine -> video). Components are
passed into the constructor; ``from_settings`` builds them from configuration (loads the
engine's models once and opens the avatar cache). One pipeline serves many requests from many
threads: the engine is shared, each request gets its own render session.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .errors import AvatarNotFound, InvalidInput, JobTimeout, OutputNotWritable
from .fsutil import atomic_write
from .options import MotionOptions, option_error_text, option_names
from .settings import Settings, settings_error
from .types import AudioClip, Avatar, AvatarId, Frames, GenerateResult, StageTimes

log = logging.getLogger(__name__)

#: File-system errors that mean "this output path cannot be written" (not a bug of ours).
_OUTPUT_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EACCES, errno.EPERM,
                            errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EXDEV})

if TYPE_CHECKING:
    from .avatar.cache import AvatarCache, AvatarInfo
    from .avatar.detect import FaceDetector
    from .engines.base import Engine
    from .idle import IdleClip

AudioSource = bytes | str | os.PathLike
#: A portrait file: its bytes (uploads) or a path on this machine (the caller's own file).
ImageSource = bytes | str | os.PathLike
#: Which avatar to render: a cached one by ``AvatarId`` (never read as a path), a portrait
#: (bytes or a path; a plain ``str`` is always a path), an ``Avatar``, or None for the default.
AvatarRef = Avatar | AvatarId | bytes | str | os.PathLike | None
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

    def __init__(self, *, settings: Settings, engine: Engine, cache: AvatarCache,
                 detector: FaceDetector | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.cache = cache
        engine.bind_avatar_cache(cache)  # engines read stored portraits through our cache only
        self._detector = detector
        self._default_source: ImageSource | None = settings.avatar
        self._default: Avatar | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> LipSyncPipeline:
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
            raise settings_error(e) from None
        engine = load_engine(settings)
        return cls(settings=settings, engine=engine, cache=open_cache(settings))

    @property
    def detector(self) -> FaceDetector:
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

    def get_avatar(self, avatar_id: AvatarId | str) -> Avatar:
        """A cached avatar by id (AvatarNotFound if unknown or its entry was corrupt)."""
        avatar = self.cache.load(avatar_id)  # validates the id; AvatarNotFound if malformed
        if avatar is None:
            raise AvatarNotFound.unknown(avatar_id)
        self._prepare_for_engine(avatar)
        return avatar

    def delete_avatar(self, avatar_id: str) -> bool:
        if self._default is not None and self._default.id == avatar_id:
            self._default = None
        return self.cache.delete(avatar_id)

    def list_avatars(self) -> list[AvatarInfo]:
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

    def make_default(self, avatar_id: AvatarId) -> Avatar:
        """Make a cached avatar the default (from its stored portrait; AvatarNotFound if unknown)."""
        return self.precompute(self.cache.source_bytes(avatar_id), force=False)

    def idle_clip(self, avatar_id: AvatarId, *, seconds: float, options: MotionOptions | None = None,
                  progress: Progress | None = None) -> IdleClip:
        """A loopable idle clip of a cached avatar, rendered from silence and cached (``lipsync.idle``)."""
        from .idle import idle_clip

        return idle_clip(self, avatar_id, seconds=seconds, options=options, progress=progress)

    def resolve_avatar(self, ref: AvatarRef) -> tuple[Avatar, bool]:
        """(avatar, cache hit) for an ``AvatarRef``.

        An ``AvatarId`` is looked up in the cache and never read as a path (``AvatarNotFound``
        if unknown); bytes are a portrait upload; a ``str`` or ``PathLike`` is a portrait file on
        this machine, never taken for an id (wrap ids in ``AvatarId``). None: the default avatar.
        """
        if ref is None:
            hit = self._default is not None
            return self.default_avatar(), hit
        if isinstance(ref, Avatar):
            return ref, True
        if isinstance(ref, AvatarId):
            return self.get_avatar(ref), True
        return self.add_avatar(ref)

    # ------------------------------------------------------------------ options
    def motion_options(self, **overrides) -> MotionOptions:
        """Per-request options: ``settings.request`` with the given (non-None) overrides, validated
        by ``MotionOptions`` (the one place its limits live). ``InvalidInput`` names the field."""
        unknown = set(overrides) - set(option_names(MotionOptions))
        if unknown:
            raise InvalidInput(f"unknown option(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if not values:
            return self.settings.request
        try:
            return replace(self.settings.request, **values)
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err.get("loc") else "options"
            raise InvalidInput(f"{name}: {option_error_text(name, err)}", field=name) from None

    # ------------------------------------------------------------------ audio
    def load_audio(self, audio: AudioSource | AudioClip) -> AudioClip:
        from .io import decode_audio

        if isinstance(audio, AudioClip):
            return audio
        return decode_audio(audio, sample_rate=self.engine.sample_rate,
                            max_seconds=self.settings.max_audio_seconds,
                            max_bytes=_upload_limit(audio, self.settings))

    def condition_audio(self, clip: AudioClip) -> AudioClip:
        """``clip`` as the engine's motion model gets it: DC, hum, noise and level repaired and a
        per-sample speech mask attached (``io.condition``, in the engine's ``audio_conditioning``
        mode). The whole clip at once, so chunking cannot change it."""
        from .io.condition import condition

        mode = getattr(self.engine, "audio_conditioning", "full")
        if mode == "off" or clip.speech is not None:  # off, or conditioned already
            return clip
        done = condition(clip.samples, clip.sample_rate, mode=mode)
        if log.isEnabledFor(logging.INFO):
            log.info("audio: %.2f s, %.2f s of it speech; conditioning (%s): %s", clip.duration,
                     done.report.speech_seconds, mode, done.report.summary())
        return AudioClip(samples=done.samples, sample_rate=clip.sample_rate, speech=done.speech)

    # ------------------------------------------------------------------ generation
    def render_frames(self, clip: AudioClip, avatar: Avatar, options: MotionOptions, *,
                      timer: _Timer | None = None, progress: Progress | None = None,
                      deadline: float | None = None) -> Iterator[Frames]:
        """Frames chunk by chunk (each chunk at most ``chunk_seconds`` of speech)."""
        from .io import iter_chunks

        if options.seed is None:  # same input -> same blinks and head motion
            digest = hashlib.sha256(clip.samples.tobytes()).digest()
            options = replace(options, seed=int.from_bytes(digest[:4], "little"))

        def check_deadline() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout(f"generation took longer than the {self.settings.request_timeout_s:g} s limit")

        t0 = time.perf_counter()
        clip = self.condition_audio(clip)  # the motion model's view; the MP4 keeps the caller's clip
        if timer is not None:
            timer.add("audio", time.perf_counter() - t0)
        check_deadline()  # a job past its limit stops at the next stage or chunk boundary
        total = clip.n_frames(options.fps)
        assets = self.cache.engine_dir(avatar.id, self.engine.name, self.engine.precompute_version)
        session = self.engine.start(avatar, options, total, assets=assets)
        done = 0
        try:
            session.begin_clip(clip)  # whole-clip analysis (the engine's own time, in its first chunk)
            for chunk in iter_chunks(clip, fps=options.fps, chunk_seconds=self.settings.chunk_seconds,
                                     context=self.engine.context_for(options)):
                check_deadline()
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
                    split = session.last_times  # the engine's own motion/render split, if it keeps one
                    for k, v in (split or {"render": engine_s}).items():
                        timer.add(k, v)
        finally:
            session.close()

    def _prepare(self, audio, avatar, options, overrides, timer):
        with timer.stage("audio"):
            clip = self.load_audio(audio)
        with timer.stage("precompute"):
            av, hit = self.resolve_avatar(avatar)
        log.info("avatar %s: %s", av.id, "from the cache" if hit else "detected, aligned and cached")
        opts = options if options is not None else self.motion_options(**overrides)
        return clip, av, hit, opts

    def _writer(self, target, clip: AudioClip, opts: MotionOptions, *, fragmented: bool):
        from .video import Mp4Writer

        return Mp4Writer(target, width=opts.size, height=opts.size, fps=opts.fps, audio=clip,
                         encoder=self.settings.encoder, fragmented=fragmented)

    def generate(self, audio: AudioSource | AudioClip, output: str | os.PathLike, *,
                 avatar: AvatarRef = None, options: MotionOptions | None = None,
                 progress: Progress | None = None, deadline: float | None = None,
                 **overrides) -> GenerateResult:
        """Write a faststart MP4 of ``avatar`` speaking ``audio`` to ``output`` (atomically).

        ``overrides`` are MotionOptions fields (expression_scale, lip_scale, still, blink, size, fps,
        seed) applied on top of the settings' defaults.
        """
        output = Path(output)
        if output.is_dir():  # before any work: the rename at the end would fail
            raise OutputNotWritable(f"output path is a directory: {output}", path=str(output))
        timer = _Timer()
        clip, av, hit, opts = self._prepare(audio, avatar, options, overrides, timer)
        frames_done = 0

        def write(tmp: Path) -> None:
            nonlocal frames_done
            with self._writer(tmp, clip, opts, fragmented=False) as writer:
                for frames in self.render_frames(clip, av, opts, timer=timer, progress=progress,
                                                 deadline=deadline):
                    with timer.stage("encode"):
                        writer.write(frames)
                    frames_done += len(frames)
                with timer.stage("encode"):
                    writer.close()

        try:
            atomic_write(output, write, durable=False)  # a video is rebuilt, not recovered, after a crash
        except OSError as e:
            if e.errno not in _OUTPUT_ERRNOS:
                raise
            why = ("a part of the path is a file, not a directory" if e.errno in (errno.EEXIST, errno.ENOTDIR)
                   else e.strerror or str(e))
            raise OutputNotWritable(f"cannot write the video to {output}: {why}", path=str(output)) from e
        result = GenerateResult(avatar_id=av.id, frames=frames_done, fps=opts.fps,
                                audio_seconds=clip.duration, output=output, times=timer.result(),
                                avatar_cache_hit=hit)
        log.info("wrote %s: %d frames at %d fps, %d px, engine %s; seconds per stage %s", output,
                 frames_done, opts.fps, opts.size, self.engine.name,
                 {k: round(v, 3) for k, v in result.times.as_dict().items()})
        return result

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

        counted = [0]

        def frames() -> Iterator[Frames]:
            for batch in self.render_frames(clip, av, opts, timer=timer, deadline=deadline):
                counted[0] += len(batch)
                yield batch

        # background encoding: the next second renders while this one encodes; its bytes follow
        # one batch later, which costs tens of milliseconds of first-byte time at most
        chunks = stream_mp4(frames(), width=opts.size, height=opts.size, fps=opts.fps, audio=clip,
                            encoder=self.settings.encoder, background=True)
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
