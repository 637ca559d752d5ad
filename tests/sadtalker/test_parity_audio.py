"""Parity of the SadTalker audio side with upstream: mel features, mel windows, Audio2Exp, Audio2Pose.

References: upstream's own code from the ``sadtalker-z`` wheel (tests/sadtalker/upstream.py) and
librosa for the spectrogram (upstream computes it with librosa; we do not use librosa at run
time). Upstream pins librosa 0.9.2, whose centred STFT pads by reflection; librosa >= 0.10 pads
with zeros by default, so the reference runs upstream's ``utils/audio.py`` with ``librosa.stft``
set to ``pad_mode='reflect'``. Networks are compared at real size with seeded random weights
(random batch-norm affine parts and calibrated running statistics, as tests/sadtalker/factory.py
makes them), strict-loaded from upstream's state dicts, fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import wave

import numpy as np
import pytest

from lipsync.engines.sadtalker import audio as A
from tests.conftest import need_module
from tests.material import wav_pcm16
from tests.sadtalker.chunking import FPS, SR, chunks, speechlike, total_frames

TOL = 1e-4


def _upstream_audio(monkeypatch):
    """Upstream's utils.audio with librosa 0.9.2's STFT padding (reflect)."""
    librosa = need_module("librosa", "librosa (the spectrogram reference) is not installed")
    from tests.sadtalker.conftest import require_upstream

    require_upstream()
    from tests.sadtalker.upstream import upstream_module

    ua = upstream_module("utils.audio")
    shim = types.SimpleNamespace(
        stft=functools.partial(librosa.stft, pad_mode="reflect"), filters=librosa.filters, core=librosa.core,
    )
    monkeypatch.setattr(ua, "librosa", shim)
    monkeypatch.setattr(ua, "_mel_basis", None)
    return ua


def _write_wav(path, samples: np.ndarray) -> np.ndarray:
    """Write 16-bit PCM and return the float32 samples a decoder reads back."""
    path.write_bytes(wav_pcm16(samples, SR))
    return np.clip(np.round(samples * 32767), -32768, 32767).astype(np.float32) / 32768.0


def _read_wav(path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


# --- mel spectrogram -------------------------------------------------------------------------
def test_mel_filterbank_matches_librosa():
    librosa = need_module("librosa", "librosa (the filterbank reference) is not installed")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    ours = A.mel_filterbank()
    assert ours.shape == ref.shape == (80, 401)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)


def test_mel_filterbank_is_slaney_shaped():
    """Independent of librosa: Slaney mel scale centres, unit-area triangles (wide enough to sum)."""
    bank = A.mel_filterbank().astype(np.float64)
    freqs = np.fft.rfftfreq(800, 1 / 16000)
    edges = A.mel_to_hz(np.linspace(A.hz_to_mel(55.0), A.hz_to_mel(7600.0), 82))
    # The Slaney scale: linear (200/3 Hz per mel) to 1 kHz, then 27 mels per factor 6.4.
    assert A.hz_to_mel(1000.0) == pytest.approx(15.0)
    assert A.hz_to_mel(6400.0) == pytest.approx(42.0)
    hz = np.array([55.0, 700.0, 3000.0])
    np.testing.assert_allclose(A.mel_to_hz(A.hz_to_mel(hz)), hz)
    peaks = freqs[bank.argmax(axis=1)]
    assert np.all(np.abs(peaks - edges[1:-1]) <= 10.0 + 1e-9)  # nearest 20 Hz bin
    areas = bank.sum(axis=1) * (freqs[1] - freqs[0])
    wide = (edges[2:] - edges[:-2]) > 150  # at least 7 bins under the triangle
    assert wide.sum() > 30
    np.testing.assert_allclose(areas[wide], 1.0, atol=0.015)
    assert np.all(bank >= 0) and np.all(bank[:, freqs > 7600] == 0) and np.all(bank[:, freqs < 55] == 0)


def test_mel_spectrogram_matches_upstream(monkeypatch):
    ua = _upstream_audio(monkeypatch)
    wav = speechlike(2.3, seed=1)
    wav[:4000] = 0.0  # silence: the -100 dB floor and the clipping at -4
    ref = ua.melspectrogram(wav).T
    ours = A.mel_spectrogram(wav)
    assert ours.shape == ref.shape == (A.n_mel_frames(len(wav)), 80)
    assert ours.dtype == np.float32
    assert ours.min() == -4.0 and ours.max() > 0  # the range is really exercised
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_mel_spectrogram_matches_upstream_on_speech(monkeypatch, material):
    path = material.path("speech/speech_3s.wav")  # the first 3 s of the bundled speech
    ua = _upstream_audio(monkeypatch)
    wav = _read_wav(path)
    np.testing.assert_allclose(A.mel_spectrogram(wav), ua.melspectrogram(wav).T, rtol=0, atol=TOL)


def test_mel_windows_match_upstream_get_data(monkeypatch, tmp_path):
    """Upstream's whole audio path: frame count, crop/pad, spectrogram and per-frame windows."""
    ua = _upstream_audio(monkeypatch)
    from tests.sadtalker.upstream import upstream_module

    get_data = upstream_module("generate_batch").get_data
    assert upstream_module("generate_batch").audio is ua  # the patched module is the one it uses
    from scipy.io import savemat

    savemat(tmp_path / "first.mat", {"coeff_3dmm": np.zeros((1, 73), np.float32)})
    wav = _write_wav(tmp_path / "a.wav", speechlike(1.93, seed=2))  # not a whole number of frames
    batch = get_data(str(tmp_path / "first.mat"), str(tmp_path / "a.wav"), "cpu", None)
    ref = batch["indiv_mels"][0].numpy()  # (T, 1, 80, 16)
    n = batch["num_frames"]
    assert n == int(len(wav) / 640)
    clip = wav[: A.clip_samples(n)]
    ours = A.mel_windows(A.mel_spectrogram(clip), 0, n, 25)
    assert ours.shape == ref.shape == (n, 1, 80, 16)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


# --- chunked windows -------------------------------------------------------------------------
def _whole_clip_windows(wav: np.ndarray, n: int) -> np.ndarray:
    """Upstream's rule for a clip of n frames: crop or zero-pad to n * 640 samples, then window."""
    clip = np.zeros(A.clip_samples(n), np.float32)
    m = min(len(wav), len(clip))
    clip[:m] = wav[:m]
    return A.mel_windows(A.mel_spectrogram(clip), 0, n, FPS)


@pytest.mark.parametrize("seconds", [7.13, 3.0, 0.31, 6.012])
@pytest.mark.parametrize("sizes", [75, [75, 74, 1], 13, 1])
def test_chunked_windows_equal_whole_clip(seconds, sizes):
    wav = speechlike(seconds, seed=3)
    n = total_frames(wav)
    whole = _whole_clip_windows(wav, n)
    cut = chunks(wav, sizes, A.CONTEXT_SECONDS)
    got = np.concatenate([A.chunk_mel_windows(c, total_frames=n) for c in cut])
    assert got.shape == whole.shape
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("seconds", [7.13, 9.04])  # 9.04 s: the last 3 s chunk is a single frame
def test_chunked_windows_equal_whole_clip_with_the_pipeline_chunker(seconds):
    from lipsync.io.audio import iter_chunks
    from lipsync.types import AudioClip

    clip = AudioClip(samples=speechlike(seconds, seed=6), sample_rate=SR)
    n = clip.n_frames(FPS)
    cut = iter_chunks(clip, fps=FPS, chunk_seconds=3.0, context=A.CONTEXT_SECONDS)
    got = np.concatenate([A.chunk_mel_windows(c, total_frames=n) for c in cut])
    np.testing.assert_array_equal(got, _whole_clip_windows(np.asarray(clip.samples), n))


def test_chunked_windows_without_total_frames_use_the_last_chunk():
    wav = speechlike(7.5, seed=4)  # 3 s chunks, the last one 1.5 s: no clamping reaches back a chunk
    n = total_frames(wav)
    got = np.concatenate([A.chunk_mel_windows(c) for c in chunks(wav, 75, A.CONTEXT_SECONDS)])
    np.testing.assert_array_equal(got, _whole_clip_windows(wav, n))


def test_context_seconds_is_enough_and_not_wasteful():
    wav = speechlike(4.0, seed=5)
    n = total_frames(wav)
    before, after = A.CONTEXT_SECONDS
    assert before < 0.2 and after < 0.2
    for context, where in [((before - 0.02, after), "before"), ((before, after - 0.02), "after")]:
        with pytest.raises(ValueError, match=f"more audio context {where}"):
            for c in chunks(wav, 40, context):
                A.chunk_mel_windows(c, total_frames=n)


def test_chunk_rejects_wrong_sample_rate():
    wav = speechlike(1.0)
    chunk = next(chunks(wav, 25, A.CONTEXT_SECONDS))
    bad = dataclasses.replace(chunk, sample_rate=22050)
    with pytest.raises(ValueError, match="16000 Hz"):
        A.chunk_mel_windows(bad)


# --- networks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream_nets():
    """Upstream's SimpleWrapperV2 and Audio2Pose with seeded random weights, in eval mode."""
    from tests.sadtalker.conftest import require_upstream

    require_upstream()
    import torch

    from tests.sadtalker.factory import _calibrate_bn, _randomise_, audio2pose_config
    from tests.sadtalker.upstream import upstream_module

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        g = torch.Generator().manual_seed(12)

        def mels(n: int) -> torch.Tensor:  # mel features are normalised to [-4, 4]
            return torch.rand(n, 1, 80, 16, generator=g) * 8 - 4

        exp_net = upstream_module("audio2exp_models.networks").SimpleWrapperV2()
        _randomise_(exp_net, g)
        _calibrate_bn(exp_net, lambda: exp_net.audio_encoder(mels(8)))
        a2p = upstream_module("audio2pose_models.audio2pose")
        pose_net = a2p.Audio2Pose(audio2pose_config(), None, device="cpu")
        _randomise_(pose_net, g)

        def run_pose() -> None:
            emb = pose_net.audio_encoder(mels(64).view(2, 32, 1, 80, 16))
            pose_net.netG.test({"z": torch.randn(2, 64, generator=g), "class": torch.tensor([0, 5]),
                                "ref": torch.randn(2, 6, generator=g) * 0.2, "audio_emb": emb})
            pose_net.netD_motion(torch.randn(2, 32, 6, generator=g))

        _calibrate_bn(pose_net, run_pose)
    exp_net.eval().requires_grad_(False)
    pose_net.eval().requires_grad_(False)
    return types.SimpleNamespace(exp=exp_net, pose=pose_net, module=upstream_module)


def _windows(n: int, seed: int):
    import torch

    wav = speechlike(n / FPS + 0.2, seed=seed)
    return torch.from_numpy(A.mel_windows(A.mel_spectrogram(wav), 0, n, FPS))


@pytest.mark.slow
def test_audio2exp_matches_upstream(upstream_nets):
    import torch

    from lipsync.engines.sadtalker.audio2exp import Audio2Exp

    ours = Audio2Exp()
    ours.load_state_dict(upstream_nets.exp.state_dict(), strict=True)
    ours.eval()
    T = 23  # upstream runs groups of 10 frames: 10 + 10 + 3
    mels = _windows(T, seed=6)
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(1, 1, 70, generator=gen) * 0.5
    ratio = torch.zeros(1, T, 1)
    ratio[0, 5:10, 0] = torch.tensor([0.5, 0.9, 1.0, 0.9, 0.5])
    a2e = upstream_nets.module("audio2exp_models.audio2exp")
    wrapper = a2e.Audio2Exp(upstream_nets.exp, None, device="cpu")
    with torch.no_grad():
        batch = {"indiv_mels": mels[None], "ref": source.repeat(1, T, 1), "ratio_gt": ratio}
        ref = wrapper.test(batch)["exp_coeff_pred"][0]
    got = ours.predict(mels, source[0, 0, :64], ratio[0, :, 0])
    assert got.shape == ref.shape == (T, 64)
    assert ref.abs().max() > 0.1 and (ref[6] - ref[15]).abs().max() > 1e-3  # not a degenerate output
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)


@pytest.mark.slow
def test_audio2pose_loads_the_official_state_dict_strictly(upstream_nets):
    import torch

    from lipsync.engines.sadtalker.audio2pose import Audio2Pose

    official = upstream_nets.pose.state_dict()
    ours = Audio2Pose()
    ours.load_state_dict(official, strict=True)
    ignored = [k for k in official if k.startswith(Audio2Pose.checkpoint_ignored_prefixes)]
    assert ignored and set(ours.state_dict()) == set(official) - set(ignored)
    # Training-only parts are not built: about half of upstream's parameters.
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params < 0.6 * sum(p.numel() for p in upstream_nets.pose.parameters())
    # The keys the network does use are still checked.
    broken = dict(official)
    del broken["netG.decoder.pose_linear.weight"]
    with pytest.raises(RuntimeError, match="pose_linear"):
        Audio2Pose().load_state_dict(broken, strict=True)
    broken = dict(official)
    broken["netG.decoder.classbias"] = torch.zeros(45, 64)
    with pytest.raises(RuntimeError, match="classbias"):
        Audio2Pose().load_state_dict(broken, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("T", [20, 40, 65])  # shorter than a block (padded), 1 block + rest, 2 blocks
def test_audio2pose_matches_upstream_with_fixed_noise(upstream_nets, T):
    import torch

    from lipsync.engines.sadtalker.audio2pose import Audio2Pose

    ours = Audio2Pose()
    ours.load_state_dict(upstream_nets.pose.state_dict(), strict=True)
    ours.eval()
    mels = _windows(T, seed=7)
    source = torch.randn(1, 1, 70, generator=torch.Generator().manual_seed(2)) * 0.3
    style = 17
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # upstream draws torch.randn(1, 64) per block, in order
        with torch.no_grad():
            ref = upstream_nets.pose.test(
                {"ref": source, "class": torch.LongTensor([style]), "indiv_mels": mels[None], "num_frames": T}
            )["pose_pred"][0]
        torch.manual_seed(123)
        noise = torch.cat([torch.randn(1, 64) for _ in range(Audio2Pose.noise_blocks(T))])
    got = ours.predict_clip(mels, source[0, 0, -6:], style, noise)
    assert got.shape == ref.shape == (T, 6)
    assert (ref[1:] - ref[:1]).abs().max() > 1e-3  # the head really moves
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
    # The noise is an input: another draw gives another motion.
    other_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    other = ours.predict_clip(mels, source[0, 0, -6:], style, other_noise)
    assert (other - got).abs().max() > 1e-3


def test_pipeline_hands_sadtalker_clean_speech_untouched(material):
    """The pipeline conditions audio in the engine's mode; SadTalker's keeps clean real speech bit
    for bit, so the mel features above stay upstream's (faults such as DC or hum are still repaired)."""
    from lipsync.engines.sadtalker.engine import SadTalkerEngine
    from lipsync.io.condition import condition

    assert SadTalkerEngine.audio_conditioning == "as_needed"
    for name in ("speech/speech_3s.wav", "speech/speech_7s.wav"):  # real speech, clean
        wav = _read_wav(material.path(name))
        out = condition(wav, SR, mode=SadTalkerEngine.audio_conditioning)
        assert np.array_equal(out.samples, wav), name
        assert np.array_equal(A.mel_spectrogram(out.samples), A.mel_spectrogram(wav))
