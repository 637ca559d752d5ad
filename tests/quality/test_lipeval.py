"""Quality gate: the independent judge (../shared/eval/lipeval.py) with phone-level checks.

Held-out aligned speech (LibriVox) on every shared portrait: the judge's own checks (loudness
correlation only at its own threshold, a timing sanity check), identity, and from ``--phones``:
bilabial closure, open vowels, rounding (pass marks in ``gate``). Real Russian speech (held-out
speakers): lips shut in pauses and moving with the syllables (the judge's checks). A dev clip's
bilabial closure must stay >= 0.9 (the motion model's own regression check, no video needed).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from lipsync.pipeline import LipSyncPipeline

from ..conftest import REPO
from .conftest import LIPEVAL, material, require_shared_module
from .gate import MIN_BILABIAL, phone_failures

require_shared_module()

FACES = ["astronaut.png", "obama.jpg"]
HELDOUT_ALIGNED = ["en_librivox_0870", "en_librivox_0880"]
HELDOUT_RU = ["pisets__test_sound_ru", "vosk_server__mqtt_test"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return LipSyncPipeline.from_settings(cache_dir=tmp_path_factory.mktemp("cache"))


def judge(video, speech, face, phones=None, tmp=None) -> dict:
    material("eval", "lipeval.py")
    out = tmp / (video.stem + ".json")
    cmd = [sys.executable, str(LIPEVAL), str(video), "--audio", str(speech), "--avatar", str(face),
           "--json", str(out)]
    if phones is not None:
        cmd += ["--phones", str(phones)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert out.exists(), f"lipeval failed to run: {proc.stderr[-2000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("speech", HELDOUT_ALIGNED)
def test_phone_checks_on_heldout_speech(pipe, tmp_path, face, speech):
    face_path = material("assets", "faces", face)
    wav = material("assets", "speech", speech + ".wav")
    video = tmp_path / f"{face.split('.')[0]}_{speech}.mp4"
    pipe.generate(wav, video, avatar=face_path)
    r = judge(video, wav, face_path, material("assets", "speech", speech + ".phones.json"), tmp_path)
    assert not phone_failures(r), (phone_failures(r), {k: r.get(k) for k in ("bilabial_closed", "open_vowel_open", "rounding_auc")})
    assert r["identity_dist_mean"] <= 0.35


@pytest.mark.parametrize("speech", HELDOUT_RU)
def test_judge_passes_on_real_russian_speech(pipe, tmp_path, speech):
    face_path = material("assets", "faces", "obama.jpg")
    wav = material("assets", "speech_ru", speech + ".wav")
    video = tmp_path / f"ru_{speech}.mp4"
    pipe.generate(wav, video, avatar=face_path)
    r = judge(video, wav, face_path, None, tmp_path)
    assert r["pass"], [k for k, ok in r["checks"].items() if not ok]


def test_bilabial_closure_on_a_dev_clip_stays_high():
    """en_espeak is in the dev split: if closure for P/B/M drops below 0.9 the model regressed."""
    wav = material("assets", "speech", "en_espeak.wav")
    phones = json.loads(material("assets", "speech", "en_espeak.phones.json").read_text())
    spec = importlib.util.spec_from_file_location("eval_motion", REPO / "bench" / "eval_motion.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    samples = harness.decode(wav)
    ctl = harness.run_motion(samples, chunk_seconds=3.0)
    stats = harness.judge_stats(ctl.aperture, ctl.width, samples, phones)
    assert stats["bilabial_closed"] >= MIN_BILABIAL, stats
