"""Rows of a second store aligned to a generator loader's rows by sample id, read whole shard at a time.

Two readers need "the row of this sample in another store": REPA (the encoder tokens
of a batch's samples, ``fae_pipe.data.repa``) and text-to-image (the caption
embeddings of a batch's samples, ``fae_pipe.data.text_batches``). The stores may be
cut into different storage shards and need not list samples in the same order, so
rows are matched by **sample id** (the index row every store records), never by
position. What must hold, checked once when built, each a one-line ``UserError``
naming both stores: the same dataset (``dataset_fingerprint``, when both record it),
and every sample the generator's loader serves is a valid sample of the other store.

Reads go through the other store's shard files (``ShardMaps``: kept memory maps of
whole shards, or kept whole-shard reads when the store is compressed or remote), and
a batch's rows are grouped by shard so each shard is opened once per batch and only
the batch's rows (and, for an array with a second per-sample axis such as views or
caption slots, only the chosen entry) are copied.
"""

from __future__ import annotations

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.shard_reader import ShardReader
from fae_pipe.data.sharded import ShardMaps, ShardedLoader, default_max_mapped_shards
from fae_pipe.errors import UserError


class AlignedRows:
    """The rows of ``group`` (a store at ``path``) holding the samples of ``source``'s rows.

    Args:
        path, group: the aligned store (opened by the caller, which checks its kind).
        source: the generator's loader; its store's sample ids and served rows are aligned here.
        arrays: the per-sample arrays of ``group`` that ``gather`` reads.
        what: how messages name the pair ("REPA targets", "text embeddings").
        noun: how messages name the aligned store ("targets", "text store").
        purpose: why the datasets must match (ends the different-datasets message).
        hint: what to do when samples are missing (ends the missing-samples message).
        keep_read: whole shards kept decoded when the store cannot be memory-mapped.
    """

    def __init__(self, path, group, source: ShardedLoader, arrays: list[str], what: str, noun: str, purpose: str,
                 hint: str, keep_read: int = 2):
        self.path, self.group, self.what, self.noun = path, group, what, noun
        first = group[arrays[0]]
        self.shard_rows = int((first.shards or first.chunks)[0])
        self._check_same_dataset(source, purpose)
        self.row_of = self._align(source, hint)  # generator-store row -> aligned-store row (-1: never served)
        self.maps = ShardMaps({a: ShardReader(group[a]) for a in arrays}, default_max_mapped_shards(), keep_read)

    def pair(self, source: ShardedLoader) -> str:
        return f"{self.what}: {source.store_path} and {self.path}"

    def _check_same_dataset(self, source: ShardedLoader, purpose: str) -> None:
        fp = schema.A_DATASET_FINGERPRINT
        mine, theirs = self.group.attrs.get(fp), source.group.attrs.get(fp)
        if mine is not None and theirs is not None and mine != theirs:
            raise UserError(f"{self.pair(source)} were made from different datasets ('{fp}' {str(theirs)[:12]} vs "
                            f"{str(mine)[:12]}): {purpose}")

    def _align(self, source: ShardedLoader, hint: str) -> np.ndarray:
        """Aligned-store row of every generator-store row; every served row must have one."""
        ids = np.asarray(schema.read_array(self.group, schema.SAMPLE_IDS), np.int64)
        rows = np.flatnonzero(np.asarray(schema.read_array(self.group, schema.VALID), bool))
        by_id = rows[np.argsort(ids[rows], kind="stable")]
        want = source.sample_ids
        row_of = np.full(want.size, -1, np.int64)
        if by_id.size:
            pos = np.minimum(np.searchsorted(ids[by_id], want), by_id.size - 1)
            hit = ids[by_id[pos]] == want
            row_of[hit] = by_id[pos[hit]]
        served = source.served_rows()
        missing = served[row_of[served] < 0]
        if missing.size:
            r = int(missing[0])
            raise UserError(f"{self.pair(source)} do not hold the same samples: sample id {int(want[r])} (row {r} "
                            f"of the generator's store) is not a valid sample of the {self.noun} ({missing.size} of "
                            f"{served.size} served samples missing); {hint}")
        return row_of

    def rows_of(self, rows) -> np.ndarray:
        """The aligned store's row of each generator row (int64)."""
        out = self.row_of[np.asarray(rows, np.int64)]
        if (out < 0).any():
            raise UserError(f"{self.what}: generator rows {np.asarray(rows)[out < 0][:4].tolist()} have no row in "
                            f"{self.path} (rows the generator's loader never serves)")
        return out

    def gather(self, rows, slots: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Each array's values for the samples of generator ``rows``: with ``slots``, entry ``slots[i]``
        of the array's second axis (a view, a caption slot) for row i, else the whole per-sample row."""
        frow = self.rows_of(rows)
        out = {n: np.empty((frow.size, *(r.row_shape[1:] if slots is not None else r.row_shape)), r.dtype)
               for n, r in self.maps.readers.items()}
        shard = frow // self.shard_rows
        order = np.argsort(shard, kind="stable")
        cuts = [0, *(np.flatnonzero(np.diff(shard[order])) + 1).tolist(), frow.size]
        for a, b in zip(cuts[:-1], cuts[1:]):
            sel = order[a:b]
            s = int(shard[sel[0]])
            local = frow[sel] - s * self.shard_rows
            for name, arr in self.maps.open(s).items():
                if slots is None:
                    out[name][sel] = np.take(arr, local, axis=0)
                else:  # (sample * slot, ...): a view of the shard, no copy
                    flat = arr.reshape(-1, *arr.shape[2:])
                    out[name][sel] = np.take(flat, local * arr.shape[1] + slots[sel], axis=0)
        return out
