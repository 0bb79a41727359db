"""``fae-pipe train-decoder``: the pixel decoder from cached features to the source pixels.

Phase 1 (``decoder.phase: 1``) trains on noisy real features
``x + sigma * rms(token) * eps``; phase 2 fine-tunes the phase-1 decoder
(``decoder_stage1.safetensors``) on the frozen FAE's
reconstruction ``x_hat`` of the same features. Targets are the source images of the same sample ids, same crop and
view (``fae_pipe.fae.data``). Loss and GAN schedule: ``fae_pipe.fae.objectives``.
Resume, EMA, logs, checkpoints and the non-finite guard are the shared
``fae_pipe.training.Trainer``. Artefacts in
``paths.decoder_run``: ``loss.csv``, ``eval.csv``, ``checkpoints/``, ``decoder.safetensors``
(+ ``decoder_stage<N>.safetensors``), ``recon_grid.png``; ``<paths.metrics>/decoder.json``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from fae_pipe.artifacts import file_fingerprint
from fae_pipe.cache import schema
from fae_pipe.cache.location import StoreLocation
from fae_pipe.config import Config
from fae_pipe.data.index import read_index
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import (
    DECODER_FILE,
    FAE_FILE,
    FeatureAutoencoder,
    decoder_stage_file,
    load_decoder_file,
    load_fae_file,
    save_decoder_file,
)
from fae_pipe.fae.data import PixelBatches, feature_split, open_feature_store, to_signed
from fae_pipe.fae.evaluation import evaluate_decoder, load_eval_set
from fae_pipe.fae.objectives import DecoderObjective, noise_features
from fae_pipe.metrics.image import build_lpips
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, fae_families_for, fae_parts
from fae_pipe.training.trainer import Trainer, adamw

STAGE = "train-decoder"
FIELDS = ["loss", "rec", "lpips", "gan", "d_weight", "d_loss"]


def build_decoder(cfg: Config, dim: int, grid, image_size: int):
    name = fae_parts(cfg.fae.model)["pixel_decoder"]
    pdec = create_model(name)
    if pdec.in_dim != dim or (pdec.grid_size, pdec.grid_size) != tuple(grid):
        raise UserError(f"config error: fae.model = {cfg.fae.model!r} is invalid for this feature store: its pixel "
                        f"decoder takes {pdec.grid_size}x{pdec.grid_size}x{pdec.in_dim} features, the store holds "
                        f"{grid[0]}x{grid[1]}x{dim} (families for {dim}-d: "
                        f"{', '.join(fae_families_for(dim)) or 'none registered'})")
    if pdec.image_size != image_size:
        raise UserError(f"config error: fae.model = {cfg.fae.model!r} is invalid: its pixel decoder outputs "
                        f"{pdec.image_size} px, the features were extracted from {image_size} px crops")
    return name, pdec


def load_stage2_inputs(cfg: Config, run_dir: Path, source: dict, device):
    """Stage 2 needs the frozen FAE (fae.safetensors) and the stage-1 decoder to start from."""
    fae_path = Path(cfg.paths.fae_run) / FAE_FILE
    if not fae_path.is_file():
        raise UserError(f"decoder.phase = 2 fine-tunes on the FAE's reconstructions: {fae_path} not found; "
                        "run `fae-pipe train-fae` first")
    trained_on = load_fae_file(fae_path)["source_features"].get("config_hash")
    if trained_on != source["config_hash"]:
        raise UserError(f"{fae_path} was trained on another feature store (config_hash {str(trained_on)[:12]}) than "
                        f"paths.features (config_hash {str(source['config_hash'])[:12]}): retrain the FAE on it")
    fae = FeatureAutoencoder.load(fae_path, device=device, attention=cfg.runtime.attention)
    stage1 = run_dir / decoder_stage_file(1)
    if not stage1.is_file():
        raise UserError(f"decoder.phase = 2 fine-tunes the stage-1 decoder: {stage1} not found; "
                        "run `fae-pipe train-decoder --set decoder.phase=1` first")
    return fae, file_fingerprint(fae_path), load_decoder_file(stage1)


def through_fae(cfg: Config, source: dict, pdec, eval_set, lpips_model, device) -> dict:
    """Stage 1 only: the full FAE round trip features -> latent -> x_hat -> pixels, when the FAE export fits the store."""
    fae_path = Path(cfg.paths.fae_run) / FAE_FILE
    if not fae_path.is_file():
        return {}
    payload = load_fae_file(fae_path)
    if payload["source_features"].get("config_hash") != source["config_hash"]:
        print(f"{STAGE}: note: {fae_path} was trained on another feature store; no round-trip metrics",
              file=sys.stderr)
        return {}
    fae = FeatureAutoencoder.load(fae_path, device=device, attention=cfg.runtime.attention)
    scores = evaluate_decoder(pdec, eval_set, lpips_model, device, fae)
    return {"psnr_through_fae": scores["psnr"], "lpips_through_fae": scores["lpips"]}


def run(cfg: Config, resume: str | None = None) -> dict:
    dc, t, run_dir = cfg.decoder, cfg.decoder.train, Path(cfg.paths.decoder_run)
    if resume is None and dc.phase == 2 and (run_dir / "loss.csv").is_file():
        shutil.copyfile(run_dir / "loss.csv", run_dir / "loss_stage1.csv")  # phase 2 starts a new loss.csv
    run = Trainer(STAGE, cfg, "decoder", run_dir, resume, log_fields=FIELDS,
                  eval_fields=["psnr", "lpips", "baseline_psnr"])
    device = run.device

    # ---- data: cached features + the source pixels of the same samples, crops and views ------------------
    group = open_feature_store(cfg.paths.features)
    grid = [int(g) for g in group.attrs[schema.A_GRID]]
    dim = int(group[schema.FEATURES].shape[-1])
    image_size = int(group.attrs.get(schema.A_IMAGE_SIZE, cfg.data.image_size))
    view_names = list(group.attrs.get(schema.A_VIEWS, cfg.data.views))
    source = {"path": StoreLocation.of(cfg.paths.features).canonical(), "config_hash": group.attrs.get(schema.A_CONFIG_HASH)}
    index = read_index(cfg.paths.index)
    split = feature_split(group, cfg.paths.index, cfg.paths.features)
    loader = ShardedLoader(cfg.paths.features, [schema.FEATURES], run.micro_batch, t.seed, rank=run.rank,
                           world_size=run.world, memory_budget_bytes=run.memory_budget_bytes,
                           shuffle_buffer=t.shuffle_buffer, sample_mask=split.train, random_view=True)
    eval_set = load_eval_set(group, index, split, dc.eval_images, image_size, view_names)

    # ---- models: pixel decoder + discriminator (phase 2: from phase 1, with the frozen FAE) --------------
    torch.manual_seed(t.seed)
    name, pdec = build_decoder(cfg, dim, grid, image_size)
    disc = create_model(dc.discriminator)
    fae = fae_fp = None
    if dc.phase == 2:
        fae, fae_fp, stage1 = load_stage2_inputs(cfg, run_dir, source, device)
        pdec.load_state_dict(stage1["state_dict"])
        disc.load_state_dict(stage1["discriminator"])
    set_attention_backend(pdec, cfg.runtime.attention)
    if dc.lpips_backbone == "random":
        print(f"{STAGE}: WARNING: LPIPS uses a RANDOM backbone (decoder.lpips_backbone: random): the perceptual "
              "loss and the LPIPS metric are meaningless; use vgg or alex with local weights for real runs",
              file=sys.stderr)
    lpips_model = build_lpips(dc.lpips_backbone, device)
    objective = DecoderObjective(dc, lpips_model)
    model, d_model, _, _ = run.prepare(
        {"model": pdec, "discriminator": disc},
        {"model": adamw(pdec.parameters(), t.lr, t.weight_decay),
         "discriminator": adamw(disc.parameters(), dc.disc_lr, 0.0, betas=(0.5, 0.9))},
        identity={"model": name, "phase": dc.phase, "source_features": source})
    batches = PixelBatches(loader, loader.batches_from(run.start), index, image_size, view_names, split.sample_ids,
                           cfg.data.decode_workers)

    def evaluate() -> dict:
        grid_png = run_dir / "recon_grid.png" if run.main else None
        return evaluate_decoder(run.weights(), eval_set, lpips_model, device, fae, grid_png)

    # ---- loop: decoder update, then (from gan_start) the discriminator on the same pair -------------------
    model.train()
    d_model.train()
    head = run.accelerator.unwrap_model(model).head.weight
    for step in run.steps(evaluate):
        _, b = next(batches)
        x = torch.from_numpy(b[schema.FEATURES]).to(device, torch.float32)
        target = to_signed(b["pixels"]).to(device)
        with torch.no_grad():
            if dc.phase == 1:
                x_in = noise_features(x, dc.noise_sigma, run.generator(step, "noise"), dc.noise_schedule)
            else:
                x_in = fae.reconstruct(x)
        gan = objective.gan_active(step)
        with run.accelerator.autocast():
            pred = model(x_in)
            terms = objective.generator(pred, target, run.accelerator.unwrap_model(d_model), head, gan)
        run.backward(terms["loss"])
        run.update("model", terms["loss"])
        d_loss = None
        if gan:
            with run.accelerator.autocast():
                d_loss = objective.discriminator(d_model, target, pred)
            run.backward(d_loss)
            run.update("discriminator", d_loss, clip=0.0)
        run.log(**terms, d_loss=d_loss)
    batches.close()

    # ---- save --------------------------------------------------------------------------------------------
    if run.main and dc.phase == 1:
        run.metrics.update(through_fae(cfg, source, run.weights(), eval_set, lpips_model, device))

    def save(summary: dict) -> Path:
        summary.update(stage=dc.phase, lpips_backbone=dc.lpips_backbone)
        payload = {"model": name, "state_dict": run.weights().state_dict(),
                   "discriminator": run.weights("discriminator").state_dict(), "stage": dc.phase,
                   "image_size": image_size, "grid": grid, "feature_dim": dim, "views": view_names,
                   "ema": run.ema is not None, "steps": t.steps, "config": cfg.to_dict(), "source_features": source,
                   "fae_fingerprint": fae_fp, "metrics": summary}
        save_decoder_file(run_dir / decoder_stage_file(dc.phase), payload)
        save_decoder_file(run_dir / DECODER_FILE, payload)
        return run_dir / DECODER_FILE

    m = run.metrics
    round_trip = f"; through the FAE {m['psnr_through_fae']:.2f} dB" if "psnr_through_fae" in m else ""
    note = (f"phase {dc.phase}, held-out PSNR {m['psnr']:.2f} dB vs mean-image {m['baseline_psnr']:.2f} dB, "
            f"LPIPS[{dc.lpips_backbone}] {m['lpips']:.4f} ({m['eval_images']} images){round_trip}")
    return run.finish(save, note=note)
