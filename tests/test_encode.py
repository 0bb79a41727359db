"""encode: resumable bit-identical latent store, exact channel statistics, latents that decode back."""

import json
import os
import pickle
import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fae_pipe.artifacts import file_fingerprint
from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import record_path
from fae_pipe.cache.inspect import inspect_store
from fae_pipe.cache.inspect import verify_store as verify_with
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.config import load_config
from fae_pipe.data.index import read_index
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FeatureAutoencoder, grid_to_tokens
from fae_pipe.fae.data import feature_split, open_feature_store
from fae_pipe.fae.objectives import token_cosine
from fae_pipe.stages import encode, train_fae
from fae_pipe.tasks.latents import EncodeTask

from fae_helpers import cli, make_dataset, make_feature_store, write_config

# verify_store takes the index reader (cache must not import data); tests always pass the real one
verify_store = partial(verify_with, read_index=read_index)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny feature store, an FAE trained on it for 30 steps, and its latent store."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("enc")
    _, index, z = make_dataset(root, grid=4)
    make_feature_store(root / "features.zarr", index, z)
    path = write_config(root / "c.yaml", root, fae={"train": {"steps": 30, "lr": 3e-3, "eval_every": 100}},
                        encode={"shards": 2, "batch_size": 8, "store_std": False})
    cfg = load_config(path)
    train_fae.run(cfg)
    encode.run(cfg)
    torch.set_num_threads(before)
    return root, path, cfg


def data_files(store: Path) -> dict:
    """Every file of a store except the writer's bookkeeping, as bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and schema.BOOKKEEPING_DIR not in p.relative_to(store).parts}


def test_refuses_without_fae_checkpoint(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path))
    with pytest.raises(UserError) as err:
        encode.run(cfg)
    assert str(tmp_path / "fae" / "fae.safetensors") in str(err.value) and "\n" not in str(err.value)


def test_interrupted_store_is_rebuilt_bit_identical(trained, tmp_path):
    root, path, cfg = trained
    ref = root / "latents.zarr"
    cut = tmp_path / "latents.zarr"
    shutil.copytree(ref, cut)
    group = zarr.open_group(str(cut), mode="r+")
    # what a SIGKILL during shards 2-3 leaves: no records, missing/partial shard files, a stale lock
    for shard in (2, 3):
        record_path(cut, shard).unlink()
        victim = schema.shard_file(cut, group, schema.LATENTS, shard)
        victim.with_name(victim.name + ".partial").write_bytes(b"torn")
        victim.unlink()
    group.attrs[schema.A_COMPLETE] = False
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cut / schema.BOOKKEEPING_DIR / "lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    proc = cli("encode", "--config", str(path), "--set", f"paths.latents={cut}")
    assert "2 shards written, 2 skipped" in proc.stderr
    assert data_files(ref) == data_files(cut)
    assert not list(cut.rglob("*.partial")) and not (cut / schema.BOOKKEEPING_DIR / "lock").exists()


def test_statistics_are_exact_and_travel_with_the_checkpoint(trained):
    root, _, cfg = trained
    group = zarr.open_group(str(root / "latents.zarr"))
    lat = group[schema.LATENTS][:].astype(np.float64)
    mean, std = np.array(group.attrs[schema.A_CHANNEL_MEAN]), np.array(group.attrs[schema.A_CHANNEL_STD])
    np.testing.assert_allclose(mean, lat.mean(axis=(0, 1, 3, 4)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, lat.std(axis=(0, 1, 3, 4)), rtol=1e-12, atol=0)
    fae_path = Path(cfg.paths.fae_run) / "fae.safetensors"
    stats = LatentStats.from_store(root / "latents.zarr")
    assert list(stats.channel_mean) == group.attrs[schema.A_CHANNEL_MEAN]
    assert list(stats.channel_std) == group.attrs[schema.A_CHANNEL_STD]
    assert group.attrs["fae_fingerprint"] == stats.fae_fingerprint == file_fingerprint(fae_path)
    assert LatentStats.from_dict(stats.to_dict(), "copy") == stats.__class__(stats.channel_mean, stats.channel_std,
                                                                            stats.fae_fingerprint)
    assert not (Path(cfg.paths.fae_run) / "latent_stats.json").exists()  # the store's attrs are the one source
    assert group.attrs["source_features"]["config_hash"] == "synthetic-features-v1"
    assert group.attrs[schema.A_COMPLETE] is True and lat.shape == (64, 2, 8, 4, 4)
    assert verify_store(root / "latents.zarr", cfg.paths.index) == []
    assert "channel   7: mean" in inspect_store(root / "latents.zarr")


def test_latents_decode_back_with_the_trained_cosine(trained):
    root, _, cfg = trained
    fae = FeatureAutoencoder.load(Path(cfg.paths.fae_run) / "fae.safetensors", stats=LatentStats.from_store(root / "latents.zarr"))
    store = open_feature_store(cfg.paths.features)
    split = feature_split(store, cfg.paths.index)
    rows = np.flatnonzero(split.holdout)
    feats = torch.from_numpy(store[schema.FEATURES][:][rows].astype(np.float32))
    stored = torch.from_numpy(zarr.open_group(str(root / "latents.zarr"))[schema.LATENTS][:][rows].astype(np.float32))
    n, v = stored.shape[:2]
    assert torch.allclose(fae.encode_raw(feats.flatten(0, 1)), stored.flatten(0, 1), rtol=2e-3, atol=1e-3)
    normalised = fae.stats.normalize(stored.flatten(0, 1))
    assert torch.allclose(fae.encode(feats.flatten(0, 1)), normalised, rtol=2e-3, atol=2e-3)
    decoded = fae.decode(normalised).view(n, v, *feats.shape[2:])
    cosine = float(token_cosine(decoded, feats).mean())
    reached = json.loads((Path(cfg.paths.metrics) / "fae.json").read_text())["cosine"]
    assert abs(cosine - reached) < 5e-3, (cosine, reached)
    assert grid_to_tokens(stored.flatten(0, 1)).shape == (n * v, 16, 8)


def test_changed_settings_need_overwrite_and_task_pickles(trained, tmp_path):
    root, path, cfg = trained
    shutil.copytree(root / "latents.zarr", tmp_path / "lat.zarr")
    changed = load_config(path, {"paths.latents": str(tmp_path / "lat.zarr"), "encode.store_std": True})
    with pytest.raises(UserError, match="--overwrite"):
        encode.run(changed)
    encode.run(changed, overwrite=True)
    group = zarr.open_group(str(tmp_path / "lat.zarr"))
    assert (np.asarray(group[schema.STD][:]) > 0).all()
    task = EncodeTask(str(Path(cfg.paths.fae_run) / "fae.safetensors"), "fp", os.path.abspath(cfg.paths.features), 8,
                      "cpu", False)
    clone = pickle.loads(pickle.dumps(task))
    clone.setup()
    arrays, extras = clone.compute(1, 16, 32)
    ref = zarr.open_group(str(root / "latents.zarr"))[schema.LATENTS][16:32]
    assert np.array_equal(arrays[schema.LATENTS], ref) and extras["moments"]["count"] == 16 * 2 * 16
