"""The flow-matching training loss: mean squared error of the predicted velocity.

One function, so that train-sit, evaluation and tests all compute the same thing:
draw t (distribution, then the shared time shift), draw noise, build ``x_t`` on the
linear path, ask the model for the velocity and compare with ``eps - x0``. The mean
is over all elements; the per-sample vector (mean over the non-batch dimensions) is
returned as well for per-t diagnostics, and the t that were used come back too.
With ``hidden_at=k`` the model is called as ``model(x_t, t, y, hidden_at=k)`` and must
return ``(velocity, hidden)``; the hidden state comes back in the result, still in the
graph, so a caller adds REPA's alignment loss on the same forward pass.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fae_pipe.errors import UserError
from fae_pipe.transport.interpolant import interpolate, velocity_target
from fae_pipe.transport.timesteps import sample_t, shift_t

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class TransportLoss(NamedTuple):
    """``loss``: scalar mean over all elements; ``per_sample``: (B,); ``t``: (B,) used;
    ``hidden``: the model's hidden state when ``hidden_at`` was given, else None."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    t: torch.Tensor
    hidden: torch.Tensor | None = None


def training_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    time_dist: str = "uniform",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    shift: float = 1.0,
    hidden_at: int | None = None,
) -> TransportLoss:
    """Velocity MSE for a batch of data ``x0`` (B, ...) with labels ``y`` (B,) or None.

    ``noise`` and ``t`` may be given (e.g. to reuse draws across models); otherwise
    they are drawn from ``generator``. A given ``t`` is used as is (no shift); drawn
    times are shifted with factor ``shift`` (``timesteps.shift_t``). Noise is drawn on
    the generator's device and moved to x0's device.
    """
    batch = x0.shape[0]
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        noise = noise.to(x0.device)
    elif noise.shape != x0.shape:
        raise UserError(f"noise shape {tuple(noise.shape)} does not match data shape {tuple(x0.shape)}")
    if t is None:
        t = sample_t(batch, generator, time_dist, time_mean, time_std, device=x0.device, dtype=x0.dtype)
        t = shift_t(t, shift)
    elif t.shape != (batch,):
        raise UserError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    x_t = interpolate(x0, noise, t)
    hidden = None
    if hidden_at is None:
        pred = model(x_t, t, y)
    else:
        pred, hidden = model(x_t, t, y, hidden_at=hidden_at)
    if pred.shape != x0.shape:
        raise UserError(
            f"model output shape {tuple(pred.shape)} does not match its input shape {tuple(x0.shape)}"
        )
    sq = (pred - velocity_target(x0, noise)).square()
    per_sample = sq.reshape(batch, -1).mean(dim=1)
    return TransportLoss(loss=sq.mean(), per_sample=per_sample, t=t, hidden=hidden)
