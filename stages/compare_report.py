"""``fae-pipe compare-report RUN...``: one table of the generators trained side by side on one cache.

Why a table beside the plots: the curves (``compare/dvc.yaml``'s plots, FD-DINOv2
against steps and against training seconds) show *how* each variant learns; the
table answers the paper's question in numbers: at equal steps and batch, which
generator input reaches which FD-DINOv2, how fast, and at what cost per step. Each
row comes from one run directory's ``eval.csv`` (the quality curve ``train-sit`` writes
with ``sit.eval_samples`` > 0) and the export's record (``sit.safetensors``: input,
REPA, shift) plus the run's ``sit.json`` metrics (steps/s).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fae_pipe.artifacts import atomic_write_json
from fae_pipe.errors import UserError
from fae_pipe.training.sit_export import SIT_FILE, load_sit_export

COLUMNS = ("variant", "input", "repa_weight", "steps", "fd_dinov2_final", "fd_dinov2_best", "best_step",
           "train_seconds", "steps_per_second")


def curve(run: Path) -> list[dict]:
    """The run's eval.csv rows as numbers (step, train_seconds, fd_dinov2, ...)."""
    path = run / "eval.csv"
    if not path.is_file():
        raise UserError(f"{path} is missing: train the variant with sit.eval_samples > 0 (the quality curve)")
    with open(path, newline="") as fh:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
    if not rows:
        raise UserError(f"{path} has no evaluation rows; raise sit.train.steps or lower sit.train.eval_every")
    return rows


def row(run: Path, metrics_dir: Path | None) -> dict:
    points = curve(run)
    export = load_sit_export(run / SIT_FILE)
    cfg_sit = (export.get("config") or {}).get("sit", {})
    best = min(points, key=lambda r: r.get("fd_dinov2", math.inf))
    summary = {}
    if metrics_dir is not None and (metrics_dir / "sit.json").is_file():
        summary = json.loads((metrics_dir / "sit.json").read_text())
    return {"variant": run.name, "input": export["transport"].get("generator_input", "latents"),
            "repa_weight": float(cfg_sit.get("repa_weight", 0.0)), "steps": int(points[-1]["step"]),
            "fd_dinov2_final": points[-1].get("fd_dinov2"), "fd_dinov2_best": best.get("fd_dinov2"),
            "best_step": int(best["step"]), "train_seconds": points[-1].get("train_seconds"),
            "steps_per_second": summary.get("steps_per_second")}


def run(runs: list[str], out: str, metrics_root: str | None = None) -> dict:
    """Rows for ``runs`` (run directories) into ``out`` (JSON: {variant: row}); prints a markdown table."""
    if not runs:
        raise UserError("compare-report: give at least one run directory (runs/compare/<variant>)")
    rows = [row(Path(r), Path(metrics_root) / Path(r).name if metrics_root else None) for r in runs]
    table = {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}
    atomic_write_json(out, table)

    def cell(v):
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |")
    print(f"compare-report: {len(rows)} variant(s) -> {out}")
    return table
