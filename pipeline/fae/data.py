"""What the FAE stages read: the train/held-out split and rows of the feature store, and the pixel targets.

The split lives in the dataset index (``holdout`` per sample id), not in the
store; the store's ``sample_ids`` point back into the index. Training uses the
valid, non-held-out rows; evaluation a fixed, capped set of valid held-out rows
(the first ones in store order), read once with one orthogonal selection so each
touched inner chunk is decoded once rather than once per sample.

Pixel targets are the source image of each cached sample, same crop, same view.
No second copy of the data set exists: ``fae_pipe.data.transforms.load_pixels``
redoes the exact crop and views the features were extracted from. Images are
decoded on a small thread pool, one batch ahead of the training step, so decoding
overlaps compute. The view a batch row holds is the one the loader drew for that
row's store row in that epoch (``ShardedLoader.epoch_views``), so pixels and
features always show the same (possibly mirrored) picture.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fae_pipe.artifacts import atomic_write
from fae_pipe.cache import schema
from fae_pipe.cache.schema import open_feature_store  # noqa: F401 (re-exported: the stages' import)
from fae_pipe.data.index import read_index
from fae_pipe.data.transforms import ImageDecodeError, load_pixels
from fae_pipe.errors import UserError


@dataclass
class Split:
    """Store-row masks: which rows train and which are held out (both valid only)."""

    train: np.ndarray
    holdout: np.ndarray
    sample_ids: np.ndarray

    def holdout_rows(self, limit: int) -> np.ndarray:
        """The first ``limit`` held-out store rows (a fixed evaluation set)."""
        return np.flatnonzero(self.holdout)[:limit]


def feature_split(group, index_path: str, store_path: str = "", need_train: bool = True) -> Split:
    """Train/held-out masks over the rows of a feature store, from the dataset index.

    ``need_train``: refuse a store without a valid training sample (training stages); evaluation
    passes False, so an evaluation-only store (e.g. COCO val, every image held out) is accepted."""
    index = read_index(index_path)
    stored = group.attrs.get(schema.A_DATASET_FINGERPRINT)
    if stored is not None and stored != index.fingerprint:
        raise UserError(f"feature store {store_path} was extracted from another dataset than index {index_path} "
                        "(dataset fingerprints differ): re-run `fae-pipe extract` or point paths.index at its index")
    ids = np.asarray(schema.read_array(group, schema.SAMPLE_IDS), np.int64)
    valid = np.asarray(schema.read_array(group, schema.VALID), bool)
    if ids.size and (ids.min() < 0 or ids.max() >= len(index)):
        raise UserError(f"feature store {store_path} has sample ids outside index {index_path} "
                        f"(0..{len(index) - 1}): re-run `fae-pipe extract`")
    held = index.holdout_mask()[ids]
    split = Split(train=valid & ~held, holdout=valid & held, sample_ids=ids)
    if need_train and not split.train.any():
        raise UserError(f"feature store {store_path} has no valid training sample")
    return split


def read_rows(group, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted store indices) of a per-sample array, all views."""
    if rows.size == 0:
        return np.zeros((0, *group[name].shape[1:]), group[name].dtype)
    return schema.read_rows(group, name, rows)


def load_view(index, sample_id: int, image_size: int, view_names, view: int) -> np.ndarray:
    """uint8 (H, W, 3) pixels of one sample's view; a file that no longer decodes is a UserError."""
    path = index.abspath(int(sample_id))
    try:
        return load_pixels(path, image_size, [view_names[int(view)]])[0]
    except ImageDecodeError as e:
        raise UserError(f"pixel targets: {e.path} ({e.reason}) decoded at extract time but not now: "
                        "the image folder changed; re-run `fae-pipe prepare` and `extract`") from None


class PixelBatches:
    """Wrap a loader's ``(epoch, batch)`` stream, adding ``batch["pixels"]`` (B, H, W, 3) uint8 and ``views``."""

    def __init__(self, loader, stream, index, image_size: int, view_names, store_sample_ids, workers: int):
        self.loader, self.stream, self.index = loader, stream, index
        self.image_size, self.view_names = image_size, list(view_names)
        ids = np.asarray(store_sample_ids, np.int64)
        self.row_of_id = np.full(int(ids.max()) + 1 if ids.size else 0, -1, np.int64)
        self.row_of_id[ids] = np.arange(ids.size)
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self._views_epoch, self._views = None, None
        self._next = self._submit()

    def _epoch_views(self, epoch: int) -> np.ndarray:
        if self._views_epoch != epoch:
            self._views_epoch, self._views = epoch, self.loader.epoch_views(epoch)
        return self._views

    def _submit(self):
        epoch, batch = next(self.stream)
        views = self._epoch_views(epoch)[self.row_of_id[batch["sample_ids"]]]
        args = [(self.index, sid, self.image_size, self.view_names, v) for sid, v in zip(batch["sample_ids"], views)]
        if self.pool is None:
            return epoch, batch, views, [load_view(*a) for a in args]
        return epoch, batch, views, [self.pool.submit(load_view, *a) for a in args]

    def __iter__(self):
        return self

    def __next__(self):
        epoch, batch, views, pending = self._next
        pixels = [p if isinstance(p, np.ndarray) else p.result() for p in pending]
        self._next = self._submit()  # the next batch decodes while this one trains
        batch = dict(batch, pixels=np.stack(pixels), views=views)
        return epoch, batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def to_signed(pixels: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 torch (B, 3, H, W) in [-1, 1] (the pixel decoder's space)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_grid(path: str | Path, originals: np.ndarray, recons: np.ndarray, columns: int = 8) -> Path:
    """PNG of pairs of rows: originals above their reconstructions, ``columns`` images per row."""
    n = min(len(originals), len(recons), 2 * columns)
    columns = min(columns, n)
    h, w = originals.shape[1:3]
    rows = -(-n // columns)
    canvas = np.full((rows * 2 * h, columns * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[(2 * r) * h:(2 * r + 1) * h, c * w:(c + 1) * w] = originals[i]
        canvas[(2 * r + 1) * h:(2 * r + 2) * h, c * w:(c + 1) * w] = recons[i]
    return atomic_write(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
