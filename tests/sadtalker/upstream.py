"""Import the network modules of upstream SadTalker (PyPI ``sadtalker-z==0.1.6``) for parity tests.

The wheel is fetched with ``pip download --no-deps`` into a cache folder (never a runtime
dependency, never committed). Its package ``__init__`` pulls in the whole app (gradio, kornia,
face-alignment...), so we register an empty ``sadtalker`` package whose ``__path__`` points at
the unpacked sources and stub the single unused ``kornia.geometry.warp_affine`` import (and, when
scikit-image is absent, the unused ``skimage.transform`` import of ``face3d.util.preprocess``);
after that the network modules need only torch, numpy, scipy, PIL and cv2.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

WHEEL_SPEC = "sadtalker-z==0.1.6"
_CACHE = Path(os.environ.get("LIPSYNC_TEST_CACHE", Path.home() / ".cache" / "lipsync-tests"))


class UpstreamUnavailable(RuntimeError):
    pass


def upstream_root() -> Path:
    """Directory that holds the unpacked ``sadtalker`` package (downloaded once)."""
    dest = _CACHE / "sadtalker-z-0.1.6"
    pkg = dest / "sadtalker"
    if (pkg / "facerender" / "modules" / "generator.py").exists():
        return dest
    wheels = _CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("sadtalker_z-0.1.6-*.whl"))
    if not found:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL_SPEC],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        found = sorted(wheels.glob("sadtalker_z-0.1.6-*.whl"))
        if proc.returncode != 0 or not found:
            raise UpstreamUnavailable(f"pip download {WHEEL_SPEC} failed: {proc.stderr.strip()[-500:]}")
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(found[0]) as zf:
        zf.extractall(tmp)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _install_stubs(root: Path) -> None:
    if "sadtalker" not in sys.modules or not hasattr(sys.modules["sadtalker"], "__lipsync_stub__"):
        pkg = types.ModuleType("sadtalker")
        pkg.__path__ = [str(root / "sadtalker")]  # empty package: skip the app-level __init__
        pkg.__lipsync_stub__ = True
        sys.modules["sadtalker"] = pkg
    if "kornia" not in sys.modules:
        kornia = types.ModuleType("kornia")
        geometry = types.ModuleType("kornia.geometry")

        def warp_affine(*args, **kwargs):  # only used by face3d's training-time resize path
            raise NotImplementedError("kornia stub")

        geometry.warp_affine = warp_affine
        kornia.geometry = geometry
        sys.modules["kornia"] = kornia
        sys.modules["kornia.geometry"] = geometry
    try:
        import tqdm  # noqa: F401
    except ImportError:
        # make_animation wraps its frame loop in a progress bar; a pass-through does the same work
        tqdm_mod = types.ModuleType("tqdm")
        tqdm_mod.tqdm = lambda iterable=None, *args, **kwargs: iterable
        tqdm_mod.__lipsync_stub__ = True
        sys.modules["tqdm"] = tqdm_mod
    try:
        import skimage
    except ImportError:
        # face3d.util.preprocess imports ``skimage.transform`` at module level but align_img and
        # friends never use it; an empty stand-in lets the module import.
        skimage = types.ModuleType("skimage")
        transform = types.ModuleType("skimage.transform")
        skimage.transform = transform
        skimage.__lipsync_stub__ = True
        sys.modules["skimage"] = skimage
        sys.modules["skimage.transform"] = transform


def upstream_module(name: str):
    """Import ``sadtalker.<name>`` from the upstream sources, e.g. ``facerender.modules.generator``."""
    root = upstream_root()
    _install_stubs(root)
    import numpy as np

    # Upstream was written for numpy 1.x; face3d.util.preprocess touches
    # ``np.VisibleDeprecationWarning`` (moved to ``np.exceptions`` in numpy 2) at import time.
    shimmed = not hasattr(np, "VisibleDeprecationWarning")
    if shimmed:
        np.VisibleDeprecationWarning = np.exceptions.VisibleDeprecationWarning
    try:
        return importlib.import_module(f"sadtalker.{name}")
    finally:
        if shimmed:
            del np.VisibleDeprecationWarning
