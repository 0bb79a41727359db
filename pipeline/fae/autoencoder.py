"""The trained FAE: its exported files, the trainable encoder + feature decoder pair, and the frozen
object behind ``encode()`` / ``decode()``.

Files: one safetensors file each (``fae_pipe.artifacts.save_export``), readable
with ``safetensors`` + ``json`` alone; every loader checks the ``format`` tag and
names the file in its error, and none unpickles:
- ``fae.safetensors``: tensors ``encoder/*`` and ``feature_decoder/*`` (EMA weights
  when enabled); metadata ``__metadata__["fae_pipe"]`` (JSON): format, registry names
  to rebuild them, the token grid, dims, the config and the fingerprint of the
  feature store they were trained on. Written by ``train-fae``.
- ``decoder.safetensors`` (decoder run directory): tensors ``state_dict/*`` (pixel
  decoder) and ``discriminator/*``; metadata as above. Written by ``train-decoder``.
``load_fae_file`` / ``load_decoder_file`` return the same dicts the pickled
``fae.pt`` / ``decoder.pt`` of earlier releases held (those convert once with
``fae-pipe convert-export``).
The latent statistics are not a file here: the latent store's attrs own them and
``sit.safetensors`` carries a copy (``fae_pipe.cache.latent_stats.LatentStats``).

``FeatureAutoencoderModule`` is the pair as one ``nn.Module`` for training (so
Accelerate/DDP wraps and syncs both in one forward); ``FeatureAutoencoder`` is
what every consumer of a trained FAE (``encode``, ``train-decoder`` phase 2,
``sample``, ``evaluate``, ``probe``) loads, in RAE's ``encode()``/``decode()``
shape: it hides the token/grid layouts (features ``(B, N, D)`` as cached in
``features.zarr``, latents ``(B, C, H, W)`` as stored in ``latents.zarr``, images
``(B, 3, H, W)`` in [0, 1]) and checks the parts belong together.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fae_pipe.artifacts import load_export, read_export, save_export
from fae_pipe.cache.latent_stats import LatentStats
from fae_pipe.errors import UserError
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.models.layers import set_attention_backend
from fae_pipe.models.registry import create_model

FAE_FORMAT = "fae-pipe/fae-v2"
DECODER_FORMAT = "fae-pipe/pixel-decoder-v2"
FAE_FILE = "fae.safetensors"
DECODER_FILE = "decoder.safetensors"
FAE_GROUPS = ("encoder", "feature_decoder")  # the tensor groups of fae.safetensors
DECODER_GROUPS = ("state_dict", "discriminator")  # ... and of decoder.safetensors


def decoder_stage_file(phase: int) -> str:
    """The per-phase copy of the pixel decoder export (phase 2 starts from phase 1's)."""
    return f"decoder_stage{int(phase)}.safetensors"


def split_payload(payload: dict, group_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """An export dict -> (tensor groups, JSON metadata): the inverse of ``{**meta, **groups}``."""
    groups = {k: payload.get(k) for k in group_keys if k in payload}
    return groups, {k: v for k, v in payload.items() if k not in group_keys}


def save_fae_file(path: str | Path, payload: dict) -> Path:
    """Write a ``fae.safetensors`` from the export dict (``format`` = ``FAE_FORMAT``)."""
    return save_export(path, *split_payload({**payload, "format": FAE_FORMAT}, FAE_GROUPS))


DECODER_IDENTITY = ("format", "model", "stage", "image_size", "grid", "feature_dim", "views", "ema", "steps",
                    "source_features", "fae_fingerprint")


def save_decoder_file(path: str | Path, payload: dict) -> Path:
    """Write a ``decoder.safetensors`` from the export dict (``format`` = ``DECODER_FORMAT``), unless
    ``path`` holds the same weights for the same identity (``save_unless_same_weights``: its sha256 stays)."""
    save_unless_same_weights(path, *split_payload({**payload, "format": DECODER_FORMAT}, DECODER_GROUPS),
                             DECODER_IDENTITY)
    return Path(path)


def save_unless_same_weights(path: str | Path, groups: dict, meta: dict, identity_keys: tuple[str, ...]) -> bool:
    """Write the export ``groups`` + ``meta`` unless ``path`` already holds the same; True when written.

    "The same": every tensor equal (dtype included) and ``meta`` equal on ``identity_keys``.
    Why: downstream artefacts pin an export by its sha256 (the latent store's config
    hash, its ``fae_fingerprint`` attr, every SiT export). A re-run that trains nothing,
    e.g. ``dvc repro`` after a code change resuming a finished run, must not give the
    same model a new fingerprint through run-specific fields such as wall time.
    """
    path = Path(path)
    if path.is_file():
        try:
            old_groups, old_meta = read_export(path)
        except Exception:  # noqa: BLE001 - unreadable (or an old pickle, never unpickled here): replace it
            old_groups, old_meta = None, None
        new_groups = {g: s for g, s in groups.items() if s is not None}
        if (old_groups is not None and _same(old_groups, new_groups)
                and all(_same(old_meta.get(k), _as_json(meta.get(k))) for k in identity_keys)):
            return False
    save_export(path, groups, meta)
    return True


def _as_json(value):
    """``value`` as it reads back from the export's JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    return a == b


def load_fae_file(path: str | Path) -> dict:
    """The ``fae.safetensors`` export as one dict (metadata + ``encoder`` / ``feature_decoder`` state dicts)."""
    groups, meta = load_export(path, FAE_FORMAT, "train-fae", what="FAE export")
    return {**meta, **{g: groups.get(g, {}) for g in FAE_GROUPS}}


def load_decoder_file(path: str | Path) -> dict:
    """The ``decoder.safetensors`` export as one dict (metadata + ``state_dict`` / ``discriminator``)."""
    groups, meta = load_export(path, DECODER_FORMAT, "train-decoder", what="pixel decoder export")
    return {**meta, **{g: groups[g] for g in DECODER_GROUPS if g in groups}}


class FeatureAutoencoderModule(nn.Module):
    """features (B, N, D) -> (x_hat, mean, logvar); ``sample`` draws z from q(z|x), else z = mean.

    State dict keys are ``encoder.*`` and ``feature_decoder.*``: the export splits
    them back into the two registry models.
    """

    def __init__(self, encoder: nn.Module, feature_decoder: nn.Module, grid):
        super().__init__()
        self.encoder, self.feature_decoder = encoder, feature_decoder
        self.grid = (int(grid[0]), int(grid[1]))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        mean, logvar = self.encoder(x, self.grid)
        z = DiagonalGaussian(mean, logvar).sample(generator) if sample else mean
        return self.feature_decoder(z, self.grid), mean, logvar


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
    """Frozen FAE encoder + feature decoder (+ pixel decoder) + the latent statistics of its store.

    Two spaces, two pairs of calls, no flag:
    - ``encode`` / ``decode``: the unit-scale latents generators are trained on and
      sample, ``(z - mean_c) / std_c`` with ``stats`` (a ``LatentStats``: from the
      latent store's attrs, or the copy ``sit.safetensors`` carries);
    - ``encode_raw`` / ``decode_raw`` / ``reconstruct``: raw posterior means, what
      ``latents.zarr`` stores; no statistics needed.

    Args:
        encoder, feature_decoder: the trained FAE parts.
        grid: (H, W) token grid of the features.
        pixel_decoder: optional, needed for ``output="pixels"``.
        stats: ``LatentStats`` or None (then only the raw calls work).
    """

    def __init__(self, encoder, feature_decoder, grid, pixel_decoder=None, stats: LatentStats | None = None):
        self.encoder, self.feature_decoder, self.pixel_decoder = encoder, feature_decoder, pixel_decoder
        self.grid = (int(grid[0]), int(grid[1]))
        self.device = next(encoder.parameters()).device
        self.stats = stats
        if stats is not None and stats.channels != encoder.latent_channels:
            raise UserError(f"latent statistics have {stats.channels} channels, the FAE encoder "
                            f"{encoder.latent_channels}: use the latent store this FAE wrote")

    @classmethod
    def load(cls, fae_path: str | Path, decoder_path: str | Path | None = None, stats: LatentStats | None = None,
             device: torch.device | str = "cpu", attention: str = "sdpa") -> FeatureAutoencoder:
        """Load ``fae.safetensors`` (+ ``decoder.safetensors``); ``stats`` enables the normalised calls."""
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
        set_attention_backend([m for m in (enc, fdec, pdec) if m is not None], attention)
        return cls(enc, fdec, payload["grid"], pdec, stats)

    @property
    def latent_channels(self) -> int:
        return self.encoder.latent_channels

    def _stats(self) -> LatentStats:
        if self.stats is None:
            raise UserError("latent statistics are not loaded: pass the latent store's LatentStats "
                            "(FeatureAutoencoder.load(..., stats=...)) or use encode_raw/decode_raw")
        return self.stats

    @torch.no_grad()
    def posterior(self, features: torch.Tensor) -> DiagonalGaussian:
        """q(z | features) over tokens: mean/std are (B, N, C)."""
        return self.encoder.posterior(features.to(self.device, torch.float32), self.grid)

    @torch.no_grad()
    def encode_raw(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, D) -> raw posterior-mean latents (B, C, H, W), as ``latents.zarr`` stores them."""
        return tokens_to_grid(self.posterior(features).mean, self.grid)

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor, output: str = "features") -> torch.Tensor:
        """Raw latents (B, C, H, W) -> features (B, N, D), or images (B, 3, H, W) in [0, 1] with output="pixels"."""
        if output not in ("features", "pixels"):
            raise UserError(f"decode output: {output!r} is not valid; valid: 'features', 'pixels'")
        feats = self.feature_decoder(grid_to_tokens(latents.to(self.device, torch.float32)), self.grid)
        return feats if output == "features" else self.features_to_pixels(feats)

    def reconstruct(self, features: torch.Tensor, output: str = "features") -> torch.Tensor:
        """Features -> posterior mean -> rebuilt features (or pixels): the FAE round trip."""
        return self.decode_raw(self.encode_raw(features), output)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, D) -> unit-scale latents (B, C, H, W), the generators' space."""
        return self._stats().normalize(self.encode_raw(features))

    def decode(self, latents: torch.Tensor, output: str = "features") -> torch.Tensor:
        """Unit-scale latents (B, C, H, W) -> features (B, N, D) or images in [0, 1] (output="pixels")."""
        return self.decode_raw(self._stats().denormalize(latents.to(self.device)), output)

    @torch.no_grad()
    def features_to_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, D) -> images (B, 3, H, W) in [0, 1] through the pixel decoder."""
        if self.pixel_decoder is None:
            raise UserError("no pixel decoder loaded: pass the decoder.safetensors written by `fae-pipe train-decoder`")
        return pixels_to_unit(self.pixel_decoder(features.to(self.device, torch.float32)))


class FeaturePixelDecoder:
    """Normalised encoder features (B, C, H, W) -> images: the decode path of a generator trained on raw features (RAE).

    No FAE in between: the generator's outputs are the encoder's own patch tokens in the
    feature store's normalisation (``stats``), and the phase-1 pixel decoder, trained on
    noisy real features, is RAE's decoder. Same ``decode(x, output="pixels")`` call as
    ``FeatureAutoencoder`` so samplers need not know which space they sample in.
    """

    def __init__(self, pixel_decoder, grid, stats: LatentStats):
        self.pixel_decoder, self.grid, self.stats = pixel_decoder, tuple(int(g) for g in grid), stats
        self.device = next(pixel_decoder.parameters()).device

    @classmethod
    def load(cls, decoder_path: str | Path, stats: LatentStats, device: torch.device | str = "cpu",
             attention: str = "sdpa") -> FeaturePixelDecoder:
        dec = load_decoder_file(decoder_path)
        pdec = build_frozen(dec["model"], dec["state_dict"], device)
        set_attention_backend([pdec], attention)
        return cls(pdec, (pdec.grid_size, pdec.grid_size), stats)

    @property
    def latent_channels(self) -> int:
        return int(self.pixel_decoder.in_dim)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, output: str = "pixels") -> torch.Tensor:
        if output not in ("features", "pixels"):
            raise UserError(f"decode output: {output!r} is not valid; valid: 'features', 'pixels'")
        feats = grid_to_tokens(self.stats.denormalize(x.to(self.device, torch.float32)))
        if output == "features":
            return feats
        return pixels_to_unit(self.pixel_decoder(feats))


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (unclamped) -> images in [0, 1]."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 0.5).clamp(0.0, 1.0)
