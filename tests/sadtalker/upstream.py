"""Import the network modules of upstream SadTalker (PyPI ``sadtalker-z==0.1.6``) for parity tests.

The wheel is pinned by version and SHA-256 in ``upstream-requirements.txt`` beside this file and
fetched once into the test cache (``$LIPSYNC_TEST_CACHE``, default ``~/.cache/lipsync-tests``) by
``.ci/run``, which runs ``python -m tests.sadtalker.upstream``. It is never a runtime dependency
and never committed. In CI the tests only read the cache (a missing or altered wheel fails them);
on a developer's machine a missing wheel is fetched the same way on first use.

Its package ``__init__`` pulls in the whole app (gradio, kornia, face-alignment...), so we register
an empty ``sadtalker`` package whose ``__path__`` points at the unpacked sources and stub the
single unused ``kornia.geometry.warp_affine`` import (and, when scikit-image is absent, the unused
``skimage.transform`` import of ``face3d.util.preprocess``); after that the network modules need
only torch, numpy, scipy, PIL and cv2.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("upstream-requirements.txt")
CACHE = Path(os.environ.get("LIPSYNC_TEST_CACHE", Path.home() / ".cache" / "lipsync-tests"))
WHEELS = CACHE / "wheels"


def _pin() -> tuple[str, str, str]:
    """(name, version, sha256) of the one pinned requirement."""
    for line in REQUIREMENTS.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s]+)\s+--hash=sha256:([0-9a-f]{64})\s*", line)
        if m:
            return m.group(1), m.group(2), m.group(3)
    raise RuntimeError(f"no pinned requirement with a sha256 hash in {REQUIREMENTS}")


NAME, VERSION, SHA256 = _pin()
WHEEL = WHEELS / f"{NAME.replace('-', '_')}-{VERSION}-py3-none-any.whl"


class UpstreamUnavailable(RuntimeError):
    pass


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch() -> Path:
    """Download the pinned wheel into the cache (pip checks the hash); the wheel's path."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
         "-r", str(REQUIREMENTS), "-d", str(WHEELS)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0 or not WHEEL.exists():
        raise UpstreamUnavailable(f"pip download of {NAME}=={VERSION} failed: {proc.stderr.strip()[-500:]}")
    return WHEEL


def upstream_root() -> Path:
    """Directory that holds the unpacked ``sadtalker`` package, checked against the pinned hash."""
    dest = CACHE / f"{NAME}-{VERSION}-{SHA256[:12]}"
    if (dest / "sadtalker" / "facerender" / "modules" / "generator.py").exists():
        return dest
    if not WHEEL.exists():
        if _in_ci():
            raise UpstreamUnavailable(
                f"{WHEEL} is absent: .ci/run fetches it before the tests (python -m tests.sadtalker.upstream)")
        fetch()
    digest = _sha256(WHEEL)
    if digest != SHA256:
        raise UpstreamUnavailable(f"{WHEEL} has sha256 {digest}, not the pinned {SHA256}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(WHEEL) as zf:
        zf.extractall(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _stub(name: str) -> types.ModuleType:
    """An empty module with a spec: importlib.util.find_spec (which torch._dynamo calls on
    tqdm, kornia...) raises ValueError for a module in sys.modules whose __spec__ is None."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


def _install_stubs(root: Path) -> None:
    if "sadtalker" not in sys.modules or not hasattr(sys.modules["sadtalker"], "__lipsync_stub__"):
        pkg = _stub("sadtalker")
        pkg.__path__ = [str(root / "sadtalker")]  # empty package: skip the app-level __init__
        pkg.__spec__.submodule_search_locations = pkg.__path__
        pkg.__lipsync_stub__ = True
        sys.modules["sadtalker"] = pkg
    if "kornia" not in sys.modules:
        kornia = _stub("kornia")
        geometry = _stub("kornia.geometry")

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
        tqdm_mod = _stub("tqdm")
        tqdm_mod.tqdm = lambda iterable=None, *args, **kwargs: iterable
        tqdm_mod.__lipsync_stub__ = True
        sys.modules["tqdm"] = tqdm_mod
    try:
        import skimage
    except ImportError:
        # face3d.util.preprocess imports ``skimage.transform`` at module level but align_img and
        # friends never use it; an empty stand-in lets the module import.
        skimage = _stub("skimage")
        transform = _stub("skimage.transform")
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


if __name__ == "__main__":  # .ci/run: python -m tests.sadtalker.upstream
    path = WHEEL if WHEEL.exists() and _sha256(WHEEL) == SHA256 else fetch()
    print(f"{path} sha256 {_sha256(path)} (pinned {SHA256})")
    sys.exit(0 if _sha256(path) == SHA256 else 1)
