"""Per-step logs: a CSV for DVC plots (resume-safe) and TensorBoard when it is installed."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


class StepLog:
    """Appends one CSV row per logged step; on resume, rows after the resume step are dropped.

    Dropping the rows a killed run wrote after its last checkpoint makes the CSV of
    an interrupted-then-resumed run equal to that of an uninterrupted one.
    """

    def __init__(self, path: str | Path, fields: list[str], resume_step: int | None = None, tensorboard_dir=None):
        self.path = Path(path)
        self.fields = ["step", *fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.fields)
        else:
            self._truncate_after(resume_step)
        self.tb = _tensorboard(tensorboard_dir)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, **values: float) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([step] + [_fmt(values.get(k)) for k in self.fields[1:]])
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def _tensorboard(log_dir):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Write a metrics JSON for DVC atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
