"""Checkpoints, logs, schedules, EMA and the Trainer's non-finite guard shared by every training loop."""

import csv
import math

import pytest
import torch

from fae_pipe.artifacts import seeded_generator
from fae_pipe.config import load_config
from fae_pipe.errors import UserError
from fae_pipe.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from fae_pipe.training.ema import EMA
from fae_pipe.training.logs import StepLog
from fae_pipe.training.schedule import lr_factor
from fae_pipe.training.trainer import Trainer

EMPTY = {"models": {}, "optimizers": {}, "schedulers": {}, "rng": {}}


def test_checkpoints_keep_newest_and_resolve_latest(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {**EMPTY, "models": {"m": {"w": torch.tensor([float(step)])}}}, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000000020.pt", "step-000000030.pt"]
    assert latest_checkpoint(tmp_path).name == "step-000000030.pt"
    ck = load_checkpoint(resolve_resume(tmp_path, "latest"))
    assert ck["step"] == 30 and ck["models"]["m"]["w"].item() == 30.0
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(UserError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(bad)
    torch.save({"step": 1, "model": {}}, bad)  # an older layout
    with pytest.raises(UserError, match="lacks models"):
        load_checkpoint(bad)


def test_rng_roundtrip():
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state)
    assert torch.equal(a, torch.rand(3))


def test_seeded_generator_depends_on_its_names_only():
    draw = lambda *names: torch.rand(4, generator=seeded_generator(0, *names))  # noqa: E731
    torch.rand(10)  # global RNG state plays no part
    assert torch.equal(draw(0, 5, "noise"), draw(0, 5, "noise"))
    assert not torch.equal(draw(0, 5, "noise"), draw(1, 5, "noise"))
    assert not torch.equal(draw(0, 5, "noise"), draw(0, 6, "noise"))
    assert not torch.equal(draw(0, 5, "noise"), draw(0, 5, "time"))


def test_steplog_drops_rows_after_resume_step(tmp_path):
    log = StepLog(tmp_path / "loss.csv", ["loss"])
    for s in range(1, 6):
        log.log(s, loss=float(s))
    StepLog(tmp_path / "loss.csv", ["loss"], resume_step=3).log(4, loss=40.0)
    rows = list(csv.reader(open(tmp_path / "loss.csv")))
    assert rows[0] == ["step", "loss"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"] and rows[-1][1] == "40"


def test_warmup_cosine_and_constant():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1000, 10, 100, "constant") == 1.0


def test_ema_update_formula():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * m.weight)


def tiny_trainer(tmp_path, **train) -> tuple[Trainer, torch.nn.Module]:
    sets = {"paths.sit_run": str(tmp_path / "run"), "paths.metrics": str(tmp_path / "m"), "sit.train.batch_size": 2,
            "sit.train.precision": "fp32", "sit.train.log_with": "none", "sit.train.ema_decay": 0.0,
            **{f"sit.train.{k}": v for k, v in train.items()}}
    run = Trainer("train-x", load_config(None, sets), "sit", tmp_path / "run", None, log_fields=["loss"])
    torch.manual_seed(0)
    model, _ = run.prepare({"model": torch.nn.Linear(3, 1)})
    return run, model


def test_a_non_finite_loss_is_never_applied_and_stops_the_run_at_the_next_log_row(tmp_path):
    """log_every = 5: the NaN of step 2 is skipped on the device; the run stops at the step-5 row."""
    run, model = tiny_trainer(tmp_path, steps=20, log_every=5, checkpoint_every=100)
    x = torch.ones(2, 3)
    weights = []
    with pytest.raises(UserError, match=r"train-x: non-finite loss \(nan\) at step 2; training stopped, "
                                        r"no checkpoint was written yet"):
        for step in run.steps():
            loss = model(x).pow(2).mean() * (math.nan if step == 1 else 1.0)
            run.backward(loss)
            run.update("model", loss)
            run.log(loss=loss)
            weights.append(model.weight.detach().clone())
    assert len(weights) == 5 and torch.isfinite(weights[-1]).all()
    assert torch.equal(weights[1], weights[0])  # the NaN step changed nothing
    assert not torch.equal(weights[2], weights[1])  # the next finite step trains again
    assert run.optimizers["model"].state[model.weight]["step"].item() == 4  # four applied updates


def test_the_checkpoint_after_a_non_finite_step_is_never_written(tmp_path):
    run, model = tiny_trainer(tmp_path, steps=20, log_every=100, checkpoint_every=2)
    with pytest.raises(UserError, match=r"at step 3; training stopped, last good checkpoint: .*step-000000002\.pt$"):
        for step in run.steps():
            loss = model(torch.ones(2, 3)).pow(2).mean() * (math.inf if step == 2 else 1.0)
            run.backward(loss)
            run.update("model", loss)
            run.log(loss=loss)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000000002.pt"]


def test_resume_auto_only_with_matching_settings(tmp_path):
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 1.0}) is None
    save_checkpoint(tmp_path, 5, {**EMPTY, "config": {"sit": {"lr": 1.0, "steps": 10}}}, keep_last=1)
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 1.0, "steps": 20}).name == "step-000000005.pt"
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 2.0, "steps": 10}) is None


def test_log_rows_average_their_window_and_land_at_multiples_of_log_every(tmp_path):
    run, model = tiny_trainer(tmp_path, steps=7, log_every=3, checkpoint_every=100)
    for step in run.steps():
        loss = model(torch.ones(2, 3)).pow(2).mean() * 0 + float(step)  # the loss of step s is s
        run.backward(loss)
        run.update("model", loss)
        run.log(loss=loss)
    run.finish()
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6, 7]  # the last step always closes a window
    assert [float(r["loss"]) for r in rows] == [1.0, 4.0, 6.0]  # means of (0,1,2), (3,4,5), (6,)


def test_resume_auto_ignores_loop_keys_inside_nested_groups(tmp_path):
    save_checkpoint(tmp_path, 5, {**EMPTY, "config": {"sit": {"model": "a", "train": {"lr": 1.0, "steps": 10}}}},
                    keep_last=1)
    same = {"model": "a", "train": {"lr": 1.0, "steps": 20, "log_every": 7}}
    assert resolve_resume(tmp_path, "auto", "sit", same).name == "step-000000005.pt"
    assert resolve_resume(tmp_path, "auto", "sit", {"model": "a", "train": {"lr": 2.0, "steps": 10}}) is None


def test_trackers_tensorboard_none_and_missing(tmp_path, capsys):
    from fae_pipe.training.logs import available_tracker

    run, model = tiny_trainer(tmp_path / "tb", steps=2, log_every=1, checkpoint_every=100, log_with="tensorboard")
    for _ in run.steps():
        loss = model(torch.ones(2, 3)).pow(2).mean()
        run.backward(loss)
        run.update("model", loss)
        run.log(loss=loss)
    run.finish()
    events = list((tmp_path / "tb" / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and any(p.stat().st_size > 0 for p in events)
    run, _ = tiny_trainer(tmp_path / "none", steps=1, log_with="none")
    assert not run.tracking and not (tmp_path / "none" / "run" / "tensorboard").exists()
    assert available_tracker("aim", "train-x") is None  # aim is not installed here
    assert "train.log_with = 'aim' but the aim package is not installed" in capsys.readouterr().out


def test_every_stage_resumes_a_checkpoint_without_ema_the_same_way(tmp_path, capsys):
    """EMA turned on at resume: it starts from the resumed weights, with a note (was: crash / error / silent)."""
    run, model = tiny_trainer(tmp_path, steps=2, log_every=1, checkpoint_every=2)
    for _ in run.steps():
        loss = model(torch.ones(2, 3)).pow(2).mean()
        run.backward(loss)
        run.update("model", loss)
        run.log(loss=loss)
    trained = model.weight.detach().clone()
    sets = {"paths.sit_run": str(tmp_path / "run"), "paths.metrics": str(tmp_path / "m"), "sit.train.batch_size": 2,
            "sit.train.precision": "fp32", "sit.train.log_with": "none", "sit.train.ema_decay": 0.5,
            "sit.train.steps": 4}
    resumed = Trainer("train-x", load_config(None, sets), "sit", tmp_path / "run", "latest", log_fields=["loss"])
    torch.manual_seed(1)
    resumed.prepare({"model": torch.nn.Linear(3, 1)})
    assert resumed.start == 2 and torch.equal(resumed.ema.model.weight, trained)
    assert "the checkpoint has no EMA weights; the EMA starts from the resumed weights" in capsys.readouterr().err


def test_emulated_bf16_on_cpu_is_noted_once_per_key(monkeypatch, capsys):
    """bf16 on a CPU without native support is several times slower than fp32 (AVX2-only
    machines); the run keeps the asked precision but says so, once, naming the key."""
    from fae_pipe import device as dev

    monkeypatch.setattr(dev, "_NOTED", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    cpu = torch.device("cpu")
    assert dev.note_emulated_bf16(cpu, "bf16", "image_encoder.precision")
    assert not dev.note_emulated_bf16(cpu, "bf16", "image_encoder.precision")
    assert not dev.note_emulated_bf16(cpu, "fp32", "sit.train.precision")
    assert not dev.note_emulated_bf16(torch.device("cuda"), "bf16", "sit.train.precision")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_encoder.precision = 'bf16'" in err[0] and "image_encoder.precision: fp32" in err[0]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not dev.note_emulated_bf16(cpu, "bf16", "sit.train.precision")
