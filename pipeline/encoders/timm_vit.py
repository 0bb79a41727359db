"""The frozen timm ViT encoder (DINOv2, DINOv3, SigLIP/SigLIP2, any timm ViT), wrapped so every stage gets
the same features.

What each family needs (normalisation, patch, prefix tokens, pooled vector) is declared
in ``fae_pipe.encoders.registry``; this module builds the model and runs it.

``build_encoder`` resolves where the weights come from and records it in
``weights_fingerprint``, which caches store so that features made with different
weights are never mixed:

* ``"hub"``: timm's pretrained ``<name>.<tag>`` from the Hugging Face hub (the family's
  tag unless the name carries one). A copy already in the local hub cache is loaded
  straight from disk (no network); otherwise the hub is probed first (3 s connect) so a
  machine without network gets a one-line error at once instead of minutes of retries.
* a file (.safetensors / .pth / .bin / .npz): loaded through timm's pretrained path,
  which converts the original checkpoints (Meta's DINOv2/DINOv3, big_vision SigLIP) and
  resizes an absolute position table to the input size (DINOv3's RoPE has none).
  Fingerprint: sha256 of the file bytes.
* ``"random"``: random initialisation, for tests and the offline demo only. It is
  drawn from a fixed seed, so every process (e.g. every dask worker) builds the same
  encoder, and a WARNING says the features are not pretrained features. LayerScale
  gammas are set to 1 (timm starts them at 1e-5, which makes every block a near no-op
  and the cls token almost constant across images), so random features still depend
  on the image.

``image_encoder.model_args`` (timm ``create_model`` keyword overrides, e.g. a smaller
``embed_dim``/``depth``) build a modified architecture of the same family; tests use it
for tiny models of every family. They are part of the store's record.

``encode`` returns the patch grid tokens (prefix tokens, i.e. cls and any registers,
dropped) and the pooled vector, in float32 whatever the compute precision. Layer 0 is
``forward_features`` (the last block through the final norm); layer k >= 1 is block k's
output (``forward_intermediates``), through the final norm when ``layer_norm`` is set
(as DINOv2's ``get_intermediate_layers(norm=True)``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from fae_pipe.artifacts import file_fingerprint
from fae_pipe.device import note_emulated_bf16, pick_device
from fae_pipe.encoders.registry import EncoderChoice, normalisation, parse_model_args, resolve
from fae_pipe.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
RANDOM_SEED = 0
RANDOM_WARNING = ("encoder weights are RANDOM (image_encoder.weights=random): features are not pretrained "
                  "features; set image_encoder.weights to a local checkpoint")
_GAMMA = re.compile(r"(^|\.)gamma(_\d+)?$")  # LayerScale: ls1.gamma (VisionTransformer), gamma_1 (Eva / DINOv3)


def _hub_cached_file(hub_id: str) -> str | None:
    """Path of the hub checkpoint in the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
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


def _no_hub_error(tagged: str, why: str) -> UserError:
    return UserError(f"image_encoder.weights=hub: cannot get '{tagged}' ({why}); with no network, set "
                     f"image_encoder.weights to a local checkpoint file (.safetensors/.pth, timm or original format)")


def _create_model(choice: EncoderChoice, weights: str, input_size: int, kwargs: dict) -> tuple[nn.Module, str]:
    """The timm model and its weights fingerprint for the ``weights`` setting."""
    import timm

    kwargs = dict(img_size=input_size, **kwargs)
    tagged = f"{choice.arch}.{choice.tag}" if choice.tag else choice.arch
    if weights == "random":
        log.warning(RANDOM_WARNING)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(choice.arch, pretrained=False, **kwargs)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if _GAMMA.search(pname):
                    param.fill_(1.0)
        return model, "random"
    if weights == "hub":
        try:
            hub_id = timm.models.get_pretrained_cfg(tagged).hf_hub_id
        except Exception:  # noqa: BLE001 - timm raises several kinds for an unknown tag
            raise UserError(f"image_encoder.name = {choice.name!r}: timm has no pretrained tag '{tagged}'; valid: "
                            f"{', '.join(timm.list_pretrained(choice.arch + '.*')) or 'none'}") from None
        cached = _hub_cached_file(hub_id)
        if cached:
            return timm.create_model(tagged, pretrained=True, pretrained_cfg_overlay=dict(file=cached),
                                     **kwargs), f"hub:{tagged}"
        if not _hub_reachable():
            raise _no_hub_error(tagged, "the hub is unreachable or HF_HUB_OFFLINE is set")
        try:
            return timm.create_model(tagged, pretrained=True, **kwargs), f"hub:{tagged}"
        except Exception as e:  # noqa: BLE001 - any download failure has the same remedy
            raise _no_hub_error(tagged, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"image_encoder.weights '{weights}' not found: expected 'hub', 'random' or an existing "
                        f"checkpoint file (.safetensors/.pth/.bin)")
    if tagged not in timm.list_pretrained(choice.arch + ".*"):  # e.g. a family's default tag this size lacks
        tagged = choice.arch
    try:
        model = timm.create_model(tagged, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as e:  # noqa: BLE001 - wrong architecture, damaged file, unknown format
        raise UserError(f"image_encoder.weights '{weights}': cannot load it into {tagged}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return model, file_fingerprint(path)


def _pooling(model: nn.Module, choice: EncoderChoice, layer: int) -> str:
    """How the pooled vector is made: the family's rule, or read from a generic model (see the registry)."""
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    has_head = getattr(model, "attn_pool", None) is not None
    if layer:
        return "cls" if has_cls else "token_mean"
    if choice.family is not None and (choice.family.pooled != "attention_pool" or has_head):
        return choice.family.pooled
    if has_cls:
        return "cls"
    return "attention_pool" if has_head else "token_mean"  # e.g. the *_siglip_gap_* variants: no head


class FrozenEncoder(nn.Module):
    """A timm ViT in eval mode with no trainable parameters; ``encode`` gives patch tokens and the pooled vector."""

    def __init__(self, model: nn.Module, choice: EncoderChoice, weights: str, weights_fingerprint: str,
                 input_size: int, device: torch.device, precision: str, mean, std, layer: int = 0,
                 layer_norm: bool = True, model_args: dict | None = None):
        super().__init__()
        self.model = model.to(device).eval().requires_grad_(False)
        self.choice, self.name, self.family = choice, choice.name, choice.family_name
        self.weights = weights
        self.weights_fingerprint = weights_fingerprint
        self.random_weights = weights_fingerprint == "random"
        self.input_size = input_size
        self.patch = int(model.patch_embed.patch_size[0])
        self.grid = (input_size // self.patch, input_size // self.patch)
        self.dim = int(model.num_features)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.precision = precision
        self.mean, self.std = tuple(mean), tuple(std)
        self.layer, self.layer_norm = int(layer), bool(layer_norm)
        self.model_args = dict(model_args or {})
        self.pooled = _pooling(model, choice, self.layer)

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

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def record(self) -> dict:
        """What a store made with this encoder records about it (the ``encoder`` attr, beside the config keys)."""
        return {"family": self.family, "timm_model": self.choice.arch, "pretrained_tag": self.choice.tag,
                "weights_fingerprint": self.weights_fingerprint, "random_weights": bool(self.random_weights),
                "patch_size": self.patch, "grid": list(self.grid), "dim": self.dim,
                "num_prefix_tokens": self.num_prefix_tokens, "layer": self.layer, "layer_norm": self.layer_norm,
                "pooled": self.pooled, "model_args": self.model_args,
                "preprocessing": {"resize": "bicubic", "input_size": self.input_size, "mean": list(self.mean),
                                  "std": list(self.std)}}

    def preprocess(self, pixels) -> torch.Tensor:
        """uint8 pixels (N, H, W, 3) -> this encoder's normalised input (``transforms.encoder_input``)."""
        from fae_pipe.data.transforms import encoder_input

        return encoder_input(pixels, self.input_size, self.mean, self.std)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens, pooled vector) of the configured layer, in the compute precision."""
        m = self.model
        if self.layer == 0:
            tokens = m.forward_features(x)
            patch = tokens[:, self.num_prefix_tokens:]
            if self.pooled == "cls":
                return patch, tokens[:, 0]
            if self.pooled == "attention_pool":
                return patch, m.forward_head(tokens, pre_logits=True)
            return patch, patch.mean(dim=1)
        out = m.forward_intermediates(x, indices=[self.layer - 1], norm=self.layer_norm, output_fmt="NLC",
                                      intermediates_only=True, return_prefix_tokens=self.num_prefix_tokens > 0)[0]
        patch, prefix = out if isinstance(out, tuple) else (out, None)
        return patch, (prefix[:, 0] if self.pooled == "cls" else patch.mean(dim=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, h*w, C), pooled vector (B, C)), float32, on the encoder's device."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"{self.name} expects (B, 3, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        use_bf16 = self.precision == "bf16" and self.device.type in ("cpu", "cuda")
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            patch, pooled = self._tokens(x)
        return patch.float().contiguous(), pooled.float().contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x)

    def encode_pixels(self, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` applied to uint8 pixels (N, H, W, 3) via ``preprocess``."""
        return self.encode(self.preprocess(pixels))

    def flops_per_image(self) -> float:
        """Approximate forward FLOPs for one image (multiply-add = 2 FLOPs).

        2 * parameters * tokens for the dense layers (counts the embedding tables as if
        applied per token, a < 1% overestimate) plus 4 * depth * tokens^2 * width for the
        attention products QK^T and AV. Matches timm's published MAC counts to a few %.
        """
        tokens = self.num_prefix_tokens + self.num_patches
        params = sum(p.numel() for p in self.model.parameters())
        return float(2 * params * tokens + 4 * self.depth * tokens * tokens * self.dim)


def _check_family(model: nn.Module, choice: EncoderChoice) -> None:
    """The built model must be what its family entry declares (a changed timm default would show here)."""
    fam = choice.family
    if fam is None:
        return
    got = (int(model.patch_embed.patch_size[0]), int(model.num_prefix_tokens))
    if got != (fam.patch, fam.prefix_tokens):
        raise UserError(f"image_encoder.name = {choice.name!r} builds patch {got[0]} with {got[1]} prefix tokens, "
                        f"but family {fam.family} declares patch {fam.patch} with {fam.prefix_tokens}: check "
                        "image_encoder.model_args")


def build_encoder(name: str, weights: str, input_size: int, device="auto", precision: str = "bf16", *,
                  layer: int = 0, layer_norm: bool = True, model_args=(), mean=(), std=()) -> FrozenEncoder:
    """Build the frozen encoder ``name`` at ``input_size`` px with ``weights`` ("hub", "random" or a file)."""
    choice = resolve(name)
    if precision not in PRECISIONS:
        raise UserError(f"image_encoder.precision = {precision!r} is invalid: expected one of {', '.join(PRECISIONS)}")
    norm = normalisation(choice, list(mean), list(std))
    kwargs = model_args if isinstance(model_args, dict) else parse_model_args(list(model_args))
    patch = choice.family.patch if choice.family else None
    if patch and (input_size < patch or input_size % patch):
        raise UserError(f"image_encoder.input_size = {input_size} is invalid: expected a multiple of {patch} "
                        f"({16 * patch} gives a 16x16 token grid)")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    note_emulated_bf16(dev, precision, "image_encoder.precision")
    model, fingerprint = _create_model(choice, str(weights), input_size, kwargs)
    _check_family(model, choice)
    p = int(model.patch_embed.patch_size[0])
    if input_size % p:
        raise UserError(f"image_encoder.input_size = {input_size} is invalid: expected a multiple of {p}")
    if not 0 <= layer <= len(model.blocks):
        raise UserError(f"image_encoder.layer = {layer} is invalid: expected 0 (the last block through the final "
                        f"norm) or a block 1..{len(model.blocks)} of {name}")
    if not layer_norm and not layer:
        raise UserError("image_encoder.layer_norm = false needs an intermediate image_encoder.layer (1..depth): "
                        "layer 0 is the final norm's output")
    return FrozenEncoder(model, choice, str(weights), fingerprint, input_size, dev, precision, *norm,
                         layer=layer, layer_norm=layer_norm, model_args=kwargs)


def build_from_spec(spec: dict, device=None) -> FrozenEncoder:
    """``build_encoder`` of an ``encoder_spec`` dict (``device`` overrides the spec's)."""
    return build_encoder(spec["name"], spec["weights"], spec["input_size"],
                         spec["device"] if device is None else device, spec["precision"], layer=spec["layer"],
                         layer_norm=spec["layer_norm"], model_args=spec["model_args"], mean=spec["mean"],
                         std=spec["std"])
