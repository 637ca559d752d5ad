"""Audio2Exp: per-frame 64-d 3DMM expression from a mel window, the source's expression and a blink ratio.

Upstream's network is ``SimpleWrapperV2``: the Wav2Lip audio encoder (a conv stack that turns one
(1, 80, 16) mel window into a 512-d vector) followed by one linear layer over
``[audio(512), reference expression(64), blink ratio(1)]``. Its output is the absolute expression
coefficients (the residual ``+ ref`` is commented out upstream). Parameter names here are the ones
under ``audio2exp.`` in ``SadTalker_V0.0.2_*.safetensors`` (and in ``auido2exp_00300-model.pth``
``['model']``), so the checkpoint loads with ``strict=True``.

Upstream's wrapper (``Audio2Exp.test``) runs the frames in groups of 10; batch norm is in eval
mode and every frame is independent, so ``predict`` runs a whole chunk in one batch instead.
"""
from __future__ import annotations

import torch
from torch import nn

#: (in, out, kernel, stride, padding, residual) of each encoder block, upstream's order.
_ENCODER_LAYOUT: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
    (1, 32, 3, 1, 1, False),
    (32, 32, 3, 1, 1, True),
    (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, 1, 1, True),
    (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False),
    (128, 128, 3, 1, 1, True),
    (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False),
    (512, 512, 1, 1, 0, False),
)
AUDIO_EMBEDDING = 512
EXP_DIM = 64


class ConvBlock(nn.Module):
    """Conv + batch norm (+ identity) + ReLU; ``conv_block.0`` / ``conv_block.1`` as upstream names them."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int | tuple[int, int], padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return torch.relu(out)


def wav2lip_audio_encoder() -> nn.Sequential:
    """Wav2Lip's audio encoder: (N, 1, 80, 16) mel windows -> (N, 512, 1, 1)."""
    return nn.Sequential(*(ConvBlock(*spec) for spec in _ENCODER_LAYOUT))


class Audio2Exp(nn.Module):
    """Upstream ``SimpleWrapperV2`` (the ``audio2exp`` sub-network)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = wav2lip_audio_encoder()
        self.mapping1 = nn.Linear(AUDIO_EMBEDDING + EXP_DIM + 1, EXP_DIM)

    def forward(self, mels: torch.Tensor, ref: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """Upstream's signature: ``mels`` (B*T, 1, 80, 16), ``ref`` (B, T, 64), ``ratio`` (B, T[, 1])
        -> (B, T, 64)."""
        audio = self.audio_encoder(mels).reshape(mels.shape[0], -1)
        features = torch.cat([audio, ref.reshape(mels.shape[0], -1), ratio.reshape(mels.shape[0], -1)], dim=1)
        return self.mapping1(features).reshape(ref.shape[0], ref.shape[1], -1)

    @torch.no_grad()
    def predict(
        self, mel_windows: torch.Tensor, ref_exp: torch.Tensor, blink_ratio: torch.Tensor
    ) -> torch.Tensor:
        """One clip's frames at once: ``mel_windows`` (T, 1, 80, 16), ``ref_exp`` (64,) or (T, 64),
        ``blink_ratio`` (T,) -> (T, 64) expression coefficients."""
        n = mel_windows.shape[0]
        ref = ref_exp.reshape(-1, EXP_DIM).expand(n, EXP_DIM)
        return self.forward(mel_windows, ref.unsqueeze(0), blink_ratio.reshape(1, n, 1))[0]
