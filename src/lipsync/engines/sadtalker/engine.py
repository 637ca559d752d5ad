"""The ``sadtalker`` engine: SadTalker's inference pipeline on the user's own checkpoints.

Per avatar (once, cached on disk): the avatar crop at the checkpoint size, its 3DMM
coefficients (``first_coeff.mat``) and, for 'full' output, the portrait to paste back into.
Per request: audio chunks -> Audio2Coeff (expression, and head pose unless still) -> the face
renderer (mapping net -> keypoints -> generator) -> frames at the requested size.

Continuity across chunks: the mapping net sees a 27-frame window of coefficients centred on
each frame, so a frame can only be rendered once the coefficients of the 13 frames after it
are known. A session therefore holds back the last 13 frames of each chunk and renders them
with the next chunk (or when the clip ends); ``Frames.first_index`` says where each batch
starts. The coefficient generator keeps blinks and pose noise running across chunks.

Precision: the coefficient networks and the 3DMM regressor always run in fp32 (half precision
flattened head and lip motion upstream); on CUDA the generator runs in fp16 unless disabled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from ...errors import AvatarNotFound, CheckpointError, ConfigError, InvalidInput
from ...fsutil import write_file_atomic
from ...types import AudioChunk, Avatar, Frames, MotionOptions
from ..base import Engine, RenderSession
from .audio import context_seconds as audio_context_seconds
from .audio2exp import Audio2Exp
from .audio2pose import Audio2Pose
from .checkpoints import SadTalkerCheckpoints, check_state, load_strict, load_weights
from .coeffs import EXP_BATCH_BUCKET, CoefficientGenerator
from .face3d import (
    FaceCoefficients,
    ReconNet,
    extract_coefficients,
    load_lm3d,
    read_first_coeff_mat,
    write_first_coeff_mat,
)
from .mapping import WINDOW
from .render import FaceRenderer, PasteTarget, SourceState, make_paste_target

if TYPE_CHECKING:
    from ...settings import Settings

log = logging.getLogger(__name__)

FIRST_COEFF = "first_coeff.mat"
SOURCE_PNG = "source.png"
PASTE_PNG = "paste_source.png"
PASTE_JSON = "paste.json"
#: Frames after a frame whose coefficients its mapping window needs.
WINDOW_RADIUS = WINDOW // 2
#: Frame rates ``context_seconds`` covers (SadTalker itself is trained at 25 fps);
#: ``context_for`` gives the exact need of any rate.
CONTEXT_FPS_RANGE = range(10, 61)
#: Longest side of the portrait kept for 'full' paste-back (bigger adds memory, not output pixels).
MAX_PASTE_SIDE = 2048
#: Avatars whose source-side render state is kept in memory.
SOURCE_CACHE_SIZE = 8


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; 'cpu'; 'cuda[:N]'."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'", device=name) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"the sadtalker engine runs on 'cpu' or 'cuda', not {name!r}", device=name)
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available to torch", device=name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist", device=name
        )
    return device


def _context_seconds() -> tuple[float, float]:
    """Audio context every supported frame rate needs (the window reaches further at low fps)."""
    needs = [audio_context_seconds(fps) for fps in CONTEXT_FPS_RANGE]
    return (max(n[0] for n in needs), max(n[1] for n in needs))


def _fingerprint(ckpt: SadTalkerCheckpoints) -> str:
    """Short id of the checkpoint files, so cached coefficients follow a change of weights."""
    parts = [ckpt.size, ckpt.preprocess]
    for path in (ckpt.main, *ckpt.legacy_files):
        st = path.stat()
        parts += [path.name, st.st_size, st.st_mtime_ns]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return np.ascontiguousarray(rgb)
    shrinking = size < rgb.shape[0]
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _read_png(path: Path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class AvatarSource:
    """What the renderer needs of one avatar, prepared once and kept in memory."""

    coefficients: FaceCoefficients
    state: SourceState
    paste_image: np.ndarray | None  # 'full': the upright portrait; None -> render the crop
    paste_box: tuple[float, float, float, float] | None  # the crop's square in paste_image pixels


#: GPU memory the generator's activations may take per batch (the weights take ~0.45 GB more):
#: batch 8 at 512 px fp16 (measured eager, channels-last and sliced: 2.3 GB in all).
ACTIVATION_BUDGET_BYTES = 2 * 2**30
#: Memory the decoder's upsampling blocks may take per pass (see ``auto_upsample_slice``).
UPSAMPLE_BUDGET_BYTES = 0.5 * 2**30


def auto_upsample_slice(size: int, device: torch.device | str, fp16: bool = True) -> int:
    """Frames per pass through the decoder's upsampling blocks: as many as fit
    ``UPSAMPLE_BUDGET_BYTES`` (1 at 512 px fp16, 3 at 256 px). They hold ~78 % of a frame's
    activations, so slicing them lets the rest of the batch grow at a fifth of the cost."""
    share = FaceRenderer.frame_bytes(size, 2 if fp16 and torch.device(device).type == "cuda" else 4)
    return max(1, int(UPSAMPLE_BUDGET_BYTES // (share * FaceRenderer.UPSAMPLE_SHARE)))


def auto_batch_size(size: int, device: torch.device | str, fp16: bool) -> int:
    """Frames per generator batch when the user sets none: on CUDA as many as fit the activation
    budget with the upsampling blocks sliced (8 at 512 px fp16, 32 at 256 px), on CPU 4 (bigger
    batches only add memory there)."""
    if torch.device(device).type != "cuda":
        return 4
    itemsize = 2 if fp16 else 4
    step = auto_upsample_slice(size, device, fp16)
    for batch in range(32, 0, -1):
        if FaceRenderer.batch_bytes(size, itemsize, batch, step) <= ACTIVATION_BUDGET_BYTES:
            return batch
    return 1


class SadTalkerEngine(Engine):
    """SadTalker's networks, loaded once; many requests share them (one session each)."""

    name = "sadtalker"
    sample_rate = 16_000
    #: Upstream parity of the mel features on clean input: only faults found are repaired.
    audio_conditioning = "as_needed"
    context_seconds = _context_seconds()

    def __init__(
        self,
        *,
        checkpoints: SadTalkerCheckpoints,
        recon: ReconNet,
        audio2exp: Audio2Exp,
        renderer: FaceRenderer,
        lm3d_std: np.ndarray,
        audio2pose_state: dict[str, torch.Tensor] | None,
        device: torch.device | str = "cpu",
        pose_style: int = 0,
        enhancer: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.recon = recon
        self.audio2exp = audio2exp
        self.renderer = renderer
        self.lm3d_std = np.asarray(lm3d_std, dtype=np.float64)
        self._device = torch.device(device)
        self.pose_style = pose_style
        #: Hook for a face enhancer: (n, H, W, 3) uint8 -> same shape. None (off) by default.
        self.enhancer = enhancer
        self._audio2pose_state = audio2pose_state
        self._audio2pose: Audio2Pose | None = None
        self._lock = threading.Lock()
        self._sources: OrderedDict[str, AvatarSource] = OrderedDict()
        # Cached precompute depends on the checkpoint size, output mode and the weights themselves.
        self.precompute_version = f"1-{checkpoints.size}-{checkpoints.preprocess}-{_fingerprint(checkpoints)}"

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> SadTalkerEngine:
        if settings.checkpoints is None:
            raise CheckpointError(
                "the sadtalker engine needs SadTalker's checkpoint directory: "
                "pass --checkpoints DIR or set LIPSYNC_CHECKPOINTS"
            )
        device = resolve_device(settings.device)
        ckpt = SadTalkerCheckpoints.locate(
            Path(settings.checkpoints), size=settings.sadtalker_size, preprocess=settings.preprocess,
            bfm_dir=settings.bfm_dir,
        )
        batch = settings.batch_size or auto_batch_size(ckpt.size, device, settings.fp16)
        return cls.from_checkpoints(ckpt, device=device, fp16=settings.fp16, batch_size=batch,
                                    pose_style=settings.pose_style,
                                    upsample_slice=auto_upsample_slice(ckpt.size, device, settings.fp16),
                                    compile=settings.torch_compile and device.type == "cuda")

    @classmethod
    def from_checkpoints(
        cls,
        ckpt: SadTalkerCheckpoints,
        *,
        device: torch.device | str = "cpu",
        fp16: bool = True,
        batch_size: int = 8,
        pose_style: int = 0,
        upsample_slice: int | None = None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> SadTalkerEngine:
        """Read every checkpoint file once and build the networks on ``device``.

        ``upsample_slice``, ``cuda_graphs`` and ``compile`` go to ``FaceRenderer`` (defaults: no
        slicing, no compiling, graphs only when compiling)."""
        device = torch.device(device)
        t0 = time.perf_counter()
        weights = load_weights(ckpt)
        recon = ReconNet()
        load_strict(recon, weights.pop("face_3drecon"), "face_3drecon")
        audio2exp = Audio2Exp()
        load_strict(audio2exp, weights.pop("audio2exp"), "audio2exp")
        # Audio2Pose is only needed when still mode is off: check it now, build it on first use.
        audio2pose_state = weights.pop("audio2pose")
        with torch.device("meta"):
            probe = Audio2Pose()
        audio2pose_state = check_state(probe, audio2pose_state, "audio2pose")
        renderer = FaceRenderer.from_weights(weights, size=ckpt.size, device=device, fp16=fp16, batch_size=batch_size,
                                             upsample_slice=upsample_slice, cuda_graphs=cuda_graphs,
                                             compile=compile)
        weights.clear()
        if renderer.coeff_count != ckpt.mapping_coeff_count:
            raise CheckpointError(
                f"{ckpt.mapping.name} takes {renderer.coeff_count} coefficients, but '{ckpt.preprocess}' "
                f"output needs {ckpt.mapping_coeff_count}",
                path=str(ckpt.mapping),
            )
        engine = cls(
            checkpoints=ckpt,
            recon=recon.to(device).eval().requires_grad_(False),
            audio2exp=audio2exp.to(device).eval().requires_grad_(False),
            renderer=renderer,
            lm3d_std=load_lm3d(ckpt.lm3d),
            audio2pose_state=audio2pose_state,
            device=device,
            pose_style=pose_style,
        )
        log.info("sadtalker: loaded %s (%d px, %s) on %s in %.1f s", ckpt.main.name, ckpt.size, ckpt.preprocess,
                 device, time.perf_counter() - t0)
        return engine

    def context_for(self, options: MotionOptions) -> tuple[float, float]:
        """Audio each chunk needs around it for exact mel windows at ``options.fps``."""
        return audio_context_seconds(options.fps)

    # --- description ----------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu': where the renderer runs."""
        return self.renderer.device.type

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "device": self.device,
            "dtype": str(self.renderer.frame_dtype).removeprefix("torch."),
            "coefficient_dtype": "float32",
            "checkpoint_size": self.checkpoints.size,
            "preprocess": self.checkpoints.preprocess,
            "checkpoint_layout": "pth" if self.checkpoints.is_legacy else "safetensors",
            "batch_size": self.renderer.batch_size,
            "upsample_slice": self.renderer.upsample_slice,
            "cuda_graphs": self.renderer.cuda_graphs,
            "torch_compile": self.renderer.compiled,
            "audio2pose_loaded": self._audio2pose is not None,
            "enhancer": "none" if self.enhancer is None else getattr(self.enhancer, "__name__", "custom"),
        }

    def warmup(self) -> None:
        """One small pass through every network (kernel selection, lazy allocations); on CUDA
        every padded batch shape once (``shapes.py``), at the default output size."""
        size = self.renderer.size
        with torch.inference_mode():
            self.recon(torch.zeros(1, 3, 224, 224, device=self._device))
            self.audio2exp.predict(
                torch.zeros(2, 1, 80, 16, device=self._device),
                torch.zeros(64, device=self._device),
                torch.zeros(2, device=self._device),
            )
            state = self.renderer.prepare_source(
                np.full((size, size, 3), 128, np.uint8), np.zeros(self.renderer.coeff_count, np.float32)
            )
            self.renderer.render(state, np.zeros((1, 70), np.float32))
            if self.device_type == "cuda":
                # every padded shape once, so cuDNN's kernel timing happens here, not in a request
                n = 1
                while n <= EXP_BATCH_BUCKET:
                    self.audio2exp.predict(
                        torch.zeros(n, 1, 80, 16, device=self._device),
                        torch.zeros(64, device=self._device),
                        torch.zeros(n, device=self._device),
                    )
                    n *= 2
                self.renderer.warm_shapes(
                    state, output_size=MotionOptions().size,
                    pixel_format="yuv420p" if self.enhancer is None else "rgb24",
                )
        self.renderer.clear_graphs()  # the stand-in avatar's graph; the compiled code stays

    # --- per avatar -----------------------------------------------------------------------
    def _source_crop(self, avatar: Avatar) -> tuple[np.ndarray, np.ndarray]:
        """The avatar crop at the checkpoint size and its landmarks in those pixels."""
        size = self.checkpoints.size
        scale = size / float(avatar.size)
        landmarks = (np.asarray(avatar.landmarks, dtype=np.float64) + 0.5) * scale - 0.5
        return _resize(np.asarray(avatar.image), size), landmarks

    def _coefficients(self, rgb: np.ndarray, landmarks: np.ndarray) -> FaceCoefficients:
        try:
            return extract_coefficients(self.recon, rgb, landmarks, self.lm3d_std, device=self._device)
        except ValueError as e:
            raise InvalidInput(f"cannot fit the 3D face model to this portrait: {e}") from None

    def prepare_avatar(self, avatar: Avatar, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rgb, landmarks = self._source_crop(avatar)
        coeffs = self._coefficients(rgb, landmarks)
        if self.checkpoints.preprocess == "full":
            paste = self._paste_source(avatar)
            if paste is not None:
                image, box = paste
                write_file_atomic(directory / PASTE_PNG, _png_bytes(image))
                write_file_atomic(directory / PASTE_JSON, json.dumps({"crop_box": list(box)}).encode())
        write_file_atomic(directory / SOURCE_PNG, _png_bytes(rgb))
        write_first_coeff_mat(directory / FIRST_COEFF, coeffs)  # last: its presence marks completion

    def avatar_ready(self, directory: Path) -> bool:
        directory = Path(directory)
        needed = [SOURCE_PNG, FIRST_COEFF] + ([PASTE_JSON, PASTE_PNG] if self.checkpoints.preprocess == "full" else [])
        if not all((directory / name).is_file() for name in needed):
            return False
        try:
            read_first_coeff_mat(directory / FIRST_COEFF)
        except ValueError:
            return False
        return True

    def _paste_source(self, avatar: Avatar) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        """The upright portrait the crop came from (capped in size) and the crop box in it, read
        through the bound avatar cache; None for an avatar the cache does not hold."""
        if self.avatar_cache is None:
            return None
        try:
            image = self.avatar_cache.upright_source(avatar.id)
        except AvatarNotFound:
            return None
        box = tuple(float(v) for v in avatar.crop_box)
        scale = min(1.0, MAX_PASTE_SIDE / max(image.shape[:2]))
        if scale < 1.0:
            image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
            box = tuple(v * scale for v in box)
        return image, box  # type: ignore[return-value]

    def _load_source(self, avatar: Avatar, assets: Path | None = None) -> AvatarSource:
        """Source-side state of ``avatar``: from memory, else its precompute files in ``assets``
        (what ``prepare_avatar`` wrote), else computed now."""
        key = f"{avatar.id}:{assets}"
        with self._lock:
            cached = self._sources.get(key)
            if cached is not None:
                self._sources.move_to_end(key)
                return cached
        directory = None if assets is None else Path(assets)
        rgb = coeffs = None
        paste: tuple[np.ndarray, tuple[float, float, float, float]] | None = None
        if directory is not None and self.avatar_ready(directory):
            rgb = _read_png(directory / SOURCE_PNG)
            coeffs = read_first_coeff_mat(directory / FIRST_COEFF)
            if self.checkpoints.preprocess == "full":
                image = _read_png(directory / PASTE_PNG)
                box = json.loads((directory / PASTE_JSON).read_text())["crop_box"]
                paste = None if image is None else (image, tuple(float(v) for v in box))
        if rgb is None or coeffs is None or rgb.shape[:2] != (self.checkpoints.size,) * 2:
            # Not prepared on disk (an in-memory avatar, or the files went missing): compute now.
            rgb, landmarks = self._source_crop(avatar)
            coeffs = self._coefficients(rgb, landmarks)
            paste = self._paste_source(avatar) if self.checkpoints.preprocess == "full" else None
        if self.checkpoints.preprocess == "full" and paste is None:
            log.warning("sadtalker: no source portrait for avatar %s; 'full' output falls back to the crop",
                        avatar.id[:12])
        state = self.renderer.prepare_source(rgb, coeffs.coeff_3dmm)
        source = AvatarSource(
            coefficients=coeffs, state=state,
            paste_image=None if paste is None else paste[0], paste_box=None if paste is None else paste[1],
        )
        with self._lock:
            self._sources[key] = source
            while len(self._sources) > SOURCE_CACHE_SIZE:
                self._sources.popitem(last=False)
        return source

    def _pose_net(self) -> Audio2Pose:
        with self._lock:
            if self._audio2pose is None:
                if self._audio2pose_state is None:
                    raise CheckpointError("the Audio2Pose weights are not loaded; head motion is unavailable")
                net = Audio2Pose()
                load_strict(net, self._audio2pose_state, "audio2pose")
                self._audio2pose = net.to(self._device).eval().requires_grad_(False)
                self._audio2pose_state = None
            return self._audio2pose

    # --- per request ----------------------------------------------------------------------
    def start(self, avatar: Avatar, options: MotionOptions, total_frames: int, *,
              assets: Path | None = None) -> SadTalkerSession:
        if total_frames < 1:
            raise InvalidInput("nothing to render: the audio is shorter than one frame")
        source = self._load_source(avatar, assets)
        pose_net = None if options.still else self._pose_net()
        motion = CoefficientGenerator(
            self.audio2exp, pose_net, source.coefficients, options,
            pose_style=self.pose_style, seed=0, device=self._device, total_frames=total_frames,
        )
        paste = None
        if source.paste_image is not None and source.paste_box is not None:
            paste = _fit_paste_target(source.paste_image, source.paste_box, options.size, self.renderer.device)
        return SadTalkerSession(self, source.state, motion, options, total_frames, paste)


def _fit_paste_target(image: np.ndarray, box: tuple[float, float, float, float], size: int,
                      device: torch.device) -> PasteTarget:
    """Paste target for a square ``size`` frame showing the whole portrait, centred (letterboxed)."""
    h, w = image.shape[:2]
    side = max(h, w)
    x_off, y_off = (side - w) // 2, (side - h) // 2
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    canvas[y_off:y_off + h, x_off:x_off + w] = image
    x0, y0, x1, y1 = box
    return make_paste_target(canvas, (x0 + x_off, y0 + y_off, x1 + x_off, y1 + y_off),
                             frame_size=(size, size), device=device)


class SadTalkerSession(RenderSession):
    """One request: coefficients per chunk, frames once their 27-frame windows are complete."""

    def __init__(self, engine: SadTalkerEngine, state: SourceState, motion: CoefficientGenerator,
                 options: MotionOptions, total_frames: int, paste: PasteTarget | None) -> None:
        self._engine = engine
        self._state = state
        self._motion = motion
        self._options = options
        self._total = total_frames
        self._paste = paste
        self._rows = np.zeros((0, 70), dtype=np.float32)  # coefficients of frames rows_start..known-1
        self._rows_start = 0
        self._known = 0  # frames whose coefficients exist
        self._rendered = 0  # frames handed out
        #: Seconds of the last ``render`` call per stage (the pipeline adds them to its timings).
        self.last_times: dict[str, float] = {}

    def render(self, chunk: AudioChunk) -> Frames:
        batches = list(self.render_iter(chunk))
        if len(batches) == 1:
            return batches[0]
        fmt = self._pixel_format
        size = self._options.size
        empty = (0, size * 3 // 2, size) if fmt == "yuv420p" else (0, size, size, 3)
        data = np.concatenate([b.data for b in batches]) if batches else np.zeros(empty, np.uint8)
        first = batches[0].first_index if batches else self._rendered
        return Frames(first_index=first, data=data, pixel_format=fmt)

    @property
    def _pixel_format(self) -> str:
        # I420 from the GPU halves what crosses to the host and spares the encoder its conversion;
        # an enhancer works on RGB.
        return "yuv420p" if self._engine.device_type == "cuda" and self._engine.enhancer is None else "rgb24"

    def render_iter(self, chunk: AudioChunk) -> Iterator[Frames]:
        """The chunk's frames one generator batch at a time (the encoder starts on the first).

        The chunk's coefficients are computed now; frames as the iterator is consumed. The
        session counts a frame as rendered only once it has been handed out, so frames of an
        iterator left unfinished come with the next chunk instead.
        """
        t0 = time.perf_counter()
        rows = self._motion.process(chunk)
        motion_s = time.perf_counter() - t0
        self._rows = np.concatenate([self._rows, rows], axis=0)
        self._known += len(rows)
        self.last_times = {"motion": motion_s, "render": 0.0}
        final = chunk.is_last or self._known >= self._total
        # A frame's window reaches WINDOW_RADIUS frames ahead; at the clip's end it is edge-padded.
        end = self._known if final else max(self._rendered, self._known - WINDOW_RADIUS)
        return self._batches(end, motion_s)

    def _batches(self, end: int, motion_s: float) -> Iterator[Frames]:
        first = self._rendered
        fmt = self._pixel_format
        batches = self._engine.renderer.render_batches(
            self._state, self._rows,
            context_before=first - self._rows_start, context_after=self._known - end,
            paste=self._paste, output_size=self._options.size, pixel_format=fmt,
        )
        render_s = 0.0
        while True:
            t = time.perf_counter()
            frames = next(batches, None)
            if frames is not None and self._engine.enhancer is not None and len(frames):
                frames = self._engine.enhancer(frames)
            render_s += time.perf_counter() - t
            self.last_times = {"motion": motion_s, "render": render_s}
            if frames is None:
                break
            index = self._rendered
            self._rendered += len(frames)
            yield Frames(first_index=index, data=frames, pixel_format=fmt)
        # every frame up to ``end`` is out: drop the rows no later window needs
        keep_from = max(self._rows_start, end - WINDOW_RADIUS)
        self._rows = self._rows[keep_from - self._rows_start:]
        self._rows_start = keep_from

    def close(self) -> None:
        self._rows = np.zeros((0, 70), dtype=np.float32)
