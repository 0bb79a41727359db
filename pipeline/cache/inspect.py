"""``fae-pipe inspect`` / ``verify``: read a cache store the way a user or a CI job would.

``inspect_store`` summarises layout, attrs, completeness and (for latents) the channel
statistics without reading sample data. ``verify_store`` reads every storage shard
once and returns one line per defect, so a damaged or unfinished store is caught
before training silently learns from zero rows.

The dataset index is passed in (``verify_store(..., read_index=...)``, normally
``fae_pipe.data.index.read_index``) rather than imported: ``fae_pipe.data`` reads
caches, so ``fae_pipe.cache`` must never import it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import read_records
from fae_pipe.cache.location import StoreLocation
from fae_pipe.errors import UserError


class SampleIndex(Protocol):
    """What verify needs of a dataset index (``fae_pipe.data.index.DatasetIndex`` has it)."""

    fingerprint: str
    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int: ...


_LONG_ATTRS = (schema.A_CLASSES, schema.A_FAILURES, schema.A_CHANNEL_MEAN, schema.A_CHANNEL_STD)


def _compact(value, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _codecs(arr) -> str:
    names = [type(c).__name__.replace("Codec", "").lower() + (f"({c.level})" if hasattr(c, "level") else "")
             for c in arr.compressors]
    return ",".join(names) or "none"


def _stats_lines(attrs) -> list[str]:
    mean = np.asarray(attrs.get(schema.A_CHANNEL_MEAN, []), dtype=np.float64)
    std = np.asarray(attrs.get(schema.A_CHANNEL_STD, []), dtype=np.float64)
    if not mean.size or mean.shape != std.shape:
        return ["channel statistics: missing (channel_mean/channel_std not in attrs)"]
    lines = [f"channel statistics ({mean.size} channels):"]
    for c in range(mean.size):
        lines.append(f"  channel {c:3d}: mean {mean[c]:+.5f}  std {std[c]:.5f}")
    return lines


def inspect_store(path) -> str:
    """Human-readable summary: kind, version, attrs, completeness, arrays, statistics."""
    group, kind = schema.open_store(path, "r")
    attrs = dict(group.attrs)
    shards = schema.store_num_shards(group)
    config_hash = attrs.get(schema.A_CONFIG_HASH)
    records = read_records(path, range(shards))
    done = sum(1 for i in range(shards) if (records[i] or {}).get("config_hash") == config_hash)
    loc = StoreLocation.of(path)
    lines = [
        f"store: {loc.canonical()}",
        f"kind: {kind}  schema_version: {attrs.get(schema.A_SCHEMA_VERSION)}  "
        f"created_with: {attrs.get(schema.A_CREATED_WITH)}",
        f"complete: {bool(attrs.get(schema.A_COMPLETE))}  ({done} of {shards} shards have completion records)",
        "attrs:",
    ]
    for key in sorted(attrs):
        value = attrs[key]
        if key in _LONG_ATTRS and isinstance(value, list):
            lines.append(f"  {key}: [{len(value)} items] {_compact(value[:4], 100)}")
        else:
            lines.append(f"  {key}: {_compact(value)}")
    lines.append("arrays:")
    for name in schema.sample_array_names(group):
        arr = group[name]
        lines.append(f"  {name}: shape {tuple(arr.shape)} {arr.dtype} chunks {tuple(arr.chunks)} "
                     f"shards {tuple(arr.shards or arr.chunks)} dims {tuple(arr.metadata.dimension_names or ())} "
                     f"compressors {_codecs(arr)}")
    data_bytes = loc.data_bytes(skip=schema.BOOKKEEPING_DIR)
    n = int(attrs[schema.A_NUM_SAMPLES])
    lines.append(f"stored: {data_bytes / 2**20:.2f} MiB ({data_bytes / max(1, n):.0f} bytes/sample), "
                 f"failures recorded: {len(attrs.get(schema.A_FAILURES, []))}")
    if kind == schema.KIND_LATENTS:
        lines.extend(_stats_lines(attrs))
    if kind == schema.KIND_TEXT:
        lines.extend(_text_lines(group, attrs))
    return "\n".join(lines)


def _text_lines(group, attrs) -> list[str]:
    """A text store's encoder record (in full: the attrs line is cut) and its empty-caption embedding."""
    enc = attrs.get(schema.A_TEXT_ENCODER) or {}
    lines = [f"text encoder: {enc.get('model_type')} from {enc.get('directory')} ({enc.get('fingerprint')}), "
             f"dim {enc.get('dim')}, pooled dim {enc.get('pooled_dim')}, precision {enc.get('precision')}"
             + ("  RANDOM WEIGHTS: tests and the demo only" if enc.get("random") else ""),
             f"captions: {attrs.get(schema.A_CAPTIONS_PER_SAMPLE)} slots per sample x "
             f"{attrs.get(schema.A_MAX_LENGTH)} tokens (lengths 0 = empty slot)"]
    present = set(group.array_keys())
    for name in schema.EMPTY_DIMENSIONS:
        if name in present:
            arr = group[name]
            dims = tuple(arr.metadata.dimension_names or ())
            lines.append(f"  {name}: shape {tuple(arr.shape)} {arr.dtype} dims {dims}")
    lines.append(f"empty caption: {attrs.get(schema.A_EMPTY_LENGTH)} token(s)"
                 + ("" if schema.EMPTY_TOKENS in present else "; empty_tokens MISSING"))
    return lines


def _load_index(path, attrs, index_path, read_index: Callable[[str], SampleIndex] | None):
    """The dataset index to compare against, or a defect line saying why it is not checked."""
    if read_index is None:
        return None, "index: no index reader given; labels and sample_ids not checked"
    where = index_path or attrs.get(schema.A_INDEX_PATH)
    if not where:
        return None, "index: no index_path in attrs; labels and sample_ids not checked (pass --index)"
    if not index_path and not Path(where).is_absolute() and not Path(where).exists() \
            and StoreLocation.of(path).is_local:
        # the recorded path is relative to the project that wrote the store: try its ancestors
        for root in Path(path).resolve().parents:
            if (root / where).is_file():
                where = str(root / where)
                break
    try:
        index = read_index(where)
    except UserError as e:
        return None, f"index: {e}; labels and sample_ids not checked (pass --index)"
    fp = attrs.get(schema.A_DATASET_FINGERPRINT)
    if fp != index.fingerprint:
        return index, (f"index {where}: dataset fingerprint {index.fingerprint[:12]} differs from the store's "
                       f"{str(fp)[:12]}")
    return index, None


def _check_shard(path, group, i: int, start: int, stop: int, config_hash, index, failed: set | None,
                 rec: dict | None) -> list[str]:
    """Defects of one storage shard; ``failed`` is the store's failed samples (None: use the record ``rec``)."""
    where = f"shard {i} (samples {start}..{stop - 1})"
    out = []
    if rec is None:
        out.append(f"{where}: no completion record ({Path('.fae/done') / f'shard-{i:05d}.json'})")
    elif rec.get("config_hash") != config_hash or (rec.get("start"), rec.get("stop")) != (start, stop):
        out.append(f"{where}: completion record does not match the store (config_hash or sample range)")
        rec = None
    names = schema.sample_array_names(group)
    loc = StoreLocation.of(path)
    missing = [n for n in names if not loc.exists(schema.shard_key(group, n, i))]
    if missing:
        return out + [f"{where}: shard file missing for {name} ({loc.child(schema.shard_key(group, name, i))})"
                      for name in missing]
    try:
        data = {name: group[name][start:stop] for name in names}
    except Exception as e:  # a torn or foreign file: report it, keep checking other shards
        return out + [f"{where}: unreadable: {type(e).__name__}: {e}"]
    valid = data[schema.VALID].astype(bool)
    for name in schema.FLOAT_ARRAYS:
        if name in data:
            rows = data[name][valid]
            if not np.isfinite(rows).all():
                out.append(f"{where}: {name} has non-finite values in valid rows")
            if np.any(data[name][~valid]):
                out.append(f"{where}: {name} has non-zero values in rows marked invalid")
    invalid = {start + int(j) for j in np.flatnonzero(~valid)}
    if failed is not None or rec is not None:
        if failed is not None:
            recorded = {s for s in failed if start <= s < stop}
        else:
            recorded = {int(f["sample"]) for f in rec.get("failures", [])}
        if recorded != invalid:
            out.append(f"{where}: valid=False rows {sorted(invalid)} differ from recorded failures {sorted(recorded)}")
    if rec is not None:
        if rec.get("samples") != stop - start or rec.get("valid") != int(valid.sum()):
            out.append(f"{where}: record counts (samples {rec.get('samples')}, valid {rec.get('valid')}) differ "
                       f"from the data ({stop - start}, {int(valid.sum())})")
    if index is not None:
        ids = data[schema.SAMPLE_IDS]
        if stop > len(index) or not np.array_equal(ids, index.ids[start:stop]):
            out.append(f"{where}: sample_ids differ from the index rows {start}..{stop - 1}")
        elif schema.LABELS in data and not np.array_equal(data[schema.LABELS], index.labels[ids]):
            bad = int(np.sum(data[schema.LABELS] != index.labels[ids]))
            out.append(f"{where}: {bad} label(s) differ from the index")
    if schema.LENGTHS in data:
        out.extend(_check_text_shard(where, group, data, valid, start, index))
    return out


def _check_text_shard(where: str, group, data: dict, valid: np.ndarray, start: int, index) -> list[str]:
    """A text shard: lengths in [0, max_length], zeros past each length and in empty slots, valid = has a
    caption, and (with a captioned index) a filled slot exactly where the index has a caption."""
    out = []
    lengths = data[schema.LENGTHS]
    t = int(group.attrs.get(schema.A_MAX_LENGTH, group[schema.TOKENS].shape[2]))
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > t:
        out.append(f"{where}: lengths outside 0..{t} (max_length)")
        return out
    past = np.arange(t)[None, None, :] >= lengths[..., None]  # (n, k, t): positions past each caption
    if np.any(data[schema.TOKENS][past]):
        out.append(f"{where}: tokens non-zero past their caption's length")
    if schema.POOLED in data and np.any(data[schema.POOLED][lengths == 0]):
        out.append(f"{where}: pooled non-zero in empty caption slots")
    if not np.array_equal(valid, lengths.max(axis=1) > 0):
        out.append(f"{where}: valid differs from 'has at least one caption' (lengths > 0)")
    captions = getattr(index, "captions", None)
    if captions is not None:
        filled = np.zeros(lengths.shape, bool)
        for r in range(lengths.shape[0]):
            caps = captions.of(start + r)[: lengths.shape[1]]
            filled[r, :len(caps)] = [schema.caption_filled(c) for c in caps]
        if not np.array_equal(filled, lengths > 0):
            bad = int(np.sum(np.any(filled != (lengths > 0), axis=1)))
            out.append(f"{where}: {bad} sample(s) whose filled caption slots differ from the index's captions")
    return out


def verify_store(path, index_path=None, *, read_index: Callable[[str], SampleIndex] | None) -> list[str]:
    """Check every shard end to end; returns defect lines (empty when the store is sound).

    ``index_path`` (default: the store's ``index_path`` attr) is read with ``read_index``
    to check labels and sample ids; ``read_index=None`` skips that check (one defect line).
    """
    group, kind = schema.open_store(path, "r")
    attrs = dict(group.attrs)
    defects = []
    config_hash = attrs.get(schema.A_CONFIG_HASH)
    if not config_hash:
        defects.append("attrs: no config_hash (store creation was interrupted); re-run with --overwrite")
    if attrs.get(schema.A_COMPLETE) is not True:
        defects.append("attrs: complete is not true (the writing run did not finish)")
    n, size = int(attrs[schema.A_NUM_SAMPLES]), int(attrs[schema.A_SHARD_SAMPLES])
    for name in schema.sample_array_names(group):
        arr = group[name]
        if arr.shape[0] != n or (arr.shards or arr.chunks)[0] != size:
            defects.append(f"array {name}: shape {arr.shape} / shards {arr.shards} disagree with "
                           f"num_samples {n} / shard_samples {size}")
    required = {schema.SAMPLE_IDS, schema.VALID, *{schema.KIND_FEATURES: (schema.LABELS, schema.FEATURES),
                                                  schema.KIND_LATENTS: (schema.LABELS, schema.LATENTS),
                                                  schema.KIND_TEXT: (schema.TOKENS, schema.LENGTHS)}[kind]}
    absent = sorted(required - set(schema.sample_array_names(group)))
    if absent:
        return defects + [f"arrays missing: {', '.join(absent)}"]
    index, index_defect = _load_index(path, attrs, index_path, read_index)
    if index_defect:
        defects.append(index_defect)
    complete = attrs.get(schema.A_COMPLETE) is True
    # a finished store's attrs list every failed sample (latent stores inherit it from their source)
    failed = {int(f["sample"]) for f in attrs.get(schema.A_FAILURES, [])} if complete else None
    recorded = []
    records = read_records(path, range(schema.num_shards(n, size)))
    for i in range(schema.num_shards(n, size)):
        start, stop = schema.shard_bounds(n, size, i)
        defects.extend(_check_shard(path, group, i, start, stop, config_hash, index, failed, records[i]))
        recorded.extend((records[i] or {}).get("failures", []))
    if kind == schema.KIND_FEATURES and complete and attrs.get(schema.A_FAILURES, []) != recorded:
        defects.append("attrs: failures list differs from the shards' completion records")
    if kind == schema.KIND_TEXT:
        defects.extend(_check_empty_caption(group, attrs))
    if kind == schema.KIND_LATENTS:
        channels = group[schema.LATENTS].shape[2]
        mean = np.asarray(attrs.get(schema.A_CHANNEL_MEAN, []), dtype=np.float64)
        std = np.asarray(attrs.get(schema.A_CHANNEL_STD, []), dtype=np.float64)
        if mean.shape != (channels,) or std.shape != (channels,):
            defects.append(f"attrs: channel_mean/channel_std missing or not {channels} values")
        elif not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            defects.append("attrs: channel_mean/channel_std not finite or std not positive")
    return defects


def _check_empty_caption(group, attrs) -> list[str]:
    """The text store's empty-caption embedding: present, shaped like one caption, finite, zero past its length."""
    present = set(group.array_keys())
    t, d = group[schema.TOKENS].shape[2:]
    if schema.EMPTY_TOKENS not in present:
        return [f"array {schema.EMPTY_TOKENS} missing (the empty caption's embedding, written at creation)"]
    out = []
    empty = group[schema.EMPTY_TOKENS][...]
    length = attrs.get(schema.A_EMPTY_LENGTH)
    if empty.shape != (t, d):
        out.append(f"array {schema.EMPTY_TOKENS}: shape {empty.shape}, expected {(t, d)}")
    elif not isinstance(length, int) or not 0 <= length <= t:
        out.append(f"attrs: {schema.A_EMPTY_LENGTH} = {length!r} is not a length in 0..{t}")
    elif not np.isfinite(empty).all() or np.any(empty[length:]):
        out.append(f"array {schema.EMPTY_TOKENS}: non-finite, or non-zero past its length {length}")
    if (schema.POOLED in present) != (schema.EMPTY_POOLED in present):
        out.append(f"arrays {schema.POOLED} and {schema.EMPTY_POOLED}: one is present without the other")
    return out
