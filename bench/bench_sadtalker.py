"""SadTalker engine benchmark: time and peak memory per stage; on CUDA, renderer RTF and VRAM.

    PYTHONPATH=src .venv/bin/python bench/bench_sadtalker.py                     # random weights, CPU
    PYTHONPATH=src .venv/bin/python bench/bench_sadtalker.py --seconds 0.4 --json out.json
    PYTHONPATH=src .venv/bin/python bench/bench_sadtalker.py --checkpoints ~/SadTalker/checkpoints

Without ``--checkpoints`` a random-weight checkpoint set in the official layout is written to a
temporary directory from our own networks (timings do not depend on the weights' values; nothing
is downloaded). Stages on the CPU, 256 px, one short clip of the bundled speech:

    load      read the checkpoint files once and build every network
    avatar    3DMM coefficients of the bundled portrait (prepare_avatar) + the renderer's source state
    motion    Audio2Exp (+ Audio2Pose with --no-still) over the clip, chunk by chunk
    render    mapping net + keypoints + generator for every frame, resized to the output size

Peak memory is the process RSS sampled every 20 ms during the stage (psutil). When CUDA is
available it also renders at 512 px with fp32 and fp16 generators at batch sizes 1/8/32 and
reports the real-time factor (render seconds / audio seconds) and peak VRAM
(``torch.cuda.max_memory_allocated``). Results print as markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from typing_extensions import Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch

from lipsync.engines.sadtalker.checkpoints import SadTalkerCheckpoints, save_official_layout

FPS = 25


class PeakRss:
    """Peak resident memory of this process while the context is open (sampled)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class StageResult:
    stage: str
    seconds: float
    peak_rss_mb: float
    note: str = ""


@contextmanager
def stage(results: list[StageResult], name: str, note: str = ""):
    with PeakRss() as mem:
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
    results.append(StageResult(name, dt, mem.peak / 2**20, note))


def random_checkpoints(directory: Path, *, size: int, seed: int = 0) -> SadTalkerCheckpoints:
    """Our own networks with seeded default initialisation, saved in the official layout."""
    from lipsync.engines.sadtalker.audio2exp import Audio2Exp
    from lipsync.engines.sadtalker.audio2pose import Audio2Pose
    from lipsync.engines.sadtalker.face3d import ReconNet
    from lipsync.engines.sadtalker.generator import OcclusionAwareSPADEGenerator
    from lipsync.engines.sadtalker.keypoints import KPDetector
    from lipsync.engines.sadtalker.mapping import MappingNet

    torch.manual_seed(seed)
    nets = {
        "face_3drecon": ReconNet(),
        "audio2exp": Audio2Exp(),
        "audio2pose": Audio2Pose(),
        "kp_extractor": KPDetector(),
        "generator": OcclusionAwareSPADEGenerator(),
        "mapping": MappingNet(coeff_nc=70),
    }
    weights = {name: net.state_dict() for name, net in nets.items()}
    return save_official_layout(directory, weights, size=size)


def speech(seconds: float) -> np.ndarray:
    from lipsync.io import decode_audio
    from lipsync.pipeline import bundled_sample

    clip = decode_audio(bundled_sample("speech.wav"), sample_rate=16_000)
    n = int(seconds * 16_000)
    samples = np.asarray(clip.samples)
    if len(samples) < n:
        samples = np.tile(samples, n // len(samples) + 1)
    return samples[:n]


def bench_cpu(ckpt: SadTalkerCheckpoints, seconds: float, *, batch_size: int, size: int, still: bool,
              threads: int | None) -> list[StageResult]:
    from lipsync.avatar import PRECOMPUTE_VERSION, AvatarCache, precompute_avatar
    from lipsync.engines.sadtalker.engine import SadTalkerEngine
    from lipsync.io import iter_chunks, load_image
    from lipsync.pipeline import bundled_sample
    from lipsync.types import AudioClip, MotionOptions

    if threads:
        torch.set_num_threads(threads)
    results: list[StageResult] = []
    with stage(results, "load", f"{ckpt.main.name}"):
        engine = SadTalkerEngine.from_checkpoints(ckpt, device="cpu", batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cache = AvatarCache(Path(tmp), PRECOMPUTE_VERSION)
        portrait = bundled_sample("portrait.png")
        avatar, _ = precompute_avatar(load_image(portrait), cache=cache, source_bytes=portrait.read_bytes())
        directory = cache.engine_dir(avatar.id, engine.name, engine.precompute_version)
        with stage(results, "avatar", "3DMM + source keypoints/features"):
            engine.prepare_avatar(avatar, directory)
            engine._load_source(avatar, directory)
        clip = AudioClip(samples=speech(seconds), sample_rate=16_000)
        total = clip.n_frames(FPS)
        options = MotionOptions(size=size, still=still, seed=1)
        session = engine.start(avatar, options, total, assets=directory)
        motion = render = 0.0
        frames = 0
        with PeakRss() as mem:
            for chunk in iter_chunks(clip, fps=FPS, chunk_seconds=3.0, context=engine.context_for(options)):
                out = session.render(chunk)
                motion += session.last_times["motion"]
                render += session.last_times["render"]
                frames += len(out)
        assert frames == total
        results.append(StageResult("motion", motion, mem.peak / 2**20, f"{total} frames, still={still}"))
        results.append(StageResult("render", render, mem.peak / 2**20,
                                   f"{render / total:.2f} s/frame, batch {batch_size}, RTF {render / seconds:.1f}"))
    return results


@dataclass
class CudaResult:
    size: int
    dtype: str
    batch: int
    frames: int
    seconds: float
    rtf: float
    fps: float
    peak_vram_mb: float


def bench_cuda(ckpt: SadTalkerCheckpoints, *, batch_sizes: list[int], frames: int) -> list[CudaResult]:
    from lipsync.engines.sadtalker.checkpoints import load_weights
    from lipsync.engines.sadtalker.render import FaceRenderer

    device = torch.device("cuda")
    weights = load_weights(ckpt)
    rng = np.random.default_rng(0)
    coeffs = (rng.standard_normal((frames, 70)) * 0.1).astype(np.float32)
    image = rng.integers(0, 256, (ckpt.size, ckpt.size, 3), dtype=np.uint8)
    results = []
    for fp16 in (False, True):
        for batch in batch_sizes:
            renderer = FaceRenderer.from_weights(weights, size=ckpt.size, device=device, fp16=fp16, batch_size=batch)
            state = renderer.prepare_source(image, np.zeros(70, np.float32))
            renderer.render(state, coeffs[:batch])  # warm-up: kernels, cudnn autotune
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            renderer.render(state, coeffs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            audio_s = frames / FPS
            results.append(CudaResult(ckpt.size, "fp16" if fp16 else "fp32", batch, frames, dt, dt / audio_s,
                                      frames / dt, torch.cuda.max_memory_allocated() / 2**20))
            del renderer, state
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", type=Path, help="real checkpoint directory (default: random weights)")
    p.add_argument("--seconds", type=float, default=1.0, help="speech length for the CPU run (default 1.0)")
    p.add_argument("--batch-size", type=int, default=4, help="renderer batch on the CPU (default 4)")
    p.add_argument("--size", type=int, default=512, help="output size (default 512)")
    p.add_argument("--no-still", action="store_true", help="head motion on (runs Audio2Pose)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cuda-frames", type=int, default=128, help="frames per CUDA measurement (default 128)")
    p.add_argument("--cuda-batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)

    report: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "cpu_count": psutil.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        def located(size: int) -> SadTalkerCheckpoints:
            if args.checkpoints is not None:
                return SadTalkerCheckpoints.locate(args.checkpoints, size=size)
            return random_checkpoints(Path(tmp) / f"ckpt{size}", size=size)

        if not args.skip_cpu:
            cpu = bench_cpu(located(256), args.seconds, batch_size=args.batch_size, size=args.size,
                            still=not args.no_still, threads=args.threads)
            report["cpu"] = [asdict(r) for r in cpu]
            print(f"\n### CPU, 256 px checkpoints, {args.seconds:g} s clip, output {args.size} px "
                  f"({torch.get_num_threads()} torch threads)\n")
            print("| stage | seconds | peak RSS (MiB) | note |\n|---|---:|---:|---|")
            for r in cpu:
                print(f"| {r.stage} | {r.seconds:.2f} | {r.peak_rss_mb:.0f} | {r.note} |")
        if torch.cuda.is_available():
            cuda = bench_cuda(located(512), batch_sizes=args.cuda_batches, frames=args.cuda_frames)
            report["cuda"] = [asdict(r) for r in cuda]
            report["gpu"] = torch.cuda.get_device_name()
            print(f"\n### CUDA renderer ({report['gpu']}), 512 px, {args.cuda_frames} frames\n")
            print("| dtype | batch | seconds | RTF | frames/s | peak VRAM (MiB) |\n|---|---:|---:|---:|---:|---:|")
            for r in cuda:
                print(f"| {r.dtype} | {r.batch} | {r.seconds:.2f} | {r.rtf:.3f} | {r.fps:.1f} | {r.peak_vram_mb:.0f} |")
        else:
            print("\n(CUDA not available: GPU measurements skipped)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
