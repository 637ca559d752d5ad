"""Per-request options and encoder options: each default and limit written once, here.

``MotionOptions`` (what a request may choose: motion strengths, still/blink, output size, frame
rate, seed) and ``EncoderOptions`` (libx264/AAC settings) are validated dataclasses: building one
with a value out of range raises ``pydantic.ValidationError`` (a ``ValueError``), so no
unvalidated value reaches an engine or the encoder. ``Settings`` nests them as the server's
defaults; the HTTP form fields (``server/routes.py``) and the CLI options (``cli.py``) read their
defaults, limits and descriptions from these fields through ``field_spec``.
"""
from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as validated_dataclass
from pydantic.fields import FieldInfo

#: libx264's speed presets, fastest first (x264 --fullhelp, "--preset").
X264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
]
X264_PRESETS: tuple[str, ...] = get_args(X264Preset)

#: Largest output side any engine renders and the encoder is tuned for (classic renders at any
#: even size; SadTalker renders 256/512 px and rescales).
MAX_OUTPUT_SIZE = 1024
#: Seeds are 32-bit: the pipeline derives one from 4 bytes of the audio's SHA-256.
MAX_SEED = 2**32 - 1

_CONFIG = ConfigDict(extra="forbid")


@validated_dataclass(frozen=True, config=_CONFIG)
class MotionOptions:
    """Per-request motion and output controls (the server's defaults come from ``Settings``).

    Frozen and validated on construction (``dataclasses.replace`` validates too).
    """

    expression_scale: float = Field(0.3, ge=0.0, le=3.0, description="Brows/cheeks/head motion strength.")
    lip_scale: float = Field(1.0, ge=0.0, le=3.0,
                             description="Lip motion strength, independent of expression.")
    still: bool = Field(True, description="Still mode: no head motion.")
    blink: bool = Field(True, description="Natural random blinks.")
    size: int = Field(512, ge=64, le=MAX_OUTPUT_SIZE, multiple_of=2,
                      description="Output width and height in pixels (H.264 4:2:0).")
    fps: int = Field(25, ge=1, le=60, description="Frames per second.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed for blinks and head motion.")


@validated_dataclass(frozen=True, config=_CONFIG)
class EncoderOptions:
    """H.264 + AAC encoder settings (``video.Mp4Writer``)."""

    crf: int = Field(26, ge=0, le=51, description="x264 constant rate factor (0 lossless, 51 worst).")
    preset: X264Preset = Field("ultrafast", description="x264 speed preset.")
    audio_bitrate: int = Field(96_000, ge=16_000, le=512_000, description="AAC bit rate in bit/s.")


@dataclass(frozen=True)
class FieldSpec:
    """One option field as the shells need it: default, limits, description, Python type."""

    name: str
    default: Any
    description: str
    annotation: Any
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None

    @property
    def value_type(self) -> type:
        """The field's type without ``None`` (``int | None`` -> ``int``; a ``Literal`` of strings ->
        ``str``)."""
        annotation = self.annotation
        if get_origin(annotation) in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        if get_origin(annotation) is Literal:
            return type(get_args(annotation)[0])
        return annotation

    def limits(self) -> dict[str, Any]:
        """The non-None limits as keyword arguments (``ge``, ``le``, ``multiple_of``)."""
        return {k: v for k, v in (("ge", self.ge), ("le", self.le), ("multiple_of", self.multiple_of))
                if v is not None}

    def range_text(self) -> str:
        """The limits in words for help texts, e.g. ``64..1024, even``."""
        parts = []
        if self.ge is not None and self.le is not None:
            parts.append(f"{self.ge}..{self.le}")
        elif self.ge is not None:
            parts.append(f">= {self.ge}")
        elif self.le is not None:
            parts.append(f"<= {self.le}")
        if self.multiple_of == 2:
            parts.append("even")
        elif self.multiple_of:
            parts.append(f"multiple of {self.multiple_of}")
        if get_args(self.annotation) and all(isinstance(a, str) for a in get_args(self.annotation)):
            parts.append("|".join(get_args(self.annotation)))
        return ", ".join(parts)


def field_spec(model: type, name: str) -> FieldSpec:
    """Default, limits and description of ``model``'s field ``name`` (``MotionOptions``,
    ``EncoderOptions``)."""
    info: FieldInfo = model.__pydantic_fields__[name]  # type: ignore[attr-defined]
    found: dict[str, Any] = {}
    for m in info.metadata:  # annotated_types.Ge / Le / MultipleOf, one attribute each
        for key in ("ge", "le", "multiple_of"):
            if hasattr(m, key):
                found[key] = getattr(m, key)
    return FieldSpec(name=name, default=info.default, description=info.description or "",
                     annotation=info.annotation, **found)


#: pydantic error types that a value outside an option's limits produces.
_LIMIT_ERRORS = frozenset({"greater_than_equal", "less_than_equal", "greater_than", "less_than",
                           "multiple_of", "finite_number"})


def option_error_text(name: str, error: Mapping[str, Any]) -> str:
    """What to tell the user about option ``name`` whose value failed ``error`` (one entry of a
    pydantic ``ValidationError.errors()``).

    A value outside the option's limits (a ``MotionOptions`` or ``EncoderOptions`` field) gets
    the whole range, e.g. ``"must be 64..1024, even"``: pydantic reports only the first limit it
    checks, so 10**20 for ``size`` read "should be a multiple of 2" and NaN for a scale "should
    be less than or equal to 3". Anything else keeps pydantic's own message.
    """
    if error.get("type") in _LIMIT_ERRORS:
        for model in (MotionOptions, EncoderOptions):
            if name in model.__pydantic_fields__:  # type: ignore[attr-defined]
                text = field_spec(model, name).range_text()
                if text:
                    return f"must be {text}"
    return str(error.get("msg", "invalid value"))


def option_names(model: type) -> tuple[str, ...]:
    """The field names of an options model, in declaration order."""
    return tuple(model.__pydantic_fields__)  # type: ignore[attr-defined]
