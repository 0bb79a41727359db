"""Class labels -> uint8 images: the trained SiT, the latent statistics it was trained with, the FAE decoders.

Why one object: a sample is only right when four files agree. ``sit.safetensors`` holds the
network and the per-channel statistics of the latents it learned; ``fae.safetensors`` holds
the feature decoder that turns de-normalised latents back into encoder features;
``decoder.safetensors`` turns features into pixels. ``ImageGenerator.load`` checks that the
SiT was trained on latents of this very FAE export (sha256 recorded by ``encode``
and carried through ``train-sit``; an export made by ``convert-export`` also answers
to the sha256 of the pickled file it came from) and that the shapes fit, and refuses otherwise,
so a retrained FAE can never silently decode an old SiT's latents.

Path of one batch: noise (t = 1) -> sampler (``fae_pipe.transport.sample``, shift
from the SiT export, guidance schedule from the config) -> normalised latents ->
``z * std + mean`` with the export's statistics -> feature decoder -> pixel decoder
-> [0, 1] -> uint8 (N, H, W, 3). A SiT trained on a VAE latent store (its export's
``latent_source`` says so, copied from the store) decodes through that VAE instead
(``fae_pipe.models.vae.VaeLatentDecoder``, rebuilt from the record and fingerprint-checked);
the FAE files are then not read.

A ``t2i.safetensors`` (train-t2i) loads the same way; its "labels" are prompt numbers:
``set_prompts`` embeds the prompts once with the text encoder the export records
(fingerprint-checked), and ``latents`` integrates the MMDiT with guidance against the
export's empty caption (``fae_pipe.sampling.text.sample_text``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from fae_pipe.artifacts import export_fingerprints, file_fingerprint
from fae_pipe.cache.schema import SOURCE_SDVAE
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import DECODER_FILE, FAE_FILE, FeatureAutoencoder, FeaturePixelDecoder
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.sampling.plan import batch_generator, sample_noise
from fae_pipe.training.flow_export import FLOW_FILE, generator_family, load_flow_export
from fae_pipe.training.sit_export import SIT_FILE, build_sit_from_export, load_sit_export
from fae_pipe.training.t2i_export import T2I_FILE, load_t2i_export
from fae_pipe.transport import as_schedule, sample


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> uint8 (N, H, W, 3), rounded to the nearest level."""
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def check_fae_match(export: dict, sit_path, fae_path) -> None:
    """Refuse a SiT whose latents came from another FAE export (one-line error)."""
    expected = export.get("fae_fingerprint")
    actual = file_fingerprint(fae_path)
    if expected is None:
        print(f"sample: warning: {sit_path} records no FAE fingerprint; cannot check it matches {fae_path}",
              file=sys.stderr)
        return
    if expected not in export_fingerprints(fae_path):
        raise UserError(f"{sit_path} was trained on latents of another FAE ({expected[:19]}...) than {fae_path} "
                        f"({actual[:19]}...): point paths.fae_run at that FAE or re-run encode + train-sit")


class ImageGenerator:
    """Trained SiT + FAE decoders on one device; ``generate(indices, labels, seed)`` -> uint8 images.

    Args:
        sit: the SiT network (eval mode), called as ``sit(x, t, y)``.
        fae: ``FeatureAutoencoder`` with a pixel decoder.
        latent_shape: (C, H, W); num_classes: real classes (the null class is ``num_classes``).
        shift: the sampling-grid shift factor (the one used in training).
    """

    def __init__(self, sit, fae: FeatureAutoencoder, latent_shape, num_classes: int, shift: float, null_class: int,
                 device, latent_source: dict | None = None, family: str = "sit", flow_sigma: float = 0.0):
        self.sit, self.fae, self.device = sit, fae, torch.device(device)
        # family "flow": ``sit`` is a normalizing flow (fae_pipe.flow); flow_sigma is its Tweedie step's sigma
        self.family, self.flow_sigma = family, float(flow_sigma)
        self.latent_source = latent_source  # the export's record of what made the latents (None: not recorded)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_classes, self.shift, self.null_class = int(num_classes), float(shift), int(null_class)
        self.export: dict | None = None  # family "t2i": the export (text encoder record, empty caption)
        self.prompts = None  # family "t2i": the embedded prompts (``set_prompts``)

    @classmethod
    def load(cls, sit_path, fae_path, decoder_path, use_ema: bool = True,
             device: torch.device | str = "cpu", attention: str = "sdpa", flow_denoise: bool = True) -> "ImageGenerator":
        """Load and cross-check ``sit.safetensors``, ``fae.safetensors`` and ``decoder.safetensors``.

        ``sit_path`` may also be a ``flow.safetensors`` (train-flow): the generator family is read
        from the file, and ``flow_denoise`` then says whether the Tweedie step follows inversion.
        ``attention`` is the attention kernel of every model ("sdpa" or "xformers", the
        ``runtime.attention`` setting; see ``fae_pipe.models.layers.attention``).
        """
        family = generator_family(sit_path)
        export = {"sit": load_sit_export, "flow": load_flow_export, "t2i": load_t2i_export}[family](sit_path)
        transport = export.get("transport") or {}
        raw_features = transport.get("generator_input") == "features"  # RAE: no FAE between SiT and pixels
        latent_source = export.get("latent_source")
        vae_latents = (latent_source or {}).get("kind") == SOURCE_SDVAE  # decoded by the VAE that wrote them
        if not raw_features and not vae_latents:
            check_fae_match(export, sit_path, fae_path)
        if use_ema and export.get("ema_state_dict") is None:
            print(f"sample: note: {sit_path} has no EMA weights (sit.train.ema_decay = 0); using the raw weights",
                  file=sys.stderr)
        stats = LatentStats.from_dict(export.get("latent_stats"), str(sit_path))
        shape = tuple(int(v) for v in export["latent_shape"])
        if vae_latents:
            from fae_pipe.models.vae import VaeLatentDecoder

            fae = VaeLatentDecoder.from_source(latent_source, stats, shape[1:], device, str(sit_path))
            source = latent_source["vae"]["weights"]
        elif raw_features:
            fae = FeaturePixelDecoder.load(decoder_path, stats, device, attention)
            source = decoder_path
        else:
            fae = FeatureAutoencoder.load(fae_path, decoder_path, stats=stats, device=device, attention=attention)
            source = fae_path
        if (fae.latent_channels, *fae.grid) != shape:
            raise UserError(f"{sit_path} makes {shape[0]}x{shape[1]}x{shape[2]} outputs but {source} decodes "
                            f"{fae.latent_channels}x{fae.grid[0]}x{fae.grid[1]}: use the decoders the SiT was "
                            "trained for")
        sit = set_attention_backend(build_sit_from_export(export, use_ema=use_ema).to(device), attention)
        num_classes = int(export.get("num_classes") or 0)
        flow = export.get("flow") or {}
        gen = cls(sit, fae, shape, num_classes, float(transport.get("shift_factor", 1.0)),
                  int(transport.get("null_class", flow.get("null_class", num_classes))), device, latent_source,
                  family, float(flow.get("noise_sigma", 0.0)) if flow_denoise else 0.0)
        gen.export = export if family == "t2i" else None
        return gen

    def set_prompts(self, prompts: list[str], text_device: str = "auto") -> None:
        """Embed ``prompts`` with the export's text encoder, at the precision the captions were embedded
        with (its record); ``latents`` labels then number them."""
        from fae_pipe.sampling.text import embed_prompts, prompt_encoder

        if self.family != "t2i":
            raise UserError("prompts are for a text-to-image export (t2i.safetensors); this generator is "
                            f"class-conditional ({self.family}): use sample.classes")
        encoder = prompt_encoder(self.export, text_device, self.export["text"]["encoder"].get("precision", "fp32"))
        if encoder.random:
            print("sample: NOTE the text encoder has RANDOM weights (the offline demo's tiny T5)", file=sys.stderr)
        self.prompts = embed_prompts(encoder, prompts, self.device)
        self.num_classes = len(prompts)

    def latents(self, labels, noise: torch.Tensor, method: str = "euler", steps: int = 250, guidance=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents (B, C, H, W) from ``noise`` for class ``labels`` (B,)."""
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UserError(f"class labels must lie in [0, {self.num_classes}); got {int(y.min())}..{int(y.max())}")
        if self.family == "t2i":  # labels number the prompts of ``set_prompts``
            from fae_pipe.sampling.text import empty_condition, sample_text

            if self.prompts is None:
                raise UserError("a text-to-image generator samples prompts: call set_prompts first")
            return sample_text(self.sit, noise.to(self.device), self.prompts.rows(y), empty_condition(self.export),
                               method, steps, self.shift, guidance, generator)
        if self.family == "flow":  # guidance: a fae_pipe.flow.FlowGuidance or None; method and steps unused
            from fae_pipe.flow import sample as flow_sample

            return flow_sample(self.sit, noise.to(self.device), y, guidance, self.null_class, self.flow_sigma)
        return sample(self.sit, noise.to(self.device), y, method=method, steps=steps, shift=self.shift,
                      guidance=as_schedule(guidance), null_class=self.null_class, generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 images (B, H, W, 3) through the feature and pixel decoders."""
        return to_uint8(self.fae.decode(latents, output="pixels"))

    def generate(self, batch: range, labels, seed: int, method: str = "euler", steps: int = 250,
                 guidance=None) -> np.ndarray:
        """uint8 images for the global sample indices ``batch`` (a range) with their ``labels``."""
        noise = sample_noise(seed, batch, self.latent_shape)
        gen = batch_generator(seed, batch) if method == "sde" else None
        return self.decode(self.latents(labels, noise, method, steps, guidance, gen))


def default_paths(paths, generator: str = "sit") -> tuple[Path, Path, Path]:
    """The generator export (``sit.safetensors``; ``flow.safetensors`` for ``generator`` "flow",
    ``t2i.safetensors`` for "t2i"), ``fae.safetensors`` and ``decoder.safetensors`` in the run directories."""
    export = {"flow": Path(paths.flow_run) / FLOW_FILE, "t2i": Path(paths.t2i_run) / T2I_FILE}.get(
        generator, Path(paths.sit_run) / SIT_FILE)
    return export, Path(paths.fae_run) / FAE_FILE, Path(paths.decoder_run) / DECODER_FILE
