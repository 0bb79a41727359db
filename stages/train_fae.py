"""``fae-pipe train-fae``: FAE encoder + feature decoder from ``features.zarr`` alone.

Never opens an image and never builds DINOv2: batches of cached patch tokens
(one random view per sample) come from the whole-shard loader, the loss is
``L2(x_hat, x) + beta * KL`` (``fae_pipe.fae.objectives``). Resume, EMA, logs,
checkpoints and the non-finite guard are the shared ``fae_pipe.training.Trainer``.
Artefacts in ``paths.fae_run``: ``loss.csv``, ``eval.csv``, ``checkpoints/``, the export
``fae.safetensors``; held-out numbers in ``<paths.metrics>/fae.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fae_pipe.cache import schema
from fae_pipe.cache.location import StoreLocation
from fae_pipe.config import Config
from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FAE_FILE, FAE_FORMAT, FeatureAutoencoderModule, save_unless_same_weights
from fae_pipe.fae.data import feature_split, open_feature_store, read_rows
from fae_pipe.fae.evaluation import feature_metrics
from fae_pipe.fae.objectives import feature_loss
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, fae_families_for, fae_parts
from fae_pipe.training.trainer import Trainer

STAGE = "train-fae"
EVAL_SAMPLES = 256  # held-out samples (all views) scored at each evaluation


def build_module(family: str, dim: int, grid) -> tuple[FeatureAutoencoderModule, dict]:
    """The trainable encoder + feature decoder of ``family``, checked against the store's features."""
    names = fae_parts(family)
    encoder = create_model(names["encoder"])
    fdec = create_model(names["feature_decoder"])
    if encoder.in_dim != dim or fdec.out_dim != dim:
        raise UserError(f"config error: fae.model = {family!r} is invalid for this feature store: it expects "
                        f"{encoder.in_dim}-d features, the store holds {dim}-d ones; pick the family of the encoder: "
                        f"{', '.join(fae_families_for(dim)) or f'none is registered for {dim}-d (docs/encoders.md)'}")
    pos = fdec.learned_pos_grid
    if pos is not None and tuple(grid) != (pos, pos):
        raise UserError(f"config error: fae.model = {family!r} is invalid for this feature store: its feature "
                        f"decoder is built for a {pos}x{pos} token grid, the store has {grid[0]}x{grid[1]}")
    return FeatureAutoencoderModule(encoder, fdec, grid), {k: names[k] for k in ("encoder", "feature_decoder")}


def export(path: Path, weights: FeatureAutoencoderModule, names: dict, family: str, grid, dim: int, cfg: Config,
           source: dict, step: int, metrics: dict) -> None:
    groups = {"encoder": weights.encoder.state_dict(), "feature_decoder": weights.feature_decoder.state_dict()}
    meta = {
        "format": FAE_FORMAT, "family": family, "models": names,
        "grid": [int(grid[0]), int(grid[1])], "feature_dim": int(dim),
        "latent_channels": int(weights.encoder.latent_channels), "ema": cfg.fae.train.ema_decay > 0,
        "steps": int(step), "config": cfg.to_dict(), "source_features": source, "metrics": metrics,
    }
    if not save_unless_same_weights(path, groups, meta, ("format", "family", "models", "grid", "feature_dim",
                                                         "latent_channels", "steps", "source_features")):
        print(f"{STAGE}: {path} already holds these weights: kept, so its fingerprint (and the latents, "
              "statistics and SiT checkpoints pinned to it) stay valid", file=sys.stderr)


def run(cfg: Config, resume: str | None = None) -> dict:
    fc, t, run_dir = cfg.fae, cfg.fae.train, Path(cfg.paths.fae_run)
    run = Trainer(STAGE, cfg, "fae", run_dir, resume, log_fields=["loss", "mse", "kl"],
                  eval_fields=["mse", "cosine", "mse_relative"])

    # ---- data: cached patch tokens, one random view per sample -------------------------------------------
    group = open_feature_store(cfg.paths.features)
    grid = [int(g) for g in group.attrs[schema.A_GRID]]
    dim = int(group[schema.FEATURES].shape[-1])
    source = {"path": StoreLocation.of(cfg.paths.features).canonical(), "config_hash": group.attrs.get(schema.A_CONFIG_HASH)}
    split = feature_split(group, cfg.paths.index, cfg.paths.features)
    held = read_rows(group, schema.FEATURES, split.holdout_rows(EVAL_SAMPLES))
    loader = ShardedLoader(cfg.paths.features, [schema.FEATURES], run.micro_batch, t.seed, rank=run.rank,
                           world_size=run.world, memory_budget_bytes=run.memory_budget_bytes,
                           shuffle_buffer=t.shuffle_buffer, sample_mask=split.train, random_view=True)

    # ---- model -------------------------------------------------------------------------------------------
    torch.manual_seed(t.seed)
    module, names = build_module(fc.model, dim, grid)
    set_attention_backend(module, cfg.runtime.attention)
    model, _ = run.prepare({"model": module}, identity={"models": names, "source_features": source})

    def evaluate() -> dict:
        return feature_metrics(run.weights(), held, run.device) if held.size else {}

    # ---- loop --------------------------------------------------------------------------------------------
    batches = loader.batches_from(run.start)
    model.train()
    for step in run.steps(evaluate):
        _, batch = next(batches)
        x = torch.from_numpy(batch[schema.FEATURES]).to(run.device, torch.float32)
        with run.accelerator.autocast():
            x_hat, mean, logvar = model(x, run.generator(step, "posterior"))
        loss, mse, kl = feature_loss(x_hat, x, DiagonalGaussian(mean, logvar), fc.beta)
        run.backward(loss)
        run.update("model", loss)
        run.log(loss=loss, mse=mse, kl=kl)

    # ---- save --------------------------------------------------------------------------------------------
    def save(summary: dict) -> Path:
        export(run_dir / FAE_FILE, run.weights(), names, fc.model, grid, dim, cfg, source, t.steps, summary)
        return run_dir / FAE_FILE

    m = run.metrics
    held_txt = (f"held-out cosine {m['cosine']:.4f}, mse {m['mse']:.4g} ({m['eval_samples']} samples)" if m
                else "no held-out samples")
    return run.finish(save, note=held_txt)
