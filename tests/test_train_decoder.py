"""train-decoder: aligned pixel targets, beats the mean-image baseline, exact resume, stage 2 on x_hat."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fae_pipe.cache import schema
from fae_pipe.config import load_config
from fae_pipe.data.index import read_index
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import load_decoder_file
from fae_pipe.fae.data import PixelBatches, feature_split, open_feature_store
from fae_pipe.stages import train_decoder, train_fae

from fae_helpers import features_of, make_dataset, make_feature_store, paint, write_config

DECODER = {"lpips_backbone": "random", "lpips_weight": 0.1, "gan_weight": 0.1, "gan_start": 20,
           "discriminator": "patchgan_tiny", "eval_images": 16,
           "train": {"steps": 30, "batch_size": 16, "lr": 1e-3, "warmup": 5, "checkpoint_every": 10, "keep_last": 5,
                     "eval_every": 15, "precision": "fp32", "ema_decay": 0.8, "log_every": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    _, index, z = make_dataset(root)
    make_feature_store(root / "features.zarr", index, z)
    return root, z


@pytest.fixture(scope="module")
def stage1(data):
    """One short stage-1 run shared by the tests below."""
    root, _ = data
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = write_config(root / "c.yaml", root, decoder=DECODER)
    train_decoder.run(load_config(path))
    torch.set_num_threads(before)
    return root, path


def test_pixel_targets_show_the_features_view(data):
    root, z = data
    group = open_feature_store(str(root / "features.zarr"))
    split = feature_split(group, str(root / "index.json"))
    loader = ShardedLoader(root / "features.zarr", [schema.FEATURES], 16, 3, sample_mask=split.train,
                           memory_budget_bytes=4 << 30, shuffle_buffer=8, random_view=True)
    stream = PixelBatches(loader, loader.batches_from(0), read_index(root / "index.json"), 64, ["orig", "flip"],
                          split.sample_ids, workers=2)
    feats = features_of(z)
    seen_views = set()
    for _ in range(4):  # crosses an epoch boundary (3 steps per epoch)
        _, batch = next(stream)
        for sid, view, px, f in zip(batch["sample_ids"], batch["views"], batch["pixels"], batch[schema.FEATURES]):
            painted = paint(z[sid])
            assert np.array_equal(px, painted if view == 0 else painted[:, ::-1])
            assert np.array_equal(f, feats[sid, view])
            seen_views.add(int(view))
    stream.close()
    assert seen_views == {0, 1}


def test_short_run_beats_the_mean_image_baseline(stage1):
    root, _ = stage1
    metrics = json.loads((root / "metrics" / "decoder.json").read_text())
    assert metrics["psnr"] > metrics["baseline_psnr"] + 2.0, metrics
    assert metrics["eval_images"] == 16 and metrics["lpips_backbone"] == "random" and metrics["stage"] == 1
    with open(root / "decoder" / "loss.csv") as fh:
        log = list(csv.DictReader(fh))
    assert len(log) == 30 and log[19]["gan"] == "" and log[20]["gan"] != "" and float(log[20]["d_weight"]) > 0
    assert Image.open(root / "decoder" / "recon_grid.png").size == (8 * 64, 4 * 64)
    export = load_decoder_file(root / "decoder" / "decoder.safetensors")
    assert export["model"] == "fae_tiny.pixel_decoder" and export["stage"] == 1 and export["image_size"] == 64
    assert export["ema"] is True


def test_resume_from_a_checkpoint_reproduces_the_run(stage1, tmp_path):
    root, path = stage1
    run = tmp_path / "run"
    shutil.copytree(root / "decoder", run)
    for name in ("step-000000030.pt", "step-000000030.json"):
        (run / "checkpoints" / name).unlink()
    (run / "checkpoints" / "latest").write_text("step-000000020.pt\n")
    (run / "decoder.safetensors").unlink()
    cfg = load_config(path, {"paths.decoder_run": str(run), "paths.metrics": str(tmp_path / "m")})
    train_decoder.run(cfg, resume="latest")  # steps 21-30: GAN on, discriminator state restored
    a = load_decoder_file(root / "decoder" / "decoder.safetensors")
    b = load_decoder_file(run / "decoder.safetensors")
    for key in ("state_dict", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (root / "decoder" / "loss.csv").read_text() == (run / "loss.csv").read_text()


def test_stage2_fine_tunes_on_the_fae_reconstruction(stage1, tmp_path):
    root, path = stage1
    overrides = {"paths.decoder_run": str(tmp_path / "dec"), "paths.fae_run": str(tmp_path / "fae"),
                 "paths.metrics": str(tmp_path / "m"), "decoder.phase": 2, "decoder.train.steps": 4,
                 "decoder.gan_start": 0, "fae.train.steps": 5}
    cfg = load_config(path, overrides)
    with pytest.raises(UserError, match="train-fae"):
        train_decoder.run(cfg)
    train_fae.run(cfg)
    with pytest.raises(UserError, match="decoder_stage1.safetensors"):
        train_decoder.run(cfg)
    shutil.copytree(root / "decoder", tmp_path / "dec", dirs_exist_ok=True)  # the refused run left dec/ (its lock dir)
    train_decoder.run(cfg)
    export = load_decoder_file(tmp_path / "dec" / "decoder.safetensors")
    stage1_export = load_decoder_file(tmp_path / "dec" / "decoder_stage1.safetensors")
    assert export["stage"] == 2 and export["fae_fingerprint"].startswith("sha256:")
    assert stage1_export["stage"] == 1 and (tmp_path / "dec" / "loss_stage1.csv").is_file()
    assert not all(torch.equal(export["state_dict"][k], stage1_export["state_dict"][k]) for k in export["state_dict"])
