"""Response models, so the OpenAPI schema documents what each endpoint returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..types import AVATAR_ID_PATTERN as _ID

#: Avatar ids are SHA-256 hex digests (``types.AvatarId``); anything else (dots, slashes) is refused
#: before it reaches the cache, so no id can name a path outside the cache directory.
AVATAR_ID_PATTERN = f"^{_ID}$"


class DefaultAvatarStatus(BaseModel):
    id: str | None = Field(None, description="Id of the default avatar once it is precomputed.")
    ready: bool


class Health(BaseModel):
    status: str = Field(description="'ok', 'starting', 'failed' or 'shutting_down'.")
    ready: bool = Field(description="True when the server takes generation work (HTTP 200).")
    version: str
    engine: str | None = None
    device: str | None = None
    engine_info: dict[str, Any] = Field(default_factory=dict, description="The engine's own description.")
    models_loaded: bool
    warmed_up: bool
    warmup_s: float | None = Field(None, description="Seconds the start-up warm-up took.")
    default_avatar: DefaultAvatarStatus
    workers: int
    queue_size: int
    uptime_s: float
    error: dict[str, Any] | None = Field(None, description="Why start-up failed, when status is 'failed'.")


class StageSummary(BaseModel):
    count: int
    mean: float
    p50: float
    p95: float


class EndpointCounts(BaseModel):
    served: int
    failed: dict[str, int]


class RequestCounts(BaseModel):
    served: int
    failed: int
    failed_by_reason: dict[str, int]
    by_endpoint: dict[str, EndpointCounts]


class CacheStats(BaseModel):
    hits: int
    misses: int
    avatars: int | None = Field(None, description="Avatars in the on-disk cache.")


class GeneratedStats(BaseModel):
    videos: int
    frames: int
    audio_seconds: float


class QueueStats(BaseModel):
    depth: int = Field(description="Jobs waiting for a worker.")
    in_flight: int = Field(description="Jobs running now.")
    workers: int
    capacity: int = Field(description="workers + queue_size; more concurrent jobs get 503.")
    accepting: bool


class Stats(BaseModel):
    uptime_s: float
    requests: RequestCounts
    stages: dict[str, StageSummary] = Field(
        description="Seconds per stage: precompute, audio, motion, render, encode."
    )
    cache: CacheStats
    generated: GeneratedStats
    queue: QueueStats


class AvatarOut(BaseModel):
    id: str = Field(description="SHA-256 of the uploaded image bytes.")
    default: bool = Field(False, description="Whether this is the server's default avatar.")
    info: dict[str, Any] = Field(default_factory=dict, description="What the cache records about it.")


class AvatarCreated(AvatarOut):
    cache_hit: bool = Field(description="True if the avatar was already precomputed.")
    precompute_s: float


class AvatarList(BaseModel):
    avatars: list[AvatarOut]
    count: int
    default_id: str | None


class AvatarDeleted(BaseModel):
    id: str
    deleted: bool


class PrecomputeOut(BaseModel):
    avatar_id: str
    default: bool = True
    source: str = Field(description="'upload', 'settings' or 'bundled'.")
    precompute_s: float
