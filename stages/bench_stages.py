"""``fae-pipe bench stages``: every stage's step against this machine's own matmul peak (issue 16's roofline).

Why: "not wasteful" needs a ceiling to be judged against: the best rate of large square
matmuls, fp32 and bf16, on this process's threads (``matmul_rates``). The machine's peak is
measured first; then a short probe of the stage's precision runs before each timed step and
after the last, so a stage and its ceiling see the same load on a shared machine. Each
stage's step is built as the stage builds it: registry models from the config, its autocast
precision (``<section>.train.precision``, ``image_encoder.precision``; encode and sample run
fp32 like the stages), its losses, clipping, fused AdamW and EMA; random weights and inputs
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
import math
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
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from fae_pipe import config as C
from fae_pipe.artifacts import atomic_write_json, atomic_write_text
from fae_pipe.cache import schema
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.device import compile_in_place, compile_unavailable
from fae_pipe.encoders.dinov2 import PATCH, build_encoder
from fae_pipe.errors import UserError
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, fae_parts, model_kwargs
from fae_pipe.stages.bench_train_step import SitStep
from fae_pipe.threads import configure_threads, usable_cores
from fae_pipe.training.ema import EMA
from fae_pipe.training.flops import count_flops, matmul_rates
from fae_pipe.training.logs import LogWindow
from fae_pipe.training.trainer import adamw

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


class Update(NamedTuple):
    """A forward returning (loss or output, values the stage logs); with ``opt`` also backward, clipping
    at ``clip`` (0: the norm only, as the Trainer does), the optimizer step and the EMA."""

    forward: Callable[[], tuple]
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    clip: float = 0.0
    ema: EMA | None = None


class Work:
    """One stage's step as the stage runs it; ``step(mark)`` calls ``mark(part)`` at the end of each part."""

    def __init__(self, name, shapes, precision, batch, updates, ctx, modules=(), log_every=1, data=None):
        self.name, self.shapes, self.precision, self.batch, self.updates = name, shapes, precision, batch, updates
        self.device, self.modules, self.log_every, self.data = ctx.device, list(modules), log_every, data
        self.window = LogWindow(ctx.device, 0) if updates[0].opt is not None else None
        self.steps, self.loss = 0, None

    def step(self, mark=lambda part: None) -> None:
        values = {}
        for u in self.updates:
            self.loss, logged = u.forward()
            mark("forward")
            if u.opt is not None:
                self.loss.backward()
                mark("backward")
                torch.nn.utils.clip_grad_norm_(u.model.parameters(), u.clip if u.clip > 0 else math.inf)
                u.opt.step()
                u.opt.zero_grad(set_to_none=True)
                if u.ema is not None:
                    u.ema.update(u.model)
                mark("optimizer")
                values.update(logged)
        if self.window is not None:
            self.window.add(**values)
            self.steps += 1
            if self.steps % self.log_every == 0:
                self.window.close(self.steps)  # the stage's one host sync per log row
        mark("sync")


def timed_step(work: Work) -> tuple[float, dict, float]:
    """(seconds of one step, seconds per part, seconds of a ``.item()`` of its loss right after)."""
    parts, last = {}, [time.perf_counter()]

    def mark(part: str) -> None:
        if work.device.type == "cuda":
            torch.cuda.synchronize(work.device)
        now = time.perf_counter()
        parts[part], last[0] = parts.get(part, 0.0) + now - last[0], now

    start = last[0]
    work.step(mark)
    total, t = time.perf_counter() - start, time.perf_counter()
    if work.window is not None:
        work.loss.item()
    return total, parts, time.perf_counter() - t


class Ctx:
    """The config, the device and the shapes they imply, shared by the stage builders."""

    def __init__(self, cfg, read_stores: bool):
        self.cfg, self.read_stores, self.attention = cfg, read_stores, cfg.runtime.attention
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.names = fae_parts(cfg.fae.model)
        enc = model_kwargs(self.names["encoder"])
        self.dim, self.c, self.h = enc["in_dim"], enc["latent_channels"], cfg.image_encoder.input_size // PATCH
        self.grid, self.tokens, self._encoder = (self.h, self.h), self.h * self.h, None
        self.classes = cfg.data.demo_classes if cfg.data.demo else 1000

    def encoder(self):
        e = self.cfg.image_encoder
        if self._encoder is None:  # random weights, whatever image_encoder.weights says
            self._encoder = build_encoder(e.name, "random", e.input_size, self.device, e.precision)
        return self._encoder

    def autocast(self, precision: str, key: str):
        if precision == "fp16" and self.device.type == "cpu":
            raise UserError(f"config error: {key} = 'fp16' is invalid on CPU: expected 'fp32' or 'bf16'")
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=precision != "fp32")

    def trained(self, model, section: str, forward) -> Update:
        """``model`` on the device in train mode, updated as ``<section>.train`` says."""
        t = getattr(self.cfg, section).train
        model = set_attention_backend(model, self.attention).to(self.device).train()
        return Update(forward, model, adamw(model.parameters(), t.lr, t.weight_decay), t.grad_clip,
                      EMA(model, t.ema_decay) if t.ema_decay > 0 else None)

    def frozen_fae(self, pixels: bool = False):
        from fae_pipe.fae.autoencoder import FeatureAutoencoder

        parts = [create_model(self.names[k]).to(self.device).eval().requires_grad_(False)
                 for k in ("encoder", "feature_decoder", "pixel_decoder")[:2 + pixels]]
        set_attention_backend(parts, self.attention)
        return FeatureAutoencoder(parts[0], parts[1], self.grid, parts[2] if pixels else None)

    def lpips(self, backbone: str):
        from fae_pipe.metrics.image import _lpips_module, build_lpips
        from fae_pipe.metrics.weights import MetricUnavailable

        try:
            return build_lpips(backbone, self.device)
        except MetricUnavailable:  # no local trunk weights: a random trunk of the same net costs the same
            return _lpips_module(backbone).requires_grad_(False).eval().to(self.device)

    def store(self, path: str, array: str, row_shape: tuple) -> bool:
        """A store to read exists at ``path`` with rows of this shape (after the view axis)."""
        return (self.read_stores and (Path(path) / "zarr.json").is_file()
                and tuple(schema.open_group(path)[array].shape[2:]) == tuple(row_shape))

    def features(self, t):
        """The feature stream of train-fae and train-decoder (whole shards, one random view per sample)."""
        loader = ShardedLoader(self.cfg.paths.features, [schema.FEATURES], t.batch_size, t.seed, random_view=True,
                               memory_budget_bytes=int(t.memory_budget_gb * (1 << 30)), shuffle_buffer=t.shuffle_buffer)
        return loader, loader.batches_from(0)


def seconds_per_batch(batches, n: int) -> float:
    """Seconds per batch of a stage's batch stream over ``n`` batches, after the first (the setup)."""
    next(batches)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return (time.perf_counter() - start) / n


def dino(ctx, name: str, images: int, views: int) -> Work:
    """extract (all views of each image in one forward) and evaluate (generated images): DINOv2 forwards."""
    e, enc = ctx.cfg.image_encoder, ctx.encoder()
    x = torch.randn(images * views, 3, e.input_size, e.input_size, device=ctx.device)
    return Work(name, f"{e.name.split('_')[1]} {e.input_size}px, {images} img x {views} view(s) -> {ctx.h}x{ctx.h}x"
                f"{enc.dim}", e.precision, images, [Update(lambda: (enc.encode(x), {}))], ctx)


def train_fae(ctx) -> Work:
    from fae_pipe.fae.objectives import feature_loss
    from fae_pipe.models.fae_encoder import DiagonalGaussian
    from fae_pipe.stages.train_fae import build_module

    fc, t = ctx.cfg.fae, ctx.cfg.fae.train
    torch.manual_seed(t.seed)
    x, gen = torch.randn(t.batch_size, ctx.tokens, ctx.dim, device=ctx.device), torch.Generator(ctx.device)

    def forward():
        with ctx.autocast(t.precision, "fae.train.precision"):
            x_hat, mean, logvar = upd.model(x, gen)
        loss, mse, kl = feature_loss(x_hat, x, DiagonalGaussian(mean, logvar), fc.beta)
        return loss, {"loss": loss, "mse": mse, "kl": kl}

    upd = ctx.trained(build_module(fc.model, ctx.dim, ctx.grid)[0], "fae", forward)
    data = (lambda: ctx.features(t)[1]) if ctx.store(ctx.cfg.paths.features, schema.FEATURES,
                                                     (ctx.tokens, ctx.dim)) else None
    return Work("train-fae", f"{fc.model}: {t.batch_size} x {ctx.h}x{ctx.h}x{ctx.dim} -> {ctx.c} ch", t.precision,
                t.batch_size, [upd], ctx, [upd.model], t.log_every, data)


def train_decoder(ctx) -> Work:
    from fae_pipe.fae.objectives import DecoderObjective, noise_features
    from fae_pipe.stages.train_decoder import build_decoder

    cfg, dc, t, size = ctx.cfg, ctx.cfg.decoder, ctx.cfg.decoder.train, ctx.cfg.data.image_size
    torch.manual_seed(t.seed)
    name, pdec = build_decoder(cfg, ctx.dim, ctx.grid, size)
    disc = create_model(dc.discriminator).to(ctx.device).train()
    objective, gan, out = DecoderObjective(dc, ctx.lpips(dc.lpips_backbone)), dc.gan_weight > 0, {}
    x = torch.randn(t.batch_size, ctx.tokens, ctx.dim, device=ctx.device)
    target = torch.rand(t.batch_size, 3, size, size, device=ctx.device) * 2 - 1
    gen, fae = torch.Generator(ctx.device), ctx.frozen_fae() if dc.phase == 2 else None

    def generator():
        with torch.no_grad():
            x_in = noise_features(x, dc.noise_sigma, gen, dc.noise_schedule) if fae is None else fae.reconstruct(x)
        with ctx.autocast(t.precision, "decoder.train.precision"):
            out["pred"] = pdec(x_in)
            terms = objective.generator(out["pred"], target, disc, pdec.head.weight, gan)
        return terms["loss"], terms

    def discriminator():
        with ctx.autocast(t.precision, "decoder.train.precision"):
            d_loss = objective.discriminator(disc, target, out["pred"])
        return d_loss, {"d_loss": d_loss}

    updates = [ctx.trained(pdec, "decoder", generator)]
    if gan:
        updates.append(Update(discriminator, disc, adamw(disc.parameters(), dc.disc_lr, 0.0, betas=(0.5, 0.9))))
    readable = ctx.store(cfg.paths.features, schema.FEATURES, (ctx.tokens, ctx.dim)) and Path(cfg.paths.index).is_file()
    return Work("train-decoder", f"{name.split('.')[0]}: {t.batch_size} x {ctx.h}x{ctx.h}x{ctx.dim} -> {size}px, "
                f"LPIPS-{dc.lpips_backbone}, {dc.discriminator}{' (GAN on)' if gan else ''}", t.precision,
                t.batch_size, updates, ctx, [pdec, disc], t.log_every, (lambda: pixel_batches(ctx, t)) if readable
                else None)


def pixel_batches(ctx, t):
    """train-decoder's batches: cached features + their source pixels, decoded in ``data.decode_workers`` threads."""
    from fae_pipe.data.index import read_index
    from fae_pipe.fae.data import PixelBatches, feature_split

    cfg, group = ctx.cfg, schema.open_feature_store(ctx.cfg.paths.features)
    ids = feature_split(group, cfg.paths.index, cfg.paths.features).sample_ids
    batches = PixelBatches(*ctx.features(t), read_index(cfg.paths.index), cfg.data.image_size,
                           list(group.attrs.get(schema.A_VIEWS, cfg.data.views)), ids, cfg.data.decode_workers)
    try:
        yield from batches
    finally:
        batches.close()


def encode(ctx) -> Work:
    from fae_pipe.fae.autoencoder import tokens_to_grid

    b, fae, path = ctx.cfg.encode.batch_size, ctx.frozen_fae(), ctx.cfg.paths.features
    x = torch.randn(b, ctx.tokens, ctx.dim)

    def forward():  # as EncodeTask: posterior means -> grid -> float16 on the host
        return tokens_to_grid(fae.posterior(x).mean, fae.grid).cpu().numpy().astype(np.float16), {}

    def data():  # as encode reads: whole feature shards, then batches of each view
        group = schema.open_group(path)
        while True:
            for s in range(schema.store_num_shards(group)):
                feats = schema.read_shard(group, schema.FEATURES, s)
                yield from (feats[lo:lo + b, v] for lo in range(0, len(feats), b) for v in range(feats.shape[1]))

    return Work("encode", f"{ctx.names['encoder']}: {b} x {ctx.h}x{ctx.h}x{ctx.dim} -> {ctx.c} ch", "fp32", b,
                [Update(forward)], ctx, data=data if ctx.store(path, schema.FEATURES, (ctx.tokens, ctx.dim)) else None)


def train_sit(ctx) -> Work:
    from fae_pipe.data.latents import LatentBatches

    s, t, shape, path = ctx.cfg.sit, ctx.cfg.sit.train, (ctx.c, ctx.h, ctx.h), ctx.cfg.paths.latents
    sit = SitStep(ctx.cfg, SimpleNamespace(shape=shape, num_classes=ctx.classes), ctx.device)
    x = torch.randn(t.batch_size, *shape, device=ctx.device)
    y = torch.randint(0, ctx.classes, (t.batch_size,), device=ctx.device)

    def forward():
        loss = sit.loss(x, y, 0)  # label dropout, autocast, flow-matching loss: as bench train-step's SiT step
        return loss, {"loss": loss}

    def data():
        return LatentBatches(path, t.batch_size, t.seed, memory_budget_bytes=int(t.memory_budget_gb * (1 << 30)),
                             shuffle_buffer=t.shuffle_buffer).from_step(0, ctx.device)

    upd = ctx.trained(sit.model, "sit", forward)
    return Work("train-sit", f"{s.model}/p{s.patch_size}: {t.batch_size} x {ctx.c}x{ctx.h}x{ctx.h}", t.precision,
                t.batch_size, [upd], ctx, [upd.model], t.log_every,
                data if ctx.store(path, schema.LATENTS, shape) else None)


def sample(ctx) -> Work:
    from fae_pipe.sampling.generator import ImageGenerator, to_uint8
    from fae_pipe.transport import shift_factor

    s, sm, shape = ctx.cfg.sit, ctx.cfg.sample, (ctx.c, ctx.h, ctx.h)
    kwargs = model_kwargs(s.model, in_channels=ctx.c, input_size=ctx.h, patch_size=s.patch_size,
                          num_classes=ctx.classes)
    sit = set_attention_backend(create_model(s.model, **kwargs).to(ctx.device).eval(), ctx.attention)
    shift = shift_factor(s.shift_mode, s.shift, latent_dim=ctx.c * ctx.h * ctx.h, base_dim=s.shift_base_dim)
    gen = ImageGenerator(sit, ctx.frozen_fae(pixels=True), shape, ctx.classes, shift, ctx.classes, ctx.device)
    noise, labels = torch.randn(sm.batch_size, *shape), np.arange(sm.batch_size) % ctx.classes

    def forward():
        latents = gen.latents(labels, noise, sm.method, sm.steps, sm.guidance)
        return to_uint8(gen.fae.decode_raw(latents, "pixels")), {}

    return Work("sample", f"{s.model}/p{s.patch_size}: {sm.steps} {sm.method} steps, CFG {sm.guidance}, "
                f"{sm.batch_size} x {ctx.c}x{ctx.h}x{ctx.h}; decoders -> {gen.fae.pixel_decoder.image_size}px", "fp32",
                sm.batch_size, [Update(forward)], ctx)


BUILDERS = {"extract": lambda ctx: dino(ctx, "extract", ctx.cfg.image_encoder.batch_size, len(ctx.cfg.data.views)),
            "train-fae": train_fae, "train-decoder": train_decoder, "encode": encode, "train-sit": train_sit,
            "sample": sample, "evaluate": lambda ctx: dino(ctx, "evaluate", ctx.cfg.evaluate.batch_size, 1)}


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
        rows.append(measure(work, lambda: matmul_rates(dtype, (n,), PROBE_SECONDS, ctx.device)[n]))
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
