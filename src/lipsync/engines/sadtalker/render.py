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
``fp16`` the generator's per-frame half runs in half precision, channels-last (upstream measured
half precision on the generator >50 % faster, while half precision on the small coefficient
networks flattened head and lip motion). On the CPU everything is fp32.

``make_paste_target`` / ``paste_frames`` / ``paste_back`` put rendered crops back into the
original portrait ('full' output) with a feathered alpha blend computed on the renderer's device,
replacing upstream's per-frame ``cv2.seamlessClone``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    ) -> None:
        super().__init__()
        if size < 16 or size % 16:
            raise ValueError(f"renderer size must be a positive multiple of 16, got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.kp_extractor = kp_extractor
        self.generator = generator
        self.mapping = mapping
        self.size = size
        self.batch_size = batch_size
        self._folded = False
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, dict[str, torch.Tensor]],
        *,
        size: int = 256,
        device: torch.device | str = "cpu",
        fp16: bool = True,
        batch_size: int = 8,
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
        renderer = cls(kp_extractor, generator, mapping, size=size, batch_size=batch_size)
        return renderer.to_runtime(device, fp16=fp16)

    def to_runtime(
        self,
        device: torch.device | str = "cpu",
        *,
        fp16: bool = True,
        frame_dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
    ) -> FaceRenderer:
        """Fold batch norms, move to ``device`` and pick the generator's per-frame precision and layout.

        ``frame_dtype`` defaults to float16 on CUDA when ``fp16`` and float32 otherwise (tests
        pass it explicitly to exercise the half-precision path on the CPU). ``channels_last``
        defaults to on for CUDA.
        """
        device = torch.device(device)
        if channels_last is None:
            channels_last = device.type == "cuda"
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
        if device.type == "cuda":
            # Shapes repeat (one per batch size in use): let cuDNN time its kernels once per shape.
            torch.backends.cudnn.benchmark = True
        return self

    @property
    def device(self) -> torch.device:
        return self.mapping.fc_t.weight.device

    @property
    def frame_dtype(self) -> torch.dtype:
        return self.generator.frame_dtype

    @staticmethod
    def frame_bytes(size: int, itemsize: int) -> int:
        """Peak activation memory one frame adds to a generator batch (see estimated_frame_bytes)."""
        return int(536 * 2**20 / 512**2 * size**2 * itemsize / 2)

    @property
    def estimated_frame_bytes(self) -> int:
        """Peak activation memory one frame adds to a generator batch (weights not included).

        Counted op by op on the meta device for upstream's configuration: about 536 MB per frame
        at 512 px in fp16 (134 MB at 256 px), the bulk in the last SPADE block; fp32 doubles it.
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
            keypoints.append(transform_keypoints(state.kp_canonical, self.mapping(windows)))
        return torch.cat(keypoints)

    @torch.inference_mode()
    def generate(self, state: SourceState, kp_driving: torch.Tensor) -> torch.Tensor:
        """One generator batch: (b, K, 3) driving keypoints -> (b, 3, S, S) frames in [0, 1] (frame dtype)."""
        frames, _ = self.generator.decode(
            state.generator, state.kp_source, kp_driving.to(state.device), state.source_gaussians
        )
        return frames

    @torch.inference_mode()
    def render(
        self,
        state: SourceState,
        coeffs: np.ndarray,
        *,
        context_before: int = 0,
        context_after: int = 0,
        window: int = WINDOW,
        paste: PasteTarget | None = None,
        output_size: int | None = None,
    ) -> np.ndarray:
        """(n_total, 70) coefficients -> (n, S, S, 3) uint8 RGB frames for the rows between the context.

        ``context_before``/``context_after`` rows only feed the 27-frame windows of their
        neighbours. With ``paste`` the frames are the full portrait, (n, H, W, 3); otherwise
        ``output_size`` resizes the crops on the device, (n, output_size, output_size, 3).
        """
        if state.size != self.size or state.device != self.device:
            raise ValueError("this SourceState was prepared by a different renderer")
        kp_driving = self.driving_keypoints(
            state, coeffs, context_before=context_before, context_after=context_after, window=window
        )
        batches = []
        # Frames stay on the device until the end: one transfer, and the GPU never waits on the host.
        for start in range(0, kp_driving.shape[0], self.batch_size):
            frames = self.generate(state, kp_driving[start : start + self.batch_size])
            if paste is not None:
                frames = paste_frames(frames, paste)
            elif output_size is not None and output_size != self.size:
                frames = F.interpolate(
                    frames.float(),
                    size=(output_size, output_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=output_size < self.size,
                )
            batches.append(frames_to_uint8(frames))
        if not batches:
            side = output_size if output_size is not None else self.size
            height, width = (paste.height, paste.width) if paste is not None else (side, side)
            return np.zeros((0, height, width, 3), dtype=np.uint8)
        return torch.cat(batches).cpu().numpy()
