"""Latent statistics: computed once, exactly, by ``encode``; carried as one object; (de)normalised in one place.

A latent store is only usable with the exact per-channel mean/std it was written
with (LightningDiT users lost FID to a forgotten stats file). So:

- the source is the latent store's attrs (``channel_mean``, ``channel_std``,
  ``fae_fingerprint``), written by ``encode`` from exact float64 moments;
- ``LatentStats`` is the one object that travels: training reads it from the
  store, checkpoints and ``sit.safetensors`` carry its ``to_dict()`` copy, and sampling
  rebuilds it with ``from_dict`` — no side file, nothing to lose;
- ``normalize``/``denormalize`` are the one implementation of
  ``(z - mean_c) / std_c`` and its inverse, for every caller.

Moments: each shard contributes (count, mean, M2) per channel, computed in float64
from the float16 values actually stored; they merge in shard order with Chan et
al.'s pairwise update, so the result equals numpy's over the whole array up to
float64 rounding whatever the number of workers, and avoids the cancellation of
``E[x^2] - E[x]^2`` when a channel's mean is large against its spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.errors import UserError


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean/std of a latent store and the FAE that made it."""

    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    fae_fingerprint: str | None = None
    count: int | None = None
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)  # (device, inverse) -> tensors

    @property
    def channels(self) -> int:
        return len(self.channel_mean)

    # ---- where they come from and go to --------------------------------------------------------------------
    @classmethod
    def from_attrs(cls, attrs: dict, where: str, channels: int | None = None) -> LatentStats:
        """The statistics in a latent store's attrs; a missing or malformed set is a one-line error."""
        mean, std = attrs.get(schema.A_CHANNEL_MEAN), attrs.get(schema.A_CHANNEL_STD)
        if mean is None or std is None:
            raise UserError(f"{where}: no per-channel latent statistics (attrs '{schema.A_CHANNEL_MEAN}'/"
                            f"'{schema.A_CHANNEL_STD}'); re-run `fae-pipe encode` to write them")
        stats = cls(tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std)),
                    attrs.get(schema.A_FAE_FINGERPRINT), attrs.get(schema.A_CHANNEL_STATS_COUNT))
        stats.check(where, channels)
        return stats

    @classmethod
    def from_store(cls, path) -> LatentStats:
        return cls.from_attrs(dict(schema.open_group(path).attrs), str(path))

    def to_attrs(self) -> dict:
        out = {schema.A_CHANNEL_MEAN: list(self.channel_mean), schema.A_CHANNEL_STD: list(self.channel_std)}
        if self.count is not None:
            out[schema.A_CHANNEL_STATS_COUNT] = int(self.count)
        return out

    def to_dict(self) -> dict:
        """The copy that checkpoints and ``sit.safetensors`` carry (the ``latent_stats`` field)."""
        return {"channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "fae_fingerprint": self.fae_fingerprint}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> LatentStats:
        if not isinstance(d, dict) or "channel_mean" not in d or "channel_std" not in d:
            raise UserError(f"{where}: no latent statistics recorded (latent_stats); re-run `fae-pipe train-sit`")
        stats = cls(tuple(map(float, d["channel_mean"])), tuple(map(float, d["channel_std"])), d.get("fae_fingerprint"))
        stats.check(where)
        return stats

    def check(self, where: str, channels: int | None = None) -> None:
        values = self.channel_mean + self.channel_std
        c = channels if channels is not None else self.channels
        if (len(self.channel_mean) != c or len(self.channel_std) != c or not all(map(math.isfinite, values))
                or min(self.channel_std, default=0.0) <= 0):
            raise UserError(f"{where}: '{schema.A_CHANNEL_MEAN}'/'{schema.A_CHANNEL_STD}' must be {c} finite "
                            f"numbers each with std > 0; got {len(self.channel_mean)} and {len(self.channel_std)} "
                            "values")

    # ---- the one (de)normalisation ---------------------------------------------------------------------------
    def _affine(self, x, inverse: bool):
        """(scale, shift) broadcasting over the channel axis 1 of ``x``, on its device, in float32 (made once)."""
        import torch

        key = (str(x.device), x.dim(), inverse)
        if key not in self._on_device:
            shape = (1, self.channels) + (1,) * (x.dim() - 2)
            mean = torch.tensor(self.channel_mean, dtype=torch.float64)
            std = torch.tensor(self.channel_std, dtype=torch.float64)
            scale, shift = (std, mean) if inverse else (1 / std, -mean / std)
            self._on_device[key] = (scale.view(shape).to(x.device, torch.float32),
                                    shift.view(shape).to(x.device, torch.float32))
        return self._on_device[key]

    def normalize(self, z):
        """Stored latents (B, C, ...) -> unit-scale ``(z - mean_c) / std_c`` in float32 (fp16 widened in the op)."""
        import torch

        scale, shift = self._affine(z, inverse=False)
        return torch.addcmul(shift, z, scale)

    def denormalize(self, x):
        """Unit-scale latents -> the stored space: ``x * std_c + mean_c`` in float32."""
        import torch

        scale, shift = self._affine(x, inverse=True)
        return torch.addcmul(shift, x.float(), scale)


def shard_moments(latents: np.ndarray, channel_axis: int = 2) -> dict:
    """(count, mean, M2) per channel of one shard's stored latents (any leading sample dims)."""
    x = np.moveaxis(np.asarray(latents, dtype=np.float64), channel_axis, 0)
    x = x.reshape(x.shape[0], -1)
    count = int(x.shape[1])
    if count == 0:
        zeros = [0.0] * x.shape[0]
        return {"count": 0, "mean": zeros, "m2": zeros}
    mean = x.mean(axis=1)
    m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
    return {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}


def merge_moments(parts: list[dict], fae_fingerprint: str | None = None) -> LatentStats:
    """Merge shard moments in the given order into the exact population statistics."""
    count, mean, m2 = 0, None, None
    for part in parts:
        n_b = int(part["count"])
        if n_b == 0:
            continue
        mean_b, m2_b = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        if mean is None:
            count, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta**2 * (count * n_b / n)
        count = n
    if mean is None:
        raise UserError("latent statistics: the store holds no valid sample (every sample failed in extract)")
    std = np.sqrt(m2 / count)
    return LatentStats(tuple(mean.tolist()), tuple(std.tolist()), fae_fingerprint, count)
