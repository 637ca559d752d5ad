"""One settings object for every tunable (env prefix ``LIPSYNC_``).

Defaults follow the product description: 512x512, 25 fps, libx264 ultrafast CRF 26 with
+faststart, expression scale 0.3, still mode and blinks on, enhancer off, port 7002.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lipsync"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIPSYNC_", extra="ignore", validate_default=True)

    # --- engine ---------------------------------------------------------------------------
    engine: str = Field("classic", description="Engine name: 'classic' (CPU, default) or 'sadtalker'.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]' (neural engines only).")
    checkpoints: Path | None = Field(None, description="Directory holding the SadTalker checkpoints.")
    bfm_dir: Path | None = Field(
        None, description="Where similarity_Lm3D_all.mat lives if not beside the checkpoints."
    )
    fp16: bool = Field(True, description="Half precision / autocast for the renderer on CUDA.")
    batch_size: int | None = Field(
        None, ge=1, le=256,
        description="Frames per renderer batch (neural engines); None: what fits ~1.5 GB of activations "
        "on CUDA (11 at 256 px fp16, 2 at 512 px), 4 on CPU.",
    )
    sadtalker_size: Literal[256, 512] = Field(256, description="Which SadTalker checkpoint resolution to load.")
    preprocess: Literal["crop", "full"] = Field("crop", description="SadTalker output: face crop or pasted back.")
    pose_style: int = Field(0, ge=0, le=45, description="SadTalker Audio2Pose style (when still mode is off).")
    enhancer: Literal["none", "gfpgan"] = Field("none", description="Face enhancer (off by default).")

    # --- motion ---------------------------------------------------------------------------
    expression_scale: float = Field(0.3, ge=0.0, le=3.0, description="Brows/cheeks/head motion strength.")
    lip_scale: float = Field(1.0, ge=0.0, le=3.0, description="Lip motion strength, independent of expression.")
    still: bool = Field(True, description="Still mode: no head motion.")
    blink: bool = Field(True, description="Natural random blinks.")
    seed: int | None = Field(None, description="Seed for blinks/head motion; None derives it from the audio.")

    # --- output ---------------------------------------------------------------------------
    size: int = Field(512, ge=64, le=2048, description="Output width and height in pixels.")
    fps: int = Field(25, ge=1, le=60)
    crf: int = Field(26, ge=0, le=51)
    preset: str = Field("ultrafast")
    audio_bitrate: int = Field(96_000, ge=16_000, le=512_000)

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

    @field_validator("size")
    @classmethod
    def _even_size(cls, v: int) -> int:
        if v % 2:
            raise ValueError("size must be even (H.264 4:2:0)")
        return v


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (None values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
