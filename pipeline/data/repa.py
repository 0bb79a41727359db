"""REPA targets from the cache: the encoder patch tokens of exactly the samples and views a batch holds.

REPA aligns a generator's hidden state with DINOv2 tokens of the same image; fae-pipe
reads them from ``features.zarr`` instead of running DINOv2 at every step. The
generator's store (latents, or features themselves) and the target store may be cut
into different storage shards, so rows are aligned by **sample id** (the index row
both record), and a batch row served with view v gets view v of the targets. What
must hold, checked once when built, each a one-line ``UserError`` naming both stores:
the same dataset (``dataset_fingerprint``), the same views in the same order
(``views``), and every sample the generator serves is a valid sample of the target
store. A target store of another encoder (e.g. DINOv2-B targets for FAE latents made
from DINOv2-g) is fine: REPA needs the same images, not the same features.

Reads go through the target store's shard files (``ShardMaps``: kept memory maps of
whole shards), so a batch copies only its rows and views. Locality follows the
generator's order: when it streams shard windows and the stores share their sample
order (``encode`` keeps the feature store's), a window touches about as many target
shards; a generator held in RAM draws from the whole store, so targets are random
row reads (page cache or disk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.location import is_url
from fae_pipe.cache.shard_reader import ShardReader
from fae_pipe.data.sharded import ShardMaps, ShardedLoader, default_max_mapped_shards
from fae_pipe.errors import UserError


class RepaTargets:
    """Cached patch tokens (float16, (B, tokens, C)) for given rows and views of a generator's store.

    Args:
        features_path: the ``features.zarr`` holding the targets (complete).
        source: the generator's loader; its store's sample ids and served samples are aligned here.
        keep_read: whole shards kept decoded when the target store cannot be memory-mapped
            (compressed or remote), so a window's batches do not decode a shard each.
    """

    def __init__(self, features_path, source: ShardedLoader, keep_read: int = 2):
        self.path = features_path if is_url(features_path) else Path(features_path)
        self.group = schema.open_feature_store(self.path, key="repa features")
        arr = self.group[schema.FEATURES]
        _, self.num_views, self.tokens, self.dim = (int(v) for v in arr.shape)
        self.grid = tuple(int(g) for g in self.group.attrs[schema.A_GRID])
        self.shard_rows = int((arr.shards or arr.chunks)[0])
        self._check_same_images(source)
        self.row_of = self._align(source)  # generator-store row -> target-store row (-1: never served)
        self._maps = ShardMaps({schema.FEATURES: ShardReader(arr)}, default_max_mapped_shards(), keep_read)

    def _pair(self, source: ShardedLoader) -> str:
        return f"REPA targets: {source.store_path} and {self.path}"

    def _check_same_images(self, source: ShardedLoader) -> None:
        mine, theirs = dict(self.group.attrs), dict(source.group.attrs)
        fp = schema.A_DATASET_FINGERPRINT
        if fp in mine and fp in theirs and mine[fp] != theirs[fp]:
            raise UserError(f"{self._pair(source)} were made from different datasets ('{fp}' "
                            f"{str(theirs[fp])[:12]} vs {str(mine[fp])[:12]}): REPA targets must show the same images")
        views = list(theirs.get(schema.A_VIEWS) or [])
        if source.num_views > self.num_views or (views and mine.get(schema.A_VIEWS) is not None
                                                  and list(mine[schema.A_VIEWS])[:len(views)] != views):
            raise UserError(f"{self._pair(source)} hold different views ({views or source.num_views} vs "
                            f"{mine.get(schema.A_VIEWS) or self.num_views}): view v of a batch must be view v of "
                            "its targets; extract the targets with the same views")

    def _align(self, source: ShardedLoader) -> np.ndarray:
        """Target-store row of every generator-store row; every served row must have one."""
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
            raise UserError(f"{self._pair(source)} do not hold the same samples: sample id {int(want[r])} (row {r} "
                            f"of the generator's store) is not a valid sample of the targets ({missing.size} of "
                            f"{served.size} served samples missing); use the feature store the generator's store "
                            "was made from")
        return row_of

    def read(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """float16 (B, tokens, C): the target store's row of each generator row's sample id, at its view."""
        frow = self.row_of[np.asarray(rows, np.int64)]
        if (frow < 0).any():
            raise UserError(f"REPA targets: generator rows {np.asarray(rows)[frow < 0][:4].tolist()} have no target "
                            f"row in {self.path} (rows the generator's loader never serves)")
        out = np.empty((frow.size, self.tokens, self.dim), np.float16)
        shard = frow // self.shard_rows
        order = np.argsort(shard, kind="stable")
        cuts = [0, *(np.flatnonzero(np.diff(shard[order])) + 1).tolist(), frow.size]
        for a, b in zip(cuts[:-1], cuts[1:]):
            sel = order[a:b]
            s = int(shard[sel[0]])
            flat = self._maps.open(s)[schema.FEATURES].reshape(-1, self.tokens, self.dim)  # (sample * view, T, C)
            out[sel] = np.take(flat, (frow[sel] - s * self.shard_rows) * self.num_views + views[sel], axis=0)
        return out
