"""Encoder + feature decoder as one module, so Accelerate/DDP wraps (and syncs) both in one forward."""

from __future__ import annotations

import torch
from torch import nn

from fae_pipe.models.fae_encoder import DiagonalGaussian


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
