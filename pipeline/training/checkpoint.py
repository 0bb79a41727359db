"""The training checkpoint format, and which checkpoint a run continues from.

A checkpoint is a dict of tensors and plain types (str, int, float, bool, None,
lists, tuples, dicts) saved with ``torch.save`` and loaded with
``weights_only=True``, so loading one never runs code; it goes to
``<run>/checkpoints/step-<9 digits>.pt``: ``step``, ``models`` (name -> state
dict), ``ema`` (name -> state dict, for the models that keep one),
``optimizers`` and ``schedulers`` (name -> state dict), ``rng``
(torch/CUDA/numpy/python states as tensors and lists, ``capture_rng``), ``config`` (the resolved config dict) and
``extra`` (what the stage needs to refuse a mismatching resume: model names,
latent statistics, fingerprints). A JSON sidecar holds step + config so
``--resume auto`` decides without unpickling, and ``checkpoints/latest`` names
the newest file, so a run killed while saving resumes from the previous one.
Checkpoints are pruned by step number, so a fresh run first removes an older
run's checkpoints (else ``--resume`` could pick the stale run).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from fae_pipe.artifacts import atomic_torch_save, atomic_write_json, atomic_write_text, load_payload
from fae_pipe.errors import UserError

_NAME = re.compile(r"^step-(\d{9})\.pt$")

# Loop keys that may change between a run and its resumption without making it another run.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "eval_every", "eval_images", "log_every", "log_with"}


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def capture_rng() -> dict:
    """The global RNG states as tensors and plain types, so checkpoints load with ``weights_only=True``.

    numpy's ``get_state()`` tuple becomes a dict with its key array as a uint32
    tensor; python's ``random.getstate()`` becomes a list of ints.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, np.uint32).copy()),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": int(version), "internal": [int(v) for v in internal],
                        "gauss_next": None if gauss_next is None else float(gauss_next)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the global RNG states from ``capture_rng()``'s dict."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, payload: dict, keep_last: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` and prune all but the newest ``keep_last``."""
    ckdir = checkpoint_dir(run_dir)
    path = atomic_torch_save({**payload, "step": step}, ckdir / f"step-{step:09d}.pt", fsync=True)
    atomic_write_json(path.with_suffix(".json"), {"step": step, "config": payload.get("config")}, indent=None)
    atomic_write_text(ckdir / "latest", path.name + "\n")
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


def _identity(section: dict | None) -> dict:
    """A section's settings minus the keys a resumed run may change (nested groups included)."""
    out = {}
    for k, v in (section or {}).items():
        if isinstance(v, dict):
            out[k] = _identity(v)
        elif k not in RESUMABLE_CHANGES:
            out[k] = v
    return out


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
        saved = (json.loads(sidecar.read_text()).get("config") or {}).get(section) if sidecar.is_file() else None
        if section is not None and _identity(saved) != _identity(current):
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
    """Load a checkpoint written by ``save_checkpoint``; anything else is a one-line error.

    ``weights_only=True``: a file holding anything but tensors and plain types (a crafted
    pickle, or a checkpoint of a release that pickled numpy RNG state) is refused unread.
    """
    try:
        ck = load_payload(path, None, "train-*", what="checkpoint")
    except UserError as e:
        if "refused" not in str(e):
            raise
        raise UserError(f"{e} (a checkpoint of a release before safe loading, which pickled numpy RNG "
                        "state, is refused too: start a fresh run without --resume)") from None
    missing = [k for k in ("step", "models", "optimizers", "schedulers", "rng") if k not in ck]
    if missing:
        raise UserError(f"checkpoint '{path}' lacks {', '.join(missing)}: it was written by another fae-pipe "
                        "version; start a fresh run (without --resume)")
    return ck


def check_finite_weights(module: torch.nn.Module, step: int, stage: str, run_dir) -> None:
    """Raise ``UserError`` naming the first non-finite parameter and the last good checkpoint.

    A finite loss can still leave non-finite weights (an overflowing update), so the
    weights are checked right before every save: a checkpoint is always worth resuming.
    """
    for name, p in module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise UserError(f"{stage}: non-finite weights ({name}) at step {step}; training stopped, "
                            f"{last_good(run_dir)}")


def last_good(run_dir) -> str:
    last = latest_checkpoint(run_dir)
    return f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
