#!/usr/bin/env python3
"""How far do issue 13's microphone faults move the classic engine's mouth, and where does it move?

    python bench/recognizer_stability.py [--denoise none|rnnoise|webrtc] [--fixed-phones]
        [--mode as_needed|full] [--set NAME=VALUE ...] [--shared ../shared]

For every DEV speech clip of ``corpus/manifest.json`` (the dev real clips' own speech, prepared by
``scripts/build_corpus.py`` into ``.cache/realsync``, plus the dev speech-only clips), the clip and
each single fault of ``bench/eval_conditions.degrade`` (dither, DC, 50/60 Hz hum, pink noise at
10 dB SNR, -45/-50 dBFS, +12 dB clipped) go through the product's conditioning
(``io.condition``) and the motion model's mouth (``MotionGenerator._mouth_tracks``). The mouth is
summarised as the drawn lip gap's ranking quantity, jaw x (1 - closure) x (1 - labiodental)
(``render.coefficients_batch``), one value per 25 fps frame.

The figure is lipeval's: a frame is "closed" when its gap is in the clip's lowest 40 % and "open"
in its upper 50 % (``../shared/eval/lipeval.py --phones``). Per clip and fault: the share of
speech frames (frames whose 25 ms moving mean of |x| exceeds 5 % of the clip's 99th percentile)
whose closed or open membership differs from the clean clip's, averaged over the two. 0 means
the faulty clip would be judged exactly like the clean one.

Options, for experiments (none of them changes the product):
  --fixed-phones  decode the clean clip once and give the motion model those phones for every
                  fault: what is left is what conditioning, pause gate and features move;
  --denoise       a speech denoiser between conditioning and the motion model: RNNoise
                  (``pip install pyrnnoise``: Xiph's recurrent network, 48 kHz, its weights in
                  the library) or WebRTC's noise suppression (``pip install webrtc-noise-gain``,
                  level 2, automatic gain off); each delay is measured and compensated;
  --set           a constant of ``engines.classic.phones`` (e.g. BEAM=1e-48, LANGUAGE_WEIGHT=1).

Prints a table (one row per clip, one column per fault), the mean per fault, the mean over all,
and the CPU seconds of conditioning plus mouth per second of clean speech.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import eval_conditions as EC

SR = 16_000
FPS = 25
FAULTS = ("dither", "dc", "hum50", "hum60", "noise10", "m45", "m50", "clip12")
RNNOISE_RATE, RNNOISE_FRAME, RNNOISE_DELAY_FRAMES = 48_000, 480, 2  # delay: measured, 20 ms
WEBRTC_DELAY = 96  # samples at 16 kHz (6 ms), measured by cross-correlation with the input


def dev_clips(shared: Path) -> list[tuple[str, Path]]:
    """(name, 16 kHz speech file) of every dev clip in the manifest."""
    manifest = json.loads((REPO / "corpus" / "manifest.json").read_text())
    out = []
    for c in manifest["real"]["clips"]:
        if c["split"] == "dev":
            wav = REPO / ".cache" / "realsync" / c["name"] / "speech.wav"
            if not wav.exists():
                raise SystemExit(f"error: {wav} is missing; run: python scripts/build_corpus.py")
            out.append((c["name"], wav))
    for c in manifest["speech"]["clips"]:
        if c["split"] == "dev":
            out.append((Path(c["path"]).stem, shared / c["path"]))
    return out


def rnnoise(x: np.ndarray) -> np.ndarray:
    """RNNoise over 16 kHz float audio (resampled to 48 kHz and back), delay compensated."""
    from pyrnnoise import rnnoise as rn
    from scipy.signal import resample_poly

    state = rn.create()
    try:
        y = resample_poly(x, 3, 1) * 32767.0
        tail = (-len(y)) % RNNOISE_FRAME + RNNOISE_DELAY_FRAMES * RNNOISE_FRAME
        y = np.concatenate([y, np.zeros(tail)]).astype(np.float32)
        for i in range(0, len(y), RNNOISE_FRAME):
            frame = np.ascontiguousarray(y[i:i + RNNOISE_FRAME])
            ptr = frame.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rn.lib.rnnoise_process_frame(state, ptr, ptr)
            y[i:i + RNNOISE_FRAME] = frame
    finally:
        rn.destroy(state)
    start = RNNOISE_DELAY_FRAMES * RNNOISE_FRAME
    return resample_poly(y[start:start + 3 * len(x)] / 32767.0, 1, 3)[: len(x)]


def webrtc(x: np.ndarray) -> np.ndarray:
    """WebRTC noise suppression (level 2, no gain control) over 16 kHz float audio."""
    from webrtc_noise_gain import AudioProcessor

    proc = AudioProcessor(0, 2)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % 160 + 160, "<i2")])
    out = [np.frombuffer(proc.Process10ms(pcm[i:i + 160].tobytes()).audio, "<i2")
           for i in range(0, len(pcm), 160)]
    return np.concatenate(out)[WEBRTC_DELAY:WEBRTC_DELAY + len(x)] / 32768.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--denoise", choices=("none", "rnnoise", "webrtc"), default="none")
    ap.add_argument("--fixed-phones", action="store_true")
    ap.add_argument("--mode", choices=("as_needed", "full"), default="as_needed")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()

    from lipsync.engines.classic import phones
    from lipsync.engines.classic.motion import MotionGenerator
    from lipsync.io import decode_audio
    from lipsync.io.condition import condition
    from lipsync.options import MotionOptions

    for kv in args.set:
        name, _, value = kv.partition("=")
        if not hasattr(phones, name):
            raise SystemExit(f"error: engines.classic.phones has no constant {name!r}")
        setattr(phones, name, type(getattr(phones, name))(float(value)))
    phones._local = threading.local()  # decoders made from now on see the constants
    denoise = {"none": None, "rnnoise": rnnoise, "webrtc": webrtc}[args.denoise]
    needs = {"rnnoise": ("pyrnnoise", "pyrnnoise"), "webrtc": ("webrtc_noise_gain", "webrtc-noise-gain")}
    if args.denoise in needs and importlib.util.find_spec(needs[args.denoise][0]) is None:
        raise SystemExit(f"error: --denoise {args.denoise} needs: pip install {needs[args.denoise][1]}")
    gen = MotionGenerator(MotionOptions(), sample_rate=SR, seed=1)
    recognize = phones.recognize

    def conditioned(x: np.ndarray) -> np.ndarray:
        c = condition(x, SR, mode=args.mode).samples.astype(np.float64)
        return denoise(c) if denoise else c

    def gap(x: np.ndarray) -> np.ndarray:
        n = int(np.ceil(len(x) * FPS / SR)) + 1
        t = gen._mouth_tracks(conditioned(x).astype(np.float32), 0, n)
        return t["jaw"] * (1.0 - t["close"]) * (1.0 - t["labiodental"])

    per_fault: dict[str, list[float]] = {f: [] for f in FAULTS}
    cpu = seconds = 0.0
    print("| clip | " + " | ".join(FAULTS) + " |")
    print("|---|" + "---|" * len(FAULTS))
    for name, path in dev_clips(args.shared):
        x = decode_audio(str(path)).samples.astype(np.float64)
        env = np.convolve(np.abs(x), np.ones(400) / 400, "same")
        speech = env > 0.05 * np.percentile(np.abs(x), 99)
        phones.recognize = recognize
        if args.fixed_phones:
            fixed = recognize(conditioned(x).astype(np.float32), SR)
            phones.recognize = lambda *_a, _s=fixed, **_k: _s
        t0 = time.process_time()
        g0 = gap(x)
        cpu += time.process_time() - t0
        seconds += len(x) / SR
        frame_speech = speech[np.minimum(np.arange(len(g0)) * (SR // FPS) + SR // (2 * FPS), len(x) - 1)]
        row = []
        for fault in FAULTS:
            g = gap(EC.degrade(x, (fault,), speech))
            m = min(len(g), len(g0))
            a, b, sp = g0[:m], g[:m], frame_speech[:m]
            lo = (a <= np.percentile(a, 40)) != (b <= np.percentile(b, 40))
            hi = (a >= np.percentile(a, 50)) != (b >= np.percentile(b, 50))
            flips = 0.5 * (lo[sp].mean() + hi[sp].mean())
            per_fault[fault].append(float(flips))
            row.append(flips)
        print(f"| {name[:40]} | " + " | ".join(f"{r:.3f}" for r in row) + " |", flush=True)
    means = {f: float(np.mean(v)) for f, v in per_fault.items()}
    print("| **mean** | " + " | ".join(f"**{means[f]:.3f}**" for f in FAULTS) + " |")
    print(f"mean over faults {np.mean(list(means.values())):.3f}; conditioning + mouth "
          f"{cpu / seconds:.3f} s of CPU per s of clean speech")
    return 0


if __name__ == "__main__":
    sys.exit(main())
