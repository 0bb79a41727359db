"""``fae-pipe bench prepare``: does a captioned ``prepare`` hold up at web scale, and which manifest format?

A synthetic manifest of ``--rows`` rows (two COCO-length captions each) pointing at
``--images`` real tiny PNGs, written as JSONL, CSV and Parquet. Each format is indexed in
its own fresh process (so peak RSS is that format's alone), the way ``prepare`` does it
(``fae_pipe.data.captions``) with ``data.check=stat``, and timed per part:

* parse: the manifest into columns (``read_manifest``);
* check (stat): one ``stat`` per row;
* split + fingerprint: the hash-ranked split, the column take, the fingerprint;
* write: the binary index (``write_index``).

Then the image check that ``data.check=header`` adds (open, verify, JPEG tail) is timed
on the first ``--check-rows`` rows and projected to all rows: at tens of millions of
images it, not the index, is the cost of prepare. Peak RSS is the child's high-water
mark; "after imports" is its baseline before the manifest is touched.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMATS = ("jsonl", "csv", "parquet")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
THINGS = ("dog", "bicycle", "kitchen table", "street sign", "sailing boat", "pizza", "laptop")


def _captions(i: int) -> tuple[str, str]:
    c, t = COLOURS[i % len(COLOURS)], THINGS[i % len(THINGS)]
    return (f"a {c} {t} photographed from the left side, picture number {i}",
            f"photo {i}: there is a {t} next to something {c} in the scene")


def write_images(root: Path, n: int) -> list[str]:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"images/{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name, compress_level=1)
        names.append(name)
    return names


def write_manifests(root: Path, rows: int, images: list[str]) -> dict[str, Path]:
    """The same rows in every format (Parquet only when pyarrow is installed)."""
    out = {"jsonl": root / "manifest.jsonl", "csv": root / "manifest.csv"}
    block = 100_000
    with open(out["jsonl"], "w", encoding="utf-8") as j, open(out["csv"], "w", encoding="utf-8", newline="") as c:
        import csv

        w = csv.writer(c)
        w.writerow(["path", "captions", "width"])
        for lo in range(0, rows, block):
            rng = range(lo, min(rows, lo + block))
            j.write("".join(json.dumps({"path": images[i % len(images)], "captions": _captions(i), "width": 16}) + "\n"
                            for i in rng))
            w.writerows([images[i % len(images)], json.dumps(_captions(i)), 16] for i in rng)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return out
    schema = pa.schema([("path", pa.string()), ("captions", pa.list_(pa.string())), ("width", pa.int32())])
    with pq.ParquetWriter(root / "manifest.parquet", schema) as writer:
        for lo in range(0, rows, block):
            rng = range(lo, min(rows, lo + block))
            writer.write_table(pa.table({"path": [images[i % len(images)] for i in rng],
                                         "captions": [list(_captions(i)) for i in rng],
                                         "width": [16] * len(rng)}, schema=schema))
    out["parquet"] = root / "manifest.parquet"
    return out


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which keeps the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(manifest: str, out_dir: str, fraction: str, seed: str, workers: str) -> None:
    """One format, in this fresh process: print one JSON line of timings and memory."""
    from fae_pipe.data.captions import index_pairs, read_manifest
    from fae_pipe.data.index import write_index
    from fae_pipe.phases import ENV, read_phases

    base = _rss_mb()
    phases = Path(out_dir) / f"{Path(manifest).suffix[1:]}.phases.jsonl"
    os.environ[ENV] = str(phases)
    t0 = time.perf_counter()
    pairs = read_manifest(manifest)
    t1 = time.perf_counter()
    index = index_pairs(pairs, float(fraction), int(seed), check="stat", workers=int(workers))
    t2 = time.perf_counter()
    path = write_index(index, Path(out_dir) / f"{Path(manifest).suffix[1:]}.npz")
    t3 = time.perf_counter()
    p = read_phases(phases)
    print(json.dumps({"rows": len(index), "parse": t1 - t0, "check": p["captions: check images"]["seconds"],
                      "build": p["captions: split + fingerprint"]["seconds"], "write": t3 - t2,
                      "index_total": (t1 - t0) + (t2 - t1) - p["captions: check images"]["seconds"] + (t3 - t2),
                      "total": t3 - t0, "rss_base": base, "rss_peak": _rss_mb(),
                      "index_mb": round(path.stat().st_size / 2**20, 1), "fingerprint": index.fingerprint}))


def header_check_rate(manifest: Path, rows: int, workers: int) -> float:
    """Rows/s of the header check over the first ``rows`` manifest rows (the image check prepare adds)."""
    from fae_pipe.data.captions import read_manifest, sources
    from fae_pipe.data.folder import _checked

    pairs = read_manifest(manifest)
    n = min(rows, len(pairs))
    t0 = time.perf_counter()
    reasons = [r for r, _ in _checked(sources(pairs, np.arange(n)), n, "header", workers, False)]
    assert not any(reasons), reasons[:3]
    return n / (time.perf_counter() - t0)


def run(cfg, rows: int = 1_000_000, images: int = 2000, check_rows: int = 100_000, workdir: str | None = None) -> dict:
    d = cfg.data
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        manifests = write_manifests(work, rows, write_images(work, images))
        print(f"bench prepare: {rows:,} rows x 2 captions over {images} PNGs written in "
              f"{time.perf_counter() - t0:.1f} s ({', '.join(f'{k} {p.stat().st_size / 2**20:.0f} MB' for k, p in manifests.items())})",
              file=sys.stderr, flush=True)
        results = {}
        for fmt in FORMATS:
            if fmt not in manifests:
                results[fmt] = None
                continue
            code = "import sys; from fae_pipe.stages.bench_prepare import child; child(*sys.argv[1:])"
            done = subprocess.run([sys.executable, "-c", code, str(manifests[fmt]), str(work), str(d.holdout_fraction),
                                   str(d.seed), str(d.decode_workers)], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"bench prepare ({fmt}) failed:\n{done.stderr[-3000:]}")
            results[fmt] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {fmt}: {results[fmt]['total']:.1f} s", file=sys.stderr, flush=True)
        prints = {r["fingerprint"] for r in results.values() if r}
        assert len(prints) == 1, "the formats gave different indexes"
        rate = header_check_rate(manifests["jsonl"], check_rows, d.decode_workers)
        _table(results, rows, rate, min(check_rows, rows), d.decode_workers)
        return {"rows": rows, "formats": results, "header_check_rows_per_s": rate}
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def _table(results: dict, rows: int, rate: float, check_rows: int, workers: int) -> None:
    cols = [("parse s", "parse"), ("split+fp s", "build"), ("write s", "write"), ("index s", "index_total"),
            ("stat check s", "check"), ("total s", "total"), ("peak RSS MB", "rss_peak"),
            ("after imports MB", "rss_base"), ("index MB", "index_mb")]
    print(f"bench prepare: {rows:,} manifest rows, data.check=stat, {workers} check threads "
          f"(index s = parse + split+fp + write)")
    print(f"{'':18}" + "".join(f"{f:>10}" for f in FORMATS))
    for label, key in cols:
        cells = [f"{results[f][key]:10.1f}" if results[f] else f"{'n/a':>10}" for f in FORMATS]
        print(f"{label:18}" + "".join(cells))
    if results.get("parquet") is None:
        print("parquet: n/a (pyarrow not installed: pip install fae-pipe[parquet])")
    print(f"header check (data.check=header): {rate:,.0f} rows/s over the first {check_rows:,} rows "
          f"-> ~{rows / rate:.0f} s for all {rows:,}")
