"""Preemption and one writer per run directory: the run-dir lock and the ranks' agreement on a stop.

Why its own module: both are about other processes (a second run on the same
directory, the other ranks of this run, the cluster's signals), not about the
step body; the ``Trainer`` calls these and stays about the loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.artifacts import DirLock
from fae_pipe.errors import StopSignals


# run directory -> the lock a Trainer of this process holds on it. A new Trainer on the same
# directory in the same process (a notebook, a test, a driver script) supersedes an earlier
# one that never reached finish(); another process is refused.
_RUN_LOCKS: dict[str, DirLock] = {}


def release(lock: DirLock | None, signals: StopSignals) -> None:
    signals.restore()
    if lock is not None:
        lock.release()
        for key, held in list(_RUN_LOCKS.items()):
            if held is lock:
                del _RUN_LOCKS[key]


def lock_run_dir(run_dir: Path, stage: str) -> DirLock:
    key = str(run_dir.resolve())
    earlier = _RUN_LOCKS.pop(key, None)
    if earlier is not None:
        earlier.release()
    lock = DirLock(run_dir / ".lock", f"run directory {run_dir}", f"another {stage} running?").acquire()
    _RUN_LOCKS[key] = lock
    return lock


def stop_group(world: int):
    """The process group the stop flag is reduced on: None (default group) when it is gloo, else a gloo group.

    A collective: every rank must call it (the Trainer does, in its constructor).
    """
    import torch.distributed as dist

    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def agree_on_stop(local: int, world: int, group=None) -> int:
    """The largest stop signal number any process received (0: none), the same on every rank.

    One all-reduce of a CPU int32 (host-side, no device sync) when ``world > 1``.
    """
    if world <= 1:
        return local
    import torch.distributed as dist

    flag = torch.tensor([local], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())
