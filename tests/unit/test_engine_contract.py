"""The server-pipeline-engine boundary: ``AvatarId`` is never a path and a path never an id;
engines read stored portraits only through ``AvatarCache`` (under the pixel guard); sessions
declare their stage timings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lipsync.avatar import AvatarCache, open_cache, validate_avatar_id
from lipsync.engines.base import Engine, RenderSession
from lipsync.errors import AvatarNotFound, ImageTooLarge, InvalidInput
from lipsync.pipeline import LipSyncPipeline
from lipsync.settings import load_settings
from lipsync.types import AudioChunk, AudioClip, Avatar, AvatarId, Frames, MotionOptions

from .test_avatar_cache import FakeDetector, build, make_image

ID = "ab" * 32


# --- AvatarId ------------------------------------------------------------------------------------
def test_avatar_id_accepts_only_sha256_hex():
    aid = AvatarId(ID)
    assert isinstance(aid, str) and aid == ID and AvatarId(aid) is aid
    for bad in ("AB" * 32, "ab" * 31, "../" + "a" * 61, "/etc/passwd", "a" * 64 + "\n", "", 42, None):
        with pytest.raises(ValueError):
            AvatarId(bad)  # type: ignore[arg-type]
        assert not AvatarId.is_valid(bad)
    assert isinstance(validate_avatar_id(ID), AvatarId)
    with pytest.raises(AvatarNotFound):
        validate_avatar_id("../x")


class StillEngine(Engine):
    """Frames of the avatar crop; reports its own motion/render split."""

    name = "still"

    @classmethod
    def from_settings(cls, settings) -> StillEngine:
        return cls()

    def start(self, avatar: Avatar, options: MotionOptions, total_frames: int, *,
              assets=None) -> RenderSession:
        return StillSession(options.size)


class StillSession(RenderSession):
    def __init__(self, size: int) -> None:
        self.size = size

    def render(self, chunk: AudioChunk) -> Frames:
        self.last_times = {"motion": 0.25, "render": 0.5}  # declared seconds: the pipeline must add these
        return Frames(chunk.first_frame, np.zeros((chunk.n_frames, self.size, self.size, 3), np.uint8))


@pytest.fixture
def pipe(tmp_path: Path) -> LipSyncPipeline:
    settings = load_settings(cache_dir=tmp_path / "c", size=64)
    return LipSyncPipeline(settings=settings, engine=StillEngine(), cache=open_cache(settings),
                           detector=FakeDetector())


def test_an_avatar_id_is_looked_up_never_read_as_a_path(pipe, tmp_path, monkeypatch):
    _image, data = make_image(1)
    cached, _ = pipe.add_avatar(data)
    found, hit = pipe.resolve_avatar(AvatarId(cached.id))
    assert found.id == cached.id and hit and np.array_equal(found.image, cached.image)
    with pytest.raises(AvatarNotFound):
        pipe.resolve_avatar(AvatarId(ID))
    # a plain string is a file path, even when it looks like an id: no cache lookup
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match="not found"):
        pipe.resolve_avatar(cached.id)
    # and a file that happens to carry an id's name is read as the file it is
    other, other_data = make_image(2)
    Path(cached.id).write_bytes(other_data)
    avatar, _ = pipe.resolve_avatar(cached.id)
    assert avatar.id == other.sha256 != cached.id
    assert pipe.resolve_avatar(AvatarId(cached.id))[0].id == cached.id


def test_session_stage_times_are_declared_and_summed(pipe, tmp_path):
    assert dict(RenderSession.last_times) == {}
    with pytest.raises(TypeError):
        RenderSession.last_times["render"] = 1.0  # type: ignore[index] - the class default is read-only
    clip = AudioClip(np.zeros(16_000 * 7, np.float32), 16_000)  # 7 s: three chunks of at most 3 s
    result = pipe.generate(clip, tmp_path / "o.mp4")
    chunks = 3
    assert result.times.motion == pytest.approx(0.25 * chunks)
    assert result.times.render == pytest.approx(0.5 * chunks)


def test_the_pipeline_binds_its_cache_into_the_engine(pipe):
    assert pipe.engine.avatar_cache is pipe.cache
    assert Engine.avatar_cache is None  # an engine used on its own has none


def test_upright_source_is_the_stored_portrait_under_the_pixel_guard(tmp_path):
    cache = AvatarCache(tmp_path / "c", version="t1")
    avatar, _, image, _data = build(cache, seed=3)
    pixels = cache.upright_source(avatar.id)
    assert pixels.shape == image.pixels.shape and np.array_equal(pixels, image.pixels)
    with pytest.raises(AvatarNotFound):
        cache.upright_source(ID)
    small = AvatarCache(tmp_path / "c", version="t1", max_image_pixels=image.width * image.height - 1)
    with pytest.raises(ImageTooLarge):
        small.upright_source(avatar.id)
    settings = load_settings(cache_dir=tmp_path / "d", max_image_pixels=123_456)
    assert open_cache(settings).max_image_pixels == 123_456


def test_sadtalker_reads_the_portrait_only_through_the_cache():
    """Static check (torch may be absent): the engine neither globs avatar files nor lifts the
    pixel guard; it asks the bound cache for the upright source."""
    source = (Path(__file__).resolve().parents[2] / "src/lipsync/engines/sadtalker/engine.py").read_text()
    assert "glob(" not in source and "max_pixels" not in source and "FACE_META" not in source
    assert "self.avatar_cache.upright_source(avatar.id)" in source



def test_classic_engine_says_a_cuda_device_does_not_apply_to_it(caplog):
    """``--device cuda`` with the CPU-only classic engine is not silently accepted."""
    import logging

    from lipsync.engines.classic.engine import ClassicEngine
    from lipsync.settings import Settings

    with caplog.at_level(logging.WARNING):
        ClassicEngine.from_settings(Settings(device="cuda"))
    assert any("runs on the CPU" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ClassicEngine.from_settings(Settings(device="cpu"))
    assert not caplog.records
