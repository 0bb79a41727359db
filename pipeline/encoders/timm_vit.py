"""The frozen DINOv2 encoder (timm), wrapped so every stage gets the same features.

``build_encoder`` resolves where the weights come from and records it in
``weights_fingerprint``, which caches store so that features made with different
weights are never mixed:

* ``"hub"``: timm's pretrained ``<name>.lvd142m`` from the Hugging Face hub. A copy
  already in the local hub cache is loaded straight from disk (no network); otherwise
  the hub is probed first (3 s connect) so a machine without network gets a one-line
  error at once instead of a minute of download retries.
* a file (.safetensors / .pth / .bin): loaded through timm's pretrained path, which
  converts Meta's original DINOv2 checkpoints and resizes the position table to the
  input size. Fingerprint: sha256 of the file bytes.
* ``"random"``: random initialisation, for tests and the offline demo only. It is
  drawn from a fixed seed, so every process (e.g. every dask worker) builds the same
  encoder, and a WARNING says the features are not DINOv2 features. LayerScale gammas
  are set to 1 (timm starts them at 1e-5, which makes every block a near no-op and the
  cls token almost constant across images), so random features still depend on the image.

``encode`` returns the final-norm tokens of ``forward_features`` split into the patch
grid (prefix tokens, i.e. cls and any registers, dropped) and the cls token, in
float32 whatever the compute precision.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from fae_pipe.artifacts import file_fingerprint
from fae_pipe.device import pick_device
from fae_pipe.errors import UserError

log = logging.getLogger(__name__)

PATCH = 14
HUB_TAG = "lvd142m"
PRECISIONS = ("fp32", "bf16")
DINOV2_NAMES = tuple(f"vit_{size}_patch14{reg}_dinov2"
                     for size in ("small", "base", "large", "giant") for reg in ("", "_reg4"))
# Random-weights-only variants for the scale rehearsal (``fae-pipe bench scale``): DINOv2-S's
# token width (so fae_tiny reads its features) with one block, ~10x cheaper per image.
REHEARSAL_NAMES = {"vit_small_patch14_dinov2_1block": ("vit_small_patch14_dinov2", {"depth": 1})}
RANDOM_SEED = 0
RANDOM_WARNING = ("encoder weights are RANDOM (image_encoder.weights=random): features are not DINOv2 features; "
                  "set image_encoder.weights to a local checkpoint")


def _hub_cached_file(hub_id: str) -> str | None:
    """Path of the hub checkpoint in the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub; with a proxy configured the download itself decides."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _no_hub_error(name: str, why: str) -> UserError:
    return UserError(f"image_encoder.weights=hub: cannot get '{name}.{HUB_TAG}' ({why}); with no network, set "
                     f"image_encoder.weights to a local DINOv2 checkpoint file (.safetensors/.pth, timm or Meta format)")


def _create_model(name: str, weights: str, input_size: int) -> tuple[nn.Module, str]:
    """The timm model and its weights fingerprint for the ``weights`` setting."""
    import timm

    if name in REHEARSAL_NAMES and weights != "random":
        raise UserError(f"image_encoder.name = {name!r} exists for rehearsals only: it needs "
                        f"image_encoder.weights=random (got {weights!r})")
    if weights == "random":
        log.warning(RANDOM_WARNING)
        base, overrides = REHEARSAL_NAMES.get(name, (name, {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(base, pretrained=False, img_size=input_size, **overrides)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith(".gamma"):
                    param.fill_(1.0)
        return model, "random"
    if weights == "hub":
        tagged = f"{name}.{HUB_TAG}"
        cached = _hub_cached_file(timm.models.get_pretrained_cfg(tagged).hf_hub_id)
        if cached:
            return timm.create_model(name, pretrained=True, img_size=input_size,
                                     pretrained_cfg_overlay=dict(file=cached)), f"hub:{tagged}"
        if not _hub_reachable():
            raise _no_hub_error(name, "the hub is unreachable or HF_HUB_OFFLINE is set")
        try:
            return timm.create_model(tagged, pretrained=True, img_size=input_size), f"hub:{tagged}"
        except Exception as e:  # noqa: BLE001 - any download failure has the same remedy
            raise _no_hub_error(name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"image_encoder.weights '{weights}' not found: expected 'hub', 'random' or an existing "
                        f"checkpoint file (.safetensors/.pth/.bin)")
    try:
        model = timm.create_model(name, pretrained=True, img_size=input_size,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as e:  # noqa: BLE001 - wrong architecture, damaged file, unknown format
        raise UserError(f"image_encoder.weights '{weights}': cannot load it into {name}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return model, file_fingerprint(path)


class FrozenDinoEncoder(nn.Module):
    """A DINOv2 ViT in eval mode with no trainable parameters; ``encode`` gives patch and cls tokens."""

    def __init__(self, model: nn.Module, name: str, weights: str, weights_fingerprint: str,
                 input_size: int, device: torch.device, precision: str):
        super().__init__()
        self.model = model.to(device).eval().requires_grad_(False)
        self.name = name
        self.weights = weights
        self.weights_fingerprint = weights_fingerprint
        self.random_weights = weights_fingerprint == "random"
        self.input_size = input_size
        self.grid = (input_size // PATCH, input_size // PATCH)
        self.dim = int(model.num_features)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.precision = precision

    @property
    def device(self) -> torch.device:
        """Where the weights live (follows ``.to()``); ``encode`` moves its input here."""
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        """Stay in eval mode: the encoder is frozen whatever the surrounding module does."""
        super().train(False)
        return self

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, h*w, C), cls token (B, C)), float32, on the encoder's device."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"{self.name} expects (B, 3, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        use_bf16 = self.precision == "bf16" and self.device.type in ("cpu", "cuda")
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            tokens = self.model.forward_features(x)
        tokens = tokens.float()
        return tokens[:, self.num_prefix_tokens:].contiguous(), tokens[:, 0].contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x)

    def encode_pixels(self, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` applied to uint8 pixels (N, H, W, 3) via ``transforms.encoder_input``."""
        from fae_pipe.data.transforms import encoder_input

        return self.encode(encoder_input(pixels, self.input_size))

    def flops_per_image(self) -> float:
        """Approximate forward FLOPs for one image (multiply-add = 2 FLOPs).

        2 * parameters * tokens for the dense layers (counts the embedding tables as if
        applied per token, a < 1% overestimate) plus 4 * depth * tokens^2 * width for the
        attention products QK^T and AV. Matches timm's published MAC counts to a few %.
        """
        tokens = self.num_prefix_tokens + self.num_patches
        params = sum(p.numel() for p in self.model.parameters())
        depth = len(self.model.blocks)
        return float(2 * params * tokens + 4 * depth * tokens * tokens * self.dim)


def build_encoder(name: str, weights: str, input_size: int, device="auto", precision: str = "bf16") -> FrozenDinoEncoder:
    """Build the frozen encoder ``name`` at ``input_size`` px with ``weights`` ("hub", "random" or a file)."""
    if name not in DINOV2_NAMES and name not in REHEARSAL_NAMES:
        raise UserError(f"image_encoder.name = {name!r} is invalid: expected one of {', '.join(DINOV2_NAMES)}")
    if input_size < PATCH or input_size % PATCH:
        raise UserError(f"image_encoder.input_size = {input_size} is invalid: expected a multiple of {PATCH}")
    if precision not in PRECISIONS:
        raise UserError(f"image_encoder.precision = {precision!r} is invalid: expected one of {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model, fingerprint = _create_model(name, str(weights), input_size)
    return FrozenDinoEncoder(model, name, str(weights), fingerprint, input_size, dev, precision)
