"""``fae-pipe train-sit``: SiT trained on the cached latents only, under Accelerate.

Why it is built this way: the point of the cache is that the diffusion loop never
runs an image encoder, so this stage reads ``latents.zarr`` (through
``fae_pipe.data.latents``) and nothing else from the data side, and imports no
encoder or decoder code. Resume, EMA, checkpoints, logging and the non-finite
guard are the shared ``fae_pipe.training.Trainer``; this file is the step body.

With ``sit.eval_samples`` > 0 it also draws images every ``sit.train.eval_every`` steps
and scores them (``fae_pipe.sampling.progress``): only then are the decoders and the
metric encoder imported, and they see generated images only.

Artefacts (rank 0): ``<run>/loss.csv``, ``<run>/eval.csv`` (quality curve), ``<run>/checkpoints/``, ``<run>/sit.safetensors``
(the export for sampling), ``<metrics>/sit.json``; every rank writes
``<run>/ranks/rank-<r>.json`` (world size, samples seen, parameter checksum).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.cache import schema
from fae_pipe.data.latents import LatentBatches
from fae_pipe.errors import UserError
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, model_kwargs
from fae_pipe.training.sit_export import SIT_FILE, save_sit_export
from fae_pipe.training.trainer import Trainer, adamw, cpu_state
from fae_pipe.models.repa import align_targets, default_repa_depth, repa_loss
from fae_pipe.transport import TransportSettings

EVAL_FIELDS = ["fd_dinov2", "precision", "recall", "density", "coverage", "eval_samples", "eval_seconds",
               "train_seconds"]


def generator_data(cfg, run):
    """The batches the generator learns from: FAE latents or raw encoder features (RAE), with REPA targets if asked."""
    s = cfg.sit
    repa = cfg.paths.features if s.repa_weight > 0 else None
    args = run.loader_args()
    if s.input == "features":
        from fae_pipe.data.features import FeatureBatches

        if s.posterior == "sample":
            raise UserError("config error: sit.posterior = sample is invalid with sit.input = features: encoder "
                            "features have no posterior; use sit.posterior=mean")
        return FeatureBatches(cfg.paths.features, *args, per_position=s.feature_norm == "position",
                              repa_features=repa)
    return LatentBatches(cfg.paths.latents, *args, repa_features=repa, posterior_sample=s.posterior == "sample")


def run(cfg, resume: str | None = None) -> dict:
    """Train (or resume) SiT as configured by ``cfg.sit`` / ``cfg.paths``; returns the summary metrics."""
    s, t = cfg.sit, cfg.sit.train
    repa = s.repa_weight > 0
    run = Trainer("train-sit", cfg, "sit", cfg.paths.sit_run, resume,
                  log_fields=["loss", *(["repa"] if repa else []), "grad_norm", "epoch", "samples_per_s"],
                  eval_fields=EVAL_FIELDS if s.eval_samples else None)

    # ---- data: normalised latents or features, this process's share --------------------------------------
    data = generator_data(cfg, run)
    info = data.info
    c, h, w = info.shape
    if h != w:
        raise UserError(f"{info.path}: the generator's input grid is {h}x{w}; SiT needs a square grid")

    # ---- model (+ REPA projector) ----------------------------------------------------------------------------
    kwargs = model_kwargs(s.model, in_channels=c, input_size=h, patch_size=s.patch_size,
                          num_classes=info.num_classes)
    torch.manual_seed(t.seed)
    net = create_model(s.model, **kwargs)
    set_attention_backend(net, cfg.runtime.attention)
    models, identity = {"model": net}, {"model_name": s.model, "model_kwargs": kwargs, "input": s.input,
                                        "latent_stats": info.stats.to_dict()}
    if s.posterior == "sample":  # only then, so checkpoints of runs on posterior means resume as before
        identity["posterior"] = s.posterior
    if repa:
        depth = s.repa_depth or default_repa_depth(net.depth)
        if not 1 <= depth <= net.depth:
            raise UserError(f"config error: sit.repa_depth = {s.repa_depth} is invalid: expected 1..{net.depth} "
                            f"(the blocks of {s.model}) or 0 for the default")
        target_dim = int(schema.open_feature_store(cfg.paths.features)[schema.FEATURES].shape[-1])
        models["projector"] = create_model(s.repa_projector, width=kwargs["width"], target_dim=target_dim)
        identity["repa"] = {"projector": s.repa_projector, "depth": depth, "target_dim": target_dim}
    optimizers = {name: adamw(m.parameters(), t.lr, t.weight_decay) for name, m in models.items()}
    prepared = run.prepare(models, optimizers, identity=identity)
    model, projector = prepared[0], (prepared[1] if repa else None)
    transport = TransportSettings.of(s, c * h * w, s.input)
    shift = transport.shift
    if run.main:
        extra = f", REPA lambda {s.repa_weight} at block {depth}/{net.depth}" if repa else ""
        print(f"train-sit: {s.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params) on "
              f"{c}x{h}x{w} {s.input} from {info.path} ({'in RAM' if data.loader.in_ram else 'streaming'}"
              f"{', a fresh posterior sample per epoch' if s.posterior == 'sample' else ''}); "
              f"time shift {transport.shift_mode} (a = {shift:.3g}){extra}; world size {run.world}, global batch "
              f"{t.batch_size} = {run.world} x {t.grad_accum} x {run.micro_batch}; steps {run.start}->{t.steps}",
              flush=True)

    # ---- quality against steps (only when asked: it builds the decoders and the metric encoder) ----------
    evaluate = None
    if s.eval_samples:
        from fae_pipe.sampling.progress import QualityProbe, pixel_decoder_for

        probe = QualityProbe(cfg, pixel_decoder_for(cfg, info, run.device), info.shape, info.num_classes,
                             info.num_classes, shift, s.eval_samples, s.eval_sampler_steps, run.device, run.rank,
                             run.world, run.accelerator.gather)

        def evaluate() -> dict:
            return probe(run.weights())

    # ---- loop --------------------------------------------------------------------------------------------
    model.train()
    batches = (data.from_step_with_repa if repa else data.from_step)(run.start * t.grad_accum, run.device)
    for step in run.steps(evaluate):
        total = torch.zeros((), device=run.device)
        aligned = torch.zeros((), device=run.device)
        for a in range(t.grad_accum):
            epoch, x, y, *targets = next(batches)
            gen = run.generator(step, f"micro{a}")
            drop = torch.rand(y.shape[0], generator=gen, device=gen.device).to(y.device) < s.label_dropout
            y = torch.where(drop, torch.full_like(y, info.num_classes), y)
            with run.accelerator.accumulate(*prepared[:len(models)]):
                out = transport.loss(model, x, y, gen, hidden_at=depth if repa else None)
                loss = out.loss
                if repa:
                    with run.accelerator.autocast():
                        projected = projector(out.hidden)
                    align = repa_loss(projected, align_targets(targets[0], net.grid, data.repa.grid))
                    loss = loss + s.repa_weight * align
                    aligned += align.detach()
                run.backward(loss)
            total += loss.detach()
        loss = total / t.grad_accum
        grad_norm = run.update("model", loss)
        if repa:
            run.update("projector", loss)
        run.log(loss=loss, repa=aligned / t.grad_accum if repa else None,
                grad_norm=grad_norm if t.grad_clip > 0 else None, epoch=epoch)

    # ---- save --------------------------------------------------------------------------------------------
    def export(summary: dict) -> Path:
        path = Path(cfg.paths.sit_run) / SIT_FILE
        raw = run.accelerator.unwrap_model(model)
        save_sit_export(path, model_name=s.model, model_kwargs=kwargs, state_dict=cpu_state(raw),
                        ema_state_dict=None if run.ema is None else cpu_state(run.ema.model),
                        latent_stats=info.stats.to_dict(), fae_fingerprint=info.fae_fingerprint,
                        latent_source=info.source, posterior=s.posterior,
                        num_classes=info.num_classes, latent_shape=list(info.shape),
                        transport=transport.record(null_class=info.num_classes),
                        config=cfg.to_dict(), step=t.steps)
        return path

    return run.finish(export)
