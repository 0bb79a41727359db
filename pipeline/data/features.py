"""Feature batches for generators on raw encoder features (RAE): ``features.zarr`` tokens as (C, H, W) grids.

A stored row is (tokens, channels) float16 with tokens row-major on the store's
``grid``; a generator sees it as (channels, height, width), the layout of
``fae_pipe.fae.autoencoder.tokens_to_grid``. The grid is a strided view of the
tokens, and normalisation writes the contiguous float32 batch in the same pass, so
nothing is copied twice. Statistics are the store's exact ones
(``fae_pipe.cache.feature_stats``): per channel by default, RAE's per position and
channel with ``per_position=True``; a store without them is refused with the command
that computes them. Served: every valid sample, one random view per sample and epoch,
exactly like ``LatentBatches`` (same loader, same resumable order, streaming shards
through the shuffle window when the store exceeds the memory budget: at ImageNet scale
the store is ~2 TB).
"""

from __future__ import annotations

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.feature_stats import feature_stats
from fae_pipe.data.batches import GeneratorBatches, StoreInfo, num_classes_of, valid_mask
from fae_pipe.errors import UserError


def read_feature_info(path, group, per_position: bool = False) -> tuple[StoreInfo, np.ndarray | None]:
    """Check a feature store's layout and statistics; return its info (shape (C, H, W)) and ``valid`` mask."""
    arr = group[schema.FEATURES]
    n, views, tokens, dim = (int(v) for v in arr.shape)
    h, w = (int(g) for g in group.attrs.get(schema.A_GRID, (0, 0)))
    if h * w != tokens:
        raise UserError(f"{path}: attrs '{schema.A_GRID}' {[h, w]} does not hold the {tokens} stored tokens; "
                        "re-create the store with `fae-pipe extract --overwrite`")
    stats = feature_stats(group, str(path), per_position)
    info = StoreInfo(str(path), (dim, h, w), views, n, num_classes_of(path, group), stats, schema.KIND_FEATURES)
    return info, valid_mask(group)


class FeatureBatches(GeneratorBatches):
    """Normalised feature batches ``(epoch, x, y)`` for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device``: the stored tokens on their grid,
    ``(f - mean) / std`` per channel (or per position and channel with ``per_position``);
    ``y`` int64 (B,). ``info.stats`` is what checkpoints and exports carry (``to_dict``)
    and what sampling undoes (``denormalize``) before the pixel decoder.
    ``repa_features``: a ``features.zarr`` (this one or another encoder's) whose tokens
    ``from_step_with_repa`` adds.
    """

    array = schema.FEATURES

    def __init__(self, path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8, per_position: bool = False,
                 repa_features=None):
        info, valid = read_feature_info(path, schema.open_feature_store(path), per_position)
        super().__init__(info, valid, batch_size, seed, rank, world_size, memory_budget_bytes, shuffle_buffer,
                         repa_features)

    def grid(self, stored: torch.Tensor) -> torch.Tensor:
        """(B, tokens, C) -> (B, C, H, W) as a strided view (normalize writes it contiguous)."""
        _, h, w = self.info.shape
        return stored.transpose(1, 2).unflatten(2, (h, w))
