"""The pixel decoder's loss: reconstruction + LPIPS + adaptively weighted GAN, and the discriminator's.

Schedule: until ``gan_start`` only ``rec + lpips_weight * LPIPS`` trains the
decoder and the discriminator is not even run (it would learn from a moving
blur and cost time). From ``gan_start`` on, each step first updates the decoder
with ``+ gan_weight * w_adapt * L_G`` (VQGAN adaptive weight at the decoder's
patch head) and then the discriminator on the same real/fake pair, with the
fake detached. While the decoder updates, the discriminator's parameters are
frozen so they collect no gradient.
"""

from __future__ import annotations

import torch

from fae_pipe.fae.losses import adaptive_weight, discriminator_loss, generator_loss, reconstruction_loss


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
