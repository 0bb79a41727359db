"""The trained FAE behind two calls: ``encode(features)`` and ``decode(latents)``.

Every consumer of a trained FAE (``encode``, ``train-decoder`` stage 2, ``sample``,
``evaluate``, ``probe``) needs the same four things: the frozen encoder, the
frozen feature decoder, optionally the pixel decoder, and the latent statistics
that turn raw posterior means into the unit-scale latents the generator is
trained on. This object loads them from the exported files (never from the
latent store), checks they belong together, and hides the token/grid layouts:

- features are tokens ``(B, N, D)`` as cached in ``features.zarr``;
- latents are grids ``(B, C, H, W)`` as stored in ``latents.zarr``;
- images are ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.errors import UserError
from fae_pipe.fae.export import load_decoder_file, load_fae_file, load_latent_stats
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.models.registry import create_model


def tokens_to_grid(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) grid (row-major tokens)."""
    h, w = int(grid[0]), int(grid[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def grid_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) grid -> (B, H*W, C) tokens."""
    return z.flatten(2).transpose(1, 2)


def build_frozen(name: str, state: dict, device) -> torch.nn.Module:
    """Registry model ``name`` with ``state`` loaded, in eval mode, without gradients."""
    model = create_model(name)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


class FeatureAutoencoder:
    """Frozen FAE encoder + feature decoder (+ pixel decoder) + latent statistics.

    Args:
        encoder, feature_decoder: the trained FAE parts.
        grid: (H, W) token grid of the features.
        pixel_decoder: optional, needed for ``decode(..., output="pixels")``.
        channel_mean, channel_std: per-channel latent statistics (C,); None means
            ``encode``/``decode`` work on raw posterior means only (``normalized=False``).
    """

    def __init__(self, encoder, feature_decoder, grid, pixel_decoder=None, channel_mean=None, channel_std=None):
        self.encoder, self.feature_decoder, self.pixel_decoder = encoder, feature_decoder, pixel_decoder
        self.grid = (int(grid[0]), int(grid[1]))
        self.device = next(encoder.parameters()).device
        self.mean = self.std = None
        if channel_mean is not None:
            self.mean = torch.as_tensor(channel_mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.as_tensor(channel_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @classmethod
    def load(cls, fae_path: str | Path, decoder_path: str | Path | None = None, stats: bool = True,
             device: torch.device | str = "cpu") -> FeatureAutoencoder:
        """Load ``fae.pt`` (+ ``decoder.pt``) and, with ``stats``, the ``latent_stats.json`` beside it."""
        payload = load_fae_file(fae_path)
        enc = build_frozen(payload["models"]["encoder"], payload["encoder"], device)
        fdec = build_frozen(payload["models"]["feature_decoder"], payload["feature_decoder"], device)
        pdec = None
        if decoder_path is not None:
            dec = load_decoder_file(decoder_path)
            pdec = build_frozen(dec["model"], dec["state_dict"], device)
            if pdec.in_dim != fdec.out_dim:
                raise UserError(f"{decoder_path} decodes {pdec.in_dim}-d features but {fae_path} "
                                f"rebuilds {fdec.out_dim}-d ones: train the pixel decoder on the same feature store")
        mean = std = None
        if stats:
            s = load_latent_stats(fae_path)
            mean, std = s["channel_mean"], s["channel_std"]
            if len(mean) != enc.latent_channels:
                raise UserError(f"latent statistics beside {fae_path} have {len(mean)} channels, "
                                f"the encoder {enc.latent_channels}: re-run `fae-pipe encode --overwrite`")
        return cls(enc, fdec, payload["grid"], pdec, mean, std)

    @property
    def latent_channels(self) -> int:
        return self.encoder.latent_channels

    def _check_stats(self, normalized: bool) -> None:
        if normalized and self.mean is None:
            raise UserError("latent statistics are not loaded: run `fae-pipe encode` first, or use normalized=False")

    @torch.no_grad()
    def posterior(self, features: torch.Tensor) -> DiagonalGaussian:
        """q(z | features) over tokens: mean/std are (B, N, C)."""
        return self.encoder.posterior(features.to(self.device, torch.float32), self.grid)

    @torch.no_grad()
    def encode(self, features: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Features (B, N, D) -> posterior-mean latents (B, C, H, W), standardised per channel by default."""
        self._check_stats(normalized)
        z = tokens_to_grid(self.posterior(features).mean, self.grid)
        return (z - self.mean) / self.std if normalized else z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "features", normalized: bool = True) -> torch.Tensor:
        """Latents (B, C, H, W) -> features (B, N, D), or images (B, 3, H, W) in [0, 1] with output="pixels"."""
        if output not in ("features", "pixels"):
            raise UserError(f"decode output: {output!r} is not valid; valid: 'features', 'pixels'")
        self._check_stats(normalized)
        z = latents.to(self.device, torch.float32)
        if normalized:
            z = z * self.std + self.mean
        feats = self.feature_decoder(grid_to_tokens(z), self.grid)
        if output == "features":
            return feats
        return self.features_to_pixels(feats)

    @torch.no_grad()
    def features_to_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, D) -> images (B, 3, H, W) in [0, 1] through the pixel decoder."""
        if self.pixel_decoder is None:
            raise UserError("no pixel decoder loaded: pass the decoder.pt written by `fae-pipe train-decoder`")
        return pixels_to_unit(self.pixel_decoder(features.to(self.device, torch.float32)))


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (unclamped) -> images in [0, 1]."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 0.5).clamp(0.0, 1.0)
