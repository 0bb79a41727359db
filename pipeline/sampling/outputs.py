"""What ``sample`` leaves on disk: the ADM-layout ``.npz``, per-process parts, and their gathering.

``samples.npz`` holds ``arr_0`` uint8 (N, H, W, 3) and ``arr_1`` int64 (N,) labels,
the layout the ADM evaluator (guided-diffusion ``evaluator.py``) and most FID tools
read, in global sample order. Under ``accelerate launch`` each process writes the
images of its own batches to ``<samples>/.parts/part-<rank>-of-<world>.npz`` with
their global indices; the main process then checks the parts cover every index
exactly once (no gap, no duplicate), writes the single file and removes the parts.
All files are written to a temporary name first and renamed, so a killed run never
leaves a truncated ``samples.npz``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fae_pipe.artifacts import atomic_write
from fae_pipe.errors import UserError

SAMPLES_FILE = "samples.npz"
PARTS_DIR = ".parts"


def _atomic_savez(path: Path, **arrays) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez adds no ".npz" to the temp name
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def save_samples(path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and ``arr_1`` (int64 labels) atomically."""
    images, labels = np.asarray(images), np.asarray(labels, np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise ValueError(f"samples must be uint8 (N, H, W, 3) with N labels; got {images.dtype} {images.shape}, "
                         f"{labels.shape} labels")
    return _atomic_savez(Path(path), arr_0=images, arr_1=labels)


def load_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels int64 (N,) or None) from an ADM-layout ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run `fae-pipe sample` first (or set paths.samples)")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise UserError(f"{path} has no 'arr_0' image array; expected the ADM layout written by `fae-pipe sample`")
        images = data["arr_0"]
        labels = data["arr_1"].astype(np.int64) if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)")
    return images, labels


def part_path(samples_dir, rank: int, world_size: int) -> Path:
    return Path(samples_dir) / PARTS_DIR / f"part-{rank}-of-{world_size}.npz"


def write_part(samples_dir, rank: int, world_size: int, indices: np.ndarray, images: np.ndarray) -> Path:
    """One process's share: its global sample indices and their images."""
    return _atomic_savez(part_path(samples_dir, rank, world_size), indices=np.asarray(indices, np.int64),
                         images=np.asarray(images, np.uint8))


def assemble(parts: list[tuple[np.ndarray, np.ndarray]], num_samples: int) -> np.ndarray:
    """Concatenate (indices, images) parts into global order; refuse gaps and duplicates."""
    indices = np.concatenate([np.asarray(p[0], np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    counts = np.bincount(indices, minlength=num_samples) if indices.size else np.zeros(num_samples, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_samples):
        raise UserError(f"sample parts hold indices outside [0, {num_samples}): the parts are from another run")
    if (counts != 1).any():
        missing, doubled = int((counts == 0).sum()), int((counts > 1).sum())
        raise UserError(f"sample parts cover {num_samples} samples with {missing} missing and {doubled} duplicated: "
                        "re-run `fae-pipe sample`")
    images = np.concatenate([np.asarray(p[1]) for p in parts])
    out = np.empty_like(images)
    out[indices] = images
    return out


def gather_parts(samples_dir, world_size: int, num_samples: int) -> np.ndarray:
    """Read every process's part file, assemble them in global order and delete the parts."""
    parts = []
    for rank in range(world_size):
        path = part_path(samples_dir, rank, world_size)
        if not path.is_file():
            raise UserError(f"{path} is missing: process {rank} did not finish; re-run `fae-pipe sample`")
        with np.load(path) as data:
            parts.append((data["indices"], data["images"]))
    images = assemble(parts, num_samples)
    shutil.rmtree(Path(samples_dir) / PARTS_DIR, ignore_errors=True)
    return images
