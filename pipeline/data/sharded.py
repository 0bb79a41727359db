"""The generic training loader for sample-first zarr stores (latents, DINOv2 features).

Why it looks like this: single-sample zarr reads are slow (a chunk decode each), so
the loader only ever reads whole storage shards and shuffles in memory. When every
requested array fits ``memory_budget_bytes`` the whole store is read once (straight
from the shard files for uncompressed local stores, ``ShardReader``) and held as one
array; otherwise shards stream in a shuffled order through a window of about
``shuffle_buffer`` shards that is shuffled in memory. Streamed shards are memory-mapped
where possible, so a batch copies only the rows and the view it uses and the kernel
reads the next window ahead in the background.

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

import resource
from collections import OrderedDict
from typing import Iterator

import numpy as np
import zarr
from tqdm import tqdm

from fae_pipe.cache.schema import LABELS, SAMPLE_IDS, open_group, read_array
from fae_pipe.cache.location import StoreLocation
from fae_pipe.cache.shard_reader import MAX_PREFETCH, ShardReader
from fae_pipe.errors import UserError

_ORDER, _WINDOW, _VIEW = 0, 1, 2  # independent random streams per (seed, epoch)
# Streaming: samples up to this size (all arrays, all views) are copied with their
# window into one block, since one gather per batch beats a gather per shard when rows
# are tiny; larger samples are gathered per shard straight from the memory maps, which
# reads only the view each sample uses (measured: 0.34x vs 0.85x the in-RAM array
# for 32x16x16 fp16 latents with 2 views).
CONTIGUOUS_ROW_BYTES = 4096


ROWS, VIEWS = "rows", "views"  # batch keys beside the arrays: each row's store row and the view served


def default_max_mapped_shards() -> int:
    """How many shard-array memory maps a loader keeps open, from this process's file limit.

    Re-mapping a shard whose pages are still cached costs a page fault per page touched
    (about as much as reading it), so maps are kept, up to a quarter of the open-file
    limit (each map holds a descriptor), at least 16 and at most 4096. Read when a
    loader is built, so a limit raised after import (``ulimit``, ``setrlimit``) counts.
    """
    return max(16, min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))


class ShardMaps:
    """One shard's arrays on demand: kept memory maps (most recently used last) where the files
    allow, else a whole-shard read; at most ``max_mapped`` maps (all arrays) stay open and the
    last ``keep_read`` whole-shard reads are kept (0: callers hold what they read)."""

    def __init__(self, readers: dict[str, ShardReader], max_mapped: int, keep_read: int = 0):
        self.readers, self.max_mapped, self.keep_read = readers, max_mapped, keep_read
        self._maps: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._read: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    @property
    def direct(self) -> bool:
        return all(r.direct for r in self.readers.values())

    def prefetch(self, shards) -> None:
        """Start reading ``shards`` ahead: memory-map them (the kernel's read-ahead) where the files
        allow, else start fetching the whole shard objects in the background (object storage)."""
        if all(r.mappable for r in self.readers.values()):
            for s in shards:
                self.open(s)
            return
        for s in shards:
            for r in self.readers.values():
                r.prefetch(s)

    def open(self, s: int) -> dict[str, np.ndarray]:
        if s in self._maps:
            self._maps.move_to_end(s)
            return self._maps[s]
        if s in self._read:
            self._read.move_to_end(s)
            return self._read[s]
        maps = {n: r.map(s) for n, r in self.readers.items()}
        if any(m is None for m in maps.values()):
            whole = {n: r.read(s) for n, r in self.readers.items()}
            if self.keep_read:
                self._read[s] = whole
                while len(self._read) > self.keep_read:
                    self._read.popitem(last=False)
            return whole
        self._maps[s] = maps
        while len(self._maps) * len(self.readers) > self.max_mapped:
            self._maps.popitem(last=False)
        return maps


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
        max_mapped_shards: shard-array memory maps kept open (None: ``default_max_mapped_shards()``).
    """

    def __init__(self, store_path, arrays: list[str], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8,
                 sample_mask: np.ndarray | None = None, random_view: bool = True,
                 max_mapped_shards: int | None = None):
        if not arrays:
            raise UserError("sharded loader: no arrays requested; name at least one per-sample array")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or shuffle_buffer < 1:
            raise UserError(f"sharded loader: invalid batch_size={batch_size}, rank={rank}, "
                            f"world_size={world_size}, shuffle_buffer={shuffle_buffer}")
        loc = StoreLocation.of(store_path)  # a local directory or a URL (s3://, gs://...)
        self.store_path = loc.local if loc.is_local else loc.url
        self._store_name = loc.name
        self.group = open_group(self.store_path)
        self.names = list(arrays)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.random_view = random_view
        self.max_mapped_shards = default_max_mapped_shards() if max_mapped_shards is None else int(max_mapped_shards)
        if self.max_mapped_shards < 1:
            raise UserError(f"sharded loader: max_mapped_shards={max_mapped_shards} is invalid; it must be >= 1")
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
        self._readers = {n: ShardReader(self.group[n]) for n in self.names}
        # resident data: blocks of arrays (one for the whole store / a small window, or
        # one per shard); _block_of: shard -> block or -1; _row0: shard -> offset from a sample
        # index to its row in that block; _maps: open shard memory maps
        self._blocks: list[dict[str, np.ndarray]] = []
        self._held: list[int] = []
        self._copied_rows = 0
        self._block_of = np.full(self.num_shards, -1, np.int64)
        self._row0 = np.zeros(self.num_shards, np.int64)
        self._maps = ShardMaps(self._readers, self.max_mapped_shards)

    # ---- order (no data touched) -------------------------------------------------
    def served_rows(self) -> np.ndarray:
        """Store rows this loader may serve (the kept samples, all ranks), ascending."""
        return np.concatenate(self._kept_by_shard)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sample indices this rank serves in ``epoch``, in serving order."""
        rng = np.random.default_rng([self.seed, epoch, _ORDER])
        stream = np.concatenate([self._kept_by_shard[s] for s in rng.permutation(self.num_shards)])
        part_len = self.num_kept // self.world_size
        part = stream[self.rank * part_len: self.rank * part_len + self.steps_per_epoch * self.batch_size].copy()
        wrng = np.random.default_rng([self.seed, epoch, _WINDOW, self.rank])
        for start in range(0, part.size, self.window):
            seg = part[start:start + self.window]
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
    def resident_rows(self) -> int:
        """Samples copied into process memory: the whole store in RAM, else at most one small window.

        Memory-mapped shards are not counted: their pages belong to the kernel's page
        cache, which evicts them under memory pressure.
        """
        return self._copied_rows

    def batches_from(self, step: int, group: int = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Infinite ``(epoch, batch)`` stream starting at this process's batch number ``step``.

        A batch holds each requested array (view selected), ``labels``, ``sample_ids``,
        ``rows`` (store row of each batch row) and ``views`` (the view served).
        ``group`` > 1: each item holds the rows of up to ``group`` consecutive batches
        (fewer at a window's or epoch's end), for callers that convert many small
        batches at once; the rows are those of the single batches, in order.
        """
        epoch, first = divmod(int(step), self.steps_per_epoch)
        per_window = self.window // self.batch_size
        order = self.epoch_order(epoch)
        while True:
            views, next_order = self.epoch_views(epoch), None
            b = first
            while b < self.steps_per_epoch:
                if b == first or b % per_window == 0:
                    w = b // per_window
                    ahead = order[(w + 1) * self.window:(w + 2) * self.window]
                    if ahead.size == 0:  # the last window: read ahead into the next epoch
                        next_order = self.epoch_order(epoch + 1)
                        ahead = next_order[:self.window]
                    window = order[w * self.window:(w + 1) * self.window]
                    self._hold(window, ahead)
                    plan, base = self._plan(window, views[window]), w * self.window
                end = min(b + group, (b // per_window + 1) * per_window, self.steps_per_epoch)
                lo = b * self.batch_size - base
                yield epoch, self._gather(plan, lo, lo + (end - b) * self.batch_size)
                b = end
            epoch, first = epoch + 1, 0
            order = next_order if next_order is not None else self.epoch_order(epoch)

    def _hold(self, window_idx: np.ndarray, next_idx: np.ndarray) -> None:
        """Make the shards ``window_idx`` needs resident; ask the kernel for those of ``next_idx``.

        Held as ONE block (a copy of the shards, concatenated) when the store is in
        RAM or its samples are small (copying is cheaper than gathering per shard),
        else as one block per shard straight over its memory map (a batch then copies
        only the rows and view it uses, so large samples are read once).
        """
        if self.in_ram:
            if not self._held:
                self._blocks, self._held = [self._read_store()], list(range(self.num_shards))
                self._block_of[:], self._copied_rows = 0, self.num_samples
            return
        needed = self._shards_of(window_idx)
        following = self._shards_of(next_idx)
        if self._maps.direct and following != needed:  # the same shards stay held: nothing to read ahead
            self._maps.prefetch(following)  # kernel read-ahead, or background GETs of whole shard objects
        if needed == self._held:
            return
        self._blocks, self._held, self._copied_rows = [], [], 0  # free the old window first
        parts = [self._maps.open(s) for s in needed]
        self._block_of[:] = -1
        if sum(r.row_nbytes for r in self._readers.values()) <= CONTIGUOUS_ROW_BYTES:
            sizes = [p[self.names[0]].shape[0] for p in parts]
            self._blocks = [{n: np.concatenate([p[n] for p in parts]) for n in self.names}]
            self._copied_rows = sum(sizes)
            self._block_of[needed] = 0
            self._row0[needed] = np.concatenate([[0], np.cumsum(sizes)[:-1]]) - np.asarray(needed) * self.shard_rows
        else:
            self._blocks = parts
            self._block_of[needed] = np.arange(len(needed))
            self._row0[needed] = -np.asarray(needed) * self.shard_rows
        self._held = needed

    def _read_store(self) -> dict[str, np.ndarray]:
        """Every requested array, whole, read shard by shard into one buffer each."""
        out = {n: np.empty((self.num_samples, *r.row_shape), r.dtype) for n, r in self._readers.items()}
        for s in range(min(self.num_shards, MAX_PREFETCH)):  # object storage: GETs in flight (local: no-op)
            for r in self._readers.values():
                r.prefetch(s)
        for s in tqdm(range(self.num_shards), desc=f"load {self._store_name}", unit="shard", leave=False,
                      disable=self.num_shards < 64):
            lo, hi = s * self.shard_rows, min(self.num_samples, (s + 1) * self.shard_rows)
            for n, r in self._readers.items():
                r.read_into(s, out[n][lo:hi])
                r.prefetch(s + MAX_PREFETCH)
        return out

    def _shards_of(self, idx: np.ndarray) -> list[int]:
        return np.flatnonzero(np.bincount(idx // self.shard_rows, minlength=self.num_shards)).tolist()

    def _plan(self, idx: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Everything about a window's rows that does not need the data, computed once per window
        (vectorised) so a batch only slices it: row in its block, block, labels, ids.

        With one block per shard each batch comes grouped by block (a stable sort of
        every batch's segment, here for the whole window), so a group is copied
        straight into its output slice; with one block the row is a flat (row, view) index.
        """
        if len(self._blocks) > 1:
            blk = self._block_of[idx // self.shard_rows]
            pos = np.arange(idx.size)
            by_block = np.lexsort((pos, blk, pos // self.batch_size))  # by batch, then block, then position
            idx, views = idx[by_block], views[by_block]
        local = idx + self._row0[idx // self.shard_rows]
        plan = {ROWS: idx, VIEWS: views, LABELS: self.labels[idx], SAMPLE_IDS: self.sample_ids[idx]}
        if len(self._blocks) == 1:
            plan["flat"] = local * self.num_views + views
        else:
            plan["local"], plan["block"] = local, self._block_of[idx // self.shard_rows]
        return plan

    def _gather(self, plan: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        """Batch rows ``lo:hi`` of a window's plan: its arrays (view selected) and bookkeeping."""
        batch = {k: plan[k][lo:hi] for k in (LABELS, SAMPLE_IDS, ROWS, VIEWS)}
        if len(self._blocks) == 1:
            for n, arr in self._blocks[0].items():
                batch[n] = np.take(arr.reshape(-1, *arr.shape[2:]), plan["flat"][lo:hi], axis=0)
            return batch
        local, views, blk = plan["local"][lo:hi], batch[VIEWS], plan["block"][lo:hi]
        cuts = [0, *(np.flatnonzero(np.diff(blk)) + 1).tolist(), hi - lo]
        for n in self.names:
            ref = self._blocks[int(blk[0])][n]
            out = np.empty((hi - lo, *ref.shape[2:]), ref.dtype)
            for a, b in zip(cuts[:-1], cuts[1:]):
                arr = self._blocks[int(blk[a])][n]
                flat = arr.reshape(-1, *arr.shape[2:])  # (sample * view, ...): a view, no copy
                # mode="clip": indices are valid by construction, and "raise" would buffer `out` (a second copy)
                np.take(flat, local[a:b] * arr.shape[1] + views[a:b], axis=0, out=out[a:b], mode="clip")
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
        if LABELS not in keys:
            raise UserError(f"{self.store_path}: no '{LABELS}' array; a training store needs one int label per sample")
        labels = np.asarray(read_array(self.group, LABELS), np.int64)
        ids = (np.asarray(read_array(self.group, SAMPLE_IDS), np.int64) if SAMPLE_IDS in keys
               else np.arange(self.num_samples, dtype=np.int64))
        if labels.shape != (self.num_samples,) or ids.shape != (self.num_samples,):
            raise UserError(f"{self.store_path}: '{LABELS}'/'{SAMPLE_IDS}' must have shape ({self.num_samples},)")
        return labels, ids

