"""Exact statistics of a feature store, for generators trained on raw features (RAE).

What they cover: every **valid** sample (failed images are zero rows and left out)
and **every view** (the generator sees each view, so the statistics are those of the
distribution it is served), in float64 from the float16 values stored. Per channel:
over (sample, view, token). Per position and channel (RAE's choice): over (sample,
view) for each token and channel, stored as (C, H, W) with tokens row-major on the grid.

When they are computed (the decision):

- **Per channel, by ``extract``**, like ``encode`` does for latents: each shard task
  adds its shard's moments to its completion record (``shard_moments_of_features``),
  and the coordinator merges them in shard order when the store completes
  (``channel_stats_from_records``) into the attrs ``channel_mean``/``channel_std``/
  ``channel_stats_count``. Cost: one float64 pass over a shard the task already holds
  (~3% of the demo's extract); free of a second 2 TB read at ImageNet scale.
- **Per position, on request** (``compute_feature_stats(path, per_position=True)``,
  also ``fae-pipe feature-stats PATH --per-position``): one streaming pass over the
  finished store, shard by shard in order. Per-shard per-position moments are C x
  tokens x 2 floats (16 MB for DINOv2-g at 16x16), too large for a JSON record per
  shard, so they are not kept during extract. The same pass fills in the per-channel
  attrs of a store extracted before ``extract`` wrote them; both results are the bits
  ``extract`` would have written (same per-shard function, same merge order).

Deterministic: within a shard, rows are reduced in blocks whose size depends only on
the row shape (``BLOCK_BYTES``), and blocks and shards merge in a fixed order with
Chan's update (``latent_stats.merge_two``), whatever the number of workers; RAE's
statistics are not. Memory: one block plus C x tokens accumulators, whatever the
store size. The per-position tables are float64 arrays ``position_mean`` /
``position_std`` in the store (names in ``schema``), committed by the attr
``position_stats`` written after them; ``--overwrite`` of the store removes them with
the rest. ``feature_stats(group, ...)`` reads either variant back as a ``LatentStats``.
"""

from __future__ import annotations

import sys

import numpy as np
import zarr
from tqdm import tqdm

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.latent_stats import LatentStats, merge_moments, merge_two
from fae_pipe.cache.shard_reader import ShardReader
from fae_pipe.errors import UserError

BLOCK_BYTES = 64 << 20  # float64 bytes converted at a time within a shard (fixed: the result depends on it)


def hint(path) -> str:
    """What to run when a feature store lacks statistics."""
    return f"compute them once with `fae-pipe feature-stats {path}` (add --per-position for RAE's tables)"


def position_moments(feats: np.ndarray, valid: np.ndarray) -> dict:
    """(count, mean, M2) per (token, channel) of one shard's valid rows, over samples and views.

    ``feats`` (n, views, tokens, channels) float16 (an in-memory or memory-mapped shard).
    """
    _, views, tokens, dim = feats.shape
    rows = np.flatnonzero(np.asarray(valid, bool))
    block = max(1, BLOCK_BYTES // (views * tokens * dim * 8))
    total = None
    for lo in range(0, rows.size, block):
        x = np.asarray(feats[rows[lo:lo + block]], np.float64).reshape(-1, tokens, dim)
        mean = x.mean(axis=0)
        total = merge_two(total, {"count": x.shape[0], "mean": mean, "m2": ((x - mean) ** 2).sum(axis=0)})
    if total is None:
        zeros = np.zeros((tokens, dim))
        return {"count": 0, "mean": zeros, "m2": zeros}
    return total


def channel_moments(pos: dict) -> dict:
    """Per-position moments -> per-channel ones (every position has the same count): exact, vectorised."""
    n, mean, m2 = int(pos["count"]), np.asarray(pos["mean"]), np.asarray(pos["m2"])
    if n == 0:
        return {"count": 0, "mean": [0.0] * mean.shape[1], "m2": [0.0] * mean.shape[1]}
    mean_c = mean.mean(axis=0)
    m2_c = m2.sum(axis=0) + n * ((mean - mean_c) ** 2).sum(axis=0)
    return {"count": n * mean.shape[0], "mean": mean_c.tolist(), "m2": m2_c.tolist()}


def shard_moments_of_features(feats: np.ndarray, valid: np.ndarray) -> dict:
    """Per-channel moments of one feature shard, as ``extract`` records them (JSON lists)."""
    return channel_moments(position_moments(feats, valid))


def _shard(reader: ShardReader, s: int) -> np.ndarray:
    """One whole shard: a memory map where possible (pages read as the blocks touch them)."""
    mapped = reader.map(s)
    return reader.read(s) if mapped is None else mapped


def channel_stats_from_records(group: zarr.Group, records: dict[int, dict]) -> LatentStats | None:
    """Merge the shards' recorded per-channel moments in shard order (None: no valid sample).

    A record without moments (written before ``extract`` recorded them) is filled in
    by reading that shard, with the same function: the result does not depend on it.
    """
    feats, valid = ShardReader(group[schema.FEATURES]), ShardReader(group[schema.VALID])
    parts = []
    for s in range(schema.store_num_shards(group)):
        moments = (records.get(s) or {}).get("extras", {}).get("moments")
        parts.append(moments if moments is not None else shard_moments_of_features(_shard(feats, s), valid.read(s)))
    if not any(int(p["count"]) for p in parts):
        return None
    return merge_moments(parts)


def compute_feature_stats(path, per_position: bool = False) -> LatentStats:
    """One streaming pass over a complete feature store: write its per-channel attrs (and, with
    ``per_position``, its per-position arrays); returns the statistics read back (``feature_stats``).

    Takes the store's writer lock, so it never runs beside an ``extract`` of the same store.
    """
    with StoreLock(path):
        group = schema.open_feature_store(path, "r+", "feature-stats PATH")
        feats, valid = ShardReader(group[schema.FEATURES]), ShardReader(group[schema.VALID])
        channel, position = None, None
        shards = schema.store_num_shards(group)
        for s in tqdm(range(shards), desc=f"feature-stats {path}", unit="shard", file=sys.stderr,
                      disable=shards < 8):
            pos = position_moments(_shard(feats, s), valid.read(s))
            channel = merge_two(channel, {k: np.asarray(v) for k, v in channel_moments(pos).items()})
            if per_position:
                position = merge_two(position, pos)
        if channel is None:
            raise UserError(f"{path}: no valid sample (every image failed in extract): no statistics to compute")
        attrs = merge_moments([channel]).to_attrs()
        if per_position:
            if schema.A_POSITION_STATS in group.attrs:  # uncommit the old tables before replacing them
                del group.attrs[schema.A_POSITION_STATS]
            grid = [int(g) for g in group.attrs[schema.A_GRID]]
            std = np.sqrt(position["m2"] / position["count"])
            for name, table in ((schema.POSITION_MEAN, position["mean"]), (schema.POSITION_STD, std)):
                grid_table = np.ascontiguousarray(table.T.reshape(-1, *grid))  # (tokens, C) -> (C, H, W)
                arr = group.create_array(name, shape=grid_table.shape, dtype="float64", chunks=grid_table.shape,
                                         compressors=None, dimension_names=schema.STATS_DIMENSIONS[name],
                                         overwrite=True)
                arr[...] = grid_table
            group = schema.consolidate(path)  # lists the new arrays; write attrs through it (a stale group
            # object would write its old listing back with them)
            attrs[schema.A_POSITION_STATS] = {"count": int(position["count"]),
                                              "config_hash": group.attrs.get(schema.A_CONFIG_HASH)}
        group.attrs.update(attrs)
    return feature_stats(schema.open_group(path), str(path), per_position)


def feature_stats(group: zarr.Group, where: str, per_position: bool = False) -> LatentStats:
    """The statistics of a feature store: per channel, or with its per-position tables; one-line errors."""
    attrs = dict(group.attrs)
    dim = int(group[schema.FEATURES].shape[-1])
    stats = LatentStats.from_attrs(attrs, where, channels=dim, what="feature", hint=hint(where))
    if not per_position:
        return stats
    meta = attrs.get(schema.A_POSITION_STATS)
    present = set(group.array_keys())
    if not isinstance(meta, dict) or not {schema.POSITION_MEAN, schema.POSITION_STD} <= present:
        raise UserError(f"{where}: no per-position statistics (arrays '{schema.POSITION_MEAN}'/"
                        f"'{schema.POSITION_STD}'); compute them once with "
                        f"`fae-pipe feature-stats {where} --per-position`")
    if meta.get("config_hash") != attrs.get(schema.A_CONFIG_HASH):
        raise UserError(f"{where}: the per-position statistics were computed for another content of this store "
                        f"(config_hash {str(meta.get('config_hash'))[:12]}); recompute them with "
                        f"`fae-pipe feature-stats {where} --per-position`")
    grid = tuple(int(g) for g in attrs[schema.A_GRID])
    full = LatentStats(stats.channel_mean, stats.channel_std, None, stats.count,
                       np.asarray(group[schema.POSITION_MEAN][...]), np.asarray(group[schema.POSITION_STD][...]))
    full.check(where, dim, grid)
    return full
