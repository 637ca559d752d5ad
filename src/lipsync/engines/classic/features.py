"""Acoustic features for the classic engine's motion, from the audio alone.

Language-independent measurements on a fixed 10 ms analysis grid: band powers from 25 ms Hann
windows, the power-weighted frequency centroid of the first-formant region, and a voicing score
(normalised cross-correlation over 40 ms at 4 kHz). Nothing here recognises phones: the motion
model maps these straight to articulation.

The grid is anchored to *global* sample positions (frame ``k`` is centred on sample
``k * hop + hop // 2`` of the clip), so a frame computed from a chunk's context window equals the
frame computed from the whole clip. numpy/scipy only: the classic path never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.signal
from numpy.lib.stride_tricks import sliding_window_view

HOP_SECONDS = 0.010
WINDOW_SECONDS = 0.025
#: Voicing looks at 40 ms: at least three periods of a 75 Hz voice.
VOICING_WINDOW_SECONDS = 0.040
VOICING_RATE = 4000
VOICING_MIN_HZ = 70.0
VOICING_MAX_HZ = 400.0
#: Added to band powers so digital silence has a finite level (-100 dBFS).
POWER_FLOOR = 1e-10

# Bands in Hz; upper edges are clipped below Nyquist for low sample rates.
BANDS: dict[str, tuple[float, float]] = {
    "total": (60.0, 7800.0),
    # nasal murmur: a strong resonance near 250 Hz and little between 0.4 and 3 kHz
    "low": (60.0, 400.0),
    "mid": (400.0, 3000.0),
    # nasal murmur has its first resonance below 400 Hz and little at 400-700 Hz (liquids and
    # glides, with F1 near 400 Hz, do not)
    "murmur_gap": (400.0, 700.0),
    # gravity: bilabials have a low F2 locus (~1 kHz, "grave"), alveolars a high one (~1.8 kHz)
    "grave": (700.0, 1300.0),
    "acute": (1400.0, 2300.0),
    # first-formant region, whose centroid rises from ~300 Hz (IY, UW) to ~700 Hz (AA)
    "f1": (250.0, 1100.0),
    # spectral balance for rounding: rounding lowers F2/F3, spreading raises them
    "back": (300.0, 1500.0),
    "front": (1800.0, 3500.0),
    # frication, aspiration and release bursts
    "hiss": (3500.0, 7800.0),
    # everything above F2 of a back vowel: alveolar and velar bursts are bright, bilabial dull
    "bright": (1800.0, 7800.0),
}


@dataclass(frozen=True)
class AnalysisGrid:
    """The 10 ms analysis grid for one sample rate."""

    sample_rate: int
    hop: int
    window: int
    n_fft: int

    @classmethod
    def for_rate(cls, sample_rate: int) -> AnalysisGrid:
        hop = max(1, round(sample_rate * HOP_SECONDS))
        window = max(hop, round(sample_rate * WINDOW_SECONDS))
        return cls(sample_rate=sample_rate, hop=hop, window=window, n_fft=1 << math.ceil(math.log2(window)))

    def center(self, k: np.ndarray | int) -> np.ndarray | int:
        """Global sample index at the centre of analysis frame ``k``."""
        return k * self.hop + self.hop // 2

    def first_frame_at_or_after(self, sample: np.ndarray) -> np.ndarray:
        """Smallest ``k`` whose centre is at or after ``sample`` (vectorised)."""
        s = np.asarray(sample, dtype=np.int64)
        return -((self.hop // 2 - s) // self.hop)


@dataclass(frozen=True)
class FrameFeatures:
    """Per 10 ms analysis frame: band powers (mean square, linear), F1-region moment, voicing."""

    power: dict[str, np.ndarray]  # band name -> (n,) float64
    f1_moment: np.ndarray  # (n,) sum of frequency * power over the "f1" band
    voicing: np.ndarray  # (n,) 0..1 peak normalised cross-correlation at pitch lags

    def __len__(self) -> int:
        return int(self.voicing.shape[0])

    def slice(self, start: int, stop: int) -> FrameFeatures:
        return FrameFeatures(
            {name: v[start:stop] for name, v in self.power.items()},
            self.f1_moment[start:stop],
            self.voicing[start:stop],
        )

    @staticmethod
    def concat(parts: list[FrameFeatures]) -> FrameFeatures:
        if len(parts) == 1:
            return parts[0]
        return FrameFeatures(
            {name: np.concatenate([p.power[name] for p in parts]) for name in parts[0].power},
            np.concatenate([p.f1_moment for p in parts]),
            np.concatenate([p.voicing for p in parts]),
        )


class FeatureExtractor:
    """Features on the global 10 ms grid; one per sample rate (caches windows and matrices)."""

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = int(sample_rate)
        self.grid = g = AnalysisGrid.for_rate(self.sample_rate)
        self._window = np.hanning(g.window + 2)[1:-1].astype(np.float32)  # strictly positive taps
        freqs = np.fft.rfftfreq(g.n_fft, 1.0 / sample_rate)
        top = 0.49 * sample_rate
        self._band_names = list(BANDS)
        # Bands are runs of FFT bins. Sum the elementary runs between all band edges once
        # (np.add.reduceat; no BLAS call, which can stall on a busy 2-core box), then add runs up.
        bin_ranges = []
        for lo, hi in BANDS.values():
            inside = np.flatnonzero((freqs >= lo) & (freqs < min(hi, top)))
            bin_ranges.append((int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0))
        edges = sorted({e for r in bin_ranges for e in r if r[0] < r[1]} | {0})
        self._edges = np.asarray([e for e in edges if e < freqs.size], dtype=np.intp)
        self._band_runs = [
            (int(np.searchsorted(self._edges, a)), int(np.searchsorted(self._edges, b))) if a < b else (0, 0)
            for a, b in bin_ranges
        ]
        f1 = bin_ranges[self._band_names.index("f1")]
        self._f1_bins = slice(*f1)
        self._f1_freqs = freqs[self._f1_bins].astype(np.float32)
        # One-sided periodogram sums scaled to the frame's mean square, so levels read as dBFS
        # (a full-scale sine is about -3 dB) whatever the window and FFT size.
        self._scale = 2.0 / (g.n_fft * float(np.sum(self._window.astype(np.float64) ** 2)))

        # Voicing at ~4 kHz: enough for pitch, a quarter of the work.
        self._decimate = max(1, self.sample_rate // VOICING_RATE)
        d = self._decimate
        rate_d = self.sample_rate / d
        self._lowpass = None
        if d > 1:
            taps = np.arange(-4 * d, 4 * d + 1)  # delay 4 * d: a whole number of output samples
            h = np.sinc(taps * 0.9 / d) * np.hamming(taps.size)
            self._lowpass = (h / h.sum()).astype(np.float32)
        self._voice_len = round(VOICING_WINDOW_SECONDS * rate_d)
        self._lag_lo = max(1, math.ceil(rate_d / VOICING_MAX_HZ))
        self._lag_hi = min(self._voice_len // 2, int(rate_d / VOICING_MIN_HZ))
        self._voice_fft = 1 << math.ceil(math.log2(self._voice_len + self._lag_hi + 1))

    @property
    def reach(self) -> int:
        """Samples a frame reads on either side of its centre (the widest analysis window)."""
        filt = 0 if self._lowpass is None else self._lowpass.size
        return max(self.grid.window // 2 + 1, (self._voice_len // 2 + 1) * self._decimate + filt) + 1

    def compute(self, samples: np.ndarray, first_sample: int, k0: int, count: int, *,
                voicing: bool = True) -> FrameFeatures:
        """Features for analysis frames ``k0 .. k0 + count - 1``.

        ``samples`` are consecutive audio whose first element is global sample ``first_sample``;
        whatever the windows need outside it reads as zeros (the clip edges are silence).
        ``voicing=False`` skips the voicing score (three quarters of the work; zeros instead).
        """
        g = self.grid
        count = max(0, int(count))
        reach = self.reach
        # Global span every window of these frames touches, read into a zero-padded float32 copy.
        lo_global = int(g.center(k0)) - reach
        hi_global = int(g.center(k0 + max(count - 1, 0))) + reach
        x = np.zeros(hi_global - lo_global, dtype=np.float32)
        src_lo = max(0, lo_global - first_sample)
        src_hi = min(len(samples), hi_global - first_sample)
        if src_hi > src_lo:
            dst = src_lo + first_sample - lo_global
            x[dst: dst + src_hi - src_lo] = samples[src_lo:src_hi]
        if count == 0:
            empty = np.zeros(0)
            return FrameFeatures({name: empty for name in self._band_names}, empty, empty)

        start = int(g.center(k0)) - g.window // 2 - lo_global
        frames = sliding_window_view(x, g.window)[start: start + (count - 1) * g.hop + 1: g.hop]
        spectrum = scipy.fft.rfft(frames * self._window, g.n_fft)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        runs = np.add.reduceat(power, self._edges, axis=1, dtype=np.float64)
        bands = {
            name: (runs[:, a:b].sum(axis=1) if b > a else np.zeros(count)) * self._scale + POWER_FLOOR
            for name, (a, b) in zip(self._band_names, self._band_runs)
        }
        f1_moment = (power[:, self._f1_bins] * self._f1_freqs).sum(axis=1, dtype=np.float64) * self._scale
        voiced = self._voicing(x, lo_global, k0, count) if voicing else np.zeros(count)
        return FrameFeatures(power=bands, f1_moment=f1_moment, voicing=voiced)

    def _voicing(self, x: np.ndarray, lo_global: int, k0: int, count: int) -> np.ndarray:
        """Peak normalised cross-correlation over pitch lags (about 1 for a steady vowel)."""
        g, d = self.grid, self._decimate
        if self._lowpass is None:
            xd, first_d = x, lo_global
        else:
            # Start on a global multiple of d so decimated sample m is global sample d*m; the
            # filter's delay (4*d) is a whole number of decimated samples.
            skip = (-lo_global) % d
            xd = scipy.signal.upfirdn(self._lowpass, x[skip:], 1, d)
            first_d = (lo_global + skip) // d - 4
        centers = np.rint(g.center(np.arange(k0, k0 + count)) / d).astype(np.int64)
        n = self._voice_len
        starts = centers - n // 2 - first_d
        step = int(starts[1] - starts[0]) if count > 1 else 1
        if count > 1 and np.all(np.diff(starts) == step):  # a regular grid: strided view, no gather
            seg = sliding_window_view(xd, n)[starts[0]: starts[-1] + 1: step]
        else:
            seg = xd[starts[:, None] + np.arange(n)[None, :]]
        # float32 throughout: a third of the float64 FFT cost, and ample for a 0..1 score.
        seg = (seg - seg.mean(axis=1, keepdims=True)).astype(np.float32, copy=False)
        spec = scipy.fft.rfft(seg, self._voice_fft)
        autocorr = scipy.fft.irfft(spec.real * spec.real + spec.imag * spec.imag, self._voice_fft)
        lags = np.arange(self._lag_lo, self._lag_hi + 1)
        energy = np.cumsum(seg * seg, axis=1, dtype=np.float64)
        total = energy[:, -1:]
        head = energy[:, n - 1 - lags]  # sum of x[0 : n - lag] ** 2
        tail = total - energy[:, lags - 1]  # sum of x[lag : n] ** 2
        nccf = autocorr[:, lags] / np.sqrt(head * tail + 1e-12 * (total + 1e-12))
        return np.clip(nccf.max(axis=1), 0.0, 1.0)


def pool(values: np.ndarray, offsets: np.ndarray, how: str = "mean") -> np.ndarray:
    """Reduce consecutive runs ``values[offsets[i]:offsets[i+1]]`` (the last run to the end)."""
    if how == "sum":
        return np.add.reduceat(values, offsets)
    if how == "mean":
        counts = np.diff(np.append(offsets, len(values)))
        return np.add.reduceat(values, offsets) / counts
    if how == "max":
        return np.maximum.reduceat(values, offsets)
    if how == "min":
        return np.minimum.reduceat(values, offsets)
    raise ValueError(f"unknown pooling {how!r}")


def db(power: np.ndarray) -> np.ndarray:
    """Power in dB; digital silence (power 0) is -inf on purpose, without a warning."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(power)
