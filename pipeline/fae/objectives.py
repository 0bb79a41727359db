"""The FAE training objectives, written once so train-fae, train-decoder and the tests agree.

Feature stage: ``L2(x_hat, x) + beta * KL(q(z|x) || N(0, I))``. Both terms are
means over elements (the MSE over tokens and feature channels, the KL over tokens
and latent channels), so ``beta`` means the same thing whatever the token grid,
feature width or latent width (a per-sample KL *sum* would scale with N * C and
need a beta thousands of times smaller). Features are used raw (no per-channel
standardisation): decoded features must land in the frozen encoder's own space,
where the pixel decoder and the probes read them.

Pixel stage: reconstruction (L1 or L2 on [-1, 1] images) + LPIPS + a GAN term
whose weight is the VQGAN adaptive weight: the ratio of the gradient norms of the
reconstruction-plus-perceptual loss and of the generator loss at the decoder's
last layer, so the adversarial push never swamps the reconstruction signal.
Schedule (``DecoderObjective``): until ``gan_start`` only ``rec + lpips_weight *
LPIPS`` trains the decoder and the discriminator is not even run (it would learn
from a moving blur and cost time). From ``gan_start`` on, each step first updates
the decoder with ``+ gan_weight * w_adapt * L_G`` and then the discriminator on the
same real/fake pair, with the fake detached; while the decoder updates, the
discriminator's parameters are frozen so they collect no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fae_pipe.errors import UserError

ADAPTIVE_WEIGHT_MAX = 1e4  # VQGAN's clamp: a vanishing GAN gradient must not explode the weight


def feature_loss(x_hat: torch.Tensor, x: torch.Tensor, posterior, beta: float):
    """Return (loss, mse, kl): element-mean squared error + beta * element-mean KL."""
    mse = (x_hat.float() - x.float()).pow(2).mean()
    kl = posterior.kl("mean").float()
    return mse + beta * kl, mse, kl


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching tokens (..., D), one value per token (fp32)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the channel dim of each token, keepdim (..., 1)."""
    return x.float().pow(2).mean(dim=-1, keepdim=True).sqrt()


def noise_features(x: torch.Tensor, sigma: float, generator: torch.Generator | None,
                   schedule: str = "fixed") -> torch.Tensor:
    """``x + s * rms(token) * eps``: stage-1 augmentation scaled to each token's own magnitude.

    Scaling by the token RMS makes the noise level a signal-to-noise ratio that carries
    over between encoders whose features differ in scale (DINOv2-S vs -g).
    ``schedule`` "fixed": ``s = sigma`` (FAE); "uniform": ``s ~ U(0, sigma)`` drawn per
    sample (RAE's decoder schedule, sigma = 0.8 there), so the decoder sees every noise
    level from clean to ``sigma``, as a generator's imperfect outputs have.
    """
    if sigma == 0.0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    if schedule == "uniform":
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float32)
        level = (sigma * u).view(-1, *([1] * (x.dim() - 1)))
    elif schedule == "fixed":
        level = sigma
    else:
        raise UserError(f"config error: decoder.noise_schedule = {schedule!r} is invalid: expected fixed or uniform")
    return (x.float() + level * token_rms(x) * eps).to(x.dtype)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Pixel reconstruction loss, element mean: "l1" or "l2"."""
    if kind == "l1":
        return (pred.float() - target.float()).abs().mean()
    if kind == "l2":
        return (pred.float() - target.float()).pow(2).mean()
    raise UserError(f"decoder.rec_loss = {kind!r} is invalid: expected l1 or l2")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator objective: hinge (VQGAN/StyleGAN-T) or non-saturating (logistic)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())
    if kind == "nonsat":
        return 0.5 * (F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean())
    raise UserError(f"decoder.gan_loss = {kind!r} is invalid: expected hinge or nonsat")


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator objective matching ``discriminator_loss``: -D(fake) for hinge, softplus(-D) otherwise."""
    if kind == "hinge":
        return -fake_logits.float().mean()
    if kind == "nonsat":
        return F.softplus(-fake_logits.float()).mean()
    raise UserError(f"decoder.gan_loss = {kind!r} is invalid: expected hinge or nonsat")


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d w|| / (||d g_loss / d w|| + 1e-4), clamped to [0, 1e4], no gradient."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


class DecoderObjective:
    """Holds the frozen LPIPS net and the decoder section settings; computes both losses."""

    def __init__(self, dc, lpips_model):
        self.dc, self.lpips = dc, lpips_model

    def gan_active(self, step: int) -> bool:
        """True from ``gan_start`` on (0-based optimizer step) when the GAN weight is positive."""
        return self.dc.gan_weight > 0 and step >= self.dc.gan_start

    def generator(self, pred: torch.Tensor, target: torch.Tensor, disc, last_layer, gan: bool) -> dict:
        """Decoder loss terms; ``loss`` is what to backpropagate."""
        rec = reconstruction_loss(pred, target, self.dc.rec_loss)
        perc = (self.lpips(pred.float(), target.float()).mean() if self.dc.lpips_weight > 0
                else torch.zeros((), device=pred.device))
        nll = rec + self.dc.lpips_weight * perc
        out = {"rec": rec, "lpips": perc, "gan": None, "d_weight": None}
        if not gan:
            out["loss"] = nll
            return out
        disc.requires_grad_(False)
        g_loss = generator_loss(disc(pred), self.dc.gan_loss)
        disc.requires_grad_(True)
        weight = adaptive_weight(nll, g_loss, last_layer)
        out.update(loss=nll + self.dc.gan_weight * weight * g_loss, gan=g_loss, d_weight=weight)
        return out

    def discriminator(self, disc, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator loss on real targets vs detached reconstructions."""
        return discriminator_loss(disc(real), disc(fake.detach()), self.dc.gan_loss)
