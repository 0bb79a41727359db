"""`fae-pipe sample`: labels, process slicing, determinism, the npz/grid layout, and the FAE check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fae_pipe.config import load_config
from fae_pipe.errors import UserError
from fae_pipe.sampling.generator import ImageGenerator
from fae_pipe.sampling.grid import make_grid
from fae_pipe.sampling.outputs import assemble, gather_parts, load_samples, write_part
from fae_pipe.sampling.plan import balanced_labels, global_batches, process_batches, resolve_classes, sample_noise
from fae_pipe.stages import sample as sample_stage
from tiny_checkpoints import NUM_CLASSES, paths_section, write_fae, write_runs, write_sit



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    files = write_runs(root)
    return root, files


def make_cfg(root, tmp_path, **sample):
    section = {"method": "euler", "steps": 4, "num_samples": 7, "batch_size": 3, "grid_per_class": 2,
               "guidance": [[0.0, 0.7, 2.0]], "seed": 0, "device": "cpu"}
    section.update(sample)
    paths = dict(paths_section(root), samples=str(tmp_path / "samples"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"paths": paths, "sample": section}))
    return load_config(path)


def test_batches_cover_every_index_once_for_any_world_size():
    for n, b in [(7, 3), (10, 1), (5, 8), (12, 4)]:
        for world in (1, 2, 3):
            parts = [process_batches(n, b, r, world) for r in range(world)]
            flat = [i for part in parts for batch in part for i in batch]
            assert sorted(flat) == list(range(n)), (n, b, world)
            assert all(len(batch) <= b for part in parts for batch in part)
    assert [list(r) for r in global_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert process_batches(5, 2, 1, 2) == [range(2, 4)]


def test_labels_and_classes():
    assert balanced_labels([2, 0], 5).tolist() == [2, 0, 2, 0, 2]
    assert np.bincount(balanced_labels([0, 1, 2], 30)).tolist() == [10, 10, 10]
    assert resolve_classes([], 3) == [0, 1, 2]
    assert resolve_classes(["2", 0, "cat"], 3, ["dog", "cat", "owl"]) == [2, 0, 1]
    for bad in (["3"], ["zebra"], [1, 1], [True]):
        with pytest.raises(UserError, match="sample.classes"):
            resolve_classes(bad, 3, ["dog", "cat", "owl"])


def test_noise_depends_only_on_seed_and_index():
    a = sample_noise(5, range(0, 6), (2, 3, 3))
    b = torch.cat([sample_noise(5, range(0, 2), (2, 3, 3)), sample_noise(5, range(2, 6), (2, 3, 3))])
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(6, range(0, 6), (2, 3, 3)))
    assert not torch.equal(a[0], a[1])


def test_world_sizes_give_identical_images(runs, tmp_path):
    root, files = runs
    gen = ImageGenerator.load(files["sit"], files["fae"], files["decoder"], device="cpu")
    n, b = 7, 3
    labels = balanced_labels([0, 1, 2], n)
    results = {}
    for world in (1, 2, 3):
        out = tmp_path / f"w{world}"
        for rank in range(world):
            mine = process_batches(n, b, rank, world)
            idx = np.concatenate([np.arange(x.start, x.stop) for x in mine]) if mine else np.zeros(0, np.int64)
            imgs = [gen.generate(x, labels[x.start:x.stop], 0, "euler", 3, [[0.0, 0.7, 2.0]]) for x in mine]
            write_part(out, rank, world, idx, np.concatenate(imgs) if imgs else np.zeros((0, 64, 64, 3), np.uint8))
        results[world] = gather_parts(out, world, n)
        assert not (out / ".parts").exists()
    assert results[1].shape == (n, 64, 64, 3) and results[1].dtype == np.uint8
    assert np.array_equal(results[1], results[2]) and np.array_equal(results[1], results[3])
    # ODE samples do not depend on the batch split either (up to float rounding in the networks)
    single = np.concatenate([gen.generate(range(i, i + 1), labels[i:i + 1], 0, "euler", 3, [[0.0, 0.7, 2.0]])
                             for i in range(n)])
    assert np.abs(single.astype(int) - results[1].astype(int)).max() <= 1


def test_assemble_refuses_gaps_and_duplicates():
    img = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(UserError, match="1 missing"):
        assemble([(np.array([0, 1]), img)], 3)
    with pytest.raises(UserError, match="duplicated"):
        assemble([(np.array([0, 1]), img), (np.array([1, 2]), img)], 3)
    ok = assemble([(np.array([2, 0]), np.stack([np.full((4, 4, 3), 2, np.uint8), np.zeros((4, 4, 3), np.uint8)])),
                   (np.array([1]), np.ones((1, 4, 4, 3), np.uint8))], 3)
    assert ok[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_stage_writes_adm_npz_grid_and_is_deterministic(runs, tmp_path):
    root, _ = runs
    cfg = make_cfg(root, tmp_path)
    summary = sample_stage.run(cfg)
    images, labels = load_samples(tmp_path / "samples" / "samples.npz")
    with np.load(tmp_path / "samples" / "samples.npz") as raw:
        assert sorted(raw.files) == ["arr_0", "arr_1"] and raw["arr_1"].dtype == np.int64
    assert images.shape == (7, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert images.std() > 0
    grid = Image.open(tmp_path / "samples" / "grid.png")
    assert grid.height == NUM_CLASSES * (64 + 2) + 2 and grid.width > 2 * 64
    meta = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert meta["num_samples"] == 7 and meta["seed"] == 0 and meta["fae_fingerprint"] == summary["fae_fingerprint"]

    (tmp_path / "again").mkdir()
    sample_stage.run(make_cfg(root, tmp_path / "again", batch_size=7))
    images2, _ = load_samples(tmp_path / "again" / "samples" / "samples.npz")
    assert np.abs(images2.astype(int) - images.astype(int)).max() <= 1

    other = tmp_path / "other"
    other.mkdir()
    sample_stage.run(make_cfg(root, other, seed=1))
    images3, _ = load_samples(other / "samples" / "samples.npz")
    assert np.abs(images3.astype(int) - images.astype(int)).mean() > 5


def test_guidance_and_ema_change_the_samples(runs):
    _, files = runs
    labels = [0, 1, 2]
    ema = ImageGenerator.load(files["sit"], files["fae"], files["decoder"], use_ema=True)
    raw = ImageGenerator.load(files["sit"], files["fae"], files["decoder"], use_ema=False)
    noise = sample_noise(0, range(3), ema.latent_shape)
    base = ema.latents(labels, noise, steps=4)
    assert torch.equal(base, ema.latents(labels, noise, steps=4, guidance=[[0.0, 1.0, 1.0]]))
    assert not torch.allclose(base, ema.latents(labels, noise, steps=4, guidance=[[0.0, 0.7, 3.0]]))
    assert not torch.allclose(base, raw.latents(labels, noise, steps=4))


def test_refuses_sit_trained_on_another_fae(tmp_path):
    fae_path, dec_path = write_fae(tmp_path / "a", seed=0)
    other_fae, _ = write_fae(tmp_path / "b", seed=1)
    sit_path = write_sit(tmp_path / "a", other_fae)
    with pytest.raises(UserError, match="another FAE") as err:
        ImageGenerator.load(sit_path, fae_path, dec_path)
    assert "\n" not in str(err.value)


def test_grid_rows_follow_requested_classes():
    images = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(6)])
    labels = np.array([2, 0, 2, 0, 2, 0])
    grid = np.asarray(make_grid(images, labels, [2, 0], 2, ["a", "b", "c"]))
    # row 0 shows class 2 (images 0 and 2), row 1 class 0 (images 1 and 3), in sample order
    right = grid[:, -(8 + 2):-2]
    assert right[2 + 4, 4, 0] == 20 and right[2 + 10 + 4, 4, 0] == 30


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch_matches_one_process(runs, tmp_path):
    """A real `accelerate launch` with 2 CPU processes writes the same npz as a plain run."""
    import os
    import subprocess
    import sys

    root, _ = runs
    one = tmp_path / "one"
    one.mkdir()
    sample_stage.run(make_cfg(root, one, num_samples=5, batch_size=2))
    two = tmp_path / "two"
    two.mkdir()
    make_cfg(root, two, num_samples=5, batch_size=2)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "fae_pipe.cli", "sample", "--config", str(two / "cfg.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    a, la = load_samples(one / "samples" / "samples.npz")
    b, lb = load_samples(two / "samples" / "samples.npz")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not (two / "samples" / ".parts").exists()
