"""Held-out scoring of the pixel decoder: PSNR, LPIPS, the constant-image baseline and the PNG grid.

The evaluation set is fixed for a run: the first ``decoder.eval_images`` valid
held-out samples, original view, read once. Inputs are what the current stage
trains on without its noise: clean real features in stage 1, the frozen FAE's
reconstruction in stage 2. The baseline predicts one constant image for every
sample, the per-pixel mean of the evaluation targets themselves: the best any
input-blind decoder can do on this set (an oracle, so beating it is a real bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import pixels_to_unit
from fae_pipe.fae.data import read_rows
from fae_pipe.fae.pixels import load_view, save_grid
from fae_pipe.metrics.image import lpips_distance, psnr_per_image


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
            x = fae.decode(fae.encode(x, normalized=False), normalized=False)
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
