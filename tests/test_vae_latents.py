"""SD-VAE latents (issue 12 part 2): ``encode.source = sdvae`` end to end on a tiny AutoencoderKL.

The VAE is a tiny random AutoencoderKL written with ``save_pretrained`` to a directory and
loaded through ``vae.weights`` exactly like a user's download of stabilityai/sd-vae-ft-ema.
Checked: the store records the VAE and holds exact statistics; a SIGTERM'd encode resumes
bit-identically (slow: the real CLI in a child); SiT trains on it at patch 2 and, with a fresh
posterior sample per epoch, resumes onto the uninterrupted loss trajectory; ``fae-pipe sample``
decodes through that VAE (no FAE file exists here) and refuses a VAE whose weights changed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from fae_pipe.cli import main as cli_main
from fae_pipe.errors import UserError
from test_train_sit import fresh_accelerate_state  # noqa: F401 (autouse: accelerate's singletons per test)

N, SHARDS = 24, 6  # 4 classes x 6 images, storage shards of 4 samples
TRAIN = {"steps": 8, "batch_size": 8, "checkpoint_every": 2, "keep_last": 2, "log_every": 1, "precision": "fp32",
         "warmup": 0, "lr": 1e-3, "ema_decay": 0.9, "memory_budget_gb": 1.0, "eval_every": 1000}


def write_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A 3-level AutoencoderKL (4x downsampling, 4 channels) saved as a diffusers directory.

    Its posterior log-variance is pulled down (quant_conv bias - 8) so stds are small against the
    means' spread, as in a trained SD-VAE; a random init gives stds near 1."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, sample_size=32)
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 8.0
    vae.save_pretrained(str(path))
    return path


def tiny_config(root: Path, **sections) -> Path:
    cfg = {
        "paths": {"index": str(root / "index.json"), "latents": str(root / "latents.zarr"),
                  "features": str(root / "no-features.zarr"), "fae_run": str(root / "no-fae"),
                  "decoder_run": str(root / "no-decoder"), "sit_run": str(root / "sit"),
                  "samples": str(root / "samples"), "metrics": str(root / "metrics")},
        "data": {"root": str(root / "images"), "demo": True, "demo_classes": 4, "demo_per_class": 6, "demo_size": 32,
                 "image_size": 32, "holdout_fraction": 0.1, "decode_workers": 2},
        "extract": {"shard_samples": 4, "chunk_samples": 2},
        "encode": {"source": "sdvae", "shards": 3, "device": "cpu", "threads": 1},
        "vae": {"weights": str(root / "vae"), "batch_size": 3},
        "sit": {"model": "sit_tiny", "patch_size": 2, "posterior": "sample", "eval_samples": 0, "train": TRAIN},
        "sample": {"method": "euler", "steps": 3, "num_samples": 8, "batch_size": 8, "grid_per_class": 2,
                   "guidance": [[0.0, 1.0, 1.5]], "device": "cpu"},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """prepare --demo, the VAE directory, one uninterrupted `fae-pipe encode` (in this process)."""
    root = tmp_path_factory.mktemp("vae")
    write_tiny_vae(root / "vae")
    cfg = tiny_config(root)
    cli_main(["prepare", "--config", str(cfg)])
    cli_main(["encode", "--config", str(cfg)])
    return root, cfg


def test_the_store_records_the_vae_and_holds_exact_statistics(built, capsys):
    from diffusers import AutoencoderKL

    from fae_pipe.cache import schema
    from fae_pipe.data.index import read_index
    from fae_pipe.data.transforms import load_pixels
    from fae_pipe.models.vae import Vae, vae_input, weights_fingerprint

    root, cfg = built
    g = zarr.open_group(str(root / "latents.zarr"), mode="r")
    source = g.attrs["latent_source"]
    vae = source["vae"]
    assert source["kind"] == "sdvae" and g.attrs["complete"] is True
    assert vae["weights"] == str((root / "vae").resolve()) and vae["random_weights"] is False
    assert vae["weights_fingerprint"] == weights_fingerprint(AutoencoderKL.from_pretrained(str(root / "vae")))
    assert vae["downsample"] == 4 and vae["scaling_factor"] == pytest.approx(0.18215)
    means, stds = np.asarray(g["latents"][:]), np.asarray(g["std"][:])
    assert means.shape == stds.shape == (N, 2, 4, 8, 8) and means.dtype == np.float16
    valid = np.asarray(g["valid"][:])
    assert valid.all() and np.isfinite(means).all() and (stds > 0).all() and stds.max() < 0.1 * means.std()
    # exact statistics: float64 numpy over the whole store equals the merged shard moments
    x = np.moveaxis(means[valid].astype(np.float64), 2, 0).reshape(4, -1)
    np.testing.assert_allclose(g.attrs["channel_mean"], x.mean(axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g.attrs["channel_std"], x.std(axis=1), rtol=1e-12, atol=1e-15)
    assert g.attrs["channel_stats_count"] == x.shape[1]
    # the values are the VAE posterior of the ADM crop (orig, flip) in [-1, 1]
    index = read_index(root / "index.json")
    direct = Vae.from_record(vae).posterior(vae_input(load_pixels(index.abspath(5), 32, ["orig", "flip"])))
    np.testing.assert_allclose(means[5].astype(np.float32), direct[0].numpy(), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(stds[5].astype(np.float32), direct[1].numpy(), rtol=2e-3, atol=1e-6)
    assert list(np.asarray(g["sample_ids"][:])) == list(index.ids) and schema.latent_source(g.attrs, "x") == source
    capsys.readouterr()
    cli_main(["encode", "--config", str(cfg)])  # complete under the same config hash: nothing to do
    assert f"0 shards written, {SHARDS} skipped" in capsys.readouterr().err


def test_the_bits_do_not_depend_on_work_units_or_threads(built):
    from test_encode import data_files

    root, cfg = built
    other = root / "other.zarr"
    cli_main(["encode", "--config", str(cfg), "--set", f"paths.latents={other}", "--set", "encode.shards=1",
              "--set", "encode.threads=2", "--set", "data.decode_workers=0"])
    assert data_files(other) == data_files(root / "latents.zarr")


def test_bad_vae_weights_are_one_line_errors(built):
    from fae_pipe.config import load_config
    from fae_pipe.stages import encode

    root, cfg = built
    for value, needle in (("", "vae.weights = ''"), (str(root / "nowhere"), "nowhere")):
        with pytest.raises(UserError) as err:
            encode.run(load_config(cfg, {"vae.weights": value, "paths.latents": str(root / "bad.zarr")}))
        assert needle in str(err.value) and "diffusers AutoencoderKL directory" in str(err.value)
        assert "\n" not in str(err.value)


def test_posterior_noise_is_a_function_of_seed_epoch_id_and_view(built):
    from fae_pipe.data.latents import LatentBatches, posterior_noise
    from fae_pipe.data.sharded import VIEWS

    root, _ = built
    path = root / "latents.zarr"
    sampled = LatentBatches(path, 8, seed=3, posterior_sample=True)
    means = LatentBatches(path, 8, seed=3)
    per_epoch = sampled.steps_per_epoch
    stream = sampled.from_step(0, "cpu")
    first = [next(stream) for _ in range(2 * per_epoch)]
    resumed = next(sampled.from_step(per_epoch + 1, "cpu"))  # a fresh stream, as after a resume
    assert resumed[0] == 1 and torch.equal(resumed[1], first[per_epoch + 1][1])
    mean_batch = next(means.from_step(0, "cpu"))
    assert torch.equal(mean_batch[2], first[0][2]) and not torch.equal(mean_batch[1], first[0][1])
    # by hand: normalise(mean + std * noise(seed, epoch, id, view)) for the rows of batch 0
    b = next(sampled.loader.batches_from(0))[1]
    eps = posterior_noise(3, 0, b["sample_ids"], b[VIEWS], (4, 8, 8))
    z = b["latents"].astype(np.float32) + b["std"].astype(np.float32) * eps
    torch.testing.assert_close(first[0][1], sampled.info.stats.normalize(torch.from_numpy(z)), rtol=1e-6, atol=1e-6)
    # a fresh draw per epoch: the same sample and view in epoch 0 and 1 gets other noise
    assert not np.array_equal(eps, posterior_noise(3, 1, b["sample_ids"], b[VIEWS], (4, 8, 8)))


@pytest.fixture(scope="module")
def sit_run(built):
    """An uninterrupted train-sit (patch 2, a fresh posterior sample per epoch) on the VAE store."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    root, cfg = built
    cli_main(["train-sit", "--config", str(cfg), "--set", f"paths.sit_run={root / 'sit-ref'}"])
    return root / "sit-ref"


@pytest.mark.slow
def test_sit_trains_at_patch_2_and_a_resumed_posterior_run_is_exact(built, sit_run):
    from fae_pipe.training.sit_export import load_sit_export
    from test_train_sit import assert_same_weights, loss_rows

    root, cfg = built
    runs = {"ref": sit_run, **{name: root / f"sit-{name}" for name in ("cut", "mean")}}
    cli_main(["train-sit", "--config", str(cfg), "--set", f"paths.sit_run={runs['cut']}", "--set", "sit.train.steps=3"])
    cli_main(["train-sit", "--config", str(cfg), "--set", f"paths.sit_run={runs['cut']}", "--resume"])
    assert loss_rows(runs["cut"]) == loss_rows(runs["ref"])  # 8 steps = 2 epochs + 2: the noise spans epochs
    assert_same_weights(runs["cut"], runs["ref"])
    cli_main(["train-sit", "--config", str(cfg), "--set", f"paths.sit_run={runs['mean']}",
              "--set", "sit.posterior=mean"])
    assert [r["loss"] for r in loss_rows(runs["mean"])] != [r["loss"] for r in loss_rows(runs["ref"])]
    export = load_sit_export(runs["ref"] / "sit.safetensors")
    assert export["model_kwargs"]["patch_size"] == 2 and export["latent_shape"] == [4, 8, 8]
    assert export["latent_source"]["kind"] == "sdvae" and export["posterior"] == "sample"
    assert export["fae_fingerprint"] is None


@pytest.mark.slow
def test_sample_decodes_through_the_vae_the_store_records(built, sit_run):
    from diffusers import AutoencoderKL

    from fae_pipe.cache.latent_stats import LatentStats
    from fae_pipe.config import load_config
    from fae_pipe.stages import sample
    from fae_pipe.sampling.generator import ImageGenerator, to_uint8
    from fae_pipe.sampling.plan import sample_noise
    from fae_pipe.training.sit_export import load_sit_export

    root, cfg = built
    run = sit_run
    cli_main(["sample", "--config", str(cfg), "--set", f"paths.sit_run={run}"])
    meta = json.loads((root / "samples/samples.json").read_text())
    assert meta["latent_source"]["kind"] == "sdvae" and meta["fae_fingerprint"] is None
    images = np.load(root / "samples/samples.npz")["arr_0"]
    assert images.shape == (8, 32, 32, 3) and not (root / "no-fae").exists()
    # the same latents decoded by hand with diffusers' own AutoencoderKL.decode
    gen = ImageGenerator.load(run / "sit.safetensors", root / "no-fae/x", root / "no-decoder/x")
    labels = np.load(root / "samples/samples.npz")["arr_1"]
    x = gen.latents(labels, sample_noise(0, range(8), (4, 8, 8)), "euler", 3, [[0.0, 1.0, 1.5]])
    stats = LatentStats.from_dict(load_sit_export(run / "sit.safetensors")["latent_stats"], "export")
    with torch.no_grad():
        pixels = AutoencoderKL.from_pretrained(str(root / "vae")).decode(stats.denormalize(x)).sample
    assert np.abs(to_uint8((pixels.clamp(-1, 1) + 1) / 2).astype(int) - images.astype(int)).max() <= 1
    # other weights in the recorded directory: refused, never decoded
    write_tiny_vae(root / "vae", seed=1)
    with pytest.raises(UserError) as err:
        sample.run(load_config(cfg, {"paths.sit_run": str(run)}))
    assert "fingerprint" in str(err.value) and "\n" not in str(err.value)
    write_tiny_vae(root / "vae", seed=0)


@pytest.mark.slow
def test_a_sigtermed_vae_encode_resumes_bit_identically(built, capsys):
    import os

    from test_encode import data_files
    from test_preemption import sigterm_after_first_shard

    root, cfg = built
    store = root / "term.zarr"
    sets = ["--set", f"paths.latents={store}", "--set", f"encode.shards={SHARDS}"]  # work units only: same bits
    proc = subprocess.Popen([sys.executable, "-m", "fae_pipe.cli", "encode", "--config", str(cfg), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    finished = sigterm_after_first_shard(proc, store, "encode", SHARDS)
    capsys.readouterr()
    cli_main(["encode", "--config", str(cfg), *sets])
    assert f"{SHARDS - finished} shards written, {finished} skipped" in capsys.readouterr().err
    assert data_files(store) == data_files(root / "latents.zarr")


@pytest.mark.slow
def test_evaluate_rebuilds_held_out_images_through_the_vae(built, sit_run):
    root, cfg = built
    enc = {"image_encoder.name": "vit_small_patch14_dinov2", "image_encoder.weights": "random",
           "image_encoder.input_size": "28", "image_encoder.batch_size": "8", "image_encoder.device": "cpu",
           "paths.features": str(root / "features.zarr"), "paths.sit_run": str(sit_run),
           "evaluate.recon_images": "8", "evaluate.batch_size": "8"}
    sets = [a for k, v in enc.items() for a in ("--set", f"{k}={v}")]
    cli_main(["extract", "--config", str(cfg), *sets])
    cli_main(["sample", "--config", str(cfg), *sets])
    cli_main(["evaluate", "--config", str(cfg), *sets])
    result = json.loads((root / "metrics/eval.json").read_text())
    rec = result["reconstruction"]
    assert result["latent_source"] == "sdvae" and rec["num_images"] >= 2 and rec["psnr"] is not None
    assert not [w for w in result["warnings"] if "FAE" in w]  # no FAE exists here, none was asked for
    # the training quality curve decodes its draws through the same VAE
    quality = root / "sit-quality"
    cli_main(["train-sit", "--config", str(cfg), *sets, "--set", f"paths.sit_run={quality}",
              "--set", "sit.train.steps=2", "--set", "sit.train.eval_every=2", "--set", "sit.eval_samples=4",
              "--set", "sit.eval_sampler_steps=2"])
    rows = (quality / "eval.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("2,") and np.isfinite(float(rows[1].split(",")[1]))


@pytest.mark.slow
def test_random_weights_are_the_sd_vae_architecture_recorded_as_random(capsys):
    from fae_pipe.models.vae import SD_VAE_CONFIG, Vae

    vae = Vae.build("random")
    assert "RANDOM" in capsys.readouterr().err
    rec = vae.record
    assert rec["random_weights"] is True and rec["weights"] == "random" and rec["downsample"] == 8
    assert rec["config"]["block_out_channels"] == SD_VAE_CONFIG["block_out_channels"]
    mean, std = vae.posterior(torch.zeros(1, 3, 64, 64))  # 8x downsampling: 4x32x32 at 256 px
    assert mean.shape == std.shape == (1, 4, 8, 8) and vae.grid(256) == (32, 32)
    assert Vae.from_record(rec).record["weights_fingerprint"] == rec["weights_fingerprint"]  # the fixed seed
