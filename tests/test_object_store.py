"""Stores on object storage (issue 17), against a real S3 server on loopback (moto's server mode).

What must hold on a bucket exactly as on a local disk: one writer per store (conditional
create ``If-None-Match: *`` of ``.fae/lock``, a lease renewed with ``If-Match``, a dead
holder taken over), completion records that say when a shard is whole, resume after a
SIGKILL bit-identical to a local run, ``verify``/``inspect`` on URLs, plain zarr and dask
reading the store, and training from ``s3://`` giving the local run's loss trajectory.
Nothing of fae-pipe is mocked: the server is a separate process spoken to over HTTP.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from helpers_extract import FAE_PIPE, SyntheticTask, TINY, assert_same_arrays, synthetic_store
from s3_server import s3  # noqa: F401 (the fixture)
from test_train_sit import one_thread  # noqa: F401 (autouse: in-process runs use one torch thread, as the CLI's)

from fae_pipe.cache import location, schema
from fae_pipe.cache.bookkeeping import LOCK, StoreLock, read_record, read_records
from fae_pipe.cache.inspect import inspect_store, verify_store
from fae_pipe.cache.location import StoreLocation
from fae_pipe.cache.object_lock import ObjectLock
from fae_pipe.cache.shard_reader import ShardReader
from fae_pipe.cache.store_writer import finalize
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError

# every test here talks to the S3 server, a process of its own (and some start the CLI and a dask cluster)
pytestmark = pytest.mark.slow
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True)
def storage(s3):
    """This process opens s3:// with the test server's options (what the CLI does from storage.options)."""
    location.configure(s3.storage, lease=60)
    yield
    location.configure({}, lease=location.DEFAULT_LEASE_SECONDS)


# ---- the lock: conditional create + lease --------------------------------------------------------------------------
def _write_lock(s3, url: str, **owner) -> None:
    loc = StoreLocation(url)
    loc.fs.pipe_file(loc.path(LOCK), json.dumps(owner).encode())


def test_lock_is_a_conditional_create_with_a_lease(s3, capsys):
    url = s3.url("f.zarr")
    with StoreLock(url) as lock:
        held = json.loads(StoreLocation(url).read_bytes(LOCK))
        assert held["pid"] == os.getpid() and held["expires"] > time.time() + 50
        with pytest.raises(UserError, match=f"store {url} is locked by pid {os.getpid()} on host .*lease renewed"):
            StoreLock(url).acquire()
        lock.lock.renew()  # an If-Match write of the ETag it holds
        assert json.loads(StoreLocation(url).read_bytes(LOCK))["expires"] >= held["expires"]
    assert not StoreLocation(url).exists(LOCK)

    # a holder on another host: refused while its lease runs, taken over once it expired
    _write_lock(s3, url, host="node-7", pid=123, owner="x", expires=time.time() + 600)
    with pytest.raises(UserError, match="locked by pid 123 on host node-7"):
        StoreLock(url).acquire()
    _write_lock(s3, url, host="node-7", pid=123, owner="x", expires=time.time() - 5)
    with StoreLock(url):
        assert "taking over the lock of store" in capsys.readouterr().err
    # a dead pid on this host: taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(s3, url, host=socket.gethostname(), pid=int(dead.stdout), owner="y", expires=time.time() + 600)
    with StoreLock(url):
        assert f"left by dead pid {int(dead.stdout)} on this host" in capsys.readouterr().err


def test_an_unreachable_endpoint_is_one_line(s3):
    location.configure({"s3": {**s3.options, "endpoint_url": "http://127.0.0.1:1",
                               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}})
    url = s3.url("f.zarr")
    with pytest.raises(UserError, match=f"store {url}: cannot create its lock object {url}/.fae/lock "
                                        r"\(EndpointConnectionError: .*check the URL, the credentials"):
        StoreLock(url).acquire()
    with pytest.raises(UserError, match=f"{url} could not be reached: EndpointConnectionError"):
        schema.open_group(url)
    with pytest.raises(UserError, match="foo://b/x.zarr: cannot open a foo:// store"):
        schema.open_group("foo://b/x.zarr")


def test_a_lost_lease_is_noticed_and_the_store_is_not_finalised(s3):
    url = s3.url("f.zarr")
    group, _, _ = synthetic_store(url)
    lock = StoreLock(url).acquire()
    try:
        _write_lock(s3, url, host="node-9", pid=5, owner="thief", expires=time.time() + 600)  # taken over
        with pytest.raises(UserError, match="now belongs to pid 5 on node-9"):
            lock.lock.renew()  # its If-Match no longer matches
        with pytest.raises(UserError, match="lost its writer lock .* without marking it complete"):
            finalize(group, [])
    finally:
        lock.release()
    assert json.loads(StoreLocation(url).read_bytes(LOCK))["owner"] == "thief"  # release leaves another's lock


def test_lease_only_mode_for_services_without_conditional_writes(s3, monkeypatch):
    import fae_pipe.cache.object_lock as object_lock

    monkeypatch.setattr(object_lock, "SETTLE_SECONDS", 0.2)
    url = s3.url("f.zarr")
    first = ObjectLock(StoreLocation(url), LOCK, "store X", conditional=False).acquire()
    with pytest.raises(UserError, match="store X is locked by pid"):
        ObjectLock(StoreLocation(url), LOCK, "store X", conditional=False).acquire()
    first.renew()
    first.release()
    assert not StoreLocation(url).exists(LOCK)


# ---- records, readers, inspect/verify ------------------------------------------------------------------------------
def test_store_records_reader_and_verify_on_s3_match_local(s3, tmp_path):
    url = s3.url("f.zarr")
    remote, result, _ = synthetic_store(url, task=SyntheticTask(failed={3}))
    local, _, _ = synthetic_store(tmp_path / "f.zarr", task=SyntheticTask(failed={3}))
    assert result.complete and read_record(url, 1)["failures"] == [] and read_record(url, 0)["valid"] == 7
    assert sorted(read_records(url, range(3))) == [0, 1, 2] and read_records(url, [7]) == {7: None}
    for name in ("features", "valid", "labels"):
        reader = ShardReader(remote[name])
        assert reader.direct and not reader.mappable and reader.map(0) is None
        for s in range(3):
            reader.prefetch(s)
        assert all(np.array_equal(reader.read(s), schema.read_shard(local, name, s)) for s in range(3))
        assert reader.direct_reads == 3 and reader.zarr_reads == 0
    assert verify_store(url, read_index=None) == ["index: no index reader given; labels and sample_ids not checked"]
    assert "complete: True  (3 of 3 shards have completion records)" in inspect_store(url)

    loader = ShardedLoader(url, ["features"], 4, 0, memory_budget_bytes=0, shuffle_buffer=1)
    same = ShardedLoader(tmp_path / "f.zarr", ["features"], 4, 0, memory_budget_bytes=0, shuffle_buffer=1)
    a, b = loader.batches_from(0), same.batches_from(0)
    for _ in range(2 * loader.steps_per_epoch):
        x, y = next(a)[1], next(b)[1]
        assert all(np.array_equal(x[k], y[k]) for k in ("features", "labels", "sample_ids"))

    # a truncated shard object is the one-line damage report, and a defect for verify
    fs, key = StoreLocation(url).fs, StoreLocation(url).path(schema.shard_key(remote, "features", 1))
    fs.pipe_file(key, fs.cat_file(key)[:-9])
    with pytest.raises(UserError, match=r"shard 1 of 'features' is damaged \(shard file features/c/1/0/0/0 is "
                                        r"truncated or corrupt"):
        ShardReader(remote["features"]).read(1)
    assert any("shard 1" in d and "unreadable" in d for d in verify_store(url, read_index=None))


# ---- extract on a LocalCluster into s3://, SIGKILL, resume ---------------------------------------------------------
def _config(workdir: Path, s3, features: str) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["paths"]["features"] = features
    cfg["extract"].update({"shards": 12, "shard_samples": 4, "workers": 2})  # 12 shards: a kill lands mid-run
    cfg["data"]["decode_workers"] = 0
    cfg["storage"] = {"options": s3.storage, "lease_seconds": 30}
    path = workdir / "params.yaml"  # the default config: inspect/verify of a URL read its storage.options
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FAE_PIPE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **THREADS})


def test_extract_with_workers_into_s3_killed_and_resumed_is_bit_identical_to_local(s3, tmp_path, monkeypatch,
                                                                                 capsys):
    """The killed run is the real CLI on a 2-worker LocalCluster; the second extractor, the resume and the local
    reference run the same stage function in this process (their imports are paid once)."""
    from fae_pipe.config import load_config
    from fae_pipe.stages.extract import extract_features

    url = s3.url("features.zarr")
    _config(tmp_path, s3, url)
    assert _cli(tmp_path, "prepare").returncode == 0
    monkeypatch.chdir(tmp_path)
    in_process = load_config("params.yaml", {"extract.workers": "0"})
    local = tmp_path / "cache/features.zarr"
    extract_features(in_process, str(local))

    loc = StoreLocation(url)
    proc = subprocess.Popen([FAE_PIPE, "extract"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **THREADS}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not loc.list(".fae/done"):  # the first completion record in the bucket
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(UserError, match=f"store {url} is locked by pid {proc.pid} on host .*another extract"):
            extract_features(in_process, url)  # a second extractor while the first one runs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its dask workers, mid-run
        proc.communicate(timeout=60)
    recorded = len(loc.list(".fae/done"))
    assert 1 <= recorded < 12 and loc.exists(LOCK)  # killed: the lock stays; shards without records are redone
    capsys.readouterr()

    result = extract_features(in_process, url)
    assert f"taking over the lock of store {url} left by dead pid {proc.pid}" in capsys.readouterr().err
    assert result.complete and result.shards_skipped >= recorded and result.shards_written >= 1
    assert result.shards_skipped + result.shards_written == 12
    assert not loc.exists(LOCK)

    plain = zarr.open_group(url, mode="r", storage_options=s3.options)
    mine = zarr.open_group(str(local), mode="r")
    assert_same_arrays({n: plain[n][:] for n in plain.array_keys()}, {n: mine[n][:] for n in mine.array_keys()})
    import dask.array as da

    x = da.from_zarr(url, component="features", chunks=plain["features"].shards, storage_options=s3.options)
    assert np.array_equal(x.compute().view(np.uint16), mine["features"][:].view(np.uint16))
    assert plain.attrs["complete"] is True and plain.attrs["channel_mean"] == mine.attrs["channel_mean"]

    verified = _cli(tmp_path, "verify", url)
    assert verified.returncode == 0 and f"verify: {url}: OK" in verified.stdout, verified.stdout + verified.stderr
    assert "(12 of 12 shards have completion records)" in inspect_store(url)


# ---- training from s3:// -------------------------------------------------------------------------------------------
def _losses(run: Path) -> list[dict]:
    with open(run / "loss.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(fh)]


def test_train_sit_train_fae_and_encode_from_s3_match_local(s3, tmp_path):
    """train-sit and train-fae through the real CLI entry point (in this process, one torch thread), once from a
    local store and once from the same store in the bucket (streamed: memory budget 0, one-shard windows,
    prefetched): the same loss trajectory; then encode from the bucket into the bucket: the same latents."""
    from fae_helpers import make_dataset, make_feature_store
    from fae_helpers import write_config as fae_config
    from test_sharded_loader import make_latent_store
    from test_train_sit import write_config as sit_config

    from fae_pipe.cli import main

    store = s3.url("latents.zarr")
    make_latent_store(store, n=48)
    make_latent_store(tmp_path / "latents.zarr", n=48)
    for name, path in (("local", tmp_path / "latents.zarr"), ("s3", store)):
        cfg = sit_config(tmp_path, path, f"sit-{name}", steps=4)
        raw = yaml.safe_load(cfg.read_text())
        raw["storage"] = {"options": s3.storage}
        cfg.write_text(yaml.safe_dump(raw))
        main(["train-sit", "--config", str(cfg)])
        _reset_accelerate()
    assert len(_losses(tmp_path / "sit-s3")) == 4 and _losses(tmp_path / "sit-s3") == _losses(tmp_path / "sit-local")

    _, index, z = make_dataset(tmp_path, per_class=8, grid=4)
    for name, path in (("local", str(tmp_path / "features.zarr")), ("s3", s3.url("features.zarr"))):
        make_feature_store(path, index, z, shard_samples=8, chunk_samples=8)
        cfg = fae_config(tmp_path / f"fae-{name}.yaml", tmp_path, paths={"features": path, "fae_run":
                         str(tmp_path / f"fae-{name}")}, fae={"train": {"steps": 4, "eval_every": 4}},
                         storage={"options": s3.storage})
        main(["train-fae", "--config", str(cfg)])
        _reset_accelerate()
    assert len(_losses(tmp_path / "fae-s3")) == 4 and _losses(tmp_path / "fae-s3") == _losses(tmp_path / "fae-local")

    # encode: the bucket's features through that FAE straight into a latent store in the bucket, as from disk
    latents = s3.url("latents.zarr")
    for name, features, out in (("local", str(tmp_path / "features.zarr"), str(tmp_path / "enc.zarr")),
                                ("s3", cfg_paths(tmp_path / "fae-s3.yaml")["features"], latents)):
        main(["encode", "--config", str(tmp_path / "fae-s3.yaml"), "--set", f"paths.features={features}",
              "--set", f"paths.latents={out}", "--set", f"paths.metrics={tmp_path / name}"])
    remote = zarr.open_group(latents, mode="r", storage_options=s3.options)
    mine = zarr.open_group(str(tmp_path / "enc.zarr"), mode="r")
    assert remote.attrs["complete"] is True and remote.attrs["channel_mean"] == mine.attrs["channel_mean"]
    assert np.array_equal(remote["latents"][:].view(np.uint16), mine["latents"][:].view(np.uint16))


def cfg_paths(cfg: Path) -> dict:
    return yaml.safe_load(cfg.read_text())["paths"]


def _reset_accelerate() -> None:
    """Each CLI run is a new process in real use; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_two_processes_stream_train_sit_from_s3_as_from_local_disk(s3, tmp_path):
    """Several nodes read one bucket: `accelerate launch` with 2 CPU processes streams the latent store from
    s3:// (memory budget 0: shard windows read by each rank) and gives the loss trajectory and final weights
    of the same 2-process run from local disk."""
    from test_sharded_loader import make_latent_store
    from s3_server import CREDENTIALS
    from test_train_sit_multiproc import ACCELERATE_CONFIG, free_port

    store = s3.url("latents.zarr")
    make_latent_store(store, n=48)
    make_latent_store(tmp_path / "latents.zarr", n=48)
    sums = {}
    for name, path in (("local", str(tmp_path / "latents.zarr")), ("s3", store)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            "paths": {"latents": path, "sit_run": str(tmp_path / f"run-{name}"),
                      "metrics": str(tmp_path / f"metrics-{name}")},
            "storage": {"options": s3.storage},
            "sit": {"model": "sit_tiny", "eval_samples": 0, "train": {
                "steps": 3, "batch_size": 8, "checkpoint_every": 3, "precision": "fp32", "lr": 1e-3,
                "ema_decay": 0.9, "memory_budget_gb": 0.0, "log_every": 1}},
        }))
        accelerate = Path(sys.executable).with_name("accelerate")
        out = subprocess.run([str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG),
                              "--main_process_port", str(free_port()), "-m", "fae_pipe.cli", "train-sit",
                              "--config", str(cfg)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, **CREDENTIALS, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"run-{name}" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 and r["step"] == 3 for r in ranks)
        assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
        sums[name] = ranks[0]["param_sha256"]
    assert len(_losses(tmp_path / "run-s3")) == 3 and _losses(tmp_path / "run-s3") == _losses(tmp_path / "run-local")
    assert sums["s3"] == sums["local"]
