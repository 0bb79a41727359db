"""Per-image reconstruction metrics: PSNR and LPIPS (offline weights only).

PSNR: images are either uint8 in [0, 255] or floating point in [0, 1]; both are
mapped to [0, 1] in float64, so the peak value is 1 and
PSNR = 10 log10(1 / MSE) per image (MSE over channels and pixels), then averaged
over images. Identical images give +inf. Float images outside [0, 1] are
refused rather than silently clipped (a [-1, 1] decoder output must be mapped
first).

LPIPS: a thin wrapper around the ``lpips`` package. Its calibrated linear heads
ship inside the wheel; the VGG-16/AlexNet backbone is torchvision's ImageNet
checkpoint, which must already sit in torchvision's cache
``$TORCH_HOME/hub/checkpoints/``. The backbone is built randomly (``pnet_rand``)
and then filled from that file here, so nothing ever downloads.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fae_pipe.errors import UserError
from fae_pipe.metrics.weights import MetricUnavailable, hub_checkpoint_path, load_strict, read_state_dict

log = logging.getLogger(__name__)

# torchvision's ImageNet checkpoints that lpips' VGG/AlexNet trunks are made from.
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def _to_unit_float(x, name: str) -> torch.Tensor:
    """Images -> float64 tensor in [0, 1] with a batch dim (uint8 /255; float checked)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to("cpu")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise UserError(f"{name} images must be (N, C, H, W) or (C, H, W); got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.double() / 255.0
    if not t.dtype.is_floating_point:
        raise UserError(f"{name} images must be uint8 or floating point in [0, 1]; got dtype {t.dtype}")
    t = t.double()
    if not torch.isfinite(t).all():
        raise UserError(f"{name} images contain NaN or Inf")
    low, high = float(t.min()), float(t.max())
    if low < -1e-6 or high > 1.0 + 1e-6:
        raise UserError(f"{name} float images must lie in [0, 1]; got range [{low:.4g}, {high:.4g}]")
    return t.clamp(0.0, 1.0)


def psnr_per_image(pred, target) -> torch.Tensor:
    """PSNR in dB of each image pair (float64 tensor of shape (N,)), peak value 1 after mapping to [0, 1]."""
    a = _to_unit_float(pred, "pred")
    b = _to_unit_float(target, "target")
    if a.shape != b.shape:
        raise UserError(f"pred and target images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def psnr(pred, target) -> float:
    """Mean over images of the per-image PSNR in dB (+inf if any pair is identical)."""
    return float(psnr_per_image(pred, target).mean())


def _lpips_module(net: str) -> torch.nn.Module:
    """Construct lpips.LPIPS quietly with a random trunk (no print, no download)."""
    import lpips

    with warnings.catch_warnings():
        # lpips 0.1.4 passes torchvision's deprecated ``pretrained=`` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        return lpips.LPIPS(net=net, pnet_rand=True, verbose=False)


def lpips_backbone_path(net: str) -> Path:
    """Where the ImageNet checkpoint for lpips' ``net`` trunk must be: torchvision's hub cache."""
    return hub_checkpoint_path(LPIPS_BACKBONE_FILES[net])


def _load_backbone(model: torch.nn.Module, net: str, path: Path) -> None:
    """Fill lpips' trunk slices from torchvision's ImageNet checkpoint at ``path``."""
    state = read_state_dict(path, f"LPIPS-{net} backbone")
    # lpips keeps torchvision's ``features`` layers under their original index, split
    # into slices: ``features.<i>.<param>`` lives at ``slice<k>.<i>.<param>``.
    slice_of_index = {
        layer: slice_name
        for slice_name, block in model.net.named_children()
        for layer, _ in block.named_children()
    }
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        layer, param = key[len("features."):].split(".", 1)
        if layer not in slice_of_index:
            raise UserError(f"LPIPS-{net} backbone: {path} has layer features.{layer}, not part of {net}")
        mapped[f"{slice_of_index[layer]}.{layer}.{param}"] = value
    load_strict(model.net, mapped, path, f"LPIPS-{net} backbone")


def build_lpips(backbone: str = "vgg", device: torch.device | str = "cpu") -> torch.nn.Module:
    """LPIPS module (eval mode, no parameter grads) for ``backbone`` in {"vgg", "alex", "random"}.

    "vgg"/"alex" load the backbone from ``$TORCH_HOME/hub/checkpoints/`` and raise
    ``MetricUnavailable`` naming the file when it is absent. "random" (AlexNet trunk
    with random weights) is for tests and smoke runs only: its distances mean nothing.
    Call the module as ``model(x, y, normalize=True)`` for images in [0, 1].
    """
    if backbone not in ("vgg", "alex", "random"):
        raise UserError(f"LPIPS backbone '{backbone}' is not one of 'vgg', 'alex', 'random'")
    if backbone == "random":
        log.warning("LPIPS with a RANDOM backbone: distances are meaningless (tests/smoke runs only)")
        model = _lpips_module("alex")
    else:
        path = lpips_backbone_path(backbone)
        if not path.is_file():
            raise MetricUnavailable(
                f"LPIPS-{backbone} needs torchvision's ImageNet weights: put {path.name} into {path.parent} "
                "(TORCH_HOME moves that cache); backbone 'random' is for tests only"
            )
        model = _lpips_module(backbone)
        _load_backbone(model, backbone, path)
    model.requires_grad_(False)
    return model.eval().to(torch.device(device))


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, pred, target, batch_size: int = 32) -> torch.Tensor:
    """Per-image LPIPS distances (float32 tensor (N,) on CPU) for images in [0, 1] or uint8."""
    a = _to_unit_float(pred, "pred")
    b = _to_unit_float(target, "target")
    if a.shape != b.shape or a.shape[1] != 3 or a.shape[0] == 0:
        raise UserError(f"LPIPS needs a non-empty batch of RGB image pairs of equal shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, a.shape[0], batch_size):
        x = a[start:start + batch_size].to(device, torch.float32)
        y = b[start:start + batch_size].to(device, torch.float32)
        out.append(model(x, y, normalize=True).flatten().cpu())
    return torch.cat(out)
