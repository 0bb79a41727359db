"""What the FAE stages read from the feature store: the train/held-out split and held-out rows.

The split lives in the dataset index (``holdout`` per sample id), not in the
store; the store's ``sample_ids`` point back into the index. Training uses the
valid, non-held-out rows; evaluation a fixed, capped set of valid held-out rows
(the first ones in store order), read once with one orthogonal selection so each
touched inner chunk is decoded once rather than once per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.data.index import read_index
from fae_pipe.errors import UserError


def open_feature_store(path: str):
    """The complete ``features.zarr`` at ``path`` (zarr group), or a one-line error."""
    group, kind = schema.open_store(path)
    if kind != schema.KIND_FEATURES:
        raise UserError(f"paths.features = {path} is a {kind} store; expected the features store written by `extract`")
    if group.attrs.get(schema.A_COMPLETE) is not True:
        raise UserError(f"feature store {path} is incomplete: finish it with `fae-pipe extract` first")
    return group


@dataclass
class Split:
    """Store-row masks: which rows train and which are held out (both valid only)."""

    train: np.ndarray
    holdout: np.ndarray
    sample_ids: np.ndarray

    def holdout_rows(self, limit: int) -> np.ndarray:
        """The first ``limit`` held-out store rows (a fixed evaluation set)."""
        return np.flatnonzero(self.holdout)[:limit]


def feature_split(group, index_path: str, store_path: str = "") -> Split:
    """Train/held-out masks over the rows of a feature store, from the dataset index."""
    index = read_index(index_path)
    stored = group.attrs.get(schema.A_DATASET_FINGERPRINT)
    if stored is not None and stored != index.fingerprint:
        raise UserError(f"feature store {store_path} was extracted from another dataset than index {index_path} "
                        "(dataset fingerprints differ): re-run `fae-pipe extract` or point paths.index at its index")
    ids = np.asarray(group[schema.SAMPLE_IDS][:], np.int64)
    valid = np.asarray(group[schema.VALID][:], bool)
    if ids.size and (ids.min() < 0 or ids.max() >= len(index)):
        raise UserError(f"feature store {store_path} has sample ids outside index {index_path} "
                        f"(0..{len(index) - 1}): re-run `fae-pipe extract`")
    held = index.holdout_mask()[ids]
    split = Split(train=valid & ~held, holdout=valid & held, sample_ids=ids)
    if not split.train.any():
        raise UserError(f"feature store {store_path} has no valid training sample")
    return split


def read_rows(group, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted store indices) of a per-sample array, all views."""
    if rows.size == 0:
        return np.zeros((0, *group[name].shape[1:]), group[name].dtype)
    return np.asarray(group[name].oindex[np.asarray(rows, np.int64)])
