"""The sadtalker engine (engine.py): configuration errors, chunk continuity, the real networks
with random weights against upstream's renderer, and the CLI end to end.

Frame-level tests are slow on a CPU (one 256 px generator pass is several seconds), so they use
very short clips; continuity across chunks is checked with a recording stand-in renderer.
"""
from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lipsync.errors import CheckpointError, ConfigError
from lipsync.types import AudioChunk, MotionOptions
from tests.conftest import REPO
from tests.sadtalker.conftest import require_torch

torch = require_torch()

from lipsync.engines.sadtalker import engine as engine_mod
from lipsync.engines.sadtalker.engine import (
    FIRST_COEFF,
    SOURCE_PNG,
    WINDOW_RADIUS,
    SadTalkerEngine,
    SadTalkerSession,
    resolve_device,
)
from lipsync.engines.sadtalker.render import semantic_windows
from lipsync.settings import Settings


# --- configuration --------------------------------------------------------------------------
def test_registry_resolves_the_engine():
    from lipsync.engines.base import engine_class

    assert engine_class("sadtalker") is SadTalkerEngine


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:banana", "mps"):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_from_settings_without_checkpoints_says_how_to_set_them():
    with pytest.raises(CheckpointError) as info:
        SadTalkerEngine.from_settings(Settings(engine="sadtalker", device="cpu"))
    assert "--checkpoints" in info.value.message and "LIPSYNC_CHECKPOINTS" in info.value.message


def test_from_settings_lists_missing_files(tmp_path):
    with pytest.raises(CheckpointError) as info:
        SadTalkerEngine.from_settings(Settings(engine="sadtalker", device="cpu", checkpoints=tmp_path))
    assert "SadTalker_V0.0.2_256.safetensors" in info.value.message
    assert "mapping_00229-model.pth.tar" in info.value.message


def test_checkpoint_location_does_not_import_torch():
    code = (
        "import sys; import lipsync.engines.sadtalker.checkpoints as c; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- chunk continuity (stand-in motion and renderer) -------------------------------------------
class _RecordingRenderer:
    """Records the mapping-net windows a render would use; frames encode the frame index."""

    size = 32
    batch_size = 4

    def __init__(self) -> None:
        self.windows: list[torch.Tensor] = []
        self.formats: list[str] = []

    def render_batches(self, state, coeffs, *, context_before=0, context_after=0, paste=None,
                       output_size=None, pixel_format="rgb24"):
        count = coeffs.shape[0] - context_before - context_after
        assert count >= 0
        table = torch.from_numpy(np.ascontiguousarray(coeffs))
        self.windows.append(semantic_windows(table, context_before, count))
        self.formats.append(pixel_format)
        side = output_size or self.size
        index = np.round(coeffs[context_before:context_before + count, 0]).astype(np.uint8)
        for start in range(0, count, self.batch_size):
            part = index[start:start + self.batch_size]
            if pixel_format == "yuv420p":
                frames = np.zeros((len(part), side * 3 // 2, side), np.uint8)
                frames[:, :side] = part[:, None, None]
            else:
                frames = np.zeros((len(part), side, side, 3), np.uint8)
                frames[..., 0] = part[:, None, None]
            yield frames


class _ScriptedMotion:
    """Coefficient rows that are a known function of the frame index."""

    def __init__(self, total: int) -> None:
        rng = np.random.default_rng(0)
        self.table = rng.normal(0, 1, (total, 70)).astype(np.float32)
        self.table[:, 0] = np.arange(total)  # frame index, read back from the frames
        self.next = 0

    def process(self, chunk: AudioChunk) -> np.ndarray:
        assert chunk.first_frame == self.next
        self.next += chunk.n_frames
        return self.table[chunk.first_frame:chunk.first_frame + chunk.n_frames]


def _chunks(sizes: list[int]) -> list[AudioChunk]:
    out, first = [], 0
    for i, n in enumerate(sizes):
        out.append(AudioChunk(index=i, samples=np.zeros(640 * n, np.float32), sample_rate=16_000, fps=25,
                              first_frame=first, n_frames=n, context_before=0, context_after=0,
                              is_last=i == len(sizes) - 1))
        first += n
    return out


@pytest.mark.parametrize("sizes", [[75, 75, 30], [10, 3, 1, 40, 2], [5], [13, 14], [1, 1, 1, 1, 1, 1]])
def test_session_renders_every_frame_once_with_whole_clip_windows(sizes):
    total = sum(sizes)
    renderer = _RecordingRenderer()
    motion = _ScriptedMotion(total)
    engine = SimpleNamespace(renderer=renderer, enhancer=None, device_type="cpu")
    options = MotionOptions(size=64)
    session = SadTalkerSession(engine, None, motion, options, total, None)

    batches = [session.render(chunk) for chunk in _chunks(sizes)]
    # contiguous, in order, each frame exactly once, at the requested size
    index = 0
    for frames in batches:
        assert frames.first_index == index
        assert frames.data.shape[1:] == (64, 64, 3)
        index += len(frames)
    assert index == total
    shown = np.concatenate([f.data[:, 24, 24, 0] for f in batches])
    np.testing.assert_array_equal(shown, np.arange(total) % 256)
    # every frame's 27-frame window is the one a single whole-clip render would use
    got = torch.cat(renderer.windows)
    expected = semantic_windows(torch.from_numpy(motion.table), 0, total)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a frame is held back only until the 13 coefficients after it exist
    for frames, chunk in zip(batches[:-1], _chunks(sizes)[:-1]):
        assert frames.first_index + len(frames) >= chunk.first_frame + chunk.n_frames - WINDOW_RADIUS


def test_session_applies_the_enhancer_hook():
    renderer = _RecordingRenderer()
    seen = []

    def enhancer(frames: np.ndarray) -> np.ndarray:
        seen.append(frames.shape)
        return 255 - frames

    engine = SimpleNamespace(renderer=renderer, enhancer=enhancer, device_type="cuda")
    session = SadTalkerSession(engine, None, _ScriptedMotion(20), MotionOptions(size=64), 20, None)
    frames = session.render(_chunks([20])[0])
    assert seen == [(4, 64, 64, 3)] * 5  # batch by batch, in RGB even on CUDA
    assert renderer.formats == ["rgb24"]
    assert frames.pixel_format == "rgb24"
    assert int(frames.data[3, 0, 0, 0]) == 255 - 3


def test_frames_of_an_unfinished_iterator_come_with_the_next_chunk():
    renderer = _RecordingRenderer()
    engine = SimpleNamespace(renderer=renderer, enhancer=None, device_type="cpu")
    session = SadTalkerSession(engine, None, _ScriptedMotion(60), MotionOptions(size=64), 60, None)
    first, second = _chunks([30, 30])
    taken = next(session.render_iter(first))  # the caller stops after one batch
    rest = list(session.render_iter(second))
    batches = [taken, *rest]
    assert [b.first_index for b in batches] == list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
    shown = np.concatenate([b.data[:, 24, 24, 0] for b in batches])
    np.testing.assert_array_equal(shown, np.arange(60))  # each frame once, in order


def test_session_hands_out_each_generator_batch_as_it_is_ready():
    """render_iter yields per renderer batch (the encoder starts on the first) and asks for I420
    on CUDA; the engine's timings cover the whole chunk."""
    renderer = _RecordingRenderer()
    engine = SimpleNamespace(renderer=renderer, enhancer=None, device_type="cuda")
    session = SadTalkerSession(engine, None, _ScriptedMotion(30), MotionOptions(size=64), 30, None)
    batches = list(session.render_iter(_chunks([30])[0]))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 4, 2]
    assert [b.first_index for b in batches] == list(range(0, 30, 4))
    assert all(b.pixel_format == "yuv420p" and (b.width, b.height) == (64, 64) for b in batches)
    luma = np.concatenate([b.data[:, 10, 10] for b in batches])
    np.testing.assert_array_equal(luma, np.arange(30))
    assert set(session.last_times) == {"motion", "render"}


# --- real networks, random weights ------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(random_checkpoints) -> SadTalkerEngine:
    settings = Settings(engine="sadtalker", device="cpu", checkpoints=random_checkpoints.directory,
                        batch_size=4)
    return SadTalkerEngine.from_settings(settings)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory, material):
    from lipsync.avatar import PRECOMPUTE_VERSION, AvatarCache, precompute_avatar
    from lipsync.io import load_image

    path = material.path("faces/portrait.png")
    cache = AvatarCache(tmp_path_factory.mktemp("avatars"), PRECOMPUTE_VERSION)
    avatar, _ = precompute_avatar(load_image(path), cache=cache, source_bytes=path.read_bytes())
    return SimpleNamespace(avatar=avatar, cache=cache)


@pytest.mark.slow
def test_engine_describes_itself(engine):
    info = engine.describe()
    assert info["engine"] == "sadtalker" and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["checkpoint_size"] == 256 and info["preprocess"] == "crop"
    assert info["audio2pose_loaded"] is False  # built only for the first request with head motion


@pytest.mark.slow
def test_prepare_avatar_writes_coefficients_and_crop(engine, avatar):
    from lipsync.engines.sadtalker.face3d import extract_coefficients, read_first_coeff_mat

    directory = avatar.cache.engine_dir(avatar.avatar.id, engine.name, engine.precompute_version)
    assert not engine.avatar_ready(directory)
    engine.prepare_avatar(avatar.avatar, directory)
    assert engine.avatar_ready(directory)
    assert sorted(p.name for p in directory.iterdir()) == [FIRST_COEFF, SOURCE_PNG]  # no temp files left

    import cv2

    crop = cv2.cvtColor(cv2.imread(str(directory / SOURCE_PNG)), cv2.COLOR_BGR2RGB)
    assert crop.shape == (256, 256, 3)
    coeffs = read_first_coeff_mat(directory / FIRST_COEFF)
    scale = 256 / avatar.avatar.size
    direct = extract_coefficients(engine.recon, crop, (avatar.avatar.landmarks + 0.5) * scale - 0.5,
                                  engine.lm3d_std)
    np.testing.assert_allclose(coeffs.coeff_3dmm, direct.coeff_3dmm, atol=1e-4)

    (directory / FIRST_COEFF).write_bytes(b"truncated")
    assert not engine.avatar_ready(directory)
    (directory / FIRST_COEFF).unlink()
    assert not engine.avatar_ready(directory)
    engine.prepare_avatar(avatar.avatar, directory)  # leave it prepared for the next tests
    assert engine.avatar_ready(directory)


@pytest.mark.slow
def test_head_motion_builds_audio2pose_on_first_use(engine, avatar):
    """Still mode never touches Audio2Pose; the first request with head motion builds it once."""
    directory = avatar.cache.engine_dir(avatar.avatar.id, engine.name, engine.precompute_version)
    if not engine.avatar_ready(directory):
        engine.prepare_avatar(avatar.avatar, directory)
    engine.start(avatar.avatar, MotionOptions(still=True), 40, assets=directory)
    assert engine.describe()["audio2pose_loaded"] is False
    session = engine.start(avatar.avatar, MotionOptions(still=False, seed=2), 40, assets=directory)
    assert engine.describe()["audio2pose_loaded"] is True
    net = engine._pose_net()
    assert engine.start(avatar.avatar, MotionOptions(still=False), 40, assets=directory) and engine._pose_net() is net

    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(40 * 640) * 0.1).astype(np.float32)
    pad = np.zeros(8000, np.float32)
    chunk = AudioChunk(index=0, samples=np.concatenate([pad, audio, pad]), sample_rate=16_000, fps=25,
                       first_frame=0, n_frames=40, context_before=8000, context_after=8000, is_last=True)
    rows = session._motion.process(chunk)  # coefficients only: no frames rendered here
    assert rows.shape == (40, 70) and np.all(np.isfinite(rows))
    assert np.ptp(rows[:, 64:70], axis=0).max() > 1e-4  # the head moves


@pytest.mark.slow
def test_engine_frame_matches_upstream_make_animation(engine, avatar, random_checkpoints):
    """Two frames through the whole engine (3DMM, Audio2Exp, windows, renderer) vs upstream's
    make_animation driven by the same source image, source and target coefficients."""
    from tests.sadtalker.upstream import upstream_module

    options = MotionOptions(size=256, seed=3)
    rng = np.random.default_rng(5)
    audio = (rng.standard_normal(1280) * 0.2).astype(np.float32)  # 2 frames at 25 fps
    chunk = AudioChunk(index=0, samples=np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(8000, np.float32)]),
                       sample_rate=16_000, fps=25, first_frame=0, n_frames=2, context_before=8000,
                       context_after=8000, is_last=True)

    recorded = {}
    real_process = engine_mod.CoefficientGenerator.process

    def recording(self, ch):
        rows = real_process(self, ch)
        recorded["rows"] = rows.copy()
        return rows

    directory = avatar.cache.engine_dir(avatar.avatar.id, engine.name, engine.precompute_version)
    if not engine.avatar_ready(directory):
        engine.prepare_avatar(avatar.avatar, directory)
    session = engine.start(avatar.avatar, options, 2, assets=directory)
    session._motion.process = recording.__get__(session._motion)
    frames = session.render(chunk)
    assert frames.first_index == 0 and frames.data.shape == (2, 256, 256, 3)

    source = engine._load_source(avatar.avatar, directory)  # the state the session used (cached)
    rows = recorded["rows"]
    assert rows.shape == (2, 70)
    np.testing.assert_allclose(rows[:, 64:], np.repeat(source.coefficients.pose[None], 2, 0), atol=1e-6)  # still

    animation = upstream_module("facerender.modules.make_animation")
    mods = random_checkpoints.modules
    from lipsync.engines.sadtalker.engine import _read_png

    source_image = torch.from_numpy(_read_png(directory / SOURCE_PNG)).permute(2, 0, 1)[None].float() / 255
    source_semantics = torch.from_numpy(source.coefficients.coeff_70).T[None].repeat(1, 1, 27)
    frame = 1
    index = [min(max(i, 0), 1) for i in range(frame - 13, frame + 14)]  # transform_semantic_target
    target = torch.from_numpy(rows[index].T.copy())[None]
    with torch.no_grad():
        kp_canonical = mods["kp_extractor"](source_image)
        kp_source = animation.keypoint_transformation(kp_canonical, mods["mapping"](source_semantics))
        kp_driving = animation.keypoint_transformation(kp_canonical, mods["mapping"](target))
        out = mods["generator"](source_image, kp_source=kp_source, kp_driving=kp_driving)["prediction"]
    expected = (out[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255)
    diff = np.abs(frames.data[frame].astype(np.float64) - expected)
    assert expected.std() > 5  # a real picture, not a constant
    assert diff.max() <= 1.0  # 1e-3 in [0, 1] units at most, plus uint8 rounding
    assert diff.mean() < 0.05


@pytest.mark.slow
def test_full_output_pastes_the_face_into_the_letterboxed_portrait(random_checkpoints, material, tmp_path):
    """'full' (73-coefficient mapping net): one frame pasted back into the whole portrait."""
    from lipsync.avatar import PRECOMPUTE_VERSION, AvatarCache, precompute_avatar
    from lipsync.engines.sadtalker.checkpoints import SadTalkerCheckpoints
    from lipsync.engines.sadtalker.engine import PASTE_JSON, PASTE_PNG
    from lipsync.io import load_image

    ckpt = SadTalkerCheckpoints.locate(random_checkpoints.directory, preprocess="full")
    full = SadTalkerEngine.from_checkpoints(ckpt, device="cpu", batch_size=1)
    assert full.describe()["preprocess"] == "full" and full.renderer.coeff_count == 73
    assert "-256-full-" in full.precompute_version  # cached precompute is per size and output mode

    path = material.path("faces/tall.jpg")  # 910x1137: letterboxed into the square frame
    cache = AvatarCache(tmp_path / "avatars", PRECOMPUTE_VERSION)
    portrait = load_image(path)
    avatar, _ = precompute_avatar(portrait, cache=cache, source_bytes=path.read_bytes())
    directory = cache.engine_dir(avatar.id, full.name, full.precompute_version)
    full.bind_avatar_cache(cache)  # the portrait to paste into is read through the cache
    full.prepare_avatar(avatar, directory)
    assert full.avatar_ready(directory) and (directory / PASTE_PNG).is_file() and (directory / PASTE_JSON).is_file()

    size = 256
    session = full.start(avatar, MotionOptions(size=size, seed=1), 1, assets=directory)
    chunk = AudioChunk(index=0, samples=np.zeros(640 + 16000, np.float32), sample_rate=16_000, fps=25,
                       first_frame=0, n_frames=1, context_before=8000, context_after=8000, is_last=True)
    frame = session.render(chunk).data[0].astype(np.float64)
    assert frame.shape == (size, size, 3)

    h, w = portrait.height, portrait.width
    scale = size / max(h, w)
    bar = int((size - w * scale) / 2) - 2
    assert bar > 10 and frame[:, :bar].max() == 0 and frame[:, size - bar:].max() == 0  # letterbox bars
    # below the face crop the portrait shows through unchanged (the suit)
    y1 = avatar.crop_box[3]
    below = int((y1 + 0.5 * (h - y1)) * scale)
    assert y1 < h - 20
    import cv2

    reference = cv2.resize(portrait.pixels, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ox = (size - reference.shape[1]) // 2
    row = frame[below, ox + 10:ox + reference.shape[1] - 10]
    assert np.abs(row - reference[below, 10:-10]).mean() < 6.0


# --- CLI end to end -------------------------------------------------------------------------
def _write_wav(path: Path, samples: np.ndarray, sr: int = 16_000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.slow
def test_cli_generate_with_sadtalker_engine(random_checkpoints, material, tmp_path):
    """``lipsync generate --engine sadtalker`` writes a valid MP4 (pictures are noise: random weights).

    0.4 s of speech in 0.24 s chunks keeps the CPU time down (10 generator passes) while still
    crossing chunk borders, where frames are held back for the mapping window.
    """
    import av

    portrait = material.path("faces/portrait.png")
    speech = material.path("speech/speech_3s.wav")
    with wave.open(str(speech), "rb") as w:
        sr = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    clip = tmp_path / "clip.wav"
    _write_wav(clip, pcm[int(0.5 * sr):int(0.9 * sr)], sr)
    out = tmp_path / "out.mp4"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "LIPSYNC_CACHE_DIR": str(tmp_path / "cache"),
        "LIPSYNC_BATCH_SIZE": "4",
        "LIPSYNC_CHUNK_SECONDS": "0.24",
    }
    cmd = [sys.executable, "-m", "lipsync.cli", "generate", "--engine", "sadtalker",
           "--checkpoints", str(random_checkpoints.directory), "--device", "cpu",
           "--avatar", str(portrait), "--audio", str(clip), "--output", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=850, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]

    with av.open(str(out)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        assert video.codec_context.name == "h264"
        assert (video.width, video.height) == (512, 512)
        assert video.average_rate == 25
        assert len(audio) == 1 and audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 10
    assert float(np.std(frames[0])) > 5  # rendered pixels, not a blank frame


def test_cli_reports_missing_checkpoints_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LIPSYNC_CACHE_DIR": str(tmp_path / "cache")}
    clip = tmp_path / "clip.wav"
    _write_wav(clip, np.zeros(16_000, np.float32))
    cmd = [sys.executable, "-m", "lipsync.cli", "generate", "--engine", "sadtalker", "--checkpoints",
           str(tmp_path), "--device", "cpu", "--audio", str(clip), "--output", str(tmp_path / "o.mp4"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "SadTalker_V0.0.2_256.safetensors" in lines[0]
