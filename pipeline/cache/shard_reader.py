"""Whole-shard reads straight from the shard file into the caller's buffer.

Why: training readers only ever want whole storage shards, and for the stores this
pipeline writes (local files, no compression, inner chunks laid out in order) a
shard file *is* the C-order array followed by zarr's shard index. zarr's generic
path costs a decode per inner chunk plus its async machinery, which dominates for
small latents (a 256-sample demo shard took ~1 ms through zarr; one ``readinto``
takes tens of microseconds). This module reads the file directly when the layout
allows it and checks the shard index (its CRC32C and that every inner chunk sits
where the C-order layout says) before trusting the bytes, and can also memory-map
the shard so a reader pays only for the rows it touches; anything else, such as a
compressed or remote store, an empty chunk or a reordered shard, is read through
zarr instead, so the result is always what ``array[lo:hi]`` returns.

On object storage (a ``zarr.storage.FsspecStore``: ``s3://``, ``gs://``...) the same
layout holds per object, so a shard is one GET of the whole object, checked the same
way from its tail; ``prefetch`` starts those GETs on a small shared thread pool (at
most ``MAX_PREFETCH`` shards in flight per array), so a loader that asks for the next
window's shards while it serves the current one streams from a bucket at close to the
speed it streams from disk (``fae-pipe bench loader --object-store``). Remote shards
are never memory-mapped (``mappable`` is False): they are read into process memory.

Damage is never silent and never raw: every shard is checked before it is used (the
file must exist, since shards are written even when empty; its index must pass its
CRC32C and every inner chunk must lie inside the file), so a missing or truncated
shard is found before it is memory-mapped (no SIGBUS), and any error zarr or the OS
raises while reading is turned by ``store_read_error`` into one ``UserError`` naming
the store, the array, the shard and what to run. Flipped bytes inside the data part
of an uncompressed shard cannot be detected (the inner chunks carry no checksum;
``fae-pipe verify`` checks the values).
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import FsspecStore, LocalStore

from fae_pipe.errors import UserError

# which command re-creates a store holding this array (labels/ids/valid are in both kinds)
_MADE_BY = {"features": "extract", "cls": "extract", "latents": "encode", "std": "encode",
            "tokens": "embed-text", "lengths": "embed-text", "pooled": "embed-text"}


def damaged(store, array: str, shard: int | None, reason: str) -> UserError:
    """The one line for a damaged store: names the store, the shard and what to run."""
    made_by = _MADE_BY.get(array)
    redo = (f"`fae-pipe {made_by} --overwrite`" if made_by else
            "`fae-pipe extract --overwrite` (features) or `fae-pipe encode --overwrite` (latents)")
    where = f"shard {shard} of '{array}'" if shard is not None else f"array '{array}'"
    reason = " ".join(str(reason).split())[:200]
    return UserError(f"{store}: {where} is damaged ({reason}); run `fae-pipe verify {store}`, "
                     f"then re-create it with {redo}")


PREFETCH_THREADS = 8  # shared by every remote reader of the process: concurrent GETs of whole shards
MAX_PREFETCH = 8  # shards in flight or fetched but not yet read, per array ...
PREFETCH_BYTES = 1 << 31  # ... and at most this many bytes of them (a 1024-sample DINOv2-g shard is ~3 GB)
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="fae-pipe-prefetch"))
        return _POOL[0]


def _sync_fs(store: FsspecStore):
    """A blocking twin of the store's (asynchronous) file system: same class and options
    (fsspec caches the instance); its calls are thread-safe, run on fsspec's IO loop."""
    fs = store.fs
    if getattr(fs, "sync_fs", None) is not None:  # zarr's wrapper around a synchronous file system
        return fs.sync_fs
    if getattr(fs, "asynchronous", False):
        return type(fs)(**{**fs.storage_options, "asynchronous": False})
    return fs


def _store_url(store: FsspecStore) -> str:
    protocol = store.fs.protocol
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{store.path.rstrip('/')}"


def _store_root(array: zarr.Array):
    if isinstance(array.store, FsspecStore):
        return _store_url(array.store)
    root = getattr(array.store, "root", None)
    return Path(root) if root is not None else array.store


@contextmanager
def store_read_error(array: zarr.Array, shard: int | None = None):
    """Turn any error zarr, numcodecs or the OS raises while reading ``array`` into ``damaged(...)``."""
    try:
        yield
    except UserError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - checksum, decode, short read, I/O: all the same user problem
        raise damaged(_store_root(array), array.basename or array.path, shard,
                      f"{type(e).__name__}: {e}") from None


class ShardReader:
    """Reads storage shards of one sample-first array (shards split only along dim 0).

    ``direct`` says whether the fast file path is possible for this array at all
    (``not_direct`` says why not); ``direct_reads`` / ``zarr_reads`` count how each
    shard was actually read.
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.rows = int((array.shards or array.chunks)[0])
        self.num_samples = int(array.shape[0])
        self.row_shape = tuple(int(v) for v in array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.direct_reads = self.zarr_reads = 0
        self.not_direct = self._layout_problem(array)
        self.direct = self.not_direct is None
        self._root = Path(array.store.root) / array.path if isinstance(array.store, LocalStore) else None
        # object storage: (file system, the array's path in it); shards are whole objects
        self._remote = ((_sync_fs(array.store), f"{array.store.path.rstrip('/')}/{array.path}")
                        if isinstance(array.store, FsspecStore) else None)
        self.mappable = self.direct and self._root is not None
        self._pending: dict[int, Future] = {}
        self._index_checked = ((self._root is not None or self._remote is not None) and array.shards is not None
                               and self._index_layout(array) is not None)
        if self.direct:
            self.chunk_rows = int(array.chunks[0])
            self.chunks_per_shard = self.rows // self.chunk_rows
            self.chunk_nbytes = self.chunk_rows * self.row_nbytes
            self.index_nbytes = 16 * self.chunks_per_shard + 4

    def _layout_problem(self, array: zarr.Array) -> str | None:
        """Why the array's shards cannot be read as raw C-order bytes (None: they can)."""
        store = array.store
        if not isinstance(store, (LocalStore, FsspecStore)):
            return f"store is {type(store).__name__}, not a LocalStore or FsspecStore"
        if array.shards is None:
            return "array is not sharded"
        if self.dtype.hasobject:
            return f"dtype {self.dtype} holds objects"
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return f"codec pipeline {[type(c).__name__ for c in codecs]} is not one ShardingCodec"
        sharding = codecs[0]
        order = self.dtype.byteorder
        little = self.dtype.itemsize == 1 or order == "<" or (order == "=" and np.little_endian)
        inner = sharding.codecs
        if not (len(inner) == 1 and isinstance(inner[0], BytesCodec)
                and (inner[0].endian is None or inner[0].endian.value == "little") and little):
            return f"inner codecs {[type(c).__name__ for c in inner]} are not little-endian BytesCodec only"
        index = [type(c) for c in sharding.index_codecs]
        if index != [BytesCodec, Crc32cCodec] or sharding.index_location != ShardingCodecIndexLocation.end:
            return (f"shard index {[t.__name__ for t in index]} at the {sharding.index_location.value} is not "
                    "BytesCodec + Crc32cCodec at the end")
        if not tuple(array.shards[1:]) == self.row_shape == tuple(array.chunks[1:]):
            return f"shards {array.shards} / chunks {array.chunks} split more than the sample axis"
        return None

    def _index_layout(self, array: zarr.Array) -> int | None:
        """Inner chunks per shard when the shard index is BytesCodec + CRC32C at the end (checkable), else None."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        if ([type(c) for c in sharding.index_codecs] != [BytesCodec, Crc32cCodec]
                or sharding.index_location != ShardingCodecIndexLocation.end):
            return None
        return int(np.prod([s // c for s, c in zip(array.shards, array.chunks)]))

    def _damaged(self, shard_index: int, reason: str) -> UserError:
        return damaged(_store_root(self.array), self.array.basename or self.array.path, shard_index, reason)

    def check(self, shard_index: int) -> None:
        """Raise the one-line ``damaged`` error unless shard ``shard_index``'s file is whole.

        Whole: present (shards are written even when empty), its index passes its
        CRC32C and every stored inner chunk lies inside the file before the index.
        Local sharded stores only (others are left to zarr, under ``store_read_error``).
        """
        if self.array.shards is None or (self._root is None and self._remote is None):
            return
        if self._remote is not None:
            self._check_remote(shard_index)
            return
        path = self._shard_path(shard_index)
        try:
            with open(path, "rb", buffering=0) as f:
                self._checked_index(f, shard_index, path)
        except FileNotFoundError:
            self._missing(shard_index, path)
        except OSError as e:
            raise self._damaged(shard_index, f"cannot read {path}: {e.strerror or e}") from None

    def _rel(self, path) -> str:
        """The shard file's path inside the store (e.g. ``latents/c/0/0/0/0/0``)."""
        if self._remote is not None:
            return str(path)[len(self.array.store.path.rstrip("/")) + 1:]
        try:
            return str(path.relative_to(Path(self.array.store.root)))
        except ValueError:
            return str(path)

    def _missing(self, shard_index: int, path: Path) -> None:
        """A missing shard file: damage in a store marked complete (shards are written even
        when all-zero, ``write_empty_chunks``); elsewhere zarr serves the fill value."""
        if self._store_complete():
            raise self._damaged(shard_index, f"shard file {self._rel(path)} is missing")

    def _store_complete(self) -> bool:
        import json

        try:
            if self._remote is not None:
                meta = json.loads(self._remote[0].cat_file(f"{self.array.store.path.rstrip('/')}/zarr.json"))
            else:
                meta = json.loads((Path(self.array.store.root) / "zarr.json").read_text())
        except (OSError, ValueError):
            return False
        return (meta.get("attributes") or {}).get("complete") is True

    def _checked_index(self, f, shard_index: int, path: Path) -> bytes | None:
        """The shard's index bytes after checking them (None when this layout's index cannot be checked)."""
        if not self._index_checked:
            return None
        size = os.fstat(f.fileno()).st_size
        n = self._index_nbytes()
        if size >= n:
            f.seek(size - n)
        return self._check_index(f.read(n) if size >= n else b"", size, shard_index, path)

    def _index_nbytes(self) -> int:
        return 16 * self._index_layout(self.array) + 4

    def _check_index(self, index: bytes, size: int, shard_index: int, path) -> bytes:
        """``index`` (the last bytes of a ``size``-byte shard) if it is whole and consistent, else ``damaged``."""
        n_chunks = self._index_layout(self.array)
        index_nbytes = 16 * n_chunks + 4
        if size < index_nbytes:
            raise self._damaged(shard_index, f"shard file {self._rel(path)} is truncated: {size} bytes, "
                                             f"smaller than its {index_nbytes}-byte index")
        if len(index) != index_nbytes or index[-4:] != np.uint32(google_crc32c.value(index[:-4])).tobytes():
            raise self._damaged(shard_index, f"shard file {self._rel(path)} is truncated or corrupt: "
                                             "its index fails its CRC32C checksum")
        table = np.frombuffer(index, "<u8", count=2 * n_chunks).reshape(-1, 2)
        stored = table[table[:, 0] != np.uint64(2**64 - 1)]  # all-ones: an empty inner chunk
        if stored.size and int((stored[:, 0] + stored[:, 1]).max()) > size - index_nbytes:
            raise self._damaged(shard_index, f"shard file {self._rel(path)} is truncated: {size} bytes, its index "
                                             f"refers to {int((stored[:, 0] + stored[:, 1]).max()) + index_nbytes}")
        return index

    # ---- object storage: whole-object GETs, prefetched ------------------------------
    def _key(self, shard_index: int) -> str:
        return self.array.metadata.chunk_key_encoding.encode_chunk_key((shard_index,) + (0,) * len(self.row_shape))

    def _object(self, shard_index: int) -> str:
        return f"{self._remote[1]}/{self._key(shard_index)}"

    def fetch_object(self, shard_index: int) -> bytes | None:
        """The whole shard object (None: absent), any other failure as the one-line ``damaged``."""
        fs, path = self._remote[0], self._object(shard_index)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - network, permissions: the same one-line report
            raise self._damaged(shard_index, f"cannot read {self._rel(path)}: {type(e).__name__}: {e}") from None

    def prefetch(self, shard_index: int) -> None:
        """Start fetching a shard object in the background (remote, direct arrays; else a no-op)."""
        limit = max(1, min(MAX_PREFETCH, PREFETCH_BYTES // max(1, self.rows * self.row_nbytes)))
        if (self._remote is None or not self.direct or shard_index in self._pending
                or len(self._pending) >= limit or not 0 <= shard_index * self.rows < self.num_samples):
            return
        self._pending[shard_index] = _pool().submit(self.fetch_object, shard_index)

    def _fetched(self, shard_index: int) -> bytes | None:
        fut = self._pending.pop(shard_index, None)
        return fut.result() if fut is not None else self.fetch_object(shard_index)

    def _check_remote(self, shard_index: int) -> None:
        path = self._object(shard_index)
        fs, n = self._remote[0], self._index_nbytes() if self._index_checked else 0
        try:
            size = int(fs.size(path))
            index = fs.cat_file(path, start=size - n) if n and size >= n else b""
        except FileNotFoundError:
            self._missing(shard_index, path)
            return
        except Exception as e:  # noqa: BLE001
            raise self._damaged(shard_index, f"cannot read {self._rel(path)}: {type(e).__name__}: {e}") from None
        if self._index_checked:
            self._check_index(index, size, shard_index, path)

    def _read_remote(self, shard_index: int, nrows: int, out: np.ndarray) -> bool:
        path = self._object(shard_index)
        data = self._fetched(shard_index)
        if data is None:
            self._missing(shard_index, path)
            return False
        n = self._index_nbytes()
        index = self._check_index(data[-n:] if len(data) >= n else b"", len(data), shard_index, path)
        if not self._in_order(index, nrows):
            return False
        view = out.reshape(-1).view(np.uint8)
        view[:] = np.frombuffer(data, np.uint8, count=view.nbytes)
        return True

    def bounds(self, shard_index: int) -> tuple[int, int]:
        lo = shard_index * self.rows
        return lo, min(self.num_samples, lo + self.rows)

    def read_into(self, shard_index: int, out: np.ndarray) -> None:
        """Fill ``out`` (shape ``(rows of this shard, *row_shape)``, C-contiguous) with the shard."""
        lo, hi = self.bounds(shard_index)
        if out.shape != (hi - lo, *self.row_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"shard {shard_index}: buffer {out.shape} {out.dtype} does not fit rows {lo}:{hi}")
        if self.direct and (self._read_remote(shard_index, hi - lo, out) if self._remote is not None
                            else self._read_direct(shard_index, hi - lo, out)):
            self.direct_reads += 1
            return
        self.check(shard_index)
        with store_read_error(self.array, shard_index):
            out[...] = self.array[lo:hi]
        self.zarr_reads += 1

    def read(self, shard_index: int) -> np.ndarray:
        lo, hi = self.bounds(shard_index)
        out = np.empty((hi - lo, *self.row_shape), self.dtype)
        self.read_into(shard_index, out)
        return out

    def map(self, shard_index: int) -> np.ndarray | None:
        """The shard's rows as a read-only array over a memory map of its file, or None.

        Nothing is copied: a reader touching only some rows (one view of a batch's
        samples) reads only those pages, and ``MADV_WILLNEED`` asks the kernel to
        start reading the whole shard in the background (so mapping the next window
        early is a read-ahead). None when the direct path is not possible for this
        shard (then use ``read``).
        """
        if not self.mappable:
            return None
        lo, hi = self.bounds(shard_index)
        path = self._shard_path(shard_index)
        try:
            with open(path, "rb", buffering=0) as f:
                if not self._layout_ok(f, hi - lo, shard_index, path):
                    return None
                mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except FileNotFoundError:
            self._missing(shard_index, path)
            return None
        except OSError as e:
            raise self._damaged(shard_index, f"cannot read {path}: {e.strerror or e}") from None
        if hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED)
        self.direct_reads += 1
        return np.frombuffer(mm, self.dtype, count=(hi - lo) * self.row_nbytes // self.dtype.itemsize).reshape(
            hi - lo, *self.row_shape)

    def _shard_path(self, shard_index: int) -> Path:
        return self._root / self.array.metadata.chunk_key_encoding.encode_chunk_key(
            (shard_index,) + (0,) * len(self.row_shape))

    def _layout_ok(self, f, nrows: int, shard_index: int, path: Path) -> bool:
        """True when the first ``nrows`` rows are C-order bytes from offset 0 (a damaged shard raises)."""
        return self._in_order(self._checked_index(f, shard_index, path), nrows)

    def _in_order(self, index: bytes, nrows: int) -> bool:
        """True when the index puts the inner chunks of the first ``nrows`` rows in C order from offset 0."""
        used_chunks = -(-nrows // self.chunk_rows)
        table = np.frombuffer(index, "<u8", count=2 * self.chunks_per_shard).reshape(-1, 2)[:used_chunks]
        expected = np.arange(used_chunks, dtype=np.uint64) * np.uint64(self.chunk_nbytes)
        # empty or reordered chunks: zarr knows how to assemble them
        return bool(np.array_equal(table[:, 0], expected) and np.all(table[:, 1] == self.chunk_nbytes))

    def _read_direct(self, shard_index: int, nrows: int, out: np.ndarray) -> bool:
        path = self._shard_path(shard_index)
        try:
            with open(path, "rb", buffering=0) as f:
                if not self._layout_ok(f, nrows, shard_index, path):
                    return False
                f.seek(0)
                view = memoryview(out.reshape(-1).view(np.uint8))
                if f.readinto(view) != view.nbytes:
                    raise self._damaged(shard_index, f"short read from shard file {self._rel(path)}")
                return True
        except FileNotFoundError:
            self._missing(shard_index, path)
            return False
        except OSError as e:
            raise self._damaged(shard_index, f"cannot read {path}: {e.strerror or e}") from None
