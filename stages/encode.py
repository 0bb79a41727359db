"""``fae-pipe encode``: the feature store through the trained FAE encoder into ``latents.zarr``.

Reuses the one sharded-writing machinery of ``extract`` (lock, per-shard
completion records, resume, ``--shards``/``--workers``/``--scheduler``): only the
shard task differs (``fae_pipe.tasks.latents.EncodeTask``). The store's ``config_hash``
covers the FAE file's sha256, the source store's hash and the layout, so a new
FAE never silently mixes with latents of the old one. An FAE export made by
``fae-pipe convert-export`` answers to the sha256 of the pickled file it came from
too (``converted_from``): a store made from that file is resumed, not rebuilt. The exact channel
statistics are merged from the shard records at the end and written into the
store's attrs, their one source (``fae_pipe.cache.latent_stats``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from fae_pipe.artifacts import file_fingerprint, read_export_meta
from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.latent_stats import merge_moments
from fae_pipe.cache.location import StoreLocation
from fae_pipe.cache.shards import ShardPlan, run_shards
from fae_pipe.cache.store_writer import finalize, mark_incomplete, open_or_create
from fae_pipe.config import Config
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FAE_FILE, load_fae_file
from fae_pipe.fae.data import open_feature_store
from fae_pipe.tasks.latents import EncodeTask
from fae_pipe.training.logs import write_metrics

COPIED_ATTRS = (schema.A_ENCODER, schema.A_IMAGE_SIZE, schema.A_CROP, schema.A_RESIZE, schema.A_NORMALIZATION,
                schema.A_VIEWS, schema.A_NUM_CLASSES, schema.A_CLASSES, schema.A_DATASET_FINGERPRINT,
                schema.A_INDEX_PATH)


def check_compatible(payload: dict, group, fae_path: Path, features_path: str) -> None:
    dim = group[schema.FEATURES].shape[-1]
    grid = [int(g) for g in group.attrs[schema.A_GRID]]
    if payload["feature_dim"] != dim or list(payload["grid"]) != grid:
        raise UserError(f"{fae_path} was trained on {payload['grid']} x {payload['feature_dim']} features but "
                        f"{features_path} holds {grid} x {dim}: retrain with `fae-pipe train-fae` on this store")


def existing_hash(path) -> str | None:
    """The ``config_hash`` of the store at ``path``, or None (absent or unreadable)."""
    try:
        return schema.open_group(path, "r").attrs.get(schema.A_CONFIG_HASH)
    except Exception:  # noqa: BLE001
        return None


def store_bytes(path) -> int:
    """Bytes of a store's data files (its bookkeeping directory excluded)."""
    return StoreLocation.of(path).data_bytes(skip=schema.BOOKKEEPING_DIR)


def run(cfg: Config, overwrite: bool = False) -> None:
    t0 = time.perf_counter()
    if cfg.encode.source == schema.SOURCE_SDVAE:
        from fae_pipe.stages.encode_vae import run as run_vae

        return run_vae(cfg, overwrite, t0)
    fae_path = Path(cfg.paths.fae_run) / FAE_FILE
    if not fae_path.is_file():
        raise UserError(f"encode: {fae_path} not found; run `fae-pipe train-fae` first")
    payload = load_fae_file(fae_path)
    source = open_feature_store(cfg.paths.features)
    check_compatible(payload, source, fae_path, cfg.paths.features)
    n, views = source[schema.FEATURES].shape[:2]
    shard_samples = int(source.attrs[schema.A_SHARD_SAMPLES])
    chunk_samples = int(source.attrs[schema.A_CHUNK_SAMPLES])
    src = {"path": StoreLocation.of(cfg.paths.features).canonical(), "config_hash": source.attrs.get(schema.A_CONFIG_HASH)}

    def store_hash(fae_fp: str) -> str:
        return hashlib.sha256(json.dumps({
            "schema_version": schema.SCHEMA_VERSION, "fae": fae_fp, "source": src["config_hash"],
            "store_std": cfg.encode.store_std, "shard_samples": shard_samples, "chunk_samples": chunk_samples,
        }, sort_keys=True).encode()).hexdigest()

    fae_fp = file_fingerprint(fae_path)
    converted_from = (read_export_meta(fae_path) or {}).get("converted_from")
    if isinstance(converted_from, str) and existing_hash(cfg.paths.latents) == store_hash(converted_from):
        fae_fp = converted_from  # the store was made by the pickled file this export was converted from
    config_hash = store_hash(fae_fp)
    attrs = {k: source.attrs[k] for k in COPIED_ATTRS if k in source.attrs}
    attrs.update({schema.A_FAE_FINGERPRINT: fae_fp, schema.A_FAE_MODELS: payload["models"],
                  schema.A_SOURCE_FEATURES: src, schema.A_LATENT_SOURCE: {"kind": schema.SOURCE_FAE},
                  schema.A_LATENT_VALUES: "raw posterior means; standardise with channel_mean / channel_std"})
    channels = payload["latent_channels"]
    out = cfg.paths.latents

    def create():
        return schema.create_latent_store(out, n, views, channels, payload["grid"], shard_samples, chunk_samples,
                                          attrs, store_std=cfg.encode.store_std)

    task = EncodeTask(str(fae_path.resolve()), fae_fp, src["path"], cfg.encode.batch_size, cfg.encode.device,
                      cfg.encode.store_std, attention=cfg.runtime.attention)
    with StoreLock(out):
        write_latent_store(cfg, config_hash, create, task, ShardPlan(n, shard_samples), fae_fp,
                           list(source.attrs.get(schema.A_FAILURES, [])), overwrite, t0,
                           ("feature", cfg.paths.features), f"{n} samples x {views} views", f"{channels} ch")


def write_latent_store(cfg: Config, config_hash: str, create, task, plan: ShardPlan, fae_fp: str | None,
                       failures: list[dict] | None, overwrite: bool, t0: float, compare: tuple[str, str] | None,
                       what: str, shape: str) -> None:
    """Open-or-create ``paths.latents``, run ``task`` over its shards, merge the exact statistics, finalise,
    write ``<metrics>/encode.json`` and the one-line summary: the part every latent source shares.
    Call with the store lock held. ``failures``: the store's failure list (None: the shards' own records);
    ``compare``: (name, path) of the store whose bytes per sample the summary compares with."""
    out = cfg.paths.latents
    group, resumed = open_or_create(out, config_hash, create, overwrite)
    mark_incomplete(group)
    result = run_shards(out, task, plan, config_hash, units=cfg.encode.shards,
                        workers=cfg.encode.workers, scheduler=cfg.encode.scheduler, threads=cfg.encode.threads,
                        desc="encode", stop_signals=cfg.runtime.stop_signals)
    if not result.complete:
        missing = sorted(set(range(result.shards_total)) - set(result.records))
        raise UserError(f"encode: shards {missing} of {out} have no completion record; re-run `fae-pipe encode`")
    stats = merge_moments([result.records[i]["extras"]["moments"] for i in sorted(result.records)], fae_fp)
    finalize(group, result.failures() if failures is None else failures, stats.to_attrs())
    n = plan.num_samples
    lat_b = store_bytes(out) / n
    metrics = {"samples": int(n), "views": int(group[schema.LATENTS].shape[1]), "latent_bytes_per_sample": lat_b}
    note = ""
    if compare is not None:
        other_b = store_bytes(compare[1]) / n
        metrics.update({f"{compare[0]}_bytes_per_sample": other_b, "compression": other_b / lat_b})
        note = f" vs {other_b / 1024:.1f} KiB {compare[0]}s ({other_b / lat_b:.0f}x)"
    wall = time.perf_counter() - t0
    metrics.update({"wall_seconds": wall, "shards_written": result.shards_written,
                    "shards_skipped": result.shards_skipped})
    write_metrics(Path(cfg.paths.metrics) / "encode.json", metrics)
    print(f"encode: {what} -> {out} ({shape}, {'resumed, ' if resumed else ''}"
          f"{result.shards_written} shards written, {result.shards_skipped} skipped), "
          f"{lat_b / 1024:.1f} KiB/sample{note}, {wall:.1f} s; channel statistics in its attrs", file=sys.stderr)
