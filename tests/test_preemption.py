"""Preemption and one writer per run directory (issue #15 §3).

A stop signal (``runtime.stop_signals``, default SIGTERM) makes train-sit write the
checkpoint of the step it is at and exit 75; ``--resume auto`` then gives the weights
and loss.csv of an uninterrupted run bit for bit. extract finishes the shard in flight
and exits 75; rerunning it completes the store bit-identically. A second train-* on a
run directory is refused naming the holder; a dead holder's lock is taken over.
"""

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

from helpers_extract import SyntheticTask, assert_same_arrays, popen, prepare_tiny, read_arrays, cli as extract_cli
from test_sharded_loader import make_latent_store
from test_train_sit import ENV, assert_same_weights, fresh_accelerate_state, loss_rows, one_thread, write_config  # noqa: F401

from fae_pipe.artifacts import DirLock
from fae_pipe.cli import main as cli_main
from fae_pipe.config import load_config
from fae_pipe.errors import STOP_EXIT_CODE, StopRequested, StopSignals, UserError

STEPS = 120  # long enough that a signal sent after the first rows lands mid-run
SLOW = {"steps": STEPS, "checkpoint_every": 1000, "keep_last": 2}


def train_sit(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """``fae-pipe train-sit`` in a fresh interpreter (one thread): the runs compared bit for bit all run so."""
    return subprocess.run([sys.executable, "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg), *args],
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sit(tmp_path_factory):
    """A tiny latent store and an uninterrupted reference run of STEPS steps."""
    tmp = tmp_path_factory.mktemp("preempt")
    store = tmp / "latents.zarr"
    make_latent_store(store, n=48)
    done = train_sit(write_config(tmp, store, "ref", **SLOW))
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, store, tmp / "ref"


def start_train_sit(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc: subprocess.Popen, run: Path, rows: int = 2, timeout: float = 240) -> None:
    """Until loss.csv has ``rows`` data rows (training is under way)."""
    deadline = time.monotonic() + timeout
    csv = run / "loss.csv"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if csv.exists() and len(csv.read_text().splitlines()) > rows:
            return
        time.sleep(0.01)
    raise AssertionError("training did not start in time")


def stop_step(stderr: str, name: str = "SIGTERM") -> int:
    lines = [ln for ln in stderr.splitlines() if "stop signal" in ln]
    assert len(lines) == 1, stderr[-2000:]
    prefix = f"train-sit: stop signal ({name}) at step "
    assert lines[0].startswith(prefix) and lines[0].endswith(": checkpoint written; continue with --resume auto")
    return int(lines[0][len(prefix):].split(":")[0])


# ---- units ------------------------------------------------------------------------------------------------------
def test_stop_signals_only_set_a_flag_and_restore_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *a: seen.append("old"))
    try:
        with StopSignals(["SIGUSR2"]) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert stop.requested == signal.SIGUSR2 and StopSignals.name(stop.requested) == "SIGUSR2"
        assert not seen
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_stop_signal_names_are_validated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("runtime:\n  stop_signals: [SIGTERM, SIGKILL]\n")
    with pytest.raises(UserError, match="runtime.stop_signals.*SIGKILL.*SIGTERM, SIGUSR1"):
        load_config(str(cfg))
    assert load_config(None).runtime.stop_signals == ["SIGTERM"]


def test_dir_lock_one_owner(tmp_path, capsys):
    lock = DirLock(tmp_path / "run" / ".lock", "run directory run", "another train-sit running?").acquire()
    with pytest.raises(UserError, match=rf"run directory run is locked by pid {os.getpid()} on host "
                                        rf"{socket.gethostname()} \(another train-sit running\?\); if that process "
                                        rf"is dead, remove .*run/\.lock"):
        DirLock(tmp_path / "run" / ".lock", "run directory run", "another train-sit running?").acquire()
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_shard_runner_finishes_the_shard_in_flight_then_stops(tmp_path):
    """A SIGTERM during shard 1: shard 1 is written with its record, shard 2 is not started."""
    from helpers_extract import synthetic_store

    class Preempted(SyntheticTask):
        def compute(self, shard_index, start, stop, progress=None):
            if shard_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            return super().compute(shard_index, start, stop, progress)

    before = signal.getsignal(signal.SIGTERM)
    task = Preempted()
    with pytest.raises(StopRequested, match=r"shards: stop signal \(SIGTERM\): 2 of 3 storage shards complete.*"
                                            r"run the same command again"):
        synthetic_store(tmp_path / "f.zarr", n=24, task=task, units=1)
    assert task.calls == [0, 1] and signal.getsignal(signal.SIGTERM) is before
    assert sorted(p.name for p in (tmp_path / "f.zarr/.fae/done").glob("*.json")) == ["shard-00000.json",
                                                                                      "shard-00001.json"]
    assert not (tmp_path / "f.zarr/.fae/lock").exists()
    rest = SyntheticTask()
    _, result, _ = synthetic_store(tmp_path / "f.zarr", n=24, task=rest, units=1)
    assert rest.calls == [2] and result.complete
    _, whole, _ = synthetic_store(tmp_path / "g.zarr", n=24, units=1)
    import zarr
    a, b = zarr.open_group(str(tmp_path / "f.zarr"), mode="r"), zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    assert np.array_equal(a["features"][:].view(np.uint16), b["features"][:].view(np.uint16))


# ---- run-directory lock -------------------------------------------------------------------------------------------
def test_dead_holder_taken_over_and_lock_released_on_every_exit(sit, capsys):
    tmp, store, _ = sit
    cfg = write_config(tmp, store, "lock", steps=2, checkpoint_every=2)
    run = tmp / "lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    cli_main(["train-sit", "--config", str(cfg)])
    assert f"taking over the lock of run directory {run} left by dead pid {pid}" in capsys.readouterr().err
    assert not (run / ".lock").exists()
    # a UserError out of the setup (resuming with other settings) releases it too
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train-sit", "--config", str(cfg), "--resume", "--set", "sit.model=sit_s"])
    assert exit_.value.code == 2 and not (run / ".lock").exists()


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_its_checkpoint_and_resumes_exactly(sit, capsys):
    """Also: a second train-sit on the running directory is refused with one line naming the holder."""
    tmp, store, ref = sit
    cfg = write_config(tmp, store, "term", **SLOW)
    run = tmp / "term"
    proc = start_train_sit(cfg)
    wait_for_rows(proc, run)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train-sit", "--config", str(cfg), "--resume", "auto"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and err == [
        f"fae-pipe: error: run directory {run} is locked by pid {proc.pid} on host {socket.gethostname()} "
        f"(another train-sit running?); if that process is dead, remove {run / '.lock'}"]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOP_EXIT_CODE, stderr[-2000:]
    step = stop_step(stderr)
    assert 2 <= step < STEPS
    assert (run / "checkpoints" / f"step-{step:09d}.pt").exists() and not (run / ".lock").exists()
    assert not (run / "sit.safetensors").exists()
    resumed = train_sit(cfg, "--resume", "auto")
    assert resumed.returncode == 0 and f"resuming from {run / 'checkpoints'}" in resumed.stderr, resumed.stderr[-2000:]
    assert loss_rows(run) == loss_rows(ref)
    assert_same_weights(run, ref)


@pytest.mark.slow
def test_sigusr1_stops_only_when_configured(sit):
    tmp, store, _ = sit
    cfg = write_config(tmp, store, "usr1", **SLOW)
    text = cfg.read_text() + "runtime:\n  stop_signals: [SIGTERM, SIGUSR1]\n"
    cfg.write_text(text)
    proc = start_train_sit(cfg)
    wait_for_rows(proc, tmp / "usr1")
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOP_EXIT_CODE, stderr[-2000:]
    step = stop_step(stderr, "SIGUSR1")
    assert (tmp / "usr1" / "checkpoints" / f"step-{step:09d}.pt").exists()
    plain = write_config(tmp, store, "plain", **SLOW)  # default: SIGTERM only, SIGUSR1 keeps its default action
    proc = start_train_sit(plain)
    wait_for_rows(proc, tmp / "plain")
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGUSR1 and "stop signal" not in stderr


# ---- extract ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_extract_sigterm_finishes_the_shard_then_resumes_bit_identically(tmp_path):
    prepare_tiny(tmp_path)
    done = extract_cli(tmp_path, "extract", "--config", "tiny.yaml", "--shards", "2")
    assert done.returncode == 0, done.stderr
    store = tmp_path / "cache/term.zarr"
    proc = popen(tmp_path, "extract", "--config", "tiny.yaml", "--set", "paths.features=cache/term.zarr",
                 "--shards", "3", "--set", "data.decode_workers=0")
    finished = sigterm_after_first_shard(proc, store, "extract", 6)
    resumed = extract_cli(tmp_path, "extract", "--config", "tiny.yaml", "--set", "paths.features=cache/term.zarr")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - finished} shards written, {finished} skipped" in resumed.stdout
    assert_same_arrays(read_arrays(store), read_arrays(tmp_path / "cache/features.zarr"))


def sigterm_after_first_shard(proc: subprocess.Popen, store: Path, stage: str, shards: int) -> int:
    """SIGTERM ``proc`` once its first storage shard is recorded; check the clean stop; return the shards done."""
    done_dir, deadline = store / ".fae/done", time.monotonic() + 240
    while not (done_dir.is_dir() and any(done_dir.glob("shard-*.json"))):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOP_EXIT_CODE, stderr[-2000:]
    finished = len(list(done_dir.glob("shard-*.json")))
    line = [ln for ln in stderr.splitlines() if "stop signal" in ln]
    assert line == [f"{stage}: stop signal (SIGTERM): {finished} of {shards} storage shards complete, the rest left "
                    "cleanly without records; run the same command again to continue"], stderr[-2000:]
    assert 1 <= finished < shards and not (store / ".fae/lock").exists()
    return finished


@pytest.mark.slow
def test_encode_sigterm_finishes_the_shard_then_resumes_bit_identically(tmp_path):
    from fae_helpers import cli as fae_cli
    from fae_helpers import make_dataset, make_feature_store
    from fae_helpers import write_config as fae_config
    from test_encode import data_files

    _, index, z = make_dataset(tmp_path, per_class=32, grid=4)  # 128 samples in 16 shards
    make_feature_store(tmp_path / "features.zarr", index, z, shard_samples=8, chunk_samples=8)
    cfg = fae_config(tmp_path / "c.yaml", tmp_path, fae={"train": {"steps": 10, "eval_every": 100}},
                     encode={"shards": 16, "batch_size": 1})
    fae_cli("train-fae", "--config", str(cfg))
    fae_cli("encode", "--config", str(cfg))  # the reference store
    store = tmp_path / "term.zarr"
    args = [sys.executable, "-m", "fae_pipe.cli", "encode", "--config", str(cfg), "--set", f"paths.latents={store}"]
    proc = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    finished = sigterm_after_first_shard(proc, store, "encode", 16)
    resumed = fae_cli("encode", "--config", str(cfg), "--set", f"paths.latents={store}")
    assert f"{16 - finished} shards written, {finished} skipped" in resumed.stderr
    assert data_files(store) == data_files(tmp_path / "latents.zarr")
