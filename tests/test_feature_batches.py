"""Generator data from the caches: exact feature statistics, feature batches, REPA targets, resume, speed path.

The stores are written by the tests through the real machinery (lock, create, one
writer per shard with completion records, finalize) with model-free shard tasks whose
values encode the sample id and the view, so every served value can be traced back to
the row it must come from. The feature and latent stores have different shard sizes
and the latent store holds the samples in another order: alignment is by sample id.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock
from fae_pipe.cache.feature_stats import channel_stats_from_records, compute_feature_stats, feature_stats
from fae_pipe.cache.latent_stats import LatentStats, merge_moments, shard_moments
from fae_pipe.cache.shards import ShardPlan, run_shards
from fae_pipe.cache.store_writer import finalize, open_or_create
from fae_pipe.data import sharded
from fae_pipe.data.features import FeatureBatches
from fae_pipe.data.latents import LatentBatches
from fae_pipe.errors import UserError

N, VIEWS, GRID, DIM, CLASSES = 44, 2, (2, 3), 5, 4
TOKENS = GRID[0] * GRID[1]
FAILED = {5, 30}  # store rows of images that "failed" in extract: zero rows, never served
ID0 = 1000  # sample ids are ID0 + feature-store row, so ids and rows differ


def coded_features(ids: np.ndarray) -> np.ndarray:
    """(n, V, T, C) float16: channel 0 = sample id, 1 = view; the rest vary per token and sample."""
    rng = np.random.default_rng(ids[0] if ids.size else 0)
    x = rng.standard_normal((ids.size, VIEWS, TOKENS, DIM)) * 0.5 + np.arange(TOKENS)[None, None, :, None] * 0.25 + 3
    x[..., 0] = ids[:, None, None]
    x[..., 1] = np.arange(VIEWS)[None, :, None]
    return x.astype(np.float16)


class FeatureTask:
    """Shard task writing coded features, as ``extract`` does (moments in the record)."""

    cache_key = "test-coded-features"

    def setup(self):
        pass

    def compute(self, shard_index, start, stop, progress=None):
        from fae_pipe.cache.feature_stats import shard_moments_of_features

        rows = np.arange(start, stop)
        feats = coded_features(ID0 + rows)
        valid = ~np.isin(rows, list(FAILED))
        feats[~valid] = 0
        arrays = {schema.FEATURES: feats, schema.CLS: feats[:, :, 0], schema.VALID: valid,
                  schema.LABELS: (ID0 + rows) % CLASSES, schema.SAMPLE_IDS: ID0 + rows}
        failures = [{"sample": int(r), "sample_id": int(ID0 + r), "file": f"{r}.png", "reason": "test"}
                    for r in rows[~valid]]
        return arrays, {"failures": failures, "moments": shard_moments_of_features(feats, valid)}


class LatentTask:
    """Shard task writing latents of the samples ``ids`` (another order), value [v, 0, 0, 0] = id, [v, 1, 0, 0] = v."""

    def __init__(self, ids, valid):
        self.ids, self.valid = np.asarray(ids), np.asarray(valid)
        self.cache_key = f"test-coded-latents-{uuid.uuid4().hex}"  # the runner keeps one prepared task per key

    def setup(self):
        pass

    def compute(self, shard_index, start, stop, progress=None):
        ids, valid = self.ids[start:stop], self.valid[start:stop]
        lat = np.random.default_rng(start).standard_normal((stop - start, VIEWS, 3, 2, 2))
        lat[:, :, 0, 0, 0] = ids[:, None]
        lat[:, :, 1, 0, 0] = np.arange(VIEWS)[None]
        lat = lat.astype(np.float16)
        lat[~valid] = 0
        arrays = {schema.LATENTS: lat, schema.LABELS: ids % CLASSES, schema.SAMPLE_IDS: ids, schema.VALID: valid}
        return arrays, {"moments": shard_moments(lat[valid], channel_axis=2)}


def write_feature_store(path, units=2, fingerprint="fp-test", views=("orig", "flip")):
    attrs = {schema.A_DATASET_FINGERPRINT: fingerprint, schema.A_VIEWS: list(views), schema.A_NUM_CLASSES: CLASSES}
    with StoreLock(path):
        group, _ = open_or_create(path, "hash-f", lambda: schema.create_feature_store(
            path, N, VIEWS, TOKENS, DIM, GRID, 8, 4, attrs), overwrite=False)
        result = run_shards(path, FeatureTask(), ShardPlan(N, 8), "hash-f", units=units)
        stats = channel_stats_from_records(group, result.records)  # what `extract` does when the store completes
        finalize(group, result.failures(), stats.to_attrs())
    return path


def write_latent_store(path, ids, valid, fingerprint="fp-test", views=("orig", "flip")):
    attrs = {schema.A_DATASET_FINGERPRINT: fingerprint, schema.A_VIEWS: list(views), schema.A_NUM_CLASSES: CLASSES}
    n = len(ids)
    with StoreLock(path):
        group, _ = open_or_create(path, "hash-l", lambda: schema.create_latent_store(
            path, n, VIEWS, 3, (2, 2), 12, 4, attrs), overwrite=False)
        result = run_shards(path, LatentTask(ids, valid), ShardPlan(n, 12), "hash-l")
        stats = merge_moments([result.records[i]["extras"]["moments"] for i in sorted(result.records)])
        finalize(group, [], stats.to_attrs())
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-data")
    feats = write_feature_store(root / "features.zarr")
    ids = (ID0 + np.arange(N))[::-1].copy()  # the latent store holds the samples in reverse order
    valid = ~np.isin(ids - ID0, list(FAILED))
    lats = write_latent_store(root / "latents.zarr", ids, valid)
    return root, feats, lats


def whole(path, name):
    return np.asarray(schema.open_group(path)[name][:])


def budgets():
    return pytest.mark.parametrize("budget", [1 << 30, 0], ids=["ram", "streaming"])


# ---- statistics --------------------------------------------------------------------------------------------
def test_feature_statistics_equal_numpy_over_the_whole_store(stores, tmp_path):
    _, path, _ = stores
    x = whole(path, schema.FEATURES)[whole(path, schema.VALID)].astype(np.float64)  # (valid, V, T, C)
    stats = feature_stats(schema.open_group(path), str(path))
    np.testing.assert_allclose(stats.channel_mean, x.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.channel_std, x.std(axis=(0, 1, 2)), rtol=1e-12, atol=0)
    assert stats.count == x.shape[0] * VIEWS * TOKENS and not stats.per_position

    full = compute_feature_stats(path, per_position=True)
    grid = lambda a: a.T.reshape(DIM, *GRID)  # noqa: E731 - (tokens, C) -> (C, H, W), tokens row-major
    np.testing.assert_allclose(full.position_mean, grid(x.mean(axis=(0, 1))), rtol=0, atol=1e-12)
    np.testing.assert_allclose(full.position_std, grid(x.std(axis=(0, 1))), rtol=1e-12, atol=0)
    assert full.position_std.shape == (DIM, *GRID) and full.per_position
    # the streaming pass reproduces the bits extract merged from the shard records
    assert full.channel_mean == stats.channel_mean and full.channel_std == stats.channel_std
    group = schema.open_group(path)
    assert group.attrs[schema.A_POSITION_STATS] == {"count": x.shape[0] * VIEWS, "config_hash": "hash-f"}
    assert group[schema.POSITION_MEAN].metadata.dimension_names == ("channel", "height", "width")
    assert schema.POSITION_MEAN not in schema.sample_array_names(group)  # not a per-sample array
    assert feature_stats(group, str(path), per_position=True) == full
    # deterministic whatever the number of work units: another store, 3 units, the same bits
    other = feature_stats(schema.open_group(write_feature_store(tmp_path / "f3.zarr", units=3)), "f3")
    assert other.channel_mean == stats.channel_mean and other.channel_std == stats.channel_std


def test_statistics_round_trip_and_travel(stores):
    _, path, _ = stores
    full = feature_stats(schema.open_group(path), str(path), per_position=True)
    for stats in (full, full.per_channel()):
        copy = LatentStats.from_dict(json.loads(json.dumps(stats.to_dict())), "checkpoint copy")
        assert copy.per_position == stats.per_position and copy.channel_mean == stats.channel_mean
        if stats.per_position:
            assert np.array_equal(copy.position_mean, stats.position_mean)
        rows = whole(path, schema.FEATURES)[:7, 1]  # stored values: (7, T, C) float16
        z = torch.from_numpy(rows).transpose(1, 2).reshape(7, DIM, *GRID).contiguous()
        x = stats.normalize(z)
        assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(copy.normalize(z), x)
        assert torch.allclose(stats.denormalize(x), z.float(), atol=1e-5, rtol=1e-6)
        strided = z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last view: same bits
        assert torch.equal(stats.normalize(strided), x)
    # per position: the store's tokens come out with mean 0 / std 1 at every position and channel
    data = FeatureBatches(path, 6, seed=0, per_position=True)
    tokens = torch.from_numpy(whole(path, schema.FEATURES)[whole(path, schema.VALID)]).flatten(0, 1)
    unit = full.normalize(data.grid(tokens)).double()
    assert torch.allclose(unit.mean(0), torch.zeros(()).double(), atol=1e-5)
    assert torch.allclose(unit.std(0, unbiased=False), torch.ones(()).double(), atol=1e-5)
    with pytest.raises(UserError, match="per-position statistics are"):
        full.normalize(torch.zeros(2, DIM, 3, 2))


def test_normalisation_bits_equal_the_broadcast_formula_of_earlier_releases():
    stats = LatentStats((0.5, -2.0, 3.25), (1.5, 0.25, 4.0))
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 5, 7)).astype(np.float16))
    mean, std = torch.tensor(stats.channel_mean, dtype=torch.float64), torch.tensor(stats.channel_std, dtype=torch.float64)
    scale, shift = (1 / std).view(1, 3, 1, 1).float(), (-mean / std).view(1, 3, 1, 1).float()
    assert torch.equal(stats.normalize(z), torch.addcmul(shift, z, scale))
    up_scale, up_shift = std.view(1, 3, 1, 1).float(), mean.view(1, 3, 1, 1).float()
    x = stats.normalize(z)
    assert torch.equal(stats.denormalize(x), torch.addcmul(up_shift, x, up_scale))


# ---- feature batches ---------------------------------------------------------------------------------------
@budgets()
def test_feature_batches_are_the_normalised_token_grids(stores, budget):
    _, path, _ = stores
    data = FeatureBatches(path, 6, seed=3, memory_budget_bytes=budget, shuffle_buffer=2)
    assert data.info.shape == (DIM, *GRID) and data.info.kind == schema.KIND_FEATURES and data.loader.in_ram == bool(budget)
    stats, feats = data.info.stats, whole(path, schema.FEATURES).astype(np.float64)
    mean, std = np.array(stats.channel_mean)[:, None, None], np.array(stats.channel_std)[:, None, None]
    served, ref = [], FeatureBatches(path, 6, seed=3, memory_budget_bytes=budget, shuffle_buffer=2).loader
    for (epoch, x, y), (_, raw) in zip(data.from_step(0, "cpu"), ref.batches_from(0)):  # same order, own loader
        assert x.shape == (6, DIM, *GRID) and x.dtype == torch.float32 and x.is_contiguous()
        rows, views = raw["rows"], raw["views"]
        grid = feats[rows, views].transpose(0, 2, 1).reshape(6, DIM, *GRID)  # tokens row-major on the grid
        assert np.allclose(x.numpy(), (grid - mean) / std, atol=1e-5)
        assert torch.equal(y, torch.from_numpy((ID0 + rows) % CLASSES))
        served.extend(rows.tolist())
        if len(served) >= 2 * data.steps_per_epoch * 6:
            break
    assert not set(served) & FAILED


@budgets()
def test_resume_from_step_k_gives_the_uninterrupted_batches(stores, budget):
    _, feats, lats = stores
    for make in (lambda: LatentBatches(lats, 4, seed=5, memory_budget_bytes=budget, shuffle_buffer=1, repa_features=feats),
                 lambda: FeatureBatches(feats, 4, seed=5, memory_budget_bytes=budget, shuffle_buffer=1,
                                        per_position=True, repa_features=feats)):
        spe = make().steps_per_epoch
        stream = make().from_step_with_repa(0, "cpu")
        full = [next(stream) for _ in range(2 * spe + 3)]
        for k in (1, spe - 1, spe + 2):
            resumed = make().from_step_with_repa(k, "cpu")
            for want in full[k:]:
                got = next(resumed)
                assert got[0] == want[0] and all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))


def test_grouped_conversion_changes_no_bit(stores):
    _, _, lats = stores
    a, b = LatentBatches(lats, 4, seed=1), LatentBatches(lats, 4, seed=1)
    b.group = 1  # one torch call per batch, as before grouping
    assert a.group > 1
    for (ea, xa, ya), (eb, xb, yb), _ in zip(a.from_step(2, "cpu"), b.from_step(2, "cpu"), range(25)):
        assert ea == eb and torch.equal(xa, xb) and torch.equal(ya, yb) and xa.is_contiguous()


# ---- REPA targets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("maps", [True, False], ids=["maps", "copied-window"])
@budgets()
def test_repa_targets_are_the_cached_rows_of_each_sample_and_view(stores, budget, maps, monkeypatch):
    _, feats, lats = stores
    if not maps:
        monkeypatch.setattr(sharded, "CONTIGUOUS_ROW_BYTES", 1 << 20)
    table = whole(feats, schema.FEATURES)
    row_of_id = {int(i): r for r, i in enumerate(whole(feats, schema.SAMPLE_IDS))}
    kw = dict(memory_budget_bytes=budget, shuffle_buffer=1, repa_features=feats)
    for make in (lambda: LatentBatches(lats, 5, 2, **kw), lambda: FeatureBatches(feats, 5, 2, **kw)):
        data, ref = make(), make().loader  # the reference order from a loader of its own
        own = whole(data.info.path, data.array)
        count = 0
        for (epoch, x, y, t), (_, raw) in zip(data.from_step_with_repa(0, "cpu"), ref.batches_from(0)):
            ids, views = raw["sample_ids"], raw["views"]
            assert t.shape == (5, TOKENS, DIM) and t.dtype == torch.float32
            want = table[[row_of_id[int(i)] for i in ids], views]
            assert np.array_equal(t.numpy(), want.astype(np.float32))
            assert np.array_equal(t[:, 0, 0].numpy(), ids) and np.array_equal(t[:, 0, 1].numpy(), views)
            # the generator input of the same row is that sample id and view too
            if data.array == schema.LATENTS:
                assert np.array_equal(own[raw["rows"], views][:, 0, 0, 0], ids)
            else:
                assert torch.equal(x, data.info.stats.normalize(data.grid(torch.from_numpy(own[raw["rows"], views]))))
            count += 1
            if count == 3 * data.steps_per_epoch:
                break


def test_repa_targets_from_a_compressed_store_are_read_through_zarr(stores, tmp_path):
    import zarr
    from zarr.codecs import ZstdCodec

    _, feats, lats = stores
    src = schema.open_group(feats)
    copy = zarr.create_group(str(tmp_path / "z.zarr"), attributes=dict(src.attrs))
    for name in schema.sample_array_names(src):
        a = src[name]
        copy.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards,
                          compressors=ZstdCodec(level=1), dimension_names=a.metadata.dimension_names)[...] = a[...]
    plain = LatentBatches(lats, 5, seed=4, memory_budget_bytes=0, repa_features=feats)
    zipped = LatentBatches(lats, 5, seed=4, memory_budget_bytes=0, repa_features=tmp_path / "z.zarr")
    assert not zipped.repa._maps.direct
    for (_, _, _, a), (_, _, _, b), _ in zip(plain.from_step_with_repa(0, "cpu"), zipped.from_step_with_repa(0, "cpu"),
                                            range(2 * plain.steps_per_epoch)):
        assert torch.equal(a, b)
    assert zipped.repa._maps.readers[schema.FEATURES].zarr_reads <= schema.store_num_shards(src) + 2  # kept, not re-read


def test_mismatched_stores_are_one_line_errors_naming_both(stores, tmp_path):
    _, feats, _ = stores
    ids = ID0 + np.arange(N + 3)  # three samples the feature store does not hold
    extra = write_latent_store(tmp_path / "extra.zarr", ids, ~np.isin(ids - ID0, list(FAILED)))
    failed = write_latent_store(tmp_path / "failed.zarr", ID0 + np.arange(N), np.ones(N, bool))  # serves failed rows
    other = write_latent_store(tmp_path / "other.zarr", ID0 + np.arange(4), np.ones(4, bool), fingerprint="fp-other")
    flipped = write_latent_store(tmp_path / "views.zarr", ID0 + np.arange(4), np.ones(4, bool), views=("flip", "orig"))
    for path, words in ((extra, "3 of 45 served samples missing"), (failed, "not a valid sample"),
                        (other, "different datasets"), (flipped, "different views")):
        with pytest.raises(UserError) as e:
            LatentBatches(path, 2, seed=0, repa_features=feats)
        msg = str(e.value)
        assert words in msg and str(path) in msg and str(feats) in msg and "\n" not in msg, msg
    with pytest.raises(UserError, match="REPA targets were not configured"):
        next(LatentBatches(extra, 2, seed=0).from_step_with_repa(0, "cpu"))


def test_stores_without_statistics_say_what_to_run(stores, tmp_path):
    _, feats, lats = stores
    with pytest.raises(UserError, match="a latents store; expected the features store"):
        FeatureBatches(lats, 2, seed=0)
    path = tmp_path / "nostats.zarr"
    write_feature_store(path)
    group = schema.open_group(path, "r+")
    for key in (schema.A_CHANNEL_MEAN, schema.A_CHANNEL_STD):
        del group.attrs[key]
    with pytest.raises(UserError, match=r"no per-channel feature statistics.*fae-pipe feature-stats") as e:
        FeatureBatches(path, 2, seed=0)
    assert "\n" not in str(e.value)
    stats = compute_feature_stats(path)  # an existing store gets them in one pass, the bits extract writes
    assert stats.channel_mean == feature_stats(schema.open_group(feats), "f").channel_mean
    with pytest.raises(UserError, match="no per-position statistics.*--per-position"):
        FeatureBatches(path, 2, seed=0, per_position=True)


def test_bench_loader_features_mode(stores, tmp_path):
    from fae_pipe.config import load_config
    from fae_pipe.stages import bench_loader

    _, feats, _ = stores
    cfg = load_config(None, {"paths.features": str(feats), "paths.metrics": str(tmp_path), "sit.train.batch_size": 4})
    summary = bench_loader.run(cfg, features=True, min_samples=40, repeats=1)
    rates = summary["samples_per_s"]
    assert set(rates) == {"numpy_in_ram", "numpy_memmap", "npy_per_sample", "loader_in_ram", "loader_streaming",
                          "feature_batches_in_ram", "feature_batches_streaming", "feature_batches_repa"}
    assert min(rates.values()) > 0 and (tmp_path / "bench_loader_features.json").is_file()


@pytest.mark.slow
def test_extract_writes_the_exact_channel_statistics_and_the_cli_adds_positions(tmp_path):
    """The real ``fae-pipe extract`` (tiny DINOv2 at 2x2 tokens) merges the shard moments when the store
    completes; ``fae-pipe feature-stats --per-position`` adds RAE's tables to the finished store."""
    from helpers_extract import cli, prepare_tiny

    prepare_tiny(tmp_path)
    done = cli(tmp_path, "extract", "--config", "tiny.yaml")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "cache/features.zarr"
    group = schema.open_group(path)
    x = np.asarray(group[schema.FEATURES][:])[np.asarray(group[schema.VALID][:])].astype(np.float64)
    np.testing.assert_allclose(group.attrs[schema.A_CHANNEL_MEAN], x.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(group.attrs[schema.A_CHANNEL_STD], x.std(axis=(0, 1, 2)), rtol=1e-12, atol=0)
    before = dict(group.attrs)
    done = cli(tmp_path, "feature-stats", str(path), "--per-position")
    assert done.returncode == 0 and "384 channels" in done.stdout, done.stderr
    group = schema.open_group(path)
    assert group.attrs[schema.A_CHANNEL_MEAN] == before[schema.A_CHANNEL_MEAN]  # the same bits as extract's
    np.testing.assert_allclose(group[schema.POSITION_MEAN][:], x.mean(axis=(0, 1)).T.reshape(384, 2, 2), atol=1e-12)
    data = FeatureBatches(path, 8, seed=0, per_position=True)
    _, xb, _ = next(data.from_step(0, "cpu"))
    assert xb.shape == (8, 384, 2, 2) and data.info.stats.per_position
    assert cli(tmp_path, "verify", str(path)).returncode == 0  # the statistics arrays are no defect
