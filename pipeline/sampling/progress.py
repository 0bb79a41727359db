"""Generation quality against training steps: the metrics of ``fae-pipe evaluate`` on the model being trained.

Why inside the training run: FAE's claim is about how fast a generator learns, which
a single number at the end cannot show. Every ``<section>.train.eval_every`` steps
the generator (its EMA when there is one) draws ``eval_samples`` images from the
**same** noise and labels each time (``sample.seed``, classes round-robin as in
``fae-pipe sample``), so consecutive points differ only by the weights. The images are
decoded to pixels and scored by ``GenerationScorer``, the code of ``fae-pipe evaluate``
(FD-DINOv2, precision/recall/density/coverage against the feature store's cached cls
tokens). The frozen encoder runs here on *generated* images only, for measurement:
the training step itself still reads nothing but the cache.

Sampling uses ``sample.method`` and ``sample.guidance`` at ``<section>.eval_sampler_steps``
steps (fewer than a final evaluation: the curve is for comparing runs and steps, its
absolute level is not the final FID). Every process generates its share of the
samples (the round-robin batches of ``fae_pipe.sampling.plan``) and the encoder
features are gathered, so the cost per evaluation falls with the number of processes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fae_pipe.sampling.plan import balanced_labels, batch_generator, process_batches, resolve_classes, sample_noise
from fae_pipe.transport import as_schedule, sample


def pixel_decoder_for(cfg, info, device):
    """Normalised generator outputs -> uint8 images: FAE latents through the FAE export the latents were
    encoded with and the pixel decoder; raw features (RAE) through the pixel decoder alone; VAE latents
    through the VAE the store records (``info.source``)."""
    from fae_pipe.artifacts import export_fingerprints
    from fae_pipe.cache import schema
    from fae_pipe.errors import UserError
    from fae_pipe.fae.autoencoder import FeatureAutoencoder, FeaturePixelDecoder
    from fae_pipe.sampling.generator import default_paths, to_uint8

    _, fae_path, decoder_path = default_paths(cfg.paths)
    if info.kind == schema.KIND_FEATURES:
        decoder = FeaturePixelDecoder.load(decoder_path, info.stats, device, cfg.runtime.attention)
    elif (info.source or {}).get("kind") == schema.SOURCE_SDVAE:
        from fae_pipe.models.vae import VaeLatentDecoder

        decoder = VaeLatentDecoder.from_source(info.source, info.stats, info.shape[1:], device, info.path)
    else:
        if info.fae_fingerprint is not None and info.fae_fingerprint not in export_fingerprints(fae_path):
            raise UserError(f"{info.path} was encoded by another FAE than {fae_path}: the quality curve would "
                            "decode with the wrong feature decoder; re-run encode or set sit.eval_samples=0")
        decoder = FeatureAutoencoder.load(fae_path, decoder_path, stats=info.stats, device=device,
                                          attention=cfg.runtime.attention)
    return lambda x: to_uint8(decoder.decode(x, output="pixels"))


class QualityProbe:
    """``probe(model) -> dict`` of generation metrics for the fixed noise and labels.

    Args:
        cfg: the run's config (``sample``, ``evaluate``, ``image_encoder``, ``paths.features`` are read).
        decode: normalised generator outputs (B, C, H, W) -> uint8 images (B, H, W, 3).
        shape: (C, H, W) of the generator's space; num_classes / null_class: its labels.
        shift: the training shift factor (the sampler's time grid uses the same one).
        num_samples, steps: images per evaluation and sampler steps.
        rank, world, gather: this process, the process count and an all-gather of a
            tensor (Accelerate's ``gather``), so every process scores the same union.
        draw: ``draw(model, noise, labels) -> outputs`` for a generator that is not sampled by
            ``fae_pipe.transport`` (the flow); shift and steps are then unused.
    """

    def __init__(self, cfg, decode, shape, num_classes: int, null_class: int, shift: float, num_samples: int,
                 steps: int, device, rank: int = 0, world: int = 1, gather=None, draw=None):
        from fae_pipe.fae.data import open_feature_store
        from fae_pipe.sampling.reference import GenerationScorer

        group = open_feature_store(cfg.paths.features)
        self.scorer = GenerationScorer(cfg, group, cfg.paths.features, device)
        self.decode, self.shape, self.null_class, self.shift = decode, tuple(shape), null_class, shift
        self.method, self.guidance, self.seed = cfg.sample.method, as_schedule(cfg.sample.guidance), cfg.sample.seed
        self.steps, self.device, self.world, self.gather, self.draw = steps, device, world, gather, draw
        classes = resolve_classes(cfg.sample.classes, num_classes, group.attrs.get("classes"))
        self.labels = balanced_labels(classes, num_samples)
        self.batch_size, self.num_samples = cfg.sample.batch_size, num_samples
        self.batches = process_batches(num_samples, self.batch_size, rank, world)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        feats = []
        for batch in self.batches:
            noise = sample_noise(self.seed, batch, self.shape).to(self.device)
            y = torch.as_tensor(self.labels[batch.start:batch.stop], device=self.device)
            gen = batch_generator(self.seed, batch) if self.method == "sde" else None
            x = self.draw(model, noise, y) if self.draw is not None else sample(
                model, noise, y, method=self.method, steps=self.steps, shift=self.shift, guidance=self.guidance,
                null_class=self.null_class, generator=gen)
            feats.append(self.scorer.features(self.decode(x)))
        model.train(was_training)
        mine = np.concatenate(feats) if feats else np.zeros((0, self.scorer.width), np.float32)
        ordered = self._all(mine)
        out = self.scorer.score(ordered)
        out.update(eval_samples=int(len(ordered)), eval_seconds=round(time.perf_counter() - t0, 3))
        return out

    def _all(self, mine: np.ndarray) -> np.ndarray:
        """Every process's features in process order (padded to one length for the all-gather, then trimmed)."""
        if self.world == 1 or self.gather is None:
            return mine
        shares = [sum(len(b) for b in process_batches(self.num_samples, self.batch_size, r, self.world))
                  for r in range(self.world)]
        pad = np.zeros((max(shares), mine.shape[1]), np.float32)
        pad[:len(mine)] = mine
        rows = self.gather(torch.from_numpy(pad).to(self.device)).cpu().numpy().reshape(self.world, max(shares), -1)
        return np.concatenate([rows[r, :shares[r]] for r in range(self.world)])
