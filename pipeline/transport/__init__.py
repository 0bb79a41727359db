"""Transport: the linear interpolant, training loss, timestep shift and samplers.

Convention: ``x_t = (1 - t) x0 + t eps``, t = 0 data, t = 1 noise; the model is any
callable ``model(x, t, y) -> velocity`` with t a (B,) float tensor in [0, 1].
See docs/transport.md for the derivations and the choices made where the FAE paper
is silent.
"""

from fae_pipe.transport.guidance import (
    GuidanceSchedule,
    GuidanceSegment,
    as_schedule,
    guided_velocity,
)
from fae_pipe.transport.interpolant import (
    expand_time,
    interpolate,
    velocity_target,
    velocity_to_eps,
    velocity_to_score,
    velocity_to_x0,
    x0_eps_to_velocity,
)
from fae_pipe.transport.loss import TransportLoss, training_loss
from fae_pipe.transport.samplers import METHODS, sample
from fae_pipe.transport.settings import TransportSettings
from fae_pipe.transport.timesteps import (
    BASE_DIM,
    SHIFT_MODES,
    TIME_DISTS,
    sample_t,
    resolve_shift_mode,
    shift_factor,
    shift_t,
    time_grid,
)

__all__ = [
    "BASE_DIM",
    "GuidanceSchedule",
    "GuidanceSegment",
    "METHODS",
    "SHIFT_MODES",
    "TIME_DISTS",
    "TransportLoss",
    "TransportSettings",
    "as_schedule",
    "expand_time",
    "guided_velocity",
    "interpolate",
    "sample",
    "sample_t",
    "resolve_shift_mode",
    "shift_factor",
    "shift_t",
    "time_grid",
    "training_loss",
    "velocity_target",
    "velocity_to_eps",
    "velocity_to_score",
    "velocity_to_x0",
    "x0_eps_to_velocity",
]
