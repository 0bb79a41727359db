"""Untrained but complete run directories (fae/decoder/sit ``.safetensors``) for the sampling tests.

The files are written in the exact formats the training stages export, with
randomly initialised ``fae_tiny`` parts and a ``sit_tiny`` whose zero-initialised
head is perturbed (so its velocity depends on x, t and the class, and guidance
changes the result). Nothing is trained: these test plumbing, layouts and
determinism, not image quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.artifacts import file_fingerprint
from fae_pipe.fae.autoencoder import DECODER_FILE, FAE_FILE, save_decoder_file, save_fae_file
from fae_pipe.models.registry import create_model, fae_parts, model_kwargs
from fae_pipe.training.sit_export import SIT_FILE, save_sit_export

NUM_CLASSES = 3
LATENT = (8, 8, 8)  # fae_tiny: 8 channels on an 8x8 grid -> 64 px images


def write_fae(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``root/fae/fae.safetensors`` and ``root/decoder/decoder.safetensors`` with random fae_tiny weights."""
    torch.manual_seed(seed)
    names = fae_parts("fae_tiny")
    enc, fdec, pdec = (create_model(names[k]) for k in ("encoder", "feature_decoder", "pixel_decoder"))
    fae_path = save_fae_file(root / "fae" / FAE_FILE, {
        "family": "fae_tiny",
        "models": {"encoder": names["encoder"], "feature_decoder": names["feature_decoder"]},
        "encoder": enc.state_dict(), "feature_decoder": fdec.state_dict(), "grid": [8, 8],
        "feature_dim": 384, "latent_channels": 8, "ema": False, "steps": 0, "config": {}, "source_features": {},
        "metrics": {}})
    dec_path = save_decoder_file(root / "decoder" / DECODER_FILE, {"model": names["pixel_decoder"],
                                                                   "state_dict": pdec.state_dict()})
    return fae_path, dec_path


def write_sit(root: Path, fae_path: Path | None, seed: int = 0, ema: bool = True) -> Path:
    """``root/sit/sit.safetensors``: a sit_tiny export whose latents claim to come from ``fae_path``."""
    torch.manual_seed(seed)
    c, h, w = LATENT
    kwargs = model_kwargs("sit_tiny", in_channels=c, input_size=h, num_classes=NUM_CLASSES)
    model = create_model("sit_tiny", **kwargs)
    with torch.no_grad():
        for lin in [model.head, model.final_ada[-1]] + [b.ada[-1] for b in model.blocks]:
            lin.weight.normal_(0.0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema_state = {k: v * 0.5 if v.is_floating_point() else v.clone() for k, v in state.items()} if ema else None
    mean = [0.1 * i for i in range(c)]
    std = [1.0 + 0.1 * i for i in range(c)]
    fp = file_fingerprint(fae_path) if fae_path is not None else None
    stats = {"channel_mean": mean, "channel_std": std, "fae_fingerprint": fp, "num_classes": NUM_CLASSES,
             "latent_shape": list(LATENT)}
    return save_sit_export(
        root / "sit" / SIT_FILE, model_name="sit_tiny", model_kwargs=kwargs, state_dict=state,
        ema_state_dict=ema_state, latent_stats=stats, fae_fingerprint=fp, num_classes=NUM_CLASSES,
        latent_shape=list(LATENT), transport={"shift_factor": 2.5, "null_class": NUM_CLASSES}, config={}, step=0)


def write_runs(root: Path) -> dict[str, Path]:
    """All three files under ``root``; returns their paths."""
    fae_path, dec_path = write_fae(root)
    return {"fae": fae_path, "decoder": dec_path, "sit": write_sit(root, fae_path)}


def paths_section(root: Path) -> dict:
    """A ``paths`` config section pointing every path inside ``root``."""
    return {"index": str(root / "index.json"), "features": str(root / "features.zarr"),
            "latents": str(root / "latents.zarr"), "fae_run": str(root / "fae"), "decoder_run": str(root / "decoder"),
            "sit_run": str(root / "sit"), "samples": str(root / "samples"), "metrics": str(root / "metrics")}
