"""Crash consistency: SIGKILL extract and train-sit at many random instants, resume each time, compare bit for bit.

Every kill is followed by the plain resume a user (or ``dvc repro``) would run: the
same ``extract`` command, ``train-sit --resume auto``. Kills land during start-up,
model building, shard or step computation and checkpoint/record writes; the lock a
killed run leaves is taken over. The final store / weights and loss.csv must equal an
uninterrupted run's. The instants come from ``FAE_CRASH_SEED`` (default 0) so a
failure can be replayed; ``FAE_CRASH_KILLS`` sets the kills per stage (default 4).
"""

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_extract import assert_same_arrays, cli, popen, prepare_tiny, read_arrays
from test_sharded_loader import make_latent_store
from test_train_sit import ENV, assert_same_weights, loss_rows, write_config

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FAE_CRASH_SEED", "0"))
KILLS = int(os.environ.get("FAE_CRASH_KILLS", "4"))


def kill_at(proc: subprocess.Popen, seconds: float, started=None) -> bool:
    """SIGKILL ``proc`` ``seconds`` after ``started()`` first holds (default: now); False if it ended first."""
    deadline = time.monotonic() + 300
    while started is not None and not started():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline
        time.sleep(0.005)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    return True


def kill_repeatedly(start, draw, fresh: Path) -> list:
    """KILLS times: ``start()`` a run, SIGKILL it at ``draw(i)`` = (delay, started); returns the delays that landed.

    A run that finishes before its kill (a fast machine) removes ``fresh`` so the next
    run starts over and can be killed again.
    """
    landed = []
    for i in range(KILLS):
        proc = start()
        delay, started = draw(i)
        if kill_at(proc, delay, started):
            landed.append(round(delay, 3))
        else:
            assert proc.returncode == 0, proc.communicate()[1][-2000:]
            shutil.rmtree(fresh)
    print(f"kills landed at {landed} s")
    assert landed, "no kill landed mid-run"
    return landed


def test_train_sit_killed_at_random_instants_resumes_bit_identically(tmp_path):
    rng = random.Random(SEED)
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=48)
    train = {"steps": 60, "checkpoint_every": 3, "keep_last": 2}
    ref = subprocess.run([sys.executable, "-m", "fae_pipe.cli", "train-sit", "--config",
                          str(write_config(tmp_path, store, "ref", **train))], env=ENV, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cfg = write_config(tmp_path, store, "crash", **train)
    run = tmp_path / "crash"
    args = [sys.executable, "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg), "--resume", "auto"]
    landed = kill_repeatedly(
        lambda: subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        lambda i: (rng.uniform(0.0, 6.0), None) if i % 2 == 0  # anywhere from start-up on
        else (rng.uniform(0.0, 1.5), lambda: (run / "loss.csv").exists()),  # steps, log rows, checkpoints
        run)
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (landed, done.stderr[-2000:])
    assert loss_rows(run) == loss_rows(tmp_path / "ref"), landed
    assert_same_weights(run, tmp_path / "ref")
    assert not (run / ".lock").exists()


def test_extract_killed_at_random_instants_resumes_bit_identically(tmp_path):
    rng = random.Random(SEED + 1)
    prepare_tiny(tmp_path)
    ref = cli(tmp_path, "extract", "--config", "tiny.yaml")
    assert ref.returncode == 0, ref.stderr
    store = tmp_path / "cache/crash.zarr"
    args = ("extract", "--config", "tiny.yaml", "--set", "paths.features=cache/crash.zarr", "--shards", "3",
            "--set", "data.decode_workers=0")
    landed = kill_repeatedly(
        lambda: popen(tmp_path, *args),
        lambda i: (rng.uniform(0.0, 8.0), None) if i % 2 == 0
        else (rng.uniform(0.0, 2.0), lambda: (store / "zarr.json").exists()),  # shard computation and writes
        store)
    done = cli(tmp_path, *args)
    assert done.returncode == 0, (landed, done.stderr[-2000:])
    assert_same_arrays(read_arrays(store), read_arrays(tmp_path / "cache/features.zarr"))
    assert not (store / ".fae/lock").exists()


def test_encode_killed_at_random_instants_resumes_bit_identically(tmp_path):
    """The latent store after kills + plain re-runs equals an uninterrupted encode's, statistics included."""
    from fae_helpers import cli as fae_cli
    from fae_helpers import make_dataset, make_feature_store
    from fae_helpers import write_config as fae_config
    from test_encode import data_files

    rng = random.Random(SEED + 2)
    _, index, z = make_dataset(tmp_path, per_class=32, grid=4)  # 128 samples in 16 shards: a kill lands mid-run
    make_feature_store(tmp_path / "features.zarr", index, z, shard_samples=8, chunk_samples=8)
    cfg = fae_config(tmp_path / "c.yaml", tmp_path, fae={"train": {"steps": 10, "eval_every": 100}},
                     encode={"shards": 8, "batch_size": 4})
    fae_cli("train-fae", "--config", str(cfg))
    fae_cli("encode", "--config", str(cfg))  # the reference store: cfg's paths.latents
    store = tmp_path / "crash.zarr"
    args = [sys.executable, "-m", "fae_pipe.cli", "encode", "--config", str(cfg), "--set", f"paths.latents={store}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    records = lambda: len(list((store / ".fae" / "done").glob("*.json")))  # noqa: E731

    def draw(i):
        if i % 2 == 0:  # start-up, FAE load, store creation (a run takes 2-3 s, 0.4 s of it encoding)
            return rng.uniform(0.3, 1.8), None
        before = records()  # after this run's first shard record: shard computation and writes, finalize
        return rng.uniform(0.0, 0.15), (lambda: records() > before)

    landed = kill_repeatedly(
        lambda: subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        draw, store)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (landed, done.stderr[-2000:])
    assert data_files(store) == data_files(tmp_path / "latents.zarr")
    import zarr

    ref_attrs, got = dict(zarr.open_group(str(tmp_path / "latents.zarr")).attrs), dict(zarr.open_group(str(store)).attrs)
    for key in ("channel_mean", "channel_std", "fae_fingerprint", "complete", "config_hash"):
        assert got[key] == ref_attrs[key], key
    assert not (store / ".fae/lock").exists()
