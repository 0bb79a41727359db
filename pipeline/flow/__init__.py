"""Normalizing-flow maths for the TARFlow/STARFlow generator (the network is ``fae_pipe.models.tarflow``).

Like ``fae_pipe.transport`` for diffusion, this package is the one place for the flow's
objective (exact NLL in bits per dimension, Gaussian noise augmentation), its sampler
(block inversion with a KV cache), Tweedie denoising and flow guidance. docs/flow.md has
the formulas and the choices made where TARFlow/STARFlow leave room.
"""

from fae_pipe.flow.guidance import MODES, SCHEDULES, FlowGuidance, configured, mix
from fae_pipe.flow.likelihood import FlowLoss, bits_per_dim, log_prob, nll_per_dim, noise_augment, training_loss
from fae_pipe.flow.sampling import denoise, invert, sample, score

__all__ = ["FlowGuidance", "FlowLoss", "MODES", "SCHEDULES", "bits_per_dim", "configured", "denoise", "invert", "log_prob", "mix",
           "nll_per_dim", "noise_augment", "sample", "score", "training_loss"]
