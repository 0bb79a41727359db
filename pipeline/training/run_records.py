"""Small records a training run leaves for people and tests: per-rank proof of work, final loss.

Why: "both processes took part and agree" should be checkable after the fact,
without a debugger: every rank writes what it saw and a checksum of its weights
(equal across ranks iff the data-parallel replicas agree bit for bit). The final
loss of a run is read back from its resume-safe CSV so a resumed run reports the
same number as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch


def parameter_checksum(module: torch.nn.Module) -> str:
    """sha256 over the state dict's names and bytes, in order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def clear_rank_records(run_dir: str | Path) -> None:
    """Remove the records of an earlier run (which may have had more ranks)."""
    for stale in (Path(run_dir) / "ranks").glob("rank-*.json"):
        stale.unlink()


def write_rank_record(run_dir: str | Path, rank: int, world: int, step: int, samples: int,
                      module: torch.nn.Module) -> Path:
    """``<run>/ranks/rank-<r>.json``: rank, world size, last step, samples this process saw, weight checksum."""
    out = Path(run_dir) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "world_size": world, "step": step, "samples_this_run": samples,
              "param_sha256": parameter_checksum(module)}
    path = out / f"rank-{rank}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def final_loss(csv_path: str | Path, window: int = 100) -> dict:
    """Mean of the last ``window`` losses of a StepLog CSV (``{}`` when it has none)."""
    with open(csv_path, newline="") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")]
    tail = losses[-window:]
    return {"final_loss": sum(tail) / len(tail), "final_loss_steps": len(tail)} if tail else {}
