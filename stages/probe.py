"""``fae-pipe probe``: does the FAE keep what the encoder understood? Three linear probes, one recipe.

The same logistic-regression probe (``fae_pipe.metrics.probe``: standardised inputs,
L-BFGS for ``probe.iterations`` iterations, one fixed seeded train/held-out split of
``probe.holdout_fraction``) is trained on three views of the same images:

1. ``encoder``: the cached encoder patch tokens, mean-pooled (the store's own encoder space,
   whichever family made it: ``encoder`` in probe.json names it);
2. ``latent``: the FAE posterior-mean latents, mean-pooled over the grid;
3. ``reconstructed``: the feature decoder's rebuild of (1) from (2), mean-pooled.

The paper's claim is that (3) stays close to (1). Samples: up to ``probe.max_samples``
valid rows of the feature store (a seeded subset spread over all classes), view
"orig". Features are read and pooled block by block, so memory holds only the pooled
vectors, never the token arrays. Writes ``<paths.metrics>/probe.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fae_pipe.cache import schema
from fae_pipe.config import Config
from fae_pipe.device import pick_device
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FAE_FILE, FeatureAutoencoder
from fae_pipe.fae.data import open_feature_store
from fae_pipe.metrics.probe import fixed_split, linear_probe
from fae_pipe.sampling.reference import read_view, reference_view, spread_rows
from fae_pipe.training.logs import write_metrics

KINDS = ("encoder", "latent", "reconstructed")
BLOCK = 256  # samples read and pooled at a time


@torch.no_grad()
def pooled_features(group, fae: FeatureAutoencoder, rows: np.ndarray, view: int) -> dict[str, np.ndarray]:
    """Mean-pooled encoder tokens, FAE latents and reconstructed tokens for store ``rows``."""
    out = {k: [] for k in KINDS}
    for lo in tqdm(range(0, len(rows), BLOCK), desc="probe features", unit="block", dynamic_ncols=True):
        x = torch.from_numpy(read_view(group, schema.FEATURES, rows[lo:lo + BLOCK], view))
        z = fae.encode_raw(x)
        x_hat = fae.decode_raw(z, "features")
        out["encoder"].append(x.mean(dim=1).numpy())
        out["latent"].append(z.mean(dim=(2, 3)).float().cpu().numpy())
        out["reconstructed"].append(x_hat.mean(dim=1).float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def run(cfg: Config) -> dict:
    p, paths = cfg.probe, cfg.paths
    t0 = time.perf_counter()
    device = pick_device("auto")
    group = open_feature_store(paths.features)
    rows = spread_rows(np.asarray(schema.read_array(group, schema.VALID), bool), p.max_samples, p.seed)
    labels = np.asarray(schema.read_array(group, schema.LABELS, rows), np.int64)
    if len(np.unique(labels)) < 2:
        raise UserError(f"{paths.features}: the probe needs samples of at least 2 classes; found "
                        f"{len(np.unique(labels))} among {len(rows)} valid samples")
    fae = FeatureAutoencoder.load(Path(paths.fae_run) / FAE_FILE, device=device, attention=cfg.runtime.attention)
    view, view_name = reference_view(group)
    feats = pooled_features(group, fae, rows, view)
    train, test = fixed_split(len(rows), p.holdout_fraction, p.seed)
    num_classes = int(group.attrs.get(schema.A_NUM_CLASSES) or labels.max() + 1)
    result = {"num_samples": int(len(rows)), "num_train": int(len(train)), "num_test": int(len(test)),
              "num_classes": num_classes, "view": view_name, "iterations": p.iterations}
    for kind in KINDS:
        r = linear_probe(feats[kind], labels, train, test, num_classes=num_classes, max_iter=p.iterations,
                         device=device)
        result[f"{kind}_accuracy"] = r.test_accuracy
        result[f"{kind}_train_accuracy"] = r.train_accuracy
        result[f"{kind}_dim"] = int(feats[kind].shape[1])
    enc = group.attrs.get(schema.A_ENCODER)
    enc = enc if isinstance(enc, dict) else {}
    result["encoder_random_weights"] = bool(enc.get("random_weights"))
    # the probe runs in the store's own space: say whose (family, layer) the accuracies are
    result["encoder"] = {"name": enc.get("name"), "family": enc.get("family", "dinov2"), "layer": enc.get("layer", 0)}
    result["wall_seconds"] = round(time.perf_counter() - t0, 3)
    out = Path(paths.metrics) / "probe.json"
    write_metrics(out, result)
    note = " (RANDOM encoder weights)" if result["encoder_random_weights"] else ""
    print(f"probe: held-out top-1 on {len(test)} of {len(rows)} samples ({num_classes} classes): encoder features "
          f"{result['encoder_accuracy']:.4f}, FAE latents {result['latent_accuracy']:.4f}, reconstructed features "
          f"{result['reconstructed_accuracy']:.4f}{note} -> {out}")
    return result
