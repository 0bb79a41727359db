"""Start a training run from scratch in a run directory that may hold an older run's checkpoints.

Checkpoints are pruned by step number, so a fresh run's early checkpoints would
be pruned in favour of a previous run's later ones and ``--resume`` would pick the
stale run. A fresh start therefore removes the old checkpoints (and says so).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fae_pipe.training.checkpoint import checkpoint_dir, list_checkpoints


def clear_checkpoints(run_dir: str | Path, stage: str) -> int:
    """Delete the checkpoints (+ sidecars and the ``latest`` marker) of ``run_dir``; return how many."""
    old = list_checkpoints(run_dir)
    for path in old:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
    (checkpoint_dir(run_dir) / "latest").unlink(missing_ok=True)
    if old:
        print(f"{stage}: fresh run: removed {len(old)} checkpoint(s) of a previous run in {checkpoint_dir(run_dir)}",
              file=sys.stderr)
    return len(old)
