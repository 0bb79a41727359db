"""Exponential moving average of model weights (float32 shadow copy)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow model updated as ``ema = decay * ema + (1 - decay) * param`` after each step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused ``lerp`` over all parameters (a per-tensor loop costs a kernel launch per tensor)."""
        shadow = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
