"""A SadTalker checkpoint directory with seeded random weights, built from upstream's own classes.

No real weights exist on the test machines, so parity tests build every upstream sub-network at
its real size (configuration facts from upstream's ``src/config/*.yaml``), give it reproducible
random weights, save them in the official layout with our ``save_official_layout`` and keep the
upstream modules as the reference implementation.

Random weights are made realistic enough to make parity meaningful: zero-initialised heads
(face3d's final layers) get random values, every normalisation layer gets a random affine part,
and batch-norm running statistics are calibrated on one random batch (as training would), so
activations stay O(1) -- the generator's output is not saturated at 0/1 and the keypoints spread.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from lipsync.engines.sadtalker.checkpoints import (
    MAPPING_FILES,
    SadTalkerCheckpoints,
    save_official_layout,
    synthetic_lm3d,
    write_mapping_file,
)
from tests.sadtalker.upstream import upstream_module

# --- configuration facts (upstream src/config/facerender.yaml, auido2pose.yaml) ---------------
FACERENDER_COMMON = {"num_kp": 15, "image_channel": 3, "feature_channel": 32, "estimate_jacobian": False}
KP_DETECTOR_PARAMS = {
    "temperature": 0.1, "block_expansion": 32, "max_features": 1024, "scale_factor": 0.25, "num_blocks": 5,
    "reshape_channel": 16384, "reshape_depth": 16,
}
GENERATOR_PARAMS = {
    "block_expansion": 64, "max_features": 512, "num_down_blocks": 2, "reshape_channel": 32,
    "reshape_depth": 16, "num_resblocks": 6, "estimate_occlusion_map": True,
    "dense_motion_params": {"block_expansion": 32, "max_features": 1024, "num_blocks": 5, "reshape_depth": 16,
                            "compress": 4},
}
#: facerender.yaml ('crop') takes 70 coefficients; facerender_still.yaml ('full') 73.
MAPPING_PARAMS = {"descriptor_nc": 1024, "layer": 3, "num_kp": 15, "num_bins": 66}
MAPPING_COEFFS = {"crop": 70, "full": 73}


def audio2pose_config() -> SimpleNamespace:
    """The attributes of auido2pose.yaml that upstream's Audio2Pose reads (yacs not needed)."""
    return SimpleNamespace(
        MODEL=SimpleNamespace(
            CVAE=SimpleNamespace(
                AUDIO_EMB_IN_SIZE=512, AUDIO_EMB_OUT_SIZE=6, SEQ_LEN=32, LATENT_SIZE=64,
                ENCODER_LAYER_SIZES=[192, 128], DECODER_LAYER_SIZES=[128, 192],
            ),
            DISCRIMINATOR=SimpleNamespace(LEAKY_RELU=False, INPUT_CHANNELS=6),
        ),
        DATASET=SimpleNamespace(NUM_CLASSES=46),
    )


# --- building -------------------------------------------------------------------------------
def _randomise_(module: nn.Module, gen: torch.Generator) -> None:
    """Random affine parts for every norm layer; random values for all-zero parameters."""
    for m in module.modules():
        is_norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
        if is_norm and getattr(m, "affine", False) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not torch.any(p):
                if p.dim() > 1:
                    bound = 1.0 / float(np.sqrt(p[0].numel()))
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _calibrate_bn(module: nn.Module, run: Callable[[], object]) -> None:
    """Set batch-norm running statistics to those of one forward pass (``run``), then eval()."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = 1.0  # the running stats become this batch's (upstream's SyncBN rejects None)
    module.train()
    with torch.no_grad():
        run()
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    module.eval()


def build_upstream_modules(*, seed: int = 0) -> dict[str, nn.Module]:
    """Every upstream sub-network at real size with seeded random weights, in eval mode.

    Keys: the official checkpoint parts (``face_3drecon``, ``audio2exp``, ``audio2pose``,
    ``kp_extractor``, ``generator``) and ``mapping_crop`` (70 inputs) / ``mapping_full`` (73).
    Deterministic for a given seed; the global torch RNG is left as it was.
    """
    networks = upstream_module("face3d.models.networks")
    a2e = upstream_module("audio2exp_models.networks")
    a2p = upstream_module("audio2pose_models.audio2pose")
    kpd = upstream_module("facerender.modules.keypoint_detector")
    gen_mod = upstream_module("facerender.modules.generator")
    mapping_mod = upstream_module("facerender.modules.mapping")
    animation = upstream_module("facerender.modules.make_animation")

    modules: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        def fresh(index: int) -> torch.Generator:
            torch.manual_seed(seed * 1000 + index)  # construction-time init draws from the global RNG
            return torch.Generator().manual_seed(seed * 1000 + 500 + index)

        g = fresh(1)
        recon = networks.define_net_recon(net_recon="resnet50", use_last_fc=False, init_path="")
        _randomise_(recon, g)
        _calibrate_bn(recon, lambda: recon(torch.rand(4, 3, 224, 224, generator=g)))
        modules["face_3drecon"] = recon

        def mels(n: int) -> torch.Tensor:  # mel features are normalised to [-4, 4] upstream
            return torch.rand(n, 1, 80, 16, generator=g) * 8 - 4

        g = fresh(2)
        exp_net = a2e.SimpleWrapperV2()
        _randomise_(exp_net, g)
        _calibrate_bn(exp_net, lambda: exp_net.audio_encoder(mels(8)))
        modules["audio2exp"] = exp_net

        g = fresh(3)
        pose_net = a2p.Audio2Pose(audio2pose_config(), None, device="cpu")
        _randomise_(pose_net, g)

        def run_pose() -> None:
            emb = pose_net.audio_encoder(mels(64).view(2, 32, 1, 80, 16))
            batch = {
                "z": torch.randn(2, 64, generator=g),
                "class": torch.tensor([0, 5]),
                "ref": torch.randn(2, 6, generator=g) * 0.2,
                "audio_emb": emb,
            }
            pose_net.netG.test(batch)
            pose_net.netD_motion(torch.randn(2, 32, 6, generator=g))

        _calibrate_bn(pose_net, run_pose)
        modules["audio2pose"] = pose_net

        g = fresh(4)
        kp = kpd.KPDetector(**KP_DETECTOR_PARAMS, **FACERENDER_COMMON)
        _randomise_(kp, g)
        _calibrate_bn(kp, lambda: kp(torch.rand(2, 3, 256, 256, generator=g)))
        modules["kp_extractor"] = kp

        for i, (name, preprocess) in enumerate((("mapping_crop", "crop"), ("mapping_full", "full"))):
            g = fresh(5 + i)
            mapping = mapping_mod.MappingNet(coeff_nc=MAPPING_COEFFS[preprocess], **MAPPING_PARAMS)
            _randomise_(mapping, g)
            modules[name] = mapping.eval()

        g = fresh(7)
        generator = gen_mod.OcclusionAwareSPADEGenerator(**GENERATOR_PARAMS, **FACERENDER_COMMON)
        _randomise_(generator, g)

        def run_generator() -> None:
            source = torch.rand(1, 3, 256, 256, generator=g)
            canonical = kp(source)
            semantics = torch.randn(2, 70, 27, generator=g) * 0.3
            he = modules["mapping_crop"](semantics)
            he_src = {k: v[:1] for k, v in he.items()}
            he_drv = {k: v[1:] for k, v in he.items()}
            kp_source = animation.keypoint_transformation(canonical, he_src)
            kp_driving = animation.keypoint_transformation(canonical, he_drv)
            generator(source, kp_source=kp_source, kp_driving=kp_driving)

        _calibrate_bn(generator, run_generator)
        modules["generator"] = generator
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)
    return modules


def make_random_checkpoints(
    directory: Path, *, size: int = 256, preprocess: str = "crop", seed: int = 0,
    modules: dict[str, nn.Module] | None = None,
) -> tuple[SadTalkerCheckpoints, dict[str, nn.Module]]:
    """Write a complete random-weight checkpoint set to ``directory`` and return it located.

    Both mapping files (crop and full) are written, like a real checkpoints folder, so the set
    serves either preprocess mode; the returned ``SadTalkerCheckpoints`` is for ``preprocess``.
    The returned modules are upstream's (the reference), including ``mapping`` for
    ``preprocess``. Pass ``modules`` to save an already built set.
    """
    if modules is None:
        modules = build_upstream_modules(seed=seed)
    modules = dict(modules)
    modules["mapping"] = modules[f"mapping_{preprocess}"]
    weights = {
        name: modules[name].state_dict()
        for name in ("face_3drecon", "audio2exp", "audio2pose", "kp_extractor", "generator", "mapping")
    }
    ckpt = save_official_layout(directory, weights, size=size, preprocess=preprocess, lm3d=synthetic_lm3d())
    other = "full" if preprocess == "crop" else "crop"
    write_mapping_file(Path(directory) / MAPPING_FILES[other], modules[f"mapping_{other}"].state_dict(),
                       preprocess=other)
    return ckpt, modules
