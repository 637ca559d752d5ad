"""The classic engine's motion: per-frame jaw, lips, blinks, brows and head from speech audio."""
from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal

from lipsync.engines.classic.motion import FaceMotion, MotionGenerator, context_seconds_for
from lipsync.types import AudioChunk, MotionOptions

from ..conftest import REPO, shared_path

SR = 16000
FPS = 25


# --- synthetic speech --------------------------------------------------------------------------
def vowel(f1: float, f2: float, seconds: float, *, f3: float = 2600.0, f0: float = 120.0, rms: float = 0.1) -> np.ndarray:
    """A steady vowel by source-filter synthesis: a glottal pulse train through formant resonators."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    # Pulse train with a little vibrato so the "voice" is not perfectly periodic.
    phase = np.cumsum(f0 * (1.0 + 0.02 * np.sin(2 * np.pi * 5.0 * t)) / SR)
    source = np.diff(np.floor(phase), prepend=0.0)
    source = scipy.signal.lfilter([1.0], [1.0, -0.97], source)  # -6 dB/octave glottal tilt
    out = source
    for freq, bw in ((f1, 80.0), (f2, 100.0), (f3, 150.0), (3500.0, 200.0)):
        r = np.exp(-np.pi * bw / SR)
        out = scipy.signal.lfilter([1.0 - r], [1.0, -2.0 * r * np.cos(2 * np.pi * freq / SR), r * r], out)
    out = out / (np.sqrt(np.mean(out**2)) + 1e-12) * rms
    fade = min(n // 2, int(0.02 * SR))
    ramp = np.linspace(0.0, 1.0, fade)
    out[:fade] *= ramp
    out[n - fade:] *= ramp[::-1]
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR))


def burst(seconds: float = 0.03, rms: float = 0.03, seed: int = 0) -> np.ndarray:
    """A plosive release: a short decaying noise burst."""
    n = int(seconds * SR)
    noise = np.random.default_rng(seed).normal(0.0, 1.0, n) * np.exp(-np.arange(n) / (0.3 * n))
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12) * rms


def pseudo_speech(seconds: float = 8.0, seed: int = 1) -> np.ndarray:
    """Syllables of varied vowels and loudness, stop closures with bursts, and pauses."""
    rng = np.random.default_rng(seed)
    vowels = [(700, 1100), (300, 2300), (300, 800), (500, 1500), (600, 1700), (450, 900)]
    parts: list[np.ndarray] = [silence(0.3)]
    total = 0.3
    while total < seconds:
        f1, f2 = vowels[rng.integers(len(vowels))]
        dur = float(rng.uniform(0.08, 0.3))
        parts.append(vowel(f1, f2, dur, f0=float(rng.uniform(90, 180)), rms=float(rng.uniform(0.03, 0.15))))
        kind = rng.integers(4)
        if kind == 0:  # stop: closure then burst
            parts += [silence(float(rng.uniform(0.03, 0.1))), burst(seed=int(rng.integers(1 << 30)))]
        elif kind == 1:  # pause
            parts.append(silence(float(rng.uniform(0.3, 0.8))))
        total = sum(len(p) for p in parts) / SR
    return np.concatenate(parts)[: int(seconds * SR)].astype(np.float32)


# --- running the generator as the pipeline does -------------------------------------------------
def chunks(samples: np.ndarray, chunk_seconds: float, context: tuple[float, float], fps: int = FPS):
    """AudioChunks with exact, zero-padded context (the contract of lipsync.io.audio.iter_chunks)."""
    total = max(1, round(len(samples) / SR * fps))
    per = max(1, round(chunk_seconds * fps))
    before, after = round(context[0] * SR), round(context[1] * SR)
    padded = np.concatenate([np.zeros(before, np.float32), samples.astype(np.float32), np.zeros(after, np.float32)])
    for index, first in enumerate(range(0, total, per)):
        n = min(per, total - first)
        s0 = round(first * SR / fps)
        s1 = len(samples) if first + n == total else round((first + n) * SR / fps)
        yield AudioChunk(index, padded[s0: s1 + before + after], SR, fps, first, n, before, after, first + n == total)


def run(samples: np.ndarray, options: MotionOptions | None = None, chunk_seconds: float = 3.0, seed: int = 0) -> dict:
    options = options or MotionOptions()
    gen = MotionGenerator(options, sample_rate=SR, seed=seed)
    gen.begin_clip(samples, SR)  # as the pipeline does: the mouth is analysed once per clip
    parts = [gen.process(c) for c in chunks(samples, chunk_seconds, gen.context_seconds, options.fps)]
    assert all(isinstance(p, FaceMotion) for p in parts)
    assert [p.first_frame for p in parts] == list(np.cumsum([0] + [len(p) for p in parts[:-1]]))
    names = ("jaw", "lip_round", "lip_close", "blink", "brow", "head", "labiodental", "teeth")
    return {k: np.concatenate([getattr(p, k) for p in parts]) for k in names}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return pseudo_speech()


# --- contract ----------------------------------------------------------------------------------
def test_output_shapes_ranges_and_types(speech):
    out = run(speech, MotionOptions(still=False))
    n = round(len(speech) / SR * FPS)
    for name in ("jaw", "lip_round", "lip_close", "blink", "brow"):
        assert out[name].shape == (n,) and out[name].dtype == np.float32, name
        assert np.isfinite(out[name]).all(), name
    assert out["head"].shape == (n, 3)
    assert 0.0 <= out["jaw"].min() and out["jaw"].max() <= 1.0
    assert -1.0 <= out["lip_round"].min() and out["lip_round"].max() <= 1.0
    for name in ("lip_close", "blink", "brow"):
        assert 0.0 <= out[name].min() and out[name].max() <= 1.0, name
    # Speech actually moves the mouth.
    assert np.percentile(out["jaw"], 90) > 0.3  # synthetic vowels: the recognizer is unsure of them


def test_face_motion_is_read_only_and_checks_lengths():
    m = FaceMotion(3, np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros((2, 3)))
    assert len(m) == 2 and m.first_frame == 3
    with pytest.raises(ValueError):
        m.jaw[0] = 1.0
    with pytest.raises(ValueError):
        FaceMotion(0, np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros((2, 3)))


@pytest.mark.parametrize("chunk_seconds", [0.5, 0.84, 1.0, 2.2, 3.0])
def test_chunked_output_equals_whole_clip(speech, chunk_seconds):
    options = MotionOptions(still=False, expression_scale=1.0)
    whole = run(speech, options, chunk_seconds=100.0)
    chunked = run(speech, options, chunk_seconds=chunk_seconds)
    for name, value in whole.items():
        assert chunked[name].shape == value.shape
        np.testing.assert_array_equal(chunked[name], value, err_msg=name)  # exactly, not nearly


def test_chunks_must_arrive_in_order_with_enough_context(speech):
    gen = MotionGenerator(MotionOptions())
    cs = list(chunks(speech, 1.0, gen.context_seconds))
    gen.process(cs[0])
    with pytest.raises(ValueError, match="order"):
        gen.process(cs[2])
    short = list(chunks(speech, 1.0, (0.05, 0.05)))
    with pytest.raises(ValueError, match="context"):
        MotionGenerator(MotionOptions()).process(short[0])


def test_context_seconds_cover_the_needs():
    before, after = context_seconds_for(25, 16000)
    assert 0.0 < before < 0.5 and 0.0 < after < 1.0
    assert MotionGenerator(MotionOptions()).context_seconds == (before, after)


def test_empty_chunk_gives_empty_motion():
    gen = MotionGenerator(MotionOptions())
    b, a = (round(s * SR) for s in gen.context_seconds)
    m = gen.process(AudioChunk(0, np.zeros(b + a, np.float32), SR, FPS, 0, 0, b, a, True))
    assert len(m) == 0 and m.head.shape == (0, 3)


# --- mouth -------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise_rms", [0.0, 3e-5])
def test_silence_keeps_the_mouth_closed(noise_rms):
    x = np.random.default_rng(0).normal(0.0, noise_rms, 3 * SR).astype(np.float32)
    out = run(x)
    assert out["jaw"].max() < 0.02
    assert (out["jaw"] * (1.0 - out["lip_close"])).max() < 0.02


def _real_speech(material) -> np.ndarray:
    import wave

    with wave.open(str(material.path("speech/speech_3s.wav"))) as w:  # 3 s of the bundled real speech
        assert w.getframerate() == SR and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def test_pauses_close_the_mouth_between_words(material):
    words = _real_speech(material)
    x = np.concatenate([words, silence(1.0), words]).astype(np.float32)
    out = run(x)
    n_words = round(len(words) / SR * FPS)
    assert np.percentile(out["jaw"][:n_words], 90) > 0.4  # the words move the mouth
    pause = slice(n_words + 5, n_words + 20)  # well inside the pause
    assert out["jaw"][pause].max() < 0.05


def test_background_noise_does_not_move_the_mouth_in_pauses(material):
    words = _real_speech(material)
    clean = np.concatenate([words, silence(1.5), words, silence(1.0)])
    level = np.sqrt(np.mean(words ** 2))
    noise = np.random.default_rng(5).normal(0.0, level * 10 ** (-30 / 20), len(clean))  # 30 dB below speech
    out = run((clean + noise).astype(np.float32))
    n_words = round(len(words) / SR * FPS)
    pause = slice(n_words + 5, n_words + 30)
    assert np.percentile(out["jaw"][:n_words], 90) > 0.4
    assert out["jaw"][pause].max() < 0.1


def test_nasal_murmur_presses_the_lips():
    # /m/-like murmur (strong ~250 Hz, a weak ~1 kHz resonance, nothing at 0.4-0.7 kHz) between vowels.
    def murmur(seconds: float) -> np.ndarray:
        m = vowel(250, 1000, seconds, f3=2200, rms=0.03)
        b, a = scipy.signal.butter(4, [350, 750], btype="bandstop", fs=SR)  # the murmur's 400-700 Hz gap
        return scipy.signal.lfilter(b, a, m)

    x = np.concatenate([silence(0.3), vowel(700, 1200, 0.3), murmur(0.12), vowel(700, 1200, 0.3), silence(0.3)])
    out = run(x.astype(np.float32))
    aperture = out["jaw"] * (1.0 - out["lip_close"])
    murmur_frames = slice(int(0.62 * FPS), int(0.70 * FPS) + 1)
    vowel_frames = slice(int(0.35 * FPS), int(0.55 * FPS))
    assert out["lip_close"][murmur_frames].max() > 0.8
    assert aperture[murmur_frames].min() < 0.25 * aperture[vowel_frames].mean()


def test_stop_closure_narrows_the_mouth():
    x = np.concatenate([silence(0.3), vowel(700, 1100, 0.3), silence(0.08), burst(), vowel(700, 1100, 0.3), silence(0.3)])
    out = run(x.astype(np.float32))
    aperture = out["jaw"] * (1.0 - out["lip_close"])
    closure = round((0.6 + 0.04) * FPS)
    assert aperture[closure - 1: closure + 2].min() < 0.3 * aperture[int(0.4 * FPS): int(0.55 * FPS)].mean()


def test_lip_scale_scales_jaw_and_rounding(speech):
    base = run(speech, MotionOptions(lip_scale=1.0))
    half = run(speech, MotionOptions(lip_scale=0.5))
    np.testing.assert_allclose(half["jaw"], 0.5 * base["jaw"], atol=1e-6)
    np.testing.assert_allclose(half["lip_round"], 0.5 * base["lip_round"], atol=1e-6)
    strong = run(speech, MotionOptions(lip_scale=3.0))
    assert strong["jaw"].max() <= 1.0 and strong["jaw"].mean() > base["jaw"].mean()
    np.testing.assert_array_equal(half["lip_close"], base["lip_close"])


# --- eyes, brows, head -------------------------------------------------------------------------
def blink_onsets(blink: np.ndarray) -> np.ndarray:
    return np.flatnonzero((blink[1:] >= 0.5) & (blink[:-1] < 0.5)) + 1


def test_blinks_are_irregular_natural_and_ignore_chunk_borders():
    x = pseudo_speech(seconds=90.0, seed=3)
    out = run(x, chunk_seconds=3.0)
    onsets = blink_onsets(out["blink"])
    intervals = np.diff(onsets) / FPS
    assert 15 <= len(onsets) <= 45  # mean interval around 3.5 s
    assert intervals.min() >= 1.1
    assert intervals.std() / intervals.mean() > 0.2
    # Not tied to 3 s chunks: onsets fall at many different positions within a chunk.
    assert len(set((onsets % 75).tolist())) > len(onsets) // 2
    # A blink closes fast and opens more slowly, lasting about a quarter second.
    k = onsets[1]
    shape = out["blink"][k - 2: k + 10]
    assert out["blink"][k - 1: k + 8].max() == pytest.approx(1.0, abs=0.05)
    closed = np.flatnonzero(shape > 0.1)
    assert 4 <= len(closed) <= 9
    peak = int(np.argmax(shape))
    assert peak - closed[0] < closed[-1] - peak


def test_blinks_prefer_pauses():
    x = pseudo_speech(seconds=120.0, seed=4)
    out = run(x)
    quiet = np.asarray([np.sqrt(np.mean(x[i * 640:(i + 1) * 640] ** 2)) < 1e-3 for i in range(len(out["blink"]))])
    onsets = blink_onsets(out["blink"])
    assert quiet[onsets].mean() > quiet.mean() + 0.1


def test_blink_off_gives_zeros(speech):
    assert not run(speech, MotionOptions(blink=False))["blink"].any()


def test_still_mode_has_no_head_motion(speech):
    assert not run(speech, MotionOptions(still=True))["head"].any()


def test_head_motion_is_gentle_and_smooth(speech):
    head = run(speech, MotionOptions(still=False, expression_scale=0.3))["head"]
    assert np.abs(head).max() < 5.0
    assert np.abs(head).std(axis=0).min() > 0.05  # every axis moves
    assert np.abs(np.diff(head, axis=0)).max() < 0.5  # degrees per frame


def test_expression_scale_scales_brow_and_head(speech):
    low = run(speech, MotionOptions(still=False, expression_scale=0.3))
    high = run(speech, MotionOptions(still=False, expression_scale=0.6))
    np.testing.assert_allclose(high["head"], 2.0 * low["head"], atol=1e-4)
    unclipped = high["brow"] < 0.999
    assert low["brow"].max() > 0.05
    np.testing.assert_allclose(high["brow"][unclipped], 2.0 * low["brow"][unclipped], atol=1e-5)
    none = run(speech, MotionOptions(still=False, expression_scale=0.0))
    assert not none["brow"].any() and not none["head"].any()
    np.testing.assert_array_equal(none["jaw"], low["jaw"])


def test_fixed_seed_is_deterministic_and_seeds_differ(speech):
    options = MotionOptions(still=False)
    a, b = run(speech, options, seed=7), run(speech, options, seed=7)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    c = run(speech, options, seed=8)
    assert not np.array_equal(a["blink"], c["blink"]) and not np.array_equal(a["head"], c["head"])
    np.testing.assert_array_equal(a["jaw"], c["jaw"])  # the mouth follows the audio, not the seed
    d = run(speech, MotionOptions(still=False, seed=8), seed=7)  # options.seed wins when set
    np.testing.assert_array_equal(c["blink"], d["blink"])


# --- hygiene -----------------------------------------------------------------------------------
def test_motion_does_not_import_torch():
    code = "import sys, lipsync.engines.classic.motion; sys.exit(1 if 'torch' in sys.modules else 0)"
    env_path = str(REPO / "src")
    done = subprocess.run([sys.executable, "-c", code], check=False, env={"PYTHONPATH": env_path}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- odd inputs --------------------------------------------------------------------------------
def _load_eval_harness():
    spec = importlib.util.spec_from_file_location("eval_motion", REPO / "bench" / "eval_motion.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_silence_file_and_odd_formats_give_sane_controls(material):
    harness = _load_eval_harness()
    silent = harness.run_motion(harness.decode(material.path("unusual/silence_3s.wav")))
    assert silent.jaw.max() < 0.02
    # the odd containers below hold this same speech (tests/material.py)
    reference = harness.run_motion(harness.decode(material.path("speech/speech_7s.wav")))
    for name in ("stereo48k_float.wav", "u8_8k.wav", "speech.mp3", "speech.ogg", "speech.flac"):
        ctl = harness.run_motion(harness.decode(material.path("unusual/" + name)))
        n = min(len(ctl.jaw), len(reference.jaw))
        # Same speech in another container: the mouth moves the same way (phones decoded from
        # 8 kHz or lossy audio differ a little, so not exactly).
        assert np.corrcoef(ctl.aperture[:n], reference.aperture[:n])[0, 1] > 0.7, name


def test_russian_speech_opens_and_rounds_the_mouth():
    harness = _load_eval_harness()
    ru = harness.run_motion(harness.decode(shared_path("speech", "ru_espeak.wav")))
    assert np.percentile(ru.jaw, 90) > 0.5 and ru.lip_round.std() > 0.1


# --- the recognizer's deletions and mishearings -------------------------------------------------
def _deletion_clip() -> tuple[np.ndarray, list]:
    """Two recognised open vowels around a stretch the recognizer called SIL: a silent stop
    closure, a loud voiced vowel (a deletion), another closure, a nasal-like murmur (voiced, all
    its power below 400 Hz: lips shut), a closure; then a pause. Returns (samples, segments)."""
    from lipsync.engines.classic.phones import PhoneSegment

    parts = [silence(0.3), vowel(700, 1100, 0.3), silence(0.12), vowel(600, 1700, 0.25), silence(0.12),
             vowel(250, 1000, 0.15, f3=2200, rms=0.05), silence(0.1), vowel(700, 1100, 0.3), silence(0.5)]
    samples = np.concatenate(parts).astype(np.float32)
    segments = [PhoneSegment("SIL", 0.0, 0.3), PhoneSegment("AA", 0.3, 0.6), PhoneSegment("SIL", 0.6, 1.34),
                PhoneSegment("AA", 1.34, 1.64), PhoneSegment("SIL", 1.64, len(samples) / SR)]
    return samples, segments


def test_a_loud_voiced_stretch_called_silence_becomes_a_vowel_closures_and_murmur_do_not():
    from lipsync.engines.classic.features import FeatureExtractor
    from lipsync.engines.classic.motion import restore_deleted_vowels
    from lipsync.engines.classic.visemes import VOWELS

    samples, segments = _deletion_clip()
    out = restore_deleted_vowels(segments, samples, FeatureExtractor(SR))
    assert out[0] == segments[0] and out[1] == segments[1] and out[-2:] == segments[-2:]
    assert out[0].start == 0.0 and out[-1].end == segments[-1].end
    assert all(a.end == pytest.approx(b.start) for a, b in itertools.pairwise(out))  # still a tiling
    added = [s for s in out[2:-2] if s.phone in VOWELS]
    assert len(added) == 1, out
    # The deleted vowel sits at 0.72-0.97 s; the closures and the murmur (1.09-1.24 s) stay SIL.
    assert added[0].start == pytest.approx(0.72, abs=0.04) and added[0].end == pytest.approx(0.97, abs=0.04)
    assert added[0].phone in ("AH", "AA")


def test_the_jaw_opens_on_a_deleted_vowel_and_stays_shut_in_closures_murmur_and_pauses(monkeypatch):
    from lipsync.engines.classic import phones

    samples, segments = _deletion_clip()
    monkeypatch.setattr(phones, "recognize", lambda x, rate=SR: list(segments))
    jaw = run(samples)["jaw"]

    def at(t: float) -> float:
        return float(jaw[int(t * FPS)])

    assert at(0.85) > 0.3  # the vowel the recognizer called silence opens the jaw
    assert at(0.45) > 0.5 and at(1.5) > 0.5  # the recognised vowels too
    assert at(0.66) < 0.05 and at(1.02) < 0.05  # silent stop closures: shut
    assert at(1.17) < 0.1  # voiced murmur (a nasal): lips stay together
    assert jaw[int(1.8 * FPS):].max() < 0.01  # the pause after speech


def test_a_close_vowel_label_on_an_open_vowel_is_reopened_true_close_vowels_are_not():
    from lipsync.engines.classic.features import FeatureExtractor
    from lipsync.engines.classic.motion import reopen_misheard_vowels
    from lipsync.engines.classic.phones import PhoneSegment

    # The last "UW" is a back rounded vowel whose F2 (950 Hz) lifts its F1-band centroid: kept.
    spec = [("AA", (700, 1100)), ("IY", (300, 2300)), ("UW", (300, 800)), ("UW", (700, 1800)), ("IH", (400, 2000)),
            ("UW", (450, 950))]
    parts, segments, t = [silence(0.2)], [PhoneSegment("SIL", 0.0, 0.2)], 0.2
    for label, (f1, f2) in spec:
        parts += [vowel(f1, f2, 0.2), silence(0.1)]
        segments += [PhoneSegment(label, t, t + 0.2), PhoneSegment("SIL", t + 0.2, t + 0.3)]
        t += 0.3
    samples = np.concatenate(parts).astype(np.float32)
    out = reopen_misheard_vowels(segments, samples, FeatureExtractor(SR))
    labels = [s.phone for s in out if s.phone != "SIL"]
    assert labels[:3] == ["AA", "IY", "UW"] and labels[4:] == ["IH", "UW"]  # kept
    assert labels[3] in ("EH", "AH")  # "UW" with an open vowel's F1: reopened
    assert [(s.start, s.end) for s in out] == [(s.start, s.end) for s in segments]
