"""Audio2Coeff, streamed: audio chunks -> (n, 70) 3DMM coefficients (expression 64 + pose 6) per frame.

Per chunk, as upstream's ``Audio2Coeff.generate`` + ``get_facerender_data`` do for a whole clip:

* mel windows of the chunk's frames (``audio.chunk_mel_windows``: identical to whole-clip windows);
* expression: ``Audio2Exp(window, source expression, blink ratio)``, then multiplied by
  ``expression_scale`` -- upstream applies ``--expression_scale`` in ``get_facerender_data``
  (``generated_3dmm[:, :64] *= expression_scale``), i.e. on the predicted absolute expression
  coefficients before the renderer's mapping net, and so do we;
* pose: in still mode the source pose for every frame (upstream runs Audio2Pose and then overwrites
  its result with the source pose; we never run it). Otherwise Audio2Pose in 32-frame blocks
  conditioned on the source pose and the pose style, one noise vector per block, smoothed along
  time with upstream's Savitzky-Golay filter (window 13, order 2).

Where upstream works on the whole clip at once, chunking would break continuity; we keep state
instead:

* blinks come from one seeded schedule over the whole request with natural gaps (a blink every
  2-5 s), not upstream's "random gaps scaled to the clip length" that, run per 3 s chunk, would put
  a blink in every chunk;
* the pose noise comes from one seeded stream that runs on across chunks (upstream would restart
  it). Upstream's blocks all start from the source pose and its whole-clip smoothing only softens
  the jumps between them; a streamed filter would need frames of the next chunk. Instead each block
  starts where the previous frame's pose and velocity lead and eases into the network's trajectory
  over ``POSE_BLEND_FRAMES`` frames (raised cosine), and the smoothing runs within each block. So
  there is no jump at block or chunk borders, and far from a border the pose is upstream's.

The expression is a per-frame function of the audio, so it is exactly the same chunked or not.
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from scipy.signal import savgol_filter

from ...errors import ConfigError, InvalidInput
from ...types import AudioChunk, MotionOptions
from .audio import CONTEXT_SECONDS as AUDIO_CONTEXT_SECONDS
from .audio import chunk_mel_windows
from .audio2exp import AUDIO_EMBEDDING, EXP_DIM, Audio2Exp
from .audio2pose import NUM_CLASSES, POSE_DIM, SEQ_LEN, Audio2Pose
from .shapes import call_padded

#: Largest padded Audio2Exp batch below which calls are padded to powers of two (a 3 s chunk
#: is 75 frames at 25 fps; longer ones go to multiples of it).
EXP_BATCH_BUCKET = 128

if TYPE_CHECKING:
    from .face3d import FaceCoefficients

#: Seconds of audio the engine should give each chunk (before, after) for exact mel windows.
CONTEXT_SECONDS: tuple[float, float] = AUDIO_CONTEXT_SECONDS
#: Upstream's eye-closure ratio over one blink, at 25 fps (``generate_blink_seq_randomly``).
BLINK_PROFILE_25FPS: tuple[float, ...] = (0.5, 0.9, 1.0, 0.9, 0.5)
#: Seconds from the start of the request to the first blink, and between one blink's end and the next.
FIRST_BLINK_SECONDS: tuple[float, float] = (0.4, 2.8)
BLINK_GAP_SECONDS: tuple[float, float] = (1.6, 4.8)
#: Upstream smooths the pose with savgol_filter(window 13, order 2).
POSE_SMOOTH_WINDOW = 13
POSE_SMOOTH_ORDER = 2
#: Frames over which a new pose block eases from the previous pose into the network's trajectory.
POSE_BLEND_FRAMES = 16


class _HasCoeff(Protocol):
    coeff_3dmm: np.ndarray


class BlinkSchedule:
    """Seeded blink ratios for consecutive frames of one request (chunk borders play no part)."""

    def __init__(self, rng: np.random.Generator, fps: int) -> None:
        self._rng = rng
        self._fps = fps
        n = max(3, round(len(BLINK_PROFILE_25FPS) * fps / 25.0))
        # Same blink duration (0.2 s) at any frame rate.
        base = np.asarray(BLINK_PROFILE_25FPS)
        positions = np.linspace(0, len(base) - 1, n)
        self.profile = np.interp(positions, np.arange(len(base)), base).astype(np.float32)
        self._starts: list[int] = []
        self._next_start = self._draw_frames(FIRST_BLINK_SECONDS)

    def _draw_frames(self, seconds: tuple[float, float]) -> int:
        lo, hi = (round(s * self._fps) for s in seconds)
        return int(self._rng.integers(lo, hi + 1))

    def ratio(self, first_frame: int, n_frames: int) -> np.ndarray:
        """(n_frames,) float32 eye-closure ratio from ``first_frame`` on; call with increasing frames."""
        end = first_frame + n_frames
        while self._next_start < end:
            self._starts.append(self._next_start)
            self._next_start += len(self.profile) + self._draw_frames(BLINK_GAP_SECONDS)
        out = np.zeros(n_frames, dtype=np.float32)
        width = len(self.profile)
        for start in self._starts:
            lo, hi = max(start, first_frame), min(start + width, end)
            if lo < hi:
                out[lo - first_frame:hi - first_frame] = self.profile[lo - start:hi - start]
        self._starts = [s for s in self._starts if s + width > end]
        return out


class PoseStream:
    """Audio2Pose over consecutive chunks with one noise stream and continuous motion."""

    def __init__(
        self, net: Audio2Pose, source_pose: np.ndarray, pose_style: int, rng: np.random.Generator,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        self._net = net
        self._rng = rng
        self._device = device
        self._dtype = dtype
        self._source = np.asarray(source_pose, dtype=np.float64).reshape(POSE_DIM)
        self._class = torch.tensor([pose_style], dtype=torch.long, device=device)
        self._emb_history = torch.zeros(0, AUDIO_EMBEDDING, dtype=dtype, device=device)
        #: Pad the audio encoder's batch to ``shape_bucket`` sizes (on CUDA, see ``shapes.py``).
        self.pad_batches = torch.device(device).type == "cuda"
        self._history = np.zeros((0, POSE_DIM))  # the last two poses given out, oldest first
        self.blocks_drawn = 0

    def _noise(self, n: int) -> torch.Tensor:
        z = self._rng.standard_normal((n, self._net.latent_size)).astype(np.float32)
        self.blocks_drawn += n
        return torch.from_numpy(z).to(device=self._device, dtype=self._dtype)

    def _blocks(self, emb: torch.Tensor) -> list[np.ndarray]:
        """Motion rows for ``emb``'s frames: full 32-frame blocks, then a partial one predicted from
        the last 32 frames (reaching into earlier chunks when needed), keeping its last rows. Each
        block's motion is smoothed along time as upstream smooths the whole clip."""
        n = emb.shape[0]
        full, rest = divmod(n, SEQ_LEN)
        windows = [emb[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(full)]
        if rest:
            tail = torch.cat([self._emb_history, emb], dim=0)[-SEQ_LEN:]
            if tail.shape[0] < SEQ_LEN:  # clip shorter than a block: repeat the first frame, as upstream
                tail = torch.cat([tail[:1].expand(SEQ_LEN - tail.shape[0], -1), tail], dim=0)
            windows.append(tail)
        if not windows:
            return []
        k = len(windows)
        ref = torch.as_tensor(self._source, dtype=self._dtype, device=self._device).expand(k, POSE_DIM)
        motion = self._net.decode(torch.stack(windows), ref, self._class.expand(k), self._noise(k))
        motion = savgol_filter(motion.float().cpu().numpy().astype(np.float64), POSE_SMOOTH_WINDOW,
                               POSE_SMOOTH_ORDER, axis=1)
        out = [motion[i] for i in range(full)]
        if rest:
            out.append(motion[-1][-rest:])
        return out

    def _continue(self, segment: np.ndarray) -> np.ndarray:
        """Start ``segment`` where the last pose and velocity lead, easing into it over the blend."""
        history = self._history
        if len(history) == 0:
            return segment
        prev = history[-1]
        velocity = prev - history[-2] if len(history) > 1 else np.zeros(POSE_DIM)
        offset = prev + velocity - segment[0]
        i = np.arange(len(segment))
        weight = np.where(i < POSE_BLEND_FRAMES, 0.5 * (1.0 + np.cos(np.pi * i / POSE_BLEND_FRAMES)), 0.0)
        return segment + offset[None, :] * weight[:, None]

    def process(self, windows: torch.Tensor) -> np.ndarray:
        """(n, 1, 80, 16) mel windows of the next n frames -> (n, 6) pose."""
        n = windows.shape[0]
        if n == 0:
            return np.zeros((0, POSE_DIM), dtype=np.float32)
        emb = call_padded(self._net.encode_audio, EXP_BATCH_BUCKET, self.pad_batches, windows.to(self._dtype))
        rows: list[np.ndarray] = []
        if len(self._history) == 0:
            # Frame 0 of the request is the source pose itself (upstream: zero motion for frame 0).
            emb = emb[1:]
            rows.append(self._source[None, :])
            self._history = self._source[None, :]
        for motion in self._blocks(emb):
            segment = self._continue(self._source[None, :] + motion)
            rows.append(segment)
            self._history = np.concatenate([self._history, segment], axis=0)[-2:]
        self._emb_history = torch.cat([self._emb_history, emb], dim=0)[-(SEQ_LEN - 1):]
        return np.concatenate(rows, axis=0).astype(np.float32)


class CoefficientGenerator:
    """One request's motion: chunks in order -> (n_frames, 70) coefficients for the renderer.

    ``audio2exp`` / ``audio2pose`` are loaded networks in eval mode on ``device`` (fp32: the
    coefficient networks are small and half precision flattens head and lip motion).
    ``audio2pose`` may be None when ``options.still`` (it is never called in still mode).
    ``seed``: the request's seed when ``options.seed`` is None; None derives it from the first
    chunk's audio (same audio, same motion). Blinks and pose noise use independent streams of it. ``total_frames`` (the request's
    frame count, optional) makes the last windows exact even when the final chunk is a single frame.
    """

    context_seconds: tuple[float, float] = CONTEXT_SECONDS

    def __init__(
        self,
        audio2exp: Audio2Exp,
        audio2pose: Audio2Pose | None,
        source: FaceCoefficients | _HasCoeff,
        options: MotionOptions,
        *,
        pose_style: int = 0,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
        total_frames: int | None = None,
    ) -> None:
        coeff = np.array(source.coeff_3dmm, dtype=np.float32).reshape(1, -1)  # a writable copy for torch
        if coeff.shape[1] < EXP_DIM + POSE_DIM:
            raise ValueError(f"source coefficients need at least 70 values, got {coeff.shape[1]}")
        if not 0 <= pose_style < NUM_CLASSES:
            raise InvalidInput(
                f"pose style must be between 0 and {NUM_CLASSES - 1}, got {pose_style}", pose_style=pose_style
            )
        if not options.still and audio2pose is None:
            raise ConfigError("head motion (still mode off) needs the Audio2Pose network; it is not loaded")
        if not (math.isfinite(options.expression_scale)):
            raise InvalidInput("expression scale must be a finite number")
        self.options = options
        self.device = torch.device(device)
        #: Pad Audio2Exp's (and Audio2Pose's audio encoder's) batch to ``shape_bucket`` sizes (on
        #: CUDA, see ``shapes.py``).
        self.pad_batches = self.device.type == "cuda"
        self._audio2exp = audio2exp
        self._audio2pose = audio2pose
        self._source_exp = coeff[0, :EXP_DIM]
        self._source_pose = coeff[0, EXP_DIM:EXP_DIM + POSE_DIM]
        self._dtype = next(audio2exp.parameters()).dtype
        self._total_frames = total_frames
        self._seed = options.seed if options.seed is not None else seed
        self._blink_rng: np.random.Generator | None = None
        self._pose_rng: np.random.Generator | None = None
        self._pose_style = pose_style
        self._blinks: BlinkSchedule | None = None
        self._pose: PoseStream | None = None
        self._next_frame: int | None = None

    def _seed_streams(self, chunk: AudioChunk) -> None:
        """Independent blink and pose-noise streams from the request's seed (or its first audio)."""
        seed = self._seed
        if seed is None:  # same audio, same motion; different audio, different blinks
            digest = hashlib.sha256(np.ascontiguousarray(chunk.own, dtype=np.float32).tobytes()).digest()
            seed = int.from_bytes(digest[:8], "little")
        blink_seq, pose_seq = np.random.SeedSequence(int(seed) & (2**64 - 1)).spawn(2)
        self._blink_rng = np.random.default_rng(blink_seq)
        self._pose_rng = np.random.default_rng(pose_seq)

    def _blink_ratio(self, chunk: AudioChunk) -> np.ndarray:
        if not self.options.blink:
            return np.zeros(chunk.n_frames, dtype=np.float32)
        if self._blinks is None:
            assert self._blink_rng is not None
            self._blinks = BlinkSchedule(self._blink_rng, chunk.fps)
        return self._blinks.ratio(chunk.first_frame, chunk.n_frames)

    def _pose_rows(self, windows: torch.Tensor) -> np.ndarray:
        if self.options.still:
            return np.repeat(self._source_pose[None, :], windows.shape[0], axis=0)
        if self._pose is None:
            assert self._audio2pose is not None and self._pose_rng is not None  # see __init__, process
            self._pose = PoseStream(
                self._audio2pose, self._source_pose, self._pose_style, self._pose_rng, self.device,
                next(self._audio2pose.parameters()).dtype,
            )
            self._pose.pad_batches = self.pad_batches
        return self._pose.process(windows)

    def process(self, chunk: AudioChunk) -> np.ndarray:
        """(chunk.n_frames, 70) float32: expression (64) then angles (3) and translation (3)."""
        if self._next_frame is not None and chunk.first_frame != self._next_frame:
            raise ValueError(
                f"chunks must come in order: expected frame {self._next_frame}, got {chunk.first_frame}"
            )
        self._next_frame = chunk.first_frame + chunk.n_frames
        if self._blink_rng is None:
            self._seed_streams(chunk)
        if chunk.n_frames <= 0:
            return np.zeros((0, EXP_DIM + POSE_DIM), dtype=np.float32)
        mel = chunk_mel_windows(chunk, total_frames=self._total_frames)
        ratio = self._blink_ratio(chunk)
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=False):
            windows = torch.from_numpy(mel).to(device=self.device, dtype=self._dtype)
            ref = torch.from_numpy(self._source_exp).to(device=self.device, dtype=self._dtype)
            blink = torch.from_numpy(ratio).to(device=self.device, dtype=self._dtype)
            exp = call_padded(lambda w, b: self._audio2exp.predict(w, ref, b), EXP_BATCH_BUCKET,
                              self.pad_batches, windows, blink).float().cpu().numpy()
            pose = self._pose_rows(windows)
        exp = exp * np.float32(self.options.expression_scale)
        return np.concatenate([exp, pose], axis=1).astype(np.float32)
