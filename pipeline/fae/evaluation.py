"""Held-out reconstruction numbers for the FAE stages: feature MSE/cosine, pixel PSNR/LPIPS and the grid.

Feature metrics use the posterior mean (what ``encode`` stores) and every view
of every evaluation sample; sums are accumulated in float64 so the numbers do not
depend on the batch size. ``mse_relative`` divides the squared error by the
held-out features' own variance per channel (the fraction of variance left
unexplained), which, unlike the raw MSE, compares across encoders of different
feature scale.

The pixel decoder's evaluation set is fixed for a run: the first
``decoder.eval_images`` valid held-out samples, original view, read once. Inputs
are what the current phase trains on without its noise: clean real features in
phase 1, the frozen FAE's reconstruction in phase 2. The baseline predicts one
constant image for every sample, the per-pixel mean of the evaluation targets
themselves: the best any input-blind decoder can do on this set (an oracle, so
beating it is a real bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import pixels_to_unit
from fae_pipe.fae.data import load_view, read_rows, save_grid
from fae_pipe.fae.objectives import token_cosine
from fae_pipe.metrics.image import lpips_distance, psnr_per_image


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


@dataclass
class EvalSet:
    features: np.ndarray  # (n, N, D) float16, view 0
    pixels: np.ndarray  # (n, H, W, 3) uint8, view 0


def load_eval_set(group, index, split, limit: int, image_size: int, view_names) -> EvalSet:
    rows = split.holdout_rows(limit)
    if rows.size == 0:
        raise UserError("train-decoder: the dataset has no held-out sample to score: set data.holdout_fraction > 0 "
                        "and re-run `fae-pipe prepare` and `extract`")
    feats = read_rows(group, schema.FEATURES, rows)[:, 0]
    pixels = np.stack([load_view(index, split.sample_ids[r], image_size, view_names, 0) for r in rows])
    return EvalSet(feats, pixels)


@torch.no_grad()
def evaluate_decoder(pdec, eval_set: EvalSet, lpips_model, device, fae=None, grid_path=None,
                     batch_size: int = 32) -> dict:
    """Decode the evaluation set and score it; ``fae`` given -> decode the FAE's reconstructions."""
    was_training = pdec.training
    pdec.eval()
    preds = []
    for lo in range(0, len(eval_set.features), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(eval_set.features[lo:lo + batch_size])).to(device, torch.float32)
        if fae is not None:
            x = fae.reconstruct(x)
        preds.append(pixels_to_unit(pdec(x)).cpu())
    pdec.train(was_training)
    pred = torch.cat(preds)
    target = torch.from_numpy(eval_set.pixels).permute(0, 3, 1, 2)
    mean_image = target.double().mean(0, keepdim=True).div(255.0).expand(len(target), -1, -1, -1)
    out = {
        "psnr": float(psnr_per_image(pred, target).mean()),
        "lpips": float(lpips_distance(lpips_model, pred, target).mean()),
        "baseline_psnr": float(psnr_per_image(mean_image, target).mean()),
        "eval_images": int(len(target)),
    }
    if grid_path is not None:
        recon = (pred.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        save_grid(grid_path, eval_set.pixels, recon)
    return out
