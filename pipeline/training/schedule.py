"""Learning-rate schedules: linear warm-up, then cosine decay to zero or constant."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: Optimizer, warmup: int, total: int, kind: str) -> LambdaLR:
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}")
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, kind))
