"""Refuse to save non-finite weights: a checkpoint must always be a state worth resuming from.

``guard.check_finite`` stops on a NaN/inf *loss*; weights can still turn
non-finite with a finite loss (an overflowing gradient step). Checking the
parameters right before every save keeps the "last good checkpoint" promise.
"""

from __future__ import annotations

import torch

from fae_pipe.errors import UserError
from fae_pipe.training.checkpoint import latest_checkpoint


def check_finite_weights(module: torch.nn.Module, step: int, stage: str, run_dir) -> None:
    """Raise ``UserError`` naming the first non-finite parameter and the last good checkpoint."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            last = latest_checkpoint(run_dir)
            kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise UserError(f"{stage}: non-finite weights ({name}) at step {step}; training stopped, {kept}")
