"""The generic sharded-writing machinery with a model-free task: plan, records, resume, lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import zarr

from helpers_extract import SyntheticTask, synthetic_store

from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import StoreLock, read_record, record_path
from fae_pipe.cache.shards import ShardPlan
from fae_pipe.cache.store_writer import open_or_create
from fae_pipe.errors import UserError


def test_plan_splits_whole_shards_into_contiguous_units():
    plan = ShardPlan(20, 8)
    assert plan.num_shards == 3 and plan.bounds(0) == (0, 8) and plan.bounds(2) == (16, 20)
    assert plan.units(2) == ([[0, 1], [2]], None)
    assert plan.units(1) == ([[0, 1, 2]], None)
    units, note = plan.units(10)
    assert units == [[0], [1], [2]] and "10 work units requested" in note and "3 storage shards" in note
    big = ShardPlan(1000, 16)
    units, _ = big.units(7)
    assert [i for u in units for i in u] == list(range(big.num_shards)) and len(units) == 7


def test_shards_written_whole_with_records_and_resume(tmp_path):
    store = tmp_path / "f.zarr"
    task = SyntheticTask(failed={3, 17}, zero_shards={1})
    group, result, _ = synthetic_store(store, task=task)
    assert task.setups == 1 and task.calls == [0, 1, 2]
    assert result.shards_written == 3 and result.complete and not (store / ".fae/lock").exists()
    feats = group["features"][:]
    assert feats[2, 0, 0, 0] == np.float16(3 / 7) and not feats[8:16].any() and not feats[3].any()
    assert np.array_equal(group["valid"][:], ~np.isin(np.arange(20), [3, 17]))
    # an all-zero shard (features and labels of shard 1) still gets its own file
    for name in schema.sample_array_names(group):
        assert schema.shard_file(store, group, name, 1).is_file(), name
    rec = read_record(store, 2)
    assert rec["config_hash"] == "hash-a" and (rec["start"], rec["stop"], rec["samples"], rec["valid"]) == (16, 20, 4, 3)
    assert rec["failures"][0]["sample"] == 17 and rec["extras"]["total"] > 0
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["complete"] is True and [f["sample"] for f in attrs["failures"]] == [3, 17]

    again = SyntheticTask()
    _, result, _ = synthetic_store(store, task=again)
    assert again.calls == [] and result.shards_skipped == 3 and result.shards_written == 0

    record_path(store, 1).unlink()
    stray = [store / "features/c/1/0/0/0.abc123.partial", store / ".fae/done/shard-00001.json.999.tmp"]
    for f in stray:
        f.write_bytes(b"junk")
    redo = SyntheticTask(failed={3, 17}, zero_shards={1})
    _, result, _ = synthetic_store(store, task=redo)
    assert redo.calls == [1] and result.shards_written == 1 and result.complete
    assert not any(f.exists() for f in stray)
    assert np.array_equal(zarr.open_group(str(store), mode="r")["features"][:].view(np.uint16), feats.view(np.uint16))


def test_other_config_refused_unless_overwrite(tmp_path):
    store = tmp_path / "f.zarr"
    synthetic_store(store)
    with StoreLock(store):
        with pytest.raises(UserError, match="made with a different config .* pass --overwrite"):
            open_or_create(store, "hash-b", lambda: None, overwrite=False)
        group, resumed = open_or_create(
            store, "hash-b", lambda: schema.create_feature_store(store, 5, 1, 1, 2, (1, 1), 4, 4, {}), overwrite=True)
        assert not resumed and group.attrs["config_hash"] == "hash-b" and group["features"].shape == (5, 1, 1, 2)
        assert not list((store / ".fae/done").glob("*.json")) and (store / ".fae/lock").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a fae-pipe store"):
        open_or_create(other, "hash-a", lambda: None, overwrite=False)


def test_lock_refuses_live_writer_and_takes_over_dead_one(tmp_path, capsys):
    store = tmp_path / "f.zarr"
    with StoreLock(store):
        with pytest.raises(UserError, match=f"locked by pid {os.getpid()} on host .*remove .*lock"):
            StoreLock(store).acquire()
    assert not (store / ".fae/lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (store / ".fae/lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    lock = StoreLock(store).acquire()
    assert f"taking over the lock of store {store} left by dead pid {pid}" in capsys.readouterr().err
    assert json.loads((store / ".fae/lock").read_text())["pid"] == os.getpid()
    lock.release()
    (store / ".fae/lock").write_text(json.dumps({"host": "some-other-host", "pid": pid}))
    with pytest.raises(UserError, match="on host some-other-host"):
        StoreLock(store).acquire()


def test_read_shard_and_layouts(tmp_path):
    group, _, _ = synthetic_store(tmp_path / "f.zarr")
    shard = schema.read_shard(group, "features", 2)
    assert shard.shape == (4, 2, 4, 3) and np.array_equal(shard, group["features"][16:20])
    with pytest.raises(IndexError):
        schema.read_shard(group, "features", 3)
    lat, _, _ = synthetic_store(tmp_path / "l.zarr", kind="latents", store_std=True)
    opened, kind = schema.open_store(tmp_path / "l.zarr")
    assert kind == "latents" and schema.sample_array_names(opened) == ["latents", "std", "labels", "sample_ids", "valid"]
    assert opened["latents"].metadata.dimension_names == ("sample", "view", "channel", "height", "width")
    assert opened["latents"].shape == (20, 2, 4, 3, 1) and opened["std"].dtype == np.float16
    assert schema.effective_chunk_samples(16, 8) == 8
    with pytest.raises(UserError, match="chunk_samples = 3 is invalid"):
        schema.effective_chunk_samples(3, 8)
    with pytest.raises(UserError, match="not a fae-pipe zarr store"):
        schema.open_store(tmp_path / "missing.zarr")
