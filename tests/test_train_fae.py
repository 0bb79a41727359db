"""train-fae on tiny structured features: it learns, resumes bit-exactly after a kill, stops on NaN."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fae_pipe.artifacts import seeded_generator
from fae_pipe.cache import schema
from fae_pipe.config import load_config
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import load_fae_file
from fae_pipe.fae.objectives import adaptive_weight, discriminator_loss, feature_loss, generator_loss, noise_features
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.stages import train_fae
from fae_pipe.training.checkpoint import load_checkpoint

from fae_helpers import DIM, THREAD_ENV, cli, make_dataset, make_feature_store, write_config

# Held-out cosine after 40 steps must exceed 0.6 AND the input-blind baseline (the mean
# training token at each grid position, ~0.26 on this data) by 0.2. Measured: 0.88. An
# untrained FAE scores ~0; 0.6 leaves room for noise, not for a loop that does not learn.
COSINE_THRESHOLD = 0.6


def blind_cosine(store, split) -> float:
    """Cosine of held-out tokens to the per-position mean of the training tokens (all views)."""
    import zarr

    feats = zarr.open_group(str(store))[schema.FEATURES][:].astype(np.float32)
    mean = torch.from_numpy(feats[split.train].mean(axis=(0, 1)))
    held = torch.from_numpy(feats[split.holdout])
    return float(torch.nn.functional.cosine_similarity(held, mean[None, None], dim=-1).mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fae")
    _, index, z = make_dataset(root, grid=4)  # 4x4 tokens: a quarter of the demo's step cost
    make_feature_store(root / "features.zarr", index, z)
    return root


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    post = DiagonalGaussian(torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g))
    loss, mse, kl = feature_loss(x_hat, x, post, beta=0.5)
    ref_kl = 0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar).mean()
    assert torch.allclose(mse, ((x_hat - x) ** 2).mean()) and torch.allclose(kl, ref_kl)
    assert torch.allclose(loss, mse + 0.5 * ref_kl)
    noisy = noise_features(x, 0.4, torch.Generator().manual_seed(1))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(noisy, x + 0.4 * x.pow(2).mean(-1, keepdim=True).sqrt() * eps)
    # RAE's schedule: one level per sample, U(0, sigma), drawn after the noise from the same generator
    g = torch.Generator().manual_seed(1)
    eps, u = torch.randn(x.shape, generator=g), torch.rand(x.shape[0], generator=g)
    noisy = noise_features(x, 0.8, torch.Generator().manual_seed(1), "uniform")
    assert torch.allclose(noisy, x + (0.8 * u)[:, None, None] * x.pow(2).mean(-1, keepdim=True).sqrt() * eps)
    big = torch.ones(1000, 64, 16)  # token RMS 1: each sample's noise std is its level
    levels = (noise_features(big, 0.8, torch.Generator().manual_seed(2), "uniform") - big).std(dim=(1, 2))
    assert float(levels.min()) < 0.02 and 0.76 < float(levels.max()) < 0.85
    assert float(levels.mean()) == pytest.approx(0.4, abs=0.03)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.75)
    w = torch.nn.Parameter(torch.ones(3))
    nll, g_loss = (2 * w).sum(), (w**2).sum() * 0.5
    assert adaptive_weight(nll, g_loss, w).item() == pytest.approx(2 * 3**0.5 / (3**0.5 + 1e-4))


def test_training_learns_and_writes_artefacts(data, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", data, fae={"train": {"steps": 40, "eval_every": 20, "lr": 3e-3}},
                                   paths={"fae_run": str(tmp_path / "run"), "metrics": str(tmp_path / "m")}))
    train_fae.run(cfg)
    log = rows(tmp_path / "run" / "loss.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 41)) and set(log[0]) == {"step", "loss", "mse", "kl", "lr"}
    first, last = np.mean([float(r["loss"]) for r in log[:5]]), np.mean([float(r["loss"]) for r in log[-5:]])
    assert last < 0.6 * first
    evals = rows(tmp_path / "run" / "eval.csv")
    assert float(evals[-1]["cosine"]) > float(evals[0]["cosine"])
    metrics = json.loads((tmp_path / "m" / "fae.json").read_text())
    from fae_pipe.fae.data import feature_split, open_feature_store

    split = feature_split(open_feature_store(cfg.paths.features), cfg.paths.index)
    assert metrics["cosine"] > max(COSINE_THRESHOLD, blind_cosine(cfg.paths.features, split) + 0.2)
    assert metrics["cosine"] > COSINE_THRESHOLD and metrics["eval_samples"] == 16 and metrics["steps"] == 40
    export = load_fae_file(tmp_path / "run" / "fae.safetensors")
    assert export["models"] == {"encoder": "fae_tiny.encoder", "feature_decoder": "fae_tiny.feature_decoder"}
    assert export["source_features"]["config_hash"] == "synthetic-features-v1" and export["feature_dim"] == DIM


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    common = dict(fae={"train": {"steps": 24, "checkpoint_every": 4, "keep_last": 20, "eval_every": 100, "ema_decay": 0.9}})
    ref_cfg = write_config(tmp_path / "ref.yaml", data, paths={"fae_run": str(tmp_path / "ref"),
                                                              "metrics": str(tmp_path / "mref")}, **common)
    train_fae.run(load_config(ref_cfg))
    cfg = write_config(tmp_path / "cut.yaml", data, paths={"fae_run": str(tmp_path / "cut"),
                                                          "metrics": str(tmp_path / "mcut")}, **common)
    proc = subprocess.Popen([sys.executable, "-m", "fae_pipe.cli", "train-fae", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **THREAD_ENV))
    marker = tmp_path / "cut" / "checkpoints" / "step-000000008.pt"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "fae.safetensors").exists(), "the run finished before it could be killed"
    cli("train-fae", "--config", str(cfg), "--resume")
    a = load_fae_file(tmp_path / "ref" / "fae.safetensors")
    b = load_fae_file(tmp_path / "cut" / "fae.safetensors")
    for part in ("encoder", "feature_decoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert rows(tmp_path / "ref" / "loss.csv") == rows(tmp_path / "cut" / "loss.csv")
    before = (tmp_path / "ref" / "fae.safetensors").read_bytes()
    train_fae.run(load_config(ref_cfg), resume="latest")  # finished: trains nothing (as dvc repro after a code edit)
    assert (tmp_path / "ref" / "fae.safetensors").read_bytes() == before  # same file, so its fingerprint still holds


def test_an_export_with_the_same_weights_is_not_rewritten(tmp_path):
    from fae_pipe.artifacts import read_export
    from fae_pipe.fae.autoencoder import save_unless_same_weights

    path = tmp_path / "m.safetensors"

    def save(w, wall=None, grid=(4, 4)):
        meta = {"format": "t", "grid": grid, **({} if wall is None else {"wall": wall})}
        return save_unless_same_weights(path, {"w": {"a": w}}, meta, ("format", "grid"))

    assert save(torch.ones(2), 1.0)
    first = path.read_bytes()
    assert not save(torch.ones(2), 2.0)  # run-specific metadata only: kept
    assert path.read_bytes() == first
    assert not save(torch.ones(2))
    assert save(torch.ones(2), 2.5, grid=(2, 8))  # identity metadata differs
    assert save(torch.tensor([1.0, 2.0]), 3.0)
    assert read_export(path)[1]["wall"] == 3.0
    assert save(torch.tensor([1, 2]), 4.0)  # dtype differs


def test_nan_in_the_data_stops_with_the_documented_message(data, tmp_path):
    """Poison one view of one training sample that the loader first serves in epoch 1."""
    import shutil

    store = tmp_path / "features.zarr"
    shutil.copytree(data / "features.zarr", store)
    cfg = load_config(write_config(tmp_path / "c.yaml", data, paths={
        "features": str(store), "fae_run": str(tmp_path / "run"), "metrics": str(tmp_path / "m")},
        fae={"train": {"steps": 12, "checkpoint_every": 3, "eval_every": 100}}))
    from fae_pipe.fae.data import feature_split, open_feature_store

    split = feature_split(open_feature_store(str(store)), cfg.paths.index, str(store))
    loader = ShardedLoader(store, ["features"], 16, 0, sample_mask=split.train, memory_budget_bytes=4 << 30)
    per_epoch = loader.steps_per_epoch
    order1, v0, v1 = loader.epoch_order(1), loader.epoch_views(0), loader.epoch_views(1)
    pos = next(i for i, s in enumerate(order1) if v0[s] != v1[s])
    sample, step = int(order1[pos]), per_epoch + pos // 16 + 1
    import zarr

    arr = zarr.open_group(str(store), mode="r+")[schema.FEATURES]
    block = arr[sample:sample + 1]
    block[0, v1[sample], 3, 7] = np.nan
    arr[sample:sample + 1] = block
    proc = cli("train-fae", "--config", str(tmp_path / "c.yaml"), check=False)
    assert proc.returncode == 2
    last_good = (step - 1) // 3 * 3
    expected = (f"fae-pipe: error: train-fae: non-finite loss (nan) at step {step}; training stopped, last good "
                f"checkpoint: {tmp_path / 'run' / 'checkpoints' / f'step-{last_good:09d}.pt'}")
    assert expected in proc.stderr
    assert not (tmp_path / "run" / "fae.safetensors").exists()
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{last_good:09d}.pt")
    assert ck["step"] == last_good and all(torch.isfinite(v).all() for v in ck["models"]["model"].values())
    with pytest.raises(UserError, match="non-finite loss"):
        train_fae.run(cfg, resume="latest")


def test_step_noise_does_not_depend_on_history():
    a = torch.randn(3, generator=seeded_generator(0, 0, 7, "posterior"))
    torch.randn(100)
    b = torch.randn(3, generator=seeded_generator(0, 0, 7, "posterior"))
    assert torch.equal(a, b)


def test_a_store_without_training_samples_serves_evaluation_only(tmp_path):
    """An evaluation-only index (COCO val: every image held out) is refused for training, accepted for scoring."""
    from fae_pipe.data.index import DatasetIndex, write_index
    from fae_pipe.fae.data import feature_split

    _, index, z = make_dataset(tmp_path, classes=2, per_class=4, grid=4)
    held = DatasetIndex(root=index.root, classes=index.classes, paths=list(index.paths), labels=index.labels,
                        sizes=index.sizes, holdout=np.ones(len(index), bool), seed=index.seed, holdout_fraction=1.0)
    write_index(held, tmp_path / "all_held.npz")
    make_feature_store(tmp_path / "features.zarr", held, z)
    group = schema.open_feature_store(tmp_path / "features.zarr")
    with pytest.raises(UserError, match="no valid training sample"):
        feature_split(group, str(tmp_path / "all_held.npz"), "features.zarr")
    split = feature_split(group, str(tmp_path / "all_held.npz"), "features.zarr", need_train=False)
    assert split.holdout.all() and not split.train.any()
