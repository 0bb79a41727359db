"""Shared building blocks for every fae-pipe model, written once.

The FAE encoder, both decoders and the SiT backbone are all transformers over a
2-D grid of tokens; they differ in what goes in and out, not in how attention,
normalisation, MLPs or positions work. Keeping those pieces here means one place
to get right (and to test): attention dispatch, RMSNorm, SwiGLU, 2-D RoPE and the
fixed sin-cos table. The attention kernel is a per-layer value (``SelfAttention.backend``,
"sdpa" unless ``set_attention_backend`` says otherwise).

Tensor layout inside attention is (batch, heads, tokens, head_dim), the layout
``torch.nn.functional.scaled_dot_product_attention`` takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fae_pipe.errors import UserError

ATTENTION_BACKENDS = ("sdpa", "xformers")
_XFORMERS = None  # import memo: None not tried yet, False unavailable, else the xformers.ops module


def _xformers_ops():
    """Import xformers.ops once, lazily; return it or False when it cannot be used."""
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # optional extra (``pip install fae-pipe[cuda]``)

            _XFORMERS = xops
        except Exception:  # ImportError, or a build that fails to load against this torch
            _XFORMERS = False
    return _XFORMERS


def _require_xformers():
    """xformers.ops, or a one-line UserError: xformers was asked for on CUDA and does not import."""
    xops = _xformers_ops()
    if not xops:
        raise UserError("runtime.attention = 'xformers' but xformers does not import here; "
                        "install it (pip install 'fae-pipe[cuda]') or set runtime.attention=sdpa")
    return xops


def check_attention_backend(backend: str, key: str = "runtime.attention") -> str:
    """Return ``backend`` if it names an attention kernel, else a one-line UserError naming ``key``."""
    if backend not in ATTENTION_BACKENDS:
        raise UserError(f"{key} = {backend!r} is invalid: expected one of {', '.join(ATTENTION_BACKENDS)}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Softmax attention over (B, H, N, Dh) tensors, returning (B, H, N, Dh).

    ``backend`` is chosen explicitly, never by what happens to be installed:
    "sdpa" (default) is PyTorch's ``scaled_dot_product_attention`` on every device
    (on CPU it matches naive attention to ~1e-6 and is several times faster);
    "xformers" uses xformers' memory-efficient kernel for CUDA tensors, and is a
    UserError there when xformers does not import. xformers has no CPU kernel, so
    CPU tensors always take SDPA, also when "xformers" was asked for (a model
    configured for a GPU still runs in CPU tests and tools).

    ``mask`` (boolean, broadcastable to (B, H, N, M), True = attend) restricts the keys,
    e.g. the padding of variable-length text tokens in joint attention; masked calls
    always take SDPA. ``causal`` (N == M): query i attends to keys 0..i only (the
    autoregressive flow's training pass).
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if check_attention_backend(backend) == "xformers" and q.is_cuda:
        xops = _require_xformers()
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def set_attention_backend(module, backend: str):
    """Set the attention kernel of every ``SelfAttention`` in ``module``; returns ``module``.

    ``module`` is a model or an iterable of models (None entries skipped, e.g. the
    parts of a ``FeatureAutoencoder`` without a pixel decoder). The one switch for built
    models (FAE, decoders, SiT), so the kernel is a value passed from the config
    (``runtime.attention``) rather than a side effect of what imports.
    """
    check_attention_backend(backend)
    models = [module] if isinstance(module, nn.Module) else [m for m in module if m is not None]
    if backend == "xformers" and any(p.is_cuda for m in models for p in m.parameters()):
        _require_xformers()  # fail before the first batch, not in the middle of a run
    for model in models:
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.backend = backend
    return module


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no mean subtraction, no bias).

    Written out rather than taken from ``torch.nn`` so the epsilon and the fp32
    accumulation are explicit and identical on every torch version.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    """Build a norm by name: "rms" (RMSNorm) or "layer" (LayerNorm, eps 1e-6)."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    raise UserError(f"model norm: '{kind}' is not a norm; valid: 'rms', 'layer'")


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of a SwiGLU with the same parameter budget as a ratio-r GELU MLP.

    A gated MLP has three matrices instead of two, so its hidden width is 2/3 of
    ``mlp_ratio * dim`` (1536 x 4 -> 4096), which keeps the paper's counts.
    """
    return int(2 * mlp_ratio * dim / 3)


class SwiGLU(nn.Module):
    """Gated MLP: ``w_out(silu(a) * b)`` with ``a, b`` from one fused input matrix."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


class GeluMLP(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, the ViT/DiT default."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    """Build an MLP by name: "swiglu" (hidden 2/3 * ratio * dim) or "gelu" (hidden ratio * dim)."""
    if kind == "swiglu":
        return SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
    if kind == "gelu":
        return GeluMLP(dim, int(mlp_ratio * dim))
    raise UserError(f"model mlp: '{kind}' is not an MLP kind; valid: 'swiglu', 'gelu'")


def grid_of(n_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Return the (h, w) token grid: ``grid`` if given, else the square root of N."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n_tokens:
            raise UserError(f"model input: grid {h}x{w} does not match {n_tokens} tokens")
        return h, w
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise UserError(f"model input: {n_tokens} tokens is not a square grid; pass grid=(h, w)")
    return side, side


class Rope2D(nn.Module):
    """Axial 2-D rotary position embedding for an h x w token grid.

    Half of each head's channel pairs rotate with the row index, the other half
    with the column index, at geometric frequencies ``base ** (-i / n)``. A
    rotation keeps vector norms, and q.k then depends only on the offset between
    the two tokens, so the same weights work at any grid size. cos/sin tables are
    cached per (h, w, device, dtype).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise UserError(f"model rope: head_dim {head_dim} must be a multiple of 4 for 2-D RoPE")
        self.head_dim = head_dim
        self.base = base
        self._cache: dict = {}

    def cos_sin(self, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each (h*w, head_dim/2), for row-major token order."""
        key = (h, w, str(device), dtype)
        if key not in self._cache:
            n_freq = self.head_dim // 4
            f64 = dict(dtype=torch.float64, device=torch.device("cpu"))
            freqs = self.base ** (-torch.arange(n_freq, **f64) / n_freq)
            rows = torch.arange(h, **f64).repeat_interleave(w)
            cols = torch.arange(w, **f64).repeat(h)
            angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
            self._cache[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x (..., N, Dh) by the angles behind cos/sin."""
    a, b = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # stay in x's precision under autocast
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (h*w, dim) on CPU: half the channels code the row, half the column.

    Always computed on the CPU (even under ``with torch.device("meta")``) so the
    values are real; callers move it where they need it.
    """
    if dim % 4:
        raise UserError(f"model pos: width {dim} must be a multiple of 4 for the 2-D sin-cos table")
    cpu = torch.device("cpu")
    n_freq = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(n_freq, dtype=torch.float64, device=cpu) / n_freq)
    rows = torch.arange(h, dtype=torch.float64, device=cpu).repeat_interleave(w)[:, None] * omega
    cols = torch.arange(w, dtype=torch.float64, device=cpu).repeat(h)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


class SinCosPos(nn.Module):
    """Fixed 2-D sin-cos positions, built on first use and cached per (h, w, device, dtype).

    Not a buffer on purpose: a model built on the meta device and materialised
    with ``to_empty`` would get an uninitialised table; this one is always computed.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self._cache: dict = {}

    def table(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """Return the (1, h*w, dim) table."""
        key = (h, w, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = sincos_2d(self.dim, h, w)[None].to(device, dtype)
        return self._cache[key]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional RoPE.

    ``head_dim`` is independent of ``dim`` so a layer can attend in a wider space
    than its tokens (the FAE encoder: 1536-d tokens, 24 x 256 = 6144-d attention).
    ``backend`` is the attention kernel (see ``attention``); set it model-wide with
    ``set_attention_backend``. ``qk_norm`` (LightningDiT) RMS-normalises q and k per head,
    before RoPE, which bounds the attention logits and keeps wide models stable in low
    precision; off by default, and then no norm modules exist (state_dicts unchanged).
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, bias: bool = True,
                 backend: str = "sdpa", qk_norm: bool = False):
        super().__init__()
        self.backend = check_attention_backend(backend, "model attention backend")
        if head_dim is None:
            if dim % heads:
                raise UserError(f"model attention: width {dim} is not divisible by heads {heads}")
            head_dim = dim // heads
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.qk_norm = bool(qk_norm)
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                causal: bool = False, cache: dict | None = None) -> torch.Tensor:
        """``causal``: token i sees tokens <= i only. ``cache`` (a dict, filled in place) is
        autoregressive decoding's KV cache: the keys and values of every token fed so far are
        kept, and the new token(s) attend to them and, causally, to each other."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and "k" in cache:
            if n > 1:
                raise ValueError("SelfAttention cache: feed one token per call once the cache holds tokens")
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            causal = False  # one new query: every cached key is in its past
        if cache is not None:
            cache["k"], cache["v"] = k, v
        out = attention(q, k, v, self.backend, causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block ``x + attn(norm(x)); x + mlp(norm(x))`` used by both decoders.

    ``norm`` is "rms" or "layer", ``mlp`` is "swiglu" or "gelu": the feature
    decoder uses RMSNorm + SwiGLU (paper), the pixel decoder a ViT-L-style block.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "rms", mlp: str = "swiglu"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = make_norm(norm, dim)
        self.mlp = make_mlp(mlp, dim, mlp_ratio)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                causal: bool = False, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, causal=causal, cache=cache)
        return x + self.mlp(self.norm2(x))


def init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (ViT/DiT convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
