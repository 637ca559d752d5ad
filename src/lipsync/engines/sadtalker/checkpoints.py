"""Find, read and strictly load SadTalker's official checkpoint files.

Two layouts exist in the wild and both are read here:

* the current one: ``SadTalker_V0.0.2_{256,512}.safetensors`` holds five sub-networks under the
  key prefixes ``face_3drecon.``, ``audio2exp.``, ``audio2pose.``, ``kp_extractor.`` and
  ``generator.`` (upstream's ``model2safetensor.py`` saves a wrapper module with exactly these
  attributes; there is no ``he_estimator`` in it, and inference never uses one);
* the older ``.pth`` set (256 only): ``epoch_20.pth`` (key ``net_recon``),
  ``auido2exp_00300-model.pth`` / ``auido2pose_00140-model.pth`` (key ``model``; the typo is
  upstream's) and ``facevid2vid_00189-model.pth.tar`` (keys ``kp_detector``, ``generator``).

Both need a mapping-net file beside them, ``mapping_00229-model.pth.tar`` for the 'crop'
output and ``mapping_00109-model.pth.tar`` for 'full' (its input has the 3 crop parameters
too: 73 coefficients instead of 70), holding the state dict under the key ``mapping``; and the
3D landmark template ``similarity_Lm3D_all.mat`` (variable ``lm``, 68x3).

torch is imported lazily so that ``SadTalkerCheckpoints.locate`` can validate a directory
without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import CheckpointError, ConfigError
from ...fsutil import atomic_write

if TYPE_CHECKING:
    import torch

#: Sub-networks stored in the main safetensors file, by key prefix.
MAIN_PARTS: tuple[str, ...] = ("face_3drecon", "audio2exp", "audio2pose", "kp_extractor", "generator")
#: Every part ``load_weights`` returns.
ALL_PARTS: tuple[str, ...] = MAIN_PARTS + ("mapping",)

MAPPING_FILES: dict[str, str] = {"crop": "mapping_00229-model.pth.tar", "full": "mapping_00109-model.pth.tar"}
#: Epoch numbers in upstream's mapping file names; written into the files we produce.
_MAPPING_EPOCHS: dict[str, int] = {"crop": 229, "full": 109}
LM3D_FILE = "similarity_Lm3D_all.mat"
SIZES: tuple[int, ...] = (256, 512)

#: Older .pth layout: part -> (file name, key inside the file).
LEGACY_PARTS: dict[str, tuple[str, str]] = {
    "face_3drecon": ("epoch_20.pth", "net_recon"),
    "audio2exp": ("auido2exp_00300-model.pth", "model"),
    "audio2pose": ("auido2pose_00140-model.pth", "model"),
    "kp_extractor": ("facevid2vid_00189-model.pth.tar", "kp_detector"),
    "generator": ("facevid2vid_00189-model.pth.tar", "generator"),
}


def main_file_name(size: int) -> str:
    return f"SadTalker_V0.0.2_{size}.safetensors"


@dataclass(frozen=True)
class SadTalkerCheckpoints:
    """The files of one usable checkpoint set (all verified to exist by ``locate``).

    ``main`` is the safetensors file, or for the legacy layout the facevid2vid file, with the
    other legacy files listed in ``legacy_files``.
    """

    directory: Path
    main: Path
    mapping: Path
    lm3d: Path
    size: int  # 256 | 512
    preprocess: str = "crop"  # "crop" | "full"
    legacy_files: tuple[Path, ...] = ()

    @property
    def is_legacy(self) -> bool:
        return bool(self.legacy_files)

    @property
    def mapping_coeff_count(self) -> int:
        """Coefficients the mapping net takes: 70, or 73 with the crop parameters in 'full'."""
        return 73 if self.preprocess == "full" else 70

    @classmethod
    def locate(
        cls, directory: Path, *, size: int = 256, preprocess: str = "crop", bfm_dir: Path | None = None
    ) -> SadTalkerCheckpoints:
        """Find every file needed for ``size``/``preprocess``; one CheckpointError lists all gaps."""
        if size not in SIZES:
            raise ConfigError(f"SadTalker checkpoint size must be one of {SIZES}, not {size!r}", size=size)
        if preprocess not in MAPPING_FILES:
            raise ConfigError(
                f"SadTalker preprocess must be one of {sorted(MAPPING_FILES)}, not {preprocess!r}",
                preprocess=preprocess,
            )
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise CheckpointError(
                f"SadTalker checkpoint directory {directory} does not exist or is not a directory",
                directory=str(directory),
            )
        missing: list[str] = []

        main = directory / main_file_name(size)
        legacy_files: tuple[Path, ...] = ()
        if not main.is_file():
            legacy = sorted({directory / name for name, _ in LEGACY_PARTS.values()})
            if size == 256 and all(p.is_file() for p in legacy):
                main = directory / LEGACY_PARTS["generator"][0]
                legacy_files = tuple(legacy)
            elif size == 256:
                missing.append(
                    f"{main.name} (or the older set {', '.join(p.name for p in legacy if not p.is_file())})"
                )
            else:
                missing.append(main.name)

        mapping = directory / MAPPING_FILES[preprocess]
        if not mapping.is_file():
            missing.append(mapping.name)

        lm3d_candidates = lm3d_search_paths(directory, bfm_dir)
        lm3d = next((p for p in lm3d_candidates if p.is_file()), None)
        if lm3d is None:
            missing.append(f"{LM3D_FILE} (looked in {', '.join(str(p.parent) for p in lm3d_candidates)})")

        if missing:
            raise CheckpointError(
                f"SadTalker checkpoints incomplete in {directory}: missing {'; '.join(missing)}",
                directory=str(directory),
                missing=missing,
            )
        assert lm3d is not None
        return cls(
            directory=directory,
            main=main,
            mapping=mapping,
            lm3d=lm3d,
            size=size,
            preprocess=preprocess,
            legacy_files=legacy_files,
        )


def lm3d_search_paths(directory: Path, bfm_dir: Path | None = None) -> list[Path]:
    """Where ``similarity_Lm3D_all.mat`` may live, in the order tried.

    An explicit ``bfm_dir`` (a folder or the file itself) wins; then beside the checkpoints, the
    ``BFM_Fitting`` folder of older SadTalker releases, and the ``src/config`` folder of a
    SadTalker clone whose ``checkpoints`` folder we were pointed at.
    """
    paths: list[Path] = []
    if bfm_dir is not None:
        bfm_dir = Path(bfm_dir).expanduser()
        paths.append(bfm_dir if bfm_dir.suffix == ".mat" else bfm_dir / LM3D_FILE)
    paths += [
        directory / LM3D_FILE,
        directory / "BFM_Fitting" / LM3D_FILE,
        directory.parent / "src" / "config" / LM3D_FILE,
    ]
    return paths


# --- reading --------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    import torch

    try:
        # weights_only: a checkpoint directory is user input; never unpickle arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user-facing problem
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_one_line(e)}", path=str(path)
        ) from None


def _state_under(blob: Any, key: str, path: Path) -> dict[str, torch.Tensor]:
    state = blob.get(key) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        found = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"checkpoint {path} has no state dict under {key!r} (found: {found})", path=str(path), key=key
        )
    return dict(state)


def load_weights(ckpt: SadTalkerCheckpoints) -> dict[str, dict[str, torch.Tensor]]:
    """Every sub-network's state dict (prefixes stripped), each file read exactly once.

    Keys: ``face_3drecon``, ``audio2exp``, ``audio2pose``, ``kp_extractor``, ``generator``,
    ``mapping`` (plus any other prefix the main file happens to carry). Tensors are on the CPU.
    """
    weights: dict[str, dict[str, torch.Tensor]] = {}
    if ckpt.is_legacy:
        blobs: dict[Path, Any] = {}
        for part, (name, key) in LEGACY_PARTS.items():
            path = ckpt.directory / name
            if path not in blobs:
                blobs[path] = _torch_load(path)
            weights[part] = _state_under(blobs[path], key, path)
        blobs.clear()
    else:
        weights.update(_read_main_safetensors(ckpt.main))

    weights["mapping"] = _state_under(_torch_load(ckpt.mapping), "mapping", ckpt.mapping)
    return weights


def _read_main_safetensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - corrupt/truncated file, wrong format
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(e)}", path=str(path)) from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        # Exact prefix split (upstream matches substrings, which only works by luck of naming).
        prefix, sep, rest = key.partition(".")
        if sep:
            parts.setdefault(prefix, {})[rest] = tensor
    absent = [p for p in MAIN_PARTS if p not in parts]
    if absent:
        raise CheckpointError(
            f"checkpoint {path} lacks the sub-networks {', '.join(absent)} "
            f"(found prefixes: {', '.join(sorted(parts)) or 'none'})",
            path=str(path),
            missing=absent,
        )
    return parts


def check_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """The part of ``state`` that ``module`` loads strictly, or a CheckpointError saying why not.

    Compares names and shapes only, so ``module`` may live on the ``meta`` device (a cheap check
    of a network that is built later). Only ``num_batches_tracked`` counters (unused at
    inference) may be absent from ``state``; they are filled in. A module may name training-only
    parts it does not build (e.g. Audio2Pose's discriminator) in ``checkpoint_ignored_prefixes``;
    keys under them are accepted and dropped.
    """
    import torch

    expected = module.state_dict()
    ignored = tuple(getattr(module, "checkpoint_ignored_prefixes", ()))
    state = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, file vs network ({_first(mismatched)})")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the {name} network: {'; '.join(problems)}",
            network=name,
            missing=missing[:20] or None,
            unexpected=unexpected[:20] or None,
            mismatched=mismatched[:20] or None,
        )
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a readable CheckpointError on mismatch.

    What may differ from a plain strict load is described in ``check_state``.
    """
    state = check_state(module, state, name)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. dtype that cannot be copied
        raise CheckpointError(f"cannot load the {name} network: {_one_line(e)}", network=name) from None


# --- writing (tests, conversions) ----------------------------------------------------------
def save_official_layout(
    directory: Path,
    weights: dict[str, dict[str, torch.Tensor]],
    *,
    size: int = 256,
    preprocess: str = "crop",
    lm3d: np.ndarray | None = None,
) -> SadTalkerCheckpoints:
    """Write ``weights`` as upstream lays them out and return the located set.

    ``SadTalker_V0.0.2_{size}.safetensors`` gets every part except ``mapping`` under its prefix;
    the mapping file for ``preprocess`` gets ``{"mapping": state, "epoch": n}``;
    ``similarity_Lm3D_all.mat`` gets ``lm`` = ``lm3d`` (68x3), or a synthetic frontal-face
    template when none is given (fine for tests, not for real inference quality).
    """
    from safetensors.torch import save_file

    if preprocess not in MAPPING_FILES:
        raise ConfigError(f"preprocess must be one of {sorted(MAPPING_FILES)}, not {preprocess!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    absent = [p for p in ALL_PARTS if p not in weights]
    if absent:
        raise ValueError(f"weights lack the parts {absent}")

    flat = {
        f"{part}.{key}": tensor.detach().to("cpu").contiguous()
        for part, state in weights.items()
        if part != "mapping"
        for key, tensor in state.items()
    }
    main = directory / main_file_name(size)
    atomic_write(main, lambda tmp: save_file(flat, str(tmp)))
    write_mapping_file(directory / MAPPING_FILES[preprocess], weights["mapping"], preprocess=preprocess)
    write_lm3d(directory / LM3D_FILE, synthetic_lm3d() if lm3d is None else lm3d)
    return SadTalkerCheckpoints.locate(directory, size=size, preprocess=preprocess)


def write_mapping_file(path: Path, state: dict[str, torch.Tensor], *, preprocess: str = "crop") -> None:
    """A mapping checkpoint as upstream stores it: the state dict under ``mapping``."""
    import torch

    blob = {"mapping": {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
            "epoch": _MAPPING_EPOCHS.get(preprocess, 0)}
    atomic_write(Path(path), lambda tmp: torch.save(blob, tmp))


def write_lm3d(path: Path, lm3d: np.ndarray) -> None:
    from scipy.io import savemat

    lm = np.asarray(lm3d, dtype=np.float32)
    if lm.shape != (68, 3):
        raise ValueError(f"lm3d must be 68x3, got {lm.shape}")
    atomic_write(Path(path), lambda tmp: savemat(tmp, {"lm": lm}))


def synthetic_lm3d() -> np.ndarray:
    """A plausible 68x3 frontal landmark template (y up, about +-0.8 wide), for tests only.

    Built from a few anchor points of an average face (jaw arc, brows, nose, eyes, lips) in the
    same units as the real template; only points 31, 37/40, 43/46, 49, 55 (1-based) are used for
    alignment, and they sit where a face has them.
    """
    pts = np.zeros((68, 3), dtype=np.float32)
    # jaw 0..16: from one temple down round the chin to the other
    u = np.linspace(0.0, np.pi, 17)
    pts[0:17, 0] = -0.73 * np.cos(u)
    pts[0:17, 1] = 0.22 - 1.05 * np.sin(u)
    pts[0:17, 2] = -0.55 + 0.45 * np.sin(u)
    # brows 17..21 and 22..26
    pts[17:22, 0] = np.linspace(-0.6, -0.12, 5)
    pts[22:27, 0] = np.linspace(0.12, 0.6, 5)
    pts[17:27, 1] = 0.45 + 0.06 * np.tile(np.sin(np.linspace(0.0, np.pi, 5)), 2)
    pts[17:27, 2] = 0.1
    # nose bridge 27..30 and base 31..35
    pts[27:31, 1] = np.linspace(0.3, -0.1, 4)
    pts[27:31, 2] = np.linspace(0.3, 0.55, 4)
    pts[31:36, 0] = np.linspace(-0.15, 0.15, 5)
    pts[31:36, 1] = -0.2
    pts[31:36, 2] = 0.35
    # eyes 36..41 and 42..47: six points round each, outer corner first
    eye = np.linspace(np.pi, -np.pi, 7)[:6]
    for start, cx in ((36, -0.33), (42, 0.33)):
        pts[start:start + 6, 0] = cx + 0.15 * np.cos(eye)
        pts[start:start + 6, 1] = 0.25 + 0.05 * np.sin(eye)
        pts[start:start + 6, 2] = 0.12
    # outer lips 48..59, inner 60..67
    outer = np.linspace(np.pi, -np.pi, 13)[:12]
    pts[48:60, 0] = 0.3 * np.cos(outer)
    pts[48:60, 1] = -0.48 + 0.1 * np.sin(outer)
    pts[48:60, 2] = 0.25
    inner = np.linspace(np.pi, -np.pi, 9)[:8]
    pts[60:68, 0] = 0.2 * np.cos(inner)
    pts[60:68, 1] = -0.48 + 0.03 * np.sin(inner)
    pts[60:68, 2] = 0.22
    return pts


# --- helpers --------------------------------------------------------------------------------
def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
