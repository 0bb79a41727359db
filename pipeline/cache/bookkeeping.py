"""Writer bookkeeping beside a zarr store: the writer lock and per-shard completion records.

Progress is tracked with one small JSON object per storage shard
(``<store>/.fae/done/shard-00012.json``), written after the shard's data, never in
zarr attrs: attrs are cached per process and concurrent updates lose writes. The lock
(``<store>/.fae/lock``) keeps a second coordinator from writing the same store.

One interface, two implementations, chosen by where the store lives
(``fae_pipe.cache.location.StoreLocation``):

- **local directory**: records are written atomically (temp file + ``os.replace``);
  the lock is ``fae_pipe.artifacts.DirLock`` (a hard-linked file naming host and pid;
  one left by a dead pid on this host is taken over with a warning).
- **object storage** (``s3://``, ``gs://``...): a record is one PUT, which object
  stores make visible whole or not at all (no temp objects, nothing to rename); the
  lock is ``fae_pipe.cache.object_lock.ObjectLock``: conditional create
  (``If-None-Match: *``) plus a renewed lease, so a dead holder is taken over after
  its lease expires. Records are read in one concurrent batch (``read_records``):
  one GET per shard, sequentially, would dominate a resume of thousands of shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from fae_pipe.artifacts import DirLock, atomic_write_json
from fae_pipe.cache.location import StoreLocation, lease_seconds
from fae_pipe.cache.object_lock import ObjectLock
from fae_pipe.cache.schema import BOOKKEEPING_DIR

DONE = f"{BOOKKEEPING_DIR}/done"
LOCK = f"{BOOKKEEPING_DIR}/lock"

def bookkeeping_dir(store_path) -> Path:
    return Path(store_path) / BOOKKEEPING_DIR


def record_key(shard_index: int) -> str:
    return f"{DONE}/shard-{shard_index:05d}.json"


def record_path(store_path, shard_index: int) -> Path:
    """The record file of a local store."""
    return Path(store_path) / record_key(shard_index)


def write_record(store_path, shard_index: int, record: dict) -> None:
    loc = StoreLocation.of(store_path)
    if loc.is_local:
        atomic_write_json(record_path(loc.local, shard_index), record, indent=None, sort_keys=True)
    else:
        loc.fs.pipe_file(loc.path(record_key(shard_index)), json.dumps(record, sort_keys=True).encode())


def _parse(data: bytes | None) -> dict | None:
    try:
        record = json.loads(data) if data is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_record(store_path, shard_index: int) -> dict | None:
    """The completion record of a shard, or None when absent or unreadable."""
    loc = StoreLocation.of(store_path)
    try:
        return _parse(loc.read_bytes(record_key(shard_index)))
    except FileNotFoundError:
        return None


def read_records(store_path, shard_indices) -> dict[int, dict | None]:
    """The records of many shards (None: absent or unreadable); one listing and one batched
    read on object storage."""
    loc = StoreLocation.of(store_path)
    wanted = [int(i) for i in shard_indices]
    if loc.is_local:
        return {i: read_record(loc.local, i) for i in wanted}
    present = set(loc.list(DONE))
    keys = {i: record_key(i) for i in wanted if record_key(i) in present}
    if not keys:
        return dict.fromkeys(wanted)
    data = loc.fs.cat([loc.path(k) for k in keys.values()], on_error="return")
    by_path = {p.rstrip("/"): v for p, v in data.items()}
    out = {}
    for i in wanted:
        raw = by_path.get(loc.path(keys[i])) if i in keys else None
        out[i] = _parse(raw) if isinstance(raw, bytes) else None
    return out


def clear_records(store_path) -> None:
    """Remove every completion record (a store being replaced)."""
    StoreLocation.of(store_path).remove(DONE, recursive=True)


def remove_stray_files(store_path) -> int:
    """Delete temp files a killed writer may leave: zarr's ``*.partial`` and record ``*.tmp``.

    Object stores have none: an interrupted PUT leaves no object behind.
    """
    loc = StoreLocation.of(store_path)
    if not loc.is_local:
        return 0
    removed = 0
    for pattern in ("*.partial", "*.tmp"):
        for stray in loc.local.rglob(pattern):
            if stray.is_file():
                stray.unlink(missing_ok=True)
                removed += 1
    return removed


_HELD: list["StoreLock"] = []  # the store locks this process holds (``check_held_locks``)


def check_held_locks() -> None:
    """Raise the one-line error if a store lock this process holds was lost (its lease taken over);
    ``store_writer.finalize`` calls it, so a run that lost its store never marks it complete."""
    for lock in list(_HELD):
        lock.check()


class StoreLock:
    """The writer lock of a store, ``<store>/.fae/lock``: ``DirLock`` locally, ``ObjectLock`` on a bucket.

    ``check()`` raises when an object-store lease was lost (a no-op for local locks,
    which cannot be lost while their holder lives).
    """

    def __init__(self, store_path):
        loc = StoreLocation.of(store_path)
        self.store = loc.local if loc.is_local else loc.url
        what, hint = f"store {self.store}", "another extract running?"
        if loc.is_local:
            self.lock: DirLock | ObjectLock = DirLock(loc.local / LOCK, what, hint)
        else:
            self.lock = ObjectLock(loc, LOCK, what, hint, lease_seconds())

    @property
    def held(self) -> bool:
        return self.lock.held

    def acquire(self) -> "StoreLock":
        self.lock.acquire()
        _HELD.append(self)
        return self

    def check(self) -> None:
        if isinstance(self.lock, ObjectLock):
            self.lock.check()

    def release(self) -> None:
        if self in _HELD:
            _HELD.remove(self)
        self.lock.release()

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
