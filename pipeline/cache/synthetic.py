"""Latent and feature stores of random values in the schema's layout, for benchmarks.

Why: loader and training-step speed do not depend on the values, only on their shape
and layout, so a benchmark can run at any scale (e.g. the paper's 16x16x32 latents or
16x16x768 DINOv2-B tokens) without extracting features or training an FAE first. The
stores are ones that training accepts: statistics, labels, sample ids, validity (a
feature store is complete, with its exact statistics per channel and per position).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fae_pipe.cache import schema


def write_random_latent_store(path, shape: tuple[int, int, int, int, int], shard_samples: int, chunk_samples: int,
                              labels: np.ndarray | None = None, num_classes: int = 1000,
                              attrs: dict | None = None) -> Path:
    """Write ``(sample, view, channel, height, width)`` fp16 N(0, 1) latents; labels random unless given.

    Sample ids are ``0..n-1``, so with ``labels`` taken from the first n rows of a
    dataset index, the store's rows name real images (as ``bench train-step`` needs).
    """
    n, views, c, h, w = shape
    shard = min(shard_samples, n)
    chunk = min(chunk_samples, shard)
    while shard % chunk:  # the schema needs whole chunks per shard
        chunk -= 1
    meta = {schema.A_NUM_CLASSES: int(num_classes), **(attrs or {})}
    group = schema.create_latent_store(path, n, views, c, (h, w), shard, chunk, meta)
    rng = np.random.default_rng(0)
    for lo in range(0, n, shard):  # one whole storage shard per write
        hi = min(n, lo + shard)
        group[schema.LATENTS][lo:hi] = rng.standard_normal((hi - lo, views, c, h, w), np.float32).astype(np.float16)
    group[schema.LABELS][:] = rng.integers(0, num_classes, n) if labels is None else np.asarray(labels)[:n]
    group[schema.SAMPLE_IDS][:] = np.arange(n)
    group[schema.VALID][:] = True
    group.attrs.update({schema.A_CHANNEL_MEAN: [0.0] * c, schema.A_CHANNEL_STD: [1.0] * c})
    return Path(path)


def write_random_feature_store(path, shape: tuple[int, int, int, int], grid: tuple[int, int], shard_samples: int,
                               chunk_samples: int, num_classes: int = 1000, labels: np.ndarray | None = None,
                               attrs: dict | None = None) -> Path:
    """Write a complete ``(sample, view, token, channel)`` fp16 N(0, 1) feature store with its statistics.

    Sample ids are ``0..n-1`` as in ``write_random_latent_store``, so a latent and a
    feature store written for the same n (and ``attrs`` naming the same views) pair up
    as a generator store and its REPA targets (``fae_pipe.data.repa``).
    """
    from fae_pipe.cache.feature_stats import compute_feature_stats

    n, views, tokens, dim = shape
    shard = min(shard_samples, n)
    chunk = min(chunk_samples, shard)
    while shard % chunk:
        chunk -= 1
    group = schema.create_feature_store(path, n, views, tokens, dim, grid, shard, chunk,
                                        {schema.A_NUM_CLASSES: int(num_classes), **(attrs or {})})
    rng = np.random.default_rng(0)
    for lo in range(0, n, shard):
        hi = min(n, lo + shard)
        group[schema.FEATURES][lo:hi] = rng.standard_normal((hi - lo, views, tokens, dim), np.float32).astype(np.float16)
        group[schema.CLS][lo:hi] = 0
    group[schema.LABELS][:] = rng.integers(0, num_classes, n) if labels is None else np.asarray(labels)[:n]
    group[schema.SAMPLE_IDS][:] = np.arange(n)
    group[schema.VALID][:] = True
    group.attrs[schema.A_COMPLETE] = True
    compute_feature_stats(path, per_position=True)
    return Path(path)
