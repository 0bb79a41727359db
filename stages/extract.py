"""``fae-pipe extract``: frozen image-encoder patch (+pooled) tokens of every index sample into features.zarr.

The store layout is ``fae_pipe.cache.schema``; lock, resume, work units and dask come
from ``fae_pipe.cache.shards``; the shard task (decode, encoder, float16 tokens) is
``fae_pipe.tasks.features.FeatureExtractTask``. This module says what the store records
(attrs, content hash, the exact per-channel statistics merged from the shard records:
``fae_pipe.cache.feature_stats``) and runs it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from fae_pipe import __version__
from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.feature_stats import channel_stats_from_records
from fae_pipe.cache.shards import ShardPlan, run_shards
from fae_pipe.cache.store_writer import finalize, mark_incomplete, open_or_create
from fae_pipe.config import Config
from fae_pipe.encoders.registry import encoder_spec
from fae_pipe.errors import UserError
from fae_pipe.tasks.features import FeatureExtractTask, build_encoder_from


def store_attrs(cfg: Config, enc, index, n: int) -> dict:
    """Group attrs saying how the features were made (see docs/cache.md and docs/encoders.md)."""
    e = cfg.image_encoder
    return {
        schema.A_ENCODER: {
            "name": e.name, "weights": e.weights, "input_size": e.input_size, "precision": e.precision,
            "batch_size": e.batch_size, **enc.record(),
        },
        schema.A_IMAGE_SIZE: cfg.data.image_size, schema.A_CROP: schema.CROP_POLICY,
        schema.A_RESIZE: schema.RESIZE_POLICY,
        schema.A_NORMALIZATION: {"mean": list(enc.mean), "std": list(enc.std)},
        schema.A_VIEWS: list(cfg.data.views), schema.A_NUM_CLASSES: index.num_classes,
        schema.A_CLASSES: list(index.classes), schema.A_DATASET_FINGERPRINT: index.fingerprint,
        schema.A_INDEX_PATH: cfg.paths.index, schema.A_NUM_SAMPLES: n,
    }


def content_hash(attrs: dict, shard_samples: int, chunk_samples: int) -> str:
    """sha256 of everything that determines the stored bits (not shards/workers/threads/device)."""
    keys = (schema.A_ENCODER, schema.A_IMAGE_SIZE, schema.A_CROP, schema.A_RESIZE, schema.A_NORMALIZATION,
            schema.A_VIEWS, schema.A_DATASET_FINGERPRINT, schema.A_NUM_SAMPLES)
    payload = {k: attrs[k] for k in keys}
    payload.update({"schema_version": schema.SCHEMA_VERSION, "kind": schema.KIND_FEATURES,
                    "shard_samples": shard_samples, "chunk_samples": chunk_samples})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def extract_features(cfg: Config, store_path: str, overwrite: bool = False, limit: int | None = None):
    """Extract (or resume) into ``store_path``; ``limit`` keeps the first N samples (benchmarks)."""
    with StoreLock(store_path):  # first, so a second writer is refused before any model is built
        return _extract_locked(cfg, store_path, overwrite, limit)


def _extract_locked(cfg: Config, store_path: str, overwrite: bool, limit: int | None):
    from fae_pipe.data.index import read_index

    index = read_index(cfg.paths.index)
    n = len(index) if limit is None else min(limit, len(index))
    spec = encoder_spec(cfg.image_encoder)
    enc = build_encoder_from(spec)
    # random weights: the encoder itself says so, once (timm_vit.RANDOM_WARNING)
    shard_samples = cfg.extract.shard_samples
    chunk = schema.effective_chunk_samples(cfg.extract.chunk_samples, shard_samples)
    attrs = store_attrs(cfg, enc, index, n)
    config_hash = content_hash(attrs, shard_samples, chunk)
    grid, dim = (int(enc.grid[0]), int(enc.grid[1])), int(enc.dim)

    def create():
        return schema.create_feature_store(store_path, n, len(cfg.data.views), grid[0] * grid[1], dim, grid,
                                           shard_samples, chunk, attrs)

    task = FeatureExtractTask(str(Path(cfg.paths.index).resolve()), spec, cfg.data.image_size, cfg.data.views,
                              cfg.image_encoder.batch_size, cfg.data.decode_workers, cfg.data.on_error)
    if not (cfg.extract.scheduler or cfg.extract.workers):
        task.adopt(enc)  # in-process: the coordinator's encoder is the worker's; dask workers build their own
    del enc
    group, _ = open_or_create(store_path, config_hash, create, overwrite)
    mark_incomplete(group)
    result = run_shards(store_path, task, ShardPlan(n, shard_samples), config_hash,
                        units=cfg.extract.shards, workers=cfg.extract.workers,
                        scheduler=cfg.extract.scheduler, threads=cfg.extract.threads, desc="extract",
                        stop_signals=cfg.runtime.stop_signals)
    if not result.complete:
        missing = sorted(set(range(result.shards_total)) - set(result.records))
        raise UserError(f"extract: shards {missing} of {store_path} have no completion record; "
                        "re-run `fae-pipe extract` to finish them")
    stats = channel_stats_from_records(group, result.records)  # None: no valid sample, no statistics
    finalize(group, result.failures(), {schema.A_CREATED_WITH: f"fae-pipe {__version__}",
                                        **(stats.to_attrs() if stats is not None else {})})
    return result


def run(cfg: Config, overwrite: bool = False) -> None:
    result = extract_features(cfg, cfg.paths.features, overwrite=overwrite)
    failed = result.failures()
    if failed:
        shown = "; ".join(f"{f['file']} ({f['reason']})" for f in failed[:3])
        print(f"WARNING: {len(failed)} image(s) could not be decoded and are stored as invalid rows: {shown}"
              f"{' ...' if len(failed) > 3 else ''}", file=sys.stderr)
    print(result.summary("extract"))
