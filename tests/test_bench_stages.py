"""bench stages through the real CLI on tiny shapes: a row per stage, the time split, the files, data, competitor."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fae_pipe.cache.synthetic import write_random_latent_store
from fae_pipe.cli import main
from fae_pipe.stages import bench_stages
from tiny_pipeline import session_pipeline

TRAINING = {"train-fae", "train-decoder", "train-sit"}


def tiny_config(root: Path) -> Path:
    """ci.yaml-like shapes (DINOv2-S at 112 px = 8x8 tokens, fae_tiny, sit_tiny), small batches, no stores."""
    cfg = {
        "paths": {k: str(root / k) for k in ("index", "features", "latents", "fae_run", "decoder_run", "sit_run",
                                             "samples", "metrics")},
        "data": {"demo": True, "demo_classes": 3, "image_size": 64},
        "image_encoder": {"name": "vit_small_patch14_dinov2", "weights": "random", "input_size": 112,
                          "precision": "bf16", "batch_size": 2},
        "fae": {"model": "fae_tiny", "train": {"batch_size": 4, "precision": "fp32"}},
        "decoder": {"lpips_backbone": "random", "discriminator": "patchgan_tiny",
                    "train": {"batch_size": 2, "precision": "fp32"}},
        "encode": {"batch_size": 8},
        "sit": {"model": "sit_tiny", "train": {"batch_size": 4, "precision": "bf16", "ema_decay": 0.9, "log_every": 2}},
        "sample": {"steps": 2, "batch_size": 2, "guidance": [[0.0, 0.7, 1.5]]},
        "evaluate": {"batch_size": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def quick(monkeypatch):
    """Seconds, not minutes: a small peak matmul, two timed steps per stage, short competitor windows."""
    for name, value in {"PEAK_SIZES": (512,), "PEAK_SECONDS": 0.2, "MIN_STEPS": 2, "MIN_SECONDS": 0.0,
                        "ROUNDS": 2, "WINDOW_SECONDS": 0.2}.items():
        monkeypatch.setattr(bench_stages, name, value)


def results(config: Path, stem: str = "bench_stages") -> tuple[dict, list[dict]]:
    metrics = Path(yaml.safe_load(config.read_text())["paths"]["metrics"])
    with open(metrics / f"{stem}.csv", newline="") as fh:
        return json.loads((metrics / f"{stem}.json").read_text()), list(csv.DictReader(fh))


def test_every_stage_gets_a_row_with_flops_fraction_and_a_time_split(tmp_path, quick, capsys):
    config = tiny_config(tmp_path)
    main(["bench", "stages", "--config", str(config)])
    out = capsys.readouterr().out
    summary, rows = results(config)
    assert [r["stage"] for r in summary["stages"]] == list(bench_stages.BUILDERS) == [r["stage"] for r in rows]
    assert set(summary["peak_gflop_per_s"]) >= {"fp32", "bf16"} and summary["machine"]["cores"] >= 1
    for r in summary["stages"]:
        assert r["stage"] in out and r["shapes"] in out
        assert r["gflop_per_step"] > 0 and r["gflop_per_s"] > 0 and r["samples_per_s"] > 0
        assert 0 < r["fraction_of_peak"] <= 1.5, r
        assert r["fraction_of_peak"] == pytest.approx(
            r["gflop_per_s"] / r["peak_gflop_per_s"])
        assert r["peak_gflop_per_s"] <= summary["peak_gflop_per_s"][r["precision"]]
        parts = sum(r[f"{p}_ms"] for p in bench_stages.PARTS)
        assert parts == pytest.approx(r["step_ms"], rel=0.05, abs=0.5), r  # the split accounts for the step
        trains = r["stage"] in TRAINING
        assert (r["backward_ms"] > 0 and r["optimizer_ms"] > 0) == trains
        assert (r["item_ms"] is not None) == trains
        assert r["data_ms"] is None  # no stores under tmp_path
    by_stage = {r["stage"]: r for r in summary["stages"]}
    assert by_stage["train-sit"]["precision"] == "bf16" and by_stage["encode"]["precision"] == "fp32"
    assert "8x8x384" in by_stage["extract"]["shapes"] and "GAN on" in by_stage["train-decoder"]["shapes"]
    assert float(rows[0]["gflop_per_s"]) == pytest.approx(summary["stages"][0]["gflop_per_s"])


def test_data_comes_from_the_stage_loader_when_the_store_exists(tmp_path, quick):
    config = tiny_config(tmp_path)
    write_random_latent_store(tmp_path / "latents", (24, 2, 8, 8, 8), 8, 4, labels=np.arange(24) % 3, num_classes=3)
    main(["bench", "stages", "--config", str(config), "--only", "train-sit,sample"])
    summary, _ = results(config)
    assert [r["stage"] for r in summary["stages"]] == ["train-sit", "sample"]
    assert summary["stages"][0]["data_ms"] > 0 and summary["stages"][1]["data_ms"] is None


def test_bad_stage_names_and_compile_without_a_compiler(tmp_path, quick, capsys, monkeypatch):
    config = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["bench", "stages", "--config", str(config), "--only", "train-sit,sampel"])
    assert e.value.code == 2 and "--only 'train-sit,sampel' is invalid" in capsys.readouterr().err
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    main(["bench", "stages", "--config", str(config), "--only", "train-sit", "--compile"])
    summary, rows = results(config)
    assert "no C++ compiler" in summary["compile"]["train-sit"]["status"]
    assert "eager only: no C++ compiler" in capsys.readouterr().out and rows[0]["compile_speedup"] == ""


@pytest.mark.slow
def test_competitor_slowdown_under_this_policy_and_active(tmp_path, quick, capsys):
    config = tiny_config(tmp_path)
    main(["bench", "stages", "--config", str(config), "--only", "train-sit", "--competitor"])
    summary, rows = results(config)
    competing = summary["competitor"]
    assert set(competing) == {"PASSIVE", "ACTIVE"}  # conftest leaves the package's default policy in place
    for policy in competing:
        r = competing[policy]["train-sit"]
        assert r["idle_samples_per_s"] > 0 and r["loaded_samples_per_s"] > 0
        assert r["slowdown"] == pytest.approx(r["idle_samples_per_s"] / r["loaded_samples_per_s"])
    assert float(rows[0]["slowdown_active"]) == pytest.approx(competing["ACTIVE"]["train-sit"]["slowdown"])
    assert "competitor (ACTIVE): train-sit" in capsys.readouterr().out


@pytest.mark.slow
def test_data_of_every_store_reading_stage_on_the_tiny_pipeline(tmp_path_factory, quick):
    config = session_pipeline(tmp_path_factory)
    main(["bench", "stages", "--config", str(config), "--only", "train-fae,train-decoder,encode,train-sit"])
    summary, _ = results(config)
    assert all(r["data_ms"] > 0 for r in summary["stages"]), summary["stages"]
