"""SadTalker's audio features: the Wav2Lip-style mel spectrogram and its per-video-frame windows.

Numerically the same as upstream ``utils/audio.py`` (``melspectrogram(wav).T``) with upstream's
hparams and the librosa version upstream pins (0.9.2: centred STFT, reflect padding), but written
with numpy/scipy only so the engine needs no librosa at run time:

    pre-emphasis 0.97 -> |STFT| (n_fft 800, hop 200, periodic Hann 800, centred, reflect-padded)
    -> Slaney mel filterbank (80 bands, 55..7600 Hz, area-normalised) -> 20*log10(max(1e-5, .)) - 20 dB
    -> symmetric normalisation of [-100, 0] dB onto [-4, 4], clipped.

At 16 kHz that is 80 mel frames per second; every video frame ``i`` gets the 16 mel frames starting
at ``int(80 * (i - 2) / fps)`` (clamped to the clip), exactly as upstream's ``get_data``.

``chunk_mel_windows`` computes those windows for one ``AudioChunk`` using only the chunk's samples
and context, and gives the same numbers as computing the whole clip at once: the spectrogram is a
pure function of each 800-sample window, so it needs only enough context around the chunk and the
true clip edges (reflect padding, index clamping) applied where the clip really begins and ends.
"""
from __future__ import annotations

import math

import numpy as np

from ...types import AudioChunk

SAMPLE_RATE = 16_000
N_FFT = 800
HOP_SIZE = 200
WIN_SIZE = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
#: Mel frames per video frame window (upstream's ``syncnet_mel_step_size``).
MEL_WINDOW = 16
#: Mel frames per second of audio (SAMPLE_RATE / HOP_SIZE).
MEL_FPS = SAMPLE_RATE // HOP_SIZE
#: Video frames a window reaches back (upstream starts the window at frame ``i - 2``).
WINDOW_LEAD_FRAMES = 2


# --- mel filterbank (librosa.filters.mel, htk=False, norm='slaney') ---------------------------
_F_SP = 200.0 / 3  # Slaney: linear below 1 kHz, 200/3 Hz per mel
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0  # log-spaced above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (the Auditory Toolbox's, librosa's default)."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = hz >= _MIN_LOG_HZ
    return np.where(log_part, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log_part = mel >= _MIN_LOG_MEL
    return np.where(log_part, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = FMIN,
    fmax: float = FMAX,
) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32 triangular filters, each scaled to unit area (Slaney).

    Band edges are ``n_mels + 2`` points evenly spaced in mel between ``fmin`` and ``fmax``; filter
    ``i`` rises from edge ``i`` to ``i + 1`` and falls to ``i + 2``, then is multiplied by
    ``2 / (f[i + 2] - f[i])``.
    """
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    # librosa builds the bank in float32; keep that rounding so the dot product matches.
    return weights.astype(np.float32)


_MEL_BASIS: np.ndarray | None = None
_WINDOW: np.ndarray | None = None


def _mel_basis64() -> np.ndarray:
    global _MEL_BASIS
    if _MEL_BASIS is None:
        _MEL_BASIS = mel_filterbank().astype(np.float64)
    return _MEL_BASIS


def _hann_window() -> np.ndarray:
    """Periodic Hann (scipy.signal.get_window('hann', N, fftbins=True))."""
    global _WINDOW
    if _WINDOW is None:
        n = np.arange(WIN_SIZE, dtype=np.float64)
        _WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN_SIZE)
    return _WINDOW


def _reflect_indices(idx: np.ndarray, length: int) -> np.ndarray:
    """Map indices outside [0, length) the way ``np.pad(mode='reflect')`` does (edge not repeated)."""
    if length == 1:
        return np.zeros_like(idx)
    period = 2 * (length - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= length, period - idx, idx)


def _mel_from_frames(frames: np.ndarray) -> np.ndarray:
    """(n, N_FFT) pre-emphasised sample frames -> (n, N_MELS) normalised log-mel, float32."""
    spectrum = np.abs(np.fft.rfft(frames * _hann_window(), axis=1))
    mel = spectrum @ _mel_basis64().T
    min_level = math.exp(MIN_LEVEL_DB / 20.0 * math.log(10.0))
    db = 20.0 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    norm = (2.0 * MAX_ABS_VALUE) * ((db - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS_VALUE
    return np.clip(norm, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def _preemphasize(samples: np.ndarray, previous: float = 0.0) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] in float64 (scipy.signal.lfilter([1, -0.97], [1], x)), x[-1] = previous."""
    x = np.asarray(samples, dtype=np.float64)
    out = x.copy()
    if len(x):
        out[0] -= PREEMPHASIS * previous
        out[1:] -= PREEMPHASIS * x[:-1]
    return out


def n_mel_frames(n_samples: int) -> int:
    """Mel frames of a centred STFT over ``n_samples`` samples."""
    return 1 + n_samples // HOP_SIZE


def _mel_range(emphasized: np.ndarray, offset: int, clip_length: int, first: int, last: int) -> np.ndarray:
    """Mel frames ``first..last`` (inclusive) of a clip of ``clip_length`` samples.

    ``emphasized`` holds the clip's pre-emphasised samples from absolute index ``offset`` on; it must
    cover every in-clip sample those frames touch. Frame ``j`` is centred on sample ``j * HOP_SIZE``;
    samples outside the clip are reflected about its first/last sample like librosa's padding.
    """
    if last < first:
        return np.zeros((0, N_MELS), dtype=np.float32)
    starts = np.arange(first, last + 1) * HOP_SIZE - N_FFT // 2
    idx = starts[:, None] + np.arange(N_FFT)[None, :]
    idx = _reflect_indices(idx, clip_length) - offset
    if idx.min() < 0 or idx.max() >= len(emphasized):
        raise ValueError(
            f"audio context too short for mel frames {first}..{last}: have samples "
            f"{offset}..{offset + len(emphasized) - 1}, need {idx.min() + offset}..{idx.max() + offset}"
        )
    return _mel_from_frames(emphasized[idx])


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """(T_mel, 80) float32 for 16 kHz mono audio, like upstream ``audio.melspectrogram(wav).T``."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"expected mono samples, got shape {wav.shape}")
    if len(wav) == 0:
        return np.zeros((0, N_MELS), dtype=np.float32)
    emphasized = _preemphasize(wav)
    return _mel_range(emphasized, 0, len(wav), 0, n_mel_frames(len(wav)) - 1)


def window_start(frame: int, fps: int = 25) -> int:
    """First mel frame of video frame ``frame``'s window (upstream's expression, truncation included)."""
    return int(float(MEL_FPS) * ((frame - WINDOW_LEAD_FRAMES) / float(fps)))


def mel_windows(
    mel: np.ndarray,
    first_frame: int,
    n_frames: int,
    fps: int = 25,
    *,
    mel_offset: int = 0,
    total_mel_frames: int | None = None,
) -> np.ndarray:
    """(n_frames, 1, 80, 16) float32: the 16-mel-frame window of each video frame, like upstream.

    ``mel`` is the whole clip's spectrogram, or a part of it that starts at mel frame ``mel_offset``
    of a clip with ``total_mel_frames`` frames (default: ``mel_offset + len(mel)``); indices are
    clamped to the clip, which repeats its first/last frame at the edges as upstream does.
    """
    total = mel_offset + len(mel) if total_mel_frames is None else total_mel_frames
    if total <= 0:
        raise ValueError("empty mel spectrogram")
    frames = range(first_frame, first_frame + n_frames)
    starts = np.array([window_start(i, fps) for i in frames], dtype=np.int64)
    idx = np.clip(starts[:, None] + np.arange(MEL_WINDOW)[None, :], 0, total - 1) - mel_offset
    if n_frames and (idx.min() < 0 or idx.max() >= len(mel)):
        raise ValueError(f"mel frames {mel_offset}..{mel_offset + len(mel) - 1} do not cover frames "
                         f"{first_frame}..{first_frame + n_frames - 1}")
    windows = mel[idx]  # (n, 16, 80)
    return np.ascontiguousarray(windows.transpose(0, 2, 1)[:, None], dtype=np.float32)


def samples_per_frame(sample_rate: int, fps: int) -> float:
    return sample_rate / float(fps)


def clip_samples(total_frames: int, sample_rate: int = SAMPLE_RATE, fps: int = 25) -> int:
    """Samples upstream keeps for ``total_frames`` video frames (it crops or zero-pads to this)."""
    return int(total_frames * samples_per_frame(sample_rate, fps))


def context_seconds(fps: int = 25) -> tuple[float, float]:
    """Audio (before, after) a chunk that ``chunk_mel_windows`` needs, with a little margin.

    The first window starts ``2/fps`` s before its frame (up to a hop earlier: the start index is
    truncated), reaches half an FFT window further back, and pre-emphasis wants one sample more;
    the last window ends 15 hops after its start, plus half an FFT window.
    """
    hop_s = HOP_SIZE / SAMPLE_RATE
    half_fft_s = (N_FFT // 2) / SAMPLE_RATE
    before = WINDOW_LEAD_FRAMES / fps + hop_s + half_fft_s + 1.0 / SAMPLE_RATE
    after = (MEL_WINDOW - 1) * hop_s + half_fft_s - (WINDOW_LEAD_FRAMES + 1) / fps
    return (round(before + 0.01, 3), round(max(after, 0.0) + 0.01, 3))


#: What the engine should ask the chunker for at 25 fps (seconds before, after each chunk).
CONTEXT_SECONDS: tuple[float, float] = context_seconds(25)


def chunk_mel_windows(chunk: AudioChunk, *, total_frames: int | None = None) -> np.ndarray:
    """(chunk.n_frames, 1, 80, 16) windows for the chunk's frames, equal to whole-clip ``mel_windows``.

    The clip is taken, as upstream does, to be the audio cropped or zero-padded to
    ``clip_samples(total_frames)``; ``total_frames`` defaults to the end of the chunk when
    ``chunk.is_last`` (otherwise the clip is assumed to run past the chunk's context). The chunk's own
    audio is taken to start at sample ``round(first_frame * sample_rate / fps)``. Context that reaches
    past the clip's start (zero-padded by the chunker) is ignored: the clip edge is reflected as
    upstream's STFT does.
    """
    if chunk.sample_rate != SAMPLE_RATE:
        raise ValueError(f"SadTalker audio features need {SAMPLE_RATE} Hz audio, got {chunk.sample_rate} Hz")
    if chunk.n_frames <= 0:
        return np.zeros((0, 1, N_MELS, MEL_WINDOW), dtype=np.float32)
    fps = chunk.fps
    if total_frames is None and chunk.is_last:
        total_frames = chunk.first_frame + chunk.n_frames
    clip_end = None if total_frames is None else clip_samples(total_frames, chunk.sample_rate, fps)
    total_mel = None if clip_end is None else n_mel_frames(clip_end)

    # Mel frames the windows read, after clamping to the clip.
    first_mel = max(0, window_start(chunk.first_frame, fps))
    last_mel = window_start(chunk.first_frame + chunk.n_frames - 1, fps) + MEL_WINDOW - 1
    if total_mel is not None:
        first_mel = min(first_mel, total_mel - 1)
        last_mel = min(last_mel, total_mel - 1)

    # The chunk's samples in absolute clip positions; the clip ends at clip_end (zero-padded).
    # round(first_frame * sr / fps), halves up, in integers: the chunker's frame-to-sample rule.
    own_start = (2 * chunk.first_frame * chunk.sample_rate + fps) // (2 * fps)
    start = own_start - chunk.context_before
    samples = np.asarray(chunk.samples, dtype=np.float32)
    if start < 0:  # the chunker's zero padding before the clip: the STFT reflects the edge instead
        samples, start = samples[-start:], 0
    if clip_end is not None:  # upstream crops the audio to whole frames (and zero-pads, below)
        samples = samples[:max(0, clip_end - start)]
    # Without a known end, pretend the clip goes on (zeros): only matters if the context is short.
    length = clip_end if clip_end is not None else start + len(samples) + N_FFT

    needed_lo = max(0, first_mel * HOP_SIZE - N_FFT // 2)
    needed_hi = min(length, last_mel * HOP_SIZE + N_FFT // 2)
    # One sample before the first needed one seeds the pre-emphasis (none at the clip start).
    lo = max(0, needed_lo - 1)
    if lo < start:
        raise ValueError(
            f"chunk {chunk.index} needs {(start - lo) / chunk.sample_rate:.4f} s more audio context "
            f"before it (context_before={chunk.context_before} samples)"
        )
    stop = start + len(samples)
    if clip_end is not None and not chunk.is_last:
        # The decoded audio is at least (total_frames - 0.5) frames long (the frame count is rounded),
        # so a chunk that stops short of that lacks context rather than reaching the clip's end.
        surely_audio = int((total_frames - 0.5) * samples_per_frame(chunk.sample_rate, fps))
        missing = min(needed_hi, surely_audio) - stop
        if missing > 0:
            raise ValueError(
                f"chunk {chunk.index} needs {missing / chunk.sample_rate:.4f} s "
                f"more audio context after it (context_after={chunk.context_after} samples)"
            )
    segment = samples[lo - start:]
    if stop < needed_hi:
        segment = np.concatenate([segment, np.zeros(needed_hi - stop, dtype=np.float32)])
    previous = 0.0
    if lo == needed_lo - 1:  # one extra sample before, only to seed the pre-emphasis
        previous = float(segment[0])
        segment = segment[1:]
        lo += 1
    emphasized = _preemphasize(segment, previous)
    mel = _mel_range(emphasized, lo, length, first_mel, last_mel)
    return mel_windows(
        mel, chunk.first_frame, chunk.n_frames, fps,
        mel_offset=first_mel, total_mel_frames=total_mel if total_mel is not None else first_mel + len(mel),
    )
