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

Alignment and reads are ``fae_pipe.data.aligned.AlignedRows`` (shared with the caption
embeddings of text-to-image): the target store's shard files (``ShardMaps``: kept memory
maps of whole shards), so a batch copies only its rows and views. Locality follows the
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
from fae_pipe.data.aligned import AlignedRows
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError


class RepaTargets:
    """Cached patch tokens (float16, (B, tokens, C)) for given rows and views of a generator's store.

    Args:
        features_path: the ``features.zarr`` holding the targets (complete).
        source: the generator's loader; its store's sample ids and served samples are aligned here
            (``fae_pipe.data.aligned.AlignedRows``: dataset check, id alignment, shard-grouped reads).
        keep_read: whole shards kept decoded when the target store cannot be memory-mapped
            (compressed or remote), so a window's batches do not decode a shard each.
    """

    def __init__(self, features_path, source: ShardedLoader, keep_read: int = 2):
        self.path = features_path if is_url(features_path) else Path(features_path)
        self.group = schema.open_feature_store(self.path, key="repa features")
        arr = self.group[schema.FEATURES]
        _, self.num_views, self.tokens, self.dim = (int(v) for v in arr.shape)
        self.grid = tuple(int(g) for g in self.group.attrs[schema.A_GRID])
        self.rows = AlignedRows(self.path, self.group, source, [schema.FEATURES], "REPA targets", "targets",
                                "REPA targets must show the same images",
                                "use the feature store the generator's store was made from", keep_read)
        self._check_same_views(source)
        self._maps = self.rows.maps

    def _check_same_views(self, source: ShardedLoader) -> None:
        mine, theirs = dict(self.group.attrs), dict(source.group.attrs)
        views = list(theirs.get(schema.A_VIEWS) or [])
        if source.num_views > self.num_views or (views and mine.get(schema.A_VIEWS) is not None
                                                  and list(mine[schema.A_VIEWS])[:len(views)] != views):
            raise UserError(f"{self.rows.pair(source)} hold different views ({views or source.num_views} vs "
                            f"{mine.get(schema.A_VIEWS) or self.num_views}): view v of a batch must be view v of "
                            "its targets; extract the targets with the same views")

    def read(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """float16 (B, tokens, C): the target store's row of each generator row's sample id, at its view."""
        return self.rows.gather(rows, np.asarray(views, np.int64))[schema.FEATURES]
