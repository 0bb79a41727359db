"""``fae-pipe bench stages``: every stage's step against this machine's own matmul peak (issue 16's roofline).

Why: "not wasteful" needs a ceiling to be judged against: the best rate of large square
matmuls, fp32 and bf16, on this process's threads (``matmul_rates``). The machine's peak is
measured first; then a short probe of the stage's precision (and of fp32 for a mixed stage: the
faster of the two is its ceiling) runs before each timed step and after the last, so a stage
and its ceiling see the same load on a shared machine. Each stage's step is built as the
stage builds it: registry models from the config, its autocast precision
(``<section>.train.precision``, ``image_encoder.precision``; encode and sample run fp32 like
the stages), its losses, clipping, fused AdamW and EMA; random weights and inputs
of the stage's shapes (speed does not depend on values; no network). Per stage: FLOPs of one
step (FlopCounterMode: matmuls, convolutions, attention, forward and backward) over the time
of the fastest timed step (the least disturbed), as a fraction of the fastest probe beside
it; samples/s; that step split into forward, backward, optimizer, sync (the stage's
on-device log sums, one host read per ``log_every``; ``item_ms``: what a per-step ``.item()``
would add) and other. data: per-batch time of the stage's real loader over the configured
store (it runs in the training thread, so it adds to a real step), n/a without one.
train-decoder is timed after ``gan_start`` (generator with adaptive weight, then the
discriminator); sample is one batch of ``sample.steps`` sampler steps with CFG, then the
feature and pixel decoders.

``--synthetic``: the paper's defaults with ``SYNTHETIC`` (DINOv2-B at 224 px = 16x16 tokens x
768, fae_dinov2_b to 32-channel latents, sit_b, small batches). ``--competitor``: training
stages idle vs beside one busy process, alternating windows, under this process's wait policy
and under ``ACTIVE`` (a child process: the policy is read once, at torch import).
``--compile``: training stages eager vs ``compile_in_place``. Not a DVC stage; it writes
``<paths.metrics>/bench_stages[_synthetic].{json,csv}``. docs/performance.md has the numbers.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fae_pipe import config as C
from fae_pipe.artifacts import atomic_write_json, atomic_write_text
from fae_pipe.device import compile_in_place, compile_unavailable
from fae_pipe.errors import UserError
from fae_pipe.stages.bench_steps import BUILDERS, Ctx, Work, seconds_per_batch, timed_step
from fae_pipe.threads import configure_threads, usable_cores
from fae_pipe.training.flops import count_flops, matmul_rates

PEAK_SIZES, PEAK_SECONDS, PROBE_SECONDS = (2048, 4096), 3.0, 0.3  # matmul sides; seconds of calls each
MIN_STEPS, MIN_SECONDS, MAX_STEPS, MAX_SECONDS = 3, 3.0, 50, 20.0  # timed steps per stage (>= 1)
ROUNDS, WINDOW_SECONDS = 3, 1.0  # competitor and compile: rounds of alternating windows this long
TRAINING, PARTS = ("train-fae", "train-decoder", "train-sit"), ("forward", "backward", "optimizer", "sync")
COLUMNS = [("stage", "stage", "<13"), ("prec", "precision", "<4"), ("GFLOP/step", "gflop_per_step", ">10.2f"),
           ("GFLOP/s", "gflop_per_s", ">8.1f"), ("of peak", "fraction_of_peak", ">7.2f"),
           ("peak", "peak_gflop_per_s", ">5.0f"), ("samples/s", "samples_per_s", ">9.1f"), ("step", "step_ms", ">8.1f"),
           *((head, f"{part}_ms", ">7.1f") for head, part in zip(("fwd", "bwd", "opt", "sync", "other", "data"),
                                                                  (*PARTS, "other", "data")))]
SYNTHETIC = {"image_encoder.name": "vit_base_patch14_dinov2", "image_encoder.input_size": 224,
             "image_encoder.batch_size": 4, "data.image_size": 256, "fae.model": "fae_dinov2_b",
             "fae.train.batch_size": 8, "decoder.train.batch_size": 2, "encode.batch_size": 32, "sit.model": "sit_b",
             "sit.train.batch_size": 4, "sample.steps": 2, "sample.batch_size": 2, "evaluate.batch_size": 4}


def measure(work: Work, probe: Callable[[], float]) -> dict:
    """Count one step's FLOPs (also the warm-up), then timed steps with a peak ``probe`` before each and
    after the last: the row of the fastest step, its fraction of the fastest probe."""
    flops, runs, peaks, start = count_flops(work.step), [], [], time.perf_counter()
    while not runs or (len(runs) < MAX_STEPS and time.perf_counter() - start < MAX_SECONDS
                       and (len(runs) < MIN_STEPS or time.perf_counter() - start < MIN_SECONDS)):
        peaks.append(probe())
        runs.append(timed_step(work))
    peaks.append(probe())
    total, parts, _ = min(runs, key=lambda r: r[0])
    data = None if work.data is None else seconds_per_batch(work.data(), len(runs))
    return {"stage": work.name, "shapes": work.shapes, "precision": work.precision, "batch": work.batch,
            "steps_timed": len(runs), "gflop_per_step": flops / 1e9, "gflop_per_s": flops / total / 1e9,
            "fraction_of_peak": flops / total / max(peaks), "peak_gflop_per_s": max(peaks) / 1e9,
            "samples_per_s": work.batch / total,
            "step_ms": total * 1e3, **{f"{p}_ms": parts.get(p, 0.0) * 1e3 for p in PARTS},
            "other_ms": (total - sum(parts.values())) * 1e3, "data_ms": None if data is None else data * 1e3,
            "item_ms": statistics.median(r[2] for r in runs) * 1e3 if work.window is not None else None}


def alternate(conditions, step_s: float) -> list[float]:
    """Median step seconds of each ``(work, prepare)``, in ROUNDS rounds of alternating windows."""
    k, times = max(1, round(WINDOW_SECONDS / max(step_s, 1e-6))), [[] for _ in conditions]
    for _ in range(ROUNDS):
        for (work, prepare), ts in zip(conditions, times):
            prepare()
            ts.extend(timed_step(work)[0] for _ in range(k))
    return [statistics.median(ts) for ts in times]


@contextmanager
def competitor():
    """One CPU-bound process, yielding ``load(on)``: stopped (SIGSTOP) for idle windows, running for loaded
    ones, so both rates alternate in one run and otherwise see the same machine."""
    if not hasattr(signal, "SIGSTOP"):
        raise UserError("--competitor needs POSIX job-control signals (Linux or macOS)")
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield lambda on: os.kill(proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
    finally:
        proc.kill()
        proc.wait()


def compete(work: Work) -> dict:
    """Samples/s of a warmed-up ``work`` idle and beside one busy process, and the slowdown."""
    with competitor() as load:
        load(False)
        idle, busy = alternate([(work, lambda: load(False)), (work, lambda: load(True))], timed_step(work)[0])
    return {"idle_samples_per_s": work.batch / idle, "loaded_samples_per_s": work.batch / busy, "slowdown": busy / idle}


def compete_in_child(cfg, names: list[str], policy: str = "ACTIVE") -> dict:
    """``compete`` for ``names`` in a child process under ``OMP_WAIT_POLICY=policy``, same thread count."""
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        cfg_file, out = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        cfg_file.write_text(C.dump_config(cfg))
        env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(torch.get_num_threads()))
        done = subprocess.run([sys.executable, "-m", __spec__.name, str(cfg_file), str(out), *names], env=env)
        if done.returncode != 0:
            print(f"bench stages: the {policy} competitor run failed (exit {done.returncode})", file=sys.stderr)
            return {}
        return json.loads(out.read_text())


def compare_compile(ctx: Ctx, name: str) -> dict:
    """Steady-state samples/s eager and with ``compile_in_place``, alternating, and the cold compile time."""
    reason = compile_unavailable(ctx.device)
    if reason is not None:
        return {"status": reason}
    eager, compiled = BUILDERS[name](ctx), BUILDERS[name](ctx)
    eager.step()
    step_s = timed_step(eager)[0]
    from torch._inductor.utils import fresh_cache

    compile_in_place(compiled.modules, ctx.device, "bench stages", announce=False)
    start = time.perf_counter()
    with fresh_cache():  # an empty inductor cache: a first run's compile time (a warm cache makes it seconds)
        compiled.step(), compiled.step()  # the first calls compile forward and backward
    seconds = time.perf_counter() - start - 2 * step_s
    e, c = alternate([(eager, lambda: None), (compiled, lambda: None)], step_s)
    return {"status": "ok", "eager_samples_per_s": eager.batch / e, "compiled_samples_per_s": compiled.batch / c,
            "speedup": e / c, "compile_seconds": seconds}


def synthetic_config(cfg) -> C.Config:
    """The paper's defaults with ``SYNTHETIC`` applied; paths and runtime from ``cfg``."""
    syn = C.Config(paths=cfg.paths, runtime=cfg.runtime)
    for key, value in SYNTHETIC.items():
        C.set_key(syn, key, value, "--synthetic")
    return syn


def selected(only: str | None) -> list[str]:
    names = [n.strip() for n in (only or ",".join(BUILDERS)).split(",") if n.strip()]
    if not names or any(n not in BUILDERS for n in names):
        raise UserError(f"--only {only!r} is invalid: expected a comma-separated list of {', '.join(BUILDERS)}")
    return [n for n in BUILDERS if n in names]


def machine() -> dict:
    cpu, info = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.open() if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": usable_cores(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}  # others' processes


def run(cfg, synthetic: bool = False, competitor: bool = False, compile_: bool = False,
        only: str | None = None) -> dict:
    """Measure, print the table, write ``<paths.metrics>/bench_stages[_synthetic].{json,csv}``."""
    names, cfg = selected(only), synthetic_config(cfg) if synthetic else cfg
    ctx, policy = Ctx(cfg, read_stores=not synthetic), os.environ.get("OMP_WAIT_POLICY", "default")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, **({"fp16": torch.float16} if ctx.device.type == "cuda"
                                                                else {})}
    bar = tqdm(total=len(dtypes) + len(names), desc="bench stages", unit="part", file=sys.stderr, dynamic_ncols=True)
    peak, rows, competing, compiled, load = {}, [], {policy: {}}, {}, machine()["load_average"]
    for key, dtype in dtypes.items():
        bar.set_postfix_str(f"{key} matmul peak")
        peak[key] = max(matmul_rates(dtype, PEAK_SIZES, PEAK_SECONDS, ctx.device).values())
        bar.update()
    for name in names:
        bar.set_postfix_str(name)
        work = BUILDERS[name](ctx)
        dtype, n = dtypes[work.precision], PEAK_SIZES[0]
        if cfg.runtime.compile and work.modules:
            compile_in_place(work.modules, ctx.device, "bench stages")
            work.step()
        # autocast runs a mixed stage's matmuls in the low precision and the rest in fp32; where
        # the low precision is emulated (CPUs without AVX512-BF16/AMX) fp32 is the faster
        # ceiling, so a mixed stage is judged against the faster of the two
        probed = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
        rows.append(measure(work, lambda: max(matmul_rates(d, (n,), PROBE_SECONDS, ctx.device)[n] for d in probed)))
        peak[work.precision] = max(peak[work.precision], rows[-1]["peak_gflop_per_s"] * 1e9)
        if competitor and name in TRAINING:
            competing[policy][name] = compete(work)
        del work
        if compile_ and name in TRAINING:
            compiled[name] = compare_compile(ctx, name)
        bar.update()
    bar.close()
    trained = [n for n in names if n in TRAINING]
    if competitor and trained and policy != "ACTIVE":
        competing["ACTIVE"] = compete_in_child(cfg, trained)
    for r in rows:
        r.update(slowdown=competing[policy].get(r["stage"], {}).get("slowdown"),
                 slowdown_active=competing.get("ACTIVE", {}).get(r["stage"], {}).get("slowdown"),
                 **{f"compile_{k}": compiled.get(r["stage"], {}).get(k) for k in ("speedup", "seconds")})
    summary = {"date": datetime.now().isoformat(timespec="seconds"), "machine": dict(machine(), load_before=load),
               "config": "synthetic: paper defaults + " + json.dumps(SYNTHETIC) if synthetic else cfg.source,
               "runtime": {k: getattr(cfg.runtime, k) for k in ("threads", "compile", "attention")},
               "peak_gflop_per_s": {k: v / 1e9 for k, v in peak.items()}, "stages": rows,
               "competitor": competing if competitor else {}, "compile": compiled}
    report(summary, synthetic)
    stem = Path(cfg.paths.metrics) / ("bench_stages_synthetic" if synthetic else "bench_stages")
    atomic_write_json(stem.with_suffix(".json"), summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    return summary


def report(summary: dict, synthetic: bool) -> None:
    m, ms = summary["machine"], lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    load = f"load average {ms(m['load_before'])} -> {ms(m['load_average'])}"
    print(f"bench stages: {m['cpu']}, {m['cores']} core(s), {m['torch_threads']} torch thread(s), OMP_WAIT_POLICY="
          f"{m['wait_policy']}, {load}; matmul peak "
          + ", ".join(f"{k} {v:.0f}" for k, v in summary["peak_gflop_per_s"].items())
          + " GFLOP/s (peak: the best probe beside each stage); ms per step (fastest step)")
    print(" ".join(format(head, spec.split(".")[0]) for head, _, spec in COLUMNS) + "  shapes")
    for r in summary["stages"]:
        print(" ".join(format("n/a" if r[k] is None else r[k], spec.split(".")[0] if r[k] is None else spec)
                       for _, k, spec in COLUMNS) + f"  {r['shapes']}")
    if synthetic:
        low = [r["stage"] for r in summary["stages"] if r["fraction_of_peak"] < 0.5]
        print("paper-like shapes, target >= 0.5 of peak: " + (f"NOT met by {', '.join(low)}" if low else "met"))
    for policy, results in summary["competitor"].items():
        for name, r in results.items():
            verdict = "met" if r["slowdown"] <= 2 else "NOT met"
            print(f"competitor ({policy}): {name:<13} {r['idle_samples_per_s']:9.1f} -> "
                  f"{r['loaded_samples_per_s']:9.1f} samples/s, slowdown {r['slowdown']:.2f}x (target <= 2x: "
                  f"{verdict})")
    for name, r in summary["compile"].items():
        print(f"compile: {name:<13} " + (f"eager {r['eager_samples_per_s']:.1f}, compiled "
              f"{r['compiled_samples_per_s']:.1f} samples/s: {r['speedup']:.2f}x, compile {r['compile_seconds']:.1f} s"
              if r["status"] == "ok" else f"eager only: {r['status']}"))
    sys.stdout.flush()


def _child(argv: list[str]) -> None:
    """``python -m fae_pipe.stages.bench_stages CONFIG OUT STAGE...``: ``compete`` each stage, results to OUT."""
    cfg_file, out, *names = argv
    cfg = C.load_config(cfg_file)
    configure_threads(cfg.runtime.threads)
    ctx, results = Ctx(cfg, read_stores=False), {}
    for name in names:
        work = BUILDERS[name](ctx)
        work.step()
        results[name] = compete(work)
    atomic_write_json(out, results)


if __name__ == "__main__":
    _child(sys.argv[1:])
