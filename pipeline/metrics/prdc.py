"""Precision, recall, density and coverage from k-NN manifold estimates.

Precision/recall follow Kynkaanniemi et al. 2019 ("Improved precision and recall
metric for assessing generative models"): each point of a set owns a ball whose
radius is the distance to its k-th nearest neighbour in the same set (itself
excluded); the union of balls estimates that set's manifold.

- precision = fraction of fake points inside at least one real ball
- recall    = fraction of real points inside at least one fake ball

Density and coverage (Naeem et al. 2020) reuse the real balls and cost nothing
extra, so they are returned too:

- density  = (1 / (k M)) * sum over fake points of the number of real balls holding it
- coverage = fraction of real balls that hold at least one fake point

"Inside" means distance <= radius. All pairwise distances are computed with
``torch.cdist`` on row chunks, so 10k x 10k sets need only chunk x N floats at a
time. Distances are float32 by default (fast matmul path); pass
``dtype=torch.float64`` when exact ties on ball boundaries matter.
"""

from __future__ import annotations

import numpy as np
import torch

from fae_pipe.errors import UserError


def _as_tensor(x, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features as a 2-D tensor on ``device``; refuses other shapes and NaN/Inf."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to(device=device, dtype=dtype)
    if t.ndim != 2:
        raise UserError(f"{name} features must be 2-D (samples, dims); got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise UserError(f"{name} features contain NaN or Inf")
    return t


def _chunks(n: int, size: int):
    """Yield (start, stop) row ranges covering 0..n in steps of ``size``."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def knn_radii(x: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row of ``x``."""
    n = x.shape[0]
    if n <= k:
        raise UserError(f"k-NN radius with k={k} needs more than {k} points; got {n}")
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for start, stop in _chunks(n, chunk_size):
        dist = torch.cdist(x[start:stop], x)
        # The row's own point is at distance 0 and is its 1st smallest value, so the
        # k-th neighbour is the (k+1)-th smallest; duplicates of a point count as neighbours.
        radii[start:stop] = torch.topk(dist, k + 1, dim=1, largest=False).values[:, k]
    return radii


def _cross_pass(fake, real, real_radii, fake_radii, chunk_size):
    """One sweep over fake x real distances, chunked over fake rows.

    Returns (per fake point: number of real balls holding it,
    per real ball: whether any fake point lies in it,
    per real point: whether it lies in any fake ball).
    """
    fake_in_real = torch.empty(fake.shape[0], dtype=torch.long, device=fake.device)
    real_ball_hit = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    real_in_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start, stop in _chunks(fake.shape[0], chunk_size):
        dist = torch.cdist(fake[start:stop], real)
        inside_real = dist <= real_radii.unsqueeze(0)
        fake_in_real[start:stop] = inside_real.sum(dim=1)
        real_ball_hit |= inside_real.any(dim=0)
        real_in_fake |= (dist <= fake_radii[start:stop].unsqueeze(1)).any(dim=0)
    return fake_in_real, real_ball_hit, real_in_fake


def prdc(
    real,
    fake,
    k: int = 3,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (M, D) against ``real`` (N, D).

    ``k`` is the neighbour rank that sets each ball's radius (3 in the paper);
    ``chunk_size`` bounds memory to chunk_size x max(N, M) distances.
    """
    if k < 1:
        raise UserError(f"k must be >= 1; got {k}")
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1; got {chunk_size}")
    device = torch.device(device)
    real_t = _as_tensor(real, "real", device, dtype)
    fake_t = _as_tensor(fake, "fake", device, dtype)
    if real_t.shape[1] != fake_t.shape[1]:
        raise UserError(
            f"real and fake features differ in dims ({real_t.shape[1]} vs {fake_t.shape[1]}); "
            "use the same feature extractor for both"
        )
    real_radii = knn_radii(real_t, k, chunk_size)
    fake_radii = knn_radii(fake_t, k, chunk_size)

    fake_in_real, covered, real_in_fake = _cross_pass(fake_t, real_t, real_radii, fake_radii, chunk_size)
    return {
        "precision": float((fake_in_real > 0).double().mean()),
        "recall": float(real_in_fake.double().mean()),
        "density": float(fake_in_real.double().sum() / (k * fake_t.shape[0])),
        "coverage": float(covered.double().mean()),
    }
