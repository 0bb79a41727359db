"""``fae-pipe encode`` with ``encode.source = sdvae``: the images of the index through a pretrained VAE into ``latents.zarr``.

The store is a latent store like the FAE's (``fae_pipe.cache.schema.create_latent_store``):
posterior means and standard deviations per view (4 x 32 x 32 at 256 px for SD-VAE), labels,
ids, validity, and the exact per-channel statistics of the stored means in its attrs
(``fae_pipe.cache.latent_stats``), so a generator trains on it without knowing its source.
It is written by the same runner (lock, per-shard records, resume, dask: ``write_latent_store``
of ``stages/encode.py``) straight from the images, with ``extract``'s image chain and storage
layout (``extract.shard_samples``/``chunk_samples``). ``latent_source`` in its attrs records the
VAE (``fae_pipe.models.vae.Vae.record``): what ``sample`` and ``evaluate`` decode with.

The ``config_hash`` covers the VAE's weights fingerprint, precision and batch size, the pixels
(dataset fingerprint, image size, crop, views) and the layout, so other weights never mix with
a half-written store; ``--overwrite`` replaces it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.shards import ShardPlan
from fae_pipe.config import Config
from fae_pipe.stages.encode import write_latent_store
from fae_pipe.tasks.vae_latents import VaeEncodeTask

HASHED = (schema.A_IMAGE_SIZE, schema.A_CROP, schema.A_RESIZE, schema.A_NORMALIZATION, schema.A_VIEWS,
          schema.A_DATASET_FINGERPRINT, schema.A_NUM_SAMPLES, schema.A_LATENT_SOURCE)


def store_attrs(cfg: Config, vae, index, n: int) -> dict:
    """Group attrs saying how the latents were made (see docs/cache.md, "VAE latent stores")."""
    return {
        schema.A_IMAGE_SIZE: cfg.data.image_size, schema.A_CROP: schema.CROP_POLICY,
        schema.A_RESIZE: schema.VAE_RESIZE_POLICY, schema.A_NORMALIZATION: {"range": list(schema.VAE_INPUT_RANGE)},
        schema.A_VIEWS: list(cfg.data.views), schema.A_NUM_CLASSES: index.num_classes,
        schema.A_CLASSES: list(index.classes), schema.A_DATASET_FINGERPRINT: index.fingerprint,
        schema.A_INDEX_PATH: cfg.paths.index, schema.A_NUM_SAMPLES: n,
        schema.A_LATENT_SOURCE: {"kind": schema.SOURCE_SDVAE, "vae": vae.record, "batch_size": cfg.vae.batch_size},
        schema.A_LATENT_VALUES: "raw VAE posterior means (no scaling_factor) and stds; standardise with "
                                "channel_mean / channel_std",
    }


def content_hash(attrs: dict, shard_samples: int, chunk_samples: int) -> str:
    """sha256 of everything that determines the stored bits (not shards/workers/threads/device)."""
    payload = {k: attrs[k] for k in HASHED}
    source = dict(payload[schema.A_LATENT_SOURCE])
    source["vae"] = {k: v for k, v in source["vae"].items() if k != "weights"}  # the bits, not where they live
    payload[schema.A_LATENT_SOURCE] = source
    payload.update({"schema_version": schema.SCHEMA_VERSION, "kind": schema.KIND_LATENTS,
                    "shard_samples": shard_samples, "chunk_samples": chunk_samples})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run(cfg: Config, overwrite: bool, t0: float) -> None:
    from fae_pipe.data.index import read_index
    from fae_pipe.device import pick_device
    from fae_pipe.models.vae import Vae

    out = cfg.paths.latents
    with StoreLock(out):  # first, so a second writer is refused before the VAE is built
        index = read_index(cfg.paths.index)
        n = len(index)
        vae = Vae.build(cfg.vae.weights, pick_device(cfg.encode.device), cfg.vae.precision)
        # workers load the resolved directory (their working directory may differ)
        spec = {"weights": vae.record["weights"], "precision": cfg.vae.precision, "device": cfg.encode.device}
        grid = vae.grid(cfg.data.image_size)
        shard_samples = cfg.extract.shard_samples
        chunk = schema.effective_chunk_samples(cfg.extract.chunk_samples, shard_samples)
        attrs = store_attrs(cfg, vae, index, n)
        config_hash = content_hash(attrs, shard_samples, chunk)
        channels, views = vae.latent_channels, len(cfg.data.views)

        def create():
            return schema.create_latent_store(out, n, views, channels, grid, shard_samples, chunk, attrs,
                                              store_std=True)

        task = VaeEncodeTask(str(Path(cfg.paths.index).resolve()), spec, cfg.data.image_size, cfg.data.views,
                             cfg.vae.batch_size, cfg.data.decode_workers, cfg.data.on_error)
        if not (cfg.encode.scheduler or cfg.encode.workers):
            task.adopt(vae)  # in-process: the coordinator's VAE is the worker's; dask workers build their own
        del vae
        write_latent_store(cfg, config_hash, create, task, ShardPlan(n, shard_samples), None, None, overwrite, t0,
                           None, f"{n} images x {views} views through the VAE",
                           f"{channels}x{grid[0]}x{grid[1]} means + stds")
    failed = list(schema.open_group(out).attrs.get(schema.A_FAILURES, []))
    if failed:
        print(f"WARNING: {len(failed)} image(s) could not be decoded and are stored as invalid rows: "
              f"{'; '.join(f['file'] + ' (' + f['reason'] + ')' for f in failed[:3])}", file=sys.stderr)
