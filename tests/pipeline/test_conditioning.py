"""The pipeline conditions the audio for the engine only: the MP4 carries what the user sent.

Bundled samples only (portrait + espeak speech with hum and a low level added here).
"""
from __future__ import annotations

import wave

import av
import numpy as np
import pytest

from lipsync.pipeline import LipSyncPipeline, bundled_sample
from tests.material import wav_pcm16

SR = 16000


class _Spy:
    """The real engine, with every chunk its sessions receive recorded."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.chunks = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def start(self, *args, **kwargs):
        session = self._engine.start(*args, **kwargs)
        inner = session.render_iter

        def render_iter(chunk):
            self.chunks.append(chunk)
            return inner(chunk)

        session.render_iter = render_iter
        return session


@pytest.fixture(scope="module")
def spy_pipe(tmp_path_factory):
    base = LipSyncPipeline.from_settings(cache_dir=tmp_path_factory.mktemp("cache"), engine="classic")
    spy = _Spy(base.engine)
    return LipSyncPipeline(settings=base.settings, engine=spy, cache=base.cache), spy


def _faulty_speech(path) -> np.ndarray:
    """4 s of the bundled speech at -40 dBFS peak under -26 dBFS RMS of 50 Hz hum, 16-bit WAV."""
    with wave.open(str(bundled_sample("speech.wav")), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)[: 4 * SR] / 32768.0
    t = np.arange(x.size) / SR
    x = x / np.max(np.abs(x)) * 10 ** (-40 / 20) + 0.05 * np.sqrt(2) * np.sin(2 * np.pi * 50.0 * t)
    path.write_bytes(wav_pcm16(x))
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.float32) / 32768.0


def _muxed_audio(path) -> np.ndarray:
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
        parts = [f.to_ndarray()[0] for frame in c.decode(audio=0) for f in resampler.resample(frame)]
        parts += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float64)


def _best_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 1600) -> float:
    n = min(a.size, b.size) - 2 * max_lag
    return max(float(np.corrcoef(a[max_lag: max_lag + n], b[max_lag + lag: max_lag + lag + n])[0, 1])
               for lag in range(-max_lag, max_lag + 1, 8))


def test_engine_gets_conditioned_audio_and_the_mp4_keeps_the_original(spy_pipe, tmp_path):
    pipe, spy = spy_pipe
    raw = _faulty_speech(tmp_path / "faulty.wav")
    spy.chunks.clear()
    pipe.generate(tmp_path / "faulty.wav", tmp_path / "out.mp4", avatar=bundled_sample("portrait.png"))

    # the engine saw the repaired clip: no hum, speech at a normal level, a speech mask
    seen = np.concatenate([c.own for c in spy.chunks]).astype(np.float64)
    assert all(c.speech is not None and c.speech.shape == c.samples.shape for c in spy.chunks)
    assert any(c.speech.any() for c in spy.chunks) and not all(c.speech.all() for c in spy.chunks)
    t = np.arange(seen.size) / SR
    hum_seen = 2 * np.abs(np.mean(seen * np.exp(-2j * np.pi * 50.0 * t)))
    assert hum_seen < 0.01 * np.sqrt(np.mean(seen ** 2))
    assert 20 * np.log10(np.max(np.abs(seen))) > -12.0

    # the MP4's audio is the user's: the hum and the -40 dBFS speech are still there
    muxed = _muxed_audio(tmp_path / "out.mp4")
    assert abs(muxed.size - raw.size) <= 2048
    rms_db = 20 * np.log10(np.sqrt(np.mean(muxed ** 2)) / np.sqrt(np.mean(raw.astype(np.float64) ** 2)))
    assert abs(rms_db) < 1.0
    assert _best_corr(raw.astype(np.float64), muxed) > 0.95
    assert _best_corr(seen, muxed) < 0.5  # and not the conditioned signal


def test_sadtalker_mode_leaves_clean_audio_alone(spy_pipe):
    """An engine in "as_needed" mode (SadTalker: upstream mel parity) gets clean input bit for bit."""
    pipe, spy = spy_pipe
    clip = pipe.load_audio(bundled_sample("speech.wav"))
    original = spy._engine.audio_conditioning
    try:
        spy._engine.audio_conditioning = "as_needed"
        assert np.array_equal(pipe.condition_audio(clip).samples, clip.samples)
        spy._engine.audio_conditioning = "off"
        assert pipe.condition_audio(clip) is clip
    finally:
        spy._engine.audio_conditioning = original


def test_noisy_speech_reaches_the_engine_denoised_and_the_mp4_keeps_the_noise(spy_pipe, tmp_path):
    """Pink noise 10 dB under the speech (the classic engine's "as needed" mode): the engine gets
    the speech with the noise in its pauses pushed down; the MP4 keeps the noisy audio as sent."""
    pipe, spy = spy_pipe
    with wave.open(str(bundled_sample("speech.wav")), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)[: 6 * SR] / 32768.0
    clean = pipe.condition_audio(pipe.load_audio(bundled_sample("speech.wav")))
    mask = np.asarray(clean.speech[: x.size])
    rng = np.random.default_rng(3)
    f = np.fft.rfftfreq(x.size)
    spec = rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    pink = np.fft.irfft(spec, x.size)
    noisy = x + pink / pink.std() * np.sqrt(np.mean(x[mask] ** 2)) / np.sqrt(10.0)
    noisy = noisy / np.max(np.abs(noisy)) * 0.5
    (tmp_path / "noisy.wav").write_bytes(wav_pcm16(noisy))
    spy.chunks.clear()
    pipe.generate(tmp_path / "noisy.wav", tmp_path / "noisy.mp4", avatar=bundled_sample("portrait.png"))
    seen = np.concatenate([c.own for c in spy.chunks]).astype(np.float64)[: x.size]
    m = mask[: seen.size]

    def speech_over_pause_db(v):
        return 10 * np.log10(np.mean(v[m] ** 2) / np.mean(v[~m] ** 2))

    assert speech_over_pause_db(seen) - speech_over_pause_db(noisy[: seen.size]) >= 8.0
    muxed = _muxed_audio(tmp_path / "noisy.mp4")
    assert _best_corr(noisy, muxed) > 0.95
