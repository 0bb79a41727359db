"""The layout of the zarr caches: the one place that names arrays, dimensions and attrs,
and the one module that opens existing zarr groups (``open_group``, ``open_store``).

The stores (``features.zarr`` written by ``extract``, ``latents.zarr`` written by
``encode``, ``text.zarr`` written by ``embed-text``) are plain zarr v3 groups that anyone can open with ``zarr`` or
``dask.array.from_zarr``; this module is the contract the writers and the training
readers share. Every per-sample array is split along ``sample`` into storage shards
of ``shard_samples`` rows (each written whole by one writer) holding inner chunks of
``chunk_samples`` rows (the read granularity). Readers should read whole shards
(``read_shard`` / ``shard_reader.ShardReader``, which read an uncompressed local
shard file directly): single-sample reads cost a chunk decode each.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import zarr

from fae_pipe.cache.location import StoreLocation
from fae_pipe.cache.shard_reader import ShardReader, damaged, store_read_error  # noqa: F401 (re-exported)
from fae_pipe.errors import UserError

SCHEMA_VERSION = 1

KIND_FEATURES = "features"
KIND_LATENTS = "latents"
KIND_TEXT = "text"
KINDS = (KIND_FEATURES, KIND_LATENTS, KIND_TEXT)

# array names
FEATURES = "features"
CLS = "cls"
LATENTS = "latents"
STD = "std"
LABELS = "labels"
SAMPLE_IDS = "sample_ids"
VALID = "valid"
# text stores: per sample, up to ``captions_per_sample`` captions (index order; unused slots have length 0)
TOKENS = "tokens"  # token embeddings, zero past each caption's length
LENGTHS = "lengths"  # real tokens per caption (0: no caption in that slot)
POOLED = "pooled"  # the encoder's pooled vector (CLIP, SigLIP), absent for T5

# dimension names, per array
DIMENSIONS: dict[str, tuple[str, ...]] = {
    FEATURES: ("sample", "view", "token", "channel"),
    CLS: ("sample", "view", "channel"),
    LATENTS: ("sample", "view", "channel", "height", "width"),
    STD: ("sample", "view", "channel", "height", "width"),
    TOKENS: ("sample", "caption", "token", "channel"),
    LENGTHS: ("sample", "caption"),
    POOLED: ("sample", "caption", "channel"),
    LABELS: ("sample",),
    SAMPLE_IDS: ("sample",),
    VALID: ("sample",),
}
DTYPES: dict[str, str] = {
    FEATURES: "float16", CLS: "float16", LATENTS: "float16", STD: "float16",
    TOKENS: "float16", LENGTHS: "int32", POOLED: "float16",
    LABELS: "int64", SAMPLE_IDS: "int64", VALID: "bool",
}
FLOAT_ARRAYS = (FEATURES, CLS, LATENTS, STD, TOKENS, POOLED)
# text stores only: the empty caption's embedding (classifier-free guidance), stored once, written at creation
EMPTY_TOKENS = "empty_tokens"
EMPTY_POOLED = "empty_pooled"
EMPTY_DIMENSIONS: dict[str, tuple[str, ...]] = {EMPTY_TOKENS: ("token", "channel"), EMPTY_POOLED: ("channel",)}

# group attrs keys (written only by the coordinating process)
A_SCHEMA_VERSION = "schema_version"
A_KIND = "kind"
A_ENCODER = "encoder"
A_IMAGE_SIZE = "image_size"
A_CROP = "crop"
A_RESIZE = "resize"
A_NORMALIZATION = "normalization"
A_VIEWS = "views"
A_GRID = "grid"
A_NUM_SAMPLES = "num_samples"
A_NUM_CLASSES = "num_classes"
A_CLASSES = "classes"
A_SHARD_SAMPLES = "shard_samples"
A_CHUNK_SAMPLES = "chunk_samples"
A_DATASET_FINGERPRINT = "dataset_fingerprint"
A_INDEX_PATH = "index_path"
A_CONFIG_HASH = "config_hash"
A_CREATED_WITH = "created_with"
A_COMPLETE = "complete"
A_FAILURES = "failures"
# exact per-channel statistics of the stored values (``cache.latent_stats``): written by ``encode``
# (latents) and by ``extract`` (features, ``cache.feature_stats``)
A_CHANNEL_MEAN = "channel_mean"
A_CHANNEL_STD = "channel_std"
A_CHANNEL_STATS_COUNT = "channel_stats_count"  # samples x views x positions behind the statistics
# feature stores only: per-position-and-channel statistics (RAE), float64 arrays of shape (C, H, W)
# written on request by ``cache.feature_stats.compute_feature_stats``; the attr is written after
# both arrays ({"count": valid samples x views, "config_hash": of the store}), so present = whole
POSITION_MEAN = "position_mean"
POSITION_STD = "position_std"
STATS_DIMENSIONS: dict[str, tuple[str, ...]] = {POSITION_MEAN: ("channel", "height", "width"),
                                                POSITION_STD: ("channel", "height", "width")}
A_POSITION_STATS = "position_stats"
# latent stores only (written by ``encode``)
A_FAE_FINGERPRINT = "fae_fingerprint"  # sha256 of the FAE export that made the latents
A_FAE_MODELS = "fae_models"  # registry names of the FAE parts
A_SOURCE_FEATURES = "source_features"  # {"path", "config_hash"} of the feature store encoded
A_LATENT_VALUES = "latent_values"  # a note saying what the stored values are
# what made the latents, hence what decodes them (``sample``, ``evaluate``, the quality curve):
# {"kind": "fae"} or {"kind": "sdvae", "vae": {name, weights, weights_fingerprint, random_weights,
# config, scaling_factor, downsample, precision, input_range}} (``fae_pipe.models.vae.Vae.record``)
A_LATENT_SOURCE = "latent_source"
SOURCE_FAE = "fae"
SOURCE_SDVAE = "sdvae"
LATENT_SOURCES = (SOURCE_FAE, SOURCE_SDVAE)
# VAE stores: the pixels the VAE saw (the ADM crop itself, no resize) and their range
VAE_RESIZE_POLICY = "none"
VAE_INPUT_RANGE = [-1.0, 1.0]

# text stores only (written by ``embed-text``)
A_TEXT_ENCODER = "text_encoder"  # ``FrozenTextEncoder.describe()``: tower, directory fingerprint, random flag
A_MAX_LENGTH = "max_length"  # tokens per caption (padded / truncated to it)
A_CAPTIONS_PER_SAMPLE = "captions_per_sample"  # caption slots per sample (the index's largest count)
A_EMPTY_LENGTH = "empty_length"  # real tokens of the empty caption

# Values of the ``crop`` / ``resize`` attrs of feature stores. They name the one pixel
# chain of ``fae_pipe.data.transforms``: ADM centre crop (BOX halving, then BICUBIC to
# the short side, centred square; views by horizontal flip), then Pillow BICUBIC to the
# encoder input with the ImageNet mean/std. They are hashed into every feature store's
# config_hash, so these strings must never change while the chain stays the same.
CROP_POLICY = "adm_center_crop"
RESIZE_POLICY = "bicubic"

# No compression. Measured on demo features (fp16, one 256-sample shard): zstd level 1
# keeps 92% of the bytes but cuts whole-shard reads from 548 to 223 MiB/s and writes from
# 167 to 125 MiB/s (zstd 3: same size, slower). Training reads matter more than 8% of disk.
COMPRESSORS = None  # all arrays

BOOKKEEPING_DIR = ".fae"  # lock + completion records; not part of the zarr hierarchy


def num_shards(num_samples: int, shard_samples: int) -> int:
    """Number of storage shards along ``sample`` (the last one may be short)."""
    return max(1, math.ceil(num_samples / shard_samples))


def shard_bounds(num_samples: int, shard_samples: int, shard_index: int) -> tuple[int, int]:
    """Sample range ``[start, stop)`` held by storage shard ``shard_index``."""
    start = shard_index * shard_samples
    return start, min(num_samples, start + shard_samples)


def effective_chunk_samples(chunk_samples: int, shard_samples: int, section: str = "extract") -> int:
    """Inner chunk rows: ``chunk_samples`` clipped to the shard; it must divide the shard.
    ``section``: the config section the two keys were set in (named by the error)."""
    chunk = min(chunk_samples, shard_samples)
    if shard_samples % chunk:
        raise UserError(f"{section}.chunk_samples = {chunk_samples} is invalid: it must divide "
                        f"{section}.shard_samples = {shard_samples}")
    return chunk


def caption_filled(caption: str) -> bool:
    """Whether an index caption fills its slot of a text store (a blank one is an empty slot, length 0)."""
    return bool(caption.strip())


def _clear_except_bookkeeping(path) -> None:
    """Remove a store's zarr content but keep ``.fae`` (it holds the writer's lock)."""
    loc = StoreLocation.of(path)
    if not loc.is_local:
        for name in loc.top_level():
            loc.remove(f"{BOOKKEEPING_DIR}/done" if name == BOOKKEEPING_DIR else name, recursive=True)
        return
    path = loc.local
    if not path.exists():
        return
    for child in path.iterdir():
        if child.name == BOOKKEEPING_DIR:
            done = child / "done"
            if done.exists():
                shutil.rmtree(done)
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _create_store(path, kind: str, sample_shapes: dict[str, tuple[int, ...]], n: int,
                  shard_samples: int, chunk_samples: int, attrs: dict) -> zarr.Group:
    loc = StoreLocation.of(path)
    if n < 1:
        raise UserError(f"cannot create store {loc}: the dataset has no samples")
    chunk = effective_chunk_samples(chunk_samples, shard_samples)
    _clear_except_bookkeeping(loc)
    if loc.is_local:
        loc.local.mkdir(parents=True, exist_ok=True)
    meta = dict(attrs)
    meta.update({A_SCHEMA_VERSION: SCHEMA_VERSION, A_KIND: kind, A_NUM_SAMPLES: n,
                 A_SHARD_SAMPLES: shard_samples, A_CHUNK_SAMPLES: chunk, A_COMPLETE: False})
    group = zarr.create_group(loc.zarr_store(), attributes=meta)
    for name, rest in sample_shapes.items():
        group.create_array(
            name, shape=(n, *rest), dtype=DTYPES[name],
            chunks=(chunk, *rest), shards=(shard_samples, *rest),
            compressors=COMPRESSORS,
            dimension_names=DIMENSIONS[name], fill_value=0,
            # every shard gets a file, even an all-zero one, so a missing file is a defect
            config={"write_empty_chunks": True},
        )
    return consolidate(loc)


def consolidate(path) -> zarr.Group:
    """(Re)write a store's consolidated metadata; call after creating arrays in it.

    Consolidated metadata lets readers list the arrays without scanning the directory
    (which would warn about the non-zarr ``.fae`` folder). Array metadata never changes
    after creation and root attrs live outside the consolidated part, so it goes stale
    only when an array is added (the statistics arrays of ``cache.feature_stats``).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        warnings.filterwarnings("ignore", message=f"Object at {BOOKKEEPING_DIR} is not recognized",
                                category=UserWarning)
        return zarr.consolidate_metadata(StoreLocation.of(path).zarr_store())


def create_feature_store(path, n: int, views: int, tokens: int, dim: int, grid, shard_samples: int,
                         chunk_samples: int, attrs: dict) -> zarr.Group:
    """Create an empty ``features.zarr``: patch tokens, cls tokens, labels, ids, validity."""
    meta = dict(attrs, **{A_GRID: [int(grid[0]), int(grid[1])]})
    shapes = {FEATURES: (views, tokens, dim), CLS: (views, dim), LABELS: (), SAMPLE_IDS: (), VALID: ()}
    return _create_store(path, KIND_FEATURES, shapes, n, shard_samples, chunk_samples, meta)


def create_latent_store(path, n: int, views: int, channels: int, grid, shard_samples: int,
                        chunk_samples: int, attrs: dict, store_std: bool = False) -> zarr.Group:
    """Create an empty ``latents.zarr``: posterior means (and optionally stds) per view."""
    h, w = int(grid[0]), int(grid[1])
    meta = dict(attrs, **{A_GRID: [h, w]})
    shapes = {LATENTS: (views, channels, h, w)}
    if store_std:
        shapes[STD] = (views, channels, h, w)
    shapes.update({LABELS: (), SAMPLE_IDS: (), VALID: ()})
    return _create_store(path, KIND_LATENTS, shapes, n, shard_samples, chunk_samples, meta)


def create_text_store(path, n: int, captions_per_sample: int, max_length: int, dim: int, shard_samples: int,
                      chunk_samples: int, attrs: dict, empty_tokens: np.ndarray, empty_length: int,
                      empty_pooled: np.ndarray | None = None) -> zarr.Group:
    """Create an empty ``text.zarr``: caption token embeddings, lengths (and pooled vectors) per sample,
    plus the empty caption's embedding, written here once (it belongs to no shard)."""
    k, t, d = int(captions_per_sample), int(max_length), int(dim)
    if empty_tokens.shape != (t, d) or (empty_pooled is not None and empty_pooled.shape != (d,)):
        raise ValueError(f"empty caption embedding {empty_tokens.shape} does not match ({t}, {d})")
    meta = dict(attrs, **{A_MAX_LENGTH: t, A_CAPTIONS_PER_SAMPLE: k, A_EMPTY_LENGTH: int(empty_length)})
    shapes = {TOKENS: (k, t, d), LENGTHS: (k,)}
    if empty_pooled is not None:
        shapes[POOLED] = (k, d)
    shapes.update({SAMPLE_IDS: (), VALID: ()})
    group = _create_store(path, KIND_TEXT, shapes, n, shard_samples, chunk_samples, meta)
    empties = {EMPTY_TOKENS: empty_tokens} if empty_pooled is None else {EMPTY_TOKENS: empty_tokens,
                                                                         EMPTY_POOLED: empty_pooled}
    for name, value in empties.items():
        arr = group.create_array(name, shape=value.shape, dtype="float16", compressors=COMPRESSORS,
                                 dimension_names=EMPTY_DIMENSIONS[name], fill_value=0)
        arr[...] = np.asarray(value, np.float16)
    return consolidate(path)


def open_group(path, mode: str = "r", what: str = "a zarr v3 store",
               hint: str = "check the path or run the stage that writes it") -> zarr.Group:
    """Open any zarr v3 group (not only fae-pipe stores); a wrong path is a one-line UserError.

    The one place the package opens existing groups, so every reader reports a missing
    or malformed store the same way. ``what``/``hint`` word the missing-store message.
    """
    p = StoreLocation.of(path)  # a local path or a URL (s3://, gs://...): ``cache.location``
    try:
        present = p.exists("zarr.json")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, network: one line naming the store
        raise UserError(f"{p} could not be reached: {type(e).__name__}: {e}; check the URL and "
                        "storage.options (or the provider's environment variables)") from None
    if not present:
        raise UserError(f"{p} is not {what} (no zarr.json); {hint}")
    try:
        return zarr.open_group(p.zarr_store(read_only=mode == "r"), mode=mode)
    except Exception as e:  # zarr raises several types for a malformed hierarchy
        raise UserError(f"{p} could not be opened as a zarr group: {type(e).__name__}: {e}") from None


def open_store(path, mode: str = "r") -> tuple[zarr.Group, str]:
    """Open a fae-pipe cache store and return ``(group, kind)``, checking its kind and schema version."""
    p = StoreLocation.of(path)
    group = open_group(p, mode, "a fae-pipe zarr store", "run `fae-pipe extract` or `encode` first")
    kind = group.attrs.get(A_KIND)
    if kind not in KINDS:
        raise UserError(f"{p} is not a fae-pipe store: attrs '{A_KIND}' is {kind!r}, "
                        f"expected one of {', '.join(KINDS)}")
    version = group.attrs.get(A_SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"{p} has {A_SCHEMA_VERSION} {version!r}; this fae-pipe reads version {SCHEMA_VERSION}: "
                        "re-create it with --overwrite")
    return group, kind


def open_feature_store(path, mode: str = "r", key: str = "paths.features") -> zarr.Group:
    """The complete ``features.zarr`` at ``path``, or a one-line error (``key``: where the path was set)."""
    group, kind = open_store(path, mode)
    if kind != KIND_FEATURES:
        raise UserError(f"{key} = {path} is a {kind} store; expected the features store written by `extract`")
    if group.attrs.get(A_COMPLETE) is not True:
        raise UserError(f"feature store {path} is incomplete: finish it with `fae-pipe extract` first")
    return group


def latent_source(attrs, where) -> dict | None:
    """A latent store's ``latent_source`` record; a store written before the attr existed and
    carrying an FAE fingerprint is the FAE's; None for a store that records neither (a foreign store).
    An unknown kind is a one-line error: nothing downstream may guess a decoder."""
    record = attrs.get(A_LATENT_SOURCE)
    if record is None:
        return {"kind": SOURCE_FAE} if attrs.get(A_FAE_FINGERPRINT) is not None else None
    if not isinstance(record, dict) or record.get("kind") not in LATENT_SOURCES:
        raise UserError(f"{where}: attrs '{A_LATENT_SOURCE}' is {record!r}; expected a record whose kind is one "
                        f"of {', '.join(LATENT_SOURCES)} (re-run `fae-pipe encode`)")
    return dict(record)


def sample_array_names(group: zarr.Group) -> list[str]:
    """The per-sample arrays present in a store, in schema order."""
    present = set(group.array_keys())
    return [name for name in DIMENSIONS if name in present]


def store_num_shards(group: zarr.Group) -> int:
    return num_shards(int(group.attrs[A_NUM_SAMPLES]), int(group.attrs[A_SHARD_SAMPLES]))


def read_shard(group: zarr.Group, array_name: str, shard_index: int) -> np.ndarray:
    """Read one whole storage shard of ``array_name`` (the fast way to read the cache)."""
    n, size = int(group.attrs[A_NUM_SAMPLES]), int(group.attrs[A_SHARD_SAMPLES])
    if not 0 <= shard_index < num_shards(n, size):
        raise IndexError(f"shard {shard_index} out of range: the store has {num_shards(n, size)} shards")
    return ShardReader(group[array_name]).read(shard_index)


def read_array(group: zarr.Group, array_name: str, rows=None) -> np.ndarray:
    """A whole (small, per-sample) array such as ``labels`` or ``valid``, read shard by shard
    (each shard checked: a damaged one is the one-line ``damaged`` error, never zeros);
    ``rows`` selects samples afterwards."""
    reader = ShardReader(group[array_name])
    n = reader.num_samples
    out = np.empty((n, *reader.row_shape), reader.dtype)
    for s in range(num_shards(n, reader.rows) if n else 0):
        lo, hi = reader.bounds(s)
        reader.read_into(s, out[lo:hi])
    return out if rows is None else out[np.asarray(rows, np.int64)]


def read_rows(group: zarr.Group, array_name: str, rows, *rest) -> np.ndarray:
    """``group[array_name].oindex[rows, *rest]`` with the shards it touches checked first and
    any read error turned into the one-line ``damaged`` error."""
    arr = group[array_name]
    rows = np.asarray(rows, np.int64)
    reader = ShardReader(arr)
    for s in np.unique(rows // reader.rows).tolist():
        reader.check(int(s))
    with store_read_error(arr):
        return np.asarray(arr.oindex[(rows, *rest)])


def shard_key(group: zarr.Group, array_name: str, shard_index: int) -> str:
    """The store-relative key of the object holding storage shard ``shard_index`` of an array."""
    arr = group[array_name]
    coords = (shard_index,) + (0,) * (arr.ndim - 1)
    return f"{array_name}/{arr.metadata.chunk_key_encoding.encode_chunk_key(coords)}"


def shard_file(store_path, group: zarr.Group, array_name: str, shard_index: int) -> Path:
    """The file holding storage shard ``shard_index`` of an array (local stores)."""
    return Path(store_path) / shard_key(group, array_name, shard_index)
