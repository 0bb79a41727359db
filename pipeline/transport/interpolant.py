"""The linear interpolant between data and noise, and what a velocity implies.

Convention (the FAE paper's): ``x_t = (1 - t) x0 + t eps`` with ``x0`` the data,
``eps ~ N(0, I)``, ``t = 0`` data and ``t = 1`` pure noise. The network predicts the
velocity ``v = d x_t / dt = eps - x0``; at a point ``x_t`` the loss-optimal prediction
is the conditional mean ``E[eps - x0 | x_t]``.

Because the path is linear, a velocity estimate fixes estimates of everything else:
from ``x_t = x0 + t v`` and ``x_t = eps - (1 - t) v``,

    x0_hat  = x_t - t v
    eps_hat = x_t + (1 - t) v
    score   = grad log p_t(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t) v) / t

The score identity holds because ``x_t | x0 ~ N((1 - t) x0, t^2 I)``, so the
conditional score is ``-(x_t - (1 - t) x0) / t^2 = -eps / t``, and averaging over
``x0 | x_t`` gives the marginal score (Tweedie). The x0 and eps conversions are exact
at both ends (``t = 0``: x0_hat = x_t; ``t = 1``: eps_hat = x_t). The score is
singular as ``t -> 0`` (the data distribution has no smooth density in general, and
any error in ``v`` is amplified by ``1 / t``), so ``velocity_to_score`` divides by
``max(t, t_floor)``; at ``t = 1`` it is exactly ``-x_t``. Samplers in this package
never need the bare score: the SDE uses ``t * score = -eps_hat``, which is finite
everywhere (see ``samplers.py``).
"""

from __future__ import annotations

import torch


def expand_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample time (B,) (or a scalar) to broadcast against ``like`` (B, ...).

    Every formula here is elementwise in time; keeping t as (B,) at the API and
    broadcasting in one place avoids shape bugs in callers.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point on the path at time t: ``(1 - t) x0 + t eps`` (t = 0 data, t = 1 noise)."""
    tt = expand_time(t, x0)
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Regression target of the network: ``d x_t / dt = eps - x0`` (independent of t)."""
    return eps - x0


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Data prediction implied by a velocity: ``x_t - t v`` (exact for every t in [0, 1])."""
    return x_t - expand_time(t, x_t) * v


def velocity_to_eps(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction implied by a velocity: ``x_t + (1 - t) v`` (exact for every t)."""
    return x_t + (1 - expand_time(t, x_t)) * v


def velocity_to_score(
    x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_floor: float = 1e-4
) -> torch.Tensor:
    """Score of the marginal p_t implied by a velocity: ``-(x_t + (1 - t) v) / t``.

    The division uses ``max(t, t_floor)`` because the score blows up as t -> 0; callers
    that need a bounded quantity near the data end should use ``-velocity_to_eps``
    (``t`` times the score) instead.
    """
    tt = expand_time(t, x_t)
    return -velocity_to_eps(x_t, v, t) / torch.clamp(tt, min=t_floor)


def x0_eps_to_velocity(x0_hat: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """Velocity from a pair of data/noise predictions (inverse of the two conversions)."""
    return eps_hat - x0_hat
