"""Generator batches: the generic sharded loader plus the store's own normalisation, as torch tensors.

One implementation for every generator input: ``LatentBatches`` (``latents.zarr``,
``fae_pipe.data.latents``) and ``FeatureBatches`` (raw ``features.zarr`` tokens seen as
a (C, H, W) grid, RAE; ``fae_pipe.data.features``) differ only in how the store is
checked and how a stored row becomes a grid. Each batch is normalised by the store's
``LatentStats`` (the one (de)normalisation), and optionally comes with its REPA
targets: the cached encoder tokens of exactly its samples and views
(``fae_pipe.data.repa``). The data order is the loader's: a pure function of
``(seed, epoch)``, so ``from_step(k)`` resumes exactly.

Why the per-batch path is this short: at demo scale a batch is ~10 us of work, so
every torch call counts. The loader does the index arithmetic once per window and a
batch is one ``np.take``; here the stored values go to the device as they are
(float16: half the bytes) and one ``addcmul`` against full-shape float32 tables
widens and normalises them into a new contiguous tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.data.repa import RepaTargets
from fae_pipe.data.sharded import ROWS, VIEWS, ShardedLoader
from fae_pipe.errors import UserError

GROUP_BYTES = 1 << 20  # stored (float16) bytes converted per call; the bits never depend on it


@dataclass(frozen=True)
class StoreInfo:
    """What training needs to know about a generator's input store (and what the sampler must get back)."""

    path: str
    shape: tuple[int, int, int]  # channel, height, width of one generator input
    views: int
    num_samples: int
    num_classes: int
    stats: LatentStats
    kind: str = schema.KIND_LATENTS  # schema.KIND_LATENTS or schema.KIND_FEATURES
    source: dict | None = None  # a latent store's latent_source record (schema.latent_source): what decodes it

    @property
    def fae_fingerprint(self) -> str | None:
        return self.stats.fae_fingerprint


def num_classes_of(path, group) -> int:
    """The store's ``num_classes`` attr, else max label + 1."""
    value = group.attrs.get(schema.A_NUM_CLASSES)
    if value is not None:
        return int(value)
    if schema.LABELS not in set(group.array_keys()):
        raise UserError(f"{path}: no '{schema.LABELS}' array and no '{schema.A_NUM_CLASSES}' attr")
    return int(np.max(schema.read_array(group, schema.LABELS))) + 1


def valid_mask(group) -> np.ndarray | None:
    return np.asarray(schema.read_array(group, schema.VALID), bool) if schema.VALID in set(group.array_keys()) else None


class GeneratorBatches:
    """Normalised batches ``(epoch, x, y)`` of one store for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device``, normalised with ``info.stats``; ``y`` is
    int64 (B,). Samples whose ``valid`` flag is False are never served. With
    ``repa_features`` (a ``features.zarr``), ``from_step_with_repa`` adds each row's
    cached encoder tokens, float32 (B, tokens, C).
    """

    array: str  # the store array a batch is made of

    def __init__(self, info: StoreInfo, valid: np.ndarray | None, batch_size: int, seed: int, rank: int,
                 world_size: int, memory_budget_bytes: int, shuffle_buffer: int, repa_features=None,
                 extra_arrays: tuple[str, ...] = ()):
        self.info = info
        self.loader = ShardedLoader(info.path, [self.array, *extra_arrays], batch_size, seed, rank=rank,
                                    world_size=world_size,
                                    memory_budget_bytes=memory_budget_bytes, shuffle_buffer=shuffle_buffer,
                                    sample_mask=valid)
        labels = self.loader.labels if valid is None else self.loader.labels[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise UserError(f"{info.path}: labels must lie in [0, {info.num_classes}); found "
                            f"{int(labels.min())}..{int(labels.max())}")
        self.steps_per_epoch = self.loader.steps_per_epoch
        # batches converted per torch call: small batches are overhead-bound (~10 us of work each at
        # demo scale), so up to GROUP_BYTES of stored rows go through one addcmul and are split after
        self.group = max(1, GROUP_BYTES // (batch_size * int(np.prod(info.shape)) * 2))
        self.repa = None if repa_features is None else RepaTargets(repa_features, self.loader,
                                                                  keep_read=shuffle_buffer + 1)

    def grid(self, stored: torch.Tensor) -> torch.Tensor:
        """A batch of stored rows as (B, C, H, W), a view where possible (no copy)."""
        return stored

    def _convert(self, device: torch.device):
        """stored rows (and their epoch) -> (x, y) on ``device``: float16 moved as stored (half the bytes),
        normalised there."""
        normalize = self.info.stats.normalizer(self.info.shape, device)
        grid, array = self.grid, self.array
        if device.type == "cpu":  # no .to() per call: two calls that do nothing still cost ~1 us
            return lambda b, epoch: (normalize(grid(torch.from_numpy(b[array]))), torch.from_numpy(b[schema.LABELS]))
        return lambda b, epoch: (normalize(grid(torch.from_numpy(b[array]).to(device, non_blocking=True))),
                                 torch.from_numpy(b[schema.LABELS]).to(device, non_blocking=True))

    def _spans(self, step: int, device, extra=None):
        """(epoch, batch tensors...) per batch, converted ``group`` batches at a time (one addcmul).

        ``extra(span, epoch, device)``: more per-row tensors of the span (REPA targets, caption
        embeddings), appended after ``x, y`` and split into batches with them."""
        device = torch.device(device)
        convert, size = self._convert(device), self.loader.batch_size
        for epoch, span in self.loader.batches_from(step, self.group):
            parts = convert(span, epoch)
            if extra is not None:
                parts = (*parts, *extra(span, epoch, device))
            k = span[schema.LABELS].size // size
            if k == 1:
                yield (epoch, *parts)
            else:  # k views of whole batches (unbind: one call, cheaper than split or slicing)
                for one in zip(*(t.unflatten(0, (k, size)).unbind(0) for t in parts)):
                    yield (epoch, *one)

    def from_step(self, step: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Infinite ``(epoch, x, y)`` stream starting at this process's batch number ``step``."""
        return self._spans(step, device)

    def from_step_with_repa(self, step: int, device: torch.device
                            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Infinite ``(epoch, x, y, targets)`` stream: ``targets`` float32 (B, tokens, C), the cached
        encoder patch tokens of each row's sample id and view (same batches as ``from_step``)."""
        if self.repa is None:
            raise UserError(f"{self.info.path}: REPA targets were not configured; pass repa_features= "
                            "(a features.zarr) when building the batches")
        return self._spans(step, device, self._repa_targets)

    def _repa_targets(self, span: dict, epoch: int, device: torch.device) -> tuple[torch.Tensor]:
        targets = torch.from_numpy(self.repa.read(span[ROWS], span[VIEWS])).to(device, non_blocking=True)
        return (targets.float(),)
