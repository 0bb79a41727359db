"""Classifier-free guidance with a scale that depends on t, at the cost it needs.

The guided velocity is ``v = v_u + s (v_c - v_u)`` over all channels, where ``v_c``
uses the class label and ``v_u`` the null class. The FAE paper varies ``s`` over the
path (about 0.9 near noise, a middle value, 2.5 for t in [0, 0.7]) and ablates a
single scale on an interval, so the schedule is a list of ``(t_start, t_end, scale)``
segments; times covered by no segment get scale 1, i.e. plain conditional sampling.

Cost: where the scale is 1 the model is called once on the conditional batch only;
inside a segment with scale != 1 it is called once on a doubled batch (cond + null),
never twice. So guidance confined to [0, 0.7] saves the unconditional passes on
(0.7, 1].

Segment membership (documented choice, needed where segments touch): a segment
covers ``t_lo < t <= t_hi``, and a segment with ``t_lo = 0`` also covers ``t = 0``.
Sampling runs from t = 1 down, so a segment takes effect at its upper end. Either
order of the two end points is accepted; they are sorted per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from fae_pipe.errors import UserError

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class GuidanceSegment:
    """One piece of the schedule: scale ``scale`` for ``t_lo < t <= t_hi``."""

    t_lo: float
    t_hi: float
    scale: float


class GuidanceSchedule:
    """Validated, sorted, non-overlapping guidance segments over t in [0, 1]."""

    def __init__(self, segments: Iterable[Sequence[float] | GuidanceSegment]):
        parsed = []
        for i, seg in enumerate(segments):
            if isinstance(seg, GuidanceSegment):
                a, b, s = seg.t_lo, seg.t_hi, seg.scale
            else:
                try:
                    a, b, s = (float(v) for v in seg)
                except (TypeError, ValueError):
                    raise UserError(
                        f"guidance segment {i} is {seg!r}; expected three numbers (t_start, t_end, scale)"
                    ) from None
            lo, hi = min(a, b), max(a, b)
            if not (0.0 <= lo < hi <= 1.0):
                raise UserError(
                    f"guidance segment {i} ({a}, {b}, {s}): times must lie in [0, 1] and differ"
                )
            if not (math.isfinite(s) and s >= 0):
                raise UserError(f"guidance segment {i} ({a}, {b}, {s}): scale must be finite and >= 0")
            parsed.append(GuidanceSegment(lo, hi, float(s)))
        parsed.sort(key=lambda g: g.t_lo)
        for prev, nxt in zip(parsed, parsed[1:]):
            if nxt.t_lo < prev.t_hi:
                raise UserError(
                    f"guidance segments [{prev.t_lo}, {prev.t_hi}] and [{nxt.t_lo}, {nxt.t_hi}] overlap"
                )
        self.segments: tuple[GuidanceSegment, ...] = tuple(parsed)

    @classmethod
    def interval(cls, scale: float, t_lo: float = 0.0, t_hi: float = 1.0) -> "GuidanceSchedule":
        """One scale on ``[t_lo, t_hi]`` and none elsewhere (guidance interval)."""
        return cls([(t_lo, t_hi, scale)])

    @classmethod
    def three_part(
        cls,
        early: float = 0.9,
        middle: float = 1.7,
        late: float = 2.5,
        bounds: tuple[float, float] = (0.7, 0.9),
    ) -> "GuidanceSchedule":
        """The paper's shape: ``early`` on (0.9, 1], ``middle`` on (0.7, 0.9], ``late`` on [0, 0.7].

        The paper's middle value is unreadable; 1.7 (midway between its neighbours) is
        this repo's guess and only a default.
        """
        lo, hi = bounds
        return cls([(hi, 1.0, early), (lo, hi, middle), (0.0, lo, late)])

    def scale_at(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample guidance scale for times ``t`` (B,); 1 where no segment applies."""
        scale = torch.ones_like(t)
        for seg in self.segments:
            inside = (t > seg.t_lo) & (t <= seg.t_hi)
            if seg.t_lo == 0.0:
                inside = inside | (t == 0)
            scale = torch.where(inside, torch.full_like(t, seg.scale), scale)
        return scale

    def is_trivial(self) -> bool:
        """True when every segment has scale 1 (guidance never changes anything)."""
        return all(seg.scale == 1.0 for seg in self.segments)

    def __repr__(self) -> str:
        parts = ", ".join(f"({g.t_lo}, {g.t_hi}, {g.scale})" for g in self.segments)
        return f"GuidanceSchedule([{parts}])"


def as_schedule(
    guidance: "GuidanceSchedule | float | Iterable[Sequence[float]] | None",
) -> "GuidanceSchedule | None":
    """Accept a schedule, one scale for all t, a list of segments, or None (no guidance)."""
    if guidance is None or isinstance(guidance, GuidanceSchedule):
        return guidance
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        return GuidanceSchedule.interval(float(guidance))
    return GuidanceSchedule(guidance)


def guided_velocity(
    model: VelocityModel,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    null_class: int,
    schedule: GuidanceSchedule,
) -> torch.Tensor:
    """Velocity with classifier-free guidance from ``schedule`` at times ``t`` (B,).

    One model call either way: conditional only when all scales at ``t`` are 1,
    otherwise one call on ``[x, x]`` with labels ``[y, null]``. Rows whose scale is 1
    return the conditional velocity unchanged.
    """
    if y is None:
        raise UserError("classifier-free guidance needs class labels y; got None")
    scale = schedule.scale_at(t)
    guided = scale != 1
    if not bool(guided.any()):
        return model(x, t, y)
    null = torch.full_like(y, int(null_class))
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    v_c, v_u = both.chunk(2)
    s = scale.to(v_c.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    mixed = v_u + s * (v_c - v_u)
    return torch.where(guided.reshape(s.shape), mixed, v_c)
