"""The stages' steps as timed work units for ``fae-pipe bench stages`` (``stages/bench_stages.py``).

Why a module of its own: each builder makes one stage's step the way the stage makes it
(registry models from the config, the stage's autocast precision, losses, clipping, fused
AdamW, EMA), with random weights and inputs of the stage's shapes, and hands it to the
benchmark as a ``Work`` (the step split into forward / backward / optimizer / sync, its
FLOPs and samples). The benchmark's measuring (peak probes, competitor, compile) stays in
``bench_stages``. The builders mirror the stage step bodies rather than calling them, so
a change to a stage's step must be made here too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.encoders.registry import encoder_spec, patch_size
from fae_pipe.encoders.timm_vit import build_from_spec
from fae_pipe.errors import UserError
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, fae_parts, model_kwargs
from fae_pipe.stages.bench_train_step import SitStep
from fae_pipe.training.ema import EMA
from fae_pipe.training.logs import LogWindow
from fae_pipe.training.trainer import adamw


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
        self.dim, self.c, self.h = enc["in_dim"], enc["latent_channels"], cfg.image_encoder.input_size // patch_size(cfg.image_encoder.name, cfg.image_encoder.model_args)
        self.grid, self.tokens, self._encoder = (self.h, self.h), self.h * self.h, None
        self.classes = cfg.data.demo_classes if cfg.data.demo else 1000

    def encoder(self):
        e = self.cfg.image_encoder
        if self._encoder is None:  # random weights, whatever image_encoder.weights says
            self._encoder = build_from_spec({**encoder_spec(e), "weights": "random"}, self.device)
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
    from fae_pipe.transport import TransportSettings

    s, sm, shape = ctx.cfg.sit, ctx.cfg.sample, (ctx.c, ctx.h, ctx.h)
    kwargs = model_kwargs(s.model, in_channels=ctx.c, input_size=ctx.h, patch_size=s.patch_size,
                          num_classes=ctx.classes)
    sit = set_attention_backend(create_model(s.model, **kwargs).to(ctx.device).eval(), ctx.attention)
    shift = TransportSettings.of(s, ctx.c * ctx.h * ctx.h).shift  # train-sit's (what its export records)
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
