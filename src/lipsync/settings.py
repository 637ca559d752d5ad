"""One settings object for every tunable (env prefix ``LIPSYNC_``).

Defaults follow the product description: 512x512, 25 fps, libx264 ultrafast CRF 26 with
+faststart, expression scale 0.3, still mode and blinks on, port 7002.

The per-request defaults (``request``: a ``MotionOptions``) and the encoder settings
(``encoder``: an ``EncoderOptions``) are nested models whose defaults and limits live in
``lipsync.options``; their fields keep flat names everywhere a user meets them: environment
variables ``LIPSYNC_SIZE``, ``LIPSYNC_CRF``... and keywords ``Settings(size=256, crf=20)``.

``load_settings`` is the checked way in: any invalid value is a ``ConfigError`` naming the
environment variable (``invalid setting size (LIPSYNC_SIZE=1536): ...``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .options import EncoderOptions, MotionOptions, option_error_text, option_names

ENV_PREFIX = "LIPSYNC_"
#: Nested option groups whose fields are set by flat names (``size``, ``LIPSYNC_SIZE``).
NESTED_OPTIONS: dict[str, type] = {"request": MotionOptions, "encoder": EncoderOptions}
#: flat name -> the group it belongs to
FLAT_OPTIONS: dict[str, str] = {name: group for group, model in NESTED_OPTIONS.items()
                                for name in option_names(model)}


def env_var(name: str) -> str:
    """The environment variable of a setting: ``size`` -> ``LIPSYNC_SIZE``."""
    return f"{ENV_PREFIX}{name.upper()}"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lipsync"


class _FlatOptionEnv(PydanticBaseSettingsSource):
    """``LIPSYNC_SIZE``, ``LIPSYNC_CRF``...: the nested options' flat variables, read into
    ``{"request": {...}, "encoder": {...}}`` (names are case-insensitive, like the other settings)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}
        out: dict[str, dict[str, str]] = {}
        for name, group in FLAT_OPTIONS.items():
            value = env.get(env_var(name))
            if value is not None:
                out.setdefault(group, {})[name] = value
        return out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # --- engine ---------------------------------------------------------------------------
    engine: str = Field("classic", description="Engine name: 'classic' (CPU, default) or 'sadtalker'.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]' (neural engines only).")
    checkpoints: Path | None = Field(None, description="Directory holding the SadTalker checkpoints.")
    bfm_dir: Path | None = Field(
        None, description="Where similarity_Lm3D_all.mat lives if not beside the checkpoints."
    )
    fp16: bool = Field(True, description="Half precision / autocast for the renderer on CUDA.")
    torch_compile: bool = Field(
        False, description="torch.compile the renderer's decoder and motion hourglass on CUDA (with "
        "channels-last and CUDA graphs): 0.34 against 0.54 s of GPU per second of speech at 512 px on an "
        "H200, after ~1 min of compiling at start-up (worth it for a server, not a one-off CLI run).",
    )
    batch_size: int | None = Field(
        None, ge=1, le=256,
        description="Frames per renderer batch (neural engines); None: what fits ~2 GB of activations "
        "on CUDA (32 at 256 px fp16, 8 at 512 px, the upsampling blocks run a few frames at a time), 4 on CPU.",
    )
    sadtalker_size: Literal[256, 512] = Field(256, description="Which SadTalker checkpoint resolution to load.")
    preprocess: Literal["crop", "full"] = Field("crop", description="SadTalker output: face crop or pasted back.")
    pose_style: int = Field(0, ge=0, le=45, description="SadTalker Audio2Pose style (when still mode is off).")

    # --- per-request defaults and the encoder (limits in lipsync.options) -------------------
    request: MotionOptions = Field(default_factory=MotionOptions,
                                   description="Defaults of the per-request options (LIPSYNC_SIZE, ...).")
    encoder: EncoderOptions = Field(default_factory=EncoderOptions,
                                    description="H.264/AAC encoder settings (LIPSYNC_CRF, ...).")

    # --- audio ----------------------------------------------------------------------------
    sample_rate: int = Field(16_000, description="Rate audio is resampled to, once, on decode.")
    chunk_seconds: float = Field(3.0, gt=0.2, le=3.0, description="Chunk length (at most 3 s).")
    max_audio_seconds: float = Field(600.0, gt=0, description="Longer input is refused.")

    # --- avatars --------------------------------------------------------------------------
    avatar: Path | None = Field(None, description="Default avatar portrait; the bundled sample if unset.")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="On-disk avatar cache.")
    max_image_pixels: int = Field(40_000_000, ge=10_000, description="Decompression-bomb guard.")

    # --- server ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(7002, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="Concurrent generation jobs.")
    queue_size: int = Field(4, ge=0, le=1024, description="Jobs waiting beyond the running ones.")
    request_timeout_s: float = Field(120.0, gt=0)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    graceful_shutdown_s: float = Field(30.0, ge=0)
    max_avatars: int = Field(1000, ge=1, description="Avatar cache entries kept (oldest dropped).")

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_options(cls, data: Any) -> Any:
        """``size=256`` -> ``request.size``; a flat value wins over the nested one it replaces
        (flat keywords are explicit overrides, the environment arrives nested already)."""
        if not isinstance(data, dict) or not any(k in FLAT_OPTIONS for k in data):
            return data
        data = dict(data)
        for group in NESTED_OPTIONS:
            flat = {k: data.pop(k) for k in [k for k in data if FLAT_OPTIONS.get(k) == group]}
            if not flat:
                continue
            nested = data.get(group) or {}
            if dataclasses.is_dataclass(nested) and not isinstance(nested, type):
                nested = dataclasses.asdict(nested)
            data[group] = {**nested, **flat}
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        flat = _FlatOptionEnv(settings_cls)
        return (init_settings, env_settings, flat, dotenv_settings, file_secret_settings)


def settings_error(exc: ValidationError) -> ConfigError:
    """One ``ConfigError`` for a failed ``Settings`` validation, naming each bad variable:
    ``invalid setting size (LIPSYNC_SIZE=1536): Input should be less than or equal to 1024``."""
    problems = []
    names = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
        name = loc[-1] if loc and loc[0] in NESTED_OPTIONS else (loc[0] if loc else "settings")
        names.append(name)
        shown = env_var(name)
        if "input" in err and not isinstance(err["input"], (dict, list)) and err.get("type") != "missing":
            shown += f"={err['input']}"
        problems.append(f"{name} ({shown}): {option_error_text(name, err)}")
    return ConfigError("invalid setting " + "; ".join(problems), setting=names[0] if names else None,
                       variable=env_var(names[0]) if names else None)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with explicit overrides (None values are ignored), or a
    ``ConfigError`` naming the first bad variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise settings_error(e) from None


#: Old name of ``load_settings``.
get_settings = load_settings
