"""Latent batches for SiT: the generic sharded loader plus the store's own normalisation.

Why a separate module: a latent store is only usable with the exact per-channel
mean/std it was written with (LightningDiT users lost FID to a forgotten stats
file), so the statistics are read from the store's attrs, a store without them
is refused, and the same numbers travel on into every checkpoint and ``sit.pt``.
Any zarr group with a ``latents`` array shaped (sample, view, channel, height,
width), ``labels`` and the two attrs works, not only stores written by ``encode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fae_pipe.cache import schema
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
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    fae_fingerprint: str | None

    def stats(self) -> dict:
        """The latent statistics as stored in checkpoints and ``sit.pt``."""
        return {"channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "fae_fingerprint": self.fae_fingerprint, "num_classes": self.num_classes,
                "latent_shape": list(self.shape)}


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
    mean, std = attrs.get(schema.A_CHANNEL_MEAN), attrs.get(schema.A_CHANNEL_STD)
    if mean is None or std is None:
        raise UserError(f"{path}: no per-channel latent statistics (attrs '{schema.A_CHANNEL_MEAN}'/"
                        f"'{schema.A_CHANNEL_STD}'); re-run `fae-pipe encode` to write them")
    mean, std = [float(v) for v in np.ravel(mean)], [float(v) for v in np.ravel(std)]
    if len(mean) != c or len(std) != c or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
        raise UserError(f"{path}: attrs '{schema.A_CHANNEL_MEAN}'/'{schema.A_CHANNEL_STD}' must be {c} finite "
                        f"numbers each with std > 0; got {len(mean)} and {len(std)} values")
    valid = np.asarray(group[schema.VALID][:], bool) if schema.VALID in keys else None
    num_classes = attrs.get(schema.A_NUM_CLASSES)
    if num_classes is None:
        if schema.LABELS not in keys:
            raise UserError(f"{path}: no '{schema.LABELS}' array and no '{schema.A_NUM_CLASSES}' attr")
        num_classes = int(np.max(group[schema.LABELS][:])) + 1
    info = LatentStoreInfo(str(path), (c, h, w), views, n, int(num_classes), tuple(mean), tuple(std),
                           attrs.get(schema.A_FAE_FINGERPRINT))
    return info, valid


class LatentBatches:
    """Normalised latent batches ``(epoch, x, y)`` for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device`` with ``(latent - mean_c) / std_c``;
    ``y`` is int64 (B,). Samples whose ``valid`` flag is False are never served.
    """

    def __init__(self, path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8):
        self.info, valid = read_latent_info(path, schema.open_group(path))
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
        c = self.info.shape[0]
        mean = torch.tensor(self.info.channel_mean, dtype=torch.float64).view(1, c, 1, 1)
        std = torch.tensor(self.info.channel_std, dtype=torch.float64).view(1, c, 1, 1)
        # (x - mean) / std as one fused x * scale + shift that also widens fp16 -> fp32
        scale, shift = (1 / std).float().to(device), (-mean / std).float().to(device)
        for epoch, batch in self.loader.batches_from(step):
            x = torch.from_numpy(batch[schema.LATENTS]).to(device, non_blocking=True)
            y = torch.from_numpy(batch["labels"]).to(device, non_blocking=True)
            yield epoch, torch.addcmul(shift, x, scale), y
