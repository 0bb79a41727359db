"""Feature decoder: rebuild the frozen encoder's features from the compact FAE latent.

The FAE latent (B, N, C) is trained so that this transformer can recover the
DINOv2 patch tokens (B, N, D); the pixel decoder is later fine-tuned on its
output, and at sampling time SiT latents go through it on the way to pixels.

Layout (paper: 6 layers, width 1536, 24 heads x 64, MLP ratio 4, RoPE,
RMSNorm, SwiGLU): linear C -> width, optional learned absolute positions,
``depth`` pre-norm blocks with 2-D RoPE, final RMSNorm, and a linear
width -> D only when width != D.

Choices made to match the paper's 170.43M parameters (App. D): the SwiGLU
hidden width is int(2/3 * 4 * width) = 4096; with width == D == 1536 the output
projection is left out (a 1536 x 1536 head alone would add 2.36M and land 1.2%
over); a learned 16x16 position table (393,216 parameters) on top of RoPE makes
the count 170,428,416, the paper's figure to its last printed digit. Both are
arguments, so either choice can be undone.
"""

from __future__ import annotations

import torch
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import RMSNorm, Rope2D, TransformerBlock, grid_of, init_linears


class FeatureDecoder(nn.Module):
    """Transformer mapping (B, N, latent_channels) latents to (B, N, out_dim) features.

    Args:
        latent_channels: C of the FAE latent.
        out_dim: D, the encoder feature width to reconstruct.
        width, depth, heads, mlp_ratio: transformer shape (SwiGLU, RMSNorm, 2-D RoPE).
        out_proj: add a final linear width -> out_dim; None means "only if width != out_dim".
        learned_pos_grid: side of a learned absolute position table added after the input
            linear (e.g. 16 for 16x16 tokens); None for RoPE-only positions, which works
            at any grid size.
    """

    def __init__(
        self,
        latent_channels: int = 32,
        out_dim: int = 1536,
        width: int = 1536,
        depth: int = 6,
        heads: int = 24,
        mlp_ratio: float = 4.0,
        out_proj: bool | None = None,
        learned_pos_grid: int | None = None,
    ):
        super().__init__()
        if out_proj is None:
            out_proj = width != out_dim
        if not out_proj and width != out_dim:
            raise UserError(f"feature decoder: out_proj=False needs width == out_dim, got {width} vs {out_dim}")
        self.latent_channels, self.out_dim = latent_channels, out_dim
        self.embed = nn.Linear(latent_channels, width)
        self.learned_pos_grid = learned_pos_grid
        self.pos = nn.Parameter(torch.zeros(1, learned_pos_grid**2, width)) if learned_pos_grid else None
        self.rope = Rope2D(width // heads)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, norm="rms", mlp="swiglu") for _ in range(depth)
        )
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, out_dim) if out_proj else nn.Identity()
        init_linears(self)
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, z: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Decode latents (B, N, C) to features (B, N, out_dim); ``grid`` defaults to a square."""
        if z.dim() != 3 or z.shape[-1] != self.latent_channels:
            raise UserError(f"feature decoder input: expected (B, N, {self.latent_channels}), got {tuple(z.shape)}")
        h, w = grid_of(z.shape[1], grid)
        x = self.embed(z)
        if self.pos is not None:
            if (h, w) != (self.learned_pos_grid, self.learned_pos_grid):
                g = self.learned_pos_grid
                raise UserError(f"feature decoder: learned positions are for a {g}x{g} grid, got {h}x{w}")
            x = x + self.pos
        rope = self.rope.cos_sin(h, w, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))
