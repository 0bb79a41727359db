"""`fae-pipe evaluate` on a tiny, really trained pipeline: the JSON DVC reads, closed-form checks, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fae_pipe.cache import schema
from fae_pipe.cli import main
from fae_pipe.config import load_config
from fae_pipe.data.index import read_index
from fae_pipe.errors import UserError
from fae_pipe.fae.data import open_feature_store
from fae_pipe.metrics.image import lpips_backbone_path
from fae_pipe.sampling.outputs import save_samples
from fae_pipe.sampling.reference import load_reference_pixels, read_view, spread_rows
from fae_pipe.stages import evaluate
from tiny_pipeline import session_pipeline



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_pipeline(tmp_path_factory)


def reference_pixels(cfg):
    """All valid store rows' pixels (orig view), their store rows and labels."""
    group = open_feature_store(cfg.paths.features)
    rows = np.flatnonzero(np.asarray(group[schema.VALID][:], bool))
    ids = np.asarray(group[schema.SAMPLE_IDS].oindex[rows])
    pixels = load_reference_pixels(read_index(cfg.paths.index), ids, cfg.data.image_size, "orig", workers=0)
    return group, rows, ids, pixels


def test_end_to_end_writes_the_json_dvc_reads(tiny):
    main(["evaluate", "--config", str(tiny)])
    cfg = load_config(tiny)
    out = json.loads((tiny.parent / "metrics" / "eval.json").read_text())
    assert out["num_generated"] == cfg.sample.num_samples == 12
    assert out["num_reference"] == 30  # every valid demo image (max_reference 100)
    assert out["fd_dinov2"] >= 0 and math.isfinite(out["fd_dinov2"])
    for key in ("precision", "recall", "coverage"):
        assert 0.0 <= out[key] <= 1.0
    assert out["density"] >= 0.0
    assert out["fid"] is None and out["fid_status"] == "unavailable: no evaluate.inception_weights"
    assert out["inception_score"] is None
    assert out["encoder"] == {"name": "vit_small_patch14_dinov2", "weights": cfg.image_encoder.weights, "input_size": 112,
                              "random_weights": False}
    assert out["warnings"] == []
    rec = out["reconstruction"]
    assert rec["num_images"] == 6  # 2 held out per class
    assert 0 < rec["psnr"] < 60 and rec["rfd_dinov2"] >= 0
    assert (rec["lpips"] is None) == (not lpips_backbone_path("vgg").is_file())
    assert out["samples"]["method"] == "euler" and out["samples"]["steps"] == 5


def test_identical_sets_give_zero_distance_and_full_manifold_overlap(tiny, tmp_path):
    base = load_config(tiny)
    group, rows, _, pixels = reference_pixels(base)
    save_samples(tmp_path / "samples" / "samples.npz", pixels, np.asarray(group[schema.LABELS].oindex[rows]))
    cfg = load_config(tiny, {"paths.samples": str(tmp_path / "samples"), "paths.metrics": str(tmp_path / "m"),
                             "evaluate.inception_weights": str(tmp_path / "missing.pth")})
    r = evaluate.run(cfg)
    ref = read_view(group, schema.CLS, rows, 0).astype(np.float64)
    spread = float(np.trace(np.cov(ref, rowvar=False)))
    # same pixels through the same encoder: only float16 storage rounding separates the two sets
    assert r["fd_dinov2"] <= 1e-5 * spread
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
    assert r["fid"] is None and "does not exist" in r["fid_status"]
    assert json.loads((tmp_path / "m" / "eval.json").read_text())["fd_dinov2"] == r["fd_dinov2"]


class PooledColour(torch.nn.Module):
    """A small stand-in for the FID network with its interface: 299 px input -> (pool, logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        pool = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return pool, self.fc(pool)


def test_fid_of_identical_images_is_zero(tiny):
    cfg = load_config(tiny)
    _, _, ids, pixels = reference_pixels(cfg)
    index = read_index(cfg.paths.index)
    r = evaluate.inception_generation(PooledColour(), pixels, index, ids, cfg.data.image_size, "orig",
                                      cfg.evaluate, workers=0)
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    noisy = np.clip(pixels.astype(int) + 60, 0, 255).astype(np.uint8)
    far = evaluate.inception_generation(PooledColour(), noisy, index, ids, cfg.data.image_size, "orig",
                                        cfg.evaluate, workers=0)
    assert far["fid"] > 1e-3
    assert 1.0 <= r["inception_score"] <= 4.0  # IS lies in [1, number of classes]


def test_refuses_an_encoder_other_than_the_stores(tiny):
    with pytest.raises(UserError, match="image_encoder.input_size = 224") as err:
        evaluate.run(load_config(tiny, {"image_encoder.input_size": 224}))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="image_encoder.precision"):
        evaluate.run(load_config(tiny, {"image_encoder.precision": "fp32"}))


def test_random_encoder_weights_are_flagged(tmp_path):
    notes = evaluate._warnings({"encoder": {"random_weights": True}}, None, tmp_path / "fae.safetensors")
    assert len(notes) == 1 and "RANDOM" in notes[0]
    assert evaluate._warnings({"encoder": {"random_weights": False}}, None, tmp_path / "fae.safetensors") == []
    flagged = {"num_generated": 2, "num_reference": 2, "fd_dinov2": 1.0, "fid": None, "inception_score": None,
               "precision": 1.0, "recall": 1.0, "reconstruction": {}, "encoder": {"random_weights": True},
               "wall_seconds": 1.0}
    assert "(RANDOM encoder)" in evaluate.summary_line(flagged, tmp_path / "eval.json")


def test_reference_rows_are_spread_and_reproducible():
    mask = np.zeros(1000, bool)
    mask[::3] = True
    a, b = spread_rows(mask, 50, seed=0), spread_rows(mask, 50, seed=0)
    assert np.array_equal(a, b) and len(a) == 50 and np.all(np.diff(a) > 0) and mask[a].all()
    assert a.max() > 800 and a.min() < 200  # not the first rows of the store
    assert np.array_equal(spread_rows(mask, 5000), np.flatnonzero(mask))


def test_quality_curve_of_train_sit_is_the_evaluate_metric_of_its_ema(tiny):
    """train-sit's eval.csv: a row per eval_every with FD-DINOv2 etc.; the last row is what the scorer of
    ``fae-pipe evaluate`` gives for the exported EMA on the same fixed noise and labels."""
    import csv

    from fae_pipe.data.latents import read_latent_info
    from fae_pipe.sampling.progress import QualityProbe, pixel_decoder_for
    from fae_pipe.training.sit_export import build_sit_from_export, load_sit_export

    cfg = load_config(str(tiny))
    with open(f"{cfg.paths.sit_run}/eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(math.isfinite(float(r["fd_dinov2"])) and 0 <= float(r["precision"]) <= 1 for r in rows)
    assert [int(r["eval_samples"]) for r in rows] == [6, 6]
    assert 0 < float(rows[0]["train_seconds"]) < float(rows[1]["train_seconds"])
    export = load_sit_export(f"{cfg.paths.sit_run}/sit.safetensors")
    info, _ = read_latent_info(cfg.paths.latents, schema.open_store(cfg.paths.latents)[0])
    probe = QualityProbe(cfg, pixel_decoder_for(cfg, info, torch.device("cpu")), info.shape, info.num_classes,
                         info.num_classes, export["transport"]["shift_factor"], 6, 2, torch.device("cpu"))
    ema = build_sit_from_export(export, use_ema=True)
    first, again = probe(ema), probe(ema)
    assert first["fd_dinov2"] == again["fd_dinov2"]  # fixed noise and labels: the same weights score the same
    assert first["fd_dinov2"] == pytest.approx(float(rows[-1]["fd_dinov2"]), rel=1e-4)
