"""`fae-pipe probe` on the tiny trained pipeline: three accuracies, a fixed split, the JSON DVC reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fae_pipe.cli import main
from fae_pipe.config import load_config
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FeatureAutoencoder
from fae_pipe.fae.data import open_feature_store
from fae_pipe.sampling.reference import read_view
from fae_pipe.stages import probe
from tiny_pipeline import session_pipeline



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_pipeline(tmp_path_factory)


def test_probe_writes_three_accuracies_and_is_reproducible(tiny, capsys):
    main(["probe", "--config", str(tiny)])
    printed = capsys.readouterr().out
    out = json.loads((tiny.parent / "metrics" / "probe.json").read_text())
    assert out["num_samples"] == 30 and out["num_train"] + out["num_test"] == 30 and out["num_test"] == 8
    assert out["num_classes"] == 3 and out["view"] == "orig"
    assert (out["encoder_dim"], out["latent_dim"], out["reconstructed_dim"]) == (384, 8, 384)
    for kind in probe.KINDS:
        acc = out[f"{kind}_accuracy"]
        assert 0.0 <= acc <= 1.0 and (acc * out["num_test"]).is_integer()
        assert f"{acc:.4f}" in printed
    # three visually distinct demo classes: the image-dependent encoder features separate them
    assert out["encoder_accuracy"] >= 0.75
    again = probe.run(load_config(tiny, {"paths.metrics": str(tiny.parent / "metrics2")}))
    for kind in probe.KINDS:
        assert again[f"{kind}_accuracy"] == out[f"{kind}_accuracy"]


def test_pooled_features_follow_the_fae(tiny):
    cfg = load_config(tiny)
    group = open_feature_store(cfg.paths.features)
    fae = FeatureAutoencoder.load(tiny.parent / "fae" / "fae.safetensors")
    rows = np.array([0, 3, 7])
    feats = probe.pooled_features(group, fae, rows, 0)
    tokens = torch.from_numpy(read_view(group, "features", rows, 0))
    z = fae.encode_raw(tokens)
    assert np.allclose(feats["encoder"], tokens.mean(dim=1).numpy(), atol=1e-6)
    assert np.allclose(feats["latent"], z.mean(dim=(2, 3)).numpy(), atol=1e-5)
    rebuilt = fae.decode_raw(z, "features").mean(dim=1).numpy()
    assert np.allclose(feats["reconstructed"], rebuilt, atol=1e-5)


def test_probe_needs_two_classes(tiny, tmp_path):
    with pytest.raises(UserError, match="at least 2 classes"):
        probe.run(load_config(tiny, {"probe.max_samples": 10, "paths.features": str(_one_class_store(tiny, tmp_path))}))


def _one_class_store(tiny, tmp_path):
    """A copy of the tiny feature store whose labels are all class 0."""
    import shutil

    import zarr

    dst = tmp_path / "features.zarr"
    shutil.copytree(tiny.parent / "features.zarr", dst)
    group = zarr.open_group(str(dst), mode="r+")
    group["labels"].with_config({"write_empty_chunks": True})[:] = 0  # as fae-pipe writes: a file per shard
    return dst
