"""The transport a generator's config section asks for: time distribution, timestep shift, their export record.

Why one object: every diffusion generator (``train-sit``, ``train-t2i``) reads the same
keys of its section (``time_dist``, ``time_mean``, ``time_std``, ``shift_mode``,
``shift``, ``shift_base_dim``), resolves the shift for its latent size the same way,
draws the training loss with them, and writes the same ``transport`` record into its
export, which sampling reads back (``shift_factor``: the grid's shift must be the
training shift). Written once here, so the two stages cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from fae_pipe.transport.loss import TransportLoss, training_loss
from fae_pipe.transport.timesteps import resolve_shift_mode, shift_factor


@dataclass(frozen=True)
class TransportSettings:
    """A section's resolved transport; ``shift`` is the factor ``a`` of ``timesteps.shift_t``."""

    time_dist: str
    time_mean: float
    time_std: float
    shift_mode: str  # resolved (never "auto")
    shift_mode_config: str  # as configured
    shift_value: float  # the section's ``shift`` (the scalar mode's s)
    shift_base_dim: int
    generator_input: str
    shift: float

    @classmethod
    def of(cls, section, latent_dim: int, generator_input: str = "latents") -> "TransportSettings":
        """From a config section with the transport keys (``cfg.sit``, ``cfg.t2i``), for inputs of
        ``latent_dim`` = C * H * W values."""
        mode = resolve_shift_mode(section.shift_mode, generator_input)
        return cls(section.time_dist, float(section.time_mean), float(section.time_std), mode, section.shift_mode,
                   float(section.shift), int(section.shift_base_dim), generator_input,
                   shift_factor(mode, section.shift, latent_dim=latent_dim, base_dim=section.shift_base_dim))

    def loss(self, model, x0, y, generator, hidden_at: int | None = None) -> TransportLoss:
        """``training_loss`` with this section's time distribution and shift."""
        return training_loss(model, x0, y, generator=generator, time_dist=self.time_dist, time_mean=self.time_mean,
                             time_std=self.time_std, shift=self.shift, hidden_at=hidden_at)

    def record(self, **extra) -> dict:
        """The export's ``transport`` field (``extra``: the family's own entries, e.g. ``null_class``)."""
        return {"shift_mode": self.shift_mode, "shift_mode_config": self.shift_mode_config, "shift": self.shift_value,
                "shift_base_dim": self.shift_base_dim, "generator_input": self.generator_input,
                "shift_factor": self.shift, "time_dist": self.time_dist, **extra}
