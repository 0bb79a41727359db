"""``fae-pipe inspect`` / ``verify`` on real stores: sound ones pass, each kind of damage is named."""

from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import zarr

from helpers_extract import SyntheticTask, cli, synthetic_store, write_synthetic_index

from fae_pipe.cache.bookkeeping import record_path
from fae_pipe.cache.inspect import inspect_store, verify_store as verify_with
from fae_pipe.data.index import read_index


# verify_store takes the index reader (cache must not import data); tests always pass the real one
verify_store = partial(verify_with, read_index=read_index)


@pytest.fixture()
def store(tmp_path):
    fingerprint = write_synthetic_index(tmp_path / "index.json")
    synthetic_store(tmp_path / "f.zarr", task=SyntheticTask(failed={3}), fingerprint=fingerprint)
    return tmp_path / "f.zarr"


def damaged(store, name):
    copy = store.with_name(name)
    shutil.copytree(store, copy)
    return copy


def test_cli_inspect_and_verify_sound_store(store):
    shown = cli(store.parent, "inspect", store.name)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "kind: features  schema_version: 1" in out and "complete: True  (3 of 3 shards" in out
    assert "features: shape (20, 2, 4, 3) float16 chunks (4, 2, 4, 3) shards (8, 2, 4, 3)" in out
    assert "dims ('sample', 'view', 'token', 'channel') compressors none" in out
    assert "labels: shape (20,) int64" in out and "failures recorded: 1" in out
    ok = cli(store.parent, "verify", store.name)
    assert ok.returncode == 0 and f"verify: {store.name}: OK" in ok.stdout, ok.stdout + ok.stderr


def test_verify_names_missing_shard_file_and_record(store):
    gone = damaged(store, "gone.zarr")
    (gone / "features/c/1/0/0/0").unlink()
    result = cli(store.parent, "verify", gone.name)
    assert result.returncode == 1
    assert "DEFECT shard 1 (samples 8..15): shard file missing for features" in result.stdout
    unrecorded = damaged(store, "unrecorded.zarr")
    record_path(unrecorded, 2).unlink()
    result = cli(store.parent, "verify", unrecorded.name)
    assert result.returncode == 1
    assert "DEFECT shard 2 (samples 16..19): no completion record" in result.stdout


def test_verify_finds_value_and_bookkeeping_defects(store, tmp_path):
    bad = damaged(store, "bad.zarr")
    group = zarr.open_group(str(bad), mode="r+")
    feats = group["features"][0:8]
    feats[1, 0, 0, 0] = np.nan
    group["features"][0:8] = feats
    valid = group["valid"][8:16]
    valid[2] = False
    group["valid"][8:16] = valid
    defects = verify_store(bad)
    assert any(d.startswith("shard 0") and "non-finite" in d for d in defects)
    assert any(d.startswith("shard 1") and "valid=False rows [10]" in d for d in defects)
    assert not any(d.startswith("shard 2") for d in defects)

    other = tmp_path / "other.json"
    from fae_pipe.data.index import DatasetIndex, write_index

    write_index(DatasetIndex(root="x", classes=["a", "b", "c"], paths=[f"p{i}" for i in range(20)],
                             labels=(np.arange(20) + 1) % 3), other)
    defects = verify_store(store, other)
    assert any("dataset fingerprint" in d for d in defects)
    assert any(d.startswith("shard 0") and "label(s) differ from the index" in d for d in defects)
    (tmp_path / "index.json").unlink()
    assert any("labels and sample_ids not checked" in d for d in verify_store(store))


def test_unfinished_store_is_a_defect(tmp_path):
    fingerprint = write_synthetic_index(tmp_path / "index.json")
    store = tmp_path / "f.zarr"
    synthetic_store(store, fingerprint=fingerprint)
    attrs = zarr.open_group(str(store), mode="r+").attrs
    attrs["complete"] = False
    assert "attrs: complete is not true (the writing run did not finish)" in verify_store(store)


def test_latent_store_statistics_and_checks(tmp_path):
    fingerprint = write_synthetic_index(tmp_path / "index.json")
    store = tmp_path / "l.zarr"
    synthetic_store(store, kind="latents", store_std=True, fingerprint=fingerprint)
    text = inspect_store(store)
    assert "kind: latents" in text and "channel statistics (4 channels):" in text
    assert "channel   3: mean +0.40000  std 2.50000" in text
    assert "std: shape (20, 2, 4, 3, 1) float16" in text
    assert verify_store(store) == []
    zarr.open_group(str(store), mode="r+").attrs["channel_std"] = [1.0, 0.0, 1.0, 1.0]
    assert verify_store(store) == ["attrs: channel_mean/channel_std not finite or std not positive"]


def test_not_a_store_is_one_line_error(tmp_path):
    result = cli(tmp_path, "verify", "nowhere.zarr")
    assert result.returncode == 2 and "nowhere.zarr is not a fae-pipe zarr store" in result.stderr
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr/zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                          "attributes": {"kind": "photos"}}))
    result = cli(tmp_path, "inspect", "x.zarr")
    assert result.returncode == 2 and "attrs 'kind' is 'photos'" in result.stderr
