"""bench train-step end to end on the tiny pipeline (real store, --synthetic, REPA), and the FLOP counter it relies on."""

import json
from pathlib import Path

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


def bench_summary(config) -> dict:
    metrics = yaml.safe_load(config.read_text())["paths"]["metrics"]
    return json.loads((Path(metrics) / "bench_train_step.json").read_text())


@pytest.mark.slow
def test_bench_train_step_on_the_cached_store_with_repa_targets_from_features(tiny, capsys):
    # sit.repa_weight > 0 adds the REPA rows: targets read from the tiny features.zarr vs DINOv2 run on the images
    main(["bench", "train-step", "--config", str(tiny), "--set", "sit.repa_weight=0.5",
          "--set", "sit.repa_projector=repa_projector_tiny"])
    out = capsys.readouterr().out
    summary = bench_summary(tiny)
    assert "sit_tiny on 8x8x8 latents" in out and "measured/expected" in out
    assert "REPA: lambda 0.5, repa_projector_tiny on block 1/4; targets 8x8x384 from" in out
    assert "cached + REPA (targets from features.zarr)" in out and "online + REPA (DINOv2 on the images" in out
    rate = summary["steps_per_s"]
    assert summary["batch"] == 12 and set(rate) == {"cached", "online", "cached+repa", "online+repa"}
    assert min(rate.values()) > 0
    flops = summary["flops"]
    assert min(flops.values()) > 0
    assert summary["flop_expected_speedup"] == pytest.approx(sum(flops.values()) / flops["sit_fwd_bwd"])
    assert summary["measured_speedup"] == pytest.approx(rate["cached"] / rate["online"])
    repa = summary["repa"]
    assert repa["depth"] == 1 and repa["target_dim"] == 384 and repa["targets"].endswith("features.zarr")
    assert repa["flops"]["sit_repa_fwd_bwd"] > flops["sit_fwd_bwd"]  # the projector and the alignment loss
    assert repa["flops"]["encoder"] == flops["encoder"]  # the same DINOv2 forward makes the online targets
    assert repa["flop_expected_speedup"] == pytest.approx(sum(repa["flops"].values()) / repa["flops"]["sit_repa_fwd_bwd"])
    assert repa["measured_speedup"] == pytest.approx(rate["cached+repa"] / rate["online+repa"])
    assert set(repa["online_seconds_per_step"]) == {"decode", "encoder", "sit_step"}  # no FAE on the REPA way
    assert min(summary["loader_seconds_per_batch"].values()) > 0


@pytest.mark.slow
def test_bench_train_step_synthetic_store_follows_the_configured_shapes(tiny, capsys):
    # a 4x4 grid at 56 px: the temporary store must take its shape from the encoder and FAE, not paths.latents
    main(["bench", "train-step", "--config", str(tiny), "--synthetic", "20", "--set", "image_encoder.input_size=56",
          "--set", "sit.train.batch_size=4", "--set", "sit.model=sit_s"])
    out = capsys.readouterr().out
    assert "sit_s on 8x4x4 latents" in out and "@ 56px" in out and "REPA" not in out
    assert "repa" not in bench_summary(tiny)
    with pytest.raises(SystemExit) as e:
        main(["bench", "train-step", "--config", str(tiny), "--synthetic", "0"])
    assert e.value.code == 2


@pytest.mark.slow
def test_bench_train_step_synthetic_repa_targets_on_another_grid(tiny, capsys):
    # a random feature store beside the random latents; SiT patch 2 puts the 4x4 targets onto a 2x2 token grid
    main(["bench", "train-step", "--config", str(tiny), "--synthetic", "16", "--set", "image_encoder.input_size=56",
          "--set", "sit.train.batch_size=4", "--set", "sit.patch_size=2", "--set", "sit.repa_weight=0.5",
          "--set", "sit.repa_projector=repa_projector_tiny", "--set", "sit.repa_depth=2"])
    out = capsys.readouterr().out
    assert "block 2/4; targets 4x4x384 from" in out and "4x4x384 from vit_small_patch14_dinov2 online" in out
    repa = bench_summary(tiny)["repa"]
    assert repa["depth"] == 2 and repa["measured_speedup"] > 0 and repa["flop_expected_speedup"] > 1
    with pytest.raises(SystemExit) as e:  # targets of another width than the encoder's: one line, no traceback
        main(["bench", "train-step", "--config", str(tiny), "--synthetic", "4", "--set", "sit.train.batch_size=2",
              "--set", "sit.repa_weight=0.5", "--set", "fae.model=fae_dinov2_b"])
    assert e.value.code == 2
    assert "holds 768-wide tokens but vit_small_patch14_dinov2 makes 384" in capsys.readouterr().err
