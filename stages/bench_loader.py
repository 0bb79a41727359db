"""``fae-pipe bench loader``: how fast the generator loaders serve random batches, against their limits.

Why: the generator loop must never wait for data. Three references run side by side
on the same store (the configured ``paths.latents``, with ``--features`` the
``paths.features`` store, or with ``--synthetic NxCxHxW`` a temporary store of random
samples in the schema's layout, e.g. the paper's 32x16x16 latents or, with
``--features``, 768x16x16 DINOv2-B tokens), batch size ``sit.train.batch_size``:

* the whole array in RAM as one NumPy array, random rows + random view picked by
  fancy indexing: the upper limit of any loader;
* the same array as a memory-mapped ``.npy`` (page cache warm);
* one ``.npy`` file per sample, the fast-DiT pattern (files just written, so the page
  cache is warm too: a favourable setting for that baseline).

The loader runs in both modes (store held in RAM; streaming shards through the
shuffle window) and as what a generator stage gets: ``LatentBatches`` (normalised
float32 torch tensors), or with ``--features`` ``FeatureBatches`` in both modes and
with REPA targets (the same store's tokens of each row's sample and view). Each
measurement covers at least one epoch and ``MIN_SAMPLES`` samples; the candidates are
measured in turn, ``REPEATS`` rounds, best of each (the machine is shared: taking
turns gives each the same chance of a quiet moment, so the ratios hold). Loader rates
are steady state: opening the store and the first batch (which reads the whole store
in RAM mode) are timed separately as "setup". Streaming keeps shard files
memory-mapped, so with a page-cache-warm store (as here) its steady state reads from
the page cache; a store larger than RAM is read from disk each epoch and is bounded
by the disk instead. Targets (issue 4): loader >= 0.5x the in-RAM array and >= 5x
per-sample files, in both modes. Results also go to ``<metrics>/bench_loader.json``
(``bench_loader_features.json`` with ``--features``).

``--object-store URL`` (issue 17) copies the benched store to a fresh prefix under URL
(``s3://bucket/prefix``, opened with ``storage.options``) and measures the same loader
from there in the same rounds: streaming (whole shard objects fetched ahead on
``shard_reader``'s thread pool while the current window is served) and in RAM (every
shard fetched once, GETs in flight); it prints samples/s from the bucket against the
local store (page-cache warm, memory-mapped) and removes the copy afterwards.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.location import StoreLocation, is_url
from fae_pipe.cache.shard_reader import ShardReader
from fae_pipe.cache.synthetic import write_random_feature_store, write_random_latent_store
from fae_pipe.data.features import FeatureBatches
from fae_pipe.data.latents import LatentBatches
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.training.logs import write_metrics

MIN_SAMPLES = 50_000
REPEATS = 5  # rounds; best of each candidate (the best run is the least disturbed one: shared machines)
MAX_FILES = 20_000  # per-sample files written for the fast-DiT baseline
MAX_FILE_BYTES = 2 << 30  # ... and at most this many bytes of them


def _random_batches(n: int, views: int, batch: int, seed: int, total: int):
    """(rows, views) of ``total // batch`` random batches, epoch-wise permutations like a real sampler."""
    rng = np.random.default_rng(seed)
    served, perm, pos = 0, rng.permutation(n), 0
    while served + batch <= total:
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos:pos + batch]
        pos += batch
        served += batch
        yield idx, rng.integers(0, views, size=batch)


def _array_runner(fn, n: int, views: int, batch: int, total: int):
    """One timed pass of ``fn(rows, views)`` over ``total`` samples -> samples/s."""
    def measure() -> float:
        start, served = time.perf_counter(), 0
        for idx, v in _random_batches(n, views, batch, 0, total):
            served += fn(idx, v).shape[0]
        return served / (time.perf_counter() - start)
    return measure


def _loader_runner(make, total: int):
    """(one timed steady-state pass -> samples/s, mode text); construction and the first batch are the setup."""
    start = time.perf_counter()
    loader = make()
    inner = getattr(loader, "loader", loader)
    if isinstance(loader, ShardedLoader):
        it = loader.batches_from(0)
    elif getattr(loader, "repa", None) is not None:
        it = loader.from_step_with_repa(0, torch.device("cpu"))
    else:
        it = loader.from_step(0, torch.device("cpu"))
    next(it)
    setup = time.perf_counter() - start
    steps = max(inner.steps_per_epoch, -(-total // inner.batch_size))

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * inner.batch_size / (time.perf_counter() - start)
    mode = "in RAM" if inner.in_ram else f"streaming, {inner.num_shards} shards"
    return measure, f"{mode}; setup {setup:.2f} s"


def _best(runners: dict, repeats: int) -> dict[str, float]:
    """Each runner once per round, ``repeats`` rounds; the best rate of each."""
    best = dict.fromkeys(runners, 0.0)
    for _ in range(repeats):
        for key, measure in runners.items():
            best[key] = max(best[key], measure())
    return best


def parse_synthetic(spec: str) -> tuple[int, int, int, int]:
    """``"NxCxHxW"`` -> (N, C, H, W); anything else is a one-line UserError."""
    parts = spec.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--synthetic {spec!r} is invalid: expected NxCxHxW with positive integers, e.g. 16384x32x16x16")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def run(cfg, synthetic: str | None = None, features: bool = False, min_samples: int = MIN_SAMPLES,
        repeats: int = REPEATS, object_store: str | None = None) -> dict:
    """Measure, print, write the metrics JSON; smaller ``min_samples``/``repeats`` give a quick run."""
    if object_store is not None and not is_url(object_store):
        raise UserError(f"--object-store {object_store!r} is invalid: expected a URL prefix such as "
                        "s3://bucket/prefix (opened with storage.options)")
    if synthetic is None:
        return _run(cfg, Path(cfg.paths.features if features else cfg.paths.latents), features, min_samples, repeats,
                    object_store)
    n, c, h, w = parse_synthetic(synthetic)
    with tempfile.TemporaryDirectory(prefix="bench-loader-store-") as tmp:
        x = cfg.extract  # encode keeps the feature store's shard layout
        if features:
            path = write_random_feature_store(Path(tmp) / "features.zarr", (n, 2, h * w, c), (h, w),
                                              x.shard_samples, x.chunk_samples)
        else:
            path = write_random_latent_store(Path(tmp) / "latents.zarr", (n, 2, c, h, w), x.shard_samples,
                                             x.chunk_samples)
        return _run(cfg, path, features, min_samples, repeats, object_store)


def _copy_to(path: Path, prefix: str) -> str:
    """Upload the store at ``path`` to a fresh ``prefix/bench-<uuid>/<name>``; returns its URL."""
    import uuid

    url = f"{prefix.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}/{path.name}"
    loc = StoreLocation(url)
    start = time.perf_counter()
    loc.fs.put(str(path), loc.path(), recursive=True)
    print(f"bench loader: copied the store to {url} in {time.perf_counter() - start:.1f} s", flush=True)
    return url


def _gets_runner(url: str, name: str, total: int):
    """Samples/s of fetching whole shard objects with the readers' thread pool and nothing else: the rate
    this server and network allow, which a streaming loader can at best reach."""
    from fae_pipe.cache.shard_reader import PREFETCH_THREADS

    group = schema.open_group(url)
    reader = ShardReader(group[name])
    shards = schema.store_num_shards(group)
    rounds = max(1, -(-total // reader.num_samples))

    def measure() -> float:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()
        with ThreadPoolExecutor(PREFETCH_THREADS) as pool:
            sizes = list(pool.map(lambda s: len(reader.fetch_object(s)), [s for _ in range(rounds) for s in range(shards)]))
        assert all(sizes)
        return rounds * reader.num_samples / (time.perf_counter() - start)
    return measure


def _candidates(path: Path, features: bool, batch: int, s) -> dict:
    """The loaders measured, by metrics key: (label, builder)."""
    name = schema.FEATURES if features else schema.LATENTS
    out = {f"loader_{mode}": ("ShardedLoader", lambda b=budget: ShardedLoader(
        path, [name], batch, s.seed, memory_budget_bytes=b, shuffle_buffer=s.shuffle_buffer, random_view=True))
        for mode, budget in (("in_ram", 1 << 62), ("streaming", 0))}
    if not features:
        out["latent_batches_torch"] = ("LatentBatches (normalised torch)", lambda: LatentBatches(
            path, batch, s.seed, memory_budget_bytes=int(s.memory_budget_gb * (1 << 30)),
            shuffle_buffer=s.shuffle_buffer))
        return out
    for mode, budget in (("in_ram", 1 << 62), ("streaming", 0)):
        out[f"feature_batches_{mode}"] = ("FeatureBatches (normalised torch)", lambda b=budget: FeatureBatches(
            path, batch, s.seed, memory_budget_bytes=b, shuffle_buffer=s.shuffle_buffer))
    out["feature_batches_repa"] = ("FeatureBatches + REPA targets", lambda: FeatureBatches(
        path, batch, s.seed, memory_budget_bytes=0, shuffle_buffer=s.shuffle_buffer, repa_features=path))
    return out


def _run(cfg, path: Path, features: bool, min_samples: int, repeats: int, object_store: str | None = None) -> dict:
    s = cfg.sit.train
    group = schema.open_group(path)
    if features:
        FeatureBatches(path, 1, s.seed)  # refuses a store that training would refuse
    else:
        LatentBatches(path, 1, s.seed)
    arr = group[schema.FEATURES if features else schema.LATENTS]
    n, views = int(arr.shape[0]), int(arr.shape[1])
    batch = min(s.batch_size, n)
    total = max(n, min_samples)
    print(f"bench loader: {path}: {n} samples x {views} views x {tuple(arr.shape[2:])} {arr.dtype} "
          f"({arr.nbytes / 2**20:.1f} MiB), batch {batch}, >= {total} samples per measurement", flush=True)
    labels = {"numpy_in_ram": "in-RAM NumPy array (the limit)", "numpy_memmap": "memory-mapped .npy",
              "npy_per_sample": "one .npy per sample (fast-DiT)"}
    modes: dict[str, str] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-loader-")))
        data = np.asarray(arr[:])
        np.save(tmp / "all.npy", data)
        mm = np.load(tmp / "all.npy", mmap_mode="r")
        m = max(1, min(n, MAX_FILES, MAX_FILE_BYTES // max(1, data[0].nbytes)))
        for i in range(m):
            np.save(tmp / f"{i}.npy", data[i])
        files = [str(tmp / f"{i}.npy") for i in range(m)]
        per_file = lambda idx, v: np.stack([np.load(files[i])[j] for i, j in zip(idx, v)])  # noqa: E731
        runners = {"numpy_in_ram": _array_runner(lambda i, v: data[i, v], n, views, batch, total),
                   "numpy_memmap": _array_runner(lambda i, v: mm[i, v], n, views, batch, total),
                   "npy_per_sample": _array_runner(per_file, m, views, min(batch, m), min(total, 4 * m))}
        for key, (label, make) in _candidates(path, features, batch, s).items():
            runners[key], modes[key] = _loader_runner(make, total)
            labels[key] = label
        remote = _copy_to(path, object_store) if object_store else None
        if remote is not None:
            stack.callback(lambda: StoreLocation(remote).fs.rm(StoreLocation(remote).path(), recursive=True))
            name = schema.FEATURES if features else schema.LATENTS
            for mode, budget in (("in_ram", 1 << 62), ("streaming", 0)):
                key = f"object_store_{mode}"
                runners[key], modes[key] = _loader_runner(lambda b=budget: ShardedLoader(
                    remote, [name], batch, s.seed, memory_budget_bytes=b, shuffle_buffer=s.shuffle_buffer,
                    random_view=True), total)
                labels[key] = "ShardedLoader from the object store"
            runners["object_store_gets"] = _gets_runner(remote, name, total)
            labels["object_store_gets"] = "whole-shard GETs, all threads (the bucket's limit)"
        results = _best(runners, repeats)

    limit, files_rate = results["numpy_in_ram"], results["npy_per_sample"]
    for key, rate in results.items():
        mode = f" [{modes[key]}]" if key in modes else ""
        ratio = f"  {rate / limit:5.2f}x in-RAM, {rate / files_rate:6.1f}x per-sample files" if key in modes else ""
        print(f"  {labels[key] + mode:<52} {rate:>12,.0f} samples/s{ratio}", flush=True)
    configured = "loader_in_ram" if arr.nbytes <= s.memory_budget_gb * (1 << 30) else "loader_streaming"
    verdicts = {}
    for key in ("loader_in_ram", "loader_streaming"):
        vs_ram, vs_files = results[key] / limit, results[key] / files_rate
        verdicts[key] = vs_ram >= 0.5 and vs_files >= 5
        tag = "configured mode" if key == configured else "other mode"
        print(f"bench loader: {modes[key].split(';')[0]} ({tag}): {vs_ram:.2f}x the in-RAM array (target >= 0.5x), "
              f"{vs_files:.1f}x per-sample files (target >= 5x): {'met' if verdicts[key] else 'NOT met'}", flush=True)
    summary = {"samples_per_s": {k: round(v, 1) for k, v in results.items()}, "batch": batch, "num_samples": n,
               "configured_mode": configured, "targets_met": verdicts}
    if object_store:
        summary["object_store_vs_local"] = {}
        for mode in ("in_ram", "streaming"):
            ratio = results[f"object_store_{mode}"] / results[f"loader_{mode}"]
            summary["object_store_vs_local"][mode] = round(ratio, 3)
            print(f"bench loader: object store, {mode.replace('_', ' ')}: {results[f'object_store_{mode}']:,.0f} vs "
                  f"{results[f'loader_{mode}']:,.0f} samples/s from local disk = {ratio:.2f}x "
                  f"({modes[f'object_store_{mode}'].split('; ')[1]} vs {modes[f'loader_{mode}'].split('; ')[1]})",
                  flush=True)
        gets = results["object_store_gets"]
        summary["object_store_streaming_vs_gets"] = round(results["object_store_streaming"] / gets, 3)
        print(f"bench loader: object store, streaming: {results['object_store_streaming'] / gets:.2f}x the bare "
              f"whole-shard GETs ({gets:,.0f} samples/s: the server's and network's limit)", flush=True)
    name = "bench_loader_features.json" if features else "bench_loader.json"
    write_metrics(Path(cfg.paths.metrics) / name, summary)
    return summary
