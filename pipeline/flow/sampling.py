"""Sampling a TARFlow: invert the blocks (token by token, KV-cached), then undo the noise augmentation.

1. ``z ~ N(0, I)`` (the caller's noise, so a seed gives the same images on any split).
2. Invert the blocks from the one nearest the prior (the last, STARFlow's deep block) to
   the first. Within a block the tokens are produced in the block's order, one at a time:
   token i needs the block's (mu_i, alpha_i), which depend on tokens < i. With
   ``cache=True`` each new token is one single-token pass through the block's KV caches
   (cost linear in the tokens per layer pass); ``cache=False`` re-runs the full causal pass
   over the partial sequence for every token (the quadratic reference the tests compare
   against). With guidance the conditional and null-class sequences run as one doubled
   batch and every token is drawn from the mixed Gaussian (``fae_pipe.flow.guidance``).
3. The result is a sample of the noise-augmented density p_sigma. ``denoise`` applies
   Tweedie's formula ``E[x | x~] = x~ + sigma^2 * grad log p_sigma(x~)``, the score taken by
   autograd through the flow's exact log density (the class-conditional one).

Cost: a block of N tokens costs N sequential passes (each attending to <= N cached keys),
against one pass per step for diffusion; sampling time therefore grows with the number of
tokens even on parallel hardware (docs/flow.md has the measured growth).
"""

from __future__ import annotations

import torch

from fae_pipe.flow.guidance import FlowGuidance, mix
from fae_pipe.flow.likelihood import log_prob


def _invert_block(block, z: torch.Tensor, y: torch.Tensor, guidance: FlowGuidance | None, null_class: int,
                  cache: bool) -> torch.Tensor:
    """One block, noise side -> data side: (B, N, D) tokens in canonical order."""
    b, n, _ = z.shape
    zp = block.permute(z).float()
    yy = y if guidance is None else torch.cat([y, torch.full_like(y, null_class)])
    caches = [{} for _ in block.layers]
    x = torch.zeros_like(zp)
    full = x if guidance is None else torch.zeros((2 * b, *x.shape[1:]), dtype=x.dtype, device=x.device)
    token = None
    for i in range(n):
        if cache:
            mu, alpha = block.step(token, yy, caches)
        else:
            mu, alpha = (p[:, i:i + 1] for p in block.params(full, yy))
        if guidance is not None:
            mu, alpha = mix(mu[:b], alpha[:b], mu[b:], alpha[b:], guidance.scale_at(i, n), guidance.mode)
        new = zp[:, i:i + 1] * torch.exp(alpha) + mu
        x[:, i:i + 1] = new
        token = new if guidance is None else torch.cat([new, new])
        if not cache:
            full[:, i:i + 1] = token
    return block.permute(x)


@torch.no_grad()
def invert(model, noise: torch.Tensor, y, guidance: FlowGuidance | None = None, null_class: int | None = None,
           cache: bool = True) -> torch.Tensor:
    """Noise (B, C, H, W) -> a sample of the flow's (noise-augmented) density, same shape.

    ``guidance`` None = conditional sampling; a ``FlowGuidance`` (even at scale 1) mixes in the
    null class ``null_class`` (default ``model.num_classes``).
    """
    y = model.labels(y, noise.shape[0], noise.device)
    null = model.num_classes if null_class is None else int(null_class)
    h = model.to_tokens(noise.float())
    for block in reversed(model.blocks):
        h = _invert_block(block, h, y, guidance, null, cache)
    return model.from_tokens(h)


def score(model, x: torch.Tensor, y) -> torch.Tensor:
    """grad_x log p(x | y) (B, C, H, W) by autograd through the flow (the model's weights get no gradient)."""
    with torch.enable_grad():
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32)).requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(model, x, y).sum(), x)
    return grad


def denoise(model, x: torch.Tensor, y, sigma: float) -> torch.Tensor:
    """Tweedie's step ``x + sigma^2 * grad log p_sigma(x)``: the posterior mean of the clean latents."""
    if sigma <= 0:
        return x
    return x + sigma ** 2 * score(model, x, y)


def sample(model, noise: torch.Tensor, y, guidance: FlowGuidance | None = None, null_class: int | None = None,
           sigma: float = 0.0, tweedie: bool = True, cache: bool = True, batch_size: int | None = None) -> torch.Tensor:
    """Latents from noise: ``invert`` then (``tweedie`` and sigma > 0) ``denoise`` with the training sigma.

    ``batch_size`` bounds the Tweedie backward pass's memory (default: the whole batch).
    """
    x = invert(model, noise, y, guidance, null_class, cache)
    if not tweedie or sigma <= 0:
        return x
    y = model.labels(y, noise.shape[0], noise.device)
    step = batch_size or x.shape[0]
    return torch.cat([denoise(model, x[i:i + step], y[i:i + step], sigma) for i in range(0, x.shape[0], step)])
