"""The pretrained VAE latent source (``encode.source = sdvae``): diffusers ``AutoencoderKL``, frozen.

Why diffusers and not our own module: SD-VAE checkpoints (stabilityai/sd-vae-ft-ema, -mse) are
published as diffusers directories and every SD-VAE generator (SiT, REPA, LightningDiT) uses
this implementation, so the latents are the ecosystem's bit for bit. Weights come from a local
directory (``AutoencoderKL.from_pretrained(dir)``, nothing is downloaded) or, for tests and
demos only, ``random``: the SD-VAE architecture initialised from a fixed seed, recorded loudly.

Whatever made a store is recorded in it (``Vae.record``, the latent store's
``latent_source.vae``): the weights' path and a fingerprint of the loaded network (sha256 of
its config and every tensor, so a file format change does not matter but any weight does),
the architecture, its downsampling factor, precision, the input range and the VAE's own
``scaling_factor`` (recorded for reference only: generators normalise with the store's exact
per-channel statistics, ``fae_pipe.cache.latent_stats``). ``sample`` and ``evaluate`` rebuild
the decoder from that record alone (``Vae.from_record``) and refuse a network whose fingerprint
differs, so latents are never decoded by a VAE other than the one that wrote them.

On CPU the VAE runs with oneDNN (mkldnn) convolutions off: with them, the stored bits
change with the torch thread count (1 vs 2 threads differ in the last float16 bit of ~0.2% of
the values), so an in-process run (all cores) and ``--workers 2`` (one core each) would not
agree and a resume on another machine shape would mix bits; PyTorch's own convolutions
give the same bits for any thread count, at ~3.5x the CPU time (SD-VAE, 64 px, one core:
2.05 s vs 0.58 s per 4 images, measured on the shared 2-core machine). GPUs are unaffected.

Pixels: the VAE sees the ADM crop itself (``fae_pipe.data.transforms``, no resize), uint8
mapped to [-1, 1]; the decoder's output is mapped back to [0, 1].
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fae_pipe.errors import UserError

RANDOM = "random"
RANDOM_SEED = 0  # the one seed of `random` weights: the same network in every process and run
# the architecture of stabilityai/sd-vae-ft-ema (its config.json): 8x downsampling, 4 latent channels
SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weights_fingerprint(model) -> str:
    """``sha256:<hex>`` of the network's config and every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256(json.dumps(_arch(model), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _arch(model) -> dict:
    """The JSON-able architecture keys of an AutoencoderKL config (enough to rebuild it)."""
    cfg = dict(model.config)
    keys = ("in_channels", "out_channels", "latent_channels", "act_fn", "layers_per_block", "norm_num_groups",
            "sample_size", "scaling_factor", "block_out_channels", "down_block_types", "up_block_types",
            "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
            "mid_block_add_attention")
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if k in cfg}


def _load(weights: str):
    """The AutoencoderKL of ``weights`` (a local diffusers directory or ``random``), fp32, eval, frozen."""
    from diffusers import AutoencoderKL

    if weights == RANDOM:
        torch.manual_seed(RANDOM_SEED)
        model = AutoencoderKL(**SD_VAE_CONFIG)
    else:
        path = Path(weights)
        if not weights or not (path / "config.json").is_file():
            raise UserError(f"vae.weights = {weights!r} is invalid: expected a local diffusers AutoencoderKL "
                            "directory (config.json + diffusion_pytorch_model.safetensors, as save_pretrained "
                            "writes it, e.g. a download of stabilityai/sd-vae-ft-ema) or 'random' (tests/demo)")
        try:
            model = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad directory
            raise UserError(f"vae.weights = {weights}: not a loadable AutoencoderKL directory: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model.eval().requires_grad_(False)


class Vae:
    """A frozen AutoencoderKL on one device with what it is (``record``): encode to posterior moments, decode."""

    def __init__(self, model, record: dict, device, precision: str):
        self.model, self.record, self.precision = model, record, precision
        self.device, self.dtype = torch.device(device), DTYPES[precision]

    @classmethod
    def build(cls, weights: str, device="cpu", precision: str = "fp32", announce: bool = True) -> Vae:
        model = _load(weights)
        random_weights = weights == RANDOM
        if random_weights and announce:
            print("WARNING: the VAE has RANDOM weights (vae.weights=random): its latents and decodes are "
                  "meaningless except for tests and the offline demo", file=sys.stderr)
        arch = _arch(model)
        record = {"name": "AutoencoderKL", "weights": RANDOM if random_weights else str(Path(weights).resolve()),
                  "weights_fingerprint": weights_fingerprint(model), "random_weights": random_weights,
                  "config": arch, "scaling_factor": float(arch.get("scaling_factor", 1.0)),
                  "downsample": 2 ** (len(arch["block_out_channels"]) - 1), "precision": precision,
                  "input_range": [-1.0, 1.0]}
        model = model.to(device)
        if precision != "fp32":
            model = model.to(DTYPES[precision])
        return cls(model, record, device, precision)

    @classmethod
    def from_record(cls, record: dict, device="cpu", where: str = "the latent store") -> Vae:
        """The VAE a store or export records; refused when the network found there is another one."""
        if not isinstance(record, dict) or "weights" not in record or "weights_fingerprint" not in record:
            raise UserError(f"{where}: its latent_source records no VAE (weights, weights_fingerprint); "
                            "re-run `fae-pipe encode`")
        vae = cls.build(record["weights"], device, record.get("precision", "fp32"),
                        announce=bool(record.get("random_weights")))  # decoding with random weights is said too
        if vae.record["weights_fingerprint"] != record["weights_fingerprint"]:
            raise UserError(f"{where} was encoded by the VAE {record['weights']} with fingerprint "
                            f"{record['weights_fingerprint'][:19]}..., but that directory now holds "
                            f"{vae.record['weights_fingerprint'][:19]}...: restore those weights or re-run encode")
        return vae

    @property
    def latent_channels(self) -> int:
        return int(self.record["config"]["latent_channels"])

    def _kernels(self):
        """CPU: PyTorch's convolutions, not oneDNN's (same bits whatever the thread count; see the module notes)."""
        return _without_onednn() if self.device.type == "cpu" else contextlib.nullcontext()

    def grid(self, image_size: int) -> tuple[int, int]:
        """The latent grid of ``image_size`` px crops (32x32 at 256 px for SD-VAE)."""
        f = int(self.record["downsample"])
        if image_size % f:
            raise UserError(f"data.image_size = {image_size} is invalid for the VAE: expected a multiple of {f} "
                            "(its downsampling factor)")
        return image_size // f, image_size // f

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> posterior (mean, std), float32 (B, C, H/f, W/f)."""
        with self._kernels():
            dist = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the stored (raw posterior) space (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        from fae_pipe.fae.autoencoder import pixels_to_unit

        with self._kernels():
            return pixels_to_unit(self.model.decode(z.to(self.device, self.dtype)).sample)


@contextlib.contextmanager
def _without_onednn():
    """``torch.backends.mkldnn.enabled = False`` for the block (only that flag: ``mkldnn.flags()`` also
    rewrites the TF32 setting, with a warning on CPU builds)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def vae_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the range SD-VAE was trained on."""
    arr = np.asarray(pixels)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"vae_input expects uint8 pixels of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0).contiguous()


class VaeLatentDecoder:
    """Normalised generator outputs (B, C, H, W) -> images in [0, 1] through the VAE that wrote the latents.

    The same ``decode(x, output="pixels")`` call and ``latent_channels``/``grid`` as the FAE
    decoders (``fae_pipe.fae.autoencoder``), so samplers need not know which source they sample.
    """

    def __init__(self, vae: Vae, stats, grid):
        self.vae, self.stats, self.grid = vae, stats, (int(grid[0]), int(grid[1]))
        self.device = vae.device

    @classmethod
    def from_source(cls, source: dict, stats, grid, device="cpu", where: str = "the latent store") -> VaeLatentDecoder:
        return cls(Vae.from_record(source.get("vae"), device, where), stats, grid)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @torch.no_grad()
    def decode(self, x: torch.Tensor, output: str = "pixels") -> torch.Tensor:
        if output != "pixels":
            raise UserError(f"decode output: {output!r} is not valid for a VAE latent source; valid: 'pixels'")
        return self.vae.decode(self.stats.denormalize(x.to(self.device, torch.float32)))
