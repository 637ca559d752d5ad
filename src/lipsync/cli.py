"""``lipsync`` command line: a thin shell over ``LipSyncPipeline``.

    lipsync generate --avatar face.jpg --audio speech.wav --output talk.mp4
    lipsync generate --sample --output talk.mp4         # bundled portrait and speech
    lipsync precompute --avatar face.jpg
    lipsync serve --port 7002

Every option also has a ``LIPSYNC_*`` environment variable (see ``lipsync.settings``). Errors
are one line on stderr with a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import LipsyncError

EXIT_INPUT = 1  # the input or configuration was refused
EXIT_INTERNAL = 3  # a bug: please report


def _fail(message: str, code: int = EXIT_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings(**overrides: Any):
    from pydantic import ValidationError

    from .settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        _fail(f"invalid {where}: {first.get('msg', 'bad value')}")


def _run(fn):
    """Run a command body, turning our errors into one-line messages."""
    try:
        return fn()
    except LipsyncError as e:
        _fail(e.message)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - last resort: one line, details only on request
        if os.environ.get("LIPSYNC_DEBUG"):
            raise
        _fail(f"internal error ({type(e).__name__}: {e}); rerun with LIPSYNC_DEBUG=1 for details",
              EXIT_INTERNAL)


# Options shared by generate/precompute/serve, mapped 1:1 onto Settings fields.
def _engine_options(f):
    # click lists options in reverse order of decoration: decorate bottom-up
    for opt in reversed([
        click.option("--engine", help="Engine: classic (CPU, default) or sadtalker."),
        click.option("--checkpoints", type=click.Path(path_type=Path),
                     help="SadTalker checkpoint directory (sadtalker engine)."),
        click.option("--device", help="auto, cpu or cuda[:N] (neural engines)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Avatar cache directory."),
    ]):
        f = opt(f)
    return f


def _motion_options(f):
    for opt in reversed([
        click.option("--expression-scale", type=float, help="Brows/head motion strength (default 0.3)."),
        click.option("--lip-scale", type=float, help="Lip motion strength (default 1.0)."),
        click.option("--still/--no-still", default=None, help="Still mode: no head motion (default on)."),
        click.option("--blink/--no-blink", default=None, help="Natural blinks (default on)."),
        click.option("--size", type=int, help="Output width and height in pixels (default 512)."),
        click.option("--fps", type=int, help="Frames per second (default 25)."),
        click.option("--seed", type=int, help="Seed for blinks and head motion (default: from the audio)."),
    ]):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lipsync-server", prog_name="lipsync")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
def main(verbose: bool) -> None:
    """Portrait + speech in, lip-synced MP4 out (512x512, 25 fps, H.264 + AAC)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command(epilog="Example: lipsync generate -a face.jpg -i speech.wav -o talk.mp4")
@click.option("--avatar", "-a", type=click.Path(path_type=Path),
              help="Portrait (JPEG/PNG/WebP), or the id of a cached avatar (default: the bundled one).")
@click.option("--audio", "-i", type=click.Path(path_type=Path), help="Speech (WAV, MP3, OGG, FLAC).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="MP4 to write.")
@click.option("--sample", is_flag=True, help="Use the bundled sample portrait and speech.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@_engine_options
@_motion_options
def generate(avatar, audio, output, sample, quiet, engine, checkpoints, device, cache_dir,
             expression_scale, lip_scale, still, blink, size, fps, seed) -> None:
    """Render the avatar speaking the audio into an MP4 (512x512, 25 fps, H.264 + AAC)."""
    from .pipeline import LipSyncPipeline, bundled_sample

    if sample:
        avatar = avatar or bundled_sample("portrait.png")
        audio = audio or bundled_sample("speech.wav")
    if audio is None:
        _fail("--audio is required (or --sample for the bundled speech)")
    if not Path(audio).is_file():
        _fail(f"audio file not found: {audio}")
    # a path that does not exist may be the id of a cached avatar; the pipeline validates it
    avatar_ref = None if avatar is None else (Path(avatar) if Path(avatar).exists() else str(avatar))
    settings = _settings(engine=engine, checkpoints=checkpoints, device=device, cache_dir=cache_dir,
                         expression_scale=expression_scale, lip_scale=lip_scale, still=still,
                         blink=blink, size=size, fps=fps, seed=seed)

    def body():
        t0 = time.perf_counter()
        pipe = LipSyncPipeline.from_settings(settings)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if quiet or not sys.stderr.isatty():
                return
            if bar is None:
                bar = click.progressbar(length=total, label="rendering", file=sys.stderr,
                                        show_pos=True)
                bar.__enter__()
            bar.update(done - bar.pos)

        try:
            result = pipe.generate(audio, output, avatar=avatar_ref, progress=progress)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        if not quiet:
            t = result.times
            click.echo(
                f"wrote {output}: {result.frames} frames ({result.audio_seconds:.1f} s of speech) in "
                f"{time.perf_counter() - t0:.2f} s [avatar {t.precompute:.2f}"
                f"{' cached' if result.avatar_cache_hit else ''}, audio {t.audio:.2f}, motion {t.motion:.2f}, "
                f"render {t.render:.2f}, encode {t.encode:.2f}]",
                err=True,
            )

    _run(body)


@main.command()
@click.option("--avatar", "-a", type=click.Path(path_type=Path), help="Portrait (default: the configured one).")
@click.option("--force", is_flag=True, help="Drop the cached entry and recompute.")
@_engine_options
def precompute(avatar, force, engine, checkpoints, device, cache_dir) -> None:
    """Detect the face, align and cache the avatar; prints its id."""
    from .pipeline import LipSyncPipeline, bundled_sample

    settings = _settings(engine=engine, checkpoints=checkpoints, device=device, cache_dir=cache_dir)

    def body():
        pipe = LipSyncPipeline.from_settings(settings)
        source = avatar or settings.avatar or bundled_sample("portrait.png")
        if not Path(source).is_file():
            _fail(f"image file not found: {source}")
        t0 = time.perf_counter()
        av, hit = pipe.add_avatar(source, force=force)
        click.echo(av.id)
        click.echo(f"{'cached' if hit else 'computed'} in {time.perf_counter() - t0:.2f} s "
                   f"({pipe.cache.entry_dir(av.id)})", err=True)

    _run(body)


@main.command()
@click.option("--host", help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 7002).")
@click.option("--workers", type=int, help="Concurrent generation jobs (default 1).")
@click.option("--avatar", type=click.Path(path_type=Path), help="Default avatar portrait.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Scale out on Ray Serve (needs lipsync-server[ray]); knobs: LIPSYNC_RAY_*.")
@click.option("--ray-config", type=click.Path(exists=True, dir_okay=False),
              help="With --ray: a Serve config file, e.g. deploy/serve.yaml.")
@click.option("--ray-address", help="With --ray: join this Ray cluster instead of starting one.")
@_engine_options
def serve(host, port, workers, avatar, engine, checkpoints, device, cache_dir, use_ray, ray_config,
          ray_address) -> None:
    """Run the HTTP service (GET /health, POST /generate, /precompute, /avatars, GET /stats...)."""
    settings = _settings(host=host, port=port, workers=workers, avatar=avatar, engine=engine,
                         checkpoints=checkpoints, device=device, cache_dir=cache_dir)

    def body():
        if use_ray or ray_config:
            from .server.ray_serve import serve_cli

            serve_cli(settings, ray_config, address=ray_address)
            return
        from .server import serve as run_server

        run_server(settings)

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    main()
