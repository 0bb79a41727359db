"""``fae-pipe bench flow``: sampling cost of the normalizing flow against diffusion as the token count grows.

Why: a diffusion step is one parallel pass over all N tokens, so SiT's sampling cost is
(steps) x (one pass) and grows with N only through the pass itself. An autoregressive
flow inverts each block one token at a time: N sequential single-token passes per block
(with the KV cache each attends to <= N cached keys; without it each is a full causal
pass over the partial sequence, so a block costs O(N^2) re-computation). This bench
measures both on the configured models (``flow.model``, ``sit.model`` at
``sample.steps`` Euler steps), random weights, on square latent grids of the configured
channel count at patch 1 with N = side^2 tokens (``--sides``), batch ``--batch``, no
guidance (guidance doubles the batch for both families alike):

* flow, KV-cached inversion + Tweedie step (what ``fae-pipe sample`` runs);
* flow, uncached inversion (the quadratic reference; only up to ``--uncached-max`` tokens);
* SiT, Euler.

The three candidates take turns, ``REPEATS`` rounds, best of each (shared machine).
Prints images/s and the growth against the smallest N, writes ``<metrics>/bench_flow.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fae_pipe.errors import UserError
from fae_pipe.flow import invert, sample as flow_sample
from fae_pipe.models.registry import create_model, model_kwargs
from fae_pipe.training.logs import write_metrics
from fae_pipe.transport import sample as sit_sample

REPEATS = 2


def _best(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after one warm-up call), seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(cfg, sides: list[int], batch: int, uncached_max: int, channels: int, repeats: int = REPEATS) -> list[dict]:
    """One row per grid side: images/s of the flow (cached, uncached) and of SiT."""
    rows = []
    steps = cfg.sample.steps
    for side in sides:
        shape = dict(input_size=side, patch_size=1, in_channels=channels, num_classes=10)
        torch.manual_seed(0)
        flow = create_model(cfg.flow.model, **shape).eval()
        sit = create_model(cfg.sit.model, **shape).eval()
        noise, y = torch.randn(batch, channels, side, side), torch.arange(batch) % 10
        n = side * side
        row = {"tokens": n, "grid": f"{channels}x{side}x{side}", "batch": batch}
        cands = {"flow_cached": lambda: flow_sample(flow, noise, y, sigma=cfg.flow.noise_sigma),
                 "sit_euler": lambda: sit_sample(sit, noise, y, method="euler", steps=steps)}
        if n <= uncached_max:
            cands["flow_uncached"] = lambda: invert(flow, noise, y, cache=False)
        with torch.no_grad():
            for name, fn in cands.items():
                row[f"{name}_img_per_s"] = round(batch / _best(fn, repeats), 3)
        rows.append(row)
    return rows


def run(cfg, sides: str = "4,8,16", batch: int = 16, uncached_max: int = 64) -> dict:
    try:
        side_list = [int(s) for s in str(sides).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bench flow --sides {sides!r} is invalid: expected grid sides like 4,8,16") from None
    if not side_list or min(side_list) < 2:
        raise UserError(f"bench flow --sides {sides!r} is invalid: expected sides >= 2 (N = side^2 tokens)")
    channels = int(model_kwargs(cfg.flow.model)["in_channels"])  # the registered config's latent channels
    print(f"bench flow: {cfg.flow.model} vs {cfg.sit.model} ({cfg.sample.steps} Euler steps), {channels} channels, "
          f"patch 1, batch {batch}, random weights, {torch.get_num_threads()} thread(s)", flush=True)
    rows = measure(cfg, side_list, batch, uncached_max, channels)
    base = rows[0]
    print(f"{'tokens':>7} {'flow img/s':>11} {'uncached':>9} {'SiT img/s':>10} {'flow/SiT':>9} "
          f"{'flow cost x':>12} {'SiT cost x':>11}")
    for r in rows:
        flow, sit = r["flow_cached_img_per_s"], r["sit_euler_img_per_s"]
        r["flow_cost_growth"] = round(base["flow_cached_img_per_s"] / flow, 2)
        r["sit_cost_growth"] = round(base["sit_euler_img_per_s"] / sit, 2)
        unc = r.get("flow_uncached_img_per_s")
        print(f"{r['tokens']:>7} {flow:>11.2f} {'-' if unc is None else f'{unc:.2f}':>9} {sit:>10.2f} "
              f"{flow / sit:>9.2f} {r['flow_cost_growth']:>12.2f} {r['sit_cost_growth']:>11.2f}")
    summary = {"flow_model": cfg.flow.model, "sit_model": cfg.sit.model, "sit_steps": cfg.sample.steps,
               "threads": torch.get_num_threads(), "rows": rows}
    write_metrics(Path(cfg.paths.metrics) / "bench_flow.json", summary)
    return summary
