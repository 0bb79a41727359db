"""Frechet distance between Gaussians fitted to feature sets (FID, FD-DINOv2).

Why this file exists: the usual ``scipy.linalg.sqrtm(S1 @ S2)`` route returns
complex matrices, NaNs or large errors when a covariance is nearly singular
(few samples, high dimension, low-rank features). Here the only matrix function
is a symmetric eigendecomposition in float64:

    tr sqrt(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1)))

``sqrt(S1)`` comes from ``eigh(S1)``; ``sqrt(S1) S2 sqrt(S1)`` is symmetric
positive semi-definite, so its eigenvalues are real and non-negative up to
rounding; eigenvalues at rounding level (negative, or below dim * eps * the
largest) are set to 0 before the square root. The result is always real.

Statistics are accumulated in float64, either in one call (``feature_stats``)
or batch by batch (``RunningStats``) so features never need to be held at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fae_pipe.artifacts import atomic_write
from fae_pipe.errors import UserError


def _as_float64(x) -> np.ndarray:
    """Any tensor/array-like -> float64 numpy array (detached, on CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_rows(x) -> np.ndarray:
    """Features as a 2-D float64 array (samples, dims); refuses other shapes."""
    arr = _as_float64(x)
    if arr.ndim != 2:
        raise UserError(f"features must be a 2-D array (samples, dims); got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UserError("features contain NaN or Inf; the feature extractor or its input is broken")
    return arr


def feature_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features ``x`` (N, D), in float64."""
    stats = RunningStats()
    stats.update(x)
    return stats.finalize()


class RunningStats:
    """Streaming mean/covariance: feed batches with ``update``, read with ``finalize``.

    Accumulates the count, the sum and the sum of outer products in float64.
    Sums are taken about a shift (the first batch's mean) so that features with a
    large common offset do not lose precision in ``sum(xx^T) - n mu mu^T``.
    The result equals ``feature_stats`` on the concatenated batches.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, batch) -> None:
        """Add a batch of features (B, D); an empty batch is a no-op."""
        rows = _as_rows(batch)
        if rows.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = rows.mean(axis=0)
            dim = rows.shape[1]
            self._sum = np.zeros(dim, dtype=np.float64)
            self._outer = np.zeros((dim, dim), dtype=np.float64)
        elif rows.shape[1] != self._shift.shape[0]:
            raise UserError(
                f"feature batch has {rows.shape[1]} dims but earlier batches had {self._shift.shape[0]}"
            )
        centred = rows - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += rows.shape[0]

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (mu, sigma) in float64; sigma uses the unbiased 1/(n-1) factor."""
        if self.count < 2:
            raise UserError(f"need at least 2 feature vectors for a covariance; got {self.count}")
        mean_centred = self._sum / self.count
        mu = self._shift + mean_centred
        sigma = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        sigma = 0.5 * (sigma + sigma.T)
        return mu, sigma


def _clean_eigenvalues(eigval: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are rounding noise: negative, or below dim * eps * largest.

    A rank-deficient covariance has exact zero eigenvalues that eigh returns as
    +-1e-16-sized noise; sqrt turns each into ~1e-8 and a few hundred of them
    would bias tr sqrt by ~1e-6. Zeroing below the rounding level removes that.
    """
    top = float(np.max(np.abs(eigval))) if eigval.size else 0.0
    tol = eigval.shape[0] * np.finfo(np.float64).eps * top
    return np.where(eigval > tol, eigval, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh (rounding-level eigenvalues set to 0)."""
    eigval, eigvec = np.linalg.eigh(sigma)
    root = np.sqrt(_clean_eigenvalues(eigval))
    return (eigvec * root) @ eigvec.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2, computed with eigh/eigvalsh in float64."""
    s1 = _as_float64(sigma1)
    s2 = _as_float64(sigma2)
    root1 = _sqrt_psd(0.5 * (s1 + s1.T))
    middle = root1 @ (0.5 * (s2 + s2.T)) @ root1
    eigval = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    return float(np.sqrt(_clean_eigenvalues(eigval)).sum())


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (mu, sigma) pair: shapes (D,), (D, D) and finite values."""
    mu = _as_float64(mu)
    sigma = _as_float64(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(
            f"{name}: mean must be (D,) and covariance (D, D); got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{name}: statistics contain NaN or Inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    d = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2). Always real; a tiny
    negative total from rounding (identical inputs) is returned as 0.0.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise UserError(
            f"statistics have different feature dims ({mu1.shape[0]} vs {mu2.shape[0]}); "
            "they must come from the same feature extractor"
        )
    diff = mu1 - mu2
    total = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2))
    total -= 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(total, 0.0)


def load_stats_npz(path: str | Path, mu_key: str = "mu", sigma_key: str = "sigma") -> tuple[np.ndarray, np.ndarray]:
    """Read reference (mu, sigma) from an .npz file (the layout ADM/pytorch-fid reference files use)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics file {path} does not exist")
    with np.load(path) as data:
        missing = [k for k in (mu_key, sigma_key) if k not in data.files]
        if missing:
            raise UserError(f"{path}: missing arrays {missing}; it holds {sorted(data.files)}")
        mu, sigma = data[mu_key], data[sigma_key]
    return _check_stats(mu, sigma, str(path))


def save_stats_npz(path: str | Path, mu, sigma) -> None:
    """Write (mu, sigma) as float64 arrays ``mu`` and ``sigma`` to an .npz file."""
    mu, sigma = _check_stats(mu, sigma, str(path))
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=mu, sigma=sigma)

    atomic_write(path, write)
