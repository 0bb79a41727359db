"""Mechanics of ``fae-pipe bench scale``: the ImageNet-shaped folder, the rehearsal project, measured stages.

Why subprocesses: each stage runs as the real CLI command (``fae-pipe prepare`` ...) in its
own process, as on a cluster, so its peak memory is its own (the index parsed, the store
opened, dask workers started) and not whatever an earlier stage left in this process.
Peak RSS is each process's own high-water mark (``VmHWM`` in /proc, read every ``POLL_S``
for the stage process and its descendants, e.g. dask workers): exact except for a last
rise in the final ``POLL_S`` of a process. ``wait4``'s ``ru_maxrss`` is not used: Linux
carries the parent's high-water mark across fork + exec, so it reports the bench's own size.
Time outside the model comes from ``fae_pipe.phases`` (env ``FAE_PIPE_PHASES``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fae_pipe.errors import UserError
from fae_pipe.phases import ENV as PHASES_ENV
from fae_pipe.phases import read_phases

# DINOv2-S/14 with one block (image_encoder.model_args), random weights: fae_tiny's 384-d tokens, ~10x cheaper
REHEARSAL_ENCODER = {"name": "vit_small_patch14_dinov2", "model_args": ["depth=1"], "weights": "random"}
SHARD_SAMPLES = 1024  # the real layout: ImageNet's 1.28M samples in ~1,252 storage shards
IMAGE_SIDE = 16  # pixels: a 16x16 PNG is a few hundred bytes
ENCODER_INPUT = 28  # 2x2 patch tokens at patch 14
POOL = 97  # distinct image files cycled through the folder (prime, so neighbours differ)
POLL_S = 0.1
MODEL_PHASES = ("model: shard compute",)


def layout(samples: int) -> tuple[int, int]:
    """(classes, images per class): ImageNet's 1,000 classes at >= 1M samples, else 1,000 per class."""
    if samples < 4:
        raise UserError(f"bench scale: --samples {samples} is too small: expected at least 4")
    classes = 1000 if samples >= 1_000_000 else max(2, min(1000, samples // 1000))
    return classes, samples // classes


def _image_pool(seed: int) -> list[bytes]:
    """``POOL`` distinct 16x16 RGB PNGs: smooth gradients with a little noise (~300-500 bytes each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    pool = []
    for _ in range(POOL):
        a, b, c = rng.uniform(-12, 12, size=3)
        base = np.stack([a * xx + b * yy, b * xx - c * yy, c * xx + a * yy], -1) + rng.uniform(0, 255, 3)
        img = (base + rng.integers(0, 6, base.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG", optimize=True)
        pool.append(buf.getvalue())
    return pool


def write_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> int:
    """ImageNet-shaped folder ``root/n<8 digits>/n<8 digits>_<i>.png``; skipped when complete. Returns files."""
    from tqdm import tqdm

    marker = root / ".complete"
    want = f"{classes}x{per_class} seed {seed}\n"
    if marker.is_file() and marker.read_text() == want:
        return classes * per_class
    pool = _image_pool(seed)
    bar = tqdm(total=classes * per_class, desc="writing images", unit="img", file=sys.stderr, mininterval=2)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            with open(d / f"n{c:08d}_{i:05d}.png", "wb") as f:
                f.write(pool[(c * 7919 + i) % POOL])
        bar.update(per_class)
    bar.close()
    marker.write_text(want)
    return classes * per_class


def num_shards(samples: int) -> int:
    return -(-samples // SHARD_SAMPLES)


def rehearsal_config(samples: int, fae_steps: int, sit_steps: int, workers: int = 2) -> dict:
    """The rehearsal's params.yaml: real layout and loaders, tiny models (see docs/scaling.md)."""
    shards = num_shards(samples)
    train = dict(precision="fp32", schedule="constant", warmup=0, log_every=10, keep_last=1, log_with="none")
    return {
        "paths": {"index": "cache/index.npz", "features": "cache/features.zarr", "latents": "cache/latents.zarr",
                  "fae_run": "runs/fae", "sit_run": "runs/sit", "metrics": "metrics"},
        "data": {"root": "data/train", "demo": False, "seed": 0, "image_size": IMAGE_SIDE, "views": ["orig"],
                 "holdout_fraction": 0.01, "on_error": "skip", "check": "header", "decode_workers": 1},
        "image_encoder": {**REHEARSAL_ENCODER, "input_size": ENCODER_INPUT,
                          "precision": "fp32", "batch_size": 256, "device": "cpu"},
        # one dask task per storage shard: the scheduling load of a real ImageNet run
        "extract": {"shards": shards, "shard_samples": SHARD_SAMPLES, "chunk_samples": 16, "workers": workers,
                    "threads": 1 if workers else 0},
        "encode": {"shards": shards, "workers": workers, "threads": 1 if workers else 0, "batch_size": 1024,
                   "device": "cpu"},
        "fae": {"model": "fae_tiny", "train": dict(train, steps=fae_steps, batch_size=64, lr=1e-3,
                                                   checkpoint_every=fae_steps, eval_every=fae_steps)},
        # memory_budget_gb 0: the loader streams shards (as ImageNet's 42 GB of latents would)
        "sit": {"model": "sit_tiny", "patch_size": 1, "eval_samples": 0,
                "train": dict(train, steps=sit_steps, batch_size=64, lr=1e-3, ema_decay=0.0,
                              checkpoint_every=sit_steps, eval_every=sit_steps, memory_budget_gb=0.0,
                              shuffle_buffer=8)},
        "runtime": {"threads": 2},
    }


DVC_STAGES = {  # the real dvc.yaml's commands and artefact edges (code deps live outside this project)
    "prepare": ("fae-pipe prepare", [], ["data", "paths.index"], "${paths.index}"),
    "extract": ("fae-pipe extract --overwrite", ["${paths.index}"], ["image_encoder", "data.image_size",
                "data.views", "extract.shard_samples", "extract.chunk_samples"], "${paths.features}"),
    "train-fae": ("fae-pipe train-fae --resume auto", ["${paths.features}"], ["fae"], "${paths.fae_run}"),
    "encode": ("fae-pipe encode --overwrite", ["${paths.features}", "${paths.fae_run}"], ["encode.batch_size"],
               "${paths.latents}"),
    "train-sit": ("fae-pipe train-sit --resume auto", ["${paths.latents}"], ["sit"], "${paths.sit_run}"),
}


def dvc_yaml() -> dict:
    stages = {}
    for name, (cmd, deps, params, out) in DVC_STAGES.items():
        stage = {"cmd": cmd, "params": params, "outs": [{out: {"cache": False, "persist": True}}]}
        if deps:
            stage["deps"] = deps
        stages[name] = stage
    return {"stages": stages}


def _walk(top: Path, skip: tuple[str, ...]):
    """Every file's ``os.DirEntry`` under ``top``, leaving out ``skip`` directories directly under it."""
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if not (e.name in skip and Path(e.path).parent == top):
                        stack.append(Path(e.path))
                else:
                    yield e


def count_files(top: Path, skip: tuple[str, ...] = ("data", "phases", "logs")) -> int:
    """Files under ``top`` except the image folder and the bench's own logs."""
    return sum(1 for _ in _walk(top, skip))


def tree_bytes(top: Path) -> int:
    """Bytes of every file under ``top`` (images included)."""
    return sum(e.stat(follow_symlinks=False).st_size for e in _walk(top, ()))


@dataclass
class Measured:
    """One stage of one rehearsal size."""

    stage: str
    seconds: float
    peak_rss_mb: float | None = None  # largest single process (stage process exact, workers sampled)
    tree_rss_mb: float | None = None  # largest sampled sum over the stage's process tree
    processes: int = 1
    files: int = 0
    plumbing_s: float | None = None  # time in fae_pipe.phases blocks outside the model, all processes
    model_s: float | None = None
    phases: dict = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def fae_pipe_argv(*args: str) -> list[str]:
    """The installed ``fae-pipe`` entry point beside this interpreter (the real CLI)."""
    exe = Path(sys.executable).with_name("fae-pipe")
    return [str(exe) if exe.is_file() else "fae-pipe", *args]


def stage_env(work: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop(PHASES_ENV, None)
    return env


def run_measured(stage: str, argv: list[str], work: Path, kill_when=None, ok_codes=(0,)) -> Measured:
    """Run ``argv`` in ``work`` as one stage; ``kill_when()`` true -> SIGKILL its process group."""
    import psutil

    logs, phases_dir = work / "logs", work / "phases"
    logs.mkdir(exist_ok=True)
    phases_dir.mkdir(exist_ok=True)
    phases_file = phases_dir / f"{stage}.jsonl"
    phases_file.unlink(missing_ok=True)
    env = stage_env(work)
    env[PHASES_ENV] = str(phases_file)
    files_before = count_files(work)
    peaks: dict[int, float] = {}
    tree_peak, killed = 0.0, False
    t0 = time.perf_counter()
    with open(logs / f"{stage}.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: a kill takes its dask workers too
    root = psutil.Process(proc.pid)
    while True:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        total = 0.0
        for p in tree:
            rss, hwm = _memory_mb(p.pid)
            if hwm is not None:
                peaks[p.pid] = max(peaks.get(p.pid, 0.0), hwm)
                total += rss
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, total)
        if kill_when is not None and not killed and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if killed:
        _reap_group(proc.pid)
    elif proc.returncode not in ok_codes:
        tail = (logs / f"{stage}.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise UserError(f"bench scale: stage {stage} ({' '.join(argv[1:])}) exited {proc.returncode} in {work}: "
                        + " | ".join(tail))
    peaks.setdefault(proc.pid, 0.0)
    phases = read_phases(phases_file)
    model = sum(v["seconds"] for k, v in phases.items() if k in MODEL_PHASES)
    plumbing = sum(v["seconds"] for k, v in phases.items() if k not in MODEL_PHASES)
    return Measured(stage, round(seconds, 2), round(max(peaks.values()), 1), round(max(tree_peak, peaks[proc.pid]), 1),
                    len(peaks), count_files(work) - files_before, round(plumbing, 2) if phases else None,
                    round(model, 2) if phases else None, phases, "killed (SIGKILL)" if killed else "")


def _memory_mb(pid: int) -> tuple[float | None, float | None]:
    """(current RSS, peak RSS) of a process in MiB from /proc/<pid>/status; (None, None) when gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values.get("VmRSS"), values.get("VmHWM")


def _reap_group(pgid: int, timeout: float = 10.0) -> None:
    """Wait until every process of a killed group is gone (SIGKILL reaches them all at once)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
        if not alive:
            return
        time.sleep(0.1)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def recorded_shards(store: Path) -> set[int]:
    """Shards with a completion record so far (``<store>/.fae/done/shard-NNNNN.json``)."""
    try:
        with os.scandir(store / ".fae" / "done") as it:
            return {int(e.name[6:-5]) for e in it if e.name.startswith("shard-") and e.name.endswith(".json")}
    except FileNotFoundError:
        return set()


def write_json(path: Path, payload) -> None:
    from fae_pipe.artifacts import atomic_write_json

    atomic_write_json(path, payload, indent=1)


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
