"""Canonical 3D keypoints (KPDetector) and their transformation by head pose and expression.

Attribute names follow upstream's ``facerender/modules/keypoint_detector.py`` so the official
``kp_extractor.*`` state dict loads with ``strict=True``; defaults are upstream's
``facerender.yaml`` (no jacobians: ``estimate_jacobian: False``).

``transform_keypoints`` reproduces upstream's ``keypoint_transformation`` as used by
``make_animation``: pose bins -> degrees (66 bins of 3 degrees from -99), rotation
R = Rx(pitch) Ry(yaw) Rz(roll) with upstream's 3.14 for pi, only the vertical translation kept,
plus the expression deltas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .generator import DownBlock2d, UpBlock3d, coordinate_grid
from .mapping import HeadMotion

#: Upstream converts degrees to radians with 3.14, not pi; kept so poses match its renders.
UPSTREAM_PI = 3.14
BIN_DEGREES = 3.0
FIRST_BIN_DEGREES = -99.0


class KPHourglass(nn.Module):
    """2D encoder, a 1x1 conv whose channels are reshaped into depth, then a 3D decoder."""

    def __init__(
        self,
        block_expansion: int,
        in_features: int,
        reshape_features: int,
        reshape_depth: int,
        num_blocks: int = 3,
        max_features: int = 256,
    ) -> None:
        super().__init__()
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            c_in = in_features if i == 0 else min(max_features, block_expansion * (2**i))
            c_out = min(max_features, block_expansion * (2 ** (i + 1)))
            self.down_blocks.add_module(f"down{i}", DownBlock2d(c_in, c_out, kernel_size=3, padding=1))
        c_in = min(max_features, block_expansion * (2**num_blocks))
        self.conv = nn.Conv2d(c_in, reshape_features, kernel_size=1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            c_in = min(max_features, block_expansion * (2 ** (num_blocks - i)))
            c_out = min(max_features, block_expansion * (2 ** (num_blocks - i - 1)))
            self.up_blocks.add_module(f"up{i}", UpBlock3d(c_in, c_out, kernel_size=3, padding=1))
        self.reshape_depth = reshape_depth
        self.out_filters = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        bs, c, h, w = out.shape
        return self.up_blocks(out.view(bs, c // self.reshape_depth, self.reshape_depth, h, w))


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then strided subsampling by ``1 / scale`` (the kernel is part of the checkpoint)."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        self.ka = size // 2
        self.kb = self.ka - 1 if size % 2 == 0 else self.ka
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.groups = channels
        self.scale = scale
        self.int_inv_scale = int(1 / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight.to(out.dtype), groups=self.groups)
        return out[:, :, :: self.int_inv_scale, :: self.int_inv_scale]


class KPDetector(nn.Module):
    """Canonical keypoints: soft-argmax (temperature ``temperature``) of 3D heatmaps."""

    def __init__(
        self,
        block_expansion: int = 32,
        feature_channel: int = 32,
        num_kp: int = 15,
        image_channel: int = 3,
        max_features: int = 1024,
        reshape_channel: int = 16384,
        reshape_depth: int = 16,
        num_blocks: int = 5,
        temperature: float = 0.1,
        estimate_jacobian: bool = False,
        scale_factor: float = 0.25,
        single_jacobian_map: bool = False,
    ) -> None:
        super().__init__()
        if estimate_jacobian:
            raise ValueError("jacobian-driven motion is not part of SadTalker's renderer")
        self.predictor = KPHourglass(
            block_expansion,
            in_features=image_channel,
            max_features=max_features,
            reshape_features=reshape_channel,
            reshape_depth=reshape_depth,
            num_blocks=num_blocks,
        )
        self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
        self.jacobian = None
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(image_channel, scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(bs, 3, S, S) image in [0, 1] -> (bs, num_kp, 3) canonical keypoints (x, y, z) in [-1, 1]."""
        x = self.down(image) if self.scale_factor != 1 else image
        heatmap = self.kp(self.predictor(x)).float()
        bs, k, d, h, w = heatmap.shape
        heatmap = torch.softmax(heatmap.view(bs, k, -1) / self.temperature, dim=2)
        grid = coordinate_grid(d, h, w, device=heatmap.device).view(-1, 3)
        return heatmap @ grid


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """(bs, bins) pose logits -> (bs,) expected angle in degrees (bins of 3 degrees from -99)."""
    prob = torch.softmax(logits.float(), dim=1)
    bins = torch.arange(logits.shape[1], device=logits.device, dtype=prob.dtype)
    return (prob * bins).sum(dim=1) * BIN_DEGREES + FIRST_BIN_DEGREES


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(bs,) angles in degrees -> (bs, 3, 3) rotation Rx(pitch) @ Ry(yaw) @ Rz(roll)."""
    to_rad = UPSTREAM_PI / 180.0
    p, y, r = pitch * to_rad, yaw * to_rad, roll * to_rad
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    cp, sp = torch.cos(p), torch.sin(p)
    cy, sy = torch.cos(y), torch.sin(y)
    cr, sr = torch.cos(r), torch.sin(r)
    # fmt: off
    rx = torch.stack([one, zero, zero,
                      zero, cp, -sp,
                      zero, sp, cp], dim=1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy,
                      zero, one, zero,
                      -sy, zero, cy], dim=1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, zero,
                      sr, cr, zero,
                      zero, zero, one], dim=1).view(-1, 3, 3)
    # fmt: on
    return rx @ ry @ rz


def transform_keypoints(
    kp_canonical: torch.Tensor,
    motion: HeadMotion,
    *,
    with_expression: bool = True,
    yaw: torch.Tensor | None = None,
    pitch: torch.Tensor | None = None,
    roll: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pose and expression applied to canonical keypoints: (1|bs, K, 3) -> (bs, K, 3), fp32.

    ``yaw``/``pitch``/``roll`` (degrees, (bs,)) override the mapped angles, like upstream's
    ``*_c_seq`` camera controls.
    """
    kp = kp_canonical.float()
    yaw = headpose_to_degrees(motion.yaw) if yaw is None else yaw.float()
    pitch = headpose_to_degrees(motion.pitch) if pitch is None else pitch.float()
    roll = headpose_to_degrees(motion.roll) if roll is None else roll.float()
    rot = rotation_matrix(yaw, pitch, roll)  # (bs, 3, 3)
    rotated = torch.matmul(kp, rot.transpose(1, 2))  # kp_k -> R kp_k
    # Upstream keeps only the vertical translation (x and z are zeroed).
    t = motion.t.float()
    shift = torch.stack([torch.zeros_like(t[:, 1]), t[:, 1], torch.zeros_like(t[:, 1])], dim=1)
    out = rotated + shift[:, None, :]
    if with_expression:
        out = out + motion.exp.float().view(motion.exp.shape[0], -1, 3)
    return out
