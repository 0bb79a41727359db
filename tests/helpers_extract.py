"""Shared pieces of the cache tests: a tiny config, the real CLI, and store readers.

The tiny setting: 48 procedurally drawn demo images at 32 px in 4 classes, DINOv2-S
with random weights at 28 px (2x2 tokens), storage shards of 8 samples, batches of 3
images (ragged inside a shard, so batch boundaries are exercised). Torch threads are
pinned to 1 because other test processes share the two cores (spinning OpenMP teams
on an oversubscribed machine run 10x slower).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
import zarr

FAE_PIPE = str(Path(sys.executable).with_name("fae-pipe"))
ARRAYS = ("features", "cls", "labels", "sample_ids", "valid")

TINY = {
    "paths": {"index": "cache/index.json", "features": "cache/features.zarr"},
    "data": {"root": "data/demo", "demo": True, "demo_classes": 4, "demo_per_class": 12, "demo_size": 32,
             "image_size": 32, "views": ["orig", "flip"], "holdout_fraction": 0.1, "decode_workers": 2},
    "encoder": {"name": "vit_small_patch14_dinov2", "weights": "random", "input_size": 28, "precision": "bf16",
                "batch_size": 3, "device": "cpu"},
    "extract": {"shards": 2, "shard_samples": 8, "chunk_samples": 4, "workers": 0, "threads": 1},
}
NUM_IMAGES = 48


def write_config(workdir: Path, name: str = "tiny.yaml", **sections) -> Path:
    """Write the tiny config (sections merged over ``TINY``) into ``workdir``."""
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = Path(workdir) / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``fae-pipe ARGS`` in ``workdir`` and capture its output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([FAE_PIPE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def popen(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([FAE_PIPE, *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def prepare_tiny(workdir: Path) -> Path:
    """Write the tiny demo folder and its index with the real ``fae-pipe prepare``."""
    config = write_config(workdir)
    done = cli(workdir, "prepare", "--config", config.name)
    assert done.returncode == 0, done.stderr
    return config


def read_arrays(store) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_arrays(a, b) -> None:
    """Bit-identical arrays (float16 compared as raw bits, so NaN/-0 would count too)."""
    for name in ARRAYS:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.shape == y.shape, name
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        assert np.array_equal(x, y), f"{name} differs"


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: exactly one ``fae-pipe: error:`` line, exit code 2."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fae-pipe: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]
