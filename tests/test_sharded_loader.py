"""The generic sharded loader and the latent batches: coverage, disjoint ranks, resumable order, views, stats."""

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import ZstdCodec

from fae_pipe.cache import schema
from fae_pipe.data.latents import LatentBatches
from fae_pipe.data import sharded
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError


def make_latent_store(path, n=60, views=2, c=4, hw=4, shard=16, classes=4, seed=0, stats=True, nan_sample=None):
    """A tiny latent store in the schema's layout; element [0, 0, 0] of sample i, view v encodes (i, v)."""
    attrs = {schema.A_NUM_CLASSES: classes, "fae_fingerprint": "sha256:test"}
    g = schema.create_latent_store(path, n=n, views=views, channels=c, grid=(hw, hw), shard_samples=shard,
                                   chunk_samples=8, attrs=attrs)
    labels = np.arange(n) % classes
    x = np.random.default_rng(seed).standard_normal((n, views, c, hw, hw)) + labels[:, None, None, None, None]
    x[:, :, 0, 0, 0] = np.arange(n)[:, None] * 10 + np.arange(views)[None]
    x = x.astype(np.float16)
    if nan_sample is not None:
        x[nan_sample] = np.nan
    g[schema.LATENTS][:] = x
    g[schema.LABELS][:] = labels
    g[schema.SAMPLE_IDS][:] = np.arange(n) + 1000
    g[schema.VALID][:] = True
    if stats:
        finite = np.nan_to_num(x.astype(np.float64))
        g.attrs[schema.A_CHANNEL_MEAN] = finite.mean(axis=(0, 1, 3, 4)).tolist()
        g.attrs[schema.A_CHANNEL_STD] = finite.std(axis=(0, 1, 3, 4)).tolist()
    return x


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("latents") / "latents.zarr"
    return path, make_latent_store(path)


def epoch_ids(loader, epoch):
    it = loader.batches_from(epoch * loader.steps_per_epoch)
    return np.concatenate([next(it)[1]["sample_ids"] for _ in range(loader.steps_per_epoch)])


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["ram", "streaming"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_serves_kept_samples_once_on_disjoint_ranks(store, budget, world):
    path, _ = store
    mask = np.ones(60, bool)
    mask[[3, 17, 40]] = False
    loaders = [ShardedLoader(path, ["latents"], 5, seed=1, rank=r, world_size=world, memory_budget_bytes=budget,
                             shuffle_buffer=1, sample_mask=mask) for r in range(world)]
    assert loaders[0].in_ram == (budget > 0)
    for epoch in (0, 1):
        parts = [epoch_ids(ld, epoch) for ld in loaders]
        ids = np.concatenate(parts)
        assert len(ids) == len(set(ids.tolist())) == world * loaders[0].steps_per_epoch * 5
        assert not {3, 17, 40} & {i - 1000 for i in ids.tolist()}
        assert loaders[0].steps_per_epoch == (57 // world) // 5
    if budget == 0:  # one shard's worth of window (+ a boundary shard) in process memory
        assert 0 < max(ld.resident_rows for ld in loaders) <= 2 * 16
    else:
        assert all(ld.resident_rows == 60 for ld in loaders)


def test_order_is_a_function_of_seed_and_epoch(store):
    path, _ = store
    make = lambda seed: ShardedLoader(path, ["latents"], 4, seed=seed, memory_budget_bytes=0, shuffle_buffer=2)  # noqa: E731
    a, b = make(0), make(0)
    assert np.array_equal(epoch_ids(a, 0), epoch_ids(b, 0))
    assert not np.array_equal(epoch_ids(a, 0), epoch_ids(a, 1))
    assert not np.array_equal(epoch_ids(a, 0), epoch_ids(make(1), 0))
    assert np.array_equal(a.epoch_views(3), b.epoch_views(3))


@pytest.fixture(params=["ram", "stream-copy", "stream-maps"])
def budget(request, monkeypatch):
    """The three ways batches are served: whole store in RAM; streaming windows copied into one
    block (small samples); streaming gathered per shard from memory maps (large samples)."""
    if request.param == "stream-maps":
        monkeypatch.setattr(sharded, "CONTIGUOUS_ROW_BYTES", 0)
    return 1 << 30 if request.param == "ram" else 0


def test_batches_from_step_continues_exactly(store, budget):
    path, _ = store
    loader = ShardedLoader(path, ["latents"], 4, seed=2, memory_budget_bytes=budget, shuffle_buffer=1)
    spe = loader.steps_per_epoch
    it = loader.batches_from(0)
    full = [next(it) for _ in range(2 * spe + 3)]
    for start in (1, spe - 1, spe + 2):
        resumed = ShardedLoader(path, ["latents"], 4, seed=2, memory_budget_bytes=budget, shuffle_buffer=1)
        it = resumed.batches_from(start)
        for epoch, batch in full[start:start + spe]:
            e, b = next(it)
            assert e == epoch and all(np.array_equal(batch[k], b[k]) for k in batch)


def test_streaming_and_ram_serve_the_same_samples_per_epoch(store):
    path, _ = store
    ram = ShardedLoader(path, ["latents"], 4, seed=3, memory_budget_bytes=1 << 30)
    stream = ShardedLoader(path, ["latents"], 4, seed=3, memory_budget_bytes=0, shuffle_buffer=1)
    assert sorted(epoch_ids(ram, 0)) == sorted(epoch_ids(stream, 0))
    assert not np.array_equal(epoch_ids(ram, 0), epoch_ids(stream, 0))  # different shuffle windows


def test_rows_are_the_stored_sample_with_its_random_view(store, budget):
    path, x = store
    loader = ShardedLoader(path, ["latents"], 6, seed=0, memory_budget_bytes=budget, shuffle_buffer=2)
    views = loader.epoch_views(0)
    assert set(views.tolist()) == {0, 1}
    _, batch = next(loader.batches_from(0))
    idx = batch["sample_ids"] - 1000
    assert batch["latents"].shape == (6, 4, 4, 4) and batch["latents"].dtype == np.float16
    assert np.array_equal(batch["latents"], x[idx, views[idx]])
    assert np.array_equal(batch["labels"], idx % 4)
    for epoch, batch in [next(it) for it in [loader.batches_from(0)] for _ in range(3 * loader.steps_per_epoch)]:
        idx, views = batch["sample_ids"] - 1000, loader.epoch_views(epoch)
        assert np.array_equal(batch["latents"], x[idx, views[idx]])
    reads = loader._readers["latents"]
    assert reads.direct_reads > 0 and reads.zarr_reads == 0  # the schema's stores take the direct path
    fixed = ShardedLoader(path, ["latents"], 6, seed=0, memory_budget_bytes=budget, random_view=False)
    _, batch = next(fixed.batches_from(0))
    assert np.array_equal(batch["latents"][:, 0, 0, 0] % 10, np.zeros(6))


def test_a_compressed_store_is_served_through_zarr(tmp_path, budget):
    g = zarr.create_group(str(tmp_path / "z.zarr"))
    x = np.arange(30 * 2 * 3, dtype=np.float32).reshape(30, 2, 3)
    g.create_array("x", shape=x.shape, chunks=(5, 2, 3), shards=(10, 2, 3), dtype="float32",
                   compressors=ZstdCodec(level=1))[:] = x
    g.create_array("labels", shape=(30,), chunks=(10,), dtype="int64")[:] = np.arange(30) % 3
    loader = ShardedLoader(tmp_path / "z.zarr", ["x"], 5, seed=0, memory_budget_bytes=budget, shuffle_buffer=1)
    it = loader.batches_from(0)
    for _ in range(2 * loader.steps_per_epoch):
        epoch, batch = next(it)
        idx = batch["sample_ids"]
        assert np.array_equal(batch["x"], x[idx, loader.epoch_views(epoch)[idx]])
    assert loader._readers["x"].zarr_reads > 0 and loader._readers["x"].direct_reads == 0


def test_any_sample_first_store_with_a_view_axis(tmp_path):
    g = schema.create_feature_store(tmp_path / "f.zarr", n=20, views=2, tokens=4, dim=3, grid=(2, 2),
                                    shard_samples=8, chunk_samples=4, attrs={})
    g["features"][:] = np.arange(20 * 2 * 4 * 3).reshape(20, 2, 4, 3)
    g["cls"][:] = np.arange(20 * 2 * 3).reshape(20, 2, 3)
    g["labels"][:] = np.arange(20)
    loader = ShardedLoader(tmp_path / "f.zarr", ["features", "cls"], 5, seed=0, memory_budget_bytes=0)
    _, batch = next(loader.batches_from(0))
    assert batch["features"].shape == (5, 4, 3) and batch["cls"].shape == (5, 3)


def test_user_errors_are_one_line(store, tmp_path):
    path, _ = store
    with pytest.raises(UserError, match="no array 'nope'"):
        ShardedLoader(path, ["nope"], 4, seed=0)
    with pytest.raises(UserError, match="fewer than one global batch"):
        ShardedLoader(path, ["latents"], 40, seed=0, world_size=2)
    with pytest.raises(UserError, match="not a zarr v3 store"):
        ShardedLoader(tmp_path / "missing.zarr", ["latents"], 4, seed=0)
    with pytest.raises(UserError, match="sample_mask"):
        ShardedLoader(path, ["latents"], 4, seed=0, sample_mask=np.ones(3, bool))


def test_latent_batches_are_normalised_with_the_store_statistics(store):
    path, x = store
    data = LatentBatches(path, 6, seed=0)
    info = data.info
    assert info.shape == (4, 4, 4) and info.num_classes == 4 and info.fae_fingerprint == "sha256:test"
    epoch, xb, yb = next(data.from_step(0, torch.device("cpu")))
    idx = np.asarray(next(data.loader.batches_from(0))[1]["sample_ids"]) - 1000
    raw = x[idx, data.loader.epoch_views(0)[idx]].astype(np.float32)
    want = (raw - np.array(info.stats.channel_mean, np.float32)[:, None, None]) / np.array(info.stats.channel_std, np.float32)[:, None, None]
    assert epoch == 0 and xb.dtype == torch.float32 and torch.allclose(xb, torch.from_numpy(want), atol=1e-5)
    assert torch.equal(yb, torch.from_numpy(idx % 4))


def test_latent_store_without_statistics_is_refused(tmp_path):
    make_latent_store(tmp_path / "l.zarr", stats=False)
    with pytest.raises(UserError, match="no per-channel latent statistics") as e:
        LatentBatches(tmp_path / "l.zarr", 4, seed=0)
    assert "\n" not in str(e.value)


def test_invalid_samples_are_never_served(tmp_path):
    make_latent_store(tmp_path / "l.zarr", n=32)
    import zarr

    g = zarr.open_group(str(tmp_path / "l.zarr"), mode="r+")
    valid = np.ones(32, bool)
    valid[::2] = False
    g["valid"][:] = valid
    data = LatentBatches(tmp_path / "l.zarr", 4, seed=0)
    ids = epoch_ids(data.loader, 0) - 1000
    assert data.steps_per_epoch == 4 and np.all(ids % 2 == 1)


def test_bench_loader_runs_and_writes_its_metrics(store, tmp_path):
    import json

    from fae_pipe.config import load_config
    from fae_pipe.stages import bench_loader

    path, _ = store
    cfg = load_config(None, {"paths.latents": str(path), "paths.metrics": str(tmp_path), "sit.train.batch_size": 8,
                               "sit.train.memory_budget_gb": 1.0})
    summary = bench_loader.run(cfg, min_samples=200, repeats=1)
    rates = summary["samples_per_s"]
    assert set(rates) == {"numpy_in_ram", "numpy_memmap", "npy_per_sample", "loader_in_ram", "loader_streaming",
                          "latent_batches_torch"} and min(rates.values()) > 0
    assert json.loads((tmp_path / "bench_loader.json").read_text())["configured_mode"] == "loader_in_ram"


@pytest.mark.slow
def test_bench_loader_synthetic_store_through_the_cli(tmp_path):
    import json
    import subprocess
    import sys

    from fae_pipe.cache.synthetic import write_random_latent_store

    store = write_random_latent_store(tmp_path / "s.zarr", (40, 2, 3, 2, 2), shard_samples=16, chunk_samples=8)
    data = LatentBatches(store, 4, seed=0)  # a store training accepts: stats, labels, valid
    assert data.info.shape == (3, 2, 2) and data.info.views == 2 and data.loader.num_shards == 3
    cli = [sys.executable, "-m", "fae_pipe.cli", "bench", "loader", "--set", f"paths.metrics={tmp_path}",
           "--set", "sit.train.batch_size=8"]
    out = subprocess.run(cli + ["--synthetic", "300x4x2x2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "300 samples x 2 views x (4, 2, 2)" in out.stdout
    summary = json.loads((tmp_path / "bench_loader.json").read_text())
    assert summary["num_samples"] == 300 and set(summary["targets_met"]) == {"loader_in_ram", "loader_streaming"}
    bad = subprocess.run(cli + ["--synthetic", "300x4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "NxCxHxW" in bad.stderr
