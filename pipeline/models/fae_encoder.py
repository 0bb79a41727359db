"""FAE encoder: one attention layer that squeezes frozen encoder features into a small Gaussian latent.

Paper: "One Layer Is Enough" (Gao et al., arXiv 2512.07829). The frozen
understanding encoder (DINOv2) already did the hard work; a single wide
self-attention layer mixing neighbouring patch tokens is enough to compress its
1536-d patch tokens to a 32-channel latent that diffusion handles well.

Layout: ``x + attn(rmsnorm(x))`` with attention in a wider space than the tokens
(24 heads x 256 = 6144-d for DINOv2-g), then an activation and one linear
projection to 2C channels = mean and log-variance of a diagonal Gaussian.
The pre-attention RMSNorm (1536 parameters) is our choice: cached features may
arrive at any scale and the norm keeps the attention logits tame. 2-D RoPE in
the attention is on by default (zero parameters); DINOv2 tokens already carry
absolute position, RoPE adds an explicit notion of neighbourhood.

Size: for DINOv2-g this is 37,868,608 parameters against the paper's 38.17M
(-0.79%): q, k, v and the output projection with biases (37.77M) are the whole
of it. The paper's remaining ~0.3M is not explained by its text; a learned
16x16 position table would overshoot (+0.24%) and add nothing DINOv2 tokens
lack, so it is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import RMSNorm, Rope2D, SelfAttention, grid_of, init_linears

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """A diagonal Gaussian posterior q(z|x) over (B, N, C) latents.

    ``kl()`` is KL(q || N(0, I)) summed over tokens and channels, one value per
    sample (shape (B,)), the convention of latent-diffusion VAEs; ``kl("mean")``
    averages over every element instead, ``kl("none")`` keeps (B, N, C).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps`` (differentiable in mean and std)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, reduction: str = "sum") -> torch.Tensor:
        """KL divergence to the standard normal; reduction "sum" (per sample), "mean" or "none"."""
        per_element = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        if reduction == "sum":
            return per_element.flatten(1).sum(1)
        if reduction == "mean":
            return per_element.mean()
        if reduction == "none":
            return per_element
        raise UserError(f"kl reduction: '{reduction}' is not valid; valid: 'sum', 'mean', 'none'")


class FAEEncoder(nn.Module):
    """Single self-attention layer + linear head mapping (B, N, in_dim) tokens to a C-channel Gaussian.

    Args:
        in_dim: channel width of the frozen encoder's patch tokens (1536 for DINOv2-g).
        latent_channels: C, channels of the latent (the head outputs 2C).
        heads, head_dim: attention shape; heads * head_dim may exceed in_dim.
        rope: apply 2-D RoPE to q and k over the token grid.
        act: activation before the head, "gelu" or "silu".
    """

    def __init__(
        self,
        in_dim: int = 1536,
        latent_channels: int = 32,
        heads: int = 24,
        head_dim: int = 256,
        rope: bool = True,
        act: str = "gelu",
    ):
        super().__init__()
        if act not in ("gelu", "silu"):
            raise UserError(f"fae encoder act: '{act}' is not valid; valid: 'gelu', 'silu'")
        self.in_dim, self.latent_channels, self.act = in_dim, latent_channels, act
        self.norm = RMSNorm(in_dim)
        self.attn = SelfAttention(in_dim, heads, head_dim)
        self.rope = Rope2D(head_dim) if rope else None
        self.head = nn.Linear(in_dim, 2 * latent_channels)
        init_linears(self)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean, logvar), each (B, N, C), logvar clamped to [-30, 20]; ``grid`` defaults to a square."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise UserError(f"fae encoder input: expected (B, N, {self.in_dim}) tokens, got {tuple(x.shape)}")
        rope = None
        if self.rope is not None:
            h, w = grid_of(x.shape[1], grid)
            rope = self.rope.cos_sin(h, w, x.device, x.dtype)
        x = x + self.attn(self.norm(x), rope)
        x = F.gelu(x) if self.act == "gelu" else F.silu(x)
        mean, logvar = self.head(x).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def posterior(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> DiagonalGaussian:
        """Encode and wrap as a :class:`DiagonalGaussian` (logvar clamped to [-30, 20])."""
        return DiagonalGaussian(*self.forward(x, grid))
