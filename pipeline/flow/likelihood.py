"""The flow's training objective: exact negative log-likelihood of noise-augmented latents.

A normalizing flow maps data x to z = f(x) with a tractable Jacobian, so
``log p(x) = log N(z; 0, I) + log|det df/dx|`` exactly. Per dimension (D = C * H * W):

    NLL(x) = (0.5 * ||z||^2 + 0.5 * D * log(2 pi) - log|det|) / D        [nats / dim]

and bits per dimension is NLL / ln 2. TARFlow writes the loss as
``0.5 * mean(z^2) - mean(log-det)``: the same up to the constant 0.5 * log(2 pi), which
is kept here so the number is a real (differential) entropy estimate. It is measured in
the space the flow is trained in: the latents normalised by the store's exact
per-channel statistics, plus the augmentation noise (so it can be negative, and it is
comparable between flows on the same latents and the same sigma; add the mean of
log(channel std) / ln 2 for bits per dimension of the raw latents).

Noise augmentation (the flow's key trick, TARFlow/STARFlow): the flow is trained on
``x + sigma * eps`` with eps ~ N(0, I), i.e. it models p_sigma = p * N(0, sigma^2 I). That
density is smooth (a flow fits a near-singular data density badly) and its score is what
the Tweedie step after sampling needs (``fae_pipe.flow.sampling.denoise``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_2PI = math.log(2 * math.pi)


class FlowLoss(NamedTuple):
    loss: torch.Tensor            # scalar: mean NLL in nats per dimension (what is minimised)
    bits_per_dim: torch.Tensor    # the same in bits per dimension, detached


def log_prob(model, x: torch.Tensor, y) -> torch.Tensor:
    """Exact log density (nats, (B,)) of x under the flow and its standard Gaussian prior."""
    z, logdet = model(x, y)
    z = z.to(torch.promote_types(z.dtype, torch.float32)).flatten(1)
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * LOG_2PI) + logdet


def nll_per_dim(model, x: torch.Tensor, y) -> torch.Tensor:
    """Negative log-likelihood in nats per dimension, (B,)."""
    return -log_prob(model, x, y) / x[0].numel()


def bits_per_dim(nats_per_dim: torch.Tensor | float) -> torch.Tensor | float:
    return nats_per_dim / math.log(2)


def noise_augment(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + sigma * eps, eps ~ N(0, I) drawn from ``generator`` (on its device, then moved to x's)."""
    if sigma <= 0:
        return x
    device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)
    return x + sigma * eps


def training_loss(model, x: torch.Tensor, y: torch.Tensor, sigma: float,
                  generator: torch.Generator | None = None) -> FlowLoss:
    """The flow's loss on one batch: NLL per dimension of the noise-augmented latents."""
    nll = nll_per_dim(model, noise_augment(x, sigma, generator), y).mean()
    return FlowLoss(nll, bits_per_dim(nll.detach()))
