"""REPA: align a generator's hidden state with the encoder's patch tokens.

REPA adds ``lambda * repa_loss(RepaProjector(h_k), target)`` to the flow-matching
loss, where h_k is the output of generator block k (``SiT.forward(..., hidden_at=k)``)
and ``target`` the DINOv2 patch tokens of the same images. REPA runs DINOv2 online at
every step; fae-pipe reads the targets from the feature cache instead, so this file
holds only what sits between the two: the projector MLP, the loss, the depth rule and
the resampling of the target grid onto the generator's token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fae_pipe.errors import UserError
from fae_pipe.models.layers import grid_of

REPA_XL_BLOCK = 8  # REPA aligns the output of block 8 of SiT-XL (28 blocks)


class RepaProjector(nn.Module):
    """REPA's projector: Linear(width, hidden), SiLU, Linear(hidden, hidden), SiLU, Linear(hidden, target_dim).

    Applied per token, (B, N, width) -> (B, N, target_dim). ``hidden`` is 2048 in
    REPA; a narrower one keeps demo-scale runs from being dominated by the projector.
    PyTorch's default Linear initialisation, as REPA.
    """

    def __init__(self, width: int, target_dim: int, hidden: int = 2048):
        super().__init__()
        for key, value in (("width", width), ("target_dim", target_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"repa projector {key}: {value!r} is not valid; valid: a positive integer")
        self.width, self.target_dim = width, target_dim
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, target_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.width:
            raise UserError(f"repa projector input: last dimension {h.shape[-1]} is not the width {self.width}")
        return self.mlp(h)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-mean`` over batch and tokens of cosine(projected, target), both (B, N, D).

    -1 when every token points the target's way, 0 for orthogonal ones. Computed in
    float32 (the cosine of bf16 vectors is noisy); the target gets no gradient.
    """
    if projected.shape != target.shape:
        raise UserError(f"repa targets: shape {tuple(target.shape)} does not match the projected hidden state "
                        f"{tuple(projected.shape)}; align the token grid with align_targets")
    p = F.normalize(projected.float(), dim=-1)
    q = F.normalize(target.detach().float(), dim=-1)
    return -(p * q).sum(dim=-1).mean()


def align_targets(target: torch.Tensor, size: int | tuple[int, int],
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Put targets (B, N, D) on an h x w grid onto the generator's token grid: (B, gh * gw, D).

    ``size`` is the generator grid (g or (gh, gw)); ``grid`` the targets' (h, w), square
    root of N when omitted. Equal grids return ``target`` itself (exact identity).
    Otherwise area interpolation (``F.interpolate(mode="area")``, adaptive average
    pooling): a generator token's target is the mean of the encoder tokens whose cells
    its image region overlaps, so an integer downsampling averages k x k blocks and an
    integer upsampling repeats each encoder token; tokens are row-major on both grids.
    Averaging rather than bilinear sampling keeps every encoder token's content in
    some target when the generator grid is coarser.
    """
    if target.ndim != 3:
        raise UserError(f"repa targets: expected (B, N, D) patch tokens, got shape {tuple(target.shape)}")
    gh, gw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = grid_of(target.shape[1], grid)
    if (h, w) == (gh, gw):
        return target
    b, _, d = target.shape
    image = target.transpose(1, 2).reshape(b, d, h, w)
    return F.interpolate(image, size=(gh, gw), mode="area").flatten(2).transpose(1, 2)


def default_repa_depth(depth: int) -> int:
    """The block REPA aligns for a backbone of ``depth`` blocks: ``min(8, max(1, depth // 3))``.

    8 for SiT/LightningDiT-XL (28 blocks), REPA's choice, and for L (24); a third of
    the depth below that (B, 12 blocks: 4; the 4-block tiny model: 1). REPA's depth
    ablation favours an early block over later ones, so deeper models keep block 8
    rather than moving the alignment later in proportion.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise UserError(f"repa depth: model depth {depth!r} is not valid; valid: a positive integer")
    return min(REPA_XL_BLOCK, max(1, depth // 3))
