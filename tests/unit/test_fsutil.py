"""One atomic-write helper (``fsutil.atomic_write``), and the writers that go through it."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from lipsync import fsutil
from lipsync.fsutil import FILE_MODE, atomic_write, write_file_atomic
from lipsync.types import Frames


def test_atomic_write_replaces_whole_files_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"first")) == target
    assert target.read_bytes() == b"first"
    write_file_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # no temp files left


@pytest.mark.parametrize("durable", [True, False])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, durable):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == target.parent and tmp != target  # beside it, so the rename is atomic
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write, durable=durable)
    assert target.read_bytes() == b"old"
    assert not seen[0].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_durable_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write(tmp_path / "a", lambda tmp: tmp.write_bytes(b"x"))
    assert len(synced) == 2  # the file, then its directory
    synced.clear()
    atomic_write(tmp_path / "b", lambda tmp: tmp.write_bytes(b"x"), durable=False)
    assert synced == []


def _spy(monkeypatch, module) -> list[Path]:
    calls: list[Path] = []
    real = fsutil.atomic_write

    def spy(path, write, **kw):
        calls.append(Path(path))
        return real(path, write, **kw)

    monkeypatch.setattr(module, "atomic_write", spy)
    return calls


def test_encode_mp4_writes_through_the_helper(tmp_path, monkeypatch):
    from lipsync.video import encode as encode_module

    calls = _spy(monkeypatch, encode_module)
    frames = [Frames(0, np.zeros((3, 64, 64, 3), np.uint8))]
    out = encode_module.encode_mp4(tmp_path / "v.mp4", frames, width=64, height=64)
    assert calls == [out] and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_encode_mp4_failure_leaves_nothing(tmp_path):
    from lipsync.video import encode_mp4

    def frames():
        yield Frames(0, np.zeros((2, 64, 64, 3), np.uint8))
        raise RuntimeError("renderer broke")

    with pytest.raises(RuntimeError, match="renderer broke"):
        encode_mp4(tmp_path / "v.mp4", frames(), width=64, height=64)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_generate_writes_through_the_helper(tmp_path, monkeypatch, tone_wav):
    from lipsync import pipeline as pipeline_module
    from lipsync.pipeline import LipSyncPipeline

    calls = _spy(monkeypatch, pipeline_module)
    pipe = LipSyncPipeline.from_settings(cache_dir=tmp_path / "cache", size=128)
    out = tmp_path / "talk.mp4"
    result = pipe.generate(tone_wav, out)
    assert calls == [out] and result.output == out and out.stat().st_size > 0
    assert stat.S_IMODE(out.stat().st_mode) == FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "talk.mp4"]
