#!/usr/bin/env python3
"""Benchmark of the classic engine, end to end, against an encode-only floor.

    python bench/bench_classic.py [--repeat 3] [--json out.json]

For a 10 s and a 60 s clip (the bundled speech, tiled), in one run on this machine:
- warm generate: avatar cached, process warm; median wall time of ``--repeat`` runs, and the
  median process CPU time (all threads) per second of speech;
- floor: the same number of frames of the static portrait through the same MP4 writer and
  encoder settings, with the same audio (``lipsync.video.encode_floor``);
- cold minus warm: a first request for a portrait not in the cache (face detection, crop and
  rig build) against the warm request, detector already loaded;
- peak RSS: a fresh process generating the clip (its own ``VmHWM``, see ``_peak_rss_mb``).
Prints a markdown table. Ratios are what to compare across machines, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _clip(seconds: float):
    from lipsync.io import decode_audio
    from lipsync.pipeline import bundled_sample
    from lipsync.types import AudioClip

    base = decode_audio(bundled_sample("speech.wav"))
    reps = int(np.ceil(seconds / base.duration))
    samples = np.tile(base.samples, reps)[: int(seconds * base.sample_rate)]
    return AudioClip(samples, base.sample_rate)


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB: ``VmHWM`` of /proc/self/status (Linux).

    Not ``getrusage(...).ru_maxrss``: Linux carries that across execve, so a child started by
    ``subprocess`` (vfork + exec) reports the *parent's* peak. (Elsewhere: ru_maxrss.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(seconds: float, cache: str) -> None:
    """Generate once in this (fresh) process and print the peak RSS in MB."""
    from lipsync.pipeline import LipSyncPipeline

    pipe = LipSyncPipeline.from_settings(cache_dir=cache)
    clip = _clip(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        res = pipe.generate(clip, Path(tmp) / "out.mp4")
    print(f"child: stages {res.times.as_dict()}", file=sys.stderr)
    print(_peak_rss_mb())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.cache)
        return 0

    from lipsync.avatar import default_detector, open_cache
    from lipsync.pipeline import LipSyncPipeline, bundled_sample
    from lipsync.video import encode_floor

    t0 = time.perf_counter()
    default_detector()
    detector_load = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        tmp = Path(tmp)
        warm_cache = tmp / "warm"
        pipe = LipSyncPipeline.from_settings(cache_dir=warm_cache)
        portrait = bundled_sample("portrait.png")
        avatar, _ = pipe.add_avatar(portrait)
        for seconds in args.seconds:
            clip = _clip(seconds)
            n = clip.n_frames(25)
            warm, cpu = [], []
            for _ in range(args.repeat):
                # unseen speech: start without rendered mouth patches from the previous run
                getattr(pipe.engine, "clear_caches", lambda: None)()
                t, c = time.perf_counter(), time.process_time()
                res = pipe.generate(clip, tmp / "out.mp4", avatar=avatar)
                warm.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)  # all threads: render, decoders, encoder
            floor = statistics.median(
                encode_floor(n, audio=clip, image=np.asarray(avatar.image)) for _ in range(args.repeat))
            cold = []
            for k in range(args.repeat):
                # a fresh cache and engine (no rig in memory), the same loaded detector
                settings = pipe.settings.model_copy(update={"cache_dir": tmp / f"cold{seconds}{k}"})
                cold_pipe = LipSyncPipeline(settings=settings, engine=type(pipe.engine)(),
                                            cache=open_cache(settings), detector=pipe.detector)
                t = time.perf_counter()
                cold_pipe.generate(clip, tmp / "cold.mp4", avatar=portrait)
                cold.append(time.perf_counter() - t)
            rss = float(subprocess.run(
                [sys.executable, __file__, "--child", str(seconds), "--cache", str(warm_cache)],
                stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1])
            w = statistics.median(warm)
            rows.append({
                "seconds": seconds, "frames": n, "warm_s": w, "per_speech_s": w / seconds,
                "cpu_per_speech_s": statistics.median(cpu) / seconds,
                "fps": n / w, "floor_s": floor, "ratio": w / floor,
                "cold_minus_warm_s": statistics.median(cold) - w, "peak_rss_mb": rss,
                "stages": {k: round(v, 3) for k, v in res.times.as_dict().items()},
            })
    print(f"detector load (once per process): {detector_load:.2f} s; cpu count {os.cpu_count()}")
    print("| speech | frames | warm generate | s per s of speech | CPU s per s of speech | frames/s | "
          "encode-only floor | ratio to floor | cold − warm | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seconds']:.0f} s | {r['frames']} | {r['warm_s']:.2f} s | {r['per_speech_s']:.3f} | "
              f"{r['cpu_per_speech_s']:.3f} | "
              f"{r['fps']:.0f} | {r['floor_s']:.2f} s | {r['ratio']:.2f}× | {r['cold_minus_warm_s']:.2f} s | "
              f"{r['peak_rss_mb']:.0f} MB |")
    for r in rows:
        print(f"stages {r['seconds']:.0f} s (warm, last run): {r['stages']}")
    if args.json:
        args.json.write_text(json.dumps({"detector_load_s": detector_load, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
