#!/usr/bin/env python3
"""Can a small network imitate the classic engine's mouth and stay steady under microphone faults?
(issues 8 and 13; an experiment, nothing here changes the product)

    python bench/distill_mouth.py [--extra-audio DIR] [--hidden 256] [--epochs 30]
        [--speaker-share 1.0] [--shared ../shared]

Teacher: the shipped mouth (``io.condition`` then ``MotionGenerator._mouth_tracks``: PocketSphinx
all-phone phones plus the acoustic rules) on each CLEAN dev clip, five tracks per 25 fps frame
(jaw, close, round, labiodental, teeth). Student: a two-layer perceptron (ReLU, dropout 0.2,
sigmoid outputs, mean squared error, Adam 1e-3) on 40 log-mel bands (60-7600 Hz, 25 ms Hann
window, 10 ms hop, each band minus its median over the clip) of the CONDITIONED audio, 21 frames
every 20 ms around each video frame (+-200 ms). It learns from the clean clip and six randomly
faulted copies of it (pink or white noise at 5-30 dB SNR, 50/60 Hz hum with its 3rd harmonic at
-30..-15 dBFS, gain to a -50..+12 dB peak with clipping, DC offset, 16-bit rounding), each
labelled with the teacher's tracks on the clean clip. Faults are drawn from a seeded generator,
never the judged parameters of ``bench/eval_conditions.degrade``.

Leave-one-speaker-out over the dev split of ``corpus/manifest.json`` (the dev real clips' own
speech from ``.cache/realsync``, built by ``scripts/build_corpus.py``; the dev speech clips), the
VoxForge Russian recordings of ``../shared`` (in no split of the manifest: used as dev), and any
WAV files in ``--extra-audio`` (one speaker per file). Per held-out clip, on the lip gap the
renderer draws, jaw x (1 - close) x (1 - labiodental), with lipeval's memberships (closed: lowest
40 %, open: upper 50 %, speech frames only, as ``bench/recognizer_stability.py``):

  agree     share of memberships the student shares with the teacher, clean input (1 = same mouth)
  s_flip    the student's own membership changes, clean vs each single fault of
            ``eval_conditions.degrade`` (mean over the 8); t_flip: the teacher's
  noise     the same for pink noise at 10 dB SNR alone, student / teacher
  proxy     on dev real clips: realsync's real_corr / closed_agree / open_agree of the drawn gap
            against the real speaker's mouth (no rendering), for the teacher, the student, and
            their mean

``--speaker-share`` trains each fold on that share of the other speakers (a learning curve).
Needs torch (``pip install -e '.[sadtalker]'``). The extra audio used for docs/recognizer_stability.md
section 8 is the four English readings inside the ``moonshine-voice`` 0.1.5 wheel
(``pip download --no-deps moonshine-voice==0.1.5`` and unzip ``moonshine_voice/assets/*.wav``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import eval_conditions as EC
from recognizer_stability import FAULTS

SR, FPS, HOP, WIN, N_FFT, N_MELS = 16_000, 25, 160, 400, 512, 40
CONTEXT = np.arange(-20, 21, 2)  # 10 ms analysis frames around a video frame's centre: +-200 ms
TRACKS = ("jaw", "close", "round", "labiodental", "teeth")
AUGMENTED_COPIES = 6


def mel_bank() -> np.ndarray:
    """(40, 257) triangular filters, HTK mel scale 2595 log10(1 + f / 700), 60-7600 Hz."""
    f = np.linspace(0, SR / 2, N_FFT // 2 + 1)
    lo_mel, hi_mel = (2595.0 * np.log10(1.0 + h / 700.0) for h in (60.0, 7600.0))
    edges = 700.0 * (10 ** (np.linspace(lo_mel, hi_mel, N_MELS + 2) / 2595.0) - 1.0)
    bank = np.zeros((N_MELS, f.size))
    for i in range(N_MELS):
        lo, mid, hi = edges[i:i + 3]
        bank[i] = np.clip(np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)), 0.0, None)
    return bank


BANK = mel_bank()


def log_mel(x: np.ndarray) -> np.ndarray:
    """(frames, 40) log-mel energies every 10 ms, each band minus its median over the clip."""
    pad = np.concatenate([np.zeros(WIN // 2), x, np.zeros(WIN)])
    idx = np.arange(WIN)[None] + HOP * np.arange(len(x) // HOP + 1)[:, None]
    power = np.abs(np.fft.rfft(pad[idx] * np.hanning(WIN), N_FFT)) ** 2
    lm = np.log(power @ BANK.T + 1e-8)
    return (lm - np.median(lm, axis=0)).astype(np.float32)


def frame_inputs(lm: np.ndarray, n: int) -> np.ndarray:
    """(n, 21 * 40): the log-mel context of each 25 fps frame."""
    centres = np.round((np.arange(n) + 0.5) * (100 / FPS)).astype(int)
    return lm[np.clip(centres[:, None] + CONTEXT[None], 0, len(lm) - 1)].reshape(n, -1)


def random_faults(x: np.ndarray, speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random mixture of issue 13's kinds of fault (not its judged parameters)."""
    y = x.copy()
    t = np.arange(y.size) / SR
    if rng.random() < 0.5:
        w = rng.standard_normal(y.size)
        if rng.random() < 0.7:  # pink
            f = np.maximum(np.fft.rfftfreq(y.size, 1 / SR), 20.0)
            w = np.fft.irfft(np.fft.rfft(w) / np.sqrt(f), y.size)
        power = np.mean(y[speech] ** 2) if speech.any() else np.mean(y ** 2)
        y = y + w * np.sqrt(power / np.mean(w ** 2) / 10 ** (rng.uniform(5, 30) / 10))
    if rng.random() < 0.3:
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.998, 1.002)
        a = 10 ** (rng.uniform(-30, -15) / 20)
        y = y + a * (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * 3 * f0 * t + 1.0))
    y = np.clip(y * 10 ** (rng.uniform(-50, 12) / 20) / max(np.max(np.abs(y)), 1e-9), -1.0, 1.0)
    if rng.random() < 0.3:
        y = y + rng.uniform(-0.1, 0.1)
    return np.round(y * 32767.0) / 32767.0


def lip_gap(tracks: np.ndarray) -> np.ndarray:
    return tracks[:, 0] * (1.0 - tracks[:, 1]) * (1.0 - tracks[:, 3])


def membership_changes(a: np.ndarray, b: np.ndarray, speech: np.ndarray) -> float:
    lo = (a <= np.percentile(a, 40)) != (b <= np.percentile(b, 40))
    hi = (a >= np.percentile(a, 50)) != (b >= np.percentile(b, 50))
    return float(0.5 * (lo[speech].mean() + hi[speech].mean()))


def real_proxy(gap: np.ndarray, case: Path, realsync) -> tuple[float, float, float]:
    """realsync's real_corr / closed_agree / open_agree of ``gap`` (the drawn lip gap, no video)
    against the real mouth, with the judge's own speech mask, lag search and correlation
    (``realsync`` is ``../shared/eval/realsync.py`` as a module)."""
    real = np.asarray(json.loads((case / "reference.json").read_text())["opening"], float)
    n = min(len(real), len(gap))
    real, gap = real[:n], gap[:n]
    audio, _ = realsync.read_audio(case / "speech.wav")
    env = realsync.envelope_db(audio, n)
    speech = env > np.percentile(env, 95) - 30
    lag = max(range(-2, 3), key=lambda L: realsync._corr(gap, real, L, speech))
    rs = real[speech]
    gs = gap[np.clip(np.flatnonzero(speech) + lag, 0, n - 1)]
    r_lo, r_hi = np.percentile(rs, [20, 80])
    g_lo, g_hi = np.percentile(gs, [40, 60])
    return (realsync._corr(gap, real, lag, speech), float(np.mean(gs[rs <= r_lo] <= g_lo)),
            float(np.mean(gs[rs >= r_hi] >= g_hi)))


def clips(shared: Path, extra: Path | None) -> list[tuple[str, str, Path, Path | None]]:
    """(name, speaker, speech file, realsync case folder or None) of every clip used."""
    manifest = json.loads((REPO / "corpus" / "manifest.json").read_text())
    out = []
    for c in manifest["real"]["clips"]:
        if c["split"] == "dev":
            case = REPO / ".cache" / "realsync" / c["name"]
            if not (case / "speech.wav").exists():
                raise SystemExit(f"error: {case} is missing; run: python scripts/build_corpus.py")
            out.append((c["name"], c["speaker"], case / "speech.wav", case))
    out += [(Path(c["path"]).stem, c["speaker"], shared / c["path"], None)
            for c in manifest["speech"]["clips"] if c["split"] == "dev"]
    for f in sorted((shared / "assets" / "speech_ru").glob("voxforge_*.wav")):
        out.append((f.stem, "voxforge_" + f.stem.split("__")[0].split("_", 1)[1], f, None))
    if extra is not None:
        out += [(f.stem, "extra_" + f.stem, f, None) for f in sorted(extra.glob("*.wav"))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--extra-audio", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--speaker-share", type=float, default=1.0)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("error: this experiment needs torch: pip install -e '.[sadtalker]'") from None
    from lipsync.engines.classic.motion import MotionGenerator
    from lipsync.io import decode_audio
    from lipsync.io.condition import condition
    from lipsync.options import MotionOptions

    sys.path.insert(0, str(args.shared / "eval"))
    import realsync  # the judge's scoring functions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    gen = MotionGenerator(MotionOptions(), sample_rate=SR, seed=1)

    def conditioned(x: np.ndarray) -> np.ndarray:
        return condition(x, SR).samples.astype(np.float64)

    def teacher(c: np.ndarray, n: int) -> np.ndarray:
        t = gen._mouth_tracks(c.astype(np.float32), 0, n)
        return np.stack([t[k] for k in TRACKS], 1).astype(np.float32)

    data = []
    t0 = time.time()
    for name, speaker, path, case in clips(args.shared, args.extra_audio):
        x = decode_audio(str(path)).samples.astype(np.float64)
        n = int(np.ceil(len(x) * FPS / SR)) + 1
        env = np.convolve(np.abs(x), np.ones(400) / 400, "same")
        speech = env > 0.05 * np.percentile(np.abs(x), 99)
        c = conditioned(x)
        copies = [frame_inputs(log_mel(conditioned(random_faults(x, speech, rng))), n)
                  for _ in range(AUGMENTED_COPIES)]
        faults = {}
        for fault in FAULTS:
            cf = conditioned(EC.degrade(x, (fault,), speech))
            faults[fault] = (frame_inputs(log_mel(cf), n), teacher(cf, n))
        frame_speech = speech[np.minimum(np.arange(n) * (SR // FPS) + SR // (2 * FPS), len(x) - 1)]
        data.append({"name": name, "speaker": speaker, "x": frame_inputs(log_mel(c), n), "copies": copies,
                     "target": teacher(c, n), "faults": faults, "speech": frame_speech, "case": case})
        print(f"prepared {name[:40]:40s} {len(x) / SR:5.1f} s ({time.time() - t0:.0f} s)", file=sys.stderr)

    def fit(train: list[dict]):
        X = np.concatenate([np.concatenate([d["x"], *d["copies"]]) for d in train])
        Y = np.concatenate([np.tile(d["target"], (1 + len(d["copies"]), 1)) for d in train])
        mu, sd = X.mean(0), X.std(0) + 1e-6
        Xt, Yt = torch.tensor((X - mu) / sd, dtype=torch.float32), torch.tensor(Y)
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(args.hidden, len(TRACKS)))
        opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
        for _ in range(args.epochs):
            net.train()
            for b in torch.randperm(len(Xt)).split(256):
                loss = ((torch.sigmoid(net(Xt[b])) - Yt[b]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()

        def predict(Z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.sigmoid(net(torch.tensor((Z - mu) / sd, dtype=torch.float32))).numpy()
        return predict

    speakers = sorted({d["speaker"] for d in data})
    pick = np.random.default_rng(1)
    rows, proxies = [], []
    print("| clip | agree | s_flip | t_flip | noise s / t | proxy teacher | student | mean of both |")
    print("|---|---|---|---|---|---|---|---|")
    for held in speakers:
        others = [s for s in speakers if s != held]
        keep = set(pick.permutation(others)[:max(1, round(args.speaker_share * len(others)))])
        predict = fit([d for d in data if d["speaker"] in keep])
        for d in (d for d in data if d["speaker"] == held):
            s0, t0, sp = lip_gap(predict(d["x"])), lip_gap(d["target"]), d["speech"]
            s_f = [membership_changes(s0, lip_gap(predict(d["faults"][f][0])), sp) for f in FAULTS]
            t_f = [membership_changes(t0, lip_gap(d["faults"][f][1]), sp) for f in FAULTS]
            noise = FAULTS.index("noise10")
            row = (1 - membership_changes(s0, t0, sp), np.mean(s_f), np.mean(t_f), s_f[noise], t_f[noise])
            rows.append(row)
            text = ""
            if d["case"] is not None:
                both = 0.5 * (s0 / max(s0.max(), 1e-9) + t0 / max(t0.max(), 1e-9))
                p = [real_proxy(g, d["case"], realsync) for g in (t0, s0, both)]
                proxies.append(p)
                text = " | ".join(" / ".join(f"{v:.2f}" for v in q) for q in p)
            print(f"| {d['name'][:34]} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | "
                  f"{row[3]:.3f} / {row[4]:.3f} | {text or '| |'} |", flush=True)
    m = np.mean(rows, axis=0)
    print(f"mean: agree {m[0]:.3f}, s_flip {m[1]:.3f}, t_flip {m[2]:.3f}, noise {m[3]:.3f} / {m[4]:.3f}")
    if proxies:
        p = np.mean(proxies, axis=0)
        names = ("teacher", "student", "mean of both")
        print("proxy (real_corr / closed / open): "
              + ", ".join(f"{k} " + " / ".join(f"{v:.3f}" for v in q) for k, q in zip(names, p, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
