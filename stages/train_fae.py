"""``fae-pipe train-fae``: FAE encoder + feature decoder from ``features.zarr`` alone.

Never opens an image and never builds DINOv2: batches of cached patch tokens
(one random view per sample) come from the whole-shard loader, the loss is
``L2(x_hat, x) + beta * KL`` (``fae_pipe.fae.losses``). Every random draw comes
from ``step_generator(seed, rank, step)`` and the data order from
``(seed, epoch)``, so ``--resume`` continues bit-exactly. Artefacts in
``paths.fae_run``: ``loss.csv``, ``eval.csv``, ``checkpoints/``, the export
``fae.pt``; held-out numbers in ``<paths.metrics>/fae.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fae_pipe.cache import schema
from fae_pipe.config import Config
from fae_pipe.errors import UserError
from fae_pipe.fae.data import feature_split, open_feature_store, read_rows
from fae_pipe.fae.evaluation import feature_metrics
from fae_pipe.fae.export import FAE_FILE, FAE_FORMAT, save_unless_same_weights
from fae_pipe.fae.loop import make_loader, per_process_batch, progress_bar, save_training_state, start_or_resume
from fae_pipe.fae.losses import feature_loss
from fae_pipe.fae.train_module import FeatureAutoencoderModule
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.models.registry import create_model, fae_parts
from fae_pipe.training.accel import make_accelerator, step_generator
from fae_pipe.training.ema import EMA
from fae_pipe.training.guard import check_finite
from fae_pipe.training.logs import StepLog, write_metrics
from fae_pipe.training.schedule import make_scheduler

STAGE = "train-fae"
EVAL_SAMPLES = 256  # held-out samples (all views) scored at each evaluation


def build_module(family: str, dim: int, grid) -> tuple[FeatureAutoencoderModule, dict]:
    """The trainable encoder + feature decoder of ``family``, checked against the store's features."""
    names = fae_parts(family)
    encoder = create_model(names["encoder"])
    fdec = create_model(names["feature_decoder"])
    if encoder.in_dim != dim or fdec.out_dim != dim:
        raise UserError(f"config error: fae.model = {family!r} is invalid for this feature store: it expects "
                        f"{encoder.in_dim}-d features, the store holds {dim}-d ones; pick the family of the encoder")
    pos = fdec.learned_pos_grid
    if pos is not None and tuple(grid) != (pos, pos):
        raise UserError(f"config error: fae.model = {family!r} is invalid for this feature store: its feature "
                        f"decoder is built for a {pos}x{pos} token grid, the store has {grid[0]}x{grid[1]}")
    return FeatureAutoencoderModule(encoder, fdec, grid), {k: names[k] for k in ("encoder", "feature_decoder")}


def export(path: Path, weights: FeatureAutoencoderModule, names: dict, family: str, grid, dim: int, cfg: Config,
           source: dict, step: int, metrics: dict) -> None:
    payload = {
        "format": FAE_FORMAT, "family": family, "models": names,
        "encoder": weights.encoder.state_dict(), "feature_decoder": weights.feature_decoder.state_dict(),
        "grid": [int(grid[0]), int(grid[1])], "feature_dim": int(dim),
        "latent_channels": int(weights.encoder.latent_channels), "ema": cfg.fae.ema_decay > 0,
        "steps": int(step), "config": cfg.to_dict(), "source_features": source, "metrics": metrics,
    }
    if not save_unless_same_weights(payload, path, ("format", "family", "models", "encoder", "feature_decoder",
                                                     "grid", "feature_dim", "latent_channels", "steps",
                                                     "source_features")):
        print(f"{STAGE}: {path} already holds these weights: kept, so its fingerprint (and the latents, "
              "statistics and SiT checkpoints pinned to it) stay valid", file=sys.stderr)


def run(cfg: Config, resume: str | None = None) -> None:
    t0 = time.perf_counter()
    fc, run_dir = cfg.fae, Path(cfg.paths.fae_run)
    accelerator = make_accelerator(fc.precision, section="fae")
    device, rank = accelerator.device, accelerator.process_index
    group = open_feature_store(cfg.paths.features)
    grid = [int(g) for g in group.attrs[schema.A_GRID]]
    dim = int(group[schema.FEATURES].shape[-1])
    source = {"path": str(Path(cfg.paths.features).resolve()), "config_hash": group.attrs.get(schema.A_CONFIG_HASH)}
    split = feature_split(group, cfg.paths.index, cfg.paths.features)
    held = read_rows(group, schema.FEATURES, split.holdout_rows(EVAL_SAMPLES))

    torch.manual_seed(fc.seed)
    module, names = build_module(fc.model, dim, grid)
    module.to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=fc.lr, betas=(0.9, 0.999), weight_decay=fc.weight_decay)
    scheduler = make_scheduler(optimizer, fc.warmup, fc.steps, "cosine")
    ema = EMA(module, fc.ema_decay) if fc.ema_decay > 0 else None
    ck = start_or_resume(run_dir, resume, cfg, "fae", STAGE)
    start = 0
    if ck is not None:
        if ck["extra"]["models"] != names:
            raise UserError(f"--resume: the checkpoint holds {ck['extra']['models']}, fae.model = {fc.model!r} "
                            "builds other models; resume with the same fae.model")
        module.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None:
            if ck["ema"] is None:
                raise UserError("--resume: the checkpoint has no EMA weights but fae.ema_decay > 0; resume with 0")
            ema.load_state_dict(ck["ema"])
        start = int(ck["step"])
    model, optimizer = accelerator.prepare(module, optimizer)

    loader = make_loader(cfg.paths.features, [schema.FEATURES], per_process_batch(fc.batch_size, accelerator,
                         "fae.batch_size"), fc.seed, accelerator, split.train)
    main = accelerator.is_main_process
    log = StepLog(run_dir / "loss.csv", ["loss", "mse", "kl", "lr"], resume_step=start if ck else None,
                  tensorboard_dir=run_dir / "tensorboard") if main else None
    eval_log = StepLog(run_dir / "eval.csv", ["mse", "cosine", "mse_relative"],
                       resume_step=start if ck else None) if main else None

    def evaluate() -> dict:
        target = ema.model if ema is not None else accelerator.unwrap_model(model)
        return feature_metrics(target, held, device) if held.size else {}

    def checkpoint(step: int) -> None:
        save_training_state(run_dir, step, {
            "model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "config": cfg.to_dict(),
            "extra": {"models": names, "source_features": source}}, fc.keep_last,
            [accelerator.unwrap_model(model)] + ([ema.model] if ema else []), STAGE, accelerator)

    bar = progress_bar(fc.steps, start, STAGE, accelerator)
    batches = loader.batches_from(start)
    model.train()
    t_loop, metrics = time.perf_counter(), {}
    for step in range(start, fc.steps):
        _, batch = next(batches)
        x = torch.from_numpy(batch[schema.FEATURES]).to(device, torch.float32)
        with accelerator.autocast():
            x_hat, mean, logvar = model(x, step_generator(fc.seed, rank, step, device, "posterior"))
        loss, mse, kl = feature_loss(x_hat, x, DiagonalGaussian(mean, logvar), fc.beta)
        check_finite(loss, step + 1, STAGE, run_dir, accelerator)
        lr = scheduler.get_last_lr()[0]
        accelerator.backward(loss)
        if fc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), fc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        done = step + 1
        if main:
            log.log(done, loss=loss.item(), mse=mse.item(), kl=kl.item(), lr=lr)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        if done % fc.eval_every == 0 or done == fc.steps:
            metrics = evaluate()
            if main and metrics:
                eval_log.log(done, mse=metrics["mse"], cosine=metrics["cosine"], mse_relative=metrics["mse_relative"])
                bar.write(f"{STAGE}: step {done}: held-out mse {metrics['mse']:.4g}, cosine {metrics['cosine']:.4f}",
                          file=sys.stderr)
        if done % fc.checkpoint_every == 0 or done == fc.steps:
            checkpoint(done)
    bar.close()
    trained = fc.steps - start
    loop_s = time.perf_counter() - t_loop
    if not metrics:
        metrics = evaluate()
    if main:
        final = ema.model if ema is not None else accelerator.unwrap_model(model)
        wall = time.perf_counter() - t0
        summary = dict(metrics, steps=fc.steps, steps_this_run=trained, wall_seconds=wall,
                       steps_per_second=trained / loop_s if trained and loop_s > 0 else None)
        export(run_dir / FAE_FILE, final, names, fc.model, grid, dim, cfg, source, fc.steps, summary)
        write_metrics(Path(cfg.paths.metrics) / "fae.json", summary)
        log.close()
        eval_log.close()
        held_txt = (f"held-out cosine {metrics['cosine']:.4f}, mse {metrics['mse']:.4g} "
                    f"({metrics['eval_samples']} samples)" if metrics else "no held-out samples")
        print(f"{STAGE}: {fc.steps} steps ({trained} this run, "
              f"{trained / loop_s if loop_s > 0 else 0:.1f} steps/s), {held_txt}, {wall:.1f} s -> "
              f"{run_dir / FAE_FILE}", file=sys.stderr)
    accelerator.wait_for_everyone()
