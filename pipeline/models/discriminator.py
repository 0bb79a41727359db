"""PatchGAN discriminator for the pixel decoder's adversarial term.

Design: the "NLayer" PatchGAN of pix2pix, the one VQGAN/TiTok-style tokenizers
use. Strided 4x4 convolutions with LeakyReLU(0.2) halve the resolution
``n_layers`` times while doubling channels (capped at 8 x base), then one
stride-1 conv and a 1-channel conv give a map of real/fake logits, each judging
one receptive-field patch (70x70 px for n_layers=3). Judging patches rather
than whole images pushes the decoder towards sharp local texture, which is what
L1 + LPIPS alone blur away.

Normalisation: spectral norm by default instead of pix2pix's BatchNorm. It
bounds each layer's Lipschitz constant, which keeps a GAN switched on mid-
training from destabilising the decoder, and it has no batch statistics, so
small per-device batches (CPU demo, many GPUs) and train/eval mode behave the
same. ``norm="batch"`` gives the original pix2pix/VQGAN layout; "none" has none.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fae_pipe.errors import UserError

NORMS = ("spectral", "batch", "none")


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN: images (B, in_channels, H, W) in [-1, 1] -> logits (B, 1, H', W').

    Args:
        in_channels: image channels (3).
        base_channels: channels of the first conv (64 in pix2pix).
        n_layers: number of stride-2 convs after the first (3 -> 70 px patches).
        norm: "spectral", "batch" or "none".
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "spectral"):
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"discriminator norm: '{norm}' is not valid; valid: {', '.join(NORMS)}")
        if n_layers < 1:
            raise UserError(f"discriminator n_layers: {n_layers} must be >= 1")

        def conv(c_in: int, c_out: int, stride: int, normed: bool) -> list[nn.Module]:
            layer = nn.Conv2d(c_in, c_out, 4, stride, 1, bias=not (normed and norm == "batch"))
            if norm == "spectral":
                layer = spectral_norm(layer)
            out = [layer]
            if normed and norm == "batch":
                out.append(nn.BatchNorm2d(c_out))
            return out

        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        layers: list[nn.Module] = [*conv(in_channels, base_channels, 2, False), act()]
        ch = base_channels
        for i in range(1, n_layers + 1):
            nxt = base_channels * min(2**i, 8)
            layers += [*conv(ch, nxt, 2 if i < n_layers else 1, True), act()]
            ch = nxt
        layers += conv(ch, 1, 1, False)
        self.net = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) convs and N(1, 0.02) BatchNorm gains, the DCGAN/pix2pix initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                nn.init.normal_(weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the patch logits map (positive = judged real)."""
        return self.net(images)
