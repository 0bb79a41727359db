"""Pixel decoder: a ViT that turns encoder-feature tokens into an image.

FAE trains it first on noisy real DINOv2 features and then fine-tunes it on the
feature decoder's output, so generation needs no pixel-space VAE at all. The
paper uses a ViT-L-like decoder (24 layers, width 1024, 16 heads) taking
16x16x1536 features to 256x256x3.

Layout: linear D -> width, learned or fixed sin-cos positions, ``depth``
pre-norm blocks (LayerNorm + GELU MLP by default, as in ViT-L), final norm,
linear patch head width -> p*p*3, unpatchify to (B, 3, h*p, w*p).

Output space: pixels in [-1, 1]. The head is a plain linear layer with no tanh:
a tanh saturates and starves the L1/LPIPS/GAN gradients near black and white,
so the decoder is trained against [-1, 1] targets and callers clamp when they
turn the output into an image.
"""

from __future__ import annotations

import torch
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import SinCosPos, TransformerBlock, init_linears, make_norm


class PixelDecoder(nn.Module):
    """ViT mapping (B, grid*grid, in_dim) feature tokens to (B, 3, grid*patch, grid*patch) images.

    Args:
        in_dim: feature width D (1536 for DINOv2-g).
        grid_size: tokens per side (16 for 224 px DINOv2/14 input).
        patch_size: output pixels per token side (16 -> 256 px from 16x16 tokens).
        width, depth, heads, mlp_ratio: transformer shape.
        pos: "learned" (a trainable table, ViT style) or "sincos" (fixed buffer).
        norm, mlp: block flavour, "layer"/"rms" and "gelu"/"swiglu".
    """

    def __init__(
        self,
        in_dim: int = 1536,
        grid_size: int = 16,
        patch_size: int = 16,
        width: int = 1024,
        depth: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        pos: str = "learned",
        norm: str = "layer",
        mlp: str = "gelu",
        out_channels: int = 3,
    ):
        super().__init__()
        self.in_dim, self.grid_size, self.patch_size, self.out_channels = in_dim, grid_size, patch_size, out_channels
        self.embed = nn.Linear(in_dim, width)
        if pos == "learned":
            self.pos = nn.Parameter(torch.zeros(1, grid_size**2, width))
        elif pos == "sincos":
            self.pos = SinCosPos(width)
        else:
            raise UserError(f"pixel decoder pos: '{pos}' is not valid; valid: 'learned', 'sincos'")
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, norm=norm, mlp=mlp) for _ in range(depth))
        self.norm = make_norm(norm, width)
        self.head = nn.Linear(width, patch_size * patch_size * out_channels)
        init_linears(self)
        if isinstance(self.pos, nn.Parameter):
            nn.init.trunc_normal_(self.pos, std=0.02)

    @property
    def image_size(self) -> int:
        """Side in pixels of the decoded image."""
        return self.grid_size * self.patch_size

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*c) patch vectors -> (B, c, h*p, w*p) image, channels last within a patch."""
        b, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Decode (B, N, in_dim) features to images (B, 3, H, W) in [-1, 1] (unclamped)."""
        n = self.grid_size**2
        if feats.dim() != 3 or feats.shape[1:] != (n, self.in_dim):
            raise UserError(f"pixel decoder input: expected (B, {n}, {self.in_dim}) features, got {tuple(feats.shape)}")
        x = self.embed(feats)
        if isinstance(self.pos, SinCosPos):
            x = x + self.pos.table(self.grid_size, self.grid_size, x.device, x.dtype)
        else:
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.unpatchify(self.head(self.norm(x)))
