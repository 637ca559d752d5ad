"""Audio2Pose: head-pose motion (3 angles + 3 translations) from audio, a pose style and noise.

Upstream trains a conditional VAE; inference uses only its decoder: for a block of 32 frames,
``[ref pose(6), z + class_bias[style](64), linear_audio(audio)(32 x 6)]`` -> MLP (262 -> 128 -> 192,
sigmoid) -> reshaped (32, 6) -> a small residual U-Net over that (32, 6) map -> linear(6, 6): the
pose *motion* of each frame relative to ``ref``. Sizes are upstream's ``auido2pose.yaml``
(SEQ_LEN 32, LATENT_SIZE 64, AUDIO_EMB_OUT_SIZE 6, DECODER_LAYER_SIZES [128, 192], 46 classes).

The noise ``z`` is an explicit input (upstream draws ``torch.randn`` inside ``test``), so parity can
be checked with fixed noise and a caller can keep one noise stream across chunks.

Parameter names follow the ``audio2pose.`` part of ``SadTalker_V0.0.2_*.safetensors`` (upstream's
whole ``Audio2Pose`` module). That checkpoint also holds the training-only CVAE encoder
(``netG.encoder.``) and the motion discriminator (``netD_motion.``), about half of its 11 M
parameters; they are not built here. Their keys are listed in ``checkpoint_ignored_prefixes`` and
dropped by a load-state-dict pre-hook, so ``load_state_dict(strict=True)`` on the full official
state dict succeeds and still checks every key this network uses.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .audio2exp import AUDIO_EMBEDDING, wav2lip_audio_encoder

SEQ_LEN = 32
LATENT_SIZE = 64
NUM_CLASSES = 46
AUDIO_EMB_OUT_SIZE = 6
DECODER_LAYER_SIZES = (128, 192)
POSE_DIM = 6


class AudioEncoder(nn.Module):
    """Per-frame 512-d embedding of the mel windows (same conv stack as Audio2Exp's, own weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = wav2lip_audio_encoder()

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """(B, T, 1, 80, 16) -> (B, T, 512)."""
        b, t = mel_windows.shape[:2]
        # Frame-major order like upstream's cat over T; batch norm is in eval mode, so any order works.
        flat = mel_windows.transpose(0, 1).reshape(t * b, *mel_windows.shape[2:])
        emb = self.audio_encoder(flat).reshape(t, b, -1)
        return emb.transpose(0, 1)


class ResidualConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int | tuple[int, int], padding: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1),
        )
        self.conv_skip = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    """Transposed conv that doubles the time axis only (kernel = stride = (2, 1))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(cin, cout, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUnet(nn.Module):
    """Residual U-Net over a (1, T, 6) pose map, halving/doubling T three times; sigmoid output."""

    def __init__(self, channels: int = 1, filters: tuple[int, int, int, int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(
            nn.Conv2d(channels, f0, kernel_size=3, padding=1),
            nn.BatchNorm2d(f0),
            nn.ReLU(),
            nn.Conv2d(f0, f0, kernel_size=3, padding=1),
        )
        self.input_skip = nn.Sequential(nn.Conv2d(channels, f0, kernel_size=3, padding=1))
        self.residual_conv_1 = ResidualConv(f0, f1, stride=(2, 1), padding=1)
        self.residual_conv_2 = ResidualConv(f1, f2, stride=(2, 1), padding=1)
        self.bridge = ResidualConv(f2, f3, stride=(2, 1), padding=1)
        self.upsample_1 = Upsample(f3, f3)
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, stride=1, padding=1)
        self.upsample_2 = Upsample(f2, f2)
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, stride=1, padding=1)
        self.upsample_3 = Upsample(f1, f1)
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, stride=1, padding=1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)
        x2 = self.residual_conv_1(x1)
        x3 = self.residual_conv_2(x2)
        x4 = self.bridge(x3)
        x6 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], dim=1))
        x8 = self.up_residual_conv2(torch.cat([self.upsample_2(x6), x2], dim=1))
        x10 = self.up_residual_conv3(torch.cat([self.upsample_3(x8), x1], dim=1))
        return self.output_layer(x10)


class PoseDecoder(nn.Module):
    """The CVAE decoder (upstream ``DECODER``)."""

    def __init__(self) -> None:
        super().__init__()
        self.resunet = ResUnet()
        self.MLP = nn.Sequential()
        sizes = (LATENT_SIZE + SEQ_LEN * AUDIO_EMB_OUT_SIZE + POSE_DIM, *DECODER_LAYER_SIZES)
        for i, (cin, cout) in enumerate(itertools.pairwise(sizes)):
            self.MLP.add_module(f"L{i}", nn.Linear(cin, cout))
            last = i + 2 == len(sizes)
            self.MLP.add_module("sigmoid" if last else f"A{i}", nn.Sigmoid() if last else nn.ReLU())
        self.pose_linear = nn.Linear(POSE_DIM, POSE_DIM)
        self.linear_audio = nn.Linear(AUDIO_EMBEDDING, AUDIO_EMB_OUT_SIZE)
        self.classbias = nn.Parameter(torch.zeros(NUM_CLASSES, LATENT_SIZE))

    def forward(
        self, audio_emb: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """``audio_emb`` (B, 32, 512), ``ref_pose`` (B, 6), ``class_id`` (B,) long, ``z`` (B, 64)
        -> motion (B, 32, 6)."""
        b = z.shape[0]
        audio = self.linear_audio(audio_emb).reshape(b, -1)
        x = torch.cat([ref_pose, z + self.classbias[class_id], audio], dim=-1)
        pose_map = self.MLP(x).reshape(b, 1, SEQ_LEN, -1)
        return self.pose_linear(self.resunet(pose_map).squeeze(1))


class PoseCVAE(nn.Module):
    """Holder that keeps upstream's ``netG.decoder.`` parameter prefix (the encoder is training-only)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = PoseDecoder()


def _drop_training_only_keys(
    module: Audio2Pose, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix):].startswith(module.checkpoint_ignored_prefixes):
            del state_dict[key]


class Audio2Pose(nn.Module):
    """Upstream ``Audio2Pose`` for inference: audio encoder + CVAE decoder."""

    #: Checkpoint key prefixes of training-only parts: accepted and discarded on load.
    checkpoint_ignored_prefixes: tuple[str, ...] = ("netG.encoder.", "netD_motion.")
    seq_len = SEQ_LEN
    latent_size = LATENT_SIZE
    num_classes = NUM_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = AudioEncoder()
        self.netG = PoseCVAE()
        self.register_load_state_dict_pre_hook(_drop_training_only_keys)

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """(T, 1, 80, 16) -> (T, 512) per-frame audio embeddings."""
        return self.audio_encoder(mel_windows.unsqueeze(0))[0]

    def decode(
        self, audio_emb: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Motion (B, 32, 6) relative to ``ref_pose`` (B, 6) for 32 frames of embeddings (B, 32, 512)."""
        return self.netG.decoder(audio_emb, ref_pose, class_id, z)

    def forward(
        self, mel_windows: torch.Tensor, ref_pose: torch.Tensor, class_id: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """``mel_windows`` (B, 32, 1, 80, 16) -> motion (B, 32, 6)."""
        return self.decode(self.audio_encoder(mel_windows), ref_pose, class_id, z)

    @staticmethod
    def noise_blocks(n_frames: int) -> int:
        """How many 32-frame blocks (noise vectors) ``predict_clip`` uses for ``n_frames`` frames."""
        moving = max(0, n_frames - 1)
        return moving // SEQ_LEN + (1 if moving % SEQ_LEN else 0)

    @torch.no_grad()
    def predict_clip(
        self, mel_windows: torch.Tensor, ref_pose: torch.Tensor, pose_style: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """Upstream ``Audio2Pose.test`` for one clip, with its noise given: (T, 6) pose (ref + motion).

        ``mel_windows`` (T, 1, 80, 16) for every frame; frame 0 is the reference itself (zero motion).
        Frames 1.. go in blocks of 32 with one noise row each; a last partial block of ``r`` frames
        is predicted from the last 32 frames (front-padded by repeating the first embedding if the
        clip is shorter) and its last ``r`` rows kept. ``noise`` is (noise_blocks(T), 64).
        """
        emb = self.encode_audio(mel_windows[1:])
        moving = emb.shape[0]
        blocks = self.noise_blocks(moving + 1)
        if noise.shape[0] != blocks:
            raise ValueError(f"need {blocks} noise rows for {moving + 1} frames, got {noise.shape[0]}")
        ref = ref_pose.reshape(1, POSE_DIM)
        class_id = torch.tensor([pose_style], dtype=torch.long, device=emb.device)
        parts = [torch.zeros(1, POSE_DIM, dtype=emb.dtype, device=emb.device)]
        full, rest = divmod(moving, SEQ_LEN)
        for b in range(full):
            block = emb[b * SEQ_LEN:(b + 1) * SEQ_LEN]
            parts.append(self.decode(block[None], ref, class_id, noise[b:b + 1])[0])
        if rest:
            block = emb[-SEQ_LEN:]
            if block.shape[0] < SEQ_LEN:
                block = torch.cat([block[:1].expand(SEQ_LEN - block.shape[0], -1), block], dim=0)
            parts.append(self.decode(block[None], ref, class_id, noise[full:full + 1])[0][-rest:])
        return ref + torch.cat(parts, dim=0)
