"""Latent batches for generators: the generic sharded loader plus the store's own normalisation.

The statistics are the store's (``fae_pipe.cache.latent_stats.LatentStats``, read
from its attrs; a store without them is refused) and travel on, as one object, into
every checkpoint and ``sit.safetensors``. Any zarr group with a ``latents`` array shaped
(sample, view, channel, height, width), ``labels`` and the two attrs works, not only
stores written by ``encode``. The batching itself (and REPA targets) is
``fae_pipe.data.batches.GeneratorBatches``.
"""

from __future__ import annotations

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.data.batches import GeneratorBatches, StoreInfo, num_classes_of, valid_mask
from fae_pipe.errors import UserError

def read_latent_info(path, group) -> tuple[StoreInfo, np.ndarray | None]:
    """Check the store's layout and statistics; return its info and the ``valid`` mask (or None)."""
    if schema.LATENTS not in set(group.array_keys()):
        raise UserError(f"{path}: no '{schema.LATENTS}' array; expected a latent store written by `fae-pipe encode`")
    arr = group[schema.LATENTS]
    if arr.ndim != 5:
        raise UserError(f"{path}: '{schema.LATENTS}' has shape {arr.shape}; expected (sample, view, channel, height, width)")
    n, views, c, h, w = (int(v) for v in arr.shape)
    stats = LatentStats.from_attrs(dict(group.attrs), str(path), channels=c)
    info = StoreInfo(str(path), (c, h, w), views, n, num_classes_of(path, group), stats, schema.KIND_LATENTS)
    return info, valid_mask(group)


class LatentBatches(GeneratorBatches):
    """Normalised latent batches ``(epoch, x, y)`` for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device`` with ``(latent - mean_c) / std_c``;
    ``y`` is int64 (B,). Samples whose ``valid`` flag is False are never served.
    ``repa_features``: a ``features.zarr`` whose tokens ``from_step_with_repa`` adds.
    """

    array = schema.LATENTS

    def __init__(self, path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8, repa_features=None):
        info, valid = read_latent_info(path, schema.open_store(path)[0])
        super().__init__(info, valid, batch_size, seed, rank, world_size, memory_budget_bytes, shuffle_buffer,
                         repa_features)
