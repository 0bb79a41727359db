"""train-sit really runs as 2 CPU processes under `accelerate launch` with the shipped config file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fae_pipe.models.registry import create_model
from fae_pipe.training.logs import parameter_checksum
from fae_pipe.training.sit_export import load_sit_export
from test_sharded_loader import make_latent_store

pytestmark = pytest.mark.slow  # real subprocess runs: minutes, not seconds

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_take_part_and_stay_identical(tmp_path):
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=48)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "paths": {"latents": str(store), "sit_run": str(tmp_path / "run"), "metrics": str(tmp_path / "metrics")},
        "sit": {"model": "sit_tiny", "eval_samples": 0, "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "precision": "fp32",
                                               "lr": 1e-3, "ema_decay": 0.9, "memory_budget_gb": 1.0}},
    }))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", str(free_port()),
           "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2, global batch 8 = 2 x 1 x 4" in out.stdout

    records = [json.loads((tmp_path / "run" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 3 and r["samples_this_run"] == 3 * 4 for r in records)
    assert records[0]["param_sha256"] == records[1]["param_sha256"]

    metrics = json.loads((tmp_path / "metrics" / "sit.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    export = load_sit_export(tmp_path / "run" / "sit.safetensors")
    model = create_model(export["model_name"], **export["model_kwargs"])
    model.load_state_dict(export["state_dict"])
    assert parameter_checksum(model) == records[0]["param_sha256"]
