"""Our own error types.

Every failure a user can cause is one of these, with a stable machine-readable ``code`` and a
human message. The HTTP layer maps them to status codes in one table (``lipsync.server.errors``);
the CLI prints ``error: <message>`` and exits non-zero. Nothing here knows about HTTP.
"""
from __future__ import annotations


class LipsyncError(Exception):
    """Base of every error this package raises on purpose."""

    code = "error"

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.message = message
        self.detail = {k: v for k, v in detail.items() if v is not None}

    def to_dict(self) -> dict:
        out: dict = {"code": self.code, "message": self.message}
        if self.detail:
            out["detail"] = self.detail
        return out


# --- bad input -------------------------------------------------------------------------------
class InvalidInput(LipsyncError):
    """The request or file is not acceptable as given."""

    code = "invalid_input"


class UnsupportedMedia(InvalidInput):
    """Not a format we accept (e.g. an image where audio was expected, a GIF portrait)."""

    code = "unsupported_media"


class CorruptMedia(InvalidInput):
    """Claims to be a supported format but cannot be decoded (truncated, broken header)."""

    code = "corrupt_media"


class EmptyAudio(InvalidInput):
    code = "empty_audio"


class AudioTooLong(InvalidInput):
    code = "audio_too_long"


class ImageTooLarge(InvalidInput):
    """More pixels than the configured limit (decompression-bomb guard)."""

    code = "image_too_large"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class NoFaceFound(InvalidInput):
    code = "no_face"


class AvatarNotFound(LipsyncError):
    code = "avatar_not_found"

    @classmethod
    def unknown(cls, avatar_id: str) -> AvatarNotFound:
        """A well-formed id that nothing was precomputed for, with where ids come from."""
        return cls(f"no avatar with id {avatar_id!r}; precompute it first (lipsync precompute, POST /precompute)",
                   avatar_id=avatar_id)


# --- service state ---------------------------------------------------------------------------
class Busy(LipsyncError):
    """The work queue is full; try again later."""

    code = "busy"

    def __init__(self, message: str = "server busy, try again later", retry_after_s: int = 2) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.retry_after_s = retry_after_s


class ShuttingDown(Busy):
    code = "shutting_down"


class JobTimeout(LipsyncError):
    code = "timeout"


class OutputNotWritable(LipsyncError):
    """The video cannot be written where the caller asked (a directory, no permission, no space,
    a read-only file system). Only callers that name an output path (CLI, Python) can cause it."""

    code = "output_not_writable"


# --- configuration / models ------------------------------------------------------------------
class ConfigError(LipsyncError):
    """Settings that cannot work (unknown engine, bad device)."""

    code = "config_error"


class EngineUnavailable(ConfigError):
    """The engine's optional dependencies are not installed."""

    code = "engine_unavailable"


class CheckpointError(ConfigError):
    """Model files missing or not matching the network."""

    code = "checkpoint_error"


def size_text(n_bytes: int) -> str:
    """A byte limit for a person: ``50 MiB (52428800 bytes)``; MiB with up to two decimals."""
    mib = f"{n_bytes / 2**20:.2f}".rstrip("0").rstrip(".")
    return f"{mib} MiB ({n_bytes} bytes)"
