"""The generic training loader for sample-first zarr stores (latents, DINOv2 features).

Why it looks like this: single-sample zarr reads are slow (a chunk decode each), so
the loader only ever reads whole storage shards and shuffles in memory. When every
requested array fits ``memory_budget_bytes`` the whole store is read once and held;
otherwise shards stream in a shuffled order through a window of about
``shuffle_buffer`` shards that is shuffled in memory.

The data order is a pure function of ``(seed, epoch)`` (for a given store, world
size, batch size and mode), so a resumed run asks ``batches_from(step)`` and gets
exactly the batches the uninterrupted run saw. Per epoch:

1. the storage shards are permuted; the kept samples of the shards, in that order,
   form one stream;
2. the stream is cut into ``world_size`` equal contiguous parts: rank r trains on
   part r only (disjoint samples; when streaming, a rank reads only the shards its
   part touches);
3. each part is cut to ``steps_per_epoch * batch_size`` samples and then into
   windows of whole batches (``shuffle_buffer`` shards' worth of rows, or the whole
   part when the store is held in RAM); the order inside each window is a seeded
   permutation;
4. each sample's view (e.g. original or flipped) is drawn from ``(seed, epoch)``.

Every requested array must have the sample axis at dim 0 and the view axis at dim 1;
batches come back with the view already selected: ``(batch, *rest)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from fae_pipe.errors import UserError

_ORDER, _WINDOW, _VIEW = 0, 1, 2  # independent random streams per (seed, epoch)


class ShardedLoader:
    """Batches of whole-shard-read samples with a resumable, rank-disjoint order.

    Args:
        store_path: zarr group with the ``arrays`` plus ``labels`` (and optionally ``sample_ids``).
        arrays: per-sample arrays to load, each shaped (sample, view, ...).
        batch_size: samples per batch of THIS process.
        seed: data-order seed.
        rank, world_size: this process and the number of processes (disjoint parts).
        memory_budget_bytes: hold the whole store in RAM when the arrays fit in it.
        shuffle_buffer: storage shards per streaming shuffle window.
        sample_mask: bool per sample; False samples are never served (e.g. failed rows).
        random_view: draw a view per sample and epoch; False always serves view 0.
    """

    def __init__(self, store_path, arrays: list[str], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8,
                 sample_mask: np.ndarray | None = None, random_view: bool = True):
        if not arrays:
            raise UserError("sharded loader: no arrays requested; name at least one per-sample array")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or shuffle_buffer < 1:
            raise UserError(f"sharded loader: invalid batch_size={batch_size}, rank={rank}, "
                            f"world_size={world_size}, shuffle_buffer={shuffle_buffer}")
        self.store_path = Path(store_path)
        self.group = open_zarr_group(self.store_path)
        self.names = list(arrays)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.random_view = random_view
        first = self._check_arrays()
        self.num_samples, self.num_views = int(first.shape[0]), int(first.shape[1])
        self.shard_rows = int((first.shards or first.chunks)[0])
        self.num_shards = -(-self.num_samples // self.shard_rows)
        self.labels, self.sample_ids = self._read_bookkeeping()

        mask = np.ones(self.num_samples, bool) if sample_mask is None else np.asarray(sample_mask, bool)
        if mask.shape != (self.num_samples,):
            raise UserError(f"sharded loader: sample_mask has shape {mask.shape}, expected ({self.num_samples},)")
        kept = np.flatnonzero(mask)
        self._kept_by_shard = np.split(kept, np.searchsorted(kept, np.arange(1, self.num_shards) * self.shard_rows))
        self.num_kept = int(kept.size)
        self.steps_per_epoch = (self.num_kept // world_size) // batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.store_path}: {self.num_kept} usable samples are fewer than one global batch "
                            f"({batch_size} x {world_size} processes); lower the batch size")

        self.nbytes = int(sum(self.group[n].nbytes for n in self.names))
        self.in_ram = self.nbytes <= memory_budget_bytes
        per_part = self.steps_per_epoch * batch_size
        rows = max(1, shuffle_buffer * self.shard_rows // batch_size) * batch_size
        self.window = per_part if self.in_ram else min(per_part, rows)
        self._blocks: dict[int, dict[str, np.ndarray]] = {}

    # ---- order (no data touched) -------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sample indices this rank serves in ``epoch``, in serving order."""
        rng = np.random.default_rng([self.seed, epoch, _ORDER])
        stream = np.concatenate([self._kept_by_shard[s] for s in rng.permutation(self.num_shards)])
        part_len = self.num_kept // self.world_size
        part = stream[self.rank * part_len: self.rank * part_len + self.steps_per_epoch * self.batch_size].copy()
        for j, start in enumerate(range(0, part.size, self.window)):
            seg = part[start:start + self.window]
            wrng = np.random.default_rng([self.seed, epoch, _WINDOW, self.rank, j])
            part[start:start + self.window] = seg[wrng.permutation(seg.size)]
        return part

    def epoch_views(self, epoch: int) -> np.ndarray:
        """View index per sample of the store for ``epoch`` (all zeros without random_view)."""
        if not self.random_view or self.num_views == 1:
            return np.zeros(self.num_samples, np.int64)
        rng = np.random.default_rng([self.seed, epoch, _VIEW])
        return rng.integers(0, self.num_views, size=self.num_samples, dtype=np.int64)

    # ---- data --------------------------------------------------------------------
    @property
    def resident_shards(self) -> int:
        """Storage shards currently held in memory (all of them when the store is in RAM)."""
        if self.in_ram:
            return self.num_shards if self._blocks else 0
        return len(self._blocks)

    def batches_from(self, step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Infinite ``(epoch, batch)`` stream starting at this process's batch number ``step``."""
        epoch, first = divmod(int(step), self.steps_per_epoch)
        per_window = self.window // self.batch_size
        while True:
            order, views = self.epoch_order(epoch), self.epoch_views(epoch)
            for b in range(first, self.steps_per_epoch):
                if b == first or b % per_window == 0:
                    w = b // per_window
                    self._hold(order[w * self.window:(w + 1) * self.window])
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield epoch, self._gather(idx, views[idx])
            epoch, first = epoch + 1, 0

    def _hold(self, window_idx: np.ndarray) -> None:
        """Make the blocks that ``window_idx`` needs resident, dropping the others."""
        if self.in_ram:
            if not self._blocks:
                self._blocks[0] = {n: self.group[n][:] for n in self.names}
            return
        needed = set(np.unique(window_idx // self.shard_rows).tolist())
        for s in [s for s in self._blocks if s not in needed]:
            del self._blocks[s]
        for s in sorted(needed - set(self._blocks)):
            lo, hi = s * self.shard_rows, min(self.num_samples, (s + 1) * self.shard_rows)
            self._blocks[s] = {n: self.group[n][lo:hi] for n in self.names}

    def _gather(self, idx: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"labels": self.labels[idx], "sample_ids": self.sample_ids[idx]}
        if self.in_ram:
            block = self._blocks[0]
            for n in self.names:
                batch[n] = block[n][idx, views]
            return batch
        blk = idx // self.shard_rows
        local = idx - blk * self.shard_rows
        groups = [(s, blk == s) for s in np.unique(blk).tolist()]
        for n in self.names:
            ref = self._blocks[groups[0][0]][n]
            out = np.empty((idx.size, *ref.shape[2:]), ref.dtype)
            for s, m in groups:
                out[m] = self._blocks[s][n][local[m], views[m]]
            batch[n] = out
        return batch

    # ---- checks ------------------------------------------------------------------
    def _check_arrays(self) -> zarr.Array:
        present = sorted(self.group.array_keys())
        missing = [n for n in self.names if n not in present]
        if missing:
            raise UserError(f"{self.store_path}: no array {missing[0]!r}; arrays present: {', '.join(present)}")
        first = self.group[self.names[0]]
        for n in self.names:
            a = self.group[n]
            if a.ndim < 2 or a.shape[:2] != first.shape[:2]:
                raise UserError(f"{self.store_path}: array {n!r} has shape {a.shape}; every loaded array must be "
                                f"(sample, view, ...) with {first.shape[:2]} as its first two dims")
        return first

    def _read_bookkeeping(self) -> tuple[np.ndarray, np.ndarray]:
        keys = set(self.group.array_keys())
        if "labels" not in keys:
            raise UserError(f"{self.store_path}: no 'labels' array; a training store needs one int label per sample")
        labels = np.asarray(self.group["labels"][:], np.int64)
        ids = (np.asarray(self.group["sample_ids"][:], np.int64) if "sample_ids" in keys
               else np.arange(self.num_samples, dtype=np.int64))
        if labels.shape != (self.num_samples,) or ids.shape != (self.num_samples,):
            raise UserError(f"{self.store_path}: 'labels'/'sample_ids' must have shape ({self.num_samples},)")
        return labels, ids


def open_zarr_group(path) -> zarr.Group:
    """Open a zarr v3 group read-only; a wrong path is a one-line UserError."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path} is not a zarr v3 store (no zarr.json); check the path or run the stage that writes it")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a malformed hierarchy
        raise UserError(f"{path} could not be opened as a zarr group: {type(e).__name__}: {e}") from None
