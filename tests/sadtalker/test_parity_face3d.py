"""Our 3DMM extraction (face3d.py) against upstream SadTalker's code on the same inputs.

* ReconNet: same parameter names/shapes; the official-layout random checkpoint loads strictly and
  gives the same 257 coefficients as upstream's ``define_net_recon('resnet50')`` (<= 1e-4).
* Alignment: five points, 3D template, POS fit and the 224 crop equal upstream's functions'.
* End to end: ``extract_coefficients`` equals upstream's CropAndExtract steps (landmark y flip,
  align_img, net, split) and first_coeff.mat has upstream's variables and shapes.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.material import PORTRAIT
from tests.sadtalker.conftest import require_torch, require_upstream

torch = require_torch()

from lipsync.engines.sadtalker import face3d
from lipsync.engines.sadtalker.checkpoints import (
    load_strict,
    load_weights,
    synthetic_lm3d,
    write_lm3d,
)


@pytest.fixture(scope="module")
def upstream():
    require_upstream()
    from tests.sadtalker.upstream import upstream_module

    return {
        "preprocess": upstream_module("face3d.util.preprocess"),
        "load_mats": upstream_module("face3d.util.load_mats"),
        "networks": upstream_module("face3d.models.networks"),
    }


def _face_landmarks(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """68 plausible image landmarks (y down): the template projected, turned a little, jittered."""
    lm3d = synthetic_lm3d().astype(np.float64)
    yaw = 0.25
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    pts = (lm3d @ rot.T)[:, :2]
    img = np.stack([size / 2 + pts[:, 0] * size * 0.35, size * 0.45 - pts[:, 1] * size * 0.35], axis=1)
    return img + rng.normal(0, 1.0, img.shape)


def _upstream_align(pre, rgb: np.ndarray, lm_yup: np.ndarray, lm3d5: np.ndarray):
    """upstream align_img, composed from its parts: align_img itself fails on numpy 2 only
    because ``t`` is (2, 1) and ``float()`` of a 1-element array is an error there."""
    from PIL import Image

    img = Image.fromarray(rgb)
    w0, h0 = img.size
    t, s = pre.POS(pre.extract_5p(lm_yup).transpose(), lm3d5.transpose())
    s = 102.0 / s
    img_new, lm_new, _ = pre.resize_n_crop_img(img, lm_yup, t.ravel(), s, target_size=224.0)
    return np.array([w0, h0, s, t[0, 0], t[1, 0]]), np.asarray(img_new), lm_new


# --- network structure ------------------------------------------------------------------------
def test_reconnet_parameter_names_and_shapes_match_upstream(upstream):
    theirs = upstream["networks"].define_net_recon(net_recon="resnet50", use_last_fc=False, init_path="")
    ours = face3d.ReconNet()
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected


# --- alignment ------------------------------------------------------------------------------
def test_five_points_and_template_match_upstream(upstream, tmp_path):
    rng = np.random.default_rng(1)
    lm = _face_landmarks(rng)
    np.testing.assert_array_equal(face3d.five_points(lm), upstream["preprocess"].extract_5p(lm))

    template = synthetic_lm3d() + rng.normal(0, 0.01, (68, 3)).astype(np.float32)
    write_lm3d(tmp_path / "similarity_Lm3D_all.mat", template)
    ours = face3d.load_lm3d(tmp_path / "similarity_Lm3D_all.mat")
    theirs = upstream["load_mats"].load_lm3d(str(tmp_path))
    assert ours.shape == (5, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


def test_scale_translation_fit_matches_upstream_pos(upstream):
    rng = np.random.default_rng(2)
    lm5 = face3d.five_points(_face_landmarks(rng))
    lm3d5 = face3d.five_points(synthetic_lm3d().astype(np.float64))
    t_ref, s_ref = upstream["preprocess"].POS(lm5.transpose(), lm3d5.transpose())
    t, s = face3d.fit_scale_translation(lm5, lm3d5)
    np.testing.assert_allclose(t, t_ref.ravel(), rtol=1e-9, atol=1e-9)
    assert s == pytest.approx(float(s_ref), rel=1e-9)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_align_face_matches_upstream_pixels(upstream, seed):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    lm = _face_landmarks(rng)
    lm[:, 1] = 255 - lm[:, 1]
    lm3d5 = face3d.five_points(synthetic_lm3d().astype(np.float64))

    ref_params, ref_img, ref_lm = _upstream_align(upstream["preprocess"], rgb, lm, lm3d5)
    got = face3d.align_face(rgb, lm, lm3d5)
    assert got.image.shape == (224, 224, 3) and got.image.dtype == np.uint8
    np.testing.assert_array_equal(got.image, ref_img)
    np.testing.assert_allclose(got.landmarks, ref_lm, atol=1e-6)
    np.testing.assert_allclose(got.trans_params, ref_params.astype(np.float32), rtol=1e-6)


def test_align_face_rejects_degenerate_landmarks():
    lm3d5 = face3d.five_points(synthetic_lm3d().astype(np.float64))
    with pytest.raises(ValueError, match="degenerate"):
        face3d.align_face(np.zeros((64, 64, 3), np.uint8), np.zeros((68, 2)), lm3d5)


# --- network outputs (official layout, random weights) ---------------------------------------
@pytest.fixture(scope="module")
def nets(random_checkpoints):
    weights = load_weights(random_checkpoints.ckpt)
    ours = face3d.ReconNet().eval()
    load_strict(ours, weights["face_3drecon"], "face_3drecon")
    return ours, random_checkpoints.modules["face_3drecon"], random_checkpoints.ckpt


@pytest.mark.slow
def test_reconnet_output_matches_upstream(nets):
    ours, theirs, _ = nets
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
    assert got.shape == (2, 257)
    assert float(expected.abs().mean()) > 1e-2  # random weights give non-trivial coefficients
    assert float((got - expected).abs().max()) <= 1e-4


def _dlib_landmarks(rgb: np.ndarray) -> np.ndarray:
    import dlib  # the product's own landmark stack (dlib-bin, face_recognition_models)
    import face_recognition_models as models

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_model_location())
    boxes = detector(rgb, 1)
    assert boxes, "dlib found no face in the test portrait"
    shape = predictor(rgb, max(boxes, key=lambda r: r.area()))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


@pytest.mark.slow
def test_extract_coefficients_matches_upstream_steps_on_a_portrait(nets, upstream, tmp_path):
    """Upstream's CropAndExtract.generate steps on the same 256x256 crop and landmarks."""
    from PIL import Image

    ours, theirs, ckpt = nets
    portrait = Image.open(PORTRAIT).convert("RGB").resize((256, 256))  # the bundled portrait
    rgb = np.asarray(portrait)
    lm = _dlib_landmarks(rgb)
    lm3d5 = face3d.load_lm3d(ckpt.lm3d)

    # upstream: lm[:, -1] = H - 1 - lm[:, -1]; align_img; /255 tensor; net_recon; split_coeff.
    lm_up = lm.copy()
    lm_up[:, -1] = rgb.shape[0] - 1 - lm_up[:, -1]
    trans_params, im1, _ = _upstream_align(upstream["preprocess"], rgb, lm_up, lm3d5)
    trans_params = trans_params.astype(np.float32)
    im_t = torch.tensor(im1 / 255.0, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        full_ref = theirs(im_t).numpy()
    coeff_ref = np.concatenate(
        [full_ref[:, 80:144], full_ref[:, 224:227], full_ref[:, 254:], trans_params[2:][None]], 1
    )

    got = face3d.extract_coefficients(ours, rgb, lm, lm3d5)
    assert got.full_3dmm.shape == (1, 257) and got.coeff_3dmm.shape == (1, 73)
    assert got.full_3dmm.dtype == np.float32 and got.coeff_3dmm.dtype == np.float32
    np.testing.assert_allclose(got.full_3dmm, full_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.coeff_3dmm, coeff_ref, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got.pose, coeff_ref[0, 64:70], atol=1e-4)

    # first_coeff.mat: the variables and shapes upstream writes (and reads back).
    from scipy.io import loadmat, savemat

    path = tmp_path / "first_coeff.mat"
    face3d.write_first_coeff_mat(path, got)
    ref_path = tmp_path / "upstream.mat"
    savemat(str(ref_path), {"coeff_3dmm": np.array([coeff_ref])[:, 0], "full_3dmm": np.array([full_ref])[0]})
    ours_mat, ref_mat = loadmat(str(path)), loadmat(str(ref_path))
    for name in ("coeff_3dmm", "full_3dmm"):
        assert ours_mat[name].shape == ref_mat[name].shape
        assert ours_mat[name].dtype == ref_mat[name].dtype
        np.testing.assert_allclose(ours_mat[name], ref_mat[name], atol=1e-4)
    assert ours_mat["coeff_3dmm"].shape == (1, 73) and ours_mat["full_3dmm"].shape == (1, 257)
    # what upstream's get_facerender_data takes as the source semantics
    np.testing.assert_array_equal(ours_mat["coeff_3dmm"][:1, :70], got.coeff_70)
    back = face3d.read_first_coeff_mat(ref_path)
    np.testing.assert_allclose(back.coeff_3dmm, coeff_ref, atol=1e-6)
