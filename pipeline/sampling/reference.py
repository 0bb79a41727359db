"""The real side of the generation metrics: reference rows, their cached tokens and their pixels.

Why from the feature store: FD-DINOv2 compares generated images with real ones in
the encoder's space, and ``extract`` already ran the encoder over every real image.
Reading the stored cls tokens of a reference subset costs a few chunk decodes
instead of a second encoder pass over the dataset. The subset is spread over the
whole store (a seeded random choice, kept in store order), not the first rows,
because the store is in ImageFolder order and its first rows are a few classes.

Generated images go through exactly the preprocessing the stored tokens saw
(``transforms.encoder_input``: Pillow bicubic to the encoder size, ImageNet
mean/std), so both sides differ only in where the pixels came from.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.errors import UserError

READ_BLOCK = 4096  # store rows per orthogonal read: bounds memory, keeps chunk decodes shared


def spread_rows(mask: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` of the True rows of ``mask``: all of them, or a seeded random subset, sorted."""
    rows = np.flatnonzero(np.asarray(mask, bool))
    if rows.size <= limit:
        return rows
    pick = np.random.Generator(np.random.PCG64(seed)).choice(rows.size, size=limit, replace=False)
    return rows[np.sort(pick)]


def reference_view(group) -> tuple[int, str]:
    """(view index, view name) used as the reference: "orig" when stored, else the first view."""
    views = list(group.attrs.get(schema.A_VIEWS) or ["orig"])
    return (views.index("orig"), "orig") if "orig" in views else (0, views[0])


def read_view(group, name: str, rows: np.ndarray, view: int, dtype=np.float32) -> np.ndarray:
    """Rows ``rows`` (sorted) of per-sample array ``name`` at view ``view``, as ``dtype``."""
    arr = group[name]
    out = np.zeros((len(rows), *arr.shape[2:]), dtype)
    for lo in range(0, len(rows), READ_BLOCK):
        block = np.asarray(rows[lo:lo + READ_BLOCK], np.int64)
        out[lo:lo + len(block)] = np.asarray(schema.read_rows(group, name, block, view), dtype)
    return out


@torch.no_grad()
def encoder_cls(encoder, images: np.ndarray, batch_size: int) -> np.ndarray:
    """cls tokens (N, D) float32 of uint8 images (N, H, W, 3), computed ``batch_size`` at a time."""
    from fae_pipe.data.transforms import encoder_input

    out = []
    for lo in range(0, len(images), batch_size):
        _, cls = encoder.encode(encoder_input(images[lo:lo + batch_size], encoder.input_size))
        out.append(cls.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def load_reference_pixels(index, sample_ids, image_size: int, view: str, workers: int = 4) -> np.ndarray:
    """uint8 (N, S, S, 3) pixels of index samples ``sample_ids`` in ``view``, decoded in threads."""
    from fae_pipe.data.transforms import ImageDecodeError, load_pixels

    def load(i: int) -> np.ndarray:
        try:
            return load_pixels(index.abspath(int(i)), image_size, [view])[0]
        except ImageDecodeError as e:
            raise UserError(f"reference image {e.path} cannot be decoded any more ({e.reason}): "
                            "the dataset changed since extract; re-run `fae-pipe prepare` and `extract`") from None

    if len(sample_ids) == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    if workers <= 0:
        return np.stack([load(i) for i in sample_ids])
    with ThreadPoolExecutor(workers, thread_name_prefix="ref-decode") as pool:
        return np.stack(list(pool.map(load, sample_ids)))
