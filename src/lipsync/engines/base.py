"""The engine interface every engine implements, and the lazy registry.

An engine turns (avatar, speech chunks) into video frames. It is built once per process
(models loaded, warmed up) and serves many requests; each request gets a ``RenderSession``
that carries state across chunks (smoothing filters, blink schedule, pose noise), so motion
stays continuous at chunk borders.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import ConfigError, EngineUnavailable
from ..types import AudioChunk, AudioClip, Avatar, Frames, MotionOptions

if TYPE_CHECKING:
    from ..settings import Settings


class RenderSession(ABC):
    """One request's rendering state. Chunks arrive in order; each returns its frames."""

    def begin_clip(self, clip: AudioClip) -> None:  # noqa: B027 - optional hook
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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-request resources."""


class Engine(ABC):
    """Motion + render for one method. Subclasses take their components in ``__init__`` and
    offer ``from_settings`` to build them from user configuration."""

    name: str = "engine"
    #: Sample rate the engine wants its audio in.
    sample_rate: int = 16_000
    #: Seconds of audio context the engine wants on each side of a chunk.
    context_seconds: tuple[float, float] = (0.2, 0.2)
    #: Version of this engine's per-avatar precompute; bump to invalidate cached files.
    precompute_version: str = "1"

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: "Settings") -> "Engine":
        """Build the engine (load weights) from settings."""

    @property
    def device(self) -> str:
        return "cpu"

    def describe(self) -> dict:
        """What /health reports about this engine."""
        return {"engine": self.name, "device": self.device}

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Run one small inference so the first request does not pay for lazy init."""

    def prepare_avatar(self, avatar: Avatar, directory: Path) -> None:  # noqa: B027
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


def load_engine(settings: "Settings") -> Engine:
    return engine_class(settings.engine).from_settings(settings)

