"""The ``lipsync`` command line as a user runs it."""
from __future__ import annotations

import subprocess
import sys

import av
import pytest
from click.testing import CliRunner

from lipsync.cli import main

from ..conftest import ASSETS, shared_path

BAD = sorted(p.name for p in (ASSETS / "bad").glob("*")) if (ASSETS / "bad").exists() else []
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def test_generate_sample_in_a_real_process(tmp_path):
    out = tmp_path / "talk.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "generate", "--sample", "--output", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "Traceback" not in proc.stderr
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (512, 512)
        assert c.streams.audio


def test_precompute_prints_the_avatar_id_and_caches(tmp_path):
    runner = CliRunner()
    args = ["precompute", "--avatar", str(shared_path("faces", "obama.jpg")), "--cache-dir", str(tmp_path)]
    first = runner.invoke(main, args)
    second = runner.invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    avatar_id = first.stdout.strip().splitlines()[0]
    assert len(avatar_id) == 64 and second.stdout.strip().splitlines()[0] == avatar_id
    assert "computed" in first.stderr and "cached" in second.stderr
    # the id then works as --avatar
    out = tmp_path / "by_id.mp4"
    r = runner.invoke(main, ["generate", "--avatar", avatar_id, "--audio",
                             str(shared_path("speech", "en_librivox_0880.wav")), "-o", str(out),
                             "--cache-dir", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_options_reach_the_output(tmp_path):
    out = tmp_path / "small.mp4"
    r = CliRunner().invoke(main, ["generate", "--sample", "-o", str(out), "--size", "256", "--fps", "20",
                                  "--no-still", "--no-blink", "--expression-scale", "0.5",
                                  "--cache-dir", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height, float(v.average_rate)) == (256, 256, 20.0)


@pytest.mark.parametrize("name", BAD)
def test_bad_files_give_one_line_and_nonzero_exit(tmp_path, name):
    path = shared_path("bad", name)
    out = tmp_path / "x.mp4"
    if path.suffix in IMAGE_SUFFIXES:
        args = ["generate", "--avatar", str(path), "--audio", str(shared_path("speech", "en_librivox_0880.wav"))]
    else:
        args = ["generate", "--audio", str(path)]
    r = CliRunner().invoke(main, args + ["-o", str(out), "--cache-dir", str(tmp_path), "-q"])
    if name in {"huge_header.wav", "awful.wav"} and r.exit_code == 0:
        return  # allowed to be read as the little audio they really hold
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["generate", "--audio", "/nonexistent.wav", "-o", "x.mp4"], "not found"),
    (["generate", "--sample", "-o", "x.mp4", "--size", "333"], "size"),
    (["generate", "--sample", "-o", "x.mp4", "--engine", "nope"], "unknown engine"),
    (["generate", "--sample", "-o", "x.mp4", "--avatar", "0" * 64], "no avatar"),
])
def test_user_mistakes_are_explained(tmp_path, args, needle):
    r = CliRunner().invoke(main, args + ["--cache-dir", str(tmp_path)])
    assert r.exit_code != 0
    assert needle in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.output
