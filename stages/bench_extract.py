"""``fae-pipe bench extract``: is the extract path limited by the encoder, and what does it buy?

Three measurements side by side in one process, same images, same encoder, same precision:

(a) bare encoder forward over preprocessed inputs already in memory (the ceiling);
(b) the full ``extract`` path into a temporary store: decode, preprocess, encode, write
    float16 shards and completion records (model build not timed);
(c) a naive reference extractor: one image per forward, no prefetching, one float32
    ``.npy`` file per image.

Targets on the demo config: b/a >= 0.90 (decoding hides behind the forward) and
b/c >= 3. Throughput counts images; each image is encoded in all its views.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fae_pipe.cache.shards import set_torch_threads
from fae_pipe.config import Config

MAX_IMAGES = 512


def _bare_forward(enc, inputs: list, batch_size: int) -> float:
    """Images/s of ``enc.encode`` over in-memory inputs, batched like extract (one warm-up batch)."""
    import torch

    with torch.inference_mode():
        enc.encode(torch.cat(inputs[:batch_size]))
        t0 = time.perf_counter()
        for b in range(0, len(inputs), batch_size):
            enc.encode(torch.cat(inputs[b:b + batch_size]))
        return len(inputs) / (time.perf_counter() - t0)


def _naive(enc, index, n: int, cfg: Config, out_dir: Path) -> float:
    """Images/s of a per-image loop writing one float32 .npy per image."""
    import torch

    from fae_pipe.data.transforms import ImageDecodeError, load_pixels

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            try:
                pixels = load_pixels(index.abspath(i), cfg.data.image_size, cfg.data.views)
            except ImageDecodeError:
                continue
            patch, _ = enc.encode(enc.preprocess(pixels))
            np.save(out_dir / f"{i:07d}.npy", patch.numpy().astype(np.float32))
    return n / (time.perf_counter() - t0)


def run(cfg: Config) -> None:
    from fae_pipe.data.index import read_index
    from fae_pipe.data.transforms import ImageDecodeError, load_pixels
    from fae_pipe.encoders.registry import encoder_spec
    from fae_pipe.stages.extract import extract_features
    from fae_pipe.tasks.features import build_encoder_from

    index = read_index(cfg.paths.index)
    n = min(MAX_IMAGES, len(index))
    threads = set_torch_threads(cfg.extract.threads, cfg.extract.workers)
    enc = build_encoder_from(encoder_spec(cfg.image_encoder))
    views = len(cfg.data.views)
    print(f"bench extract: first {n} of {len(index)} index images (capped at {MAX_IMAGES}), {cfg.image_encoder.name} "
          f"{cfg.image_encoder.precision} at {cfg.image_encoder.input_size} px on {enc.device}, {views} view(s) per image, "
          f"batch {cfg.image_encoder.batch_size} images, {threads} torch thread(s), "
          f"{cfg.data.decode_workers} decode thread(s)", flush=True)
    inputs = []
    for i in range(n):
        try:
            inputs.append(enc.preprocess(load_pixels(index.abspath(i), cfg.data.image_size, cfg.data.views)))
        except ImageDecodeError:
            continue
    bare = _bare_forward(enc, inputs, cfg.image_encoder.batch_size)
    scratch = Path(tempfile.mkdtemp(prefix="fae-bench-extract-"))
    try:
        naive = _naive(enc, index, n, cfg, scratch / "naive")
        result = extract_features(cfg, str(scratch / "features.zarr"), limit=n)
        full = result.images_per_s
        bare = max(bare, _bare_forward(enc, inputs, cfg.image_encoder.batch_size))  # ceiling: best of two runs
        store_mib = result.stored_bytes() / 2**20
        npy_mib = sum(p.stat().st_size for p in (scratch / "naive").glob("*.npy")) / 2**20
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [("(a) bare encoder forward, inputs in memory", bare, ""),
            ("(b) full extract path -> zarr float16 shards", full, f"{store_mib:.1f} MiB"),
            ("(c) naive: batch 1, no prefetch, fp32 .npy per image", naive, f"{npy_mib:.1f} MiB")]
    for name, value, size in rows:
        print(f"  {name:<56} {value:9.1f} images/s  {size}")
    ba, bc = full / bare, full / naive
    print(f"  b/a = {ba:.2f} (target >= 0.90: {'met' if ba >= 0.90 else 'NOT met'})   "
          f"b/c = {bc:.1f} (target >= 3: {'met' if bc >= 3 else 'NOT met'})")
    if enc.random_weights:
        print("  (random encoder weights: throughput is the same as with real weights)", file=sys.stderr)
