"""train-sit on a tiny latent store: exact resume (CLI and SIGKILL), NaN stop, export, no encoder imports."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from fae_pipe.cli import main as cli_main
from fae_pipe.config import load_config
from fae_pipe.data.latents import LatentBatches
from fae_pipe.errors import UserError
from fae_pipe.training.sit_export import build_sit_from_export, load_sit_export
from test_sharded_loader import make_latent_store

STEPS = 6
TRAIN = {"steps": STEPS, "batch_size": 8, "checkpoint_every": 2, "keep_last": 2, "log_every": 1,
       "precision": "no", "warmup": 2, "lr": 1e-3, "ema_decay": 0.9, "memory_budget_gb": 0.0, "shuffle_buffer": 1}
FORBIDDEN = ("timm", "lpips", "fae_pipe.encoders", "fae_pipe.data.transforms", "fae_pipe.fae",
             "fae_pipe.models.fae_encoder", "fae_pipe.models.feature_decoder", "fae_pipe.models.pixel_decoder")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def write_config(tmp: Path, store: Path, run: str, **train) -> Path:
    cfg = {"paths": {"latents": str(store), "sit_run": str(tmp / run), "metrics": str(tmp / f"metrics-{run}")},
           "sit": {"model": "sit_tiny", "eval_samples": 0, "train": {**TRAIN, **train}}}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def loss_rows(run: Path) -> list[dict]:
    """The deterministic columns of loss.csv (samples/s is a timing)."""
    with open(run / "loss.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(fh)]


def assert_same_weights(a: Path, b: Path) -> None:
    ea, eb = load_sit_export(a / "sit.safetensors"), load_sit_export(b / "sit.safetensors")
    for key in ("state_dict", "ema_state_dict"):
        assert ea[key].keys() == eb[key].keys()
        assert all(torch.equal(ea[key][k], eb[key][k]) for k in ea[key]), key


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use the subprocesses' thread count: float reductions then agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each CLI invocation is a new process; accelerate keeps process-wide singletons, so reset them per test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run through the real CLI in a fresh interpreter, plus the modules it imported."""
    tmp = tmp_path_factory.mktemp("sit")
    store = tmp / "latents.zarr"
    make_latent_store(store, n=48)
    cfg = write_config(tmp, store, "ref")
    code = ("import json, sys; from fae_pipe.cli import main; "
            f"main(['train-sit', '--config', {str(cfg)!r}]); print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp, store, tmp / "ref", json.loads(out.stdout.strip().splitlines()[-1])


def test_never_imports_the_image_encoder_or_a_decoder_loss(reference):
    *_, modules = reference
    assert "fae_pipe.stages.train_sit" in modules and "fae_pipe.models.sit" in modules
    assert not [m for m in modules if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)]


def test_artefacts(reference):
    tmp, store, run, _ = reference
    rows = loss_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert [p.name for p in sorted((run / "checkpoints").glob("*.pt"))] == ["step-000000004.pt", "step-000000006.pt"]
    metrics = json.loads((tmp / "metrics-ref" / "sit.json").read_text())
    assert metrics["steps"] == STEPS and metrics["world_size"] == 1
    assert metrics["final_loss"] == pytest.approx(np.mean([float(r["loss"]) for r in rows]))
    export = load_sit_export(run / "sit.safetensors")
    group = zarr.open_group(str(store), mode="r")
    assert export["latent_stats"]["channel_mean"] == group.attrs["channel_mean"]
    assert export["fae_fingerprint"] == "sha256:test" and export["latent_shape"] == [4, 4, 4]
    assert export["model_kwargs"]["in_channels"] == 4 and export["num_classes"] == 4
    model = build_sit_from_export(export)
    assert model(torch.zeros(2, 4, 4, 4), torch.full((2,), 0.5), torch.tensor([0, 4])).shape == (2, 4, 4, 4)


def test_stop_then_resume_through_the_cli_is_exact(reference):
    tmp, store, ref, _ = reference
    cfg = write_config(tmp, store, "cli")
    cli_main(["train-sit", "--config", str(cfg), "--set", "sit.train.steps=3"])
    cli_main(["train-sit", "--config", str(cfg), "--resume"])
    assert loss_rows(tmp / "cli") == loss_rows(ref)
    assert_same_weights(tmp / "cli", ref)


def test_resume_auto_continues_a_compatible_run_and_restarts_otherwise(reference, capsys):
    tmp, store, ref, _ = reference
    cfg = write_config(tmp, store, "auto")
    cli_main(["train-sit", "--config", str(cfg), "--resume", "auto",
              "--set", "sit.train.steps=3"])  # nothing to resume: fresh
    cli_main(["train-sit", "--config", str(cfg), "--resume", "auto"])  # same settings but steps: resumes
    assert "resuming from" in capsys.readouterr().err
    assert loss_rows(tmp / "auto") == loss_rows(ref)
    assert_same_weights(tmp / "auto", ref)
    cli_main(["train-sit", "--config", str(cfg), "--resume", "auto", "--set", "sit.train.lr=0.002",
              "--set", "sit.train.steps=2"])
    assert "starting a fresh run" in capsys.readouterr().out
    assert [int(r["step"]) for r in loss_rows(tmp / "auto")] == [1, 2]
    assert [p.name for p in sorted((tmp / "auto" / "checkpoints").glob("*.pt"))] == ["step-000000002.pt"]


def sigkill_after_checkpoint(stage: str, cfg: Path, run: Path, step: int = 3) -> None:
    """Start ``fae-pipe <stage>`` in a fresh interpreter, SIGKILL it once the checkpoint of ``step`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "fae_pipe.cli", stage, "--config", str(cfg)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / f"step-{step:09d}.pt"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and marker.exists()


def test_sigkill_then_resume_is_exact(reference):
    tmp, store, ref, _ = reference
    cfg = write_config(tmp, store, "kill", steps=100_000, checkpoint_every=1, keep_last=3)
    sigkill_after_checkpoint("train-sit", cfg, tmp / "kill")
    cli_main(["train-sit", "--config", str(cfg), "--resume", "--set", f"sit.train.steps={STEPS}"])
    assert loss_rows(tmp / "kill") == loss_rows(ref)
    assert_same_weights(tmp / "kill", ref)


@pytest.mark.parametrize("log_every, checkpoint_every", [(1, 1), (100, 2)])
def test_non_finite_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, log_every, checkpoint_every):
    """With ``log_every > 1`` the NaN of step 3 is found at step 4's checkpoint, never written."""
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=48)
    cfg = load_config(write_config(tmp_path, store, "nan", checkpoint_every=checkpoint_every, log_every=log_every))
    poisoned = int(LatentBatches(store, 8, seed=0, memory_budget_bytes=0, shuffle_buffer=1).loader.epoch_order(0)[2 * 8])
    zarr.open_group(str(store), mode="r+")["latents"][poisoned] = np.nan
    from fae_pipe.stages import train_sit

    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 3; training stopped, last good "
                                        r"checkpoint: .*step-000000002\.pt$"):
        train_sit.run(cfg)
    assert [p.name for p in sorted((tmp_path / "nan" / "checkpoints").glob("*.pt"))][-1] == "step-000000002.pt"


def test_global_batch_must_split_over_processes_and_accumulation(tmp_path):
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=32)
    from fae_pipe.stages import train_sit

    with pytest.raises(UserError, match="sit.train.batch_size = 8 is invalid: it must be divisible by .* = 3"):
        train_sit.run(load_config(write_config(tmp_path, store, "div", grad_accum=3)))


def test_grad_accumulation_in_bf16(tmp_path):
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=32)
    from fae_pipe.stages import train_sit

    summary = train_sit.run(load_config(write_config(tmp_path, store, "acc", steps=2, grad_accum=2, precision="bf16")))
    assert summary["steps"] == 2 and len(loss_rows(tmp_path / "acc")) == 2
    assert np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_compiled_run_resumes_bit_identically(reference, capsys):
    """runtime.compile: a compiled run stopped at step 3 and resumed equals the uninterrupted compiled run."""
    tmp, store, _, _ = reference
    whole = write_config(tmp, store, "compiled")
    cli_main(["train-sit", "--config", str(whole), "--set", "runtime.compile=true"])
    assert "forward compiled with inductor" in capsys.readouterr().err
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0  # graphs were really compiled, not a silent eager fallback
    assert json.loads((tmp / "metrics-compiled" / "sit.json").read_text())["compiled"] is True
    parts = write_config(tmp, store, "compiled-parts")
    cli_main(["train-sit", "--config", str(parts), "--set", "runtime.compile=true", "--set", "sit.train.steps=3"])
    cli_main(["train-sit", "--config", str(parts), "--set", "runtime.compile=true", "--resume"])
    assert loss_rows(tmp / "compiled-parts") == loss_rows(tmp / "compiled")
    assert_same_weights(tmp / "compiled-parts", tmp / "compiled")


def test_compile_without_a_cpu_compiler_runs_eager_with_a_note(reference, capsys, monkeypatch):
    tmp, store, ref, _ = reference
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    cfg = write_config(tmp, store, "eager")
    cli_main(["train-sit", "--config", str(cfg), "--set", "runtime.compile=true"])
    assert "runtime.compile: no C++ compiler ('no-such-c++-compiler') on PATH" in capsys.readouterr().err
    assert json.loads((tmp / "metrics-eager" / "sit.json").read_text())["compiled"] is False
    assert loss_rows(tmp / "eager") == loss_rows(ref)
