"""Tiny, structured stand-ins for the demo data, shared by the FAE stage tests.

Each sample has a hidden smooth 8-channel field z on the 8x8 token grid. Its
"DINOv2 features" are a fixed linear map of z to 384 channels (so an 8-channel
FAE can rebuild them) and its 64 px image paints every token's 8x8 patch with
colours that are a function of z (so a pixel decoder can learn the map). View 1
is the horizontal mirror, in pixels and in the token grid alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import os

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from fae_pipe.cache import schema
from fae_pipe.data.index import DatasetIndex, stratified_holdout, write_index

GRID, DIM, LATENT, IMAGE = 8, 384, 8, 64
# One torch thread in and out of process: on the shared 2-core test machine two spinning
# OpenMP threads per process made an AdamW step of 650k parameters 20x slower (measured).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}



def hidden_fields(n: int, labels: np.ndarray, seed: int = 0, grid: int = GRID) -> np.ndarray:
    """(n, LATENT, grid, grid) smooth fields: a class pattern plus a per-sample low-frequency part."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(int(labels.max()) + 1, LATENT, 2, 2, generator=g)
    own = torch.randn(n, LATENT, 3, 3, generator=g)
    z = F.interpolate(classes[torch.as_tensor(labels)], size=grid, mode="bilinear", align_corners=True)
    z = z + 0.7 * F.interpolate(own, size=grid, mode="bilinear", align_corners=True)
    return z.numpy()


def paint(z: np.ndarray) -> np.ndarray:
    """(LATENT, GRID, GRID) field -> (IMAGE, IMAGE, 3) uint8: colour from z[:3], brightness ramp from z[3]."""
    rgb = 1.0 / (1.0 + np.exp(-1.5 * z[:3]))
    img = np.repeat(np.repeat(rgb, IMAGE // GRID, axis=1), IMAGE // GRID, axis=2)
    ramp = np.linspace(-0.15, 0.15, IMAGE // GRID)
    tile = np.tile(ramp, GRID)[None, None, :] * np.tanh(np.repeat(np.repeat(z[3:4], 8, 1), 8, 2))
    return (np.clip(img + tile, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def make_dataset(root: Path, classes: int = 4, per_class: int = 16, holdout_fraction: float = 0.25, seed: int = 0,
                 grid: int = GRID):
    """Write PNGs + index.json under ``root``; return (index_path, index, fields on a ``grid`` x ``grid`` grid).

    Images are painted from the 8x8 field; ``grid`` < 8 returns a coarser field for
    feature-only tests (fewer tokens, faster steps), whose images are then unrelated.
    """
    labels = np.repeat(np.arange(classes), per_class)
    z = hidden_fields(len(labels), labels, seed)
    paths = []
    for i, (lab, field) in enumerate(zip(labels, z)):
        rel = f"c{lab}/img{i:04d}.png"
        (root / "images" / f"c{lab}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(paint(field)).save(root / "images" / rel)
        paths.append(rel)
    sizes = [(root / "images" / p).stat().st_size for p in paths]
    holdout = stratified_holdout(paths, labels, holdout_fraction, seed)
    index = DatasetIndex(root=str(root / "images"), classes=[f"c{c}" for c in range(classes)], paths=paths,
                         labels=labels, sizes=sizes, holdout=holdout, seed=seed, holdout_fraction=holdout_fraction)
    if grid != GRID:
        z = hidden_fields(len(labels), labels, seed, grid)
    return write_index(index, root / "index.json"), index, z


def features_of(z: np.ndarray, seed: int = 1) -> np.ndarray:
    """(n, 2 views, tokens, DIM) float16 features: a fixed linear map of each token's field."""
    mix = np.random.default_rng(seed).standard_normal((LATENT, DIM)) / np.sqrt(LATENT)
    tokens = z.transpose(0, 2, 3, 1)  # n, h, w, c
    views = np.stack([tokens, tokens[:, :, ::-1]], axis=1).reshape(z.shape[0], 2, -1, LATENT)
    return (views @ mix).astype(np.float16)


def make_feature_store(path: Path, index, z: np.ndarray, shard_samples: int = 16, chunk_samples: int = 8):
    """A complete features.zarr for ``index`` (sample i = index row i)."""
    n, grid = len(index), z.shape[-1]
    feats = features_of(z)
    group = schema.create_feature_store(
        path, n, 2, grid * grid, DIM, (grid, grid), shard_samples, chunk_samples,
        {schema.A_DATASET_FINGERPRINT: index.fingerprint, schema.A_VIEWS: ["orig", "flip"],
         schema.A_IMAGE_SIZE: IMAGE, schema.A_NUM_CLASSES: index.num_classes, schema.A_ENCODER: "synthetic"})
    arrays = {schema.FEATURES: feats, schema.CLS: feats.mean(axis=2), schema.LABELS: index.labels,
              schema.SAMPLE_IDS: np.arange(n), schema.VALID: True}
    for name, values in arrays.items():  # as fae-pipe writes: every shard a file, even an all-zero one
        group[name].with_config({"write_empty_chunks": True})[:] = values
    group.attrs.update({schema.A_CONFIG_HASH: "synthetic-features-v1", schema.A_COMPLETE: True})
    return group


def merge(base: dict, values: dict) -> dict:
    """Merge ``values`` into ``base`` recursively (nested groups like ``train`` merge key by key)."""
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def write_config(path: Path, root: Path, **sections) -> Path:
    """A YAML config with every path inside ``root`` and per-section overrides."""
    cfg = {
        "paths": {"index": str(root / "index.json"), "features": str(root / "features.zarr"),
                  "latents": str(root / "latents.zarr"), "fae_run": str(root / "fae"),
                  "decoder_run": str(root / "decoder"), "metrics": str(root / "metrics")},
        "data": {"root": str(root / "images"), "image_size": IMAGE, "views": ["orig", "flip"], "decode_workers": 2},
        "fae": {"model": "fae_tiny", "beta": 1e-4,
                "train": {"steps": 30, "batch_size": 16, "lr": 2e-3, "warmup": 5, "checkpoint_every": 10,
                          "eval_every": 10, "keep_last": 2, "precision": "fp32", "seed": 0, "log_every": 1}},
    }
    for section, values in sections.items():
        merge(cfg.setdefault(section, {}), values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``fae-pipe`` in a subprocess exactly as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fae_pipe.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **THREAD_ENV))
    if check and proc.returncode != 0:
        raise AssertionError(f"fae-pipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
