"""``fae-pipe embed-text``: every caption of the index through the frozen text encoder into ``text.zarr``.

Text-to-image training then reads caption embeddings from the store and never runs the
text encoder. The store is written by the one sharded-writing machinery of ``extract``
and ``encode`` (lock, per-shard completion records, resume, ``--shards``/``--workers``/
``--scheduler``, stop signals); only the shard task differs
(``fae_pipe.tasks.text.EmbedTextTask``). The sample axis is the index's rows, so a
latent row and a text row with the same sample id are the same image. The empty
caption's embedding (classifier-free guidance) is stored once, at creation.

The store's ``config_hash`` covers the text encoder directory's fingerprint,
``max_length``, ``precision``, the dataset fingerprint (which covers the captions) and
the layout, so a new encoder or a changed caption never mixes with old embeddings:
such a store is refused unless ``--overwrite``. ``text_encoder.weights = random``
writes a tiny T5 trained on the index's captions beside the index
(``text_encoder_random``), loaded through the same path as a real directory and
recorded as random in the store.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.location import StoreLocation
from fae_pipe.cache.shards import ShardPlan, run_shards
from fae_pipe.cache.store_writer import finalize, mark_incomplete, open_or_create
from fae_pipe.config import Config
from fae_pipe.errors import UserError
from fae_pipe.tasks.text import EmbedTextTask
from fae_pipe.training.logs import write_metrics

RANDOM_DIR = "text_encoder_random"  # beside paths.index: the random tower belongs to the captions it was fit on
RANDOM_HEADS = 4
RANDOM_SEED = 0


def index_captions(cfg: Config):
    """The index and its caption slots per sample; a class-labelled or caption-less index is one line."""
    from fae_pipe.data.index import read_index

    index = read_index(cfg.paths.index)
    if index.captions is None:
        raise UserError(f"embed-text: paths.index = {cfg.paths.index} has no captions (a class-labelled index); "
                        "prepare a captioned source (caption files, a manifest with captions or WebDataset tars)")
    counts = index.captions.counts
    slots = int(counts.max()) if len(counts) else 0
    if slots == 0:
        raise UserError(f"embed-text: paths.index = {cfg.paths.index} has a captions column but no sample has a "
                        "caption; check the source's caption files")
    return index, slots


def encoder_directory(cfg: Config, index) -> Path:
    """``text_encoder.weights`` as a directory; 'random' writes the tiny T5 for these captions first."""
    te = cfg.text_encoder
    if te.weights == "random":
        from fae_pipe.encoders.text import write_random_text_encoder

        captions = [c for caps in index.captions.to_lists() for c in caps if schema.caption_filled(c)]
        directory = Path(cfg.paths.index).parent / RANDOM_DIR
        # deterministic (same captions and sizes: same files), so rewriting it keeps a resumable store's hash
        return write_random_text_encoder(directory, captions, te.random_width, te.random_layers, RANDOM_HEADS,
                                         RANDOM_SEED)
    if not te.weights:
        raise UserError("text_encoder.weights is empty: set it to a local transformers directory (model + "
                        "tokenizer, e.g. a google/flan-t5-xl snapshot) or to 'random' (tests and the demo)")
    return Path(te.weights)


def build_encoder(cfg: Config, directory: Path):
    from fae_pipe.encoders.text import RANDOM_WARNING, FrozenTextEncoder

    te = cfg.text_encoder
    enc = FrozenTextEncoder(directory, te.max_length, te.device, te.precision)
    limit = getattr(enc.model.config, "max_position_embeddings", None)  # CLIP/SigLIP; T5 has relative positions
    if limit is not None and te.max_length > int(limit):
        raise UserError(f"text_encoder.max_length = {te.max_length} is invalid for {directory}: its "
                        f"{enc.model_type} tower has {limit} positions; set text_encoder.max_length <= {limit}")
    if enc.random:
        print(f"WARNING: {RANDOM_WARNING} (text_encoder.weights={te.weights!r}, {directory})", file=sys.stderr)
    return enc


def content_hash(enc, cfg: Config, index, slots: int, shard_samples: int, chunk_samples: int) -> str:
    """sha256 of everything that determines the stored bits (not shards/workers/threads/device/batch)."""
    return hashlib.sha256(json.dumps({
        "schema_version": schema.SCHEMA_VERSION, "kind": schema.KIND_TEXT, "text_encoder": enc.fingerprint,
        "max_length": enc.max_length, "precision": cfg.text_encoder.precision,
        "dataset_fingerprint": index.fingerprint, "captions_per_sample": slots,
        "shard_samples": shard_samples, "chunk_samples": chunk_samples,
    }, sort_keys=True).encode()).hexdigest()


def run(cfg: Config, overwrite: bool = False) -> None:
    t0 = time.perf_counter()
    out = cfg.paths.text
    with StoreLock(out):  # first, so a second writer is refused before any model is built
        index, slots = index_captions(cfg)
        enc = build_encoder(cfg, encoder_directory(cfg, index))
        et, te = cfg.embed_text, cfg.text_encoder
        shard_samples = et.shard_samples
        chunk = schema.effective_chunk_samples(et.chunk_samples, shard_samples, "embed_text")
        config_hash = content_hash(enc, cfg, index, slots, shard_samples, chunk)
        attrs = {schema.A_TEXT_ENCODER: {**enc.describe(), "weights": te.weights, "precision": te.precision},
                 schema.A_DATASET_FINGERPRINT: index.fingerprint, schema.A_INDEX_PATH: cfg.paths.index}
        n = len(index)

        def create():
            tokens, lengths, pooled = enc.encode([""])
            return schema.create_text_store(out, n, slots, enc.max_length, enc.dim, shard_samples, chunk, attrs,
                                            tokens[0].numpy(), int(lengths[0]),
                                            None if pooled is None else pooled[0].numpy())

        task = EmbedTextTask(str(Path(cfg.paths.index).resolve()), index.fingerprint,
                             {"directory": str(enc.directory.resolve()), "fingerprint": enc.fingerprint,
                              "max_length": enc.max_length, "precision": te.precision, "device": te.device},
                             te.batch_size, slots)
        if not (et.scheduler or et.workers):
            task.adopt(enc)  # in-process: the coordinator's encoder is the worker's; dask workers load their own
        group, resumed = open_or_create(out, config_hash, create, overwrite)
        mark_incomplete(group)
        result = run_shards(out, task, ShardPlan(n, shard_samples), config_hash, units=et.shards,
                            workers=et.workers, scheduler=et.scheduler, threads=et.threads, desc="embed-text",
                            stop_signals=cfg.runtime.stop_signals)
        if not result.complete:
            missing = sorted(set(range(result.shards_total)) - set(result.records))
            raise UserError(f"embed-text: shards {missing} of {out} have no completion record; "
                            "re-run `fae-pipe embed-text` to finish them")
        finalize(group, result.failures())
    captions = sum(int(r["extras"]["captions"]) for r in result.records.values())
    per_sample = StoreLocation.of(out).data_bytes(skip=schema.BOOKKEEPING_DIR) / n
    wall = time.perf_counter() - t0
    write_metrics(Path(cfg.paths.metrics) / "embed_text.json", {
        "samples": n, "captions": captions, "captions_per_sample": slots, "uncaptioned": len(result.failures()),
        "text_bytes_per_sample": per_sample, "wall_seconds": wall, "shards_written": result.shards_written,
        "shards_skipped": result.shards_skipped})
    print(f"embed-text: {n} samples, {captions} captions -> {out} ({slots} slots x {enc.max_length} tokens x "
          f"{enc.dim} ch{', pooled' if enc.has_pooled else ''}; {'resumed, ' if resumed else ''}"
          f"{result.shards_written} shards written, {result.shards_skipped} skipped), "
          f"{per_sample / 1024:.1f} KiB/sample, {len(result.failures())} without a caption, {wall:.1f} s",
          file=sys.stderr)
