"""train-flow on a tiny latent store: artefacts, exact resume (CLI stop and SIGKILL), export -> sample -> evaluate."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fae_pipe.cli import main as cli_main
from fae_pipe.flow import invert
from fae_pipe.training.flow_export import build_flow_from_export, generator_family, load_flow_export
from test_sharded_loader import make_latent_store
from test_train_sit import ENV, fresh_accelerate_state, loss_rows, one_thread, sigkill_after_checkpoint  # noqa: F401
from tiny_pipeline import session_pipeline

STEPS = 6
TRAIN = {"steps": STEPS, "batch_size": 8, "checkpoint_every": 2, "keep_last": 2, "log_every": 1,
         "precision": "fp32", "warmup": 2, "lr": 1e-3, "ema_decay": 0.9, "memory_budget_gb": 0.0, "shuffle_buffer": 1,
         "schedule": "constant"}  # a run stopped by a lower steps= resumes exactly only on a step-free schedule


def write_config(tmp: Path, store: Path, run: str, **train) -> Path:
    cfg = {"paths": {"latents": str(store), "flow_run": str(tmp / run), "metrics": str(tmp / f"metrics-{run}")},
           "flow": {"model": "starflow_tiny", "eval_samples": 0, "noise_sigma": 0.2, "train": {**TRAIN, **train}}}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    ea, eb = load_flow_export(a / "flow.safetensors"), load_flow_export(b / "flow.safetensors")
    for key in ("state_dict", "ema_state_dict"):
        assert ea[key].keys() == eb[key].keys()
        assert all(torch.equal(ea[key][k], eb[key][k]) for k in ea[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run through the real CLI in a fresh interpreter (one thread, as the resumed runs)."""
    tmp = tmp_path_factory.mktemp("flow")
    store = tmp / "latents.zarr"
    make_latent_store(store, n=48)
    cfg = write_config(tmp, store, "ref")
    out = subprocess.run([sys.executable, "-m", "fae_pipe.cli", "train-flow", "--config", str(cfg)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp, store, tmp / "ref"


def test_artefacts_and_export(reference):
    tmp, _, run = reference
    rows = loss_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(float(r["bits_per_dim"]) == pytest.approx(float(r["loss"]) / math.log(2), rel=1e-4) for r in rows)
    metrics = json.loads((tmp / "metrics-ref" / "flow.json").read_text())
    assert metrics["final_bits_per_dim"] == pytest.approx(metrics["final_loss"] / math.log(2))
    path = run / "flow.safetensors"
    assert generator_family(path) == "flow"
    export = load_flow_export(path)
    assert export["generator"] == "flow" and export["flow"] == {"noise_sigma": 0.2, "null_class": 4,
                                                              "final_bits_per_dim": metrics["final_bits_per_dim"]}
    assert export["latent_shape"] == [4, 4, 4] and export["fae_fingerprint"] == "sha256:test"
    model = build_flow_from_export(export)
    assert [len(b.layers) for b in model.blocks] == [1, 1, 1, 4]
    x, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 4])
    with torch.no_grad():
        z, _ = model(x, y)
    assert torch.allclose(invert(model, z, y), x, atol=1e-4)


def test_stop_then_resume_through_the_cli_is_exact(reference):
    tmp, store, ref = reference
    cfg = write_config(tmp, store, "cli")
    cli_main(["train-flow", "--config", str(cfg), "--set", "flow.train.steps=3"])
    cli_main(["train-flow", "--config", str(cfg), "--resume"])
    assert loss_rows(tmp / "cli") == loss_rows(ref)
    assert_same_weights(tmp / "cli", ref)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(reference):
    tmp, store, ref = reference
    cfg = write_config(tmp, store, "kill", steps=100_000, checkpoint_every=1, keep_last=3)
    sigkill_after_checkpoint("train-flow", cfg, tmp / "kill")
    cli_main(["train-flow", "--config", str(cfg), "--resume", "--set", f"flow.train.steps={STEPS}"])
    assert loss_rows(tmp / "kill") == loss_rows(ref)
    assert_same_weights(tmp / "kill", ref)


@pytest.mark.slow
def test_flow_on_the_tiny_pipeline_samples_and_evaluates(tmp_path_factory):
    """The real latents, FAE and decoders: train-flow (with its quality curve), then `sample` with
    generator=flow and `evaluate`, which records that the flow made the samples."""
    config = session_pipeline(tmp_path_factory)
    out = tmp_path_factory.mktemp("flow_e2e")
    cfg = yaml.safe_load(config.read_text())
    cfg["paths"].update(flow_run=str(out / "flow"), samples=str(out / "samples"), metrics=str(out / "metrics"))
    cfg["generator"] = "flow"
    cfg["flow"] = {"model": "tarflow_tiny", "eval_samples": 6, "guidance": 2.0,
                   "train": {"steps": 4, "batch_size": 12, "eval_every": 4, "checkpoint_every": 4, "precision": "fp32"}}
    path = out / "flow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for stage in ("train-flow", "sample", "evaluate"):
        cli_main([stage, "--config", str(path)])
    assert (out / "flow" / "eval.csv").read_text().splitlines()[0].startswith("step,fd_dinov2")
    meta = json.loads((out / "samples" / "samples.json").read_text())
    assert meta["generator"] == "flow" and meta["guidance"] == {"scale": 2.0, "schedule": "ramp", "mode": "product"}
    assert np.load(out / "samples" / "samples.npz")["arr_0"].shape == (12, 64, 64, 3)
    result = json.loads((out / "metrics" / "eval.json").read_text())
    assert result["samples"]["generator"] == "flow" and np.isfinite(result["fd_dinov2"])
