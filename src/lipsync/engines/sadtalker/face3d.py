"""3DMM coefficients of the avatar: Deep3DFaceRecon's ResNet-50 regressor as SadTalker uses it.

The avatar crop (resized to the checkpoint size) and its 68 dlib landmarks are aligned to the
224x224 frame the network was trained on -- scale and translation from a least-squares fit of
five landmarks to the 3D template ``similarity_Lm3D_all.mat`` (upstream's ``align_img``) -- and
the net regresses 257 coefficients: identity 80, expression 64, texture 80, angles 3, lighting
27, translation 3. SadTalker keeps ``exp + angles + trans`` plus the alignment's scale and
translation as ``coeff_3dmm`` (73 values), the source state for motion and rendering, cached as
``first_coeff.mat`` like upstream's per-image ``.mat``.

Parameter names match the ``face_3drecon.`` part of the official checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from torch import nn

from ...errors import CheckpointError
from ...fsutil import atomic_write

#: Slices of the 257-vector (Deep3DFaceRecon's order).
ID_SLICE = slice(0, 80)
EXP_SLICE = slice(80, 144)
TEX_SLICE = slice(144, 224)
ANGLE_SLICE = slice(224, 227)
GAMMA_SLICE = slice(227, 254)
TRANS_SLICE = slice(254, 257)

ALIGN_SIZE = 224
#: Upstream's ``rescale_factor``: pixels per template unit in the 224 frame.
ALIGN_RESCALE = 102.0
#: 1-based dlib indices that give the five alignment points: nose tip, eye corners, mouth corners.
_FIVE_POINT_IDX = np.array([31, 37, 40, 43, 46, 49, 55]) - 1


# --- network --------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision's parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Backbone(nn.Module):
    """ResNet-50 up to global average pooling (no classifier): (B, 3, H, W) -> (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer, inplanes = self._make_layer(inplanes, planes, blocks, stride)
            setattr(self, f"layer{i}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [Bottleneck(inplanes, planes, stride, downsample)]
        layers += [Bottleneck(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers), out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """Deep3DFaceRecon's coefficient regressor: (B, 3, 224, 224) RGB in [0, 1] -> (B, 257)."""

    #: Output widths of the seven 1x1 heads: id, exp, tex, angle, gamma, (tx, ty), tz.
    HEADS: tuple[int, ...] = (80, 64, 80, 3, 27, 2, 1)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, n, kernel_size=1, bias=True) for n in self.HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return torch.cat([head(features) for head in self.final_layers], dim=1).flatten(1)


# --- landmark template and alignment --------------------------------------------------------
def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """The 5 alignment points from 68: eye centres (left, right), nose tip, mouth corners."""
    lm = np.asarray(landmarks68)
    idx = _FIVE_POINT_IDX
    pts = np.stack(
        [lm[idx[0]], lm[idx[[1, 2]]].mean(0), lm[idx[[3, 4]]].mean(0), lm[idx[5]], lm[idx[6]]], axis=0
    )
    return pts[[1, 2, 0, 3, 4]]


def load_lm3d(path: Path) -> np.ndarray:
    """The 5-point 3D template (5, 3) from ``similarity_Lm3D_all.mat`` (variable ``lm``, 68x3)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        lm = np.asarray(loadmat(str(path))["lm"], dtype=np.float64)
    except FileNotFoundError:
        raise CheckpointError(f"3D landmark template {path} not found", path=str(path)) from None
    except Exception as e:  # noqa: BLE001 - not a .mat, no 'lm' variable, truncated
        raise CheckpointError(
            f"cannot read the 3D landmark template {path}: {type(e).__name__}: {e}", path=str(path)
        ) from None
    if lm.shape != (68, 3) or not np.all(np.isfinite(lm)):
        raise CheckpointError(f"3D landmark template {path} holds {lm.shape}, expected 68x3", path=str(path))
    return five_points(lm)


def fit_scale_translation(lm5_image: np.ndarray, lm5_template: np.ndarray) -> tuple[np.ndarray, float]:
    """Weak-perspective fit image ~ s * R[:2] @ template + t; returns (t (2,), s).

    Least squares over an unconstrained 2x3 projection plus translation (upstream's ``POS``);
    the scale is the mean row norm of the projection.
    """
    xp = np.asarray(lm5_image, dtype=np.float64)
    x = np.asarray(lm5_template, dtype=np.float64)
    n = xp.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = x
    a[0::2, 3] = 1.0
    a[1::2, 4:7] = x
    a[1::2, 7] = 1.0
    b = xp.reshape(-1)
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2.0
    return np.array([k[3], k[7]]), float(s)


@dataclass(frozen=True)
class Alignment:
    """The avatar mapped into the network's 224x224 frame."""

    image: np.ndarray  # (224, 224, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) in the aligned frame, y up (as upstream returns them)
    trans_params: np.ndarray  # (5,) float32: source width, height, scale, tx, ty


def align_face(
    rgb: np.ndarray,
    landmarks68_yup: np.ndarray,
    lm3d_std: np.ndarray,
    *,
    target_size: int = ALIGN_SIZE,
    rescale_factor: float = ALIGN_RESCALE,
) -> Alignment:
    """Scale and crop ``rgb`` so the face sits where the template puts it.

    ``landmarks68_yup`` are image landmarks with y measured upwards (y' = H - 1 - y), as upstream
    feeds them. Resampling is PIL bicubic like upstream, so coefficients match the original's.
    """
    h0, w0 = rgb.shape[:2]
    lm = np.asarray(landmarks68_yup, dtype=np.float64)
    lm5 = lm if lm.shape[0] == 5 else five_points(lm)
    t, s_fit = fit_scale_translation(lm5, lm3d_std)
    if not np.isfinite(s_fit) or s_fit <= 0:
        raise ValueError("degenerate landmarks: cannot fit the 3D face template")
    s = rescale_factor / s_fit
    # Integer truncation exactly as upstream (numpy int32 casts), so crops land on the same pixel.
    w = int(np.int32(w0 * s))
    h = int(np.int32(h0 * s))
    left = int(np.int32(w / 2 - target_size / 2 + (t[0] - w0 / 2) * s))
    up = int(np.int32(h / 2 - target_size / 2 + (h0 / 2 - t[1]) * s))
    resized = PILImage.fromarray(np.ascontiguousarray(rgb)).resize((w, h), resample=PILImage.BICUBIC)
    # PIL pads out-of-image areas with black, which is what the network saw in training.
    crop = resized.crop((left, up, left + target_size, up + target_size))

    lm_new = np.stack([lm[:, 0] - t[0] + w0 / 2, lm[:, 1] - t[1] + h0 / 2], axis=1) * s
    lm_new = lm_new - np.array([w / 2 - target_size / 2, h / 2 - target_size / 2])
    trans_params = np.array([w0, h0, s, t[0], t[1]], dtype=np.float32)
    return Alignment(image=np.asarray(crop), landmarks=lm_new, trans_params=trans_params)


# --- coefficients ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceCoefficients:
    """The avatar's 3DMM state.

    ``full_3dmm`` (1, 257): the network's raw output. ``coeff_3dmm`` (1, 73): expression (64),
    angles (3), translation (3), then the alignment's scale, tx, ty -- upstream's layout.
    """

    full_3dmm: np.ndarray
    coeff_3dmm: np.ndarray

    def __post_init__(self) -> None:
        full = np.array(self.full_3dmm, dtype=np.float32).reshape(1, -1)
        coeff = np.array(self.coeff_3dmm, dtype=np.float32).reshape(1, -1)
        if full.shape != (1, 257) or coeff.shape != (1, 73):
            raise ValueError(f"3DMM coefficients must be 1x257 and 1x73, got {full.shape} and {coeff.shape}")
        full.flags.writeable = False
        coeff.flags.writeable = False
        object.__setattr__(self, "full_3dmm", full)
        object.__setattr__(self, "coeff_3dmm", coeff)

    @property
    def exp(self) -> np.ndarray:
        """(64,) expression."""
        return self.coeff_3dmm[0, :64]

    @property
    def pose(self) -> np.ndarray:
        """(6,) head pose: angles (3) + translation (3)."""
        return self.coeff_3dmm[0, 64:70]

    @property
    def coeff_70(self) -> np.ndarray:
        """(1, 70): what the 'crop' renderer and the motion nets take as the source."""
        return self.coeff_3dmm[:, :70]


def coefficients_from_output(full_3dmm: np.ndarray, trans_params: np.ndarray) -> FaceCoefficients:
    full = np.asarray(full_3dmm, dtype=np.float32).reshape(1, 257)
    coeff = np.concatenate(
        [full[:, EXP_SLICE], full[:, ANGLE_SLICE], full[:, TRANS_SLICE],
         np.asarray(trans_params, dtype=np.float32)[None, 2:5]],
        axis=1,
    )
    return FaceCoefficients(full_3dmm=full, coeff_3dmm=coeff)


def extract_coefficients(
    net: ReconNet,
    rgb: np.ndarray,
    landmarks68: np.ndarray,
    lm3d_std: np.ndarray,
    *,
    device: str | torch.device = "cpu",
) -> FaceCoefficients:
    """3DMM coefficients of the face in ``rgb`` (H, W, 3 uint8) with dlib ``landmarks68`` (pixels).

    Always fp32: the coefficients drive every later stage and the net runs once per avatar.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    lm = np.array(landmarks68, dtype=np.float64).reshape(-1, 2)
    if lm.shape[0] != 68 or not np.all(np.isfinite(lm)):
        raise ValueError(f"expected 68 finite landmarks, got {lm.shape}")
    lm[:, 1] = rgb.shape[0] - 1 - lm[:, 1]  # the template's y axis points up
    aligned = align_face(rgb, lm, lm3d_std)
    x = torch.from_numpy(aligned.image.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    param = next(net.parameters())
    with torch.inference_mode():
        full = net(x.to(device=param.device, dtype=param.dtype)).float().cpu().numpy()
    return coefficients_from_output(full, aligned.trans_params)


# --- first_coeff.mat ------------------------------------------------------------------------
def write_first_coeff_mat(path: Path, coeffs: FaceCoefficients) -> None:
    """Save as upstream does (``coeff_3dmm`` 1x73, ``full_3dmm`` 1x257, single precision), atomically."""
    from scipy.io import savemat

    atomic_write(Path(path), lambda tmp: savemat(tmp, {"coeff_3dmm": coeffs.coeff_3dmm,
                                                       "full_3dmm": coeffs.full_3dmm}))


def read_first_coeff_mat(path: Path) -> FaceCoefficients:
    """Read a ``first_coeff.mat`` (ours or upstream's). ValueError if incomplete or malformed."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        full = np.asarray(mat["full_3dmm"], dtype=np.float32)
        coeff = np.asarray(mat["coeff_3dmm"], dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - missing, truncated (scipy's MatReadError), wrong variables
        raise ValueError(f"cannot read 3DMM coefficients from {path}: {type(e).__name__}: {e}") from None
    # Upstream stores one row per video frame; an image source has exactly one, the first is used.
    coeffs = FaceCoefficients(full_3dmm=full[:1], coeff_3dmm=coeff[:1])
    if not (np.all(np.isfinite(coeffs.full_3dmm)) and np.all(np.isfinite(coeffs.coeff_3dmm))):
        raise ValueError(f"3DMM coefficients in {path} are not finite")
    return coeffs
