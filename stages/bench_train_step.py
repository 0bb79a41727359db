"""``fae-pipe bench train-step``: what caching latents (and REPA targets) buys a SiT step, measured and predicted.

Why: the design's claim is that the diffusion loop should read cached latents
instead of running the image encoder online (as RAE does). Both paths run here in
one process on the same batches with the same SiT:

* cached: latent loader (``paths.latents``; with ``--synthetic N`` a temporary store
  of random latents for the first N images of ``paths.index``, shaped as the
  configured encoder + FAE would make them, so any scale can be benched without
  running the pipeline: speed does not depend on the values) -> normalise -> SiT step;
* online: decode the batch's images (``paths.index``, ``data.decode_workers``
  threads, the view the loader drew) -> ``encoder_input`` -> DINOv2 forward
  (``encoder`` section) -> FAE encoder (``<fae.model>.encoder``, random weights: speed
  does not depend on them) -> posterior mean -> normalise -> SiT step.

With ``sit.repa_weight`` > 0 (REPA configured, as train-sit reads it) two more paths
run the SiT step with REPA's alignment loss exactly as train-sit adds it
(``training_loss(..., hidden_at=k)``, ``sit.repa_projector``, ``repa_loss`` against
``align_targets``), the same model and projector in both, the same batches:

* cached + REPA: ``LatentBatches(..., repa_features=paths.features).from_step_with_repa``,
  the cached DINOv2 patch tokens of each batch's samples and views (with ``--synthetic``
  a temporary random feature store beside the latent one) -> SiT + REPA step;
* online + REPA, the REPA way: cached latents, targets made every step by decoding
  the batch's images -> ``encoder_input`` -> DINOv2 forward (no grad) -> patch tokens.

REPA is switched on by the config rather than a flag because the bench measures the
step train-sit would run: weight, block, projector and target store are that run's
settings, so a REPA config benches as it trains and no second switch can disagree with it.

A SiT step is label dropout + forward + backward + clipping + AdamW. The loader converts
a group of batches per call (``fae_pipe.data.batches``), so one timed step would see all
of that work or none: a cached step's time is the median SiT step plus the loader's
seconds per batch over a fresh stream of several groups. The expected speed-up is
FLOPs(online) / FLOPs(cached), counted with torch's FlopCounterMode
(``fae_pipe.training.flops``): DINOv2 and FAE forward, SiT (+ projector) forward + backward.
Image decoding costs time but no counted FLOPs, so it pushes the measured ratio
above the FLOP one; a part that reaches fewer FLOP/s than the others (small, memory-
bound matmuls of a tiny SiT in fp32 next to a bf16 DINOv2) pulls it below, which is
why the achieved GFLOP/s of each part are printed. Target (issue 4): measured >= 0.9x
expected.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from fae_pipe.artifacts import seeded_generator
from fae_pipe.cache import schema
from fae_pipe.cache.synthetic import write_random_feature_store, write_random_latent_store
from fae_pipe.data.index import read_index
from fae_pipe.data.latents import LatentBatches
from fae_pipe.data.transforms import load_pixels
from fae_pipe.encoders.registry import encoder_spec, patch_size
from fae_pipe.encoders.timm_vit import build_from_spec
from fae_pipe.errors import UserError
from fae_pipe.models.registry import create_model, fae_parts, model_kwargs
from fae_pipe.models.repa import align_targets, default_repa_depth, repa_loss
from fae_pipe.training.flops import count_flops
from fae_pipe.training.logs import write_metrics
from fae_pipe.transport import TransportSettings

STEPS = 5  # timed steps per path (after one warm-up step each); rates use the median step time
ROWS = {"cached": "cached latents", "online": "online path",
        "cached+repa": "cached + REPA (targets from features.zarr)",
        "online+repa": "online + REPA (DINOv2 on the images each step)"}


def timed(seconds: dict, key: str, fn, *args):
    """``fn(*args)``, its wall time added to ``seconds[key]``."""
    t = time.perf_counter()
    out = fn(*args)
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
    return out


class SitStep:
    """One SiT optimizer step, shared by every path so they differ only in where x (and REPA's targets) come from.

    ``repa_dim`` (the targets' token width) adds train-sit's REPA: a projector on the
    output of block ``sit.repa_depth`` (or the default for the model's depth) with its own
    AdamW and clipping, as train-sit has; a step given targets adds
    ``sit.repa_weight`` x the alignment loss and updates the projector too.
    """

    def __init__(self, cfg, info, device, repa_dim: int | None = None):
        s = cfg.sit
        c, h, _ = info.shape
        torch.manual_seed(s.train.seed)
        kwargs = model_kwargs(s.model, in_channels=c, input_size=h, patch_size=s.patch_size,
                              num_classes=info.num_classes)
        self.model = create_model(s.model, **kwargs).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.train.lr, weight_decay=s.train.weight_decay)
        self.s, self.t, self.null, self.device = s, s.train, info.num_classes, device
        self.transport = TransportSettings.of(s, c * h * h)  # train-sit's time distribution and shift (latents)
        self.parts = [(self.model, self.opt)]
        if repa_dim is not None:
            self.depth = s.repa_depth or default_repa_depth(self.model.depth)
            if not 1 <= self.depth <= self.model.depth:
                raise UserError(f"config error: sit.repa_depth = {s.repa_depth} is invalid: expected "
                                f"1..{self.model.depth} (the blocks of {s.model}) or 0 for the default")
            self.projector = create_model(s.repa_projector, width=kwargs["width"], target_dim=repa_dim)
            self.projector = self.projector.to(device).train()
            self.parts.append((self.projector, torch.optim.AdamW(self.projector.parameters(), lr=s.train.lr,
                                                                 weight_decay=s.train.weight_decay)))

    def loss(self, x, y, step: int, targets=None, target_grid=None):
        """Flow-matching loss; with REPA ``targets`` (B, tokens, dim) on ``target_grid`` plus the weighted alignment."""
        gen = seeded_generator(self.t.seed, 0, step, "", device=self.device)
        drop = torch.rand(y.shape[0], generator=gen, device=gen.device).to(y.device) < self.s.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null), y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.t.precision == "bf16"):
            out = self.transport.loss(self.model, x, y, gen, hidden_at=None if targets is None else self.depth)
            if targets is None:
                return out.loss
            projected = self.projector(out.hidden)
        return out.loss + self.s.repa_weight * repa_loss(projected, align_targets(targets, self.model.grid,
                                                                                   target_grid))

    def __call__(self, x, y, step: int, targets=None, target_grid=None) -> None:
        self.loss(x, y, step, targets, target_grid).backward()
        for module, opt in self.parts[:1 if targets is None else 2]:
            if self.t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.t.grad_clip)
            opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for module, _ in self.parts:
            module.zero_grad(set_to_none=True)


class OnlinePath:
    """Images of given store rows -> encoder tokens (REPA's online targets) -> normalised FAE latents,
    the way an uncached loop gets them; ``seconds`` collects each part's wall time."""

    def __init__(self, cfg, data: LatentBatches, device):
        self.cfg, self.loader, self.device = cfg, data.loader, device
        self.index = read_index(cfg.paths.index)
        names = data.loader.group.attrs.get(schema.A_VIEWS) or list(cfg.data.views)
        self.view_names = [names[i] for i in range(data.info.views)]
        e = cfg.image_encoder
        self.encoder = build_from_spec(encoder_spec(e), device)
        self.fae = create_model(fae_parts(cfg.fae.model)["encoder"]).to(device).eval().requires_grad_(False)
        self.stats = data.info.stats
        self.pool = ThreadPoolExecutor(max(1, cfg.data.decode_workers))
        self.seconds: dict[str, float] = {}

    def pixels(self, rows, views) -> np.ndarray:
        size = self.cfg.data.image_size
        jobs = [(self.index.abspath(self.loader.sample_ids[r]), (self.view_names[v],)) for r, v in zip(rows, views)]
        return np.concatenate(list(self.pool.map(lambda j: load_pixels(j[0], size, views=j[1]), jobs)))

    def tokens(self, pixels):
        return self.encoder.encode(self.encoder.preprocess(pixels))[0]  # no_grad inside

    @torch.no_grad()
    def latents(self, tokens):
        mean, _ = self.fae(tokens, self.encoder.grid)
        h, w = self.encoder.grid
        z = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w)
        return self.stats.normalize(z.float()).contiguous()  # the layout cached latents have

    def tokens_of(self, rows, views):
        """Patch tokens (B, tokens, dim) of the rows' images at their views: decode, then DINOv2."""
        return timed(self.seconds, "encoder", self.tokens, timed(self.seconds, "decode", self.pixels, rows, views))

    def __call__(self, rows, views):
        return timed(self.seconds, "fae", self.latents, self.tokens_of(rows, views))


def loader_seconds(stream, batches: int) -> float:
    """Seconds per batch of a fresh ``stream()`` over ``batches`` batches (several of the loader's groups)."""
    it = stream()
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches


def run(cfg, synthetic: int | None = None) -> dict:
    """Measure, print and write ``bench_train_step.json``; ``synthetic`` = N benches temporary stores."""
    repa = cfg.sit.repa_weight > 0
    if synthetic is None:
        return _run(cfg, cfg.paths.latents, cfg.paths.features if repa else None)
    if synthetic < 1:
        raise UserError(f"--synthetic {synthetic} is invalid: expected a number of samples >= 1")
    index = read_index(cfg.paths.index)
    n, views, g = min(synthetic, len(index.labels)), list(cfg.data.views), cfg.image_encoder.input_size // patch_size(cfg.image_encoder.name, cfg.image_encoder.model_args)
    enc, x = model_kwargs(fae_parts(cfg.fae.model)["encoder"]), cfg.extract
    meta = {"labels": index.labels, "num_classes": index.num_classes, "attrs": {schema.A_VIEWS: views}}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        path = write_random_latent_store(Path(tmp) / "latents.zarr", (n, len(views), enc["latent_channels"], g, g),
                                         x.shard_samples, x.chunk_samples, **meta)
        features = None if not repa else write_random_feature_store(  # tokens as wide as the FAE encoder takes
            Path(tmp) / "features.zarr", (n, len(views), g * g, enc["in_dim"]), (g, g), x.shard_samples,
            x.chunk_samples, **meta)
        return _run(cfg, path, features)


def _run(cfg, latents, features) -> dict:
    s, device = cfg.sit, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = LatentBatches(latents, s.train.batch_size, s.train.seed, repa_features=features)
    loader, b, repa = data.loader, s.train.batch_size, data.repa
    online = OnlinePath(cfg, data, device)
    if repa is not None and repa.dim != online.encoder.dim:
        raise UserError(f"REPA targets: {repa.path} holds {repa.dim}-wide tokens but {cfg.image_encoder.name} makes "
                        f"{online.encoder.dim}: cached and online targets must come from the same encoder")
    step_fn = SitStep(cfg, data.info, device, None if repa is None else repa.dim)
    nb = loader.steps_per_epoch
    epochs = [(loader.epoch_order(e), loader.epoch_views(e)) for e in range(STEPS // nb + 1)]
    print(f"bench train-step: batch {b}, {s.model} on {'x'.join(map(str, data.info.shape))} latents "
          f"({'in RAM' if loader.in_ram else 'streaming'}); online: {cfg.image_encoder.name} @ {cfg.image_encoder.input_size}px "
          f"({cfg.image_encoder.weights} weights, {cfg.image_encoder.precision}) + {cfg.fae.model}.encoder; device {device}",
          flush=True)
    if repa is not None:
        print(f"  REPA: lambda {s.repa_weight}, {s.repa_projector} on block {step_fn.depth}/{step_fn.model.depth}; "
              f"targets {repa.grid[0]}x{repa.grid[1]}x{repa.dim} from {repa.path}, or "
              f"{'x'.join(map(str, online.encoder.grid))}x{online.encoder.dim} from {cfg.image_encoder.name} online",
              flush=True)

    def rows_of(k):  # store rows and views of batch k: the loader's order (a function of seed and epoch)
        (order, views), i = epochs[k // nb], k % nb
        rows = order[i * b:(i + 1) * b]
        return rows, views[rows]

    plain = [batch[1:] for batch in islice(data.from_step(0, device), STEPS + 1)]  # batch k = rows_of(k)
    with_targets = [] if repa is None else [batch[1:] for batch in islice(data.from_step_with_repa(0, device),
                                                                          STEPS + 1)]
    many = min(nb, 4 * max(data.group, STEPS))
    load = {"latents": loader_seconds(lambda: data.from_step(0, device), many)}
    if repa is not None:
        load["latents+targets"] = loader_seconds(lambda: data.from_step_with_repa(0, device), many)

    def cached(k):
        step_fn(*plain[k], k)

    def uncached(k):
        rows, views = rows_of(k)
        y = torch.from_numpy(loader.labels[rows]).to(device)
        timed(online.seconds, "sit_step", step_fn, online(rows, views), y, k)

    def cached_repa(k):
        x, y, targets = with_targets[k]
        step_fn(x, y, k, targets, repa.grid)

    def online_repa(k):  # the REPA way: latents from the cache, targets from DINOv2 on the same batch's images
        targets = online.tokens_of(*rows_of(k))
        timed(online.seconds, "sit_step", step_fn, *plain[k], k, targets, online.encoder.grid)

    paths = {"cached": cached, "online": uncached}
    if repa is not None:
        paths.update({"cached+repa": cached_repa, "online+repa": online_repa})
    for fn in paths.values():
        fn(0)  # warm-up: first-call allocations, thread pools, autotuning
    times: dict[str, list[float]] = {name: [] for name in paths}
    part_times: dict[str, list[dict[str, float]]] = {name: [] for name in paths if name.startswith("online")}
    for k in range(1, STEPS + 1):  # round-robin step by step: every path sees the same machine load
        for name, fn in paths.items():
            online.seconds = {}
            t = time.perf_counter()
            fn(k)
            times[name].append(time.perf_counter() - t)
            if name in part_times:
                part_times[name].append(online.seconds)
    step = {name: statistics.median(ts) for name, ts in times.items()}
    loads = {"cached": load["latents"], "online": 0.0, "online+repa": load["latents"],
             "cached+repa": load.get("latents+targets", 0.0)}
    rate = {name: 1 / (step[name] + loads[name]) for name in paths}
    parts = {name: {key: statistics.median(p[key] for p in ps) for key in ps[0]} for name, ps in part_times.items()}

    rows, views = rows_of(0)
    px = online.pixels(rows, views)
    x_in = online.encoder.preprocess(px)
    tok = online.tokens(px)
    x, y = online.latents(tok), torch.from_numpy(loader.labels[rows]).to(device)
    flops = {"encoder": count_flops(lambda: online.encoder.encode(x_in)),
             "fae": count_flops(lambda: online.latents(tok)),
             "sit_fwd_bwd": count_flops(lambda: step_fn.loss(x, y, 0).backward())}
    if repa is not None:
        xr, yr, targets = with_targets[0]
        repa_flops = {"encoder": flops["encoder"], "sit_repa_fwd_bwd": count_flops(
            lambda: step_fn.loss(xr, yr, 0, targets, repa.grid).backward())}
    step_fn.zero_grad()
    expected = sum(flops.values()) / flops["sit_fwd_bwd"]
    measured = rate["cached"] / rate["online"]
    ok = measured >= 0.9 * expected
    for name in paths:
        split = {**({"loader": loads[name]} if loads[name] else {}), **parts.get(name, {"sit_step": step[name]})}
        print(f"  {ROWS[name]:<46}: {rate[name]:8.3f} steps/s ({rate[name] * b:,.1f} samples/s); per step: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in split.items()), flush=True)
    seconds = {"encoder": parts["online"]["encoder"], "fae": parts["online"]["fae"], "sit_fwd_bwd": step["cached"]}
    rates = {k: v / seconds[k] for k, v in flops.items()}
    if repa is not None:
        rates["sit_repa_fwd_bwd"] = repa_flops["sit_repa_fwd_bwd"] / step["cached+repa"]
    print("  FLOPs per step (achieved rate): " + ", ".join(
        f"{k} {v / 1e9:.2f} G ({rates[k] / 1e9:.1f} GFLOP/s)"
        for k, v in {**flops, **(repa_flops if repa is not None else {})}.items()), flush=True)
    if rates["sit_fwd_bwd"] < 0.8 * rates["encoder"]:
        print(f"  note: the SiT step reaches {rates['sit_fwd_bwd'] / rates['encoder']:.2f}x the encoder's FLOP rate, "
              "so FLOP counts overstate the speed-up at this scale (a FLOP-bound comparison needs SiT and encoder "
              "of similar width and precision, e.g. --synthetic with the paper's shapes; docs/train-sit.md)", flush=True)
    print(f"bench train-step: measured speed-up {measured:.2f}x, FLOP-expected {expected:.2f}x, "
          f"measured/expected {measured / expected:.2f} (target >= 0.9): {'met' if ok else 'NOT met'}", flush=True)
    summary = {"batch": b, "steps_per_s": rate, "measured_speedup": measured, "flop_expected_speedup": expected,
               "flops": flops, "gflop_per_s": {k: rates[k] / 1e9 for k in flops},
               "online_seconds_per_step": parts["online"], "loader_seconds_per_batch": load, "target_met": ok}
    if repa is not None:
        r_measured = rate["cached+repa"] / rate["online+repa"]
        r_expected = sum(repa_flops.values()) / repa_flops["sit_repa_fwd_bwd"]
        print(f"bench train-step REPA: targets from the cache vs DINOv2 online: measured speed-up {r_measured:.2f}x, "
              f"FLOP-expected {r_expected:.2f}x, measured/expected {r_measured / r_expected:.2f}", flush=True)
        summary["repa"] = {"weight": s.repa_weight, "depth": step_fn.depth, "projector": s.repa_projector,
                           "target_dim": repa.dim, "targets": str(repa.path), "measured_speedup": r_measured,
                           "flop_expected_speedup": r_expected, "flops": repa_flops,
                           "gflop_per_s": rates["sit_repa_fwd_bwd"] / 1e9,
                           "online_seconds_per_step": parts["online+repa"]}
    write_metrics(Path(cfg.paths.metrics) / "bench_train_step.json", summary)
    online.pool.shutdown()
    return summary
