"""Writer bookkeeping beside a zarr store: the writer lock and per-shard completion records.

Progress is tracked with one small JSON file per storage shard
(``<store>/.fae/done/shard-00012.json``), written atomically after the shard's data,
never in zarr attrs: attrs are cached per process and concurrent updates lose writes.
The lock (``<store>/.fae/lock``) keeps a second coordinator from writing the same
store; one left by a killed process on this host is taken over with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

from fae_pipe.artifacts import DirLock, atomic_write_json
from fae_pipe.cache.schema import BOOKKEEPING_DIR


def bookkeeping_dir(store_path) -> Path:
    return Path(store_path) / BOOKKEEPING_DIR


def record_path(store_path, shard_index: int) -> Path:
    return bookkeeping_dir(store_path) / "done" / f"shard-{shard_index:05d}.json"


def write_record(store_path, shard_index: int, record: dict) -> None:
    atomic_write_json(record_path(store_path, shard_index), record, indent=None, sort_keys=True)


def read_record(store_path, shard_index: int) -> dict | None:
    """The completion record of a shard, or None when absent or unreadable."""
    path = record_path(store_path, shard_index)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def remove_stray_files(store_path) -> int:
    """Delete temp files a killed writer may leave: zarr's ``*.partial`` and record ``*.tmp``."""
    root = Path(store_path)
    removed = 0
    for pattern in ("*.partial", "*.tmp"):
        for stray in root.rglob(pattern):
            if stray.is_file():
                stray.unlink(missing_ok=True)
                removed += 1
    return removed


class StoreLock(DirLock):
    """The writer lock of a store, ``<store>/.fae/lock`` (``fae_pipe.artifacts.DirLock``)."""

    def __init__(self, store_path):
        self.store = Path(store_path)
        super().__init__(bookkeeping_dir(store_path) / "lock", f"store {self.store}", "another extract running?")
