"""Offline weight files for metric networks (LPIPS backbones, FID Inception).

Why this file exists: a metric computed with the wrong or random weights gives a
plausible-looking but meaningless number. Every metric network here is built
with random initialisation and then filled from a local file with a strict
key/shape check; nothing is ever downloaded. A missing file raises
``MetricUnavailable`` (a ``UserError``) that says which file to put where, so
a stage can report "FID unavailable" instead of failing or guessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.errors import UserError


class MetricUnavailable(UserError):
    """A metric cannot be computed here: its weight file or optional package is missing.

    Callers that can go on without the metric catch this (and only this) and
    report the metric as unavailable; every other ``UserError`` still stops them.
    """


def hub_checkpoint_path(filename: str) -> Path:
    """Where torchvision caches ``filename``: ``$TORCH_HOME/hub/checkpoints/`` (read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict from ``path`` on CPU (weights_only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise MetricUnavailable(f"{what}: weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable/corrupt file is the user's to fix
        raise UserError(f"{what}: cannot read weight file {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what}: {path} is not a plain state dict of tensors")
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Copy ``state`` into ``module``; any missing/unexpected key or shape mismatch is a UserError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise UserError(
            f"{what}: {path} does not match the expected network "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]})"
        )
    module.load_state_dict(state, strict=True)
