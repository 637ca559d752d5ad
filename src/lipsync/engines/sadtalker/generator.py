"""SadTalker's face-vid2vid generator: building blocks, DenseMotionNetwork, OcclusionAwareSPADEGenerator.

Inference only. Attribute names follow upstream's ``facerender/modules`` exactly so the official
``generator.*`` state dict loads with ``strict=True``; defaults are the values of upstream's
``src/config/facerender.yaml`` (identical in ``facerender_still.yaml``).

Unlike upstream, the generator is split in two halves so a renderer can cache the first:

* ``encode_source`` - everything that depends on the source image only (the 3D appearance
  feature, the compressed feature the motion network warps, its background warp);
* ``decode`` - per driving frame: sparse motions, the hourglass, mask/occlusion, the warp of the
  appearance feature and the SPADE decoder, batched over frames.

Both halves together compute what upstream's ``forward`` computes (see the parity tests); the
rewrites are algebraic (the weighted sum of sparse motions is formed without materialising
them, gaussians are separable, per-keypoint warps share one source tensor).

Precision: the source half always runs in fp32 (once per avatar). The frame half may run in
fp16 (``set_frame_dtype``) but every coordinate computation - keypoint gaussians, the motion
mask softmax, the deformation field and both ``grid_sample`` calls - stays in fp32: fp16 resolves
coordinates in [-1, 1] only to ~1e-3, a sizeable fraction of a feature cell at 512 px, which
would add noise to the warp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_Size = int | tuple[int, ...]

#: Keypoint gaussian variance used by upstream's dense motion network.
KP_VARIANCE = 0.01
#: Mask weights below this are dropped before forming the deformation (upstream does the same).
MASK_FLOOR = 1e-3


# --- coordinate helpers -----------------------------------------------------------------------
def axis_coordinates(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` positions spread over [-1, 1] end to end (the corner-aligned convention of upstream's grids)."""
    i = torch.arange(n, device=device, dtype=dtype)
    return 2 * (i / (n - 1)) - 1


def coordinate_grid(
    depth: int,
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(depth, height, width, 3) grid of (x, y, z) coordinates in [-1, 1]."""
    z = axis_coordinates(depth, device=device, dtype=dtype)
    y = axis_coordinates(height, device=device, dtype=dtype)
    x = axis_coordinates(width, device=device, dtype=dtype)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def keypoint_gaussians(
    kp: torch.Tensor, spatial: tuple[int, int, int], variance: float = KP_VARIANCE
) -> torch.Tensor:
    """(bs, K, 3) keypoints -> (bs, K, d, h, w) unnormalised gaussians exp(-|p - kp|^2 / (2 variance)).

    The 3D gaussian factorises into three 1D ones, so it is built as an outer product instead of
    from a (bs, K, d, h, w, 3) difference tensor.
    """
    d, h, w = spatial
    kp = kp.float()
    axes = [axis_coordinates(n, device=kp.device) for n in (w, h, d)]  # x, y, z
    gx, gy, gz = (
        torch.exp(-0.5 * (axis[None, None, :] - kp[..., c, None]) ** 2 / variance)
        for c, axis in enumerate(axes)
    )
    return gz[:, :, :, None, None] * gy[:, :, None, :, None] * gx[:, :, None, None, :]


def _fold_norm_into_conv(conv: nn.Module, norm: nn.Module) -> None:
    """Fold an eval-mode BatchNorm that directly follows ``conv`` into the conv's weight and bias."""
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine and norm.track_running_stats
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        new_bias = (bias - norm.running_mean) * scale + norm.bias
        conv.weight.mul_(scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(new_bias)


class _ConvNormBlock(nn.Module):
    """A block whose ``conv`` is immediately followed by batch norm ``norm`` (foldable at inference)."""

    conv: nn.Module
    norm: nn.Module

    def fold_batchnorm(self) -> None:
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            _fold_norm_into_conv(self.conv, self.norm)
            self.norm = nn.Identity()


def fold_batchnorms(module: nn.Module) -> None:
    """Fold every conv->batch-norm pair inside ``module`` (eval-mode statistics; exact up to rounding)."""
    for sub in list(module.modules()):
        if isinstance(sub, _ConvNormBlock):
            sub.fold_batchnorm()


# --- building blocks --------------------------------------------------------------------------
class DownBlock2d(_ConvNormBlock):
    """conv -> BN -> ReLU -> 2x2 average pool."""

    def __init__(
        self, in_features: int, out_features: int, kernel_size: _Size = 3, padding: _Size = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups
        )
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class DownBlock3d(_ConvNormBlock):
    """conv3d -> BN -> ReLU -> average pool over height and width (depth kept)."""

    def __init__(
        self, in_features: int, out_features: int, kernel_size: _Size = 3, padding: _Size = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups
        )
        self.norm = nn.BatchNorm3d(out_features, affine=True)
        self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.conv(x)))
        if out.is_cuda or out.dtype == torch.float32:
            return self.pool(out)
        # The CPU has no half-precision 3D pooling; pooling (1, 2, 2) is a 2D pool per depth slice.
        bs, c, d, h, w = out.shape
        return F.avg_pool2d(out.reshape(bs, c * d, h, w), 2).view(bs, c, d, h // 2, w // 2)


class UpBlock3d(_ConvNormBlock):
    """Nearest 2x upsampling of height and width -> conv3d -> BN -> ReLU."""

    def __init__(
        self, in_features: int, out_features: int, kernel_size: _Size = 3, padding: _Size = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups
        )
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2))
        return F.relu(self.norm(self.conv(x)))


class SameBlock2d(_ConvNormBlock):
    """conv -> BN -> ReLU (or LeakyReLU with its default slope), resolution kept."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int = 1,
        kernel_size: _Size = 3,
        padding: _Size = 1,
        lrelu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups
        )
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.ac = nn.LeakyReLU() if lrelu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ac(self.norm(self.conv(x)))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + conv2(relu(bn2(conv1(relu(bn1(x))))))."""

    def __init__(self, in_features: int, kernel_size: _Size = 3, padding: _Size = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv3d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm3d(in_features, affine=True)
        self.norm2 = nn.BatchNorm3d(in_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class Encoder(nn.Module):
    """Hourglass encoder: ``num_blocks`` DownBlock3d, returning every scale for the skips."""

    def __init__(
        self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256
    ) -> None:
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            c_in = in_features if i == 0 else min(max_features, block_expansion * (2**i))
            c_out = min(max_features, block_expansion * (2 ** (i + 1)))
            blocks.append(DownBlock3d(c_in, c_out, kernel_size=3, padding=1))
        self.down_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(_ConvNormBlock):
    """Hourglass decoder: UpBlock3d per scale, concatenating each skip, then conv -> BN -> ReLU."""

    def __init__(
        self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256
    ) -> None:
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            c_in = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            c_out = min(max_features, block_expansion * (2**i))
            blocks.append(UpBlock3d(c_in, c_out, kernel_size=3, padding=1))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    def __init__(
        self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256
    ) -> None:
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class SpectralNormConv2d(nn.Conv2d):
    """A Conv2d stored the way ``torch.nn.utils.spectral_norm`` stores it.

    The checkpoint holds ``weight_orig`` and the power-iteration vectors ``weight_u`` /
    ``weight_v``; at inference the effective weight is ``weight_orig / sigma`` with
    ``sigma = u . (W v)`` (no further power iterations). That weight is derived once whenever a
    state dict is loaded, instead of on every forward pass.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight = self.weight.detach().clone()
        del self.weight
        self.weight_orig = nn.Parameter(weight)
        rows = weight.shape[0]
        self.register_buffer("weight_u", F.normalize(torch.randn(rows), dim=0, eps=1e-12))
        self.register_buffer("weight_v", F.normalize(torch.randn(weight[0].numel()), dim=0, eps=1e-12))
        self.register_buffer("weight", self._normalised_weight(), persistent=False)

    def _normalised_weight(self) -> torch.Tensor:
        w = self.weight_orig.detach()
        sigma = torch.dot(self.weight_u, torch.mv(w.reshape(w.shape[0], -1), self.weight_v))
        return w / sigma

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        with torch.no_grad():
            self.weight = self._normalised_weight()


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: instance-normalise x, then scale/shift from the segmap."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128) -> None:
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU(inplace=True)
        )
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        # Ordered for the smallest peak memory (at 512 px these maps are the largest tensors of a
        # frame and bound the batch that fits): the upsampled segmap is dropped before the
        # normalised copy of x exists, and the modulation maps are applied in place one at a time.
        if segmap.shape[2:] != x.shape[2:]:
            segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        del segmap
        normalized = self.param_free_norm(x)
        normalized.mul_(self.mlp_gamma(actv).add_(1))  # normalized * (1 + gamma) + beta
        return normalized.add_(self.mlp_beta(actv))


class SPADEResnetBlock(nn.Module):
    """SPADE residual block with spectral-normalised convs and a learned shortcut when widths differ."""

    def __init__(self, fin: int, fout: int, label_nc: int, dilation: int = 1, hidden: int = 128) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = SpectralNormConv2d(fin, fmiddle, kernel_size=3, padding=dilation, dilation=dilation)
        self.conv_1 = SpectralNormConv2d(fmiddle, fout, kernel_size=3, padding=dilation, dilation=dilation)
        if self.learned_shortcut:
            self.conv_s = SpectralNormConv2d(fin, fout, kernel_size=1, bias=False)
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return dx.add_(shortcut)


class SPADEDecoder(nn.Module):
    """Six SPADE blocks at the feature resolution, then two 2x upsampling SPADE blocks to the image."""

    def __init__(
        self, in_channels: int = 256, out_channels: int = 64, label_nc: int = 256, hidden: int = 128
    ) -> None:
        super().__init__()
        ic, oc = in_channels, out_channels
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        for i in range(6):
            setattr(self, f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, label_nc, hidden=hidden))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, label_nc, hidden=hidden)
        self.up_1 = SPADEResnetBlock(ic, oc, label_nc, hidden=hidden)
        self.conv_img = nn.Conv2d(oc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, feature: torch.Tensor, upsample_slice: int | None = None) -> torch.Tensor:
        """(b, C, h, w) feature -> (b, 3, 4h, 4w) image in [0, 1].

        ``upsample_slice`` runs the two upsampling blocks ``upsample_slice`` frames at a time. They
        hold most of a frame's activations (at 512 px ~0.5 GB per frame in fp16, against ~0.1 GB
        for everything before them), so slicing them caps a batch's peak memory while the
        middle blocks still run batched. Every op is per frame (instance norm included), so the
        result does not depend on the slice.
        """
        seg = feature
        x = self.fc(feature)
        for i in range(6):
            x = getattr(self, f"G_middle_{i}")(x, seg)
        step = x.shape[0] if upsample_slice is None else max(1, upsample_slice)
        if step >= x.shape[0]:
            return self._upsample(x, seg)
        return torch.cat([self._upsample(x[i : i + step], seg[i : i + step]) for i in range(0, x.shape[0], step)])

    def _upsample(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x = self.up_0(self.up(x), seg)
        x = self.up_1(self.up(x), seg)
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.sigmoid(x)


# --- dense motion -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MotionSource:
    """Source-only inputs of the dense motion network, computed once per avatar (fp32)."""

    feature: torch.Tensor  # (1, compress, d, h, w): the compressed appearance feature
    background: torch.Tensor  # (1, compress, d, h, w): that feature sampled on the identity grid
    identity: torch.Tensor  # (d, h, w, 3) coordinate grid


@dataclass(frozen=True)
class DenseMotion:
    deformation: torch.Tensor  # (bs, d, h, w, 3) fp32 sampling grid into the source feature
    occlusion_map: torch.Tensor | None  # (bs, 1, h, w)
    mask: torch.Tensor  # (bs, num_kp + 1, d, h, w) softmax weights (before the MASK_FLOOR cut)


class DenseMotionNetwork(nn.Module):
    """Dense 3D motion (weighted sparse keypoint translations) plus an occlusion map."""

    def __init__(
        self,
        block_expansion: int = 32,
        num_blocks: int = 5,
        max_features: int = 1024,
        num_kp: int = 15,
        feature_channel: int = 32,
        reshape_depth: int = 16,
        compress: int = 4,
        estimate_occlusion_map: bool = True,
    ) -> None:
        super().__init__()
        self.hourglass = Hourglass(
            block_expansion=block_expansion,
            in_features=(num_kp + 1) * (compress + 1),
            max_features=max_features,
            num_blocks=num_blocks,
        )
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(
                self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3
            )
        else:
            self.occlusion = None
        self.num_kp = num_kp
        self.compress_channels = compress
        self.channels_last = False  # frame tensors in channels-last layout (set by the generator)

    # Source half -------------------------------------------------------------------------------
    def prepare_source(self, feature_3d: torch.Tensor) -> MotionSource:
        """Compress the (1, C, d, h, w) appearance feature and warp it by the identity motion."""
        feature = F.relu(self.norm(self.compress(feature_3d))).float()
        _, _, d, h, w = feature.shape
        identity = coordinate_grid(d, h, w, device=feature.device)
        background = F.grid_sample(feature, identity[None], align_corners=False)
        return MotionSource(feature=feature, background=background, identity=identity)

    # Frame half --------------------------------------------------------------------------------
    def motion(
        self,
        source: MotionSource,
        kp_source: torch.Tensor,
        kp_driving: torch.Tensor,
        source_gaussians: torch.Tensor | None = None,
    ) -> DenseMotion:
        """Dense motion for ``bs`` driving keypoint sets (bs, K, 3) against the source's (1|bs, K, 3)."""
        frame_dtype = self.mask.weight.dtype
        kp_source = kp_source.float()
        kp_driving = kp_driving.float()
        bs, k = kp_driving.shape[:2]
        _, c, d, h, w = source.feature.shape
        # Without jacobians each sparse motion is the identity grid shifted by (source - driving).
        shift = (kp_source - kp_driving).expand(bs, k, 3)

        # Every keypoint's warp reads the same source feature, so the bs*K grids are stacked along
        # depth and sampled in one call instead of repeating the feature bs*K times.
        grids = source.identity[None, None] + shift[:, :, None, None, None, :]  # (bs, K, d, h, w, 3)
        warped = F.grid_sample(source.feature, grids.reshape(1, bs * k * d, h, w, 3), align_corners=False)
        del grids
        warped = warped.view(c, bs, k, d, h, w)

        if source_gaussians is None:
            source_gaussians = keypoint_gaussians(kp_source, (d, h, w))
        heat = keypoint_gaussians(kp_driving, (d, h, w)).sub_(source_gaussians)

        # Hourglass input: per keypoint group [heatmap, warped feature]; group 0 is the background.
        x = torch.empty((bs, k + 1, c + 1, d, h, w), dtype=frame_dtype, device=warped.device)
        x[:, 0, 0] = 0
        x[:, 0, 1:] = source.background[0]
        x[:, 1:, 0] = heat
        x[:, 1:, 1:] = warped.permute(1, 2, 0, 3, 4, 5)
        del warped, heat
        x = x.view(bs, (k + 1) * (c + 1), d, h, w)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        prediction = self.hourglass(x)
        del x

        mask = torch.softmax(self.mask(prediction).float(), dim=1)  # (bs, K+1, d, h, w)
        weights = mask.masked_fill(mask < MASK_FLOOR, 0.0)
        # deformation = sum_k weights_k * (identity + shift_k), shift_0 = 0, without building the
        # (bs, K+1, d, h, w, 3) stack of sparse motions.
        deformation = torch.bmm(weights[:, 1:].reshape(bs, k, d * h * w).transpose(1, 2), shift)
        deformation = deformation.view(bs, d, h, w, 3)
        deformation += source.identity[None] * weights.sum(dim=1)[..., None]
        del weights

        occlusion_map = None
        if self.occlusion is not None:
            occlusion_map = torch.sigmoid(self.occlusion(prediction.reshape(bs, -1, h, w)))
        return DenseMotion(deformation=deformation, occlusion_map=occlusion_map, mask=mask)

    def forward(
        self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor
    ) -> DenseMotion:
        """Upstream's call: uncompressed (1, C, d, h, w) feature and keypoint tensors."""
        if feature.shape[0] != 1:
            raise ValueError("DenseMotionNetwork.forward takes one source feature (batch of 1)")
        return self.motion(self.prepare_source(feature), kp_source, kp_driving)


# --- generator --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorSource:
    """What the generator needs from the source image, computed once per avatar (fp32)."""

    feature_3d: torch.Tensor  # (1, reshape_channel, reshape_depth, h, w)
    motion: MotionSource


class OcclusionAwareSPADEGenerator(nn.Module):
    """face-vid2vid generator with a SPADE decoder, as SadTalker's renderer uses it."""

    def __init__(
        self,
        image_channel: int = 3,
        feature_channel: int = 32,
        num_kp: int = 15,
        block_expansion: int = 64,
        max_features: int = 512,
        num_down_blocks: int = 2,
        reshape_channel: int = 32,
        reshape_depth: int = 16,
        num_resblocks: int = 6,
        estimate_occlusion_map: bool = True,
        dense_motion_params: dict | None = None,
        estimate_jacobian: bool = False,
        decoder_params: dict | None = None,
    ) -> None:
        super().__init__()
        if estimate_jacobian:
            raise ValueError("jacobian-driven motion is not part of SadTalker's renderer")
        if dense_motion_params is None:
            dense_motion_params = {
                "block_expansion": 32,
                "max_features": 1024,
                "num_blocks": 5,
                "reshape_depth": 16,
                "compress": 4,
            }
        self.dense_motion_network = DenseMotionNetwork(
            num_kp=num_kp,
            feature_channel=feature_channel,
            estimate_occlusion_map=estimate_occlusion_map,
            **dense_motion_params,
        )
        self.first = SameBlock2d(image_channel, block_expansion, kernel_size=(3, 3), padding=(1, 1))
        blocks = []
        for i in range(num_down_blocks):
            c_in = min(max_features, block_expansion * (2**i))
            c_out = min(max_features, block_expansion * (2 ** (i + 1)))
            blocks.append(DownBlock2d(c_in, c_out, kernel_size=(3, 3), padding=(1, 1)))
        self.down_blocks = nn.ModuleList(blocks)
        self.second = nn.Conv2d(c_out, max_features, kernel_size=1, stride=1)
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel, kernel_size=3, padding=1))
        width = block_expansion * (2**num_down_blocks)
        self.third = SameBlock2d(max_features, width, kernel_size=(3, 3), padding=(1, 1), lrelu=True)
        self.fourth = nn.Conv2d(width, width, kernel_size=1, stride=1)
        self.estimate_occlusion_map = estimate_occlusion_map
        self.image_channel = image_channel
        self.channels_last = False
        #: Frames per pass through the decoder's two upsampling blocks (None: the whole batch).
        self.upsample_slice: int | None = None
        # Upstream hard-codes the decoder for 256 input channels, which is this width in its config.
        self.decoder = SPADEDecoder(in_channels=width, label_nc=width, **(decoder_params or {}))

    # Modules that run once per driving frame (may be switched to fp16); the rest run per avatar.
    def frame_modules(self) -> list[nn.Module]:
        dm = self.dense_motion_network
        mods: list[nn.Module] = [dm.hourglass, dm.mask, self.third, self.fourth, self.decoder]
        if dm.occlusion is not None:
            mods.append(dm.occlusion)
        return mods

    def set_frame_dtype(self, dtype: torch.dtype, *, channels_last: bool = False) -> None:
        """Cast the per-frame modules to ``dtype`` (source half and motion math stay fp32).

        ``channels_last`` also switches their conv weights and activations to the channels-last
        layouts that tensor-core convolutions prefer.
        """
        layouts = {nn.Conv3d: torch.channels_last_3d, nn.Conv2d: torch.channels_last}
        for m in self.frame_modules():
            m.to(dtype=dtype)
            for sub in m.modules():
                for kind, layout in layouts.items():
                    if isinstance(sub, kind):
                        sub.to(memory_format=layout if channels_last else torch.contiguous_format)
        self.channels_last = channels_last
        self.dense_motion_network.channels_last = channels_last

    @property
    def frame_dtype(self) -> torch.dtype:
        return self.fourth.weight.dtype

    def encode_source(self, source_image: torch.Tensor) -> GeneratorSource:
        """(1, 3, S, S) image in [0, 1] -> the cached appearance feature and motion-net inputs."""
        if source_image.shape[0] != 1:
            raise ValueError("encode_source takes one source image (batch of 1)")
        x = source_image.to(self.first.conv.weight.dtype)
        out = self.first(x)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        _, _, h, w = out.shape
        feature_3d = self.resblocks_3d(out.view(1, self.reshape_channel, self.reshape_depth, h, w)).float()
        return GeneratorSource(
            feature_3d=feature_3d, motion=self.dense_motion_network.prepare_source(feature_3d)
        )

    def decode(
        self,
        source: GeneratorSource,
        kp_source: torch.Tensor,
        kp_driving: torch.Tensor,
        source_gaussians: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DenseMotion]:
        """Frames for ``bs`` driving keypoint sets: (bs, 3, S, S) in [0, 1] (frame dtype) and the motion."""
        motion = self.dense_motion_network.motion(source.motion, kp_source, kp_driving, source_gaussians)
        bs, d, h, w, _ = motion.deformation.shape
        c = source.feature_3d.shape[1]
        # One grid_sample for the whole batch: the bs deformation fields are stacked along depth.
        warped = F.grid_sample(
            source.feature_3d, motion.deformation.view(1, bs * d, h, w, 3), align_corners=False
        )
        warped = warped.view(c, bs, d, h, w).transpose(0, 1).reshape(bs, c * d, h, w)
        out = warped.to(self.frame_dtype)
        del warped
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        out = self.fourth(self.third(out))
        if motion.occlusion_map is not None:
            occlusion = motion.occlusion_map
            if occlusion.shape[2:] != out.shape[2:]:
                occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear")
            out = out * occlusion.to(out.dtype)
        return self.decoder(out, self.upsample_slice), motion

    def forward(self, source_image: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> dict:
        """Upstream's call (keypoint tensors instead of dicts): {'prediction', 'mask', 'occlusion_map'}."""
        prediction, motion = self.decode(self.encode_source(source_image), kp_source, kp_driving)
        out = {"prediction": prediction, "mask": motion.mask}
        if motion.occlusion_map is not None:
            out["occlusion_map"] = motion.occlusion_map
        return out
