"""``EncodeTask``: one storage shard of ``features.zarr`` -> the same shard of ``latents.zarr`` (``encode``).

One storage shard of ``latents.zarr`` holds exactly the samples of one storage
shard of ``features.zarr`` (same ``shard_samples``), so a task reads one feature
shard whole (the fast way to read the cache), runs the frozen FAE encoder over
every view, and returns the posterior means (and optionally stds) as float16
grids plus the shard's per-channel moments of the stored values.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import shard_moments
from fae_pipe.errors import UserError
from fae_pipe.models.layers import check_attention_backend


class EncodeTask:
    """Features shard -> latents shard (+ per-channel moments in the completion record).

    ``attention``: the FAE encoder's attention kernel ("sdpa" or "xformers", ``runtime.attention``).
    """

    def __init__(self, fae_path: str, fae_fingerprint: str, features_path: str, batch_size: int,
                 device: str, store_std: bool, attention: str = "sdpa"):
        self.fae_path, self.features_path = fae_path, features_path
        self.batch_size, self.device_name, self.store_std = batch_size, device, store_std
        self.attention = check_attention_backend(attention)
        # the runner reuses a prepared task per process by this key: it must name every setting
        self.cache_key = f"encode:{fae_fingerprint}:{features_path}:{device}:{batch_size}:{store_std}:{attention}"
        self.fae = None
        self.group = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["fae"] = state["group"] = None  # rebuilt by setup() in each worker
        return state

    def setup(self) -> None:
        from fae_pipe.device import pick_device
        from fae_pipe.fae.autoencoder import FeatureAutoencoder

        self.fae = FeatureAutoencoder.load(self.fae_path, device=pick_device(self.device_name), attention=self.attention)
        self.group, _ = schema.open_store(self.features_path)

    def compute(self, shard_index: int, start: int, stop: int,
                progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        import torch

        from fae_pipe.fae.autoencoder import tokens_to_grid

        # one whole shard each (same shard_samples as the latent store); a damaged one is one line
        feats = schema.read_shard(self.group, schema.FEATURES, shard_index)  # (n, V, N, D) float16
        valid = np.asarray(schema.read_shard(self.group, schema.VALID, shard_index), dtype=bool)
        assert feats.shape[0] == stop - start, (shard_index, start, stop, feats.shape)
        n, views = feats.shape[0], feats.shape[1]
        c, (h, w) = self.fae.latent_channels, self.fae.grid
        means = np.zeros((n, views, c, h, w), np.float16)
        stds = np.zeros_like(means) if self.store_std else None
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            for v in range(views):
                post = self.fae.posterior(torch.from_numpy(np.ascontiguousarray(feats[lo:hi, v])))
                means[lo:hi, v] = tokens_to_grid(post.mean, self.fae.grid).cpu().numpy().astype(np.float16)
                if stds is not None:
                    stds[lo:hi, v] = tokens_to_grid(post.std, self.fae.grid).cpu().numpy().astype(np.float16)
            if progress is not None:
                progress(hi - lo)
        means[~valid] = 0  # failed images have no features; keep their rows inert
        if not np.isfinite(means).all():
            raise UserError(f"encode: samples {start}..{stop - 1} (shard {shard_index}) of {self.features_path} "
                            "give non-finite latents; check the store with `fae-pipe verify`")
        arrays = {
            schema.LATENTS: means,
            schema.LABELS: self.group[schema.LABELS][start:stop],
            schema.SAMPLE_IDS: self.group[schema.SAMPLE_IDS][start:stop],
            schema.VALID: valid,
        }
        if stds is not None:
            stds[~valid] = 0
            arrays[schema.STD] = stds
        return arrays, {"moments": shard_moments(means[valid], channel_axis=2)}
