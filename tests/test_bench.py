"""bench train-step end to end on the tiny pipeline (real store and --synthetic), and the FLOP counter it relies on."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from fae_pipe.cli import main
from fae_pipe.training.flops import count_flops
from tiny_pipeline import session_pipeline


def test_flop_counter_counts_matmuls_and_cpu_attention():
    lin = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(5, 16, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 5 * 16 * 32
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 16 * 32  # forward + grad of input and of weight
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    bmm = 2 * (2 * 3) * 7 * 7 * 8  # one (7x8)(8x7) or (7x7)(7x8) product per batch and head
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * bmm  # QK^T, AV
    # backward: dV, dP, dQ, dK and the recomputed QK^T of the flash kernel (torch's own formula)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 7 * bmm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_pipeline(tmp_path_factory)


@pytest.mark.slow
def test_bench_train_step_on_the_cached_store(tiny, capsys):
    main(["bench", "train-step", "--config", str(tiny)])
    out = capsys.readouterr().out
    metrics = yaml.safe_load(tiny.read_text())["paths"]["metrics"]
    summary = json.loads((__import__("pathlib").Path(metrics) / "bench_train_step.json").read_text())
    assert "sit_tiny on 8x8x8 latents" in out and "measured/expected" in out
    assert summary["batch"] == 12 and min(summary["steps_per_s"].values()) > 0
    flops = summary["flops"]
    assert min(flops.values()) > 0
    assert summary["flop_expected_speedup"] == pytest.approx(sum(flops.values()) / flops["sit_fwd_bwd"])
    assert summary["measured_speedup"] == pytest.approx(
        summary["steps_per_s"]["cached"] / summary["steps_per_s"]["online"])


@pytest.mark.slow
def test_bench_train_step_synthetic_store_follows_the_configured_shapes(tiny, capsys):
    # a 4x4 grid at 56 px: the temporary store must take its shape from the encoder and FAE, not paths.latents
    main(["bench", "train-step", "--config", str(tiny), "--synthetic", "20", "--set", "image_encoder.input_size=56",
          "--set", "sit.train.batch_size=4", "--set", "sit.model=sit_s"])
    out = capsys.readouterr().out
    assert "sit_s on 8x4x4 latents" in out and "@ 56px" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", "train-step", "--config", str(tiny), "--synthetic", "0"])
    assert e.value.code == 2
