"""Named wall-clock phases of the plumbing (index load, scan, records, scheduling), for ``bench scale``.

Why: the scale rehearsal (``fae-pipe bench scale``) has to say how much of each stage's
wall time is spent outside the model, in every process of the stage (coordinator and
dask workers), and how that grows with the sample count. Stages cannot return that
across a subprocess boundary, so when the environment variable ``FAE_PIPE_PHASES``
names a file, ``phase(name)`` appends one JSON line ``{"phase", "pid", "seconds"}``
to it per timed block (small ``O_APPEND`` writes from several processes do not
interleave). Unset (every normal run), ``phase`` costs one environment lookup.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

ENV = "FAE_PIPE_PHASES"


@contextmanager
def phase(name: str):
    """Time the block and append it to ``$FAE_PIPE_PHASES`` when that is set."""
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        line = json.dumps({"phase": name, "pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 6)})
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def read_phases(path) -> dict[str, dict]:
    """``{phase: {"seconds": total over processes, "count": blocks, "processes": distinct pids}}``."""
    out: dict[str, dict] = {}
    pids: dict[str, set] = {}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a process killed mid-write leaves a torn last line
            continue
        entry = out.setdefault(rec["phase"], {"seconds": 0.0, "count": 0, "processes": 0})
        entry["seconds"] += float(rec["seconds"])
        entry["count"] += 1
        pids.setdefault(rec["phase"], set()).add(rec["pid"])
    for name, entry in out.items():
        entry["processes"] = len(pids[name])
        entry["seconds"] = round(entry["seconds"], 3)
    return out
