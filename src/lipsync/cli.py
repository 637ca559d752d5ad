"""``lipsync`` command line: a thin shell over ``LipSyncPipeline``.

    lipsync generate --avatar face.jpg --audio speech.wav --output talk.mp4
    lipsync generate --sample --output talk.mp4         # bundled portrait and speech
    lipsync precompute --avatar face.jpg
    lipsync serve --port 7002

Every option also has a ``LIPSYNC_*`` environment variable (see ``lipsync.settings``). Errors
are one line on stderr with a non-zero exit status, never a traceback: 1 for refused input, 2 for
an invalid setting (option or environment variable), 3 for a bug. The motion and encoder options
are generated from ``lipsync.options`` (their defaults, limits and help texts live there).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, InvalidInput, LipsyncError
from .options import EncoderOptions, MotionOptions, field_spec, option_names

EXIT_INPUT = 1  # the input was refused
EXIT_CONFIG = 2  # an invalid setting (option or LIPSYNC_* variable); click's usage errors use 2 too
EXIT_INTERNAL = 3  # a bug: please report


def _fail(message: str, code: int = EXIT_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings(**overrides: Any):
    """Validated settings (environment + the given non-None options), or one ``error:`` line
    naming the bad variable and exit status 2."""
    from .settings import env_var, load_settings

    try:
        return load_settings(**overrides)
    except ConfigError as e:
        message, name = e.message, e.detail.get("setting")
        if isinstance(name, str) and overrides.get(name) is not None:  # it came from an option
            message = message.replace(f"({env_var(name)}=", f"(--{name.replace('_', '-')} ", 1)
        _fail(message, EXIT_CONFIG)


def _check_file(path, what: str, *, id_hint: bool = False) -> None:
    """One error line unless ``path`` is a regular file (``io.source.regular_file`` says what is
    wrong), checked before any model loads."""
    from .io.source import regular_file

    try:
        regular_file(path, what)
    except InvalidInput as e:
        hint = (" (nor an avatar id: the 64 hex characters `lipsync precompute` prints)"
                if id_hint and not os.path.lexists(path) else "")
        _fail(e.message + hint)


def _run(fn):
    """Run a command body, turning our errors into one-line messages."""
    try:
        return fn()
    except ConfigError as e:
        _fail(e.message, EXIT_CONFIG)
    except LipsyncError as e:
        _fail(e.message)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # last resort: one line, details only on request
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


def _model_option(model: type, name: str):
    """A click option for one options-model field: flag, type and help (default, limits,
    environment variable) derived from the field. Values are validated by ``Settings``, so a bad
    one is a single ``error:`` line (exit 2) naming the variable, like a bad environment value."""
    from .settings import env_var

    spec = field_spec(model, name)
    flag = "--" + name.replace("_", "-")
    default = "on" if spec.default is True else "off" if spec.default is False else spec.default
    default = "from the audio" if default is None else default
    limits = spec.range_text()
    help_text = (f"{spec.description.rstrip('.')} (default {default}{'; ' + limits if limits else ''}; "
                 f"env {env_var(name)}).")
    if spec.value_type is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    return click.option(flag, name, type=spec.value_type, default=None, help=help_text)


def _model_options(model: type, names: tuple[str, ...] | None = None):
    def decorate(f):
        # click lists options in reverse order of decoration: decorate bottom-up
        for name in reversed(names or option_names(model)):
            f = _model_option(model, name)(f)
        return f

    return decorate


_motion_options = _model_options(MotionOptions)
_encoder_options = _model_options(EncoderOptions)


class _OneLineErrors(click.Group):
    """click's usage errors (a missing or unknown option, a bad value click itself checks) as one
    ``error:`` line with exit status 2, like every other refusal, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `lipsync`: its help, as click does
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "lipsync"
            _fail(f"{e.format_message()} (see '{where} --help')", EXIT_CONFIG)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        # standalone_mode=False hands back --help/--version's exit status instead of exiting
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lipsync-server", prog_name="lipsync")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does (also after a command).")
def main(verbose: bool) -> None:
    """Portrait + speech in, lip-synced MP4 out (512x512, 25 fps, H.264 + AAC)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _set_verbose(ctx, param, value) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


def _verbose_option(f):
    """``-v`` after the command too (``lipsync generate ... -v``), like before it."""
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Log what each stage does.")(f)


@main.command(epilog="Example: lipsync generate -a face.jpg -i speech.wav -o talk.mp4")
@click.option("--avatar", "-a", type=click.Path(path_type=Path),
              help="Portrait (JPEG/PNG/WebP), or the id of a cached avatar (default: the bundled one).")
@click.option("--audio", "-i", type=click.Path(path_type=Path), help="Speech: WAV, MP3, OGG (Opus/Vorbis), FLAC, M4A/AAC or WebM.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="MP4 to write.")
@click.option("--sample", is_flag=True, help="Use the bundled sample portrait and speech.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@_verbose_option
@_engine_options
@_motion_options
@_encoder_options
def generate(avatar, audio, output, sample, quiet, engine, checkpoints, device, cache_dir, **options) -> None:
    """Render the avatar speaking the audio into an MP4 (512x512, 25 fps, H.264 + AAC)."""
    from .pipeline import LipSyncPipeline, bundled_sample
    from .types import AvatarId

    if sample:
        avatar = avatar or bundled_sample("portrait.png")
        audio = audio or bundled_sample("speech.wav")
    if audio is None:
        _fail("--audio is required (or --sample for the bundled speech)")
    _check_file(audio, "audio file")
    if not output.parent.exists():  # a mistyped folder is an error, not a new directory tree
        _fail(f"output folder does not exist: {output.parent}")
    # an existing file is a portrait; otherwise an id-shaped value names a cached avatar
    avatar_ref: Path | AvatarId | None = None
    if avatar is not None:
        if not Path(avatar).exists() and AvatarId.is_valid(str(avatar)):
            avatar_ref = AvatarId(str(avatar))
        else:
            _check_file(avatar, "image file", id_hint=True)
            avatar_ref = Path(avatar)
    settings = _settings(engine=engine, checkpoints=checkpoints, device=device, cache_dir=cache_dir,
                         **options)

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
            frames = f"{result.frames} frame{'' if result.frames == 1 else 's'}"
            seconds = f"{result.audio_seconds:.1f}" if result.audio_seconds >= 0.1 else f"{result.audio_seconds:.3f}"
            click.echo(
                f"wrote {output}: {frames} ({seconds} s of audio) in "
                f"{time.perf_counter() - t0:.2f} s [avatar {t.precompute:.2f}"
                f"{' cached' if result.avatar_cache_hit else ''}, audio {t.audio:.2f}, motion {t.motion:.2f}, "
                f"render {t.render:.2f}, encode {t.encode:.2f}]",
                err=True,
            )

    _run(body)


@main.command()
@click.option("--avatar", "-a", type=click.Path(path_type=Path), help="Portrait (default: the configured one).")
@click.option("--force", is_flag=True, help="Drop the cached entry and recompute.")
@_verbose_option
@_engine_options
def precompute(avatar, force, engine, checkpoints, device, cache_dir) -> None:
    """Detect the face, align and cache the avatar; prints its id."""
    from .pipeline import LipSyncPipeline, bundled_sample

    settings = _settings(engine=engine, checkpoints=checkpoints, device=device, cache_dir=cache_dir)

    def body():
        pipe = LipSyncPipeline.from_settings(settings)
        source = avatar or settings.avatar or bundled_sample("portrait.png")
        _check_file(source, "image file")
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
@_verbose_option
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
