"""FID Inception-v3 features (pool3, 2048-d) and Inception Score, from a local file only.

Why this file exists: FID and IS are only comparable with published numbers when
computed with the TensorFlow "2015-12-05" Inception graph. pytorch-fid ports it
as ``pt_inception-2015-12-05-6726825d.pth`` (the same network the ADM evaluator
runs in TensorFlow); its state dict is torchvision's ``Inception3`` layout with
1008 classes and four patched block types (avg pools that ignore padding, one
max pool). Here:

- the block types come from the optional ``pytorch-fid`` package (tested with
  0.3.0; ``pip install pytorch-fid``, it leaves torch alone);
- the network is assembled without any download and filled strictly from a path
  the caller configures; no path or no file raises ``MetricUnavailable`` so the
  caller reports "FID unavailable". FID is never computed with random weights;
- images go in as uint8, are resized to 299x299 bilinearly (align_corners=False,
  as pytorch-fid) and scaled to [-1, 1];
- the logits used for IS are pool3 @ W^T without the bias, over all 1008 outputs,
  as in the original IS code and the ADM evaluator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fae_pipe.errors import UserError
from fae_pipe.metrics.weights import MetricUnavailable, load_strict, read_state_dict

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"

# Inception3 stages from the input to the 8x8x2048 map, in order.
_STAGES = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
    "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
)


class FIDInception(torch.nn.Module):
    """Wraps the FID Inception3 ``net``; forward maps [-1, 1] 299 px images to (pool3, logits)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name in _STAGES:
            x = getattr(self.net, name)(x)
        pool = x.mean(dim=(2, 3))
        logits = pool @ self.net.fc.weight.t()
        return pool, logits


def build_fid_inception_architecture() -> FIDInception:
    """The FID Inception network with random (default) init; only useful to load weights into."""
    try:
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    except ImportError as exc:
        raise MetricUnavailable(
            "FID/IS need the optional package pytorch-fid: pip install pytorch-fid"
        ) from exc
    from torchvision.models.inception import Inception3

    net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return FIDInception(net)


def load_fid_inception(weights_path: str | Path | None, device: torch.device | str = "cpu") -> FIDInception:
    """FID Inception filled from ``weights_path`` (eval mode, no grads).

    Raises ``MetricUnavailable`` when no path is configured, the file is absent, or
    pytorch-fid is not installed; ``UserError`` when the file is not this network.
    """
    if weights_path is None or str(weights_path) == "":
        raise MetricUnavailable(
            f"FID/IS unavailable: no Inception weights configured; put {FID_WEIGHTS_FILENAME} "
            "(pytorch-fid's port of the TF 2015-12-05 Inception) on disk and configure its path"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MetricUnavailable(
            f"FID/IS unavailable: Inception weight file {path} does not exist "
            f"(expected pytorch-fid's {FID_WEIGHTS_FILENAME})"
        )
    model = build_fid_inception_architecture()
    load_strict(model.net, read_state_dict(path, "FID Inception"), path, "FID Inception")
    model.requires_grad_(False)
    return model.eval().to(torch.device(device))


def _as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images in NCHW or NHWC (3 channels) -> uint8 NCHW tensor on CPU."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise UserError(f"Inception input must be uint8 images (N, 3, H, W) or (N, H, W, 3); got {t.dtype} {tuple(t.shape)}")
    if t.shape[1] == 3:
        return t
    if t.shape[-1] == 3:
        return t.permute(0, 3, 1, 2)
    raise UserError(f"Inception input must have 3 colour channels; got shape {tuple(t.shape)}")


@torch.no_grad()
def inception_features(images_uint8, model: FIDInception, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """pool3 features (N, 2048) and unbiased logits (N, 1008), float32 on CPU, in input order."""
    images = _as_nchw_uint8(images_uint8)
    if batch < 1:
        raise UserError(f"Inception batch size must be >= 1; got {batch}")
    device = next(model.parameters()).device
    pools, logits = [], []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch].to(device).float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        pool, logit = model(2.0 * x - 1.0)
        pools.append(pool.float().cpu())
        logits.append(logit.float().cpu())
    if not pools:
        return torch.empty(0, 2048), torch.empty(0, 1008)
    return torch.cat(pools), torch.cat(logits)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` contiguous splits) from Inception logits (N, C).

    Per split: exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean prediction;
    computed in float64.
    """
    z = logits.detach().cpu().double() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2:
        raise UserError(f"logits must be 2-D (samples, classes); got shape {tuple(z.shape)}")
    if splits < 1 or z.shape[0] < splits:
        raise UserError(f"Inception Score needs 1 <= splits <= samples; got splits={splits}, samples={z.shape[0]}")
    log_p = torch.log_softmax(z, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits, dim=0):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))
