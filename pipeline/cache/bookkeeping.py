"""Writer bookkeeping beside a zarr store: the writer lock and per-shard completion records.

Progress is tracked with one small JSON file per storage shard
(``<store>/.fae/done/shard-00012.json``), written atomically after the shard's data,
never in zarr attrs: attrs are cached per process and concurrent updates lose writes.
The lock (``<store>/.fae/lock``) keeps a second coordinator from writing the same
store; one left by a killed process on this host is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from fae_pipe.artifacts import atomic_write_json
from fae_pipe.cache.schema import BOOKKEEPING_DIR
from fae_pipe.errors import UserError


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


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class StoreLock:
    """Exclusive writer lock: a file created with O_CREAT|O_EXCL holding host and pid."""

    def __init__(self, store_path):
        self.store = Path(store_path)
        self.path = bookkeeping_dir(store_path) / "lock"
        self.held = False

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        return True

    def acquire(self) -> "StoreLock":
        if self._try_create():
            self.held = True
            return self
        try:
            owner = json.loads(self.path.read_text())
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"store {self.store} has an unreadable lock file; if no other writer runs, "
                            f"remove {self.path}") from None
        if host == socket.gethostname() and not _pid_alive(pid):
            print(f"WARNING: taking over the lock of store {self.store} left by dead pid {pid}", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            if self._try_create():
                self.held = True
                return self
        raise UserError(f"store {self.store} is locked by pid {pid} on host {host} (another extract running?); "
                        f"if that process is dead, remove {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
