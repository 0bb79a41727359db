"""Preemption under `accelerate launch` (2 CPU processes): every rank stops after the same step, and it resumes.

Slow: several real launches of ~10 s each.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fae_pipe.errors import STOP_EXIT_CODE
from test_sharded_loader import make_latent_store
from test_train_sit_multiproc import ACCELERATE_CONFIG, free_port

pytestmark = pytest.mark.slow

STEPS = 150
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_cfg(tmp: Path, store: Path, name: str) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "paths": {"latents": str(store), "sit_run": str(tmp / name), "metrics": str(tmp / f"metrics-{name}")},
        "sit": {"model": "sit_tiny", "eval_samples": 0, "train": {"steps": STEPS, "batch_size": 8, "checkpoint_every": 1000,
                                               "log_every": 1, "precision": "fp32", "lr": 1e-3, "ema_decay": 0.9,
                                               "memory_budget_gb": 1.0}},
    }))
    return cfg


def launch(cfg: Path, *args: str, **kw) -> subprocess.Popen:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", str(free_port()),
           "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=cfg.parent, **kw)


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (from their RANK environment variable)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = [e for e in env if e.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0][5:])] = int(proc.name)
    return found


def wait_for_rows(proc, run: Path, rows: int = 3, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        csv = run / "loss.csv"
        if csv.exists() and len(csv.read_text().splitlines()) > rows:
            return
        time.sleep(0.02)
    raise AssertionError("training did not start in time")


def rank_sha(run: Path) -> list[str]:
    return [json.loads((run / "ranks" / f"rank-{r}.json").read_text())["param_sha256"] for r in (0, 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp-preempt")
    store = tmp / "latents.zarr"
    make_latent_store(store, n=48)
    proc = launch(write_cfg(tmp, store, "ref"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return tmp, store, rank_sha(tmp / "ref")


def stop_line(stderr: str) -> int:
    lines = [ln for ln in stderr.splitlines() if "stop signal (SIGTERM) at step" in ln]
    assert len(lines) == 1, stderr[-3000:]  # the main process says it, once
    return int(lines[0].split("at step ")[1].split(":")[0])


@pytest.mark.parametrize("target", ["group", "rank1"])
def test_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(reference, target):
    """``group``: SIGTERM to the launcher's process group (what a scheduler does); ``rank1``: to the
    non-main rank only, so rank 0 learns of it only through the per-step all-reduce."""
    tmp, store, ref_sha = reference
    cfg = write_cfg(tmp, store, target)
    run = tmp / target
    proc = launch(cfg, start_new_session=True)
    wait_for_rows(proc, run)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    step = stop_line(err)
    assert 3 <= step < STEPS
    if target == "rank1":  # the launcher reports its workers' exit code; signalled itself, it just exits 1
        assert f"exitcode  : {STOP_EXIT_CODE}" in err, err[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == [f"step-{step:09d}.pt"]
    assert not (run / ".lock").exists()
    resumed = launch(cfg, "--resume", "auto")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from" in err
    sha = rank_sha(run)
    assert sha[0] == sha[1] == ref_sha[0]
