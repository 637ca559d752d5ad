"""The ``lipsync`` command line as a user runs it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from lipsync.cli import main
from tests.material import BAD, IMAGE_SUFFIXES


def test_generate_sample_in_a_real_process(tmp_path):
    out = tmp_path / "talk.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "generate", "--sample", "--output", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # the whole clip's length, called audio: pauses are in it too (the sample is 10.24 s long)
    assert re.search(r"wrote .*talk\.mp4: 256 frames \(10\.2 s of audio\) in ", proc.stderr), proc.stderr
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (512, 512)
        assert c.streams.audio


def test_precompute_prints_the_avatar_id_and_caches(tmp_path, material):
    runner = CliRunner()
    args = ["precompute", "--avatar", str(material.path("faces/tall.jpg")), "--cache-dir", str(tmp_path)]
    first = runner.invoke(main, args)
    second = runner.invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    avatar_id = first.stdout.strip().splitlines()[0]
    assert len(avatar_id) == 64 and second.stdout.strip().splitlines()[0] == avatar_id
    assert "computed" in first.stderr and "cached" in second.stderr
    # the id then works as --avatar
    out = tmp_path / "by_id.mp4"
    r = runner.invoke(main, ["generate", "--avatar", avatar_id, "--audio",
                             str(material.path("speech/speech_3s.wav")), "-o", str(out),
                             "--cache-dir", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_size_and_fps_reach_the_output(tmp_path, material):
    out = tmp_path / "small.mp4"
    speech = material.path("speech/speech_3s.wav")
    r = CliRunner().invoke(main, ["generate", "--audio", str(speech), "-o", str(out), "--size", "256",
                                  "--fps", "20", "--cache-dir", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height, float(v.average_rate)) == (256, 256, 20.0)
        assert sum(1 for _ in c.decode(v)) == 60  # 3.0 s at 20 fps


# --- motion options, measured on the decoded frames --------------------------------------------
# Each run renders the bundled sample (10 s) at 256x256 with one seed; a region's motion is its
# mean absolute grey-level difference from the first frame (a rest frame), per frame. The top band
# of the picture (hair and background above the brows) only moves when the head does.
SIZE = 256
RUNS = {
    "still": ["--still", "--no-blink"],  # expression 0.3 (the default)
    "no_still": ["--no-still", "--no-blink"],
    "blink": ["--still", "--blink"],
    "expr_0": ["--still", "--no-blink", "--expression-scale", "0"],
    "expr_1": ["--still", "--no-blink", "--expression-scale", "1.0"],
}


class Motion:
    """Decoded grey frames of each run in RUNS, and the avatar's landmarks at output size."""

    def __init__(self, workdir: Path) -> None:
        from lipsync.pipeline import LipSyncPipeline

        self.workdir = workdir
        self.cache = workdir / "cache"
        avatar, _ = LipSyncPipeline.from_settings(cache_dir=self.cache).resolve_avatar(None)
        self.landmarks = avatar.landmarks.astype(np.float64) * SIZE / avatar.size
        self._frames: dict[str, np.ndarray] = {}

    def frames(self, run: str) -> np.ndarray:
        if run not in self._frames:
            out = self.workdir / f"{run}.mp4"
            r = CliRunner().invoke(main, ["generate", "--sample", "-o", str(out), "--size", str(SIZE),
                                          "--seed", "3", "--cache-dir", str(self.cache), "-q", *RUNS[run]])
            assert r.exit_code == 0, r.output
            with av.open(str(out)) as c:
                self._frames[run] = np.stack(
                    [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)])
        return self._frames[run]

    def box(self, points: range, pad: float, raise_by: float = 0.0) -> tuple[int, int, int, int]:
        p = self.landmarks[list(points)]
        (x0, y0), (x1, y1) = p.min(0), p.max(0)
        w, h = x1 - x0, y1 - y0
        return int(x0 - pad * w), int(y0 - (pad + raise_by) * h), int(x1 + pad * w) + 1, int(y1 + pad * h) + 1

    def motion(self, run: str, region: str) -> np.ndarray:
        """Per-frame mean |frame - first frame| over a region: eyes, brows or top."""
        f = self.frames(run)
        diff = np.abs(f - f[0])
        brows = self.box(range(17, 27), 0.1, raise_by=1.0)  # the brows and the forehead above them
        if region == "eyes":  # the more moving of the two eyes
            boxes = [self.box(range(36, 42), 0.3), self.box(range(42, 48), 0.3)]
        elif region == "brows":
            boxes = [brows]
        elif region == "top":
            boxes = [(0, 0, SIZE, brows[1] - 5)]
        else:
            raise ValueError(region)
        return np.max([diff[:, y0:y1, x0:x1].mean(axis=(1, 2)) for x0, y0, x1, y1 in boxes], axis=0)


@pytest.fixture(scope="module")
def motion(tmp_path_factory) -> Motion:
    return Motion(tmp_path_factory.mktemp("cli_motion"))


def test_still_keeps_the_head_in_place_and_no_still_moves_it(motion):
    still, moving = motion.motion("still", "top"), motion.motion("no_still", "top")
    noise = still.max()  # the encoder's noise on a static region
    assert noise < 4, f"the top of the picture changes by {noise:.1f} grey levels in still mode"
    assert moving.max() > 4 * noise, (moving.max(), noise)
    assert np.mean(moving > 2 * noise) > 0.5, "the head should move most of the time, not once"


def test_no_blink_never_closes_the_eyes(motion):
    blinking, open_eyes = motion.motion("blink", "eyes"), motion.motion("still", "eyes")
    noise = motion.motion("still", "top").max()
    # A blink covers the iris with the lid: a large change of the eye region...
    assert blinking.max() > 5 * open_eyes.max(), (blinking.max(), open_eyes.max())
    # ... which never happens without blinks (brows at 0.3 nudge the eye region a little).
    assert open_eyes.max() < 3 * noise, (open_eyes.max(), noise)
    # and the blinks are short events, not a constant state
    assert 0 < np.mean(blinking > 0.5 * blinking.max()) < 0.2


def test_expression_scale_sets_how_much_the_brows_move(motion):
    brows = {run: motion.motion(run, "brows").mean() for run in ("expr_0", "still", "expr_1")}
    noise = motion.motion("expr_0", "top").mean()
    assert brows["expr_0"] < 2 * noise, brows  # scale 0: the brows stay put
    assert brows["still"] > 1.4 * brows["expr_0"], brows  # the default 0.3 moves them
    assert brows["expr_1"] > 1.8 * brows["still"], brows  # 1.0 moves them more
    # still mode throughout: the brows move, the head does not
    assert motion.motion("expr_1", "top").max() < 4


@pytest.mark.parametrize("name", BAD)
def test_bad_files_give_one_line_and_nonzero_exit(tmp_path, material, name):
    path = material.path(f"bad/{name}")
    out = tmp_path / "x.mp4"
    if path.suffix in IMAGE_SUFFIXES:
        args = ["generate", "--avatar", str(path), "--audio", str(material.path("speech/speech_3s.wav"))]
    else:
        args = ["generate", "--audio", str(path)]
    r = CliRunner().invoke(main, args + ["-o", str(out), "--cache-dir", str(tmp_path), "-q"])
    if name == "huge_header.wav":  # read as the one second of audio it really holds
        assert r.exit_code == 0, r.output
        with av.open(str(out)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 25
        return
    assert r.exit_code == 1, (r.exit_code, r.output)  # refused input, not an internal error (3)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["generate", "--audio", "/nonexistent.wav", "-o", "x.mp4"], "not found"),
    (["generate", "--sample", "-o", "x.mp4", "--size", "333"], "size"),
    (["generate", "--sample", "-o", "x.mp4", "--engine", "nope"], "unknown engine"),
    (["generate", "--sample", "-o", "x.mp4", "--avatar", "0" * 64], "lipsync precompute"),
    (["generate", "--audio", "/", "-o", "x.mp4"], "audio file expected, got a directory"),
    (["generate", "--audio", "/dev/null", "-o", "x.mp4"], "got a device, pipe or socket"),
    (["generate", "--sample", "-o", "x.mp4", "--avatar", "deadbeef"], "nor an avatar id"),
])
def test_user_mistakes_are_explained(tmp_path, args, needle):
    r = CliRunner().invoke(main, args + ["--cache-dir", str(tmp_path)])
    assert r.exit_code != 0
    assert needle in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("before", [True, False])
def test_verbose_logs_each_stage_before_or_after_the_command(tmp_path, before):
    """``-v`` works before the command and after it, and says what each stage did."""
    args = ["generate", "--sample", "-o", str(tmp_path / "v.mp4"), "--cache-dir", str(tmp_path), "-q"]
    args = ["-v", *args] if before else [*args, "-v"]
    proc = subprocess.run([sys.executable, "-m", "lipsync.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    for needle in ("INFO lipsync.pipeline: avatar ", "audio: 10.2", "conditioning (", "wrote ", "'motion':"):
        assert needle in proc.stderr, (needle, proc.stderr)
    # the whole id, so that what the log shows works as --avatar
    assert re.search(r"avatar [0-9a-f]{64}: ", proc.stderr), proc.stderr


@pytest.mark.parametrize("where,needle", [
    ("dir", "output path is a directory"),
    ("under_a_file", "cannot write the video to"),
    ("missing_folder", "output folder does not exist"),
])
def test_an_output_path_that_cannot_be_written_is_one_line_exit_1(tmp_path, where, needle):
    """A directory, a path under a plain file, or one in a folder that does not exist: refused
    like bad input (exit 1), not an internal error (exit 3), and nothing is left behind (no
    folder is made for a mistyped path)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "plain").write_text("x")
    out = {"dir": tmp_path / "out", "under_a_file": tmp_path / "plain" / "x.mp4",
           "missing_folder": tmp_path / "typo" / "deeper" / "x.mp4"}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["generate", "--sample", "-o", str(out), "--cache-dir", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    after = sorted(p.name for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "c"))
    assert after == before  # no temp file beside the target, the directory still a directory


@pytest.mark.parametrize("args,needle", [
    (["generate", "--sample"], "missing option '--output'"),
    (["generate", "--sample", "-o", "x.mp4", "--colour", "red"], "no such option '--colour'"),
    (["generate", "--sample", "-o", "x.mp4", "--size", "big"], "'big' is not a valid integer"),
    (["renderr"], "no such command 'renderr'"),
])
def test_usage_mistakes_are_one_line(args, needle):
    """What click itself refuses reads like every other refusal: one error line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "lipsync.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0].lower(), lines
    assert "--help" in lines[0]


def test_help_and_version_still_exit_zero():
    for args in (["--help"], ["generate", "--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-m", "lipsync.cli", *args], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0 and proc.stdout.strip() and not proc.stderr.strip(), (args, proc.stderr)


def test_serve_on_a_taken_port_is_one_line_before_any_model_loads(tmp_path):
    """Another process listens on the port: `lipsync serve` says so in one line and exits 2,
    without a traceback and without uvicorn's start-up log (the check runs before anything)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "lipsync.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--cache-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == [(f"error: cannot listen on 127.0.0.1:{port}: another server is listening there; "
                      "stop it or choose another --port (LIPSYNC_PORT)")], proc.stderr
