"""Where on the path training looks and where sampling steps land.

Three pieces, kept together because they must agree:

* ``sample_t``: the training time distribution (uniform or logit-normal) before shift.
* ``shift_t``: ONE time-shift map, used by training (``loss.py``) and by the sampling
  grid (``time_grid``), ``t' = a t / (1 + (a - 1) t)``. In this repo's clock (t = 1 is
  noise) ``a > 1`` moves time towards noise, ``a < 1`` towards data, ``a = 1`` is the
  identity. The map fixes 0 and 1, is strictly increasing, and its inverse is the
  same map with ``1 / a``.
* ``shift_factor``: turns a config (mode + value) into ``a``:
  - ``"dim"``: ``a = sqrt(m / n)`` (RAE), m = latent dimension C*H*W, n = base 4096;
  - ``"scalar"``: the paper's number s (0.4; ablation 0.2-0.7) read in the convention
    it comes from, so ``a = 1 / s`` here. The paper does not print the formula; its
    generator code base (LightningDiT / SiT) runs time the other way (0 noise, 1
    data) and applies ``u' = s u / (1 + (s - 1) u)`` to that clock. Substituting
    ``u = 1 - t`` gives exactly ``t' = (t / s) / (1 + (1 / s - 1) t)``: the same map
    with ``a = 1 / s``. So s = 0.4 means a = 2.5, i.e. more time near noise, which
    is also the direction the dimension rule gives for a latent larger than 4096
    (FAE's 16x16x32 = 8192 gives a = 1.41). docs/transport.md has the details.
  - ``"none"``: ``a = 1``.
"""

from __future__ import annotations

import math

import torch

from fae_pipe.errors import UserError

TIME_DISTS = ("uniform", "logit_normal")
SHIFT_MODES = ("auto", "none", "scalar", "dim")
BASE_DIM = 4096


def sample_t(
    batch: int,
    generator: torch.Generator | None = None,
    dist: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``batch`` training times in [0, 1] (before any shift).

    ``"logit_normal"`` is ``sigmoid(N(mean, std))`` (SD3), which spends more training
    on the middle of the path than uniform. Draws happen on the generator's device so
    a CPU generator can feed a CUDA model; the result is moved to ``device``.
    """
    if dist not in TIME_DISTS:
        raise UserError(f"time distribution {dist!r} is unknown; valid: {', '.join(TIME_DISTS)}")
    gen_device = generator.device if generator is not None else device
    if dist == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device, dtype=dtype)
    else:
        if not std > 0:
            raise UserError(f"logit_normal std must be > 0, got {std}")
        z = torch.randn(batch, generator=generator, device=gen_device, dtype=dtype)
        t = torch.sigmoid(mean + std * z)
    return t.to(device) if device is not None else t


def _check_factor(a: float) -> float:
    a = float(a)
    if not (math.isfinite(a) and a > 0):
        raise UserError(f"timestep shift factor must be a finite number > 0, got {a}")
    return a


def shift_t(t: torch.Tensor | float, a: float) -> torch.Tensor | float:
    """The one time-shift map ``a t / (1 + (a - 1) t)`` (tensor or float in, same out).

    Evaluated as ``a t / (a t + (1 - t))`` (the same expression) so that 0 and 1 map
    to exactly 0 and 1 in floating point.
    """
    a = _check_factor(a)
    if a == 1.0:
        return t
    at = a * t
    return at / (at + (1 - t))


def resolve_shift_mode(mode: str, generator_input: str = "latents") -> str:
    """``auto`` -> ``dim`` for raw encoder features (RAE's a = sqrt(H*W*C / base)), ``scalar`` for latents."""
    if mode != "auto":
        return mode
    return "dim" if generator_input == "features" else "scalar"


def shift_factor(
    mode: str = "none",
    value: float | None = None,
    latent_dim: int | None = None,
    base_dim: int = BASE_DIM,
    generator_input: str = "latents",
) -> float:
    """Resolve a shift config to the factor ``a`` of ``shift_t`` (see module docstring; ``auto``: resolve_shift_mode)."""
    mode = resolve_shift_mode(mode, generator_input)
    if mode == "none":
        return 1.0
    if mode == "scalar":
        if value is None:
            raise UserError("timestep shift mode 'scalar' needs a value (the paper uses 0.4)")
        s = _check_factor(value)
        return 1.0 / s
    if mode == "dim":
        if latent_dim is None or latent_dim <= 0 or base_dim <= 0:
            raise UserError(
                f"timestep shift mode 'dim' needs latent_dim > 0 and base_dim > 0, "
                f"got latent_dim={latent_dim}, base_dim={base_dim}"
            )
        return math.sqrt(latent_dim / base_dim)
    raise UserError(f"timestep shift mode {mode!r} is unknown; valid: {', '.join(SHIFT_MODES)}")


def time_grid(
    steps: int,
    shift: float = 1.0,
    t_end: float = 0.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sampling times ``1 = t_0 > t_1 > ... > t_steps = t_end`` (length steps + 1).

    Uniform in the unshifted clock, then mapped by ``shift_t`` with factor ``shift``;
    the unshifted end point is ``shift_t(t_end, 1 / shift)`` so the grid still ends
    exactly at ``t_end``. With ``shift > 1`` the steps crowd towards the noise end.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"sampling steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= t_end < 1.0:
        raise UserError(f"sampling end time must be in [0, 1), got {t_end}")
    a = _check_factor(shift)
    raw_end = float(shift_t(float(t_end), 1.0 / a))
    raw = torch.linspace(1.0, raw_end, steps + 1, dtype=torch.float64)
    grid = shift_t(raw, a)
    grid[0], grid[-1] = 1.0, t_end
    return grid.to(dtype=dtype, device=device)
