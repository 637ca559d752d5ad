"""Locating, reading and strictly loading SadTalker checkpoint files (checkpoints.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lipsync.engines.sadtalker import checkpoints as ck
from lipsync.engines.sadtalker.checkpoints import (
    LEGACY_PARTS,
    LM3D_FILE,
    MAPPING_FILES,
    SadTalkerCheckpoints,
    main_file_name,
    synthetic_lm3d,
    write_lm3d,
)
from lipsync.errors import CheckpointError, ConfigError


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- locate (no torch needed) ---------------------------------------------------------------
def test_locate_lists_everything_missing_and_where(tmp_path):
    with pytest.raises(CheckpointError) as info:
        SadTalkerCheckpoints.locate(tmp_path, size=256, preprocess="crop")
    msg = _one_line(info.value)
    assert str(tmp_path) in msg
    assert main_file_name(256) in msg
    assert "auido2exp_00300-model.pth" in msg  # the older set is offered as an alternative
    assert MAPPING_FILES["crop"] in msg
    assert LM3D_FILE in msg and str(tmp_path / "BFM_Fitting") in msg
    assert info.value.code == "checkpoint_error"
    assert len(info.value.detail["missing"]) == 3


def test_locate_names_only_what_is_missing(tmp_path):
    _touch(tmp_path / main_file_name(512))
    _touch(tmp_path / LM3D_FILE)
    with pytest.raises(CheckpointError) as info:
        SadTalkerCheckpoints.locate(tmp_path, size=512, preprocess="full")
    msg = _one_line(info.value)
    assert MAPPING_FILES["full"] in msg
    assert main_file_name(512) not in msg and LM3D_FILE not in msg
    assert info.value.detail["missing"] == [MAPPING_FILES["full"]]


def test_locate_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SadTalkerCheckpoints.locate(tmp_path / "nope")


@pytest.mark.parametrize("kwargs", [{"size": 384}, {"preprocess": "resize"}])
def test_locate_rejects_unknown_size_or_preprocess(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        SadTalkerCheckpoints.locate(tmp_path, **kwargs)


def test_locate_finds_complete_safetensors_set(tmp_path):
    main = _touch(tmp_path / main_file_name(256))
    mapping = _touch(tmp_path / MAPPING_FILES["crop"])
    lm3d = _touch(tmp_path / LM3D_FILE)
    got = SadTalkerCheckpoints.locate(tmp_path)
    assert (got.main, got.mapping, got.lm3d, got.size, got.preprocess) == (main, mapping, lm3d, 256, "crop")
    assert not got.is_legacy and got.mapping_coeff_count == 70


@pytest.mark.parametrize("where", ["bfm_dir", "bfm_file", "BFM_Fitting", "clone_config"])
def test_locate_lm3d_search_order(tmp_path, where):
    ckdir = tmp_path / "SadTalker" / "checkpoints"
    _touch(ckdir / main_file_name(256))
    _touch(ckdir / MAPPING_FILES["full"])
    bfm_dir = None
    if where in ("bfm_dir", "bfm_file"):
        expected = _touch(tmp_path / "bfm" / LM3D_FILE)
        bfm_dir = expected.parent if where == "bfm_dir" else expected
        _touch(ckdir / LM3D_FILE)  # an explicit setting wins over the file beside the checkpoints
    elif where == "BFM_Fitting":
        expected = _touch(ckdir / "BFM_Fitting" / LM3D_FILE)
    else:  # user pointed at <clone>/checkpoints; the template ships in <clone>/src/config
        expected = _touch(tmp_path / "SadTalker" / "src" / "config" / LM3D_FILE)
    got = SadTalkerCheckpoints.locate(ckdir, preprocess="full", bfm_dir=bfm_dir)
    assert got.lm3d == expected
    assert got.mapping_coeff_count == 73


def test_locate_falls_back_to_the_older_pth_set(tmp_path):
    for name, _ in LEGACY_PARTS.values():
        _touch(tmp_path / name)
    _touch(tmp_path / MAPPING_FILES["crop"])
    _touch(tmp_path / LM3D_FILE)
    got = SadTalkerCheckpoints.locate(tmp_path)
    assert got.is_legacy
    assert got.main.name == "facevid2vid_00189-model.pth.tar"
    assert {p.name for p in got.legacy_files} == {n for n, _ in LEGACY_PARTS.values()}
    # the older set exists only at 256
    with pytest.raises(CheckpointError, match=main_file_name(512)):
        SadTalkerCheckpoints.locate(tmp_path, size=512)


# --- reading (tiny tensors) -----------------------------------------------------------------
torch_required = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="torch is not installed"
)


def _tiny_weights(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        part: {"a.weight": torch.randn(3, 2, generator=g), "b.bias": torch.randn(4, generator=g)}
        for part in ck.ALL_PARTS
    }


@torch_required
def test_save_official_layout_round_trip(tmp_path):
    import torch
    from safetensors.torch import load_file
    from scipy.io import loadmat

    weights = _tiny_weights()
    lm3d = synthetic_lm3d() * 1.5
    got = ck.save_official_layout(tmp_path, weights, size=512, preprocess="full", lm3d=lm3d)
    assert got.main == tmp_path / "SadTalker_V0.0.2_512.safetensors"
    assert got.mapping == tmp_path / "mapping_00109-model.pth.tar"

    flat = load_file(str(got.main))
    assert set(flat) == {f"{p}.{k}" for p in ck.MAIN_PARTS for k in ("a.weight", "b.bias")}
    blob = torch.load(got.mapping, weights_only=True)
    assert set(blob) == {"mapping", "epoch"} and blob["epoch"] == 109
    np.testing.assert_allclose(loadmat(str(got.lm3d))["lm"], lm3d, rtol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files

    back = ck.load_weights(got)
    assert set(back) == set(ck.ALL_PARTS)
    for part in ck.ALL_PARTS:
        assert set(back[part]) == {"a.weight", "b.bias"}
        for key in back[part]:
            torch.testing.assert_close(back[part][key], weights[part][key], rtol=0, atol=0)


@torch_required
def test_main_file_is_read_once(tmp_path, monkeypatch):
    import safetensors.torch

    got = ck.save_official_layout(tmp_path, _tiny_weights())
    calls: list[str] = []
    real = safetensors.torch.load_file

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", counting)
    ck.load_weights(got)
    assert calls == [str(got.main)]


@torch_required
def test_legacy_set_loads_each_file_once(tmp_path, monkeypatch):
    import torch

    weights = _tiny_weights(1)
    by_file: dict[str, dict] = {}
    for part, (name, key) in LEGACY_PARTS.items():
        by_file.setdefault(name, {"epoch": 1})[key] = weights[part]
    by_file["facevid2vid_00189-model.pth.tar"]["he_estimator"] = {"x": torch.zeros(1)}  # unused part
    for name, blob in by_file.items():
        torch.save(blob, tmp_path / name)
    ck.write_mapping_file(tmp_path / MAPPING_FILES["crop"], weights["mapping"])
    write_lm3d(tmp_path / LM3D_FILE, synthetic_lm3d())

    loads: list[str] = []
    real = torch.load

    def counting(path, *args, **kwargs):
        loads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    got = ck.load_weights(SadTalkerCheckpoints.locate(tmp_path))
    assert sorted(loads) == sorted(set(by_file) | {MAPPING_FILES["crop"]})
    for part in ck.ALL_PARTS:
        torch.testing.assert_close(got[part]["a.weight"], weights[part]["a.weight"])


@torch_required
def test_missing_sub_network_is_named(tmp_path):
    weights = _tiny_weights()
    got = ck.save_official_layout(tmp_path, weights)
    from safetensors.torch import load_file, save_file

    flat = {k: v for k, v in load_file(str(got.main)).items() if not k.startswith("generator.")}
    save_file(flat, str(got.main))
    with pytest.raises(CheckpointError) as info:
        ck.load_weights(got)
    msg = _one_line(info.value)
    assert "generator" in msg and str(got.main) in msg


@torch_required
@pytest.mark.parametrize("damage", ["garbage_main", "truncated_main", "garbage_mapping", "no_mapping_key",
                                    "pickled_object"])
def test_damaged_files_give_checkpoint_error(tmp_path, damage):
    import torch

    got = ck.save_official_layout(tmp_path, _tiny_weights())
    if damage == "garbage_main":
        got.main.write_bytes(b"\x00" * 100)
    elif damage == "truncated_main":
        got.main.write_bytes(got.main.read_bytes()[:50])
    elif damage == "garbage_mapping":
        got.mapping.write_bytes(b"not a checkpoint")
    elif damage == "no_mapping_key":
        torch.save({"state_dict": {}, "epoch": 3}, got.mapping)
    else:  # arbitrary objects are never unpickled from a user's checkpoint folder
        torch.save({"mapping": Path("/etc/passwd")}, got.mapping)
    with pytest.raises(CheckpointError) as info:
        ck.load_weights(got)
    _one_line(info.value)


# --- strict loading -------------------------------------------------------------------------
@torch_required
def test_load_strict_reports_missing_unexpected_and_shapes():
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    good = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in net.state_dict().items()}

    bad = dict(good)
    del bad["0.weight"]
    bad["9.extra"] = torch.zeros(1)
    bad["2.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as info:
        ck.load_strict(net, bad, "generator")
    msg = _one_line(info.value)
    assert "generator" in msg
    assert "0.weight" in msg and "9.extra" in msg and "2.weight (5, 5) vs (2, 4)" in msg
    assert info.value.detail["network"] == "generator"

    many_missing = {k: v for k, v in good.items() if k.startswith("2.")}
    with pytest.raises(CheckpointError, match=r"6 missing keys \(.*, \.\.\.\)"):
        ck.load_strict(net, many_missing, "kp_extractor")


@torch_required
def test_load_strict_loads_values_and_tolerates_absent_batch_counters():
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: (torch.rand_like(v.float()) + 0.5).to(v.dtype) for k, v in net.state_dict().items()}
    del state["1.num_batches_tracked"]
    ck.load_strict(net, state, "face_3drecon")
    torch.testing.assert_close(net[1].running_var, state["1.running_var"])
    torch.testing.assert_close(net[0].weight, state["0.weight"])


# --- the real-size random set (official layout, upstream classes) -----------------------------
@pytest.mark.slow
def test_random_set_loads_strictly_into_upstream_and_our_networks(random_checkpoints):
    """Upstream's own loader helper reads our file, and every part loads strictly."""
    import torch

    from lipsync.engines.sadtalker.face3d import ReconNet
    from tests.sadtalker.upstream import upstream_module

    ckpt = random_checkpoints.ckpt
    assert ckpt.main.stat().st_size > 500e6  # real size, not a shrunken stand-in
    weights = ck.load_weights(ckpt)
    assert set(ck.ALL_PARTS) <= set(weights)

    helper = upstream_module("utils.safetensor_helper")
    from safetensors.torch import load_file

    flat = load_file(str(ckpt.main))
    for part in ck.MAIN_PARTS:
        theirs = helper.load_x_from_safetensor(flat, part)
        assert set(theirs) == set(weights[part])
        module = random_checkpoints.modules[part]
        ck.load_strict(module, weights[part], part)  # upstream class, strict
    assert torch.load(ckpt.mapping, weights_only=True)["mapping"].keys() == weights["mapping"].keys()

    ours = ReconNet()
    ck.load_strict(ours, weights["face_3drecon"], "face_3drecon")
    with pytest.raises(CheckpointError, match="face_3drecon"):
        ck.load_strict(ours, weights["audio2exp"], "face_3drecon")


@torch_required
def test_load_strict_drops_keys_the_module_declares_training_only():
    import torch
    from torch import nn

    class WithoutDiscriminator(nn.Linear):
        checkpoint_ignored_prefixes = ("netD_motion.",)

    net = WithoutDiscriminator(2, 2)
    state = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    ck.load_strict(net, {**state, "netD_motion.seq.0.weight": torch.zeros(3)}, "audio2pose")
    assert torch.all(net.weight == 1)
    with pytest.raises(CheckpointError, match="netG.encoder.x"):
        ck.load_strict(net, {**state, "netG.encoder.x": torch.zeros(3)}, "audio2pose")
