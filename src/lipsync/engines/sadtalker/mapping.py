"""SadTalker's MappingNet: a 27-frame window of 3DMM coefficients -> head pose + keypoint deltas.

Attribute names follow upstream's ``facerender/modules/mapping.py`` so ``mapping_*.pth.tar``
(state dict under the key ``mapping``) loads with ``strict=True``. Defaults are upstream's
``facerender.yaml``; the 'full' checkpoint (``mapping_00109``, ``facerender_still.yaml``) takes
73 coefficients (the 70 plus 3 crop parameters) instead of 70.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Frames in one mapping window (upstream's semantic_radius 13 on each side).
WINDOW = 27


@dataclass(frozen=True)
class HeadMotion:
    """Mapping-net output for a batch: pose bin logits, translation, expression deltas."""

    yaw: torch.Tensor  # (bs, num_bins) logits over 3-degree bins
    pitch: torch.Tensor
    roll: torch.Tensor
    t: torch.Tensor  # (bs, 3)
    exp: torch.Tensor  # (bs, 3 * num_kp)


class MappingNet(nn.Module):
    def __init__(
        self,
        coeff_nc: int = 70,
        descriptor_nc: int = 1024,
        layer: int = 3,
        num_kp: int = 15,
        num_bins: int = 66,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.coeff_nc = coeff_nc
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, kernel_size=7, padding=0, bias=True))
        for i in range(layer):
            # Valid dilated convs: each trims 3 frames per side, matched by the residual's crop.
            block = nn.Sequential(
                nn.LeakyReLU(0.1),
                nn.Conv1d(descriptor_nc, descriptor_nc, kernel_size=3, padding=0, dilation=3),
            )
            setattr(self, f"encoder{i}", block)
        self.pooling = nn.AdaptiveAvgPool1d(1)
        self.output_nc = descriptor_nc
        self.fc_roll = nn.Linear(descriptor_nc, num_bins)
        self.fc_pitch = nn.Linear(descriptor_nc, num_bins)
        self.fc_yaw = nn.Linear(descriptor_nc, num_bins)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * num_kp)

    def forward(self, windows: torch.Tensor) -> HeadMotion:
        """(bs, coeff_nc, window) coefficient windows -> HeadMotion for the window centres."""
        out = self.first(windows)
        for i in range(self.layer):
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        out = self.pooling(out).flatten(1)
        return HeadMotion(
            yaw=self.fc_yaw(out),
            pitch=self.fc_pitch(out),
            roll=self.fc_roll(out),
            t=self.fc_t(out),
            exp=self.fc_exp(out),
        )
