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
    "image_encoder": {"name": "vit_small_patch14_dinov2", "weights": "random", "input_size": 28, "precision": "bf16",
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


def kill_after_first_record(proc: subprocess.Popen, store: Path, timeout: float = 240) -> int:
    """SIGKILL a store-writing command as soon as its first shard completion record exists; returns how
    many records were there after it died (what a crash mid-run leaves)."""
    import signal
    import time

    done_dir = Path(store) / ".fae/done"
    deadline = time.monotonic() + timeout
    while not (done_dir.is_dir() and any(done_dir.glob("shard-*.json"))):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return len(list(done_dir.glob("shard-*.json")))


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


class SyntheticTask:
    """A model-free shard task (what ``encode`` plugs in is just another task like this).

    Values are a pure function of the sample position; ``zero_shards`` are written as all
    zeros (including labels), ``failed`` samples come back invalid with a failure record.
    """

    def __init__(self, kind: str = "features", failed=(), zero_shards=(), store_std: bool = False, shape=(2, 4, 3)):
        import uuid

        self.cache_key = f"synthetic:{uuid.uuid4().hex}"
        self.kind, self.failed, self.zero_shards = kind, set(failed), set(zero_shards)
        self.store_std, self.shape = store_std, shape
        self.setups, self.calls = 0, []

    def setup(self) -> None:
        self.setups += 1

    def compute(self, shard_index, start, stop, progress=None):
        self.calls.append(shard_index)
        rows = np.arange(start, stop)
        base = np.ones((stop - start, *self.shape), np.float32) * (rows.reshape(-1, *[1] * len(self.shape)) + 1)
        valid = np.array([i not in self.failed for i in rows])
        if shard_index in self.zero_shards:
            base[:] = 0
        base[~valid] = 0
        values = (base / 7).astype(np.float16)
        arrays = {"labels": np.where(shard_index in self.zero_shards, 0, rows % 3).astype(np.int64),
                  "sample_ids": rows.astype(np.int64), "valid": valid}
        if self.kind == "features":
            arrays["features"], arrays["cls"] = values, values[:, :, 0]
        else:
            arrays["latents"] = values
            if self.store_std:
                arrays["std"] = np.abs(values)
        failures = [{"sample": int(i), "sample_id": int(i), "file": f"img{i}.png", "reason": "synthetic"}
                    for i in rows if i in self.failed]
        if progress is not None:
            progress(stop - start)
        return arrays, {"failures": failures, "total": float(values.astype(np.float64).sum())}


def synthetic_store(path, n: int = 20, kind: str = "features", task=None, config_hash: str = "hash-a",
                    units: int = 2, store_std: bool = False, fingerprint: str = ""):
    """Create and fill a small store through the real lock/create/run/finalize path."""
    from fae_pipe.cache import schema
    from fae_pipe.cache.bookkeeping import StoreLock
    from fae_pipe.cache.shards import ShardPlan, run_shards
    from fae_pipe.cache.store_writer import finalize, mark_incomplete, open_or_create

    task = task or SyntheticTask(kind, store_std=store_std, shape=(2, 4, 3) if kind == "features" else (2, 4, 3, 1))
    attrs = {schema.A_INDEX_PATH: str(Path(path).parent / "index.json"), schema.A_DATASET_FINGERPRINT: fingerprint,
             schema.A_VIEWS: ["orig", "flip"]}

    def create():
        if kind == "features":
            return schema.create_feature_store(path, n, 2, 4, 3, (2, 2), 8, 4, attrs)
        return schema.create_latent_store(path, n, 2, 4, (3, 1), 8, 4, attrs, store_std=store_std)

    with StoreLock(path):
        group, resumed = open_or_create(path, config_hash, create, overwrite=False)
        mark_incomplete(group)
        result = run_shards(path, task, ShardPlan(n, 8), config_hash, units=units)
        extra = {}
        if kind == "latents":
            extra = {schema.A_CHANNEL_MEAN: [0.1, 0.2, 0.3, 0.4], schema.A_CHANNEL_STD: [1.0, 1.5, 2.0, 2.5]}
        if result.complete:
            finalize(group, result.failures(), extra)
    return group, result, task


def write_synthetic_index(path, n: int = 20):
    """An index whose labels match ``SyntheticTask`` (row % 3); returns its fingerprint."""
    from fae_pipe.data.index import DatasetIndex, write_index

    index = DatasetIndex(root="images", classes=["a", "b", "c"], paths=[f"img{i}.png" for i in range(n)],
                         labels=np.arange(n) % 3)
    write_index(index, path)
    return index.fingerprint
