"""Frozen dataclasses the stages hand each other.

io/ -> ``AudioClip``, ``AudioChunk``, ``Image``; avatar/ -> ``Avatar``; engines/ -> ``Frames``;
pipeline -> ``GenerateResult``. Arrays inside are made read-only so a stage cannot mutate what
another stage still holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .options import MotionOptions

if TYPE_CHECKING:  # typing.Self needs Python 3.11; annotations are not evaluated at run time
    from typing_extensions import Self

__all__ = ["AudioChunk", "AudioClip", "Avatar", "AvatarId", "FaceBox", "Frames", "GenerateResult", "Image",
           "MotionOptions", "StageTimes"]

#: What an avatar id looks like: the SHA-256 of the portrait file, as 64 lowercase hex digits.
AVATAR_ID_PATTERN = r"[0-9a-f]{64}"
_AVATAR_ID = re.compile(AVATAR_ID_PATTERN)


class AvatarId(str):
    """The id of a cached avatar (the SHA-256 of its portrait file), never a file path.

    Constructing one checks the form (``ValueError`` otherwise), so a value of this type can be
    handed to the avatar cache as is, and a plain ``str`` or ``Path`` is never taken for an id.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Self:
        if isinstance(value, AvatarId):
            return value
        if not isinstance(value, str) or not _AVATAR_ID.fullmatch(value):
            raise ValueError(
                "invalid avatar id: expected 64 lowercase hex digits (the SHA-256 of the portrait file)"
            )
        return super().__new__(cls, value)

    @classmethod
    def is_valid(cls, value: object) -> bool:
        return isinstance(value, str) and _AVATAR_ID.fullmatch(value) is not None


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


@dataclass(frozen=True)
class AudioClip:
    """Decoded speech: mono float32 in [-1, 1] at ``sample_rate``.

    ``speech`` is optional: (n,) bool, a voice-activity decision per sample (True = speech),
    set on the conditioned clip the engines get (``lipsync.io.condition``); None when unknown.
    """

    samples: np.ndarray
    sample_rate: int
    speech: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _readonly(np.asarray(self.samples, dtype=np.float32)))
        if self.speech is not None:
            speech = _readonly(np.asarray(self.speech, dtype=bool))
            if speech.shape != self.samples.shape:
                raise ValueError(f"speech mask has shape {speech.shape}, samples {self.samples.shape}")
            object.__setattr__(self, "speech", speech)

    @property
    def duration(self) -> float:
        return len(self.samples) / float(self.sample_rate)

    def n_frames(self, fps: int) -> int:
        """Video frames that cover this clip (rounded to the nearest frame, at least one)."""
        # fps may be a NumPy integer, and older NumPy (1.x) rounds a NumPy float to a NumPy float
        return max(1, int(round(self.duration * fps)))  # noqa: RUF046


@dataclass(frozen=True)
class AudioChunk:
    """At most ``chunk_seconds`` of speech, for video frames [first_frame, first_frame + n_frames).

    ``samples`` holds the chunk's own audio plus up to ``context_before`` samples before it and
    ``context_after`` after it, so an engine can compute features with look-ahead and smoothing
    that run continuously across chunk borders. ``own`` gives the chunk's own samples.
    ``speech``, when the clip had one, is the voice-activity decision over the same window as
    ``samples`` ((len(samples),) bool, False in the zero padding past the clip's ends).
    """

    index: int
    samples: np.ndarray
    sample_rate: int
    fps: int
    first_frame: int
    n_frames: int
    context_before: int
    context_after: int
    is_last: bool
    speech: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _readonly(np.asarray(self.samples, dtype=np.float32)))
        if self.speech is not None:
            object.__setattr__(self, "speech", _readonly(np.asarray(self.speech, dtype=bool)))

    @property
    def own(self) -> np.ndarray:
        end = len(self.samples) - self.context_after
        return self.samples[self.context_before:end]

    @property
    def start_seconds(self) -> float:
        return self.first_frame / float(self.fps)


@dataclass(frozen=True)
class Image:
    """A decoded, EXIF-oriented RGB image and the SHA-256 of its file bytes."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    sha256: str
    format: str  # "JPEG" | "PNG" | "WEBP"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixels", _readonly(self.pixels))

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class FaceBox:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)


@dataclass(frozen=True)
class Avatar:
    """A precomputed portrait: aligned square crop + landmarks, as cached on disk.

    ``image`` is the crop at ``size`` x ``size``; ``landmarks`` are dlib's 68 points in crop pixel
    coordinates; ``crop_box`` is the crop's square in the (EXIF-oriented) source image, which
    lets an engine paste results back. ``directory`` is the cache entry, where engines may keep
    their own precomputed files (e.g. SadTalker's ``first_coeff.mat``).
    """

    id: str
    image: np.ndarray  # (size, size, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float32, crop pixel coordinates
    crop_box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    source_size: tuple[int, int]  # width, height of the oriented source
    mouth_open_rest: float  # inner-lip gap / inter-ocular distance at rest
    teeth_visible_rest: bool
    directory: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", _readonly(self.image))
        object.__setattr__(self, "landmarks", _readonly(np.asarray(self.landmarks, dtype=np.float32)))

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


PixelFormat = Literal["rgb24", "yuv420p"]


@dataclass(frozen=True)
class Frames:
    """Consecutive rendered video frames starting at ``first_index``.

    ``data`` is (n, H, W, 3) uint8 for ``rgb24`` or (n, H * 3 // 2, W) uint8 planar I420 for
    ``yuv420p`` (an engine that composites in YUV saves the encoder a colour conversion).
    """

    first_index: int
    data: np.ndarray
    pixel_format: PixelFormat = "rgb24"

    def __post_init__(self) -> None:
        if self.pixel_format not in ("rgb24", "yuv420p"):
            raise ValueError(f"unknown pixel format {self.pixel_format!r}")
        object.__setattr__(self, "data", _readonly(self.data))

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def height(self) -> int:
        h = int(self.data.shape[1])
        return h * 2 // 3 if self.pixel_format == "yuv420p" else h


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent per stage in one request."""

    precompute: float = 0.0
    audio: float = 0.0
    motion: float = 0.0
    render: float = 0.0
    encode: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("precompute", "audio", "motion", "render", "encode")}


@dataclass(frozen=True)
class GenerateResult:
    avatar_id: str
    frames: int
    fps: int
    audio_seconds: float
    output: Path | None
    times: StageTimes = field(default_factory=StageTimes)
    avatar_cache_hit: bool = False
