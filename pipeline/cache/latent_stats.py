"""Generator-input statistics: computed once, exactly, from the store; carried as one object; (de)normalised in one place.

A latent (or feature) store is only usable with the exact mean/std it was written
with (LightningDiT users lost FID to a forgotten stats file). So:

- the source is the store: a latent store's attrs (``channel_mean``, ``channel_std``,
  ``fae_fingerprint``), written by ``encode`` from exact float64 moments; a feature
  store's attrs and, per position, its ``position_mean``/``position_std`` arrays
  (``fae_pipe.cache.feature_stats`` says when those are computed);
- ``LatentStats`` is the one object that travels, for latents and for raw features
  alike: training reads it from the store, checkpoints and exports carry its
  ``to_dict()`` copy, and sampling rebuilds it with ``from_dict`` — no side file;
- ``normalize``/``denormalize`` are the one implementation of ``(z - mean) / std``
  and its inverse, for every caller. Two variants, one code path: per channel
  (mean_c broadcast over the grid) or per position and channel (RAE's option,
  ``position_mean``/``position_std`` of shape (C, H, W)). Both widen the values
  to float32 (exact) and run one in-place ``addcmul`` against float32 tables of the
  sample's full shape, made once per device and shape: the same bits as the broadcast
  float16 formula of earlier releases (a test pins it), and ~20x faster on a CPU,
  where a float16 operand or a (C, 1, 1) table takes torch's slow non-vectorised loop.

Moments: each shard contributes (count, mean, M2) per channel (or per position),
computed in float64 from the float16 values actually stored; they merge in shard
order with Chan et al.'s pairwise update, so the result equals numpy's over the
whole array up to float64 rounding whatever the number of workers, and avoids the
cancellation of ``E[x^2] - E[x]^2`` when a channel's mean is large against its spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.errors import UserError

ENCODE_HINT = "re-run `fae-pipe encode` to write them"


@dataclass(frozen=True, eq=False)
class LatentStats:
    """Mean/std of a generator input (latents or features), per channel and optionally per position.

    ``channel_mean``/``channel_std``: one value per channel (always present).
    ``position_mean``/``position_std``: float64 (C, H, W) or None; when present they
    are what ``normalize`` uses (RAE's per-position-and-channel statistics).
    """

    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    fae_fingerprint: str | None = None
    count: int | None = None
    position_mean: np.ndarray | None = None
    position_std: np.ndarray | None = None
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)  # (device, shape, inverse) -> tensors

    def __post_init__(self):
        if (self.position_mean is None) != (self.position_std is None):
            raise ValueError("position_mean and position_std come together")
        for name in ("position_mean", "position_std"):
            value = getattr(self, name)
            if value is not None:
                arr = np.array(value, dtype=np.float64)  # a private, read-only copy
                arr.flags.writeable = False
                object.__setattr__(self, name, arr)

    def __eq__(self, other) -> bool:
        if not isinstance(other, LatentStats):
            return NotImplemented
        same_positions = (self.per_position == other.per_position and (not self.per_position or (
            np.array_equal(self.position_mean, other.position_mean)
            and np.array_equal(self.position_std, other.position_std))))
        return ((self.channel_mean, self.channel_std, self.fae_fingerprint, self.count)
                == (other.channel_mean, other.channel_std, other.fae_fingerprint, other.count)) and same_positions

    __hash__ = None  # mutable-looking arrays inside; compare with ==

    @property
    def channels(self) -> int:
        return len(self.channel_mean)

    @property
    def per_position(self) -> bool:
        return self.position_mean is not None

    def per_channel(self) -> LatentStats:
        """The same statistics without the per-position tables (normalise per channel)."""
        return LatentStats(self.channel_mean, self.channel_std, self.fae_fingerprint, self.count)

    # ---- where they come from and go to --------------------------------------------------------------------
    @classmethod
    def from_attrs(cls, attrs: dict, where: str, channels: int | None = None, what: str = "latent",
                   hint: str = ENCODE_HINT) -> LatentStats:
        """The per-channel statistics in a store's attrs; a missing or malformed set is a one-line error."""
        mean, std = attrs.get(schema.A_CHANNEL_MEAN), attrs.get(schema.A_CHANNEL_STD)
        if mean is None or std is None:
            raise UserError(f"{where}: no per-channel {what} statistics (attrs '{schema.A_CHANNEL_MEAN}'/"
                            f"'{schema.A_CHANNEL_STD}'); {hint}")
        stats = cls(tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std)),
                    attrs.get(schema.A_FAE_FINGERPRINT), attrs.get(schema.A_CHANNEL_STATS_COUNT))
        stats.check(where, channels)
        return stats

    @classmethod
    def from_store(cls, path) -> LatentStats:
        return cls.from_attrs(dict(schema.open_group(path).attrs), str(path))

    def to_attrs(self) -> dict:
        """The per-channel part, as store attrs (per-position tables are arrays, see ``feature_stats``)."""
        out = {schema.A_CHANNEL_MEAN: list(self.channel_mean), schema.A_CHANNEL_STD: list(self.channel_std)}
        if self.count is not None:
            out[schema.A_CHANNEL_STATS_COUNT] = int(self.count)
        return out

    def to_dict(self) -> dict:
        """The copy that checkpoints and exports carry (``latent_stats``): JSON types only, float64 exact.

        Per-position tables add ``position_shape`` [C, H, W] and the flattened
        ``position_mean``/``position_std`` (C*H*W floats each: 0.2M, ~4 MB of JSON, for DINOv2-B at 16x16).
        """
        out = {"channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
               "fae_fingerprint": self.fae_fingerprint}
        if self.per_position:
            out.update({"position_shape": list(self.position_mean.shape),
                        "position_mean": self.position_mean.ravel().tolist(),
                        "position_std": self.position_std.ravel().tolist()})
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str) -> LatentStats:
        if not isinstance(d, dict) or "channel_mean" not in d or "channel_std" not in d:
            raise UserError(f"{where}: no latent statistics recorded (latent_stats); re-run `fae-pipe train-sit`")
        positions = {}
        if "position_shape" in d:
            shape = tuple(int(v) for v in d["position_shape"])
            try:
                positions = {k: np.asarray(d[k], np.float64).reshape(shape) for k in ("position_mean", "position_std")}
            except (KeyError, ValueError):
                raise UserError(f"{where}: latent_stats position_mean/position_std must hold {shape} values each") from None
        stats = cls(tuple(map(float, d["channel_mean"])), tuple(map(float, d["channel_std"])), d.get("fae_fingerprint"),
                    **positions)
        stats.check(where)
        return stats

    def check(self, where: str, channels: int | None = None, grid: tuple[int, int] | None = None) -> None:
        values = self.channel_mean + self.channel_std
        c = channels if channels is not None else self.channels
        if (len(self.channel_mean) != c or len(self.channel_std) != c or not all(map(math.isfinite, values))
                or min(self.channel_std, default=0.0) <= 0):
            raise UserError(f"{where}: '{schema.A_CHANNEL_MEAN}'/'{schema.A_CHANNEL_STD}' must be {c} finite "
                            f"numbers each with std > 0; got {len(self.channel_mean)} and {len(self.channel_std)} "
                            "values")
        if self.per_position:
            shape = (c, *grid) if grid is not None else (c, *self.position_mean.shape[1:])
            mean, std = self.position_mean, self.position_std
            if (mean.shape != shape or std.shape != shape or len(shape) != 3 or not np.isfinite(mean).all()
                    or not np.isfinite(std).all() or not (std > 0).all()):
                raise UserError(f"{where}: '{schema.POSITION_MEAN}'/'{schema.POSITION_STD}' must be finite "
                                f"{shape} tables with std > 0; got {mean.shape} and {std.shape}")

    # ---- the one (de)normalisation ---------------------------------------------------------------------------
    def _affine(self, x, inverse: bool):
        """(scale, shift) of ``x``'s sample shape (C, ...), on its device, float32, contiguous (made once)."""
        import torch

        key = (x.device, tuple(x.shape[1:]), inverse)
        tables = self._on_device.get(key)
        if tables is None:
            rest = tuple(x.shape[2:])
            if self.per_position:
                if tuple(x.shape[1:]) != self.position_mean.shape:
                    raise UserError(f"per-position statistics are {self.position_mean.shape}; the input is "
                                    f"{tuple(x.shape[1:])} per sample")
                mean, std = torch.tensor(self.position_mean), torch.tensor(self.position_std)  # float64 copies
            else:
                if x.dim() < 2 or x.shape[1] != self.channels:
                    raise UserError(f"statistics have {self.channels} channels; the input is {tuple(x.shape)} "
                                    "(channels on dim 1)")
                shape = (self.channels,) + (1,) * len(rest)
                mean = torch.tensor(self.channel_mean, dtype=torch.float64).view(shape)
                std = torch.tensor(self.channel_std, dtype=torch.float64).view(shape)
            scale, shift = (std, mean) if inverse else (1 / std, -mean / std)
            full = (self.channels, *rest)
            tables = tuple(t.to(torch.float32).expand(full).contiguous().to(x.device) for t in (scale, shift))
            self._on_device[key] = tables
        return tables

    def normalize(self, z):
        """Stored values (B, C, ...) -> unit-scale ``(z - mean) / std``: a new contiguous float32 tensor
        (float16 widened exactly first; ``z`` may be a strided view, e.g. tokens seen as a grid)."""
        scale, shift = self._affine(z, inverse=False)
        return _addcmul(shift, z, scale)

    def normalizer(self, sample_shape, device):
        """``normalize`` for inputs of one sample shape (C, ...) on one device, tables bound once:
        the same bits, without the table lookup per call (loaders call it per batch)."""
        import torch

        scale, shift = self._affine(torch.empty((0, *sample_shape), device=device), inverse=False)
        return lambda z: _addcmul(shift, z, scale)

    def denormalize(self, x):
        """Unit-scale values -> the stored space: ``x * std + mean`` in float32 (contiguous)."""
        scale, shift = self._affine(x, inverse=True)
        return _addcmul(shift, x, scale)


def _addcmul(shift, x, scale):
    """``shift + x * scale`` into a new contiguous float32 tensor.

    ``x`` is first widened into that tensor (a strided ``x``, e.g. tokens seen as a
    grid, is transposed in the same copy), then the fused multiply-add runs in place:
    float32-only ``addcmul`` is vectorised, a float16 operand is not (measured 20x
    slower on 250k elements), and widening float16 is exact, so the bits are the same.
    """
    import torch

    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return torch.addcmul(shift, out, scale, out=out)


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


def merge_two(a: dict | None, b: dict) -> dict | None:
    """Chan et al.'s pairwise update of moments ``a`` with ``b`` (``mean``/``m2`` arrays of any one shape).

    The one merge step: folding shards with it in a fixed order gives the same bits
    whether the parts are held in a list (``merge_moments``) or streamed.
    """
    n_b = int(b["count"])
    if n_b == 0:
        return a
    mean_b, m2_b = np.asarray(b["mean"], np.float64), np.asarray(b["m2"], np.float64)
    if a is None:
        return {"count": n_b, "mean": mean_b.copy(), "m2": m2_b.copy()}
    n_a, mean_a = a["count"], a["mean"]
    n = n_a + n_b
    delta = mean_b - mean_a
    return {"count": n, "mean": mean_a + delta * (n_b / n), "m2": a["m2"] + m2_b + delta**2 * (n_a * n_b / n)}


def merge_moments(parts: list[dict], fae_fingerprint: str | None = None) -> LatentStats:
    """Merge shard moments in the given order into the exact population statistics."""
    total = None
    for part in parts:
        total = merge_two(total, part)
    if total is None:
        raise UserError("latent statistics: the store holds no valid sample (every sample failed in extract)")
    std = np.sqrt(total["m2"] / total["count"])
    return LatentStats(tuple(total["mean"].tolist()), tuple(std.tolist()), fae_fingerprint, total["count"])
