"""Classifier-free guidance for autoregressive flows: mixing the conditional and unconditional Gaussians.

When a block is inverted, token i is ``x_i = mu_i + exp(alpha_i) * z_i`` with z_i standard
normal: given the tokens before it, x_i is Gaussian N(mu_i, sigma_i^2), sigma_i = exp(alpha_i),
once with the class (mu_c, sigma_c) and once with the null class (mu_u, sigma_u). Guidance
at scale w replaces that Gaussian, in every block and for every token, by

- ``product`` (default; STARFlow's form): the normalised p_c^w * p_u^(1 - w), again Gaussian,
  with precision ``P = w / sigma_c^2 + (1 - w) / sigma_u^2`` and mean
  ``(w mu_c / sigma_c^2 + (1 - w) mu_u / sigma_u^2) / P``. For w > 1, P can reach 0 or less
  where the unconditional Gaussian is the narrower one; P is floored at ``P_c / w`` (the
  guided std is at most sqrt(w) times the conditional one), a documented choice;
- ``extrapolate`` (TARFlow's form): ``mu = mu_c + (w - 1) (mu_c - mu_u)`` and the same for
  the log-scale alpha.

Both give the conditional Gaussian exactly at w = 1 (unguided sampling).

Schedule over the tokens of a block (N tokens, generated i = 0..N-1 in the block's order):
``constant`` uses w for every token; ``ramp`` (TARFlow's annealed guidance) uses
``w_i = 1 + (w - 1) (i + 1) / N``: little guidance on the first tokens, whose
distribution is broad and sets the layout, the full scale on the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fae_pipe.errors import UserError

MODES = ("product", "extrapolate")
SCHEDULES = ("constant", "ramp")


@dataclass(frozen=True)
class FlowGuidance:
    """Guidance scale ``scale`` (1 = none), its ``schedule`` over the tokens and the mixing ``mode``."""

    scale: float
    schedule: str = "constant"
    mode: str = "product"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"flow guidance schedule {self.schedule!r} is not valid; valid: {', '.join(SCHEDULES)}")
        if self.mode not in MODES:
            raise UserError(f"flow guidance mode {self.mode!r} is not valid; valid: {', '.join(MODES)}")
        if self.scale < 0:
            raise UserError(f"flow guidance scale {self.scale} is not valid; valid: a value >= 0 (1 = none)")

    def scale_at(self, i: int, n: int) -> float:
        """The scale of token i of n in a block's generation order."""
        if self.schedule == "ramp":
            return 1.0 + (self.scale - 1.0) * (i + 1) / n
        return float(self.scale)


def mix(mu_c: torch.Tensor, alpha_c: torch.Tensor, mu_u: torch.Tensor, alpha_u: torch.Tensor, w: float,
        mode: str = "product") -> tuple[torch.Tensor, torch.Tensor]:
    """The guided (mu, alpha) of one token from its conditional and unconditional (mu, alpha)."""
    if mode == "extrapolate":
        return mu_c + (w - 1.0) * (mu_c - mu_u), alpha_c + (w - 1.0) * (alpha_c - alpha_u)
    prec_c, prec_u = torch.exp(-2.0 * alpha_c), torch.exp(-2.0 * alpha_u)
    prec = w * prec_c + (1.0 - w) * prec_u
    if w > 1.0:
        prec = torch.maximum(prec, prec_c / w)
    mu = (w * prec_c * mu_c + (1.0 - w) * prec_u * mu_u) / prec
    return mu, -0.5 * torch.log(prec)


def configured(scale: float, schedule: str = "constant", mode: str = "product") -> FlowGuidance | None:
    """The guidance to sample with from config values (``flow.guidance*``); None at scale 1, so unguided
    sampling skips the null-class pass (scale 1 gives the same samples either way)."""
    return None if scale == 1.0 else FlowGuidance(scale, schedule, mode)
