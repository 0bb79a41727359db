"""``fae-pipe train-t2i``: a text-conditioned MMDiT trained on the cached latents and caption embeddings only.

The text-to-image generator on the same cache and the same training setup as
``train-sit``: the latents through ``LatentBatches`` (the store's exact normalisation),
the captions from ``text.zarr`` aligned by sample id (``fae_pipe.data.text_batches``:
one caption per row and epoch, a pure function of seed, epoch and sample id), the
transport of ``cfg.t2i`` (``TransportSettings``: time distribution and shift as SiT's),
and the shared ``Trainer`` (Accelerate, EMA, exact resume, the non-finite guard, stop
signals, multi-process launch). Neither the image encoder nor the text encoder is
imported: this file is the step body, with caption dropout against the store's empty
caption for classifier-free guidance.

Artefacts (rank 0): ``<run>/loss.csv``, ``<run>/checkpoints/``, ``<run>/t2i.safetensors``
(``fae_pipe.training.t2i_export``: weights, latent statistics, the text encoder record and
the empty caption, everything prompting needs), ``<metrics>/t2i.json``; every rank writes
``<run>/ranks/rank-<r>.json``. No quality curve during training (no ``eval_samples``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.data.text_batches import TextBatches
from fae_pipe.errors import UserError
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model, model_kwargs, require_kind
from fae_pipe.training.t2i_export import T2I_FILE, save_t2i_export
from fae_pipe.training.trainer import Trainer, adamw, cpu_state
from fae_pipe.transport import TransportSettings


def run(cfg, resume: str | None = None) -> dict:
    """Train (or resume) the MMDiT configured by ``cfg.t2i`` / ``cfg.paths``; returns the summary metrics."""
    s, t = cfg.t2i, cfg.t2i.train
    require_kind(s.model, "text_generator", "t2i.model", "text-to-image generator")
    run = Trainer("train-t2i", cfg, "t2i", cfg.paths.t2i_run, resume,
                  log_fields=["loss", "grad_norm", "epoch", "samples_per_s"])

    # ---- data: normalised latents + one cached caption embedding per row, this process's share ------------
    data = TextBatches(cfg.paths.latents, cfg.paths.text, *run.loader_args())
    info, text = data.info, data.text
    c, h, w = info.shape
    if h != w:
        raise UserError(f"{info.path}: the latent grid is {h}x{w}; the MMDiT needs a square grid")

    # ---- model -------------------------------------------------------------------------------------------------
    kwargs = model_kwargs(s.model, in_channels=c, input_size=h, patch_size=s.patch_size, text_dim=text.dim,
                          pooled_dim=text.pooled_dim)
    torch.manual_seed(t.seed)
    net = set_attention_backend(create_model(s.model, **kwargs), cfg.runtime.attention)
    identity = {"model_name": s.model, "model_kwargs": kwargs, "latent_stats": info.stats.to_dict(),
                "text_encoder": text.encoder, "text_store": text.config_hash}
    (model, _) = run.prepare({"model": net}, {"model": adamw(net.parameters(), t.lr, t.weight_decay)},
                             identity=identity)
    transport = TransportSettings.of(s, c * h * w)
    if run.main:
        enc = text.encoder
        print(f"train-t2i: {s.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params) on {c}x{h}x{w} "
              f"latents from {info.path} ({'in RAM' if data.loader.in_ram else 'streaming'}), captions from "
              f"{text.path} ({enc.get('model_type', '?')} {text.max_length}x{text.dim}"
              f"{', pooled' if text.has_pooled else ''}{', RANDOM encoder' if enc.get('random') else ''}); "
              f"caption dropout {s.caption_dropout}; time shift {transport.shift_mode} (a = {transport.shift:.3g}); "
              f"world size {run.world}, global batch {t.batch_size} = {run.world} x {t.grad_accum} x "
              f"{run.micro_batch}; steps {run.start}->{t.steps}", flush=True)

    def velocity(x, tt, cond):
        return model(x, tt, *cond)

    # ---- loop --------------------------------------------------------------------------------------------
    model.train()
    batches = data.from_step(run.start * t.grad_accum, run.device)
    for step in run.steps():
        total = torch.zeros((), device=run.device)
        for a in range(t.grad_accum):
            epoch, x, tokens, mask, pooled = next(batches)
            gen = run.generator(step, f"micro{a}")
            drop = torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device) < s.caption_dropout
            cond = text.drop(drop, tokens, mask, pooled)
            with run.accelerator.accumulate(model):
                loss = transport.loss(velocity, x, cond, gen).loss
                run.backward(loss)
            total += loss.detach()
        loss = total / t.grad_accum
        grad_norm = run.update("model", loss)
        run.log(loss=loss, grad_norm=grad_norm if t.grad_clip > 0 else None, epoch=epoch)

    # ---- save --------------------------------------------------------------------------------------------
    def export(summary: dict) -> Path:
        path = Path(cfg.paths.t2i_run) / T2I_FILE
        raw = run.accelerator.unwrap_model(model)
        empty = {"tokens": torch.from_numpy(text.empty_tokens)}
        if text.empty_pooled is not None:
            empty["pooled"] = torch.from_numpy(text.empty_pooled)
        save_t2i_export(path, model_name=s.model, model_kwargs=kwargs, state_dict=cpu_state(raw),
                        ema_state_dict=None if run.ema is None else cpu_state(run.ema.model),
                        latent_stats=info.stats.to_dict(), fae_fingerprint=info.fae_fingerprint,
                        latent_source=info.source, latent_shape=list(info.shape),
                        transport=transport.record(), text=text.record(), empty_caption=empty,
                        config=cfg.to_dict(), step=t.steps)
        return path

    return run.finish(export)
