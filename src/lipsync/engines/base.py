"""The engine interface every engine implements, and the lazy registry.

An engine turns (avatar, speech chunks) into video frames. It is built once per process
(models loaded, warmed up) and serves many requests; each request gets a ``RenderSession``
that carries state across chunks (smoothing filters, blink schedule, pose noise), so motion
stays continuous at chunk borders.

The contract, as the pipeline relies on it:

* **Construction.** ``Engine.from_settings(settings)`` builds the engine (loads weights) from an
  already validated ``Settings``; configuration it cannot use is a ``ConfigError`` (or
  ``EngineUnavailable`` / ``CheckpointError``), raised there, not at the first request.
* **Options.** ``start`` receives a ``MotionOptions``, validated when it was built (size even and
  within ``options.MAX_OUTPUT_SIZE``, fps 1..60, seed set by the pipeline): an engine renders any
  value the model accepts and needs no checks of its own.
* **Avatar files.** An engine reaches avatar files only through ``AvatarCache`` methods, never
  by paths of its own making: its own precompute lives in the directory the pipeline hands to
  ``prepare_avatar`` / ``avatar_ready`` / ``start`` (``AvatarCache.engine_dir``; write files there
  with ``fsutil.write_file_atomic``), and the stored portrait is
  ``self.avatar_cache.upright_source(avatar.id)``, decoded under the same pixel guard as uploads.
  The pipeline binds its cache with ``bind_avatar_cache`` when it is built; without one (an
  engine used on its own) ``avatar_cache`` is None and the engine works from ``Avatar`` alone.
* **Frames.** ``RenderSession.render``/``render_iter`` return ``Frames`` in order, at the
  requested ``size``, ``Frames.first_index`` continuing where the last batch ended; after the
  last chunk every frame of ``total_frames`` has been returned.
* **Timings.** After each chunk a session may report its own split in ``last_times``
  (``{"motion": s, "render": s}``, keys from ``types.StageTimes``); left empty, the pipeline
  counts the whole chunk as "render".
* **Isolation.** Nothing in engines/ imports server/ or pipeline; one engine serves many
  threads, so per-request state lives in the session.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import ConfigError, EngineUnavailable
from ..types import AudioChunk, AudioClip, Avatar, Frames, MotionOptions

if TYPE_CHECKING:
    from ..avatar.cache import AvatarCache
    from ..settings import Settings

#: Stage names a session may report in ``last_times``.
SESSION_STAGES = ("motion", "render")


class RenderSession(ABC):
    """One request's rendering state. Chunks arrive in order; each returns its frames."""

    #: Seconds the last ``render``/``render_iter`` call spent per stage (keys from
    #: ``SESSION_STAGES``), set by the session after each chunk; empty: the pipeline times the
    #: whole chunk as "render". Subclasses assign a new dict; the class default is read-only.
    last_times: Mapping[str, float] = MappingProxyType({})

    def begin_clip(self, clip: AudioClip) -> None:  # optional hook
        """Called once with the whole clip before its first chunk (whole-clip analysis, e.g. phone
        recognition). Engines that work chunk by chunk ignore it."""

    @abstractmethod
    def render(self, chunk: AudioChunk) -> Frames:
        """The next frames of the request, in order.

        Usually exactly the chunk's frames; an engine whose frames need look-ahead (SadTalker's
        27-frame coefficient windows) may hold some back and return them with the next chunk, so
        a batch can start before ``chunk.first_frame`` or be empty. ``Frames.first_index`` says
        where each batch starts; after the last chunk every frame has been returned.
        """

    def render_iter(self, chunk: AudioChunk) -> Iterator[Frames]:
        """The chunk's frames in consecutive batches; engines that can hand frames over before the
        whole chunk is done override this so the encoder starts sooner (better overlap)."""
        yield self.render(chunk)

    def close(self) -> None:  # optional hook
        """Release per-request resources."""


class Engine(ABC):
    """Motion + render for one method. Subclasses take their components in ``__init__`` and
    offer ``from_settings`` to build them from user configuration."""

    name: str = "engine"
    #: Sample rate the engine wants its audio in.
    sample_rate: int = 16_000
    #: Seconds of audio context the engine wants on each side of a chunk.
    context_seconds: tuple[float, float] = (0.2, 0.2)
    #: How the pipeline conditions the audio before it reaches this engine (``io.condition``):
    #: "full", "as_needed" (clean input passes bit for bit) or "off".
    audio_conditioning: str = "full"
    #: Version of this engine's per-avatar precompute; bump to invalidate cached files.
    precompute_version: str = "1"
    #: The avatar cache this engine reads stored avatar files through (see the module notes);
    #: None until ``bind_avatar_cache``.
    avatar_cache: AvatarCache | None = None

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Build the engine (load weights) from settings."""

    @property
    def device(self) -> str:
        return "cpu"

    def describe(self) -> dict:
        """What /health reports about this engine."""
        return {"engine": self.name, "device": self.device}

    def bind_avatar_cache(self, cache: AvatarCache) -> None:
        """Read stored avatar files (``upright_source``) through ``cache`` from now on."""
        self.avatar_cache = cache

    def warmup(self) -> None:  # optional hook
        """Run one small inference so the first request does not pay for lazy init."""

    def prepare_avatar(self, avatar: Avatar, directory: Path) -> None:  # optional hook
        """Engine-specific per-avatar precompute, written (atomically) under ``directory``.

        Called once per avatar and engine precompute version; later requests find the files.
        """

    def avatar_ready(self, directory: Path) -> bool:
        """Whether ``prepare_avatar`` output under ``directory`` is complete."""
        return True

    def context_for(self, options: MotionOptions) -> tuple[float, float]:
        """Seconds of audio context per chunk side for these options (default: class value)."""
        return self.context_seconds

    @abstractmethod
    def start(self, avatar: Avatar, options: MotionOptions, total_frames: int, *,
              assets: Path | None = None) -> RenderSession:
        """Begin a request for ``total_frames`` frames of ``avatar``.

        ``assets`` is the directory ``prepare_avatar`` wrote this avatar's files to.
        """


# name -> "module:Class"; modules are imported only when the engine is asked for, so the
# classic path never imports torch.
_REGISTRY: dict[str, str] = {
    "classic": "lipsync.engines.classic.engine:ClassicEngine",
    "sadtalker": "lipsync.engines.sadtalker.engine:SadTalkerEngine",
}
_EXTRAS = {"sadtalker": "pip install 'lipsync-server[sadtalker]' (and torch for your platform)"}


def available_engines() -> list[str]:
    return sorted(_REGISTRY)


def register_engine(name: str, target: str) -> None:
    """Register a third-party engine as ``"package.module:Class"``."""
    _REGISTRY[name] = target


def engine_class(name: str) -> type[Engine]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown engine {name!r}; available: {', '.join(available_engines())}", engine=name
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        hint = _EXTRAS.get(name, "")
        raise EngineUnavailable(
            f"engine {name!r} needs the missing module {e.name!r}" + (f"; install it with: {hint}" if hint else ""),
            engine=name,
        ) from None
    return getattr(module, attr)


def load_engine(settings: Settings) -> Engine:
    return engine_class(settings.engine).from_settings(settings)

