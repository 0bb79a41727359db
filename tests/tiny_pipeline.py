"""A complete, tiny, really trained pipeline, built once per test session with the real CLI.

prepare --demo (3 classes x 10 images, 64 px) -> extract (DINOv2-S at 112 px, so the
tokens form the 8x8 grid fae_tiny expects, from a local weights file: see
``write_test_encoder``) -> train-fae -> train-decoder
-> encode -> train-sit -> sample, each with a handful of steps. Stages run in this
process through ``fae_pipe.cli.main`` (exactly the user's command line, without
paying a Python start per stage). The result lives under the session's base temp
directory, so every test module that asks for it shares one build.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fae_pipe.cli import main

DONE = "BUILT"
ENCODER_FILE = "dinov2_s_test.safetensors"
STAGES = ("prepare", "extract", "train-fae", "train-decoder", "encode", "train-sit", "sample")


def write_test_encoder(path: Path) -> Path:
    """A random DINOv2-S whose features depend on the image, saved as a local weights file.

    timm initialises DINOv2's LayerScale gammas to 1e-5, so a random DINOv2 is nearly the
    identity after its patch embedding: its cls token is the same vector for every image
    (per-dim spread ~1e-4, below float16 storage resolution), which makes cls-space
    metrics degenerate. With the gammas at 1 the blocks act and the cls token varies
    with the image, so FD / precision / recall have something to measure.
    """
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112).state_dict()
    state = {k: torch.ones_like(v) if k.endswith(".gamma") else v.contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return path


def tiny_config(root: Path) -> dict:
    return {
        "paths": {"index": str(root / "index.json"), "features": str(root / "features.zarr"),
                  "latents": str(root / "latents.zarr"), "fae_run": str(root / "fae"),
                  "decoder_run": str(root / "decoder"), "sit_run": str(root / "sit"),
                  "samples": str(root / "samples"), "metrics": str(root / "metrics")},
        "data": {"root": str(root / "images"), "demo": True, "demo_classes": 3, "demo_per_class": 10,
                 "demo_size": 64, "image_size": 64, "holdout_fraction": 0.2, "decode_workers": 0},
        "image_encoder": {"name": "vit_small_patch14_dinov2", "weights": str(root / ENCODER_FILE), "input_size": 112,
                    "precision": "bf16", "batch_size": 16, "device": "cpu"},
        "extract": {"shards": 1, "shard_samples": 16, "chunk_samples": 8},
        "fae": {"model": "fae_tiny", "train": {"steps": 8, "batch_size": 12, "lr": 2e-3, "warmup": 2,
                                               "checkpoint_every": 8, "eval_every": 8, "precision": "fp32"}},
        "decoder": {"lpips_backbone": "random", "lpips_weight": 0.1, "gan_start": 1000,
                    "discriminator": "patchgan_tiny", "eval_images": 4,
                    "train": {"steps": 8, "batch_size": 6, "lr": 2e-3, "warmup": 2, "checkpoint_every": 8,
                              "eval_every": 8, "precision": "fp32"}},
        "encode": {"shards": 1, "batch_size": 32, "device": "cpu"},
        "sit": {"model": "sit_tiny", "eval_samples": 6, "eval_sampler_steps": 2,
                "train": {"steps": 8, "batch_size": 12, "lr": 1e-3, "ema_decay": 0.9, "eval_every": 4,
                          "checkpoint_every": 8, "precision": "fp32", "memory_budget_gb": 1.0}},
        "sample": {"method": "euler", "steps": 5, "num_samples": 12, "batch_size": 12, "grid_per_class": 4,
                   "guidance": [[0.0, 0.7, 1.5]], "device": "cpu"},
        "evaluate": {"max_reference": 100, "batch_size": 16, "recon_images": 8, "knn_k": 3},
        "probe": {"max_samples": 100, "iterations": 25, "holdout_fraction": 0.25},
    }


def build(root: Path) -> Path:
    """Run every stage into ``root`` (once); return the config file path."""
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "tiny.yaml"
    if (root / DONE).is_file():
        return cfg_path
    write_test_encoder(root / ENCODER_FILE)
    cfg_path.write_text(yaml.safe_dump(tiny_config(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores stall badly when oversubscribed
    try:
        for stage in STAGES:
            main([stage, "--config", str(cfg_path)])
    finally:
        torch.set_num_threads(threads)
    (root / DONE).write_text("ok\n")
    return cfg_path


def session_pipeline(tmp_path_factory) -> Path:
    """The shared build for this pytest session (its config file path).

    Under pytest-xdist (``scripts/test.sh`` runs two workers) the workers share one build
    in the run's common temp directory: the first to get the lock builds, the other waits.
    """
    import fcntl
    import os

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>/: common to the workers of this run
    with open(base / "tiny_pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build(base / "tiny_pipeline")
