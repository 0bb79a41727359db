"""Latent batches for generators: the generic sharded loader plus the store's own normalisation.

The statistics are the store's (``fae_pipe.cache.latent_stats.LatentStats``, read
from its attrs; a store without them is refused) and travel on, as one object, into
every checkpoint and ``sit.safetensors``. Any zarr group with a ``latents`` array shaped
(sample, view, channel, height, width), ``labels`` and the two attrs works, not only
stores written by ``encode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError


@dataclass(frozen=True)
class LatentStoreInfo:
    """What training needs to know about a latent store (and what the sampler must get back)."""

    path: str
    shape: tuple[int, int, int]  # channel, height, width
    views: int
    num_samples: int
    num_classes: int
    stats: LatentStats

    @property
    def fae_fingerprint(self) -> str | None:
        return self.stats.fae_fingerprint


def read_latent_info(path, group) -> tuple[LatentStoreInfo, np.ndarray | None]:
    """Check the store's layout and statistics; return its info and the ``valid`` mask (or None)."""
    keys = set(group.array_keys())
    if schema.LATENTS not in keys:
        raise UserError(f"{path}: no '{schema.LATENTS}' array; expected a latent store written by `fae-pipe encode`")
    arr = group[schema.LATENTS]
    if arr.ndim != 5:
        raise UserError(f"{path}: '{schema.LATENTS}' has shape {arr.shape}; expected (sample, view, channel, height, width)")
    n, views, c, h, w = (int(v) for v in arr.shape)
    attrs = dict(group.attrs)
    stats = LatentStats.from_attrs(attrs, str(path), channels=c)
    valid = np.asarray(schema.read_array(group, schema.VALID), bool) if schema.VALID in keys else None
    num_classes = attrs.get(schema.A_NUM_CLASSES)
    if num_classes is None:
        if schema.LABELS not in keys:
            raise UserError(f"{path}: no '{schema.LABELS}' array and no '{schema.A_NUM_CLASSES}' attr")
        num_classes = int(np.max(schema.read_array(group, schema.LABELS))) + 1
    info = LatentStoreInfo(str(path), (c, h, w), views, n, int(num_classes), stats)
    return info, valid


class LatentBatches:
    """Normalised latent batches ``(epoch, x, y)`` for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device`` with ``(latent - mean_c) / std_c``;
    ``y`` is int64 (B,). Samples whose ``valid`` flag is False are never served.
    """

    def __init__(self, path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8):
        self.info, valid = read_latent_info(path, schema.open_store(path)[0])
        self.loader = ShardedLoader(path, [schema.LATENTS], batch_size, seed, rank=rank, world_size=world_size,
                                    memory_budget_bytes=memory_budget_bytes, shuffle_buffer=shuffle_buffer,
                                    sample_mask=valid)
        labels = self.loader.labels if valid is None else self.loader.labels[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= self.info.num_classes):
            raise UserError(f"{path}: labels must lie in [0, {self.info.num_classes}); found "
                            f"{int(labels.min())}..{int(labels.max())}")
        self.steps_per_epoch = self.loader.steps_per_epoch

    def from_step(self, step: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Infinite stream starting at this process's batch number ``step``."""
        for epoch, batch in self.loader.batches_from(step):
            x = torch.from_numpy(batch[schema.LATENTS]).to(device, non_blocking=True)
            y = torch.from_numpy(batch["labels"]).to(device, non_blocking=True)
            yield epoch, self.info.stats.normalize(x), y
