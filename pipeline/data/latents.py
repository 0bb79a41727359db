"""Latent batches for generators: the generic sharded loader plus the store's own normalisation.

The statistics are the store's (``fae_pipe.cache.latent_stats.LatentStats``, read
from its attrs; a store without them is refused) and travel on, as one object, into
every checkpoint and ``sit.safetensors``. Any zarr group with a ``latents`` array shaped
(sample, view, channel, height, width), ``labels`` and the two attrs works, not only
stores written by ``encode``, whatever their source (FAE or VAE). The batching itself (and REPA
targets) is ``fae_pipe.data.batches.GeneratorBatches``.

Posterior sampling (``sit.posterior = sample``, REPA's way; LightningDiT froze one sample at
extraction): when the store holds posterior stds, each served row is ``mean + std * eps``, with
``eps`` a pure function of (seed, epoch, sample id, view) (``posterior_noise``). Nothing in it
depends on a stateful RNG, the step, the batch split or the number of processes, so a resumed
run draws exactly the noise the uninterrupted run drew, and a sample gets a fresh draw in every
epoch. The result is normalised with the store's statistics of the means, like the means are.
"""

from __future__ import annotations

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.data.batches import GeneratorBatches, StoreInfo, num_classes_of, valid_mask
from fae_pipe.errors import UserError

POSTERIOR_STREAM = 3  # beside the loader's order / window / view streams (fae_pipe.data.sharded)


def posterior_noise(seed: int, epoch: int, sample_ids, views, shape) -> np.ndarray:
    """Standard normal float32 (B, *shape): row i depends only on (seed, epoch, sample_ids[i], views[i])."""
    out = np.empty((len(sample_ids), *shape), np.float32)
    for i, (sid, view) in enumerate(zip(np.asarray(sample_ids).tolist(), np.asarray(views).tolist())):
        rng = np.random.default_rng([int(seed), int(epoch), int(sid), int(view), POSTERIOR_STREAM])
        out[i] = rng.standard_normal(shape, dtype=np.float32)
    return out


def read_latent_info(path, group) -> tuple[StoreInfo, np.ndarray | None]:
    """Check the store's layout and statistics; return its info and the ``valid`` mask (or None)."""
    if schema.LATENTS not in set(group.array_keys()):
        raise UserError(f"{path}: no '{schema.LATENTS}' array; expected a latent store written by `fae-pipe encode`")
    arr = group[schema.LATENTS]
    if arr.ndim != 5:
        raise UserError(f"{path}: '{schema.LATENTS}' has shape {arr.shape}; expected (sample, view, channel, height, width)")
    n, views, c, h, w = (int(v) for v in arr.shape)
    stats = LatentStats.from_attrs(dict(group.attrs), str(path), channels=c)
    info = StoreInfo(str(path), (c, h, w), views, n, num_classes_of(path, group), stats, schema.KIND_LATENTS,
                     schema.latent_source(group.attrs, str(path)))
    return info, valid_mask(group)


class LatentBatches(GeneratorBatches):
    """Normalised latent batches ``(epoch, x, y)`` for one process, resumable by step.

    ``x`` is float32 (B, C, H, W) on ``device`` with ``(latent - mean_c) / std_c``;
    ``y`` is int64 (B,). Samples whose ``valid`` flag is False are never served.
    ``repa_features``: a ``features.zarr`` whose tokens ``from_step_with_repa`` adds.
    ``posterior_sample``: serve ``mean + std * posterior_noise(...)`` (needs the store's ``std`` array).
    """

    array = schema.LATENTS

    def __init__(self, path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8, repa_features=None,
                 posterior_sample: bool = False):
        group = schema.open_store(path)[0]
        info, valid = read_latent_info(path, group)
        if posterior_sample and schema.STD not in set(group.array_keys()):
            raise UserError(f"sit.posterior = sample needs posterior stds, but {path} has no '{schema.STD}' array: "
                            "re-run `fae-pipe encode` with encode.store_std=true (a VAE store always has them) "
                            "or set sit.posterior=mean")
        self.posterior_sample, self.seed = posterior_sample, seed
        super().__init__(info, valid, batch_size, seed, rank, world_size, memory_budget_bytes, shuffle_buffer,
                         repa_features, extra_arrays=(schema.STD,) if posterior_sample else ())

    def _convert(self, device):
        if not self.posterior_sample:
            return super()._convert(device)
        import torch

        from fae_pipe.data.sharded import VIEWS

        normalize = self.info.stats.normalizer(self.info.shape, device)
        seed, shape = self.seed, self.info.shape

        def convert(b, epoch):
            eps = torch.from_numpy(posterior_noise(seed, epoch, b[schema.SAMPLE_IDS], b[VIEWS], shape))
            z = torch.from_numpy(b[schema.LATENTS]).float().addcmul_(torch.from_numpy(b[schema.STD]).float(), eps)
            return normalize(z.to(device)), torch.from_numpy(b[schema.LABELS]).to(device)

        return convert
