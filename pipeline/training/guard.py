"""Stop a run on a non-finite loss with a message that names the step and the last good checkpoint."""

from __future__ import annotations

import math

import torch

from fae_pipe.errors import UserError
from fae_pipe.training.checkpoint import latest_checkpoint


def check_finite(loss: torch.Tensor | float, step: int, stage: str, run_dir, accelerator=None) -> None:
    """Raise ``UserError`` when ``loss`` is NaN/inf on any process (all ranks agree)."""
    value = torch.as_tensor(loss, dtype=torch.float32).detach().reshape(1)
    if accelerator is not None and accelerator.num_processes > 1:
        value = accelerator.gather(value.to(accelerator.device)).cpu()
    bad = [v for v in value.tolist() if not math.isfinite(v)]
    if not bad:
        return
    last = latest_checkpoint(run_dir)
    kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
    raise UserError(f"{stage}: non-finite loss ({bad[0]}) at step {step}; training stopped, {kept}")
