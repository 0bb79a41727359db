"""What a training run leaves for people and for DVC: the step CSVs, Accelerate trackers, metrics JSON, rank records.

- ``StepLog``: one CSV row per logged step, kept open (line-buffered) for the
  whole run; on resume, rows after the resume step are dropped, so the CSV of an
  interrupted-then-resumed run equals that of an uninterrupted one. DVC plots it.
- Trackers: TensorBoard (default), W&B, MLflow or Aim through Accelerate's
  ``log_with``, when the package is installed; otherwise a note and the CSV only.
- Rank records: every rank writes what it saw and a checksum of its weights
  (equal across ranks iff the data-parallel replicas agree bit for bit).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch

from fae_pipe.artifacts import atomic_write, atomic_write_json

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}


class StepLog:
    """Append-only CSV of ``step`` + ``fields``, truncated after ``resume_step`` when resuming."""

    def __init__(self, path: str | Path, fields: list[str], resume_step: int | None = None):
        self.path = Path(path)
        self.fields = ["step", *fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            atomic_write(self.path, lambda tmp: _write_rows(tmp, [self.fields]))
        else:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", newline="", buffering=1)
        self._writer = csv.writer(self._fh)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        kept = [rows[0] if rows else self.fields] + [r for r in rows[1:] if r and int(r[0]) <= step]
        atomic_write(self.path, lambda tmp: _write_rows(tmp, kept))

    def log(self, step: int, **values) -> None:
        self._writer.writerow([step] + [_fmt(values.get(k)) for k in self.fields[1:]])

    def close(self) -> None:
        self._fh.close()


def _write_rows(path: Path, rows: list) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def available_tracker(name: str, stage: str) -> str | None:
    """``name`` when its package imports, else None (with a note); ``none`` disables trackers."""
    if name == "none":
        return None
    import importlib.util

    if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
        print(f"{stage}: note: train.log_with = {name!r} but the {TRACKER_PACKAGES[name]} package is not "
              "installed; logging to the CSV files only", flush=True)
        return None
    return name


def tracker_config(section: dict, prefix: str) -> dict:
    """A section's settings as flat scalar key/values (what every tracker accepts as run config)."""
    out = {}
    for k, v in section.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(tracker_config(v, key))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Write a metrics JSON for DVC atomically."""
    atomic_write_json(path, metrics, sort_keys=True)


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
    record = {"rank": rank, "world_size": world, "step": step, "samples_this_run": samples,
              "param_sha256": parameter_checksum(module)}
    return atomic_write_json(Path(run_dir) / "ranks" / f"rank-{rank}.json", record)


def final_loss(csv_path: str | Path, window: int = 100) -> dict:
    """Mean of the last ``window`` logged losses of a StepLog CSV (``{}`` when it has none)."""
    with open(csv_path, newline="") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")]
    tail = losses[-window:]
    return {"final_loss": sum(tail) / len(tail), "final_loss_steps": len(tail)} if tail else {}
