"""train-sit on every generator input of the same cache (FAE latents, raw features = RAE) and with REPA.

Real stores of the tiny trained pipeline, the real CLI. "Beats the input-blind baseline":
a velocity model that ignores x_t can at best predict -E[x0 | y], whose loss is
1 + the mean within-class variance of the normalised data; a model below that uses x_t.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fae_pipe.cli import main
from fae_pipe.config import load_config
from fae_pipe.data.features import FeatureBatches
from fae_pipe.data.latents import LatentBatches
from fae_pipe.training.sit_export import load_sit_export
from tiny_pipeline import session_pipeline

STEPS = 40
SIT = ["--set", "sit.model=sit_tiny", "--set", "sit.eval_samples=0", "--set", f"sit.train.steps={STEPS}",
       "--set", "sit.train.batch_size=12", "--set", "sit.train.lr=0.002", "--set", "sit.train.warmup=0",
       "--set", "sit.train.checkpoint_every=20", "--set", "sit.train.log_every=1", "--set", "sit.train.precision=fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_pipeline(tmp_path_factory)


def train(tiny: Path, run: Path, *sets: str) -> dict:
    main(["train-sit", "--config", str(tiny), "--set", f"paths.sit_run={run}", "--set",
          f"paths.metrics={run}/metrics", *SIT, *sets])
    return json.loads((run / "metrics" / "sit.json").read_text())


def loss_rows(run: Path) -> list[dict]:
    with open(run / "loss.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(fh)]


def blind_loss(batches) -> float:
    """1 + mean within-class variance of the normalised training data (one pass over an epoch)."""
    xs, ys = [], []
    for _, x, y in batches.from_step(0, torch.device("cpu")):
        xs.append(x.numpy())
        ys.append(y.numpy())
        if len(xs) >= batches.steps_per_epoch:
            break
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
    within = sum(((x[y == c] - x[y == c].mean(0)) ** 2).sum() for c in np.unique(y)) / x.size
    return 1.0 + within


@pytest.mark.parametrize("generator_input", ["latents", "features"])
def test_each_input_trains_below_the_input_blind_baseline(tiny, tmp_path, generator_input):
    cfg = load_config(str(tiny))
    summary = train(tiny, tmp_path / "run", "--set", f"sit.input={generator_input}")
    if generator_input == "features":
        batches = FeatureBatches(cfg.paths.features, 12, 0)
        shape, mode, factor = (384, 8, 8), "dim", (384 * 64 / 4096) ** 0.5  # RAE's a = sqrt(HWC / base)
    else:
        batches = LatentBatches(cfg.paths.latents, 12, 0)
        shape, mode, factor = (8, 8, 8), "scalar", 1 / 0.4
    last = np.mean([float(r["loss"]) for r in loss_rows(tmp_path / "run")[-10:]])
    assert last < 0.9 * blind_loss(batches), (last, blind_loss(batches))
    export = load_sit_export(tmp_path / "run" / "sit.safetensors")
    assert export["latent_shape"] == list(shape) and export["transport"]["generator_input"] == generator_input
    assert export["transport"]["shift_mode"] == mode and export["transport"]["shift_mode_config"] == "auto"
    assert export["transport"]["shift_factor"] == pytest.approx(factor)
    assert export["latent_stats"] == batches.info.stats.to_dict() and summary["steps"] == STEPS
    # the sampler decodes each space with its own path (features: the pixel decoder alone)
    main(["sample", "--config", str(tiny), "--set", f"paths.sit_run={tmp_path / 'run'}", "--set",
          f"paths.samples={tmp_path / 'samples'}", "--set", "sample.num_samples=3", "--set", "sample.steps=2"])
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (3, 64, 64, 3) and images.std() > 0


@pytest.mark.parametrize("generator_input", ["latents", "features"])
def test_repa_run_stopped_and_resumed_is_exact(tiny, tmp_path, generator_input):
    repa = ["--set", f"sit.input={generator_input}", "--set", "sit.repa_weight=0.5", "--set",
            "sit.repa_projector=repa_projector_tiny", "--set", "sit.train.steps=6", "--set",
            "sit.train.checkpoint_every=3"]
    whole = train(tiny, tmp_path / "whole", *repa)
    rows = loss_rows(tmp_path / "whole")
    assert all(-1.0 <= float(r["repa"]) <= 1.0 for r in rows) and whole["steps"] == 6
    train(tiny, tmp_path / "parts", *repa, "--set", "sit.train.steps=3")
    main(["train-sit", "--config", str(tiny), "--set", f"paths.sit_run={tmp_path / 'parts'}", "--set",
          f"paths.metrics={tmp_path / 'parts'}/metrics", *SIT, *repa, "--resume"])
    assert loss_rows(tmp_path / "parts") == rows
    a, b = (load_sit_export(tmp_path / r / "sit.safetensors") for r in ("whole", "parts"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # REPA changes training: the same run without it takes other steps
    train(tiny, tmp_path / "plain", "--set", f"sit.input={generator_input}", "--set", "sit.train.steps=6")
    assert [r["loss"] for r in loss_rows(tmp_path / "plain")] != [r["loss"] for r in rows]
