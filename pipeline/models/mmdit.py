"""MMDiT: a text-conditioned velocity transformer over latent grids (FAE's text-to-image generator).

The paper's text-to-image model is "an MMDiT-style generator" of about 600M parameters.
MMDiT (SD3) keeps two token streams, text and image, each with its own weights
(adaLN modulation, qkv, output projection, MLP), and lets them meet in one *joint*
attention over the concatenated tokens, so text tokens are refined by the image as
well as the other way round. ``layout="cross"`` is the cheaper PixArt-style variant:
image self-attention, then cross-attention from image queries to the (fixed) text
tokens; it has one stream and about 60% of the joint layout's parameters.

Conditioning: the adaLN modulations of both streams come from the timestep embedding
plus a projection of a pooled text vector. Encoders with a pooled output (CLIP,
SigLIP) pass it as ``pooled``; for encoders without one (T5) the model uses the
masked mean of the text token embeddings, so the choice is a property of the text
store, not a guess. Text padding is masked out of every attention (``text_mask``,
True = real token), so a caption's result does not depend on how much padding its
batch has. Classifier-free guidance is the caller's: the unconditional branch is the
text store's empty-caption embedding, passed like any other caption.

Conventions as in ``sit.py``: t in [0, 1] scaled by 1000 before the frequency
embedding; zero-initialised modulations and head, so at init the model outputs zero.
"""

from __future__ import annotations

import torch
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import RMSNorm, SinCosPos, attention, init_linears, make_mlp
from fae_pipe.models.sit import TimestepEmbedder, modulate

LAYOUTS = ("joint", "cross")


class _Stream(nn.Module):
    """One stream's half of a block: its modulation, pre-norms, qkv, output projection and MLP.

    ``pre_only`` (the text stream of the last joint block) keeps only what feeds the
    attention: its outputs would never be read.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.pre_only = heads, width // heads, pre_only
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if pre_only else 6) * width))
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = make_mlp("gelu", width, mlp_ratio)

    def qkv_of(self, x: torch.Tensor, mods: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), mods[0], mods[1])).view(
            b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        b, _, n, _ = attended.shape
        x = x + mods[2][:, None] * self.proj(attended.transpose(1, 2).reshape(b, n, -1))
        return x + mods[5][:, None] * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))


class JointBlock(nn.Module):
    """MMDiT block: per-stream weights, one attention over [text; image] tokens."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, last: bool):
        super().__init__()
        self.text = _Stream(width, heads, mlp_ratio, qk_norm, pre_only=last)
        self.image = _Stream(width, heads, mlp_ratio, qk_norm)

    def forward(self, img, txt, c, key_mask):
        mi, mt = self.image.ada(c).chunk(6, -1), self.text.ada(c).chunk(2 if self.text.pre_only else 6, -1)
        qi, ki, vi = self.image.qkv_of(img, mi)
        qt, kt, vt = self.text.qkv_of(txt, mt)
        n_txt = txt.shape[1]
        out = attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), mask=key_mask)
        img = self.image.finish(img, out[:, :, n_txt:], mi)
        txt = txt if self.text.pre_only else self.text.finish(txt, out[:, :, :n_txt], mt)
        return img, txt


class CrossBlock(nn.Module):
    """PixArt-style block: adaLN self-attention, cross-attention to the text tokens, adaLN MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, last: bool):
        super().__init__()
        self.image = _Stream(width, heads, mlp_ratio, qk_norm)
        self.cross_norm = nn.LayerNorm(width, eps=1e-6)
        self.cross_q, self.cross_kv, self.cross_proj = (nn.Linear(width, width), nn.Linear(width, 2 * width),
                                                        nn.Linear(width, width))

    def forward(self, img, txt, c, key_mask):
        s = self.image
        mi = s.ada(c).chunk(6, -1)
        out = attention(*s.qkv_of(img, mi))
        b, n, w = img.shape
        img = img + mi[2][:, None] * s.proj(out.transpose(1, 2).reshape(b, n, w))
        q = self.cross_q(self.cross_norm(img)).view(b, n, s.heads, s.head_dim).transpose(1, 2)
        k, v = self.cross_kv(txt).view(b, txt.shape[1], 2, s.heads, s.head_dim).permute(2, 0, 3, 1, 4)
        text_mask = key_mask[..., : txt.shape[1]]
        text_mask = text_mask | ~text_mask.any(-1, keepdim=True)  # a caption with no real token: attend to all
        img = img + self.cross_proj(attention(q, k, v, mask=text_mask).transpose(1, 2).reshape(b, n, w))
        return img + mi[5][:, None] * s.mlp(modulate(s.norm2(img), mi[3], mi[4])), txt


class MMDiT(nn.Module):
    """Text-conditioned velocity transformer: ``forward(x, t, text, text_mask, pooled=None)``.

    Args:
        input_size, patch_size, in_channels: the latent grid (16, 1, 32 for FAE at 256 px).
        text_dim: width of the cached text token embeddings (Flan-T5-XL: 2048).
        pooled_dim: width of the pooled text vector; 0 = the encoder has none, use the
            masked mean of the token embeddings (``text_dim`` wide).
        width, depth, heads, mlp_ratio: transformer shape.
        layout: "joint" (MMDiT) or "cross" (cross-attention DiT).
        qk_norm: RMSNorm on q and k per head (SD3.5), for stable low-precision training.
    """

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32, text_dim: int = 2048,
                 pooled_dim: int = 0, width: int = 1152, depth: int = 12, heads: int = 16, mlp_ratio: float = 4.0,
                 layout: str = "joint", qk_norm: bool = True):
        super().__init__()
        if layout not in LAYOUTS:
            raise UserError(f"mmdit layout: '{layout}' is not valid; valid: {', '.join(map(repr, LAYOUTS))}")
        if input_size % patch_size:
            raise UserError(f"mmdit: input_size {input_size} is not divisible by patch_size {patch_size}")
        if width % heads:
            raise UserError(f"mmdit: width {width} is not divisible by heads {heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.text_dim, self.pooled_dim, self.grid, self.layout = text_dim, pooled_dim, input_size // patch_size, layout
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = SinCosPos(width)
        self.text_embed = nn.Sequential(RMSNorm(text_dim), nn.Linear(text_dim, width))
        self.t_embed = TimestepEmbedder(width)
        self.pool_embed = nn.Sequential(nn.Linear(pooled_dim or text_dim, width), nn.SiLU(), nn.Linear(width, width))
        block = JointBlock if layout == "joint" else CrossBlock
        self.blocks = nn.ModuleList(block(width, heads, mlp_ratio, qk_norm, last=k == depth - 1)
                                    for k in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears and patch embedding; zero modulations and head (identity blocks, zero output)."""
        init_linears(self)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        zeroed = [m.ada[-1] for b in self.blocks for m in (b.image, getattr(b, "text", None)) if m is not None]
        for lin in zeroed + [self.final_ada[-1], self.head]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.in_channels
        return x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for latents x (B, C, H, W) at t, given text tokens (B, L, text_dim) and mask (B, L)."""
        b = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise UserError(f"mmdit input: expected (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                            f"got {tuple(x.shape)}")
        if text.ndim != 3 or text.shape[-1] != self.text_dim or tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise UserError(f"mmdit text: expected tokens (B, L, {self.text_dim}) with a (B, L) mask, "
                            f"got {tuple(text.shape)} and {tuple(text_mask.shape)}")
        if (pooled is None) != (self.pooled_dim == 0):
            raise UserError(f"mmdit pooled: this model was built with pooled_dim={self.pooled_dim}; "
                            f"{'pass' if self.pooled_dim else 'do not pass'} the pooled text vector")
        mask = text_mask.bool()
        if pooled is None:  # encoders without a pooled output: the mean of the real tokens
            m = mask[..., None].to(text.dtype)
            pooled = (text * m).sum(1) / m.sum(1).clamp_min(1.0)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        img = self.patch_embed(x).flatten(2).transpose(1, 2)
        img = img + self.pos.table(self.grid, self.grid, img.device, img.dtype)
        txt = self.text_embed(text.to(img.dtype))
        c = self.t_embed(t) + self.pool_embed(pooled.to(img.dtype))
        key_mask = torch.cat([mask, mask.new_ones(b, img.shape[1])], 1)[:, None, None, :]
        for block in self.blocks:
            img, txt = block(img, txt, c, key_mask)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.unpatchify(self.head(modulate(self.final_norm(img), shift, scale)))
