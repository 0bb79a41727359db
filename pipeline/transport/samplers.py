"""Turn noise into data by integrating the learned velocity from t = 1 to t = 0.

One entry point, ``sample``, with four methods over the same shifted time grid
(``timesteps.time_grid``, the shift shared with training):

* ``"euler"``: ``x <- x - h v(x, t)``; one model call per step (the paper's CFG sampler).
* ``"heun"``: Euler predictor + trapezoid corrector; two calls per step, 2nd order.
* ``"dopri5"``: adaptive Dormand-Prince through torchdiffeq (optional dependency,
  imported only here). Accuracy is set by ``rtol``/``atol``; ``steps`` and ``shift``
  do not change the solution (only the fixed-grid methods use them).
* ``"sde"``: Euler-Maruyama on the reverse-time SDE with the same marginals as the
  ODE. For a diffusion coefficient g(t), going from t to t - h,

      x <- x - h [v - (g^2 / 2) score] + g sqrt(h) z,   z ~ N(0, I).

  This repo takes g(t)^2 = 2 lam t (lam = ``diffusion_scale``, default 1; noise
  proportional to the path's noise level t, SiT's "sigma" form). Then
  ``(g^2 / 2) score = lam t score = -lam eps_hat`` with ``eps_hat = x + (1 - t) v``,
  so the drift never divides by t and stays finite up to the data end:

      x <- x - h (v + lam eps_hat) + sqrt(2 lam t h) z.

  The last interval of the grid (from t_min, by default the last grid point
  before 0) is one deterministic denoising step to the x0 prediction
  ``x - t_min v``, so the output carries no fresh noise.

Every model call goes through ``guidance.guided_velocity`` when a guidance schedule
is given, so the unconditional pass happens only inside guided segments.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from fae_pipe.errors import UserError
from fae_pipe.transport.guidance import GuidanceSchedule, as_schedule, guided_velocity
from fae_pipe.transport.interpolant import velocity_to_eps, velocity_to_x0
from fae_pipe.transport.timesteps import time_grid

METHODS = ("euler", "heun", "dopri5", "sde")
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _velocity_fn(model_fn, y, schedule: GuidanceSchedule | None, null_class, counter: tqdm):
    """Bind labels and guidance: returns ``f(x, t_float) -> velocity``."""

    def f(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        counter.update(1)
        if schedule is None:
            return model_fn(x, tt, y)
        return guided_velocity(model_fn, x, tt, y, null_class, schedule)

    return f


def _euler(f, x, grid):
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x - (t - t_next) * f(x, t)
    return x


def _heun(f, x, grid):
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = t - t_next
        v = f(x, t)
        x_pred = x - h * v
        x = x - 0.5 * h * (v + f(x_pred, t_next))
    return x


def _dopri5(f, x, t_end, rtol, atol):
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise UserError("dopri5 needs torchdiffeq: pip install torchdiffeq") from None
    times = torch.tensor([1.0, t_end], dtype=x.dtype, device=x.device)
    path = odeint(lambda t, z: f(z, float(t)), x, times, method="dopri5", rtol=rtol, atol=atol)
    return path[-1]


def _sde(f, x, grid, lam, generator):
    """Euler-Maruyama on all but the last grid interval, then one x0-prediction step."""
    gen_device = generator.device if generator is not None else x.device
    for t, t_next in zip(grid[:-2].tolist(), grid[1:-1].tolist()):
        h = t - t_next
        v = f(x, t)
        drift = v + lam * velocity_to_eps(x, v, t)
        z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        x = x - h * drift + (2.0 * lam * t * h) ** 0.5 * z
    t_min = float(grid[-2])
    return velocity_to_x0(x, f(x, t_min), t_min)


@torch.no_grad()
def sample(
    model_fn: VelocityModel,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    method: str = "euler",
    steps: int = 250,
    shift: float = 1.0,
    guidance: GuidanceSchedule | float | list | None = None,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    sde_t_min: float | None = None,
    diffusion_scale: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """Integrate ``model_fn(x, t, y) -> velocity`` from ``noise`` (t = 1) to data (t = 0).

    ``shift`` is the factor ``a`` of ``timesteps.shift_t`` (resolve a config with
    ``shift_factor``). ``guidance`` is a ``GuidanceSchedule``, a list of
    ``(t_start, t_end, scale)`` segments, one scale for all t, or None; with guidance,
    ``y`` and ``null_class`` are required. ``generator`` drives the SDE noise.
    ``sde_t_min``: where Euler-Maruyama stops before the denoising step (default: the
    last grid point before 0, i.e. ``steps - 1`` stochastic steps on the shared grid).
    Returns a tensor shaped like ``noise``, in its dtype.
    """
    if method not in METHODS:
        raise UserError(f"sampling method {method!r} is unknown; valid: {', '.join(METHODS)}")
    if y is not None and y.shape[0] != noise.shape[0]:
        raise UserError(f"labels y have {y.shape[0]} entries for a batch of {noise.shape[0]}")
    schedule = as_schedule(guidance)
    if schedule is not None:
        if y is None:
            raise UserError("classifier-free guidance needs class labels y; got None")
        if null_class is None and not schedule.is_trivial():
            raise UserError("classifier-free guidance needs null_class (the label of the unconditional class)")
    if not diffusion_scale >= 0:
        raise UserError(f"SDE diffusion_scale must be >= 0, got {diffusion_scale}")

    total = None if method == "dopri5" else steps * (2 if method == "heun" else 1)
    with tqdm(total=total, disable=not progress, desc=f"sample ({method})", unit="eval") as bar:
        f = _velocity_fn(model_fn, y, schedule, null_class, bar)
        if method == "dopri5":
            return _dopri5(f, noise, 0.0, rtol, atol)
        if method == "sde" and sde_t_min is not None:
            if not 0.0 < sde_t_min < 1.0 or steps < 2:
                raise UserError(
                    f"sde_t_min must be in (0, 1) with steps >= 2, got sde_t_min={sde_t_min}, steps={steps}"
                )
            grid = time_grid(steps - 1, shift, t_end=sde_t_min)
            grid = torch.cat([grid, grid.new_zeros(1)])
        else:
            grid = time_grid(steps, shift)
        if method == "euler":
            return _euler(f, noise, grid)
        if method == "heun":
            return _heun(f, noise, grid)
        return _sde(f, noise, grid, float(diffusion_scale), generator)
