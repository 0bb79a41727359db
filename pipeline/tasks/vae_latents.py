"""``VaeEncodeTask``: one storage shard of images -> posterior means and stds of a pretrained VAE (``encode``, sdvae).

The image side is ``extract``'s, not a copy of it: this task is a ``FeatureExtractTask``
whose per-image preprocessing is the VAE's (the ADM crop and its views, mapped to [-1, 1],
no resize) and whose model is ``fae_pipe.models.vae.Vae``; prefetching, decode failures
(zero rows, ``valid = False``, recorded) and batches cut from the shard's own start come
from the parent, so the bits never depend on ``--shards`` or ``--workers``. Each batch of
``vae.batch_size`` images runs all its views in one forward; means and stds are stored as
float16, with the shard's exact per-channel moments of the stored means in its record.
"""

from __future__ import annotations

import json

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import shard_moments
from fae_pipe.errors import UserError
from fae_pipe.tasks.features import FeatureExtractTask


class VaeEncodeTask(FeatureExtractTask):
    """Shard task for ``run_shards``: image decode -> VAE posterior (mean, std) per view, float16.

    ``vae_spec``: {"weights", "precision", "device"} (the ``vae`` section and ``encode.device``).
    """

    def __init__(self, index_path: str, vae_spec: dict, image_size: int, views: list[str], batch_size: int,
                 decode_workers: int, on_error: str):
        super().__init__(index_path, vae_spec, image_size, views, batch_size, decode_workers, on_error)
        self.cache_key = "encode-vae:" + json.dumps([index_path, self.spec, image_size, batch_size], sort_keys=True)

    def setup(self) -> None:
        from fae_pipe.data.index import read_index
        from fae_pipe.device import pick_device
        from fae_pipe.models.vae import Vae

        self.index = read_index(self.index_path)
        if self.encoder is None:
            self.encoder = Vae.build(self.spec["weights"], pick_device(self.spec["device"]), self.spec["precision"],
                                     announce=False)

    def _load(self, i: int):
        """Decode + ADM crop + views of sample ``i``, in [-1, 1] (runs in a thread)."""
        from fae_pipe.data.transforms import ImageDecodeError, load_pixels
        from fae_pipe.models.vae import vae_input

        try:
            pixels = load_pixels(self.index.abspath(i), self.image_size, self.views)
        except ImageDecodeError as e:
            return e
        return vae_input(pixels)

    def compute(self, shard_index, start, stop, progress=None):
        import torch

        vae, n, v = self.encoder, stop - start, len(self.views)
        c, (h, w) = vae.latent_channels, vae.grid(self.image_size)
        means = np.zeros((n, v, c, h, w), np.float16)
        stds = np.zeros_like(means)
        valid = np.ones(n, bool)
        failures = []
        for rows, inputs in self.decoded_batches(start, stop, valid, failures, progress):
            if inputs:
                mean, std = vae.posterior(torch.cat(inputs))
                means[rows] = mean.cpu().numpy().reshape(len(rows), v, c, h, w).astype(np.float16)
                stds[rows] = std.cpu().numpy().reshape(len(rows), v, c, h, w).astype(np.float16)
        if not (np.isfinite(means).all() and np.isfinite(stds).all()):
            raise UserError(f"encode: samples {start}..{stop - 1} (shard {shard_index}) give non-finite VAE latents "
                            f"in float16; check vae.weights = {self.spec['weights']}")
        arrays = {schema.LATENTS: means, schema.STD: stds, schema.VALID: valid,
                  schema.LABELS: self.index.labels[start:stop].copy(),
                  schema.SAMPLE_IDS: self.index.ids[start:stop].copy()}
        return arrays, {"failures": failures, "moments": shard_moments(means[valid], channel_axis=2)}
