"""Held-out reconstruction numbers for the FAE stages: feature MSE/cosine, pixel PSNR/LPIPS.

Feature metrics use the posterior mean (what ``encode`` stores) and every view
of every evaluation sample; sums are accumulated in float64 so the numbers do not
depend on the batch size. ``mse_relative`` divides the squared error by the
held-out features' own variance per channel (the fraction of variance left
unexplained), which, unlike the raw MSE, compares across encoders of different
feature scale.
"""

from __future__ import annotations

import numpy as np
import torch

from fae_pipe.fae.losses import token_cosine


@torch.no_grad()
def feature_metrics(module, features: np.ndarray, device, batch_size: int = 64) -> dict:
    """Reconstruct ``features`` (n, V, N, D) through ``module`` (z = posterior mean) and score it."""
    flat = features.reshape(-1, *features.shape[2:])
    was_training = module.training
    module.eval()
    sse = cos = 0.0
    tokens = 0
    s1 = np.zeros(flat.shape[-1])
    s2 = np.zeros(flat.shape[-1])
    for lo in range(0, flat.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(flat[lo:lo + batch_size])).to(device, torch.float32)
        x_hat = module(x, sample=False)[0].float()
        sse += float((x_hat - x).double().pow(2).sum())
        cos += float(token_cosine(x_hat, x).double().sum())
        tokens += x.shape[0] * x.shape[1]
        xd = x.double().flatten(0, 1)
        s1 += xd.sum(0).cpu().numpy()
        s2 += xd.pow(2).sum(0).cpu().numpy()
    module.train(was_training)
    if tokens == 0:
        return {}
    elements = tokens * flat.shape[-1]
    variance = float((s2 - s1**2 / tokens).sum())
    return {"mse": sse / elements, "cosine": cos / tokens, "mse_relative": sse / max(variance, 1e-30),
            "eval_samples": int(features.shape[0]), "eval_views": int(features.shape[1])}
