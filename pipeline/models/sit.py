"""SiT / DiT backbone: a class-conditional transformer predicting velocity on latent grids.

FAE's generator is SiT-XL with patch size 1 on 16x16x32 latents (256 tokens,
~675M parameters). This file holds only the network; the interpolant, loss,
timestep shift, samplers and classifier-free guidance live in
``fae_pipe.transport``.

Pieces: a conv patch embedding (patch size configurable, 1 for FAE latents);
positions as a fixed 2-D sin-cos table added to the tokens (``pos="sincos"``,
DiT) or as 2-D RoPE inside attention (``pos="rope"``, LightningDiT); adaLN-Zero
blocks whose shift/scale/gate come from the timestep + class embedding; a final
adaLN layer and a linear head back to the input shape.

LightningDiT is the same network with other block options (``mlp="swiglu"``,
``norm="rmsnorm"``, ``qk_norm=True``, ``pos="rope"``); every option defaults to the
DiT choice, so a default SiT and its checkpoints are unchanged. ``head_depth > 0``
adds RAE's DiT-DH wide head (DDT): the noisy input is embedded again at
``head_width`` and run through ``head_depth`` adaLN-Zero blocks whose modulation is
per token, from ``Linear(backbone output + t/y embedding)``, so the shallow wide head
decodes velocity from what the deep narrow backbone worked out. ``forward(...,
hidden_at=k)`` also returns the output of backbone block k, for REPA.

Conventions: ``t`` is a float in [0, 1] and is multiplied by ``t_scale`` (1000)
before the sinusoidal frequency embedding, so the frequencies cover the same
range as DiT's integer steps. The class table has ``num_classes + 1`` rows, the
last being the null class: ``y == num_classes`` means unconditional. Dropping
labels for CFG training is the caller's job (set y to num_classes). The adaLN
modulations and the head are zero-initialised, so at init every block is the
identity and the model outputs exactly zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import RMSNorm, Rope2D, SelfAttention, SinCosPos, make_mlp

NORMS = ("layernorm", "rmsnorm")


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of a (B,) tensor: [cos(t * f_i), sin(t * f_i)], f_i geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """Float t in [0, 1] -> (B, width): scale by ``t_scale``, frequency embedding, 2-layer SiLU MLP."""

    def __init__(self, width: int, freq_dim: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t * self.t_scale, self.freq_dim).to(self.mlp[0].weight.dtype))


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A (B, D) per-sample modulation as (B, 1, D); a (B, N, D) per-token one (DDT head) as is."""
    return v[:, None] if v.ndim == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample (or per-token) affine of normalised tokens, ``x * (1 + scale) + shift``."""
    return x * (1 + per_token(scale)) + per_token(shift)


def adaln_norm(kind: str, width: int) -> nn.Module:
    """The pre-modulation norm: DiT's affine-free LayerNorm, or LightningDiT's RMSNorm (learned gain)."""
    if kind == "layernorm":
        return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    if kind == "rmsnorm":
        return RMSNorm(width)
    raise UserError(f"sit norm: '{kind}' is not valid; valid: {', '.join(map(repr, NORMS))}")


class AdaLNZeroBlock(nn.Module):
    """Transformer block conditioned by adaptive norms with zero-initialised gates.

    ``c`` is (B, width) for the backbone (one modulation per sample) or (B, N, width)
    for the DDT head (one per token).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, mlp: str, norm: str = "layernorm",
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = adaln_norm(norm, width)
        self.attn = SelfAttention(width, heads, qk_norm=qk_norm)
        self.norm2 = adaln_norm(norm, width)
        self.mlp = make_mlp(mlp, width, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + per_token(g1) * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + per_token(g2) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class SiT(nn.Module):
    """Velocity-predicting transformer: ``forward(x, t, y)`` -> tensor shaped like x.

    Args:
        input_size: latent side (16 for FAE at 256 px).
        patch_size: latent pixels per token side (1 for FAE latents).
        in_channels: latent channels (32 for FAE-32).
        width, depth, heads, mlp_ratio: transformer shape (SiT-XL: 1152, 28, 16, 4).
        num_classes: real classes; the embedding table has one more row, the null class.
        pos: "sincos" (fixed table, DiT) or "rope" (2-D RoPE in attention).
        mlp: "gelu" (DiT) or "swiglu" (LightningDiT).
        norm: "layernorm" (DiT) or "rmsnorm" (LightningDiT), in every block and the final layer.
        qk_norm: RMSNorm on q and k per head (LightningDiT).
        head_width, head_depth, head_heads: the DDT wide head (RAE: 2048, 2, 16);
            ``head_depth=0`` means no head.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        width: int = 1152,
        depth: int = 28,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        pos: str = "sincos",
        mlp: str = "gelu",
        norm: str = "layernorm",
        qk_norm: bool = False,
        head_width: int = 2048,
        head_depth: int = 0,
        head_heads: int = 16,
    ):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"sit: input_size {input_size} is not divisible by patch_size {patch_size}")
        if pos not in ("sincos", "rope"):
            raise UserError(f"sit pos: '{pos}' is not valid; valid: 'sincos', 'rope'")
        if not isinstance(head_depth, int) or head_depth < 0:
            raise UserError(f"sit head_depth: {head_depth!r} is not valid; valid: an integer >= 0 (0 = no head)")
        if head_depth and head_width % head_heads:
            raise UserError(f"sit head_width: {head_width} is not divisible by head_heads {head_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.grid, self.depth = num_classes, input_size // patch_size, depth
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = SinCosPos(width) if pos == "sincos" else None
        self.rope = Rope2D(width // heads) if pos == "rope" else None
        self.t_embed = TimestepEmbedder(width)
        # weights given up front: the table is initialised in _init_weights, and Embedding's
        # own normal_ init would import torch._dynamo (seconds) on the meta device
        self.y_embed = nn.Embedding(num_classes + 1, width, _weight=torch.empty(num_classes + 1, width))
        self.blocks = nn.ModuleList(AdaLNZeroBlock(width, heads, mlp_ratio, mlp, norm, qk_norm)
                                    for _ in range(depth))
        out_width = width
        if head_depth:  # registered only when asked for: a head-less SiT keeps its exact state_dict
            out_width = head_width
            self.ddt_embed = nn.Conv2d(in_channels, head_width, patch_size, stride=patch_size)
            self.ddt_pos = SinCosPos(head_width) if pos == "sincos" else None
            self.ddt_rope = Rope2D(head_width // head_heads) if pos == "rope" else None
            self.ddt_cond = nn.Linear(width, head_width)
            self.ddt_blocks = nn.ModuleList(AdaLNZeroBlock(head_width, head_heads, mlp_ratio, mlp, norm, qk_norm)
                                            for _ in range(head_depth))
        self.final_norm = adaln_norm(norm, out_width)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(out_width, 2 * out_width))
        self.head = nn.Linear(out_width, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and head.

        ``trunc_normal_`` at +-2 (100 std) is a plain N(0, 0.02); unlike ``normal_`` it
        does not pull in torch's slow decomposition machinery on the meta device.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        embeds = [self.patch_embed] + ([self.ddt_embed] if self.has_head else [])
        for conv in embeds:
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.y_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.trunc_normal_(self.t_embed.mlp[2].weight, std=0.02)
        blocks = list(self.blocks) + (list(self.ddt_blocks) if self.has_head else [])
        zeroed = [b.ada[-1] for b in blocks] + [self.final_ada[-1], self.head]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def has_head(self) -> bool:
        """True when the DDT wide head is present (``head_depth > 0``)."""
        return hasattr(self, "ddt_blocks")

    def _tokens(self, x: torch.Tensor, embed: nn.Conv2d, pos: SinCosPos | None, rope: Rope2D | None):
        """Embed latents as (B, g*g, width) tokens; returns (tokens, RoPE tables or None)."""
        h = embed(x).flatten(2).transpose(1, 2)
        if pos is not None:
            return h + pos.table(self.grid, self.grid, h.device, h.dtype), None
        return h, rope.cos_sin(self.grid, self.grid, h.device, h.dtype)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, g*g, p*p*C) token vectors -> (B, C, g*p, g*p) latents."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.in_channels
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | int,
                hidden_at: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict velocity for latents x (B, C, H, W) at times t in [0, 1] with labels y.

        ``t`` and ``y`` may be scalars or (B,) tensors; any mix of real labels and the
        null label ``num_classes`` is fine within one batch (CFG runs cond and uncond together).
        With ``hidden_at=k`` (1-based, 1..depth) returns ``(velocity, h_k)``, h_k the
        (B, tokens, width) output of backbone block k, still in the autograd graph (REPA).
        """
        if hidden_at is not None and (isinstance(hidden_at, bool) or not isinstance(hidden_at, int)
                                      or not 1 <= hidden_at <= self.depth):
            raise UserError(f"sit hidden_at: {hidden_at!r} is not a block index; valid: 1..{self.depth}")
        b = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            expect = (self.in_channels, self.input_size, self.input_size)
            raise UserError(f"sit input: expected (B, {', '.join(map(str, expect))}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        y = torch.as_tensor(y, device=x.device, dtype=torch.long).reshape(-1).expand(b)
        h, rope = self._tokens(x, self.patch_embed, self.pos, self.rope)
        c = self.t_embed(t) + self.y_embed(y)
        hidden = None
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, c, rope)
            if k == hidden_at:
                hidden = h
        if self.has_head:
            c = self.ddt_cond(h + c[:, None])  # per-token condition for the head and the final layer
            h, rope = self._tokens(x, self.ddt_embed, self.ddt_pos, self.ddt_rope)
            for block in self.ddt_blocks:
                h = block(h, c, rope)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.unpatchify(self.head(modulate(self.final_norm(h), shift, scale)))
        return out if hidden_at is None else (out, hidden)
