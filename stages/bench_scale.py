"""``fae-pipe bench scale``: an ImageNet-sized rehearsal of the plumbing, models made tiny.

What breaks first at ImageNet scale is not the model but the bookkeeping around it: the
index every process parses, the scan of 1.28M files, ~1,252 dask tasks and completion
records, ``verify`` and a no-op ``dvc repro`` over thousands of shard files, a loader
shuffling 1.28M samples. This bench runs all of it for real, at the real counts, on a
generated ImageNet-shaped folder (1,000 classes x 1,281 tiny PNGs at 1.28M samples; 1,000
images per class below 1M) with a one-block random DINOv2-S at 28 px (2x2 tokens), the
tiny FAE and the tiny SiT, so the counts are real and the compute is not.

Per size, in a work directory: write the folder; ``prepare``; ``extract`` at the real
shard layout (one dask task per 1,024-sample shard, 2 workers) SIGKILLed with its dask
workers once half the shards have records, then resumed; ``verify``; ``train-fae``;
``encode``; ``verify`` of the latents; ``train-sit`` streaming from the shards;
``dvc commit`` and a no-op ``dvc repro`` of the rehearsal project's dvc.yaml. Each stage
is the real CLI in its own process group (``bench_scale_steps``): wall time, peak RSS,
files written, time outside the model (``fae_pipe.phases``). Then the invariants, which
fail the bench when broken: every sample id exactly once in both stores, labels equal
to the index, and the shards the kill interrupted bit-identical to a fresh uninterrupted
re-run of them (their records and files deleted, ``extract`` run again in-process).

Results of every size accumulate in ``--results`` (JSON), so the 1.28M run can run on
its own (in the background) and the table still shows all sizes with the growth factor
per 10x samples: ``(t_big / t_small) ** (1 / log10(n_big / n_small))``; 10 is linear.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from fae_pipe.errors import UserError
from fae_pipe.stages import bench_scale_steps as steps

DEFAULT_SIZES = "10000"
FAE_STEPS = 20
SIT_STEPS = 200
RECHECK_SHARDS = 4  # interrupted shards re-made fresh and compared byte for byte


def rehearse(samples: int, work: Path, fae_steps: int = FAE_STEPS, sit_steps: int = SIT_STEPS,
             workers: int = 2, on_stage=None) -> dict:
    """One rehearsal size in ``work`` (created; reused when it holds this size's folder).

    ``on_stage(partial)`` is called after every stage with the result so far (``"partial": True``),
    so a long size that is stopped still leaves the stages it finished.
    """
    classes, per_class = steps.layout(samples)
    n = classes * per_class
    work.mkdir(parents=True, exist_ok=True)
    config = steps.rehearsal_config(n, fae_steps, sit_steps, workers)
    (work / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shards = steps.num_shards(n)
    rows: list[steps.Measured] = []
    head = {"samples": n, "classes": classes, "per_class": per_class, "shards": shards, "dask_workers": workers}

    def say(m: steps.Measured) -> None:
        print(f"[{n}] {m.stage}: {m.seconds:.1f} s, peak RSS {m.peak_rss_mb} MB, {m.files} files {m.note}",
              file=sys.stderr, flush=True)
        if on_stage is not None:
            on_stage({**head, "stages": [r.to_dict() for r in rows], "partial": True})

    t0 = time.perf_counter()
    files = steps.write_folder(work / "data" / "train", classes, per_class)
    rows.append(steps.Measured("generate folder", round(time.perf_counter() - t0, 2), files=files,
                               note=f"{classes} classes x {per_class} PNGs"))
    say(rows[-1])

    def stage(name, *argv, **kw):
        rows.append(steps.run_measured(name, steps.fae_pipe_argv(*argv), work, **kw))
        say(rows[-1])
        return rows[-1]

    stage("prepare", "prepare")
    features = work / "cache" / "features.zarr"
    half = max(1, shards // 2)
    stage("extract (killed)", "extract", kill_when=lambda: len(steps.recorded_shards(features)) >= half)
    recorded = steps.recorded_shards(features)
    missing = sorted(set(range(shards)) - recorded)
    stage("extract (resume)", "extract")
    stage("verify features", "verify", "cache/features.zarr")
    stage("train-fae", "train-fae")
    stage("encode", "encode")
    stage("verify latents", "verify", "cache/latents.zarr")
    stage("train-sit", "train-sit")
    dvc = str(Path(sys.executable).with_name("dvc"))
    steps.run_measured("dvc init", [dvc, "init", "--no-scm", "-q", "-f"], work)
    (work / "dvc.yaml").write_text(yaml.safe_dump(steps.dvc_yaml(), sort_keys=False))
    rows.append(steps.run_measured("dvc commit", [dvc, "commit", "-f", "-q"], work))
    say(rows[-1])
    rows.append(steps.run_measured("dvc repro (no-op)", [dvc, "repro"], work))
    say(rows[-1])

    t0 = time.perf_counter()
    checks = check_invariants(work, n, missing[:RECHECK_SHARDS], rows)
    checks["killed_with_records"] = len(recorded)
    checks["seconds"] = round(time.perf_counter() - t0, 2)
    return {**head, "disk_mb": round(steps.tree_bytes(work) / 2**20, 1), "stages": [r.to_dict() for r in rows], "checks": checks,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def check_invariants(work: Path, n: int, recheck: list[int], rows: list) -> dict:
    """The rehearsal's own invariants; a broken one raises ``UserError`` naming it."""
    from fae_pipe.cache import schema
    from fae_pipe.data.index import read_index

    index = read_index(work / "cache" / "index.npz")
    if len(index) != n:
        raise UserError(f"bench scale: the index holds {len(index)} samples, the folder {n}")
    for name in ("features.zarr", "latents.zarr"):
        group = schema.open_group(work / "cache" / name, "r")
        ids, labels = group[schema.SAMPLE_IDS][:], group[schema.LABELS][:]
        if not np.array_equal(np.sort(ids), np.arange(n)) or len(ids) != n:
            raise UserError(f"bench scale: {name} does not hold every sample id exactly once")
        if not np.array_equal(labels, index.labels[ids]):
            raise UserError(f"bench scale: {name} labels differ from the index at "
                            f"{int(np.count_nonzero(labels != index.labels[ids]))} samples")
        if not bool(group[schema.VALID][:].all()):
            raise UserError(f"bench scale: {name} has invalid rows (every generated image decodes)")
    identical = recheck_interrupted(work, recheck, rows)
    repro_log = (work / "logs" / "dvc repro (no-op).log").read_text(errors="replace")
    if "Running stage" in repro_log:
        raise UserError(f"bench scale: the no-op `dvc repro` re-ran a stage (see {work}/logs)")
    return {"ids_once": True, "labels_match_index": True, "resume_bit_identical_shards": identical,
            "dvc_repro_noop": True}


def recheck_interrupted(work: Path, shard_ids: list[int], rows: list) -> list[int]:
    """Delete these shards' records and files, re-make them uninterrupted, compare bytes."""
    from fae_pipe.cache import schema
    from fae_pipe.cache.bookkeeping import record_path

    store = work / "cache" / "features.zarr"
    group = schema.open_group(store, "r")
    names = schema.sample_array_names(group)
    before = {}
    for i in shard_ids:
        for name in names:
            f = schema.shard_file(store, group, name, i)
            before[(name, i)] = f.read_bytes()
            f.unlink()
        record_path(store, i).unlink()
    rows.append(steps.run_measured("extract (re-check)", steps.fae_pipe_argv("extract", "--set", "extract.workers=0"),
                                   work))
    for (name, i), data in before.items():
        if schema.shard_file(store, group, name, i).read_bytes() != data:
            raise UserError(f"bench scale: shard {i} of {name} after kill + resume differs from an uninterrupted "
                            f"re-run of it")
    return shard_ids


def growth(a: float | None, b: float | None, na: int, nb: int) -> str:
    """Growth factor per 10x samples between two sizes (10 = linear); '-' when undefined."""
    if a is None or b is None or a <= 0 or b <= 0 or nb <= na:
        return "-"
    return f"x{(b / a) ** (1 / math.log10(nb / na)):.1f}"


def table(results: dict) -> str:
    """One markdown table: per stage and size wall s / peak RSS MB / files / plumbing s, growth per 10x."""
    sizes = sorted(results.values(), key=lambda r: r["samples"])
    stages = []
    for r in sizes:
        stages += [s["stage"] for s in r["stages"] if s["stage"] not in stages]
    head = ["stage"] + [f"{r['samples']:,}{' (unfinished)' if r.get('partial') else ''}: wall s / RSS MB / files / "
                        "outside-model s" for r in sizes]
    head += [f"growth/10x {a['samples']:,}->{b['samples']:,} (wall, RSS)" for a, b in zip(sizes, sizes[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in stages:
        cells, got = [name], []
        for r in sizes:
            m = next((s for s in r["stages"] if s["stage"] == name), None)
            got.append(m)
            cells.append("-" if m is None else " / ".join(
                "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:g}"
                for v in (m["seconds"], m["peak_rss_mb"], m["files"], m["plumbing_s"])))
        for (a, ra), (b, rb) in zip(zip(got, sizes), zip(got[1:], sizes[1:])):
            if a is None or b is None:
                cells.append("-")
                continue
            cells.append(f"{growth(a['seconds'], b['seconds'], ra['samples'], rb['samples'])}, "
                         f"{growth(a['peak_rss_mb'], b['peak_rss_mb'], ra['samples'], rb['samples'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bench scale: --samples {text!r} is invalid: expected sample counts like 10000,100000") from None
    if not sizes:
        raise UserError("bench scale: --samples is empty: expected sample counts like 10000,100000")
    for s in sizes:
        steps.layout(s)
    return sizes


def run(cfg, samples: str = DEFAULT_SIZES, workdir: str = "bench-scale", results: str | None = None,
        keep: bool = False, sit_steps: int = SIT_STEPS, fae_steps: int = FAE_STEPS, workers: int = 2) -> dict:
    """Rehearse each size in ``workdir/<n>`` (removed afterwards unless ``keep``); print the table."""
    root = Path(workdir)
    out = Path(results) if results else root / "results.json"
    collected = steps.read_json(out, {})
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        collected[str(result["samples"])] = result
        steps.write_json(out, collected)

    for n in parse_sizes(samples):
        work = root / str(n)
        result = rehearse(n, work, fae_steps=fae_steps, sit_steps=sit_steps, workers=workers, on_stage=save)
        result["disk_free_gb"] = round(shutil.disk_usage(root).free / 2**30, 1)
        save(result)
        if not keep:
            shutil.rmtree(work)
    text = table(collected)
    print(text)
    print(f"results: {out}")
    return collected
