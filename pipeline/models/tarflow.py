"""TARFlow / STARFlow: a transformer autoregressive normalizing flow over latent tokens.

The paper's second generator family (FAE + STARFlow: ImageNet 256 FID 2.67). This file
holds only the network; the likelihood, noise augmentation, inverse sampling, Tweedie
denoising and flow guidance live in ``fae_pipe.flow``.

Layout (apple/ml-tarflow, apple/ml-starflow):
- Latents (B, C, H, W) are cut into ``(H / p) * (W / p)`` tokens of ``p * p * C`` values
  (patch 1 on FAE's 16x16x32 latents, patch 2 on SD-VAE's 32x32x4), raster order.
- A stack of ``FlowBlock``s, listed in the data -> noise direction. Each is a causal
  transformer whose output at sequence slot i gives the per-token affine map of token i
  from the tokens before it: ``z_i = (x_i - mu_i) * exp(-alpha_i)``, log|det| = -sum alpha.
  The triangular Jacobian makes the map exactly invertible, one token at a time.
- Token order alternates between blocks: block k reads the tokens in raster order when k is
  even and in reversed raster order when k is odd (TARFlow's identity / flip), so every
  token is eventually conditioned on every other.
- Class conditioning is a prefix token: slot 0 of each block's sequence is the class
  embedding, slots 1..N-1 are tokens 0..N-2, so token 0's map depends on the class too.
  The class table has ``num_classes + 1`` rows; the last is the null class
  (``y == num_classes``, for guidance; label dropout is the trainer's job).
- ``block_depths`` lists the transformer layers of each block: TARFlow's uniform stacks
  (``[8] * 8``) or STARFlow's deep-shallow layout (``[2, 2, 2, 2, 2, 24]``): shallow blocks
  on the data side, one deep block next to the Gaussian prior, which models most of the
  structure and is the first one inverted when sampling.
- ``proj_out`` is zero-initialised (as TARFlow's), so a fresh flow is the identity.

Sampling feeds tokens one at a time through ``FlowBlock.step`` with a KV cache per layer
(``SelfAttention``'s ``cache``), so inverting a block costs N single-token passes instead
of N full re-computations; ``FlowBlock.params`` is the full causal pass (training, and the
uncached reference the tests compare against).
"""

from __future__ import annotations

import torch
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import TransformerBlock, init_linears


class FlowBlock(nn.Module):
    """One autoregressive affine step over ``num_tokens`` tokens of ``token_dim`` values.

    ``flip``: this block reads the tokens in reversed order (the alternating permutation).
    """

    def __init__(self, token_dim: int, num_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 num_classes: int, flip: bool):
        super().__init__()
        self.token_dim, self.num_tokens, self.flip = token_dim, num_tokens, bool(flip)
        self.proj_in = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.empty(num_tokens, width))  # slot 0: class token; slot i: token i - 1
        self.y_embed = nn.Embedding(num_classes + 1, width, _weight=torch.empty(num_classes + 1, width))
        self.layers = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, norm="layer", mlp="gelu")
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj_out = nn.Linear(width, 2 * token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) positions and class table, zero output map: the identity at init.

        ``trunc_normal_`` at +-2 (100 std) is a plain N(0, 0.02) that stays cheap on the meta device.
        """
        init_linears(self)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.y_embed.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, tokens: torch.Tensor) -> torch.Tensor:
        """Canonical (raster) order <-> this block's order (the flip is its own inverse)."""
        return tokens.flip(1) if self.flip else tokens

    def _head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output -> (mu, alpha) in float32: shift and log-scale of the tokens."""
        out = self.proj_out(self.norm(h))
        alpha, mu = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2, dim=-1)
        return mu, alpha

    def params(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, alpha), each (B, N, D), of every token of ``x`` (B, N, D, this block's order) in one causal pass.

        Slot i sees the class and tokens < i only, so row i does not depend on x_i..x_{N-1}.
        """
        h = torch.cat([self.y_embed(y)[:, None], self.proj_in(x[:, :-1])], dim=1) + self.pos
        for layer in self.layers:
            h = layer(h, causal=True)
        return self._head(h)

    def step(self, token: torch.Tensor | None, y: torch.Tensor | None, caches: list[dict]):
        """Feed the next sequence slot through the KV caches; returns (mu, alpha) (B, 1, D) of the next token.

        The first call (empty caches) feeds the class token ``y``; each later call feeds the
        token just produced (``token``, (B, 1, D)).
        """
        slot = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        h = self.y_embed(y)[:, None] if slot == 0 else self.proj_in(token)
        h = h + self.pos[slot]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cache=cache)
        return self._head(h)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise direction: (z tokens in canonical order, log|det| per sample (B,))."""
        x = self.permute(tokens)
        mu, alpha = self.params(x, y)
        z = (x.to(mu.dtype) - mu) * torch.exp(-alpha)
        return self.permute(z.to(tokens.dtype)), -alpha.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise -> data direction, token by token with the KV cache, no guidance (``fae_pipe.flow`` adds it)."""
        zp = self.permute(z).to(torch.promote_types(z.dtype, torch.float32))
        caches = [{} for _ in self.layers]
        out, token = [], None
        for i in range(self.num_tokens):
            mu, alpha = self.step(token, y, caches)
            token = zp[:, i:i + 1] * torch.exp(alpha) + mu
            out.append(token)
        return self.permute(torch.cat(out, dim=1))


class TARFlow(nn.Module):
    """Class-conditional autoregressive flow: ``forward(x, y) -> (z, log|det|)``, ``inverse(z, y) -> x``.

    Args:
        input_size: latent side (16 for FAE at 256 px); patch_size: latent pixels per token side.
        in_channels: latent channels (32 for FAE-32).
        width, heads, mlp_ratio: the transformer shape shared by every block.
        block_depths: transformer layers per flow block, data -> noise order (see the module doc).
        num_classes: real classes; the class table has one more row, the null class.
    """

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32, width: int = 768,
                 block_depths: list | tuple = (8, 8, 8, 8, 8, 8, 8, 8), heads: int = 12, mlp_ratio: float = 4.0,
                 num_classes: int = 1000):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"tarflow: input_size {input_size} is not divisible by patch_size {patch_size}")
        depths = list(block_depths)
        if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
            raise UserError(f"tarflow block_depths: {block_depths!r} is not valid; valid: a non-empty list of "
                            "integers >= 1 (transformer layers per flow block)")
        if width % heads:
            raise UserError(f"tarflow: width {width} is not divisible by heads {heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.grid = num_classes, input_size // patch_size
        self.num_tokens, self.token_dim = self.grid ** 2, patch_size * patch_size * in_channels
        if self.num_tokens < 2:
            raise UserError(f"tarflow: {input_size}x{input_size} latents at patch {patch_size} give one token; "
                            "an autoregressive flow needs at least 2")
        self.blocks = nn.ModuleList(
            FlowBlock(self.token_dim, self.num_tokens, width, d, heads, mlp_ratio, num_classes, flip=k % 2 == 1)
            for k, d in enumerate(depths))

    @property
    def dims(self) -> int:
        """Values per sample (C * H * W): the denominator of bits per dimension."""
        return self.num_tokens * self.token_dim

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, N, p*p*C) tokens, raster order."""
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            expect = (self.in_channels, self.input_size, self.input_size)
            raise UserError(f"tarflow input: expected (B, {', '.join(map(str, expect))}), got {tuple(x.shape)}")
        b, c, g, p = x.shape[0], self.in_channels, self.grid, self.patch_size
        return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W) latents (inverse of ``to_tokens``)."""
        b, c, g, p = t.shape[0], self.in_channels, self.grid, self.patch_size
        return t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def labels(self, y, b: int, device) -> torch.Tensor:
        """A scalar or (B,) label -> (B,) long; the null class is ``num_classes``."""
        return torch.as_tensor(y, device=device, dtype=torch.long).reshape(-1).expand(b)

    def forward(self, x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise: z (B, C, H, W) and the total log|det dz/dx| (B,) over all blocks."""
        y = self.labels(y, x.shape[0], x.device)
        h = self.to_tokens(x)
        logdet = 0.0
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
        return self.from_tokens(h), logdet

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y) -> torch.Tensor:
        """Noise -> data (no guidance, no denoising): the blocks inverted last to first."""
        y = self.labels(y, z.shape[0], z.device)
        h = self.to_tokens(z)
        for block in reversed(self.blocks):
            h = block.inverse(h, y)
        return self.from_tokens(h)
