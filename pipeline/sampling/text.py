"""Text-conditioned sampling: integrate a trained MMDiT's velocity with classifier-free guidance against the
empty caption, on the same samplers and guidance intervals as class-conditional sampling.

Why it reuses the class-conditional machinery unchanged: ``transport.sample`` and
``guidance.guided_velocity`` condition on a label tensor ``y`` and, inside a guided segment,
make ONE doubled call with ``[y, null_class]``. Here the "labels" are row indices into a
conditioning table holding the B prompts' embeddings followed by the empty caption's
embedding at index B; the velocity function looks the rows up. So ``null_class = B`` *is*
the empty caption, every sampler method (euler, heun, dopri5, sde), the time shift and the
guidance segments ``[[t0, t1, scale], ...]`` (``sample.guidance``) work as they do for SiT, and
where the scale is 1 the unconditional pass is skipped: a schedule whose scales are all 1
makes exactly the calls of the unguided sampler, with the same inputs, so the result is
bit-identical.

Prompts are embedded with the text encoder the export records (``prompt_encoder``: the same
directory, checked by fingerprint, and the same ``max_length``), the only place the text
encoder runs after ``embed-text``; the empty caption comes from the export, never re-embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fae_pipe.errors import UserError
from fae_pipe.transport import as_schedule, sample


class TextCondition(NamedTuple):
    """Embedded captions for B rows: tokens float (B, L, D) zero past each length, mask bool (B, L)
    (True = real token), pooled float (B, D) or None (encoders without a pooled vector)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    @classmethod
    def from_lengths(cls, tokens: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor | None = None
                     ) -> "TextCondition":
        """From ``FrozenTextEncoder.encode``'s output (tokens, lengths (B,), pooled)."""
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths.to(tokens.device)[:, None]
        return cls(tokens.float(), mask, None if pooled is None else pooled.float())

    def to(self, device) -> "TextCondition":
        return TextCondition(self.tokens.to(device), self.mask.to(device),
                             None if self.pooled is None else self.pooled.to(device))

    def rows(self, index: torch.Tensor) -> "TextCondition":
        return TextCondition(self.tokens[index], self.mask[index], None if self.pooled is None else self.pooled[index])


def empty_condition(export: dict) -> TextCondition:
    """The export's empty caption (what caption dropout trained on) as one row, on the CPU."""
    empty, text = export["empty_caption"], export["text"]
    tokens = empty["tokens"].float()[None]
    mask = (torch.arange(tokens.shape[1]) < int(text["empty_length"]))[None]
    return TextCondition(tokens, mask, empty["pooled"].float()[None] if "pooled" in empty else None)


def prompt_encoder(export: dict, device: str = "cpu", precision: str = "fp32", directory=None):
    """The ``FrozenTextEncoder`` the export's captions were embedded with (``directory``: where it lives
    now, default the recorded one), refused with one line when its files are not the recorded ones."""
    from fae_pipe.encoders.text import FrozenTextEncoder

    record = export["text"]["encoder"]
    where = Path(directory or record.get("directory", ""))
    encoder = FrozenTextEncoder(where, int(export["text"]["max_length"]), device, precision,
                                key="the t2i export's text encoder")
    if record.get("fingerprint") and encoder.fingerprint != record["fingerprint"]:
        raise UserError(f"text encoder '{where}' is not the one the generator was trained with (fingerprint "
                        f"{encoder.fingerprint[:19]}... vs recorded {str(record['fingerprint'])[:19]}...): use that "
                        "directory, or re-run embed-text and train-t2i with this one")
    return encoder


def embed_prompts(encoder, prompts: list[str], device=None) -> TextCondition:
    """Prompts -> ``TextCondition`` with ``encoder`` (``prompt_encoder``), on ``device`` (default the encoder's)."""
    tokens, lengths, pooled = encoder.encode(list(prompts))
    cond = TextCondition.from_lengths(tokens, lengths, pooled)
    return cond.to(device or encoder.device)


@torch.no_grad()
def sample_text(model, noise: torch.Tensor, text: TextCondition, empty: TextCondition, method: str = "euler",
                steps: int = 250, shift: float = 1.0, guidance=None, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """Normalised latents shaped like ``noise`` (B, C, H, W), from t = 1 to 0, for the captions ``text``.

    Args:
        model: the MMDiT, called as ``model(x, t, tokens, mask, pooled)`` -> velocity.
        noise: the starting noise (``fae_pipe.sampling.plan.sample_noise`` for reproducible rows).
        text: B rows of embedded prompts (``embed_prompts``); ``empty``: one row, the empty caption
            (``empty_condition(export)``), the unconditional branch of classifier-free guidance.
        method, steps, shift: as ``transport.sample`` (shift: the export's ``transport.shift_factor``).
        guidance: None (conditional only), one scale, or segments ``[[t_start, t_end, scale], ...]``
            (``sample.guidance``; times outside every segment get scale 1). Where the scale is 1 the
            model runs once on the B conditional rows; inside a guided segment once on 2B rows.
        generator: drives the SDE noise (``plan.batch_generator``).
    Returns latents in the model's normalisation; de-normalise with the export's ``latent_stats``.
    """
    b = noise.shape[0]
    if text.tokens.shape[0] != b:
        raise UserError(f"text-conditioned sampling: {text.tokens.shape[0]} prompts for a batch of {b}")
    if empty.tokens.shape[0] != 1 or tuple(empty.tokens.shape[1:]) != tuple(text.tokens.shape[1:]) \
            or (empty.pooled is None) != (text.pooled is None):
        raise UserError(f"text-conditioned sampling: the empty caption {tuple(empty.tokens.shape)} does not match "
                        f"the prompts' embeddings {tuple(text.tokens.shape)}; embed the prompts with the export's "
                        "text encoder (prompt_encoder)")
    device = noise.device
    table = TextCondition(torch.cat([text.tokens, empty.tokens]).to(device), torch.cat([text.mask, empty.mask]).to(device),
                          None if text.pooled is None else torch.cat([text.pooled, empty.pooled]).to(device))

    def velocity(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return model(x, t, *table.rows(rows))

    rows = torch.arange(b, device=device)
    return sample(velocity, noise, rows, method=method, steps=steps, shift=shift, guidance=as_schedule(guidance),
                  null_class=b, generator=generator, progress=progress)
