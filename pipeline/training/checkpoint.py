"""Checkpoints every loop shares: one file per step, written atomically, newest N kept.

A checkpoint is a plain dict saved with ``torch.save``: ``step``, ``model``,
``ema`` (or None), ``optimizer``, ``scheduler``, ``rng`` (torch/CUDA/numpy/python
states), ``config`` (the resolved config dict) and ``extra`` (stage-specific:
latent statistics, fingerprints). ``checkpoints/latest`` names the newest file,
so a run killed while saving still resumes from the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from fae_pipe.errors import UserError

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, payload: dict, keep_last: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` and prune all but the newest ``keep_last``."""
    ckdir = checkpoint_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step-{step:09d}.pt"
    tmp = path.with_name(path.name + ".partial")
    torch.save({**payload, "step": step}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if "config" in payload:
        _atomic_write_text(path.with_suffix(".json"), json.dumps({"step": step, "config": payload["config"]}))
    _atomic_write_text(ckdir / "latest", path.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    ckdir = checkpoint_dir(run_dir)
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckdir = checkpoint_dir(run_dir)
    marker = ckdir / "latest"
    if marker.is_file():
        p = ckdir / marker.read_text().strip()
        if p.is_file():
            return p
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# Keys that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "eval_every", "eval_images"}


def resolve_resume(run_dir: str | Path, resume: str | None, section: str | None = None,
                   current: dict | None = None) -> Path | None:
    """``None`` -> fresh run; ``"latest"`` -> newest checkpoint of ``run_dir``; else a path.

    ``"auto"`` (what ``dvc repro`` uses) resumes from the newest checkpoint only when
    it was made with the same ``section`` settings as ``current`` (up to
    ``RESUMABLE_CHANGES``); otherwise the run starts fresh and says why.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            return None
        sidecar = found.with_suffix(".json")
        saved = json.loads(sidecar.read_text()).get("config", {}).get(section) if sidecar.is_file() else None
        strip = lambda d: {k: v for k, v in (d or {}).items() if k not in RESUMABLE_CHANGES}  # noqa: E731
        if section is not None and strip(saved) != strip(current):
            print(f"resume auto: {found} was made with other '{section}' settings; starting a fresh run")
            return None
        return found
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"--resume: no checkpoint in '{checkpoint_dir(run_dir)}'; run without --resume to start")
        return found
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: checkpoint file '{path}' not found")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (trusted files: full unpickling)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"checkpoint '{path}' cannot be read ({type(e).__name__}): pass a file written by fae-pipe") from None


def file_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes: how stores and checkpoints name their sources."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()
