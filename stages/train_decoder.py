"""``fae-pipe train-decoder``: the pixel decoder from cached features to the source pixels.

Stage 1 (``decoder.stage: 1``) trains on noisy real features
``x + sigma * rms(token) * eps``; stage 2 fine-tunes the stage-1 decoder
(``decoder_stage1.pt``) on the frozen FAE's reconstruction ``x_hat`` of the same
features. Targets are the source images of the same sample ids, same crop and
view (``fae_pipe.fae.pixels``). Loss and GAN schedule: ``fae_pipe.fae.decoder_objective``.
Checkpoint/resume/NaN/progress behave as in ``train-fae``. Artefacts in
``paths.decoder_run``: ``loss.csv``, ``eval.csv``, ``checkpoints/``, ``decoder.pt``
(+ ``decoder_stage<N>.pt``), ``recon_grid.png``; ``<paths.metrics>/decoder.json``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from fae_pipe.cache import schema
from fae_pipe.config import Config
from fae_pipe.data.index import read_index
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FeatureAutoencoder
from fae_pipe.fae.data import feature_split, open_feature_store
from fae_pipe.fae.decoder_eval import evaluate_decoder, load_eval_set
from fae_pipe.fae.decoder_objective import DecoderObjective
from fae_pipe.fae.export import (DECODER_FILE, DECODER_FORMAT, FAE_FILE, atomic_torch_save, load_decoder_file,
                                load_fae_file)
from fae_pipe.fae.loop import make_loader, per_process_batch, progress_bar, save_training_state, start_or_resume
from fae_pipe.fae.losses import noise_features
from fae_pipe.fae.pixels import PixelBatches, to_signed
from fae_pipe.metrics.image import build_lpips
from fae_pipe.models.registry import create_model, fae_parts
from fae_pipe.training.accel import make_accelerator, step_generator
from fae_pipe.training.checkpoint import file_fingerprint
from fae_pipe.training.ema import EMA
from fae_pipe.training.guard import check_finite
from fae_pipe.training.logs import StepLog, write_metrics
from fae_pipe.training.schedule import make_scheduler

STAGE = "train-decoder"
FIELDS = ["loss", "rec", "lpips", "gan", "d_weight", "d_loss", "lr"]


def build_decoder(cfg: Config, dim: int, grid, image_size: int):
    name = fae_parts(cfg.fae.model)["pixel_decoder"]
    pdec = create_model(name)
    if pdec.in_dim != dim or (pdec.grid_size, pdec.grid_size) != tuple(grid):
        raise UserError(f"config error: fae.model = {cfg.fae.model!r} is invalid for this feature store: its pixel "
                        f"decoder takes {pdec.grid_size}x{pdec.grid_size}x{pdec.in_dim} features, the store holds "
                        f"{grid[0]}x{grid[1]}x{dim}")
    if pdec.image_size != image_size:
        raise UserError(f"config error: fae.model = {cfg.fae.model!r} is invalid: its pixel decoder outputs "
                        f"{pdec.image_size} px, the features were extracted from {image_size} px crops")
    return name, pdec


def load_stage2_inputs(cfg: Config, run_dir: Path, source: dict, device):
    """Stage 2 needs the frozen FAE (fae.pt) and the stage-1 decoder to start from."""
    fae_path = Path(cfg.paths.fae_run) / FAE_FILE
    if not fae_path.is_file():
        raise UserError(f"decoder.stage = 2 fine-tunes on the FAE's reconstructions: {fae_path} not found; "
                        "run `fae-pipe train-fae` first")
    trained_on = load_fae_file(fae_path)["source_features"].get("config_hash")
    if trained_on != source["config_hash"]:
        raise UserError(f"{fae_path} was trained on another feature store (config_hash {str(trained_on)[:12]}) than "
                        f"paths.features (config_hash {str(source['config_hash'])[:12]}): retrain the FAE on it")
    fae = FeatureAutoencoder.load(fae_path, stats=False, device=device)
    stage1 = run_dir / "decoder_stage1.pt"
    if not stage1.is_file():
        raise UserError(f"decoder.stage = 2 fine-tunes the stage-1 decoder: {stage1} not found; "
                        "run `fae-pipe train-decoder --set decoder.stage=1` first")
    return fae, file_fingerprint(fae_path), load_decoder_file(stage1)


def through_fae(cfg: Config, source: dict, pdec, eval_set, lpips_model, device) -> dict:
    """Stage 1 only: the full FAE round trip features -> latent -> x_hat -> pixels, when fae.pt fits the store."""
    fae_path = Path(cfg.paths.fae_run) / FAE_FILE
    if not fae_path.is_file():
        return {}
    payload = load_fae_file(fae_path)
    if payload["source_features"].get("config_hash") != source["config_hash"]:
        print(f"{STAGE}: note: {fae_path} was trained on another feature store; no round-trip metrics",
              file=sys.stderr)
        return {}
    fae = FeatureAutoencoder.load(fae_path, stats=False, device=device)
    scores = evaluate_decoder(pdec, eval_set, lpips_model, device, fae)
    return {"psnr_through_fae": scores["psnr"], "lpips_through_fae": scores["lpips"]}


def run(cfg: Config, resume: str | None = None) -> None:
    t0 = time.perf_counter()
    dc, run_dir = cfg.decoder, Path(cfg.paths.decoder_run)
    accelerator = make_accelerator(dc.precision, section="decoder")
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    group = open_feature_store(cfg.paths.features)
    grid = [int(g) for g in group.attrs[schema.A_GRID]]
    dim = int(group[schema.FEATURES].shape[-1])
    image_size = int(group.attrs.get(schema.A_IMAGE_SIZE, cfg.data.image_size))
    view_names = list(group.attrs.get(schema.A_VIEWS, cfg.data.views))
    source = {"path": str(Path(cfg.paths.features).resolve()), "config_hash": group.attrs.get(schema.A_CONFIG_HASH)}
    index = read_index(cfg.paths.index)
    split = feature_split(group, cfg.paths.index, cfg.paths.features)

    torch.manual_seed(dc.seed)
    name, pdec = build_decoder(cfg, dim, grid, image_size)
    disc = create_model(dc.discriminator)
    fae = fae_fp = None
    if dc.stage == 2:
        fae, fae_fp, stage1 = load_stage2_inputs(cfg, run_dir, source, device)
        pdec.load_state_dict(stage1["state_dict"])
        disc.load_state_dict(stage1["discriminator"])
    pdec.to(device)
    disc.to(device)
    if dc.lpips_backbone == "random":
        print(f"{STAGE}: WARNING: LPIPS uses a RANDOM backbone (decoder.lpips_backbone: random): the perceptual "
              "loss and the LPIPS metric are meaningless; use vgg or alex with local weights for real runs",
              file=sys.stderr)
    lpips_model = build_lpips(dc.lpips_backbone, device)
    objective = DecoderObjective(dc, lpips_model)
    optimizer = torch.optim.AdamW(pdec.parameters(), lr=dc.lr, betas=(0.9, 0.999), weight_decay=dc.weight_decay)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=dc.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    scheduler = make_scheduler(optimizer, dc.warmup, dc.steps, "cosine")
    ema = EMA(pdec, dc.ema_decay) if dc.ema_decay > 0 else None
    if resume is None and dc.stage == 2 and (run_dir / "loss.csv").is_file():
        shutil.copyfile(run_dir / "loss.csv", run_dir / "loss_stage1.csv")
    ck = start_or_resume(run_dir, resume, cfg, "decoder", STAGE)
    start = 0
    if ck is not None:
        if ck["extra"]["model"] != name or ck["extra"]["stage"] != dc.stage:
            raise UserError(f"--resume: the checkpoint is stage {ck['extra']['stage']} of {ck['extra']['model']}; "
                            f"this run is stage {dc.stage} of {name}: resume with the same settings")
        pdec.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        disc.load_state_dict(ck["extra"]["discriminator"])
        d_optimizer.load_state_dict(ck["extra"]["disc_optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start = int(ck["step"])
    model, d_model, optimizer, d_optimizer = accelerator.prepare(pdec, disc, optimizer, d_optimizer)

    batch = per_process_batch(dc.batch_size, accelerator, "decoder.batch_size")
    loader = make_loader(cfg.paths.features, [schema.FEATURES], batch, dc.seed, accelerator, split.train)
    batches = PixelBatches(loader, loader.batches_from(start), index, image_size, view_names, split.sample_ids,
                           cfg.data.decode_workers)
    eval_set = load_eval_set(group, index, split, dc.eval_images, image_size, view_names)
    log = StepLog(run_dir / "loss.csv", FIELDS, resume_step=start if ck else None,
                  tensorboard_dir=run_dir / "tensorboard") if main else None
    eval_log = StepLog(run_dir / "eval.csv", ["psnr", "lpips", "baseline_psnr"],
                       resume_step=start if ck else None) if main else None

    def weights():
        return ema.model if ema is not None else accelerator.unwrap_model(model)

    def evaluate(grid_path=None) -> dict:
        return evaluate_decoder(weights(), eval_set, lpips_model, device, fae if dc.stage == 2 else None, grid_path)

    def checkpoint(step: int) -> None:
        save_training_state(run_dir, step, {
            "model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "config": cfg.to_dict(),
            "extra": {"model": name, "stage": dc.stage, "discriminator": accelerator.unwrap_model(d_model).state_dict(),
                      "disc_optimizer": d_optimizer.state_dict(), "source_features": source}},
            dc.keep_last, [accelerator.unwrap_model(model), accelerator.unwrap_model(d_model)], STAGE, accelerator)

    bar = progress_bar(dc.steps, start, STAGE, accelerator)
    model.train()
    d_model.train()
    head = accelerator.unwrap_model(model).head.weight
    t_loop, metrics = time.perf_counter(), {}
    for step in range(start, dc.steps):
        _, b = next(batches)
        x = torch.from_numpy(b[schema.FEATURES]).to(device, torch.float32)
        target = to_signed(b["pixels"]).to(device)
        with torch.no_grad():
            if dc.stage == 1:
                x_in = noise_features(x, dc.noise_sigma, step_generator(dc.seed, rank, step, device, "noise"))
            else:
                x_in = fae.decode(fae.encode(x, normalized=False), normalized=False)
        gan = objective.gan_active(step)
        with accelerator.autocast():
            pred = model(x_in)
            terms = objective.generator(pred, target, accelerator.unwrap_model(d_model), head, gan)
        check_finite(terms["loss"], step + 1, STAGE, run_dir, accelerator)
        lr = scheduler.get_last_lr()[0]
        accelerator.backward(terms["loss"])
        if dc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), dc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        d_loss = None
        if gan:
            with accelerator.autocast():
                d_loss = objective.discriminator(d_model, target, pred)
            check_finite(d_loss, step + 1, STAGE, run_dir, accelerator)
            accelerator.backward(d_loss)
            d_optimizer.step()
            d_optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        done = step + 1
        if main:
            val = {k: (v.item() if v is not None else None) for k, v in terms.items()}
            log.log(done, **val, d_loss=d_loss.item() if d_loss is not None else None, lr=lr)
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss'].item():.4g}", refresh=False)
        if done % dc.eval_every == 0 or done == dc.steps:
            metrics = evaluate(run_dir / "recon_grid.png" if main else None)
            if main:
                eval_log.log(done, psnr=metrics["psnr"], lpips=metrics["lpips"], baseline_psnr=metrics["baseline_psnr"])
                bar.write(f"{STAGE}: step {done}: held-out PSNR {metrics['psnr']:.2f} dB "
                          f"(mean-image baseline {metrics['baseline_psnr']:.2f}), LPIPS {metrics['lpips']:.4f}",
                          file=sys.stderr)
        if done % dc.checkpoint_every == 0 or done == dc.steps:
            checkpoint(done)
    bar.close()
    batches.close()
    trained, loop_s = dc.steps - start, time.perf_counter() - t_loop
    if not metrics:
        metrics = evaluate(run_dir / "recon_grid.png" if main else None)
    if main and dc.stage == 1:
        metrics.update(through_fae(cfg, source, weights(), eval_set, lpips_model, device))
    if main:
        wall = time.perf_counter() - t0
        summary = dict(metrics, stage=dc.stage, steps=dc.steps, steps_this_run=trained, wall_seconds=wall,
                       lpips_backbone=dc.lpips_backbone,
                       steps_per_second=trained / loop_s if trained and loop_s > 0 else None)
        payload = {"format": DECODER_FORMAT, "model": name, "state_dict": weights().state_dict(),
                   "discriminator": accelerator.unwrap_model(d_model).state_dict(), "stage": dc.stage,
                   "image_size": image_size, "grid": grid, "feature_dim": dim, "views": view_names,
                   "ema": ema is not None, "steps": dc.steps, "config": cfg.to_dict(), "source_features": source,
                   "fae_fingerprint": fae_fp, "metrics": summary}
        atomic_torch_save(payload, run_dir / f"decoder_stage{dc.stage}.pt")
        atomic_torch_save(payload, run_dir / DECODER_FILE)
        write_metrics(Path(cfg.paths.metrics) / "decoder.json", summary)
        log.close()
        eval_log.close()
        round_trip = (f"; through the FAE {metrics['psnr_through_fae']:.2f} dB" if "psnr_through_fae" in metrics
                      else "")
        print(f"{STAGE}: stage {dc.stage}, {dc.steps} steps ({trained} this run, "
              f"{trained / loop_s if loop_s > 0 else 0:.1f} steps/s), held-out PSNR {metrics['psnr']:.2f} dB vs "
              f"mean-image {metrics['baseline_psnr']:.2f} dB, LPIPS[{dc.lpips_backbone}] {metrics['lpips']:.4f} "
              f"({metrics['eval_images']} images){round_trip}, {wall:.1f} s -> {run_dir / DECODER_FILE}",
              file=sys.stderr)
    accelerator.wait_for_everyone()
