"""``fae-pipe train-flow``: a TARFlow/STARFlow normalizing flow trained on the cached latents, under Accelerate.

The second generator family on the same cache (the paper: FAE latents serve a diffusion
transformer and a flow alike). It stands on exactly what ``train-sit`` stands on: the
latent store through ``LatentBatches`` (the store's exact per-channel normalisation), the
shared ``Trainer`` (Accelerate, EMA, exact resume, the non-finite guard, stop signals,
multi-process launch) and the quality probe. This file is the step body: the
noise-augmented exact NLL of ``fae_pipe.flow`` with label dropout for guidance.

Artefacts (rank 0): ``<run>/loss.csv`` (loss = NLL in nats/dim, and bits_per_dim),
``<run>/eval.csv`` (quality curve with ``flow.eval_samples``), ``<run>/checkpoints/``,
``<run>/flow.safetensors`` (the export ``fae-pipe sample`` reads with ``generator: flow``),
``<metrics>/flow.json``; every rank writes ``<run>/ranks/rank-<r>.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.data.latents import LatentBatches
from fae_pipe.flow import bits_per_dim, configured, sample, training_loss
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, model_kwargs, require_kind
from fae_pipe.errors import UserError
from fae_pipe.training.flow_export import FLOW_FILE, save_flow_export
from fae_pipe.training.trainer import Trainer, adamw, cpu_state

EVAL_FIELDS = ["fd_dinov2", "precision", "recall", "density", "coverage", "eval_samples", "eval_seconds",
               "train_seconds"]
BETAS = (0.9, 0.95)  # TARFlow's AdamW betas


def run(cfg, resume: str | None = None) -> dict:
    """Train (or resume) the flow configured by ``cfg.flow`` / ``cfg.paths``; returns the summary metrics."""
    f, t = cfg.flow, cfg.flow.train
    require_kind(f.model, "flow", "flow.model", "flow")
    run = Trainer("train-flow", cfg, "flow", cfg.paths.flow_run, resume,
                  log_fields=["loss", "bits_per_dim", "grad_norm", "epoch", "samples_per_s"],
                  eval_fields=EVAL_FIELDS if f.eval_samples else None)

    # ---- data: the normalised latents, this process's share -----------------------------------------------
    data = LatentBatches(cfg.paths.latents, *run.loader_args())
    info = data.info
    c, h, w = info.shape
    if h != w:
        raise UserError(f"{info.path}: the latent grid is {h}x{w}; the flow needs a square grid")

    # ---- model -------------------------------------------------------------------------------------------------
    kwargs = model_kwargs(f.model, in_channels=c, input_size=h, patch_size=f.patch_size,
                          num_classes=info.num_classes)
    torch.manual_seed(t.seed)
    net = set_attention_backend(create_model(f.model, **kwargs), cfg.runtime.attention)
    identity = {"model_name": f.model, "model_kwargs": kwargs, "noise_sigma": f.noise_sigma,
                "latent_stats": info.stats.to_dict()}
    (model, _) = run.prepare({"model": net}, {"model": adamw(net.parameters(), t.lr, t.weight_decay, BETAS)},
                             identity=identity)
    if run.main:
        depths = [len(b.layers) for b in net.blocks]
        print(f"train-flow: {f.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, blocks of "
              f"{' '.join(map(str, depths))} layers, {net.num_tokens} tokens of {net.token_dim}) on {c}x{h}x{w} "
              f"latents from {info.path} ({'in RAM' if data.loader.in_ram else 'streaming'}); noise sigma "
              f"{f.noise_sigma}; world size {run.world}, global batch {t.batch_size} = {run.world} x "
              f"{t.grad_accum} x {run.micro_batch}; steps {run.start}->{t.steps}", flush=True)

    # ---- quality against steps (only when asked: it builds the decoders and the metric encoder) ----------
    evaluate = None
    if f.eval_samples:
        from fae_pipe.sampling.progress import QualityProbe, pixel_decoder_for

        guidance, tweedie = configured(f.guidance, f.guidance_schedule, f.guidance_mode), f.denoise == "tweedie"

        def draw(m, noise, y):
            return sample(m, noise, y, guidance, info.num_classes, f.noise_sigma, tweedie)

        probe = QualityProbe(cfg, pixel_decoder_for(cfg, info, run.device), info.shape, info.num_classes,
                             info.num_classes, 1.0, f.eval_samples, 1, run.device, run.rank, run.world,
                             run.accelerator.gather, draw=draw)

        def evaluate() -> dict:
            return probe(run.weights())

    # ---- loop --------------------------------------------------------------------------------------------
    model.train()
    batches = data.from_step(run.start * t.grad_accum, run.device)
    for step in run.steps(evaluate):
        total = torch.zeros((), device=run.device)
        for a in range(t.grad_accum):
            epoch, x, y = next(batches)
            gen = run.generator(step, f"micro{a}")
            drop = torch.rand(y.shape[0], generator=gen, device=gen.device).to(y.device) < f.label_dropout
            y = torch.where(drop, torch.full_like(y, info.num_classes), y)
            with run.accelerator.accumulate(model):
                with run.accelerator.autocast():
                    loss = training_loss(model, x, y, f.noise_sigma, generator=gen).loss
                run.backward(loss)
            total += loss.detach()
        loss = total / t.grad_accum
        grad_norm = run.update("model", loss)
        run.log(loss=loss, bits_per_dim=bits_per_dim(loss), grad_norm=grad_norm if t.grad_clip > 0 else None,
                epoch=epoch)

    # ---- save --------------------------------------------------------------------------------------------
    def export(summary: dict) -> Path:
        path = Path(cfg.paths.flow_run) / FLOW_FILE
        raw = run.accelerator.unwrap_model(model)
        if "final_loss" in summary:  # the loss is the NLL in nats per dimension
            summary["final_bits_per_dim"] = bits_per_dim(summary["final_loss"])
        save_flow_export(path, model_name=f.model, model_kwargs=kwargs, state_dict=cpu_state(raw),
                         ema_state_dict=None if run.ema is None else cpu_state(run.ema.model),
                         latent_stats=info.stats.to_dict(), fae_fingerprint=info.fae_fingerprint,
                         latent_source=info.source,
                         num_classes=info.num_classes, latent_shape=list(info.shape),
                         flow={"noise_sigma": f.noise_sigma, "null_class": info.num_classes,
                               "final_bits_per_dim": summary.get("final_bits_per_dim")},
                         config=cfg.to_dict(), step=t.steps)
        return path

    return run.finish(export)
