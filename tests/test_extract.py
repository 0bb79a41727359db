"""``fae-pipe extract`` end to end through the real CLI, real zarr stores and a real LocalCluster.

One prepared tiny dataset and one uninterrupted in-process reference store serve every
test: resumed, dask and damaged-image runs must reproduce the reference bits.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from helpers_extract import (NUM_IMAGES, assert_same_arrays, cli, kill_after_first_record, one_line_error, popen,
                             prepare_tiny, read_arrays, write_config)

from fae_pipe.cache import schema
from fae_pipe.encoders.timm_vit import RANDOM_WARNING


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Prepared tiny dataset + the reference store made in-process in 2 work units."""
    workdir = tmp_path_factory.mktemp("extract")
    prepare_tiny(workdir)
    done = cli(workdir, "extract", "--config", "tiny.yaml", "--shards", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("RANDOM") == 1 and RANDOM_WARNING in done.stderr  # said once, plainly
    assert "extract: 48 samples, 6 shards written" in done.stdout
    return workdir


def test_plain_zarr_and_dask_see_the_documented_layout(work):
    store = work / "cache/features.zarr"
    group = zarr.open_group(str(store), mode="r")
    assert sorted(group.array_keys()) == ["cls", "features", "labels", "sample_ids", "valid"]
    feats = group["features"]
    assert feats.shape == (NUM_IMAGES, 2, 4, 384) and feats.dtype == np.float16
    assert feats.metadata.dimension_names == ("sample", "view", "token", "channel")
    assert feats.shards == (8, 2, 4, 384) and feats.chunks == (4, 2, 4, 384)
    assert group["cls"].metadata.dimension_names == ("sample", "view", "channel")
    assert group["labels"].dtype == np.int64 and group["valid"].dtype == np.bool_
    attrs = dict(group.attrs)
    assert attrs["kind"] == "features" and attrs["schema_version"] == schema.SCHEMA_VERSION
    assert attrs["complete"] is True and attrs["failures"] == []
    assert attrs["encoder"]["random_weights"] is True and attrs["encoder"]["weights_fingerprint"] == "random"
    assert attrs["grid"] == [2, 2] and attrs["views"] == ["orig", "flip"] and attrs["crop"] == "adm_center_crop"
    index = json.loads((work / "cache/index.json").read_text())
    assert attrs["dataset_fingerprint"] == index["fingerprint"] and attrs["num_classes"] == 4
    assert np.array_equal(group["labels"][:], index["samples"]["label"])
    assert np.array_equal(group["sample_ids"][:], np.arange(NUM_IMAGES))
    lazy = da.from_zarr(str(store), component="features", chunks=feats.shards)
    assert lazy.chunks[0] == (8,) * 6
    values = lazy.compute()
    assert np.array_equal(values.view(np.uint16), feats[:].view(np.uint16))
    assert np.isfinite(values).all() and np.abs(values).sum(axis=(1, 2, 3)).min() > 0
    # the two views are different encoder inputs (mirror images), so their tokens differ
    assert not np.array_equal(values[:, 0], values[:, 1])


@pytest.mark.slow
def test_dask_local_cluster_matches_in_process(work):
    done = cli(work, "extract", "--config", "tiny.yaml", "--set", "paths.features=cache/dask.zarr",
               "--workers", "2", "--shards", "4")
    assert done.returncode == 0, done.stderr
    assert_same_arrays(read_arrays(work / "cache/dask.zarr"), read_arrays(work / "cache/features.zarr"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(work):
    store = work / "cache/killed.zarr"
    proc = popen(work, "extract", "--config", "tiny.yaml", "--set", "paths.features=cache/killed.zarr",
                 "--shards", "3", "--set", "data.decode_workers=0")
    finished = kill_after_first_record(proc, store)
    assert 1 <= finished < 6, "the kill must land mid-run"
    lock = json.loads((store / ".fae/lock").read_text())
    assert lock["pid"] == proc.pid
    resumed = cli(work, "extract", "--config", "tiny.yaml", "--set", "paths.features=cache/killed.zarr")
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the lock of store {Path('cache/killed.zarr')} left by dead pid {proc.pid}" in resumed.stderr
    assert f"{6 - finished} shards written, {finished} skipped" in resumed.stdout
    assert not (store / ".fae/lock").exists()
    assert_same_arrays(read_arrays(store), read_arrays(work / "cache/features.zarr"))
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is True


@pytest.mark.slow
def test_other_config_refused_unless_overwrite(work):
    shutil.copytree(work / "cache/features.zarr", work / "cache/other.zarr")
    args = ("extract", "--config", "tiny.yaml", "--set", "paths.features=cache/other.zarr",
            "--set", "image_encoder.precision=fp32")
    line = one_line_error(cli(work, *args))
    assert "cache/other.zarr was made with a different config" in line and "--overwrite" in line
    assert zarr.open_group(str(work / "cache/other.zarr"), mode="r").attrs["encoder"]["precision"] == "bf16"
    done = cli(work, *args, "--overwrite")
    assert done.returncode == 0, done.stderr
    group = zarr.open_group(str(work / "cache/other.zarr"), mode="r")
    assert group.attrs["encoder"]["precision"] == "fp32" and group.attrs["complete"] is True


def test_live_lock_refused(work):
    lock = work / "cache/features.zarr/.fae/lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        line = one_line_error(cli(work, "extract", "--config", "tiny.yaml"))
    finally:
        lock.unlink()
    assert f"is locked by pid {os.getpid()} on host {socket.gethostname()}" in line
    assert "remove" in line and ".fae/lock" in line


@pytest.mark.slow
def test_unreadable_images_skipped_or_fatal(work, tmp_path):
    """Files damaged after `prepare` indexed them: zero-byte, truncated, garbage."""
    shutil.copytree(work / "data", tmp_path / "data")
    (tmp_path / "cache").mkdir()
    shutil.copy(work / "cache/index.json", tmp_path / "cache/index.json")
    write_config(tmp_path)
    paths = json.loads((work / "cache/index.json").read_text())["samples"]["path"]
    broken = {5: "zero", 17: "truncated", 30: "garbage"}
    for i, how in broken.items():
        f = tmp_path / "data/demo" / paths[i]
        data = f.read_bytes()
        f.write_bytes(b"" if how == "zero" else data[: len(data) // 2] if how == "truncated" else os.urandom(500))
    done = cli(tmp_path, "extract", "--config", "tiny.yaml")
    assert done.returncode == 0, done.stderr
    assert "3 image(s) could not be decoded" in done.stderr and "3 failed" in done.stdout
    group = zarr.open_group(str(tmp_path / "cache/features.zarr"), mode="r")
    valid = group["valid"][:]
    assert sorted(np.flatnonzero(~valid)) == sorted(broken)
    failures = group.attrs["failures"]
    assert [(f["sample"], f["file"]) for f in failures] == [(i, paths[i]) for i in sorted(broken)]
    assert all(f["reason"] for f in failures)
    feats, ref = group["features"][:], zarr.open_group(str(work / "cache/features.zarr"), mode="r")["features"][:]
    assert not feats[~valid].any()
    np.testing.assert_allclose(feats[valid].astype(np.float32), ref[valid].astype(np.float32), atol=0.02, rtol=0.02)
    assert cli(tmp_path, "verify", "cache/features.zarr").returncode == 0

    line = one_line_error(cli(tmp_path, "extract", "--config", "tiny.yaml", "--set", "data.on_error=fail",
                              "--set", "paths.features=cache/fail.zarr"))
    assert paths[5] in line and "cannot decode image" in line


def test_a_broken_tar_member_is_recorded_with_its_shard(tmp_path):
    """A member of a WebDataset shard that does not decode: the failure record names the shard and the member
    (``<tar>[<member>]``, as prepare's records do), the good member of the same shard is encoded."""
    import io
    import tarfile

    from PIL import Image

    from fae_pipe.config import load_config
    from fae_pipe.data.columns import TarColumn
    from fae_pipe.data.index import DatasetIndex, write_index
    from fae_pipe.encoders.registry import encoder_spec
    from fae_pipe.tasks.features import FeatureExtractTask

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(png, format="PNG")
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards/00000.tar", "w") as tf:
        for name, data in (("000000.png", png.getvalue()), ("000001.png", b"not a png at all")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "shards/00000.tar") as tf:
        members = tf.getmembers()
    index = DatasetIndex(root=str(tmp_path), classes=["image"], paths=[m.name for m in members], labels=[0, 0],
                         sizes=[m.size for m in members], captions=[["red"], ["broken"]],
                         tars=TarColumn(["shards/00000.tar"], [0, 0], [m.offset_data for m in members]))
    write_index(index, tmp_path / "index.npz")
    cfg = load_config(str(write_config(tmp_path)))
    task = FeatureExtractTask(str(tmp_path / "index.npz"), encoder_spec(cfg.image_encoder), 32, ["orig"], 2, 0, "skip")
    task.setup()
    valid, failures = np.ones(2, bool), []
    rows = [r for r, _ in task.decoded_batches(0, 2, valid, failures)]
    assert rows == [[0]] and valid.tolist() == [True, False]
    assert [(f["sample"], f["file"]) for f in failures] == [(1, "shards/00000.tar[000001.png]")]
