"""SadTalker's face renderer (AnimateFromCoeff), batched and with per-avatar caching.

``FaceRenderer`` bundles the keypoint detector, the mapping net and the generator. Per avatar,
``prepare_source`` computes everything that depends on the portrait only (canonical and source
keypoints, the generator's appearance feature and the motion network's source inputs); per
request, ``render`` turns a (n, 70) coefficient sequence into frames in batches.

What it computes is upstream's ``make_animation`` (checked by the parity tests): each frame's
mapping-net input is the 27-frame window of coefficients around it, edge-padded at the clip's
ends (``transform_semantic_target``); the source's is its own coefficients repeated 27 times.
``render`` takes extra context rows before/after the rows it renders so a caller working in
chunks gets exactly the windows a whole-clip render would use.

Precision: the keypoint detector, mapping net and keypoint math always run in fp32; on CUDA with
``fp16`` the generator's per-frame half runs in half precision (upstream measured half precision
on the generator >50 % faster, while half precision on the small coefficient networks flattened
head and lip motion). On the CPU everything is fp32. ``to_runtime`` lists the speed switches and
what each measured on an H200.

``make_paste_target`` / ``paste_frames`` / ``paste_back`` put rendered crops back into the
original portrait ('full' output) with a feathered alpha blend computed on the renderer's device,
replacing upstream's per-frame ``cv2.seamlessClone``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from .checkpoints import load_strict
from .generator import GeneratorSource, OcclusionAwareSPADEGenerator, fold_batchnorms, keypoint_gaussians
from .keypoints import KPDetector, transform_keypoints
from .mapping import WINDOW, MappingNet
from .shapes import call_padded, pad_rows, shape_bucket

#: Coefficients a frame contributes: 64 expression + 3 angles + 3 translation.
FRAME_COEFFS = 70
SIZES = (256, 512)
#: Windows per mapping-net call.
MAPPING_SLICE = 256


def semantic_windows(coeffs: torch.Tensor, first: int, count: int, window: int = WINDOW) -> torch.Tensor:
    """(count, C, window) mapping-net inputs for rows first..first+count-1 of (n, C) ``coeffs``.

    Each window is centred on its row; indices outside [0, n) are clamped to the ends, like
    upstream's ``transform_semantic_target``.
    """
    if window % 2 == 0 or window < WINDOW - 2:
        raise ValueError(f"window must be odd and at least {WINDOW - 2}, got {window}")
    radius = window // 2
    rows = torch.arange(first, first + count, device=coeffs.device)
    offsets = torch.arange(-radius, radius + 1, device=coeffs.device)
    index = (rows[:, None] + offsets[None, :]).clamp_(0, coeffs.shape[0] - 1)
    return coeffs[index].transpose(1, 2)


@dataclass(frozen=True)
class SourceState:
    """One avatar's source-side results, on the renderer's device (fp32). Cache it per avatar."""

    size: int
    kp_canonical: torch.Tensor  # (1, K, 3)
    kp_source: torch.Tensor  # (1, K, 3)
    source_gaussians: torch.Tensor  # (1, K, d, h, w) keypoint heatmaps of kp_source
    generator: GeneratorSource
    coeff_extra: (
        torch.Tensor
    )  # (C - 70,) source coefficients appended to every frame (the 'full' mapping's crop params)

    @property
    def device(self) -> torch.device:
        return self.kp_source.device


@dataclass(frozen=True)
class PasteTarget:
    """Where rendered crops go in the full frame, prepared once per avatar on the device."""

    background: torch.Tensor  # (3, H, W) float32 in [0, 1]: the original portrait at frame size
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop in frame pixels (may pass the edges)
    alpha: torch.Tensor  # (box_h, box_w) float32 blend weight of the rendered crop

    @property
    def width(self) -> int:
        return int(self.background.shape[2])

    @property
    def height(self) -> int:
        return int(self.background.shape[1])


def _resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _check_rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 2:
        raise ValueError(f"{what} must be an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return image


def _feather(length: int, ramp: float, device: torch.device) -> torch.Tensor:
    """1D weights: 0 at both ends rising smoothly to 1 over ``ramp`` pixels."""
    centres = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    edge_distance = torch.minimum(centres, length - centres)
    a = (edge_distance / ramp).clamp_(0, 1)
    return a * a * (3 - 2 * a)


def make_paste_target(
    original: np.ndarray,
    crop_box: tuple[float, float, float, float],
    *,
    frame_size: tuple[int, int] | None = None,
    feather: float = 0.08,
    device: torch.device | str = "cpu",
) -> PasteTarget:
    """Prepare pasting crops rendered for ``crop_box`` (source pixels) back into ``original``.

    ``frame_size`` (width, height) scales the output frame (and the box with it); default is the
    original's size. ``feather`` is the blend ramp as a fraction of the box's shorter side.
    """
    original = _check_rgb(original, "original image")
    src_h, src_w = original.shape[:2]
    width, height = frame_size if frame_size is not None else (src_w, src_h)
    if width < 1 or height < 1:
        raise ValueError(f"frame size must be positive, got {frame_size}")
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box must be x0 < x1, y0 < y1, got {crop_box}")
    sx, sy = width / src_w, height / src_h
    box = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if box_w < 1 or box_h < 1:
        raise ValueError(f"crop box {crop_box} is less than a pixel at frame size {width}x{height}")
    if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
        raise ValueError(f"crop box {crop_box} lies outside the {src_w}x{src_h} image")
    device = torch.device(device)
    background = torch.from_numpy(np.ascontiguousarray(_resize_rgb(original, width, height)))
    background = background.to(device).permute(2, 0, 1).float().div_(255)
    ramp = max(1.0, feather * min(box_w, box_h))
    alpha = _feather(box_h, ramp, device)[:, None] * _feather(box_w, ramp, device)[None, :]
    return PasteTarget(background=background, box=box, alpha=alpha)


def paste_frames(frames: torch.Tensor, target: PasteTarget) -> torch.Tensor:
    """(b, 3, h, w) crops in [0, 1] -> (b, 3, H, W) float32 full frames, blended on frames' device."""
    x0, y0, x1, y1 = target.box
    box_w, box_h = x1 - x0, y1 - y0
    crops = frames.to(device=target.background.device, dtype=torch.float32)
    shrinking = box_h < crops.shape[2] or box_w < crops.shape[3]
    crops = F.interpolate(
        crops, size=(box_h, box_w), mode="bilinear", align_corners=False, antialias=shrinking
    )
    out = target.background.unsqueeze(0).repeat(crops.shape[0], 1, 1, 1)
    # The visible part of the box (it may reach past the frame's edges).
    vx0, vy0 = max(x0, 0), max(y0, 0)
    vx1, vy1 = min(x1, target.width), min(y1, target.height)
    crop_part = crops[:, :, vy0 - y0 : vy1 - y0, vx0 - x0 : vx1 - x0]
    alpha = target.alpha[vy0 - y0 : vy1 - y0, vx0 - x0 : vx1 - x0]
    region = out[:, :, vy0:vy1, vx0:vx1]
    region.add_(alpha * (crop_part - region))
    return out


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) in [0, 1] -> (b, H, W, 3) uint8 on the same device (round to nearest, like skimage)."""
    out = frames.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous()


#: BT.601 limited-range RGB -> Y'CbCr (ITU-R BT.601-7, table 3, for R'G'B' in [0, 1]): the matrix
#: libswscale and ``cv2.COLOR_RGB2YUV_I420`` use and our encoder signals in the SPS.
_BT601 = (
    (65.481, 128.553, 24.966, 16.0),
    (-37.797, -74.203, 112.0, 128.0),
    (112.0, -93.786, -18.214, 128.0),
)

PixelFormat = Literal["rgb24", "yuv420p"]


def frames_to_i420(frames: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) RGB in [0, 1] -> (b, H * 3 // 2, W) uint8 planar I420 on the same device.

    BT.601 limited range (``_BT601``); each chroma sample is taken from the mean of its 2x2 RGB
    block (``cv2.COLOR_RGB2YUV_I420`` takes the top-left pixel, which aliases at sharp edges).
    Y matches cv2 to 1 level. Half as many bytes as rgb24 leave the device, and the encoder
    skips its own conversion. Raises ValueError for odd sizes (4:2:0 needs even ones).
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (b, 3, H, W), got {tuple(frames.shape)}")
    b, _, h, w = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"4:2:0 needs an even frame size, got {w}x{h}")
    rgb = frames.float().clamp(0, 1)  # as the RGB path rounds into 0..255 (bicubic overshoots)
    m = torch.tensor([row[:3] for row in _BT601], dtype=torch.float32, device=frames.device)
    offset = torch.tensor([row[3] for row in _BT601], dtype=torch.float32, device=frames.device)
    y = torch.einsum("c,bchw->bhw", m[0], rgb).add_(offset[0])
    mean = F.avg_pool2d(rgb, 2)  # (b, 3, h/2, w/2)
    uv = torch.einsum("kc,bchw->bkhw", m[1:], mean).add_(offset[1:, None, None])
    out = torch.empty((b, h * 3 // 2, w), dtype=torch.uint8, device=frames.device)
    out[:, :h] = y.round_().clamp_(0, 255)
    out[:, h:].view(b, 2, h * w // 4).copy_(uv.reshape(b, 2, -1).round_().clamp_(0, 255))
    return out


def paste_back(
    frames: np.ndarray | torch.Tensor,
    crop_box: tuple[float, float, float, float],
    original: np.ndarray,
    *,
    frame_size: tuple[int, int] | None = None,
    feather: float = 0.08,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Rendered crops -> (n, H, W, 3) uint8 frames of ``original`` with the crops blended in.

    ``frames`` is (n, h, w, 3) uint8 RGB, or a (n, 3, h, w) tensor in [0, 1]. One-shot
    convenience; a renderer keeps a ``PasteTarget`` per avatar and passes it to ``render``.
    """
    target = make_paste_target(original, crop_box, frame_size=frame_size, feather=feather, device=device)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (n, h, w, 3) uint8, got {frames.dtype} {frames.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        scale = 1 / 255
    else:
        tensor, scale = frames, 1.0
    out = [
        frames_to_uint8(
            paste_frames(tensor[i : i + batch_size].to(target.background.device).float() * scale, target)
        )
        for i in range(0, tensor.shape[0], batch_size)
    ]
    if not out:
        return np.zeros((0, target.height, target.width, 3), dtype=np.uint8)
    return torch.cat(out).cpu().numpy()


def _mapping_coeff_count(state: dict[str, torch.Tensor]) -> int:
    weight = state.get("first.0.weight")
    return int(weight.shape[1]) if weight is not None and weight.dim() == 3 else FRAME_COEFFS


class FaceRenderer(nn.Module):
    """Keypoint detector + mapping net + generator, rendering coefficient sequences in batches."""

    def __init__(
        self,
        kp_extractor: KPDetector,
        generator: OcclusionAwareSPADEGenerator,
        mapping: MappingNet,
        *,
        size: int = 256,
        batch_size: int = 8,
        upsample_slice: int | None = None,
    ) -> None:
        super().__init__()
        if size < 16 or size % 16:
            raise ValueError(f"renderer size must be a positive multiple of 16, got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if upsample_slice is not None and upsample_slice < 1:
            raise ValueError(f"upsample_slice must be >= 1, got {upsample_slice}")
        self.kp_extractor = kp_extractor
        self.generator = generator
        self.mapping = mapping
        self.size = size
        self.batch_size = batch_size
        self.generator.upsample_slice = upsample_slice
        self._folded = False
        #: CUDA graphs of ``generate`` per (source state, batch size); see ``to_runtime``.
        self.cuda_graphs = False
        #: Pad every network call's batch to ``shape_bucket`` sizes (on by ``to_runtime`` on
        #: CUDA): a few input shapes, each timed by cuDNN once in warm-up.
        self.pad_batches = False
        self._graphs: OrderedDict[tuple[int, int], _GraphedGenerate] = OrderedDict()
        self._graph_lock = threading.Lock()
        self._graph_pool = None
        self.eval()
        self.requires_grad_(False)

    @property
    def compiled(self) -> bool:
        """Whether the decoder runs through ``torch.compile``."""
        return hasattr(self.generator.decoder, "_orig_mod")

    @property
    def upsample_slice(self) -> int | None:
        """Frames per pass through the decoder's upsampling blocks (None: the whole batch)."""
        return self.generator.upsample_slice

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, dict[str, torch.Tensor]],
        *,
        size: int = 256,
        device: torch.device | str = "cpu",
        fp16: bool = True,
        batch_size: int = 8,
        upsample_slice: int | None = None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> FaceRenderer:
        """Build strictly from ``load_weights`` output (its ``kp_extractor``, ``generator``, ``mapping``)."""
        if size not in SIZES:
            raise ValueError(f"SadTalker checkpoints exist for sizes {SIZES}, not {size}")
        absent = [p for p in ("kp_extractor", "generator", "mapping") if p not in weights]
        if absent:
            raise CheckpointError(
                f"SadTalker weights lack the renderer parts {', '.join(absent)}", missing=absent
            )
        kp_extractor = KPDetector()
        generator = OcclusionAwareSPADEGenerator()
        mapping = MappingNet(coeff_nc=_mapping_coeff_count(weights["mapping"]))
        load_strict(kp_extractor, weights["kp_extractor"], "kp_extractor")
        load_strict(generator, weights["generator"], "generator")
        load_strict(mapping, weights["mapping"], "mapping")
        renderer = cls(kp_extractor, generator, mapping, size=size, batch_size=batch_size,
                       upsample_slice=upsample_slice)
        return renderer.to_runtime(device, fp16=fp16, cuda_graphs=cuda_graphs, compile=compile)

    def to_runtime(
        self,
        device: torch.device | str = "cpu",
        *,
        fp16: bool = True,
        frame_dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> FaceRenderer:
        """Fold batch norms, move to ``device`` and pick the generator's per-frame precision and layout.

        Defaults follow what ``bench/bench_sadtalker.py`` measured on an H200 (512 px, fp16,
        batch 8; README, *SadTalker on a GPU*):

        * ``frame_dtype``: float16 on CUDA when ``fp16``, else float32 (tests pass it explicitly
          to exercise the half-precision path on the CPU).
        * ``compile`` (off): ``torch.compile`` (inductor, static shapes) on the decoder and the
          motion hourglass, fusing their instance norms, SPADE modulation and activations:
          0.34 s of GPU per second of speech (channels-last, graphs), against 0.75 eager in the
          same layout and 0.54 eager in NCHW, after ~60 s of compiling on the first batch (so
          warm up before serving).
        * ``channels_last`` and ``cuda_graphs`` (on CUDA: only with ``compile``, the compiled
          configuration measured). Eager cuDNN ran slower in the channels-last layouts (0.72
          against 0.54 s per second of speech in NCHW). Graphs capture each batch shape's
          ``generate`` once per source state and replay it; eager at 512 px the GPU is busy,
          not waiting on launches (0.748 against 0.752 s per second), while each new avatar
          pays a capture and the graphs keep a memory pool.

        With graphs or compiling every batch runs at ``batch_size`` (a short one padded with its
        last row, the extra frames dropped), so only that shape is captured or compiled. Eager on
        CUDA a short batch is padded to its ``shape_bucket`` (``pad_batches``), and so are the
        mapping net's windows.
        """
        device = torch.device(device)
        if channels_last is None:
            channels_last = device.type == "cuda" and compile
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and compile
        if cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = cuda_graphs
        self.clear_graphs()
        if not self._folded:
            fold_batchnorms(self)  # eval-mode BN after a conv is an affine map: fold it into the conv
            self._folded = True
        if frame_dtype is None:
            frame_dtype = torch.float16 if fp16 and device.type == "cuda" else torch.float32
        # Cast before moving so the GPU never holds an fp32 copy of the frame modules.
        self.generator.set_frame_dtype(frame_dtype)
        self.to(device)
        if channels_last:
            self.generator.set_frame_dtype(frame_dtype, channels_last=True)
        self.pad_batches = device.type == "cuda"
        if device.type == "cuda":
            # Shapes repeat (padded to a few buckets, see shape_bucket): let cuDNN time its
            # kernels once per shape.
            torch.backends.cudnn.benchmark = True
        if compile and not self.compiled:  # last: it wraps the modules as cast and placed
            gen = self.generator
            gen.decoder = torch.compile(gen.decoder, dynamic=False)
            gen.dense_motion_network.hourglass = torch.compile(gen.dense_motion_network.hourglass, dynamic=False)
        return self

    @property
    def device(self) -> torch.device:
        return self.mapping.fc_t.weight.device

    @property
    def frame_dtype(self) -> torch.dtype:
        return self.generator.frame_dtype

    #: GPU memory one 512-px fp16 frame adds to a whole-batch generator call, measured on an
    #: H200 (README, *SadTalker on a GPU*): NCHW, batch 8, 6535 MiB peak less 451 MiB of
    #: weights and ~60 MiB of source state, over 8 frames. The op-by-op count on the meta device
    #: gave 536 MiB; cuDNN's workspaces and the allocator's rounding are the difference.
    FRAME_MIB_512_FP16 = 750

    @classmethod
    def frame_bytes(cls, size: int, itemsize: int) -> int:
        """Peak activation memory one frame adds to a generator batch (see estimated_frame_bytes)."""
        return int(cls.FRAME_MIB_512_FP16 * 2**20 / 512**2 * size**2 * itemsize / 2)

    #: Share of a frame's activation peak that lives in the decoder's two upsampling blocks
    #: (counted op by op, every tensor's storage from creation to release, at 256 px fp32:
    #: 213 of 272 MB; the rest is the dense motion net and the middle SPADE blocks).
    UPSAMPLE_SHARE = 0.78

    @classmethod
    def batch_bytes(cls, size: int, itemsize: int, batch: int, upsample_slice: int | None) -> int:
        """Peak activation memory of one generator batch (weights not included), in bytes."""
        per_frame = cls.frame_bytes(size, itemsize)
        sliced = batch if upsample_slice is None else min(batch, upsample_slice)
        return int(per_frame * ((1 - cls.UPSAMPLE_SHARE) * batch + cls.UPSAMPLE_SHARE * sliced))

    @property
    def estimated_frame_bytes(self) -> int:
        """Peak activation memory one frame adds to a generator batch (weights not included).

        ``FRAME_MIB_512_FP16`` scaled by pixels and item size: ~750 MiB per frame at 512 px in
        fp16 (~190 MiB at 256 px), ~78 % of it in the decoder's upsampling blocks
        (``UPSAMPLE_SHARE``); fp32 doubles it.
        """
        return self.frame_bytes(self.size, self.frame_dtype.itemsize)

    @property
    def coeff_count(self) -> int:
        """Coefficients the mapping net takes (70; 73 for the 'full' checkpoint)."""
        return self.mapping.coeff_nc

    # --- per avatar -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare_source(self, source_rgb: np.ndarray, source_coeff_70: np.ndarray) -> SourceState:
        """Source-side work for one avatar.

        ``source_rgb``: (H, W, 3) uint8 RGB crop (resized to the renderer size if needed).
        ``source_coeff_70``: the source's coefficients, (70,) or (1, C) with C >= 70; the 'full'
        mapping net takes 73 (the crop parameters too), so pass ``coeff_3dmm`` (1, 73) for it.
        """
        image = _resize_rgb(_check_rgb(source_rgb, "source image"), self.size, self.size)
        coeff = np.asarray(source_coeff_70, dtype=np.float32).reshape(-1)
        if coeff.shape[0] < self.coeff_count:
            raise ValueError(
                f"this mapping net takes {self.coeff_count} source coefficients, got {coeff.shape[0]}"
                + (
                    " (the 'full' checkpoint needs coeff_3dmm with the 3 crop parameters)"
                    if self.coeff_count > 70
                    else ""
                )
            )
        if not np.all(np.isfinite(coeff[: self.coeff_count])):
            raise ValueError("source coefficients contain NaN or infinity")
        device = self.device
        img = (
            torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float().div_(255)
        )
        kp_canonical = self.kp_extractor(img)
        source = torch.from_numpy(coeff[None, : self.coeff_count].copy()).to(device)
        motion = self.mapping(source[:, :, None].expand(1, self.coeff_count, WINDOW).contiguous())
        kp_source = transform_keypoints(kp_canonical, motion)
        encoded = self.generator.encode_source(img)
        return SourceState(
            size=self.size,
            kp_canonical=kp_canonical,
            kp_source=kp_source,
            source_gaussians=keypoint_gaussians(kp_source, tuple(encoded.feature_3d.shape[2:])),
            generator=encoded,
            coeff_extra=source[0, FRAME_COEFFS:],
        )

    # --- per request ----------------------------------------------------------------------------
    @torch.inference_mode()
    def driving_keypoints(
        self,
        state: SourceState,
        coeffs: np.ndarray,
        *,
        context_before: int = 0,
        context_after: int = 0,
        window: int = WINDOW,
    ) -> torch.Tensor:
        """(n, K, 3) fp32 driving keypoints for the rows of ``coeffs`` between the context rows."""
        table = np.asarray(coeffs, dtype=np.float32)
        if table.ndim != 2 or table.shape[1] < FRAME_COEFFS:
            raise ValueError(f"coeffs must be (n, {FRAME_COEFFS}), got {table.shape}")
        if context_before < 0 or context_after < 0:
            raise ValueError("context rows cannot be negative")
        count = table.shape[0] - context_before - context_after
        if count < 0:
            raise ValueError(
                f"{table.shape[0]} coefficient rows cannot hold {context_before}+{context_after} context rows"
            )
        if not np.all(np.isfinite(table[:, :FRAME_COEFFS])):
            raise ValueError("coefficients contain NaN or infinity")
        if count == 0:
            return torch.zeros((0,) + tuple(state.kp_source.shape[1:]), device=state.device)
        rows = torch.from_numpy(np.ascontiguousarray(table[:, :FRAME_COEFFS])).to(state.device)
        if state.coeff_extra.numel():
            rows = torch.cat([rows, state.coeff_extra.expand(rows.shape[0], -1)], dim=1)
        # Windows in slices: the mapping net's activations are 1024 x 21 floats per window.
        keypoints = []
        for start in range(0, count, MAPPING_SLICE):
            windows = semantic_windows(
                rows, context_before + start, min(MAPPING_SLICE, count - start), window
            )
            keypoints.append(call_padded(lambda w: transform_keypoints(state.kp_canonical, self.mapping(w)),
                                         MAPPING_SLICE, self.pad_batches, windows))
        return torch.cat(keypoints)

    @torch.inference_mode()
    def warm_shapes(self, state: SourceState, *, output_size: int | None = None,
                    pixel_format: PixelFormat = "rgb24", windows: int = 128) -> list[int]:
        """Run every padded batch shape once (cuDNN times its kernels for each): the mapping net
        for window counts up to ``windows``, the generator and the frame conversion for batches
        up to ``batch_size``. A no-op unless ``pad_batches``. Returns the generator batch sizes
        run (empty when nothing ran)."""
        if not self.pad_batches:
            return []
        rows = np.zeros((shape_bucket(windows, MAPPING_SLICE), FRAME_COEFFS), np.float32)
        n = 1
        while n <= min(windows, MAPPING_SLICE):
            self.driving_keypoints(state, rows[:n])
            n *= 2
        sizes = sorted({shape_bucket(n, self.batch_size) for n in range(1, self.batch_size + 1)})
        for b in sizes:
            for _ in self.render_batches(state, rows[:b], output_size=output_size, pixel_format=pixel_format):
                pass
        return sizes

    @torch.inference_mode()
    def generate(self, state: SourceState, kp_driving: torch.Tensor) -> torch.Tensor:
        """One generator batch: (b, K, 3) driving keypoints -> (b, 3, S, S) frames in [0, 1] (frame dtype).

        Runs the modules directly (compiled ones included); ``render`` replays a CUDA graph of
        this per source state when ``cuda_graphs`` is on.
        """
        frames, _ = self.generator.decode(
            state.generator, state.kp_source, kp_driving.to(state.device), state.source_gaussians
        )
        return frames

    # --- CUDA graphs ----------------------------------------------------------------------------
    #: Graphs kept, one per (source state, batch size); each pins its state. Their activations
    #: share one memory pool: replays never overlap and each output is read before the next.
    MAX_GRAPHS = 8  # the engine keeps 8 avatars' source states (SOURCE_CACHE_SIZE)

    def clear_graphs(self) -> None:
        """Drop every captured graph (and the memory pool they share)."""
        with self._graph_lock:
            self._graphs.clear()
            self._graph_pool = None

    def _graphed(self, state: SourceState, batch: int) -> _GraphedGenerate:
        key = (id(state), batch)
        graph = self._graphs.get(key)
        if graph is None or graph.state is not state:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = _GraphedGenerate(self, state, batch, self._graph_pool)
            self._graphs[key] = graph
            while len(self._graphs) > self.MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    # --- per request ----------------------------------------------------------------------------
    def _finish(self, frames: torch.Tensor, paste: PasteTarget | None, output_size: int | None,
                pixel_format: PixelFormat) -> torch.Tensor:
        """One batch of (b, 3, S, S) generator frames -> uint8 frames on the device, as asked."""
        if paste is not None:
            frames = paste_frames(frames, paste)
        elif output_size is not None and output_size != self.size:
            # Enlarging (the 256-px checkpoints at the default 512 output): bicubic, a = -0.75,
            # half-pixel centres, as cv2.INTER_CUBIC; shrinking: area-like antialiased bilinear.
            shrinking = output_size < self.size
            frames = F.interpolate(
                frames.float(),
                size=(output_size, output_size),
                mode="bilinear" if shrinking else "bicubic",
                align_corners=False,
                antialias=shrinking,
            )
        return frames_to_i420(frames) if pixel_format == "yuv420p" else frames_to_uint8(frames)

    @torch.inference_mode()
    def render_batches(
        self,
        state: SourceState,
        coeffs: np.ndarray,
        *,
        context_before: int = 0,
        context_after: int = 0,
        window: int = WINDOW,
        paste: PasteTarget | None = None,
        output_size: int | None = None,
        pixel_format: PixelFormat = "rgb24",
    ) -> Iterator[np.ndarray]:
        """``render``'s frames, one generator batch at a time, as soon as each is on the host.

        Yields (b, H, W, 3) uint8 RGB, or (b, H * 3 // 2, W) uint8 I420 for ``pixel_format``
        'yuv420p' (converted on the device: half the bytes cross to the host). On CUDA each
        batch is copied into pinned memory asynchronously and handed out once the next batch
        has been queued, so the GPU keeps working while the caller encodes.
        """
        if state.size != self.size or state.device != self.device:
            raise ValueError("this SourceState was prepared by a different renderer")
        if pixel_format not in ("rgb24", "yuv420p"):
            raise ValueError(f"unknown pixel format {pixel_format!r}")
        kp_driving = self.driving_keypoints(
            state, coeffs, context_before=context_before, context_after=context_after, window=window
        )
        cuda = self.device.type == "cuda"
        pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        for start in range(0, kp_driving.shape[0], self.batch_size):
            kp = kp_driving[start : start + self.batch_size]
            n = len(kp)
            if self.cuda_graphs or self.compiled:
                # one shape for the graph and the compiled code, never another: repeat the last
                # row, drop its frames
                kp = pad_rows(kp, self.batch_size)
            elif self.pad_batches:
                kp = pad_rows(kp, shape_bucket(n, self.batch_size))
            if self.cuda_graphs:
                with self._graph_lock:  # replay + read-out: the graph's output is reused next replay
                    out = self._finish(self._graphed(state, self.batch_size)(kp)[:n], paste, output_size,
                                       pixel_format)
            else:
                out = self._finish(self.generate(state, kp)[:n], paste, output_size, pixel_format)
            if not cuda:
                yield out.numpy()
                continue
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                pending[1].synchronize()
                yield pending[0].numpy()
            pending = (host, done)
        if pending is not None:
            pending[1].synchronize()
            yield pending[0].numpy()

    def render(self, state: SourceState, coeffs: np.ndarray, **options) -> np.ndarray:
        """(n_total, 70) coefficients -> (n, S, S, 3) uint8 RGB frames for the rows between the context.

        ``options`` are ``render_batches``'s: ``context_before``/``context_after`` rows only feed
        the 27-frame windows of their neighbours; with ``paste`` the frames are the full
        portrait, (n, H, W, 3); otherwise ``output_size`` resizes the crops on the device,
        (n, output_size, output_size, 3); ``pixel_format`` 'yuv420p' gives (n, H * 3 // 2, W)
        I420 instead (``frames_to_i420``). Raises ValueError for a state of another renderer or
        malformed coefficients.
        """
        batches = list(self.render_batches(state, coeffs, **options))
        if batches:
            return np.concatenate(batches)
        paste: PasteTarget | None = options.get("paste")
        side = options.get("output_size") or self.size
        height, width = (paste.height, paste.width) if paste is not None else (side, side)
        if options.get("pixel_format", "rgb24") == "yuv420p":
            return np.zeros((0, height * 3 // 2, width), dtype=np.uint8)
        return np.zeros((0, height, width, 3), dtype=np.uint8)


class _GraphedGenerate:
    """``FaceRenderer.generate`` for one source state and batch size, captured as a CUDA graph.

    The graph reads its driving keypoints from a static buffer and writes into a static output,
    so the caller copies keypoints in, replays, and must read the output before the next replay
    (``render_batches`` holds the renderer's graph lock over both, and pads short batches).
    Capture follows PyTorch's recipe
    (``torch.cuda.graphs``): warm-up on a side stream (cuDNN picks its kernels there), then
    capture into the renderer's shared memory pool.
    """

    def __init__(self, renderer: FaceRenderer, state: SourceState, batch: int, pool) -> None:
        self.state = state
        self.batch = batch
        self.kp = state.kp_source.expand(batch, -1, -1).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                renderer.generate(state, self.kp)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other requests' threads keep allocating and synchronising (their motion
        # nets, pinned copies) while this one captures; "global" would make those calls fail.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = renderer.generate(state, self.kp)

    def __call__(self, kp: torch.Tensor) -> torch.Tensor:
        if kp.shape[0] != self.batch:
            raise ValueError(f"a graph for batch {self.batch} cannot take {kp.shape[0]} keypoint sets")
        self.kp.copy_(kp)
        self.graph.replay()
        return self.out
