"""Checkpoints, logs, schedules, EMA and the NaN guard shared by every training loop."""

import csv
import math

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.training.accel import step_generator
from fae_pipe.training.checkpoint import (capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint,
                                          resolve_resume, restore_rng, save_checkpoint)
from fae_pipe.training.ema import EMA
from fae_pipe.training.guard import check_finite
from fae_pipe.training.logs import StepLog
from fae_pipe.training.schedule import lr_factor


def test_checkpoints_keep_newest_and_resolve_latest(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": {"w": torch.tensor([float(step)])}}, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000000020.pt", "step-000000030.pt"]
    assert latest_checkpoint(tmp_path).name == "step-000000030.pt"
    ck = load_checkpoint(resolve_resume(tmp_path, "latest"))
    assert ck["step"] == 30 and ck["model"]["w"].item() == 30.0
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(UserError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(bad)


def test_rng_roundtrip():
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state)
    assert torch.equal(a, torch.rand(3))


def test_step_generator_depends_on_step_and_rank_only():
    draw = lambda **k: torch.rand(4, generator=step_generator(device=torch.device("cpu"), **k))  # noqa: E731
    assert torch.equal(draw(seed=0, rank=0, step=5), draw(seed=0, rank=0, step=5))
    assert not torch.equal(draw(seed=0, rank=0, step=5), draw(seed=0, rank=1, step=5))
    assert not torch.equal(draw(seed=0, rank=0, step=5), draw(seed=0, rank=0, step=6))


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


def test_nan_guard_names_step_and_checkpoint(tmp_path):
    check_finite(torch.tensor(1.0), 3, "train-x", tmp_path)
    save_checkpoint(tmp_path, 2, {"model": {}}, keep_last=1)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 3.*step-000000002.pt"):
        check_finite(torch.tensor(math.nan), 3, "train-x", tmp_path)


def test_resume_auto_only_with_matching_settings(tmp_path):
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 1.0}) is None
    save_checkpoint(tmp_path, 5, {"model": {}, "config": {"sit": {"lr": 1.0, "steps": 10}}}, keep_last=1)
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 1.0, "steps": 20}).name == "step-000000005.pt"
    assert resolve_resume(tmp_path, "auto", "sit", {"lr": 2.0, "steps": 10}) is None
