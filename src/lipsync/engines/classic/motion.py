"""Per-frame face controls for the classic engine, from the speech audio alone.

* **The mouth** (jaw, lip_close, lip_round, labiodental, teeth) comes from phones: the whole clip
  is decoded once by a phone recognizer (``phones``: PocketSphinx in all-phone mode; any language,
  the mouth follows the phone class), and the phones become articulator tracks through a viseme
  model fit on real speakers (``visemes`` + ``viseme_model.json``, fitted by
  ``scripts/fit_visemes.py``): per-phone targets blended by Cohen-Massaro dominance functions
  (coarticulation, anticipated rounding), lips shut during P/B/M, the mouth leading the sound by
  the lead measured on the real clips. In pauses (the recognizer's silence, or audio far below
  the clip's speech level) the jaw is shut. Two checks of the recognizer against the audio come
  first: loud, voiced, vowel-shaped stretches it called silence become vowels again
  (``restore_deleted_vowels``), and close-vowel labels whose first formant says open are
  reopened (``reopen_misheard_vowels``); closures, murmur and pauses are left as they are.
* **blink** comes from a seeded renewal process in global frame time (gamma intervals, at least
  1.2 s apart, mean 3.5 s), each blink waiting up to 0.6 s for a pause.
* **brow** and head nods follow speech emphasis (loudness relative to the speaker's tracked peak,
  10 ms acoustic features, see ``features``); head drift is a sum of slow sinusoids with seeded
  frequencies and phases (zero in still mode).

Chunk invariance (a clip processed in chunks gives exactly the same controls as processed whole):
the mouth tracks are computed once per clip (``begin_clip``) and sliced per chunk; the acoustic
features live on a grid anchored to global samples, every filter with look-ahead or smoothing reads
only the chunk's context window (``context_seconds``), and the slow trackers and the blink
schedule are causal and carry their state to the next chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.signal

from ...types import AudioChunk, MotionOptions
from .features import FeatureExtractor, FrameFeatures, db, pool
from .phones import PhoneSegment
from .visemes import VOWELS, VisemeModel, articulator_tracks, load_model

# --- pauses (mouth) ----------------------------------------------------------------------------
#: A video frame this far (dB) below the clip's speech level (its 95th-percentile frame level)
#: is a pause: the jaw is shut there whatever the recognizer said; a 12 dB ramp above it.
PAUSE_BELOW_SPEECH_DB = 40.0
PAUSE_RAMP_DB = 12.0
#: Frames below this level (dBFS) are a pause however quiet the clip is (room tone, dither).
PAUSE_FLOOR_DB = -65.0

# --- the recognizer's deletions (voiced speech it called silence) -------------------------------
#: A 10 ms frame inside a recognised SIL is vowel-like when it is loud (at most this far, dB,
#: below the clip's vowel level: the median level of the frames inside recognised vowels) ...
DELETION_BELOW_VOWEL_DB = 10.0
#: ... clearly voiced (normalised cross-correlation, see ``features``) ...
DELETION_VOICING = 0.6
#: ... has its power above 400 Hz: at most this share (dB) below it. Nasal murmur, voice bars of
#: voiced stops and /w l/ put nearly all their power there (-2..0 dB); a vowel's F1 and F2 keep
#: it at -4..-10 dB (measured on the dev clips) ...
DELETION_MAX_LOW_DB = -3.0
#: ... and is sonorant: at most this share (dB) above 3.5 kHz (frication, aspiration, bursts).
DELETION_MAX_HISS_DB = -15.0
#: A run of vowel-like frames at least this long is a vowel the recognizer deleted; shorter runs
#: are the tail of a neighbouring vowel fading into a closure (they stay silence).
DELETION_MIN_SECONDS = 0.04
#: Level frames (mean square over this window, s) that pick the candidates worth analysing.
DELETION_LEVEL_WINDOW_SECONDS = 0.025

# --- vowels the recognizer heard as close vowels ------------------------------------------------
#: A segment labelled a close vowel (CLOSE_VOWELS) whose first-formant centroid is at least this
#: factor above the median of the clip's recognised vowels is an opener vowel misheard (F1 rises
#: with jaw opening; formant frequencies scale with the speaker's vocal tract, hence a ratio).
MISHEARD_F1_RATIO = 1.12
CLOSE_VOWELS = frozenset({"IY", "IH", "UW", "UH"})
#: Back rounded vowels put F2 (0.8-1.1 kHz) inside the F1 band, which lifts their centroid: a
#: UW or UH label is only doubted when its front/back balance is above the clip's vowel median too.
BACK_CLOSE_VOWELS = frozenset({"UW", "UH"})

# Jaw contrast: the fitted per-phone targets, blended by coarticulation, leave most speech frames
# in a narrow band of openings (on the dev clips the 40th..60th percentile frames differ by about
# 0.04 inter-ocular distances of drawn lip gap, the size of a face tracker's landmark noise, so a
# viewer or a judge cannot tell them apart). A smoothstep over the jaw's own range 0..1 spreads
# that band (slope 1.5 at its centre) and keeps shut at 0 and wide open at 1; it is monotone, so
# the order of the frames (what the phones say) is unchanged (see ``_mouth_tracks``). Chosen on
# the dev split (``scripts/eval_heldout.py --split dev``: real_corr 0.359 -> 0.381, closed_agree
# 0.616 -> 0.643, open_agree 0.581 -> 0.600, width_corr 0.299 -> 0.324). A steeper curve (a
# smoothstep over 0.1..0.9: 0.388, 0.629, 0.599 on dev) cut bilabial closure on LibriVox 0870
# (astronaut) to 0.857, under the gate.

# --- timing ------------------------------------------------------------------------------------
#: The jaw leads the sound it makes (articulators move before the acoustic onset).
LOOKAHEAD_SECONDS = 0.02
#: Half-width of the emphasis smoothing (brows, nods): syllable-scale, not segment-scale.
SMOOTH_SECONDS = 0.2
#: Half-width of the rounding smoothing: lips round slower than the jaw moves (coarticulation).
ROUND_SMOOTH_SECONDS = 0.08
#: How far ahead the slow trackers look, so the first syllable of a clip is already scaled right.
TRACKER_LOOKAHEAD_SECONDS = 0.5
#: Span on each side of a 10 ms frame searched for the louder sound around a stop closure.
CLOSURE_SIDE_SECONDS = 0.12
#: A release (burst, aspiration) is a jump in level within this long after a closure or pause.
RELEASE_LOOKBACK_SECONDS = 0.06

# --- loudness -> jaw ---------------------------------------------------------------------------
#: The peak-level tracker falls this fast after loud speech (dB per second).
AGC_DECAY_DB_PER_S = 3.0
#: Peaks below this never count as speech level: near-silence must not be scaled up to speech.
AGC_FLOOR_DB = -50.0
#: The noise-floor tracker rises this fast when there is no quieter frame (dB per second).
NOISE_RISE_DB_PER_S = 1.0
#: Frames quieter than this (dBFS) are digital silence, not background noise.
DIGITAL_SILENCE_DB = -85.0
#: The noise floor is never taken to be closer than this to the speech peak (dB).
NOISE_MAX_BELOW_PEAK_DB = 20.0
#: Level below the tracked peak at which the jaw is shut, and at which it is fully open.
JAW_SHUT_REL_DB = -30.0
JAW_FULL_REL_DB = -4.0
#: Level above the noise floor needed before the jaw moves at all (then a 10 dB ramp).
JAW_NOISE_MARGIN_DB = 4.0
#: F1-region centroid (Hz) of a close vowel (IY, UW: ~300) and of a fully open one (AA: ~700).
OPEN_F1_CLOSE_HZ = 330.0
OPEN_F1_OPEN_HZ = 580.0
#: Share of the opening a loud close vowel keeps, and a loud unvoiced sound (aspiration, S).
JAW_CLOSE_VOWEL_SHARE = 0.7
JAW_UNVOICED_SHARE = 0.4
#: Loud sound with its hiss share (> 3.5 kHz, dB) this far down counts as sonorant (ramp 10 dB).
SONORANT_HISS_BELOW_DB = 20.0
#: Jaw inertia: a light 3-tap smoothing (closures are cut back in afterwards, see STOP_JAW_CUT).
JAW_SMOOTHING = (0.15, 0.7, 0.15)
#: Voicing (normalised cross-correlation) ramp: below the first value a frame counts unvoiced.
VOICED_FROM = 0.35
VOICED_RAMP = 0.25

# --- closures ----------------------------------------------------------------------------------
#: How far below the louder sound on both sides a stop closure falls (ramp start, width in dB).
CLOSURE_DIP_DB = 10.0
CLOSURE_DIP_RAMP_DB = 10.0
#: A jump of this much (dB, ramp start and width) out of a closure or pause marks a release.
RELEASE_JUMP_DB = 12.0
RELEASE_RAMP_DB = 8.0
#: Share of a burst's power above 1.8 kHz (dB) up to which it counts as bilabial, and the ramp
#: to "certainly not the lips" (alveolar and velar bursts sit near 0 dB, bilabial below -8).
BILABIAL_MAX_BRIGHT_DB = -8.0
BILABIAL_BRIGHT_RAMP_DB = 4.0
#: Lip likelihood of a closure with no release in reach (an unreleased final stop).
UNKNOWN_PLACE = 0.5
#: How much any stop closure or release narrows the jaw's gap (tongue stops keep the rest).
STOP_JAW_CUT = 0.7
#: Nasal murmur score (dB above the speaker's average on voiced speech), ramp start and width.
NASAL_ABOVE_SPEAKER_DB = 4.0
NASAL_RAMP_DB = 5.0
#: Murmur: power at 400-700 Hz at least this far (dB) below the total (ramp of 5 dB).
MURMUR_GAP_DB = 11.0
#: Labial murmur is grave: power at 0.7-1.3 kHz over 1.4-2.3 kHz (dB) from which it counts as M
#: rather than N (ramp of 6 dB). Alveolar N has its second resonance near 1.8 kHz.
LABIAL_GRAVITY_DB = 2.0
#: Time constant of the speaker averages (nasal score, spectral balance).
SPEAKER_TRACKER_SECONDS = 4.0

#: Prior for the speaker averages (typical values on voiced speech) and its weight in seconds.
PRIOR_NASALITY_DB = 12.0
PRIOR_BALANCE_DB = -12.0
SPEAKER_PRIOR_SECONDS = 0.75

# --- rounding ----------------------------------------------------------------------------------
#: Front/back balance (dB) relative to the speaker's average that takes the lips from neutral to
#: fully rounded (below) or fully spread (above).
ROUND_SPAN_DB = 6.0

# --- expression --------------------------------------------------------------------------------
BROW_GAIN = 1.5
#: Head drift RMS in degrees (yaw, pitch, roll) at expression_scale 1.
HEAD_DRIFT_DEG = (4.0, 2.5, 1.5)
#: Nod (pitch, chin down) in degrees per unit of emphasis at expression_scale 1.
HEAD_NOD_DEG = 4.0

# --- blinks ------------------------------------------------------------------------------------
BLINK_MIN_INTERVAL_S = 1.2
BLINK_GAMMA_SHAPE = 2.0
BLINK_GAMMA_SCALE_S = 1.15  # mean interval = 1.2 + 2 * 1.15 = 3.5 s
BLINK_CLOSE_S = 0.08
BLINK_HOLD_S = 0.02
BLINK_OPEN_S = 0.18
#: A blink that falls in speech waits up to this long for a pause.
BLINK_MAX_DELAY_S = 0.6


def _readonly_f32(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class FaceMotion:
    """Controls for video frames ``first_frame .. first_frame + len(self) - 1``."""

    first_frame: int
    jaw: np.ndarray  # (n,) 0..1 lip gap / jaw opening (0 = lips together at rest, 1 = wide "AA")
    lip_round: np.ndarray  # (n,) -1..1: -1 spread (IY), 0 neutral, +1 rounded (UW, W)
    lip_close: np.ndarray  # (n,) 0..1 bilabial press; the renderer closes the lips fully at 1
    blink: np.ndarray  # (n,) 0..1 eyelid closure (1 = closed)
    brow: np.ndarray  # (n,) 0..1 brow raise
    head: np.ndarray  # (n, 3) yaw, pitch, roll in degrees (pitch > 0: chin down)
    # (n,) 0..1 lower lip raised to the upper teeth (labiodental F/V); None: all zeros
    labiodental: np.ndarray | None = None
    # (n,) 0..1 how much of the teeth shows in the lip gap; None: all zeros
    teeth: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.jaw)
        for name in ("labiodental", "teeth"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n, np.float32))
        names = ("jaw", "lip_round", "lip_close", "blink", "brow", "head", "labiodental", "teeth")
        for name in names:
            object.__setattr__(self, name, _readonly_f32(getattr(self, name)))
        if any(len(getattr(self, k)) != n for k in names[1:]):
            raise ValueError("FaceMotion arrays must all have one entry per frame")

    def __len__(self) -> int:
        return int(self.jaw.shape[0])

    @property
    def aperture(self) -> np.ndarray:
        """The lip gap the renderer is expected to show: jaw opening less the bilabial press."""
        return self.jaw * (1.0 - self.lip_close)


@dataclass(frozen=True)
class _Layout:
    """Frame counts that fix how much audio context a chunk needs, for one fps and sample rate."""

    before: int  # video frames of features needed before a chunk (smoothing)
    after: int  # ... after it (smoothing)
    round_half: int  # half-width of the rounding smoothing, frames
    emphasis_half: int  # half-width of the emphasis smoothing, frames
    tracker: int  # further video frames the slow trackers look ahead
    side: int  # 10 ms frames searched on each side of a closure or release
    release: int  # 10 ms frames a release looks back for its closure
    lookahead: int  # samples the jaw leads the sound
    context_before_samples: int
    context_after_samples: int


def _layout(fps: int, sample_rate: int) -> _Layout:
    extractor = FeatureExtractor(sample_rate)
    hop = extractor.grid.hop
    samples_per_frame = sample_rate / fps
    round_half = max(1, round(ROUND_SMOOTH_SECONDS * fps))
    emphasis_half = max(1, math.ceil(SMOOTH_SECONDS * fps))
    before = after = max(round_half, emphasis_half, 1)
    tracker = max(1, math.ceil(TRACKER_LOOKAHEAD_SECONDS * fps))
    side = max(1, math.ceil(CLOSURE_SIDE_SECONDS * sample_rate / hop))
    release = max(1, math.ceil(RELEASE_LOOKBACK_SECONDS * sample_rate / hop))
    lookahead = round(LOOKAHEAD_SECONDS * sample_rate)
    # Each 10 ms frame reads `reach` samples around its centre; one more hop covers the rounding
    # of frame and grid boundaries.
    margin = side * hop + extractor.reach + hop
    ctx_before = math.ceil(before * samples_per_frame) + margin
    ctx_after = math.ceil((after + tracker) * samples_per_frame) + lookahead + margin
    return _Layout(before, after, round_half, emphasis_half, tracker, side, release, lookahead, ctx_before, ctx_after)


def context_seconds_for(fps: int = 25, sample_rate: int = 16000) -> tuple[float, float]:
    """Audio context (before, after) in seconds a chunk needs for seamless chunked output."""
    lay = _layout(fps, sample_rate)
    # Rounded up to whole milliseconds so a chunker's seconds -> samples rounding cannot fall short.
    return (
        math.ceil(lay.context_before_samples / sample_rate * 1000 + 1) / 1000,
        math.ceil(lay.context_after_samples / sample_rate * 1000 + 1) / 1000,
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _ramp(x: np.ndarray, start: float, width: float) -> np.ndarray:
    return np.clip((x - start) / width, 0.0, 1.0)


def _hann_kernel(half_width: int) -> np.ndarray:
    k = np.hanning(2 * half_width + 3)[1:-1]
    return k / k.sum()


def _smooth_valid(x: np.ndarray, half_width: int, lo: int, hi: int) -> np.ndarray:
    """Hann-smoothed ``x[lo:hi]`` reading ``half_width`` extra samples on each side."""
    if half_width <= 0:
        return x[lo:hi].copy()
    return np.convolve(x[lo - half_width: hi + half_width], _hann_kernel(half_width), mode="valid")


def _sliding_max(x: np.ndarray, width: int, side: str) -> np.ndarray:
    """Max of the ``width`` values strictly before (side='left') or after ('right') each index."""
    padded = np.concatenate([np.full(width, -np.inf), x, np.full(width, -np.inf)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    n = len(x)
    if side == "left":
        return windows[:n].max(axis=1)
    return windows[width + 1: width + 1 + n].max(axis=1)


def _sliding_min(x: np.ndarray, width: int, side: str) -> np.ndarray:
    return -_sliding_max(-x, width, side)


def _pooling(k_bounds: np.ndarray, k0: int) -> tuple[slice, np.ndarray, np.ndarray]:
    """Span of 10 ms frames (relative to ``k0``) covering video frames, run offsets, run lengths."""
    span = slice(int(k_bounds[0]) - k0, int(k_bounds[-1]) - k0)
    return span, (k_bounds[:-1] - k_bounds[0]).astype(np.int64), np.diff(k_bounds).astype(np.float64)


def _sonority(voicing: np.ndarray, hiss_share: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """0..1: how much a frame sounds like a vowel or sonorant rather than a burst or hiss.

    Periodic sound counts; so does loud sound with almost nothing above 3.5 kHz, which keeps
    creaky or very low voices (whose periodicity is poor) from reading as unvoiced.
    """
    periodic = _ramp(voicing, VOICED_FROM, VOICED_RAMP)
    with np.errstate(invalid="ignore"):
        dull_and_loud = _ramp(-hiss_share, SONORANT_HISS_BELOW_DB, 10.0) * _ramp(rel, -20.0, 8.0)
    return np.nan_to_num(np.maximum(periodic, dull_and_loud))


def _band_share(band: np.ndarray, total: np.ndarray, width: int) -> np.ndarray:
    """dB share of ``band`` in ``total`` over ``width`` frames centred on each frame."""
    k = np.ones(width)
    return db(np.convolve(band, k, mode="same")) - db(np.convolve(total, k, mode="same"))


def _nasality(summed: dict[str, np.ndarray]) -> np.ndarray:
    """How much the spectrum looks like nasal murmur: little power at 0.4-3 kHz, least at F2/F3."""
    total = db(summed["total"])
    return -(db(summed["mid"]) - total) - 0.5 * (db(summed["front"]) - total)


def _segment_frames(seg: PhoneSegment, hop: int, rate: int, n_frames: int) -> tuple[int, int]:
    """10 ms analysis frames [a, b) whose centres fall inside ``seg`` (clipped to the clip)."""
    a = math.ceil(seg.start * rate / hop - 0.5)
    b = math.ceil(seg.end * rate / hop - 0.5)
    return max(a, 0), min(b, n_frames)


def restore_deleted_vowels(segments: list[PhoneSegment], samples: np.ndarray,
                           extractor: FeatureExtractor) -> list[PhoneSegment]:
    """``segments`` with the vowels the recognizer deleted put back into its silences.

    The all-phone decoder sometimes labels voiced speech SIL (a whole syllable such as the "ra" of
    "practice", or "er" between two stops), and a SIL keeps the jaw shut through a vowel. Inside
    each recognised SIL, a 10 ms frame is vowel-like when it is loud (within
    DELETION_BELOW_VOWEL_DB of the clip's vowel level), clearly voiced (DELETION_VOICING), has its
    power above 400 Hz (DELETION_MAX_LOW_DB: not nasal murmur, a voice bar or /w l/, which keep
    the lips shut or nearly) and little frication (DELETION_MAX_HISS_DB). A run of such frames at
    least DELETION_MIN_SECONDS long becomes a vowel segment, splitting the SIL: ``AA`` where the
    run's first-formant centroid reaches OPEN_F1_OPEN_HZ (an open vowel), else ``AH`` (the
    neutral mid vowel). Pauses and stop closures (silent or far below the vowels) stay SIL.

    ``segments``: the recognizer's phones for ``samples`` (mono float audio at the extractor's
    rate, sample 0 at time 0). Returns a new list covering the same time; unchanged when there
    is no recognised vowel to take the level from or no deletion is found.
    """
    x = np.asarray(samples, dtype=np.float64)
    grid = extractor.grid
    hop, rate = grid.hop, extractor.sample_rate
    n_frames = len(x) // hop
    if n_frames == 0 or not any(s.phone == "SIL" for s in segments):
        return list(segments)
    # Level per 10 ms frame (mean square over a 25 ms window at the frame's centre): cheap, for
    # the clip's vowel level and for picking the silence frames worth a closer look.
    half = max(1, round(DELETION_LEVEL_WINDOW_SECONDS * rate / 2))
    centred = x - x.mean()
    energy = np.concatenate([[0.0], np.cumsum(centred * centred)])
    centre = np.asarray(grid.center(np.arange(n_frames)), dtype=np.int64)
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half, len(x))
    level = db(np.maximum(energy[hi] - energy[lo], 0.0) / np.maximum(hi - lo, 1) + 1e-12)

    in_vowel = np.zeros(n_frames, dtype=bool)
    for s in segments:
        if s.phone in VOWELS:
            a, b = _segment_frames(s, hop, rate, n_frames)
            in_vowel[a:b] = True
    if in_vowel.sum() < 3:
        return list(segments)
    floor = float(np.median(level[in_vowel])) - DELETION_BELOW_VOWEL_DB
    min_run = max(1, round(DELETION_MIN_SECONDS * rate / hop))

    out: list[PhoneSegment] = []
    for s in segments:
        a, b = _segment_frames(s, hop, rate, n_frames)
        loud = np.flatnonzero(level[a:b] >= floor) + a if s.phone == "SIL" and b - a >= min_run else []
        if len(loud) < min_run:
            out.append(s)
            continue
        # Voicing and spectral shape only for the loud stretch (one analysis, contiguous frames).
        k0, k1 = int(loud[0]), int(loud[-1]) + 1
        f = extractor.compute(samples, 0, k0, k1 - k0)
        total = f.power["total"]
        like = (
            (level[k0:k1] >= floor)
            & (f.voicing >= DELETION_VOICING)
            & (db(f.power["low"]) - db(total) <= DELETION_MAX_LOW_DB)
            & (db(f.power["hiss"]) - db(total) <= DELETION_MAX_HISS_DB)
        )
        edges = np.flatnonzero(np.diff(np.concatenate([[0], like.astype(np.int8), [0]])))
        cursor = s.start
        for r0, r1 in zip(edges[::2], edges[1::2], strict=True):
            if r1 - r0 < min_run:
                continue
            t0 = max(s.start, (k0 + r0) * hop / rate)
            t1 = min(s.end, (k0 + r1) * hop / rate)
            centroid = float(f.f1_moment[r0:r1].sum() / f.power["f1"][r0:r1].sum())
            if t0 > cursor:
                out.append(PhoneSegment("SIL", cursor, t0))
            out.append(PhoneSegment("AA" if centroid >= OPEN_F1_OPEN_HZ else "AH", t0, t1))
            cursor = t1
        if cursor < s.end:
            out.append(PhoneSegment("SIL", cursor, s.end))
    return out


def reopen_misheard_vowels(segments: list[PhoneSegment], samples: np.ndarray,
                           extractor: FeatureExtractor) -> list[PhoneSegment]:
    """``segments`` with close vowels whose acoustics say "open" relabelled.

    The all-phone decoder sometimes labels a mid or open vowel as a close one (an EH as UW), and
    a close vowel's target keeps the jaw nearly shut (and rounds the lips for UW). A segment
    labelled IY, IH, UW or UH whose first-formant centroid (the power-weighted mean frequency at
    250-1100 Hz, see ``features``) is at least MISHEARD_F1_RATIO times the median over the clip's
    recognised vowels cannot be a close vowel (close vowels have the lowest F1: Peterson &
    Barney 1952); it becomes EH where its front/back balance (1.8-3.5 kHz over 0.3-1.5 kHz) is
    above the clip's vowel median (a front vowel), else AH. A back rounded label (UW, UH) is
    doubted only when that balance is above the median too: their F2 lies inside the F1 band and
    lifts the centroid of a true UW (measured on a dev speaker). Only recognised vowels change: no
    consonant, closure or pause does. Needs at least three recognised vowels; returns a new list.
    """
    hop, rate = extractor.grid.hop, extractor.sample_rate
    n_frames = len(samples) // hop
    vowels = [i for i, s in enumerate(segments) if s.phone in VOWELS]
    if n_frames == 0 or len(vowels) < 3 or not any(segments[i].phone in CLOSE_VOWELS for i in vowels):
        return list(segments)
    spans = [(i, *_segment_frames(segments[i], hop, rate, n_frames)) for i in vowels]
    spans = [(i, a, b) for i, a, b in spans if b > a]
    if len(spans) < 3:
        return list(segments)
    centroid, balance = {}, {}
    for i, a, b in spans:  # vowels are a fraction of the clip: analyse only their frames
        f = extractor.compute(samples, 0, a, b - a, voicing=False)
        centroid[i] = float(f.f1_moment.sum() / f.power["f1"].sum())
        balance[i] = float(db(f.power["front"].sum()) - db(f.power["back"].sum()))
    f1_median = float(np.median(list(centroid.values())))
    balance_median = float(np.median(list(balance.values())))
    out = list(segments)
    for i, c in centroid.items():
        s = segments[i]
        front = balance[i] > balance_median
        if s.phone not in CLOSE_VOWELS or (s.phone in BACK_CLOSE_VOWELS and not front):
            continue
        if c >= MISHEARD_F1_RATIO * f1_median:
            out[i] = PhoneSegment("EH" if front else "AH", s.start, s.end)
    return out


class MotionGenerator:
    """Stateful, one per request. Chunks arrive in order.

    ``process`` returns the controls for exactly the chunk's own frames. Output does not depend
    on how the clip was cut into chunks (of at least 0.5 s), provided each chunk carries
    ``context_seconds`` of neighbouring audio (zeros at the clip edges).
    """

    def __init__(self, options: MotionOptions, *, sample_rate: int = 16000, seed: int = 0) -> None:
        if options.fps <= 0:
            raise ValueError("fps must be positive")
        self.options = options
        self.sample_rate = int(sample_rate)
        self.fps = int(options.fps)
        self.seed = int(options.seed if options.seed is not None else seed)
        self._features = FeatureExtractor(self.sample_rate)
        self._layout = _layout(self.fps, self.sample_rate)
        self._next_frame = 0
        self._visemes: VisemeModel = load_model()
        self._mouth: dict[str, np.ndarray] | None = None  # whole-clip mouth tracks (begin_clip)
        self._analysed: tuple[int, FrameFeatures] | None = None  # last chunk's 10 ms features
        # Slow trackers (see _track): running max/min in drift-compensated dB, and leaky sums
        # (weight, weight * nasality, weight * balance) for the speaker averages.
        self._peak_state = -np.inf
        self._floor_state = np.inf
        # The speaker averages start from typical adult speech, worth SPEAKER_PRIOR_SECONDS of
        # voiced frames, and leak away like any other evidence as the speaker is heard.
        prior_weight = SPEAKER_PRIOR_SECONDS * self.fps
        self._speaker_state = prior_weight * np.array([1.0, PRIOR_NASALITY_DB, PRIOR_BALANCE_DB])
        # Blinks: one RNG stream in global time; the next blink is due at frame _blink_due;
        # blinks already started may reach into later chunks.
        self._blink_rng = np.random.default_rng([self.seed, 0xB11C])
        self._blink_due = self._draw_blink_interval(first=True)
        self._blink_onsets: list[int] = []
        # Head drift: fixed random sinusoids, evaluated at global frame time.
        head_rng = np.random.default_rng([self.seed, 0x4EAD])
        self._drift_freq = head_rng.uniform(0.05, 0.35, size=(3, 3))
        self._drift_phase = head_rng.uniform(0.0, 2.0 * np.pi, size=(3, 3))
        self._drift_weight = head_rng.uniform(0.5, 1.0, size=(3, 3))
        # Unit RMS per axis (each sinusoid has mean square w**2 / 2), so HEAD_DRIFT_DEG is the RMS.
        self._drift_weight /= np.sqrt((self._drift_weight ** 2).sum(axis=1, keepdims=True) / 2.0)

    # ------------------------------------------------------------------------------------------
    @property
    def context_seconds(self) -> tuple[float, float]:
        """Audio context (before, after) each chunk must carry for seamless chunked output."""
        return context_seconds_for(self.fps, self.sample_rate)

    def begin_clip(self, samples: np.ndarray, sample_rate: int) -> None:
        """Analyse the whole clip's mouth once (phone recognition + viseme tracks).

        ``samples``: the clip's mono float audio in [-1, 1] at ``sample_rate`` (must be the
        generator's rate). Chunks processed afterwards slice these tracks, so the mouth is the same
        whatever the chunking. Without this call each chunk is analysed on its own audio.
        """
        if int(sample_rate) != self.sample_rate:
            raise ValueError(f"clip is {sample_rate} Hz, motion expects {self.sample_rate} Hz")
        samples = np.asarray(samples, dtype=np.float32)
        n = math.ceil(len(samples) * self.fps / self.sample_rate) + 1
        self._mouth = self._mouth_tracks(samples, 0, n)

    def _mouth_tracks(self, samples: np.ndarray, first_frame: int, n: int) -> dict[str, np.ndarray]:
        """Mouth tracks for frames [first_frame, first_frame + n) of audio whose sample 0 sits at
        global frame ``first_frame``'s start."""
        from .phones import recognize

        segments = recognize(samples, self.sample_rate)
        segments = reopen_misheard_vowels(restore_deleted_vowels(segments, samples, self._features), samples,
                                          self._features)
        tracks = articulator_tracks(segments, n, self.fps, self._visemes)
        # Pause gate: frame level (dB) against the clip's speech level.
        bounds = np.floor(np.arange(n + 1) * self.sample_rate / self.fps + 0.5).astype(np.int64)
        bounds = np.minimum(bounds, len(samples))
        sq = np.concatenate([[0.0], np.cumsum(np.asarray(samples, np.float64) ** 2)])
        counts = np.maximum(np.diff(bounds), 1)
        level = np.maximum(db((sq[bounds[1:]] - sq[bounds[:-1]]) / counts), DIGITAL_SILENCE_DB)
        speech = float(np.percentile(level, 95)) if n else DIGITAL_SILENCE_DB
        floor = max(speech - PAUSE_BELOW_SPEECH_DB, PAUSE_FLOOR_DB)
        gate = _smoothstep((level - floor) / PAUSE_RAMP_DB)
        gate = np.where(counts > 1, gate, 0.0)  # past the end of the audio: a pause
        tracks["jaw"] = _smoothstep(tracks["jaw"])  # jaw contrast (see "Jaw contrast" above)
        for k in ("jaw", "round", "teeth", "labiodental", "vowel"):
            tracks[k] = tracks[k] * gate
        return tracks

    def process(self, chunk: AudioChunk) -> FaceMotion:
        if chunk.sample_rate != self.sample_rate:
            raise ValueError(f"chunk is {chunk.sample_rate} Hz, motion expects {self.sample_rate} Hz")
        if chunk.fps != self.fps:
            raise ValueError(f"chunk is for {chunk.fps} fps, motion was set up for {self.fps} fps")
        if chunk.first_frame != self._next_frame:
            raise ValueError(
                f"chunks must arrive in order: expected frame {self._next_frame}, got {chunk.first_frame}"
            )
        lay = self._layout
        if chunk.context_before < lay.context_before_samples or chunk.context_after < lay.context_after_samples:
            raise ValueError(
                f"chunk carries {chunk.context_before}/{chunk.context_after} context samples, motion needs "
                f"{lay.context_before_samples}/{lay.context_after_samples} (see context_seconds)"
            )
        n = int(chunk.n_frames)
        first = int(chunk.first_frame)
        self._next_frame = first + n
        if n <= 0:
            empty = np.zeros(0)
            return FaceMotion(first, empty, empty, empty, empty, empty, np.zeros((0, 3)))

        frames = self._frame_features(chunk)
        own = slice(lay.before, lay.before + n)
        emphasis = self._emphasis(frames, n)
        if self._mouth is not None:
            mouth = {k: _take(v, first, n) for k, v in self._mouth.items()}
        else:  # no whole-clip analysis: this chunk's own audio (with its context) only
            mouth = self._mouth_tracks(chunk.samples[int(chunk.context_before):], 0, n)
        jaw, lip_round = mouth["jaw"], mouth["round"]
        # Bilabial closure: the phones' P/B/M, or the acoustic evidence of a labial stop or
        # murmur (a dull burst, a grave nasal murmur; see _frame_features) the recognizer missed,
        # except inside a recognised vowel (there the acoustic detector is the one mistaken).
        lip_close = np.maximum(mouth["close"], frames["lip_close"][own] * (1.0 - mouth["vowel"]))
        blink = self._blinks(first, n, quiet=frames["quiet"][own]) if self.options.blink else np.zeros(n)
        expr = float(self.options.expression_scale)
        brow = np.clip(expr * BROW_GAIN * emphasis, 0.0, 1.0)
        if self.options.still:
            head = np.zeros((n, 3))
        else:
            head = self._head(first, n, emphasis, expr)
        lip_scale = float(self.options.lip_scale)
        return FaceMotion(
            first_frame=first,
            jaw=np.clip(jaw * lip_scale, 0.0, 1.0),
            lip_round=np.clip(lip_round * lip_scale, -1.0, 1.0),
            lip_close=lip_close,
            blink=blink,
            brow=brow,
            head=head,
            labiodental=mouth["labiodental"],
            teeth=np.clip(mouth["teeth"] * lip_scale, 0.0, 1.0),
        )

    # ------------------------------------------------------------------------------------------
    def _frame_features(self, chunk: AudioChunk) -> dict[str, np.ndarray]:
        """Video-rate features for frames [first - before, first + n + after)."""
        lay = self._layout
        sr, fps = self.sample_rate, self.fps
        first, n = int(chunk.first_frame), int(chunk.n_frames)
        lo = first - lay.before
        hi = first + n + lay.after + lay.tracker  # exclusive; the tail only feeds the trackers
        n_out = hi - lo - lay.tracker
        bounds = np.floor(np.arange(lo, hi + 1, dtype=np.float64) * sr / fps + 0.5).astype(np.int64)
        grid = self._features.grid
        # Two poolings of the 10 ms grid into video frames: the jaw's leads the sound; the lips'
        # does not (they part at the acoustic release, not before it).
        k_lead = grid.first_frame_at_or_after(bounds + lay.lookahead)
        k_lips = grid.first_frame_at_or_after(bounds[: n_out + 1])
        k0 = int(k_lips[0]) - lay.side
        count = int(k_lead[-1]) + lay.side - k0
        own_start = math.floor(first * sr / fps + 0.5)
        ff = self._analyse(chunk.samples, own_start - int(chunk.context_before), k0, count)
        p = ff.power
        level = db(p["total"])
        hiss = db(p["hiss"]) - level

        # --- jaw features, pooled with look-ahead; then the slow per-speaker trackers ------------
        span, offsets, counts = _pooling(k_lead, k0)
        summed = {name: pool(v[span], offsets, "sum") for name, v in p.items()}
        out = {
            "level": db(summed["total"] / counts),
            "peak": pool(level[span], offsets, "max"),
            "trough": pool(level[span], offsets, "min"),
            "f1_centroid": pool(ff.f1_moment[span], offsets, "sum") / summed["f1"],
            "balance": db(summed["front"]) - db(summed["back"]),
            "nasality": _nasality(summed),
            "voicing": pool(ff.voicing[span], offsets, "mean"),
            "hiss": db(summed["hiss"]) - db(summed["total"]),
        }
        trackers = self._track(lo, out)
        out = {k: v[:n_out] for k, v in out.items()}
        out.update(trackers)
        out["rel"] = out["level"] - out["ref"]
        out["snr"] = out["level"] - out["noise"]
        out["sonorant"] = _sonority(out["voicing"], out["hiss"], out["rel"])
        out["quiet"] = out["rel"] < JAW_SHUT_REL_DB + 8.0

        # --- the lips, at 10 ms, max-pooled so that a 30 ms closure still shows -------------------
        span, offsets, counts = _pooling(k_lips, k0)
        repeat = counts.astype(np.int64)
        ref = np.full(count, np.nan)  # the speaker level per 10 ms frame (only the span is used)
        ref[span] = np.repeat(out["ref"], repeat)
        speaker_nasality = np.zeros(count)
        speaker_nasality[span] = np.repeat(out["speaker_nasality"], repeat)
        sonorant = _sonority(ff.voicing, hiss, level - ref)

        # Stop closures: a dip well below the louder sound on both sides.
        left = _sliding_max(level, lay.side, "left")
        right = _sliding_max(level, lay.side, "right")
        dip = _ramp(np.minimum(left, right) - level, CLOSURE_DIP_DB, CLOSURE_DIP_RAMP_DB)
        # Burst and aspiration: a jump out of a closure or pause that is not yet a vowel.
        jump = level - _sliding_min(level, lay.release, "left")
        release = _ramp(jump, RELEASE_JUMP_DB, RELEASE_RAMP_DB) * (1.0 - sonorant)
        # Place of articulation from the burst (Stevens & Blumstein's spectral templates):
        # bilabial releases are diffuse-falling (little above 1.8 kHz); alveolar ones are
        # diffuse-rising and velar ones compact at 1.5-3 kHz, both bright.
        bright = _band_share(p["bright"], p["total"], 3)
        lips_like = 1.0 - _ramp(bright, BILABIAL_MAX_BRIGHT_DB, BILABIAL_BRIGHT_RAMP_DB)
        # A closure takes its place from the burst that ends it (none within reach: unknown).
        index = np.arange(count)
        bursts = np.flatnonzero(jump >= RELEASE_JUMP_DB)
        closure_place = np.full(count, UNKNOWN_PLACE)
        if len(bursts):
            burst_at = bursts[np.minimum(np.searchsorted(bursts, index), len(bursts) - 1)]
            near = (burst_at >= index) & (burst_at - index <= lay.side)
            closure_place = np.where(near, lips_like[burst_at], UNKNOWN_PLACE)
        # Labial nasal murmur (M): strong below 400 Hz, a gap at 400-700 Hz, weak F2/F3 region
        # relative to this speaker's vowels, and grave (its resonance near 1 kHz, N's near 1.8).
        with np.errstate(invalid="ignore"):
            nasal = (
                _ramp(_nasality(p) - speaker_nasality, NASAL_ABOVE_SPEAKER_DB, NASAL_RAMP_DB)
                * _ramp(db(p["low"]) - level, -4.0, 3.0)
                * _ramp(level - db(p["murmur_gap"]), MURMUR_GAP_DB, 5.0)
                * _ramp(db(p["grave"]) - db(p["acute"]), LABIAL_GRAVITY_DB, 6.0)
                * _ramp(ff.voicing, VOICED_FROM, VOICED_RAMP)
                * _ramp(level - ref, JAW_SHUT_REL_DB, 6.0)  # a murmur, not a pause
            )
        lips = np.maximum(np.maximum(dip * closure_place, release * lips_like), nasal)
        out["lip_close"] = pool(lips[span], offsets, "max")
        out["stop"] = pool(np.maximum(dip, release)[span], offsets, "max")
        return out

    def _analyse(self, samples: np.ndarray, first_sample: int, k0: int, count: int) -> FrameFeatures:
        """10 ms features for frames [k0, k0 + count), reusing the previous chunk's overlap.

        Features depend only on global sample positions, so the frames this chunk shares with
        the previous one (its context) are the same numbers; only the rest is computed.
        """
        start, parts = k0, []
        if self._analysed is not None:
            prev_k0, prev = self._analysed
            stop = min(k0 + count, prev_k0 + len(prev))
            if prev_k0 <= k0 < stop:
                parts.append(prev.slice(k0 - prev_k0, stop - prev_k0))
                start = stop
        if start < k0 + count:
            parts.append(self._features.compute(samples, first_sample, start, k0 + count - start))
        features = FrameFeatures.concat(parts)
        self._analysed = (k0, features)
        return features

    def _track(self, lo: int, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slow per-speaker references, from causal trackers that look ``tracker`` frames ahead.

        * ref: the peak level, max over s <= i + L of (peak[s] - decay * (i + L - s)), floored;
          written as a running max of ``peak[s] + decay * s`` (global s), so its state is one
          number carried to the next chunk.
        * noise: the mirror image (running min of troughs, slowly rising).
        * speaker averages of nasality and spectral balance over loud voiced frames: leaky sums
          (first-order recursions) whose state is carried to the next chunk.

        Frames [lo + L, hi) are fed now; the next chunk starts feeding at first + n - before + L,
        so the state just before that, at fed index n - 1, is handed over.
        """
        lay = self._layout
        n_fed = len(f["peak"]) - lay.tracker  # == the frames that get references
        n = n_fed - lay.before - lay.after  # this chunk's own frame count
        decay = AGC_DECAY_DB_PER_S / self.fps
        rise = NOISE_RISE_DB_PER_S / self.fps
        j = np.arange(lo + lay.tracker, lo + lay.tracker + n_fed, dtype=np.float64)
        peak = f["peak"][lay.tracker:]
        trough = f["trough"][lay.tracker:]
        running_max = np.maximum.accumulate(np.concatenate([[self._peak_state], peak + decay * j]))[1:]
        # Digital silence (clip edges, gated TTS pauses) says nothing about the recording's noise.
        trough = np.where(trough < DIGITAL_SILENCE_DB, np.inf, trough)
        running_min = np.minimum.accumulate(np.concatenate([[self._floor_state], trough - rise * j]))[1:]
        self._peak_state = float(running_max[n - 1])
        self._floor_state = float(running_min[n - 1])

        # Speaker averages: loud (within 12 dB of the causal peak) and clearly voiced frames.
        causal_ref = np.maximum(running_max - decay * j, AGC_FLOOR_DB)
        weight = ((peak > causal_ref - 12.0) & (f["voicing"][lay.tracker:] > 0.6)).astype(np.float64)
        leak = math.exp(-1.0 / (SPEAKER_TRACKER_SECONDS * self.fps))
        stacked = np.stack([weight, weight * f["nasality"][lay.tracker:], weight * f["balance"][lay.tracker:]])
        sums, _ = scipy.signal.lfilter([1.0], [1.0, -leak], stacked, axis=1, zi=leak * self._speaker_state[:, None])
        self._speaker_state = sums[:, n - 1].copy()
        denom = sums[0] + 1e-6  # the prior in the initial state keeps this away from zero anyway
        return {
            "ref": (np.maximum(running_max - decay * j, AGC_FLOOR_DB))[:n_fed],
            # Background noise within NOISE_MAX_BELOW_PEAK_DB of the speech peak is not believed:
            # in clean speech the quietest frames are the fades of syllables into silence.
            "noise": np.minimum(running_min + rise * j, running_max - decay * j - NOISE_MAX_BELOW_PEAK_DB)[:n_fed],
            "speaker_nasality": (sums[1] / denom)[:n_fed],
            "speaker_balance": (sums[2] / denom)[:n_fed],
        }

    def _emphasis(self, f: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Speech emphasis 0..1 for the chunk's own frames (drives brows and nods)."""
        lay = self._layout
        emphasis_raw = _ramp(f["rel"], -10.0, 8.0) * f["sonorant"]
        return _smooth_valid(emphasis_raw, lay.emphasis_half, lay.before, lay.before + n)

    # ------------------------------------------------------------------------------------------
    def _draw_blink_interval(self, first: bool = False) -> int:
        """Frames until the next blink is due (gamma-distributed, never shorter than the minimum)."""
        gap = BLINK_MIN_INTERVAL_S + self._blink_rng.gamma(BLINK_GAMMA_SHAPE, BLINK_GAMMA_SCALE_S)
        if first:  # the first blink comes at a random phase of the rhythm, not at a fixed offset
            gap = 0.5 + self._blink_rng.uniform(0.0, 1.0) * gap
        return max(1, round(gap * self.fps))

    def _blinks(self, first: int, n: int, quiet: np.ndarray) -> np.ndarray:
        """Eyelid closure for frames [first, first + n), from the global blink schedule.

        A blink is due at ``_blink_due``; if the speaker is talking it waits (up to
        BLINK_MAX_DELAY_S) for the first quiet frame. Blinks start at a frame and only reach
        forward in time, so a blink decided in this chunk never needs frames already emitted.
        """
        fps = self.fps
        end = first + n
        max_delay = max(0, round(BLINK_MAX_DELAY_S * fps))
        while self._blink_due < end:
            due = self._blink_due
            deadline = due + max_delay
            start = max(due, first)
            stop = min(deadline + 1, end)
            hits = np.flatnonzero(quiet[start - first: stop - first]) if stop > start else np.zeros(0, int)
            if hits.size:
                onset = start + int(hits[0])
            elif deadline < end:
                onset = deadline
            else:
                break  # still waiting for a pause that may come in the next chunk
            self._blink_onsets.append(onset)
            self._blink_due = onset + self._draw_blink_interval()
        # Evaluated at frame centres; the onset sits half a frame before its frame's centre so
        # the closing phase is always sampled.
        t = np.arange(first, end, dtype=np.float64)
        out = np.zeros(n)
        for onset in self._blink_onsets:
            out = np.maximum(out, _blink_shape((t - onset + 0.5) / fps))
        length = (BLINK_CLOSE_S + BLINK_HOLD_S + BLINK_OPEN_S) * fps
        self._blink_onsets = [o for o in self._blink_onsets if o + length >= end]
        return out

    def _head(self, first: int, n: int, emphasis: np.ndarray, expr: float) -> np.ndarray:
        t = (np.arange(first, first + n, dtype=np.float64) + 0.5) / self.fps
        waves = np.sin(2 * np.pi * self._drift_freq[None] * t[:, None, None] + self._drift_phase[None])
        drift = (waves * self._drift_weight[None]).sum(axis=2) * np.asarray(HEAD_DRIFT_DEG)
        head = drift * expr
        head[:, 1] += HEAD_NOD_DEG * expr * emphasis
        return head


def _take(track: np.ndarray, first: int, n: int) -> np.ndarray:
    """``track[first:first + n]``, zero-padded past its end."""
    out = np.zeros(n)
    part = track[first: first + n]
    out[: len(part)] = part
    return out


def _blink_shape(tau: np.ndarray) -> np.ndarray:
    """Eyelid closure ``tau`` seconds after a blink starts: a fast close, a short hold, a slower open."""
    closing = _smoothstep(tau / BLINK_CLOSE_S)
    opening = 1.0 - _smoothstep((tau - BLINK_CLOSE_S - BLINK_HOLD_S) / BLINK_OPEN_S)
    shape = np.where(tau <= BLINK_CLOSE_S, closing, np.where(tau <= BLINK_CLOSE_S + BLINK_HOLD_S, 1.0, opening))
    return np.where(tau < 0.0, 0.0, shape)
