"""``fae-pipe train-sit``: SiT trained on the cached latents only, under Accelerate.

Why it is built this way: the point of the cache is that the diffusion loop never
runs an image encoder, so this stage reads ``latents.zarr`` (through
``fae_pipe.data.latents``) and nothing else from the data side, and imports no
encoder or decoder code. Every random draw of a step (label dropout, times, noise)
comes from a generator seeded by ``(seed, rank, step, micro-batch)`` and the data
order from ``(seed, epoch)``, so ``--resume`` continues bit-exactly on the same
hardware and world size.

Artefacts (rank 0): ``<run>/loss.csv`` (per step), ``<run>/checkpoints/`` (every
``checkpoint_every`` steps and at the end, newest ``keep_last`` kept), ``<run>/sit.pt``
(the export for sampling), ``<metrics>/sit.json``; every rank writes
``<run>/ranks/rank-<r>.json`` (world size, samples seen, parameter checksum).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fae_pipe.data.latents import LatentBatches
from fae_pipe.errors import UserError
from fae_pipe.models.registry import create_model, model_kwargs
from fae_pipe.training.accel import make_accelerator, step_generator
from fae_pipe.training.checkpoint import capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from fae_pipe.training.ema import EMA
from fae_pipe.training.finite import check_finite_weights
from fae_pipe.training.fresh import clear_checkpoints
from fae_pipe.training.guard import check_finite
from fae_pipe.training.logs import StepLog, write_metrics
from fae_pipe.training.run_records import clear_rank_records, final_loss, write_rank_record
from fae_pipe.training.schedule import make_scheduler
from fae_pipe.training.sit_export import save_sit_export
from fae_pipe.transport import shift_factor, training_loss

LOG_FIELDS = ["loss", "lr", "grad_norm", "epoch", "samples_per_s"]


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Samples per forward on one process; the global batch must split evenly."""
    parts = world_size * grad_accum
    if global_batch % parts:
        raise UserError(f"config error: sit.batch_size = {global_batch} is invalid: it must be divisible by "
                        f"processes x sit.grad_accum = {world_size} x {grad_accum} = {parts}")
    return global_batch // parts


def run(cfg, resume: str | None = None) -> dict:
    """Train (or resume) SiT as configured by ``cfg.sit`` / ``cfg.paths``; returns the summary metrics."""
    s, run_dir = cfg.sit, Path(cfg.paths.sit_run)
    acc = make_accelerator(s.precision, s.grad_accum, "sit")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    micro = micro_batch_size(s.batch_size, world, s.grad_accum)
    data = LatentBatches(cfg.paths.latents, micro, s.seed, rank, world,
                         int(s.memory_budget_gb * (1 << 30)), s.shuffle_buffer)
    info = data.info
    c, h, w = info.shape
    if h != w:
        raise UserError(f"{info.path}: latents are {h}x{w}; SiT needs a square latent grid")
    kwargs = model_kwargs(s.model, in_channels=c, input_size=h, patch_size=s.patch_size,
                          num_classes=info.num_classes)
    torch.manual_seed(s.seed)
    model = create_model(s.model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    sched = make_scheduler(opt, s.warmup, s.steps, "constant")
    ckpt = _start_or_resume(run_dir, resume, cfg, info, kwargs, world, micro, main)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        sched.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
    ema = EMA(model, s.ema_decay) if s.ema_decay > 0 else None  # from the resumed weights if none was saved
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    model, opt = acc.prepare(model, opt)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.model.to(acc.device)
    start = int(ckpt["step"]) if ckpt else 0
    shift = shift_factor(s.shift_mode, s.shift, latent_dim=c * h * w, base_dim=s.shift_base_dim)
    extra = {"latent_stats": info.stats(), "fae_fingerprint": info.fae_fingerprint, "model_name": s.model,
             "model_kwargs": kwargs, "world_size": world, "micro_batch": micro, "train_seconds": 0.0}
    base_seconds = float(ckpt["extra"].get("train_seconds", 0.0)) if ckpt else 0.0
    log = StepLog(run_dir / "loss.csv", LOG_FIELDS, resume_step=start if ckpt else None,
                  tensorboard_dir=run_dir / "tensorboard") if main else None
    if main:
        clear_rank_records(run_dir)
        print(f"train-sit: {s.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
              f"{c}x{h}x{w} latents from {info.path} ({'in RAM' if data.loader.in_ram else 'streaming'}); "
              f"world size {world}, global batch {s.batch_size} = {world} x {s.grad_accum} x {micro}; "
              f"steps {start}->{s.steps}", flush=True)
    acc.wait_for_everyone()

    model.train()
    batches = data.from_step(start * s.grad_accum, acc.device)
    step, samples, t_start = start, 0, time.perf_counter()
    bar = tqdm(total=s.steps, initial=start, disable=not main, desc="train-sit", unit="step", dynamic_ncols=True)
    while step < s.steps:
        tick, total = time.perf_counter(), torch.zeros((), device=acc.device)
        for a in range(s.grad_accum):
            epoch, x, y = next(batches)
            gen = step_generator(s.seed, rank, step, acc.device, stream=f"micro{a}")
            drop = torch.rand(y.shape[0], generator=gen, device=gen.device).to(y.device) < s.label_dropout
            y = torch.where(drop, torch.full_like(y, info.num_classes), y)
            with acc.accumulate(model):
                out = training_loss(model, x, y, generator=gen, time_dist=s.time_dist, time_mean=s.time_mean,
                                    time_std=s.time_std, shift=shift)
                acc.backward(out.loss)
            total += out.loss.detach()
            samples += x.shape[0]
        loss = acc.reduce(total / s.grad_accum, "mean")
        check_finite(loss, step + 1, "train-sit", run_dir, acc)  # before the update: weights stay good
        grad_norm = acc.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(acc.unwrap_model(model))
        step += 1
        rate = s.batch_size / max(time.perf_counter() - tick, 1e-9)
        if main:
            log.log(step, loss=float(loss), lr=float(lr), epoch=epoch, samples_per_s=rate,
                    grad_norm=None if grad_norm is None else float(grad_norm))
            bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if step % s.checkpoint_every == 0 or step == s.steps:
            extra["train_seconds"] = base_seconds + time.perf_counter() - t_start
            _save(acc, run_dir, step, model, ema, opt, sched, cfg, extra, s.keep_last)
    bar.close()
    wall = time.perf_counter() - t_start
    write_rank_record(run_dir, rank, world, step, samples, acc.unwrap_model(model))
    if main:
        log.close()
    acc.wait_for_everyone()
    summary = {"steps": s.steps, "start_step": start, "world_size": world, "global_batch": s.batch_size,
               "wall_time_s": round(wall, 3), "steps_per_s": round((step - start) / max(wall, 1e-9), 4),
               "samples_per_s": round((step - start) * s.batch_size / max(wall, 1e-9), 2)}
    if main:
        _export(cfg, run_dir, acc.unwrap_model(model), ema, kwargs, info, shift, step, summary)
    acc.wait_for_everyone()
    return summary


def _start_or_resume(run_dir, resume, cfg, info, kwargs, world, micro, main) -> dict | None:
    """The checkpoint to continue from, or None after clearing an older run's checkpoints.

    ``--resume``/a path refuses a checkpoint of another model or latent store; ``auto``
    (``dvc repro``) starts fresh instead, saying why.
    """
    path = resolve_resume(run_dir, resume, "sit", dataclasses.asdict(cfg.sit))
    ckpt = None if path is None else load_checkpoint(path)
    if ckpt is not None:
        reason = _incompatibility(ckpt, path, info, cfg.sit.model, kwargs)
        if reason and resume != "auto":
            raise UserError(f"--resume: {reason}")
        if reason:
            print(f"train-sit: resume auto: {reason}; starting a fresh run", file=sys.stderr)
            ckpt = None
    if ckpt is None:
        if main:
            clear_checkpoints(run_dir, "train-sit")
        return None
    extra = ckpt.get("extra") or {}
    if main:
        print(f"train-sit: resuming from {path} (step {ckpt['step']})", file=sys.stderr)
        if (extra.get("world_size"), extra.get("micro_batch")) != (world, micro):
            print(f"train-sit: note: checkpoint ran {extra.get('world_size')} process(es) x "
                  f"{extra.get('micro_batch')} samples, now {world} x {micro}: the data order differs from an "
                  f"uninterrupted run", file=sys.stderr)
    return ckpt


def _incompatibility(ckpt, path, info, name, kwargs) -> str | None:
    extra = ckpt.get("extra") or {}
    if extra.get("model_name") != name or extra.get("model_kwargs") != kwargs:
        return (f"checkpoint '{path}' is a {extra.get('model_name')} with other settings than the configured "
                f"{name}; resume with the config the run was started with")
    if extra.get("latent_stats") != info.stats():
        return (f"checkpoint '{path}' was trained on latents with other statistics or FAE "
                f"({(extra.get('latent_stats') or {}).get('fae_fingerprint')}); use the same latent store")
    return None


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _save(acc, run_dir, step, model, ema, opt, sched, cfg, extra, keep_last) -> None:
    """Check the weights are finite (a checkpoint must be worth resuming), then write it on rank 0."""
    check_finite_weights(acc.unwrap_model(model), step, "train-sit", run_dir)
    if acc.is_main_process:
        payload = {"model": _cpu_state(acc.unwrap_model(model)), "ema": None if ema is None else _cpu_state(ema.model),
                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": capture_rng(),
                   "config": cfg.to_dict(), "extra": dict(extra)}
        save_checkpoint(run_dir, step, payload, keep_last)
    acc.wait_for_everyone()


def _export(cfg, run_dir: Path, model, ema, kwargs, info, shift: float, step: int, summary: dict) -> None:
    """Rank 0: ``sit.pt`` for sampling, ``sit.json`` for DVC, and the closing summary line."""
    s = cfg.sit
    summary.update(final_loss(run_dir / "loss.csv"))
    save_sit_export(run_dir / "sit.pt", model_name=s.model, model_kwargs=kwargs, state_dict=_cpu_state(model),
                    ema_state_dict=None if ema is None else _cpu_state(ema.model),
                    latent_stats=info.stats(), fae_fingerprint=info.fae_fingerprint,
                    num_classes=info.num_classes, latent_shape=list(info.shape),
                    transport={"shift_mode": s.shift_mode, "shift": s.shift, "shift_base_dim": s.shift_base_dim,
                               "shift_factor": shift, "time_dist": s.time_dist, "null_class": info.num_classes},
                    config=cfg.to_dict(), step=step)
    write_metrics(Path(cfg.paths.metrics) / "sit.json", summary)
    print(f"train-sit: steps {summary['start_step']}->{step} in {summary['wall_time_s']:.1f} s "
          f"({summary['steps_per_s']:.2f} steps/s, {summary['samples_per_s']:.0f} samples/s), world size "
          f"{summary['world_size']}, final loss {summary.get('final_loss', float('nan')):.4f} -> {run_dir / 'sit.pt'}",
          flush=True)
