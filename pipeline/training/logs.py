"""What a training run leaves for people and for DVC: the step CSVs, Accelerate trackers, metrics JSON, rank records.

- ``StepLog``: one CSV row per logged step, kept open (line-buffered) for the
  whole run; on resume, rows after the resume step are dropped, so the CSV of an
  interrupted-then-resumed run equals that of an uninterrupted one. DVC plots it.
- ``LogWindow``: what a row averages, held on the device between rows.
- Trackers: TensorBoard (default), W&B, MLflow or Aim through Accelerate's
  ``log_with``, when the package is installed; otherwise a note and the CSV only.
- Rank records: every rank writes what it saw and a checksum of its weights
  (equal across ranks iff the data-parallel replicas agree bit for bit).
"""

from __future__ import annotations

import csv
import hashlib
import time
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


class LogWindow:
    """The steps since the last log row, kept on the device until the row is due.

    Tensors are summed on the device and averaged when the window closes; plain
    numbers (epoch, ...) keep their last value. The first non-finite step of the
    window is remembered on the device too (``flag``), so nothing here syncs with the
    host until ``close``: one gather of every value for all ranks.
    """

    def __init__(self, device, start_step: int):
        self.device = device
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_loss = torch.zeros((), device=device)
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.last: dict = {}
        self.start, self.t0 = step, time.perf_counter()

    def add(self, **values) -> None:
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
                self.counts[k] = self.counts.get(k, 0) + 1
            elif v is not None:
                self.last[k] = v

    def flag(self, bad: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        """Remember ``step`` (1-based) and its loss if ``bad`` and it is the first bad one."""
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def pending(self) -> bool:
        return bool(self.sums or self.last)

    def close(self, step: int, gather=None) -> tuple[dict, tuple[int, float] | None, int, float]:
        """(row of window means, first (step, loss) that was non-finite on any rank or None, steps, seconds)."""
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] / self.counts[k] for k in keys]
                             + [self._bad_step.float(), self._bad_loss]).reshape(1, -1)
        ranks = (gather(packed) if gather is not None else packed).tolist()  # (world, K + 2)
        row = dict(self.last, **{k: sum(r[i] for r in ranks) / len(ranks) for i, k in enumerate(keys)})
        bad = min(((int(r[-2]), r[-1]) for r in ranks if r[-2] >= 0), default=None)
        steps, seconds = step - self.start, time.perf_counter() - self.t0
        self._reset(step)
        return row, bad, steps, seconds


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
