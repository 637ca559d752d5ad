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

Peak memory is the process RSS sampled every 20 ms during the stage (psutil).

When CUDA is available (``--skip-cpu`` on a GPU machine; ``bench/gpu_session.sh`` runs it
there with the wheels and avatar cache it needs), ``--sections`` picks:

    matrix     the renderer at each checkpoint size x fp32/fp16/bf16 x batch 1/8/32: seconds of GPU
               per second of speech (frames on the host), peak VRAM
    precision  fp16 and bf16 generator frames against true fp32 (TF32 off)
    steps      each speed-up in turn at fp16, batch ``--steps-batch``: NCHW, channels-last, sliced
               upsampling blocks, CUDA graphs, I420 on the GPU
    e2e        the real pipeline: first streamed bytes, whole stream, faststart file, rendering
               and encoding apart (``--e2e-compile`` turns on LIPSYNC_TORCH_COMPILE)
    compile    torch.compile of the decoder and hourglass, compile time included

``matrix`` and ``compile`` build renderers as the product did when the README's figures were
taken (channels-last, CUDA graphs, sliced upsampling, I420): the ``steps`` table is what moved
the product's defaults since. Results print as they come and as markdown tables at the end;
``--json`` is rewritten after every section, so a run cut short keeps what it measured.
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
    reserved_vram_mb: float
    note: str = ""


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _free_cuda() -> None:
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _renderer(weights, size: int, *, dtype: str = "fp16", batch: int = 8, channels_last: bool = True,
              upsample_slice: int | None = "auto", cuda_graphs: bool = True):
    """A CUDA FaceRenderer as the engine builds it, with each speed-up switchable for the steps table."""
    from lipsync.engines.sadtalker.engine import auto_upsample_slice
    from lipsync.engines.sadtalker.render import FaceRenderer

    if upsample_slice == "auto":
        upsample_slice = auto_upsample_slice(size, "cuda")
    renderer = FaceRenderer.from_weights(weights, size=size, device="cpu", fp16=False, batch_size=batch,
                                         upsample_slice=upsample_slice)
    return renderer.to_runtime("cuda", frame_dtype=DTYPES[dtype], channels_last=channels_last,
                               cuda_graphs=cuda_graphs)


def _time_render(renderer, state, coeffs: np.ndarray, *, repeats: int = 2, **kw) -> tuple[float, float, float]:
    """(seconds of the fastest of ``repeats`` renders, peak allocated MiB, peak reserved MiB).

    One warm-up render of a full batch and a short one first (cuDNN autotuning, graph capture,
    compiling); the peaks are the steady state's: taken over the timed renders, weights included.
    cuDNN's autotuning tries algorithms with large workspaces during the warm-up when the GPU
    has room; ``warmup_peak_mb`` in the steps table records that peak too.
    """
    renderer.render(state, coeffs[: renderer.batch_size + 1], **kw)
    torch.cuda.synchronize()
    _time_render.warmup_peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        renderer.render(state, coeffs, **kw)  # ends with the frames on the host
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20


def _inputs(size: int, frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coeffs = (rng.standard_normal((frames, 70)) * 0.1).astype(np.float32)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return coeffs, image


def bench_cuda(weights_by_size: dict, *, batch_sizes: list[int], frames: int,
               dtypes: list[str]) -> list[CudaResult]:
    """The product's renderer (all speed-ups on) at each size, dtype and batch."""
    results = []
    for size, weights in weights_by_size.items():
        coeffs, image = _inputs(size, frames)
        for dtype in dtypes:
            for batch in batch_sizes:
                _free_cuda()
                try:
                    renderer = _renderer(weights, size, dtype=dtype, batch=batch)
                    state = renderer.prepare_source(image, np.zeros(70, np.float32))
                    dt, peak, reserved = _time_render(renderer, state, coeffs, pixel_format="yuv420p")
                    results.append(CudaResult(size, dtype, batch, frames, dt, dt * FPS / frames, frames / dt,
                                              peak, reserved, f"upsample slice {renderer.upsample_slice}"))
                except torch.cuda.OutOfMemoryError as e:
                    results.append(CudaResult(size, dtype, batch, frames, float("nan"), float("nan"),
                                              float("nan"), float("nan"), float("nan"), f"OOM: {e}"[:80]))
                finally:
                    renderer = state = None
                print(_row(results[-1]), flush=True)
    return results


def _row(r: CudaResult) -> str:
    return (f"| {r.size} | {r.dtype} | {r.batch} | {r.seconds:.3f} | {r.rtf:.4f} | {r.fps:.1f} | "
            f"{r.peak_vram_mb:.0f} | {r.reserved_vram_mb:.0f} | {r.note} |")


def precision_check(weights_by_size: dict, frames: int = 16) -> list[dict]:
    """Generator frames (floats in [0, 1]) of fp16 and bf16 against fp32, same inputs, eager."""
    out = []
    for size, weights in weights_by_size.items():
        coeffs, image = _inputs(size, frames, seed=3)
        got = {}
        for dtype in ("fp32", "fp16", "bf16"):
            _free_cuda()
            renderer = _renderer(weights, size, dtype=dtype, batch=8, cuda_graphs=False)
            if dtype == "fp32":  # the reference in true fp32 (no TF32 in its convs)
                torch.backends.cudnn.allow_tf32 = False
            state = renderer.prepare_source(image, np.zeros(70, np.float32))
            kp = renderer.driving_keypoints(state, coeffs)
            with torch.inference_mode():
                got[dtype] = torch.cat([renderer.generate(state, kp[i:i + 8]).float() for i in range(0, frames, 8)])
            torch.backends.cudnn.allow_tf32 = True
            renderer = state = None
        ref = got["fp32"]
        for dtype in ("fp16", "bf16"):
            diff = (got[dtype] - ref).abs()
            u8 = ((got[dtype] * 255).round() - (ref * 255).round()).abs()
            out.append({"size": size, "dtype": dtype, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                        "max_uint8_levels": float(u8.max()), "frame_std": float(ref.std())})
            print(out[-1], flush=True)
    return out


def speed_steps(weights, size: int, *, batch: int, frames: int) -> list[dict]:
    """Each speed-up in turn at one size, fp16, ``batch`` frames per generator call (cumulative)."""
    coeffs, image = _inputs(size, frames, seed=5)
    steps = [
        ("fp16 eager, NCHW, whole-batch decoder, RGB out", {"channels_last": False, "upsample_slice": None,
                                                           "cuda_graphs": False}, "rgb24"),
        ("+ channels-last", {"channels_last": True, "upsample_slice": None, "cuda_graphs": False}, "rgb24"),
        ("+ upsampling blocks sliced (memory)", {"channels_last": True, "cuda_graphs": False}, "rgb24"),
        ("+ CUDA graph per batch shape", {"channels_last": True, "cuda_graphs": True}, "rgb24"),
        ("+ I420 converted on the GPU", {"channels_last": True, "cuda_graphs": True}, "yuv420p"),
    ]
    out = []
    for name, kw, fmt in steps:
        _free_cuda()
        renderer = _renderer(weights, size, dtype="fp16", batch=batch, **kw)
        state = renderer.prepare_source(image, np.zeros(70, np.float32))
        dt, peak, reserved = _time_render(renderer, state, coeffs, pixel_format=fmt)
        out.append({"size": size, "step": name, "seconds": dt, "rtf": dt * FPS / frames, "peak_vram_mb": peak,
                    "reserved_vram_mb": reserved, "warmup_peak_mb": _time_render.warmup_peak})
        print(out[-1], flush=True)
        renderer = state = None
    return out


COMPILE_LAYOUTS = {"cl+graphs": (True, True), "nchw+graphs": (False, True), "nchw": (False, False),
                   "cl": (True, False)}


def compile_step(weights, size: int, *, batch: int, frames: int, layout: str = "cl+graphs") -> dict:
    """torch.compile (inductor, default mode) on the per-frame modules, in one memory layout, with or
    without the CUDA graph per batch (``layout``: a key of ``COMPILE_LAYOUTS``; the engine's
    ``torch_compile`` setting uses "cl+graphs")."""
    coeffs, image = _inputs(size, frames, seed=5)
    _free_cuda()
    channels_last, graphs = COMPILE_LAYOUTS[layout]
    renderer = _renderer(weights, size, dtype="fp16", batch=batch, channels_last=channels_last, cuda_graphs=graphs)
    gen = renderer.generator
    dm = gen.dense_motion_network
    t0 = time.perf_counter()
    gen.decoder = torch.compile(gen.decoder, dynamic=False)
    dm.hourglass = torch.compile(dm.hourglass, dynamic=False)
    state = renderer.prepare_source(image, np.zeros(70, np.float32))
    renderer.render(state, coeffs[:batch], pixel_format="yuv420p")  # compiles
    compile_s = time.perf_counter() - t0
    dt, peak, reserved = _time_render(renderer, state, coeffs, pixel_format="yuv420p")
    return {"size": size, "step": f"torch.compile (decoder, hourglass), {layout}", "seconds": dt,
            "rtf": dt * FPS / frames,
            "peak_vram_mb": peak, "reserved_vram_mb": reserved, "compile_seconds": compile_s}


def end_to_end(ckpt_dir: Path, cache_dir: Path, *, size: int, seconds: float, out_dir: Path | None,
               device: str = "cuda", compile: bool = False) -> dict:
    """The real pipeline on CUDA: a streamed and a file render of ``seconds`` of the bundled speech.

    First byte = from calling ``stream`` to the first bytes it yields (the init segment and the
    first batch's fragment come together); measured for a new avatar state (its CUDA graph is
    captured inside), again warm, and warm for a clip of another length. Also: render alone,
    the encoder alone, and both overlapped.
    """
    from lipsync.io import decode_audio
    from lipsync.pipeline import LipSyncPipeline, bundled_sample
    from lipsync.settings import Settings
    from lipsync.types import AudioClip
    from lipsync.video import Mp4Writer

    cuda = device == "cuda"
    settings = Settings(engine="sadtalker", device=device, checkpoints=ckpt_dir, cache_dir=cache_dir,
                        sadtalker_size=size, torch_compile=compile)
    if cuda:
        _free_cuda()
    t0 = time.perf_counter()
    pipe = LipSyncPipeline.from_settings(settings)
    pipe.warmup()
    load_s = time.perf_counter() - t0
    avatar = pipe.default_avatar()
    clip = decode_audio(bundled_sample("speech.wav"), sample_rate=16_000)
    n = int(seconds * 16_000)
    samples = np.asarray(clip.samples)
    samples = np.tile(samples, n // len(samples) + 1)[:n]
    clip = AudioClip(samples=samples, sample_rate=16_000)
    report = {"checkpoint_size": size, "output_size": 512, "seconds": seconds, "load_and_warmup_s": load_s,
              "torch_compile": compile,
              "batch_size": pipe.engine.renderer.batch_size, "upsample_slice": pipe.engine.renderer.upsample_slice}

    def stream(label: str, clip: AudioClip = clip) -> None:
        t0 = time.perf_counter()
        first = None
        total = 0
        blob = bytearray()
        for data in pipe.stream(clip, avatar=avatar):
            if first is None:
                first = time.perf_counter() - t0
                report[f"{label}_first_has_moof"] = b"moof" in data
            total += len(data)
            blob += data
        dt = time.perf_counter() - t0
        report[f"{label}_first_byte_s"] = first
        report[f"{label}_stream_s"] = dt
        report[f"{label}_stream_rtf"] = dt / (len(clip.samples) / clip.sample_rate)
        if out_dir is not None and label == "warm":
            (out_dir / f"stream_{size}.mp4").write_bytes(bytes(blob))

    stream("new_avatar_state")
    stream("warm")
    # another length: its chunks end in batch sizes the first clip's did not (cuDNN's kernel
    # timing per new shape shows here unless the shapes are padded and warmed)
    other = AudioClip(samples=samples[: int(n * 0.737)], sample_rate=16_000)
    report["other_length_seconds"] = len(other.samples) / 16_000
    stream("other_length", other)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = pipe.generate(clip, Path(tmp) / "out.mp4", avatar=avatar)
        report["file_s"] = time.perf_counter() - t0
        report["file_rtf"] = report["file_s"] / seconds
        report["file_stage_s"] = result.times.as_dict()
        if out_dir is not None:
            import shutil

            shutil.copy(Path(tmp) / "out.mp4", out_dir / f"file_{size}.mp4")
    if cuda:
        report["file_peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # render alone, encode alone: what overlapping them saves
    opts = pipe.motion_options()
    t0 = time.perf_counter()
    batches = list(pipe.render_frames(clip, avatar, opts))
    report["render_only_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with Mp4Writer(Path(tmp) / "enc.mp4", width=opts.size, height=opts.size, fps=opts.fps, audio=clip,
                       background=False) as writer:
            for b in batches:
                writer.write(b)
        report["encode_only_s"] = time.perf_counter() - t0
    report["pixel_format"] = batches[0].pixel_format
    print(report, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", type=Path, help="real checkpoint directory (default: random weights)")
    p.add_argument("--seconds", type=float, default=1.0, help="speech length for the CPU run (default 1.0)")
    p.add_argument("--batch-size", type=int, default=4, help="renderer batch on the CPU (default 4)")
    p.add_argument("--size", type=int, default=512, help="output size (default 512)")
    p.add_argument("--no-still", action="store_true", help="head motion on (runs Audio2Pose)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-cpu", action="store_true")
    cuda = p.add_argument_group("CUDA (run only when torch sees a GPU)")
    cuda.add_argument("--cuda-frames", type=int, default=96, help="frames per CUDA measurement (default 96)")
    cuda.add_argument("--cuda-sizes", type=int, nargs="+", default=[256, 512])
    cuda.add_argument("--cuda-batches", type=int, nargs="+", default=[1, 8, 32])
    cuda.add_argument("--cuda-dtypes", nargs="+", default=["fp32", "fp16", "bf16"], choices=list(DTYPES))
    cuda.add_argument("--sections", nargs="+", default=["matrix", "precision", "steps", "e2e", "compile"],
                      choices=["matrix", "precision", "steps", "e2e", "compile"])
    cuda.add_argument("--steps-batch", type=int, default=8)
    cuda.add_argument("--e2e-seconds", type=float, default=10.0)
    cuda.add_argument("--e2e-compile", action="store_true", help="e2e with LIPSYNC_TORCH_COMPILE on")
    cuda.add_argument("--compile-layouts", nargs="+", default=["cl+graphs"], choices=list(COMPILE_LAYOUTS),
                      help="layouts the compile section measures (default: the engine's, cl+graphs)")
    cuda.add_argument("--avatar-cache", type=Path, help="avatar cache holding the bundled portrait (e2e)")
    cuda.add_argument("--videos", type=Path, help="write the e2e videos here")
    p.add_argument("--json", type=Path, help="also write the raw numbers here (rewritten after each section)")
    args = p.parse_args(argv)

    report: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "cpu_count": psutil.cpu_count()}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

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
            save()
        if not torch.cuda.is_available():
            print("\n(CUDA not available: GPU measurements skipped)")
            save()
            return
        from lipsync.engines.sadtalker.checkpoints import load_weights

        report["gpu"] = torch.cuda.get_device_name()
        report["date"] = time.strftime("%Y-%m-%d")
        ckpts = {size: located(size) for size in args.cuda_sizes}
        weights = {size: load_weights(c) for size, c in ckpts.items()}
        sections = {
            "matrix": lambda: [asdict(r) for r in bench_cuda(weights, batch_sizes=args.cuda_batches,
                                                             frames=args.cuda_frames, dtypes=args.cuda_dtypes)],
            "precision": lambda: precision_check(weights),
            "steps": lambda: [row for size in args.cuda_sizes for row in
                              speed_steps(weights[size], size, batch=args.steps_batch, frames=args.cuda_frames,
                                          )],
            "e2e": lambda: [end_to_end(ckpts[size].main.parent, args.avatar_cache or Path(tmp) / "cache", size=size,
                                       seconds=args.e2e_seconds, out_dir=args.videos, compile=args.e2e_compile)
                    for size in args.cuda_sizes],
            "compile": lambda: [compile_step(weights[size], size, batch=args.steps_batch, frames=args.cuda_frames,
                                             layout=layout)
                                for size in args.cuda_sizes for layout in args.compile_layouts],
        }
        for name in args.sections:
            print(f"\n### {name} ({report['gpu']})", flush=True)
            t0 = time.perf_counter()
            try:
                report[name] = sections[name]()
            except Exception as e:  # noqa: BLE001 - one broken section must not cost the others' numbers
                import traceback

                traceback.print_exc()
                report[name + "_error"] = f"{type(e).__name__}: {e}"
            report[name + "_section_s"] = time.perf_counter() - t0
            save()
        if "matrix" in report:
            print("\n| size | dtype | batch | seconds | s per s of speech | frames/s | peak VRAM (MiB) | "
                  "reserved (MiB) | note |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
            for r in report["matrix"]:
                print(_row(CudaResult(**r)))
        for key in ("steps", "compile"):
            for r in report.get(key, []):
                print(f"| {r['size']} | {r['step']} | {r['rtf']:.4f} | {r['peak_vram_mb']:.0f} |")
    save()


if __name__ == "__main__":
    main()
