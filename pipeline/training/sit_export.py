"""``sit.safetensors``: the one file the sampling stage needs from a SiT run.

Why a format of its own (not a checkpoint): sampling must rebuild the exact
network and undo the exact latent normalisation it was trained with, without the
optimizer state or the run directory. So the export holds the registry name and
full kwargs, raw and EMA weights, the latent store's per-channel statistics and
FAE fingerprint (to refuse decoding with a different FAE), the transport settings
and the resolved config. Written atomically; read back with ``load_sit_export``.

Layout (``fae_pipe.artifacts.save_export``): one safetensors file, tensors
``state_dict/*`` and ``ema_state_dict/*`` (absent when EMA is off), every other
field one JSON document in ``__metadata__["fae_pipe"]``; nothing is unpickled on
load. A pickled ``sit.pt`` of earlier releases converts once with
``fae-pipe convert-export``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.artifacts import load_export, save_export
from fae_pipe.errors import UserError

FORMAT = "fae-pipe/sit-export"
VERSION = 2  # 1: the pickled sit.pt of earlier releases
SIT_FILE = "sit.safetensors"
GROUPS = ("state_dict", "ema_state_dict")
REQUIRED = ("model_name", "model_kwargs", "state_dict", "ema_state_dict", "latent_stats", "fae_fingerprint",
            "num_classes", "latent_shape", "transport", "config", "step")


def save_sit_export(path: str | Path, **fields) -> Path:
    """Write the export with ``fields`` (all of ``REQUIRED``) to ``path`` atomically."""
    return save_generator_export(path, FORMAT, VERSION, REQUIRED, fields, what="sit export")


def save_generator_export(path: str | Path, fmt: str, version: int, required: tuple[str, ...], fields: dict,
                          groups: tuple[str, ...] = GROUPS, what: str = "generator export", **tags) -> Path:
    """A generator export (any family): ``fields`` (all of ``required``), the tensor ``groups`` among them stored
    as tensors, everything else and ``tags`` (e.g. ``generator="flow"``) as the JSON document; atomically."""
    missing = [k for k in required if k not in fields]
    if missing:
        raise ValueError(f"{what} is missing {missing}")
    meta = {"format": fmt, "version": version, **tags, **{k: v for k, v in fields.items() if k not in groups}}
    return save_export(path, {k: fields[k] for k in groups}, meta)


def load_sit_export(path: str | Path) -> dict:
    """Read and check an export written by ``save_sit_export``."""
    return load_generator_export(path, FORMAT, VERSION, "train-sit", "SiT export")


def load_generator_export(path: str | Path, fmt: str, version: int, made_by: str, what: str,
                          groups: tuple[str, ...] = GROUPS) -> dict:
    """A generator export (SiT's, the flow's, the text-to-image MMDiT's) as one dict: its fields and tensor
    ``groups`` (the weights, plus a family's own, e.g. t2i's empty caption), format and version checked."""
    p = Path(path)
    stored, meta = load_export(p, fmt, made_by, what=what)
    if meta.get("version") != version:
        raise UserError(f"{what} '{p}' has version {meta.get('version')!r}; this fae-pipe reads {version}")
    return {**meta, **{k: stored.get(k) for k in groups}}


def build_sit_from_export(payload: dict, use_ema: bool = True) -> torch.nn.Module:
    """The trained SiT in eval mode, with EMA weights when asked for and present."""
    from fae_pipe.models.registry import create_model

    model = create_model(payload["model_name"], **payload["model_kwargs"])
    state = payload["ema_state_dict"] if use_ema and payload["ema_state_dict"] is not None else payload["state_dict"]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
