"""Quality gate against real speakers: ../shared/eval/realsync.py on held-out real clips (speakers
the viseme model was not fitted on, see corpus/manifest.json), with negative controls that must
fail the same gate: a still mouth, the mouth shifted by 5 frames, a loudness-only mouth."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lipsync.pipeline import LipSyncPipeline

from ..conftest import REPO
from .conftest import real_case, realsync_module, require_shared_module
from .gate import realsync_failures, realsync_scores

require_shared_module()

pytestmark = pytest.mark.slow

#: Held-out real clips (explicit, not globbed); 8 s each.
HELDOUT = [
    "sadtalker_examples__ref_video__WDA_AlexandriaOcasioCortez_000",
    "sadtalker_test__examples__source_image__RD_Radio2_000",
]
DEV = ["text2video_vidtimit_fadg0_sa1", "text2video_vidtimit_fadg0_sa2"]


def test_heldout_clips_are_not_in_the_fit():
    manifest = json.loads((REPO / "corpus" / "manifest.json").read_text())
    split = {c["name"]: c["split"] for c in manifest["real"]["clips"]}
    assert all(split[n] == "heldout" for n in HELDOUT)
    from lipsync.engines.classic.visemes import load_model

    assert not set(HELDOUT) & set(load_model().meta["dev_clips"])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """name -> (generated mouth opening per frame as realsync measures it, case dir)."""
    rs = realsync_module()
    tmp = tmp_path_factory.mktemp("realsync")
    pipe = LipSyncPipeline.from_settings(cache_dir=tmp / "cache")
    out = {}
    for name in HELDOUT:
        case = real_case(name)
        video = tmp / f"{name}.mp4"
        pipe.generate(case / "speech.wav", video, avatar=case / "portrait.png")
        frames, _ = rs.frames_at_25(video)
        op, _, _ = rs.track(frames, rs.Faces())
        out[name] = (rs.fill(op), case)
    return rs, out


@pytest.mark.parametrize("name", HELDOUT)
def test_mouth_follows_the_real_speaker(generated, name):
    rs, out = generated
    op, case = out[name]
    s = realsync_scores(rs, op, case)
    assert not realsync_failures(s), (realsync_failures(s), {k: v for k, v in s.items() if k != "envelope"})


@pytest.mark.parametrize("control", ["still", "shifted_5_frames", "loudness_only"])
def test_negative_controls_fail_the_gate(generated, control):
    rs, out = generated
    op, case = out[HELDOUT[0]]
    if control == "still":
        bad = np.full_like(op, float(op[0]))
    elif control == "shifted_5_frames":
        bad = np.concatenate([np.full(5, op[0]), op[:-5]])
    else:
        bad = realsync_scores(rs, op, case)["envelope"]
    assert realsync_failures(realsync_scores(rs, bad, case)), control


def test_fitting_script_runs_in_tiny_mode(tmp_path):
    for name in DEV:
        real_case(name)
    out = tmp_path / "model.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "fit_visemes.py"), "--tiny", "--out", str(out)],
                   check=True, timeout=120, capture_output=True)
    from lipsync.engines.classic.visemes import load_model

    m = load_model(str(out))
    assert m.meta["fitted_by"].endswith("--tiny") and m.meta["dev_clips"] == DEV
    assert m.targets["AA"]["jaw"] > m.targets["M"]["jaw"]
