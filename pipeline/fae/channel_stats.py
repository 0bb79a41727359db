"""Exact per-channel mean and std of a latent store, streamed shard by shard.

Each shard contributes (count, mean, M2) per channel, computed in float64 from
the float16 values actually stored; the coordinator merges them in shard order
with Chan et al.'s pairwise update. The result is the population mean/std over
every stored value of every valid sample and view (not a momentum estimate),
equal to numpy's over the whole array up to float64 rounding, and the same
whatever the number of workers or the order in which shards finished. Merging
centred second moments instead of raw sums of squares avoids the cancellation
of ``E[x^2] - E[x]^2`` when a channel's mean is large against its spread.
"""

from __future__ import annotations

import numpy as np

from fae_pipe.errors import UserError


def shard_moments(latents: np.ndarray, channel_axis: int = 2) -> dict:
    """(count, mean, M2) per channel of one shard's stored latents (any leading sample dims)."""
    x = np.moveaxis(np.asarray(latents, dtype=np.float64), channel_axis, 0)
    x = x.reshape(x.shape[0], -1)
    count = int(x.shape[1])
    if count == 0:
        zeros = [0.0] * x.shape[0]
        return {"count": 0, "mean": zeros, "m2": zeros}
    mean = x.mean(axis=1)
    m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
    return {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}


def merge_moments(parts: list[dict]) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge shard moments in the given order; returns (count, mean, population std) per channel."""
    count, mean, m2 = 0, None, None
    for part in parts:
        n_b = int(part["count"])
        if n_b == 0:
            continue
        mean_b, m2_b = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        if mean is None:
            count, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta**2 * (count * n_b / n)
        count = n
    if mean is None:
        raise UserError("latent statistics: the store holds no valid sample (every sample failed in extract)")
    return count, mean, np.sqrt(m2 / count)
