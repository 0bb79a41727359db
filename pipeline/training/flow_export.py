"""``flow.safetensors``: the one file the sampling stage needs from a train-flow run.

Same layout and reasons as the SiT export (``fae_pipe.training.sit_export``): registry
name and full kwargs, raw and EMA weights, the latent store's statistics and FAE
fingerprint, the resolved config; plus what sampling needs of the flow itself
(``flow``: the training noise sigma for the Tweedie step, the null class). The format
tag ``fae-pipe/flow-export`` and the field ``generator: "flow"`` name the generator
family, so ``fae-pipe sample`` picks the flow's sampler from the file it is given
(``generator_family``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.artifacts import read_export_meta
from fae_pipe.training import sit_export, t2i_export

FORMAT = "fae-pipe/flow-export"
VERSION = 1
FLOW_FILE = "flow.safetensors"
GROUPS = sit_export.GROUPS
REQUIRED = ("model_name", "model_kwargs", "state_dict", "ema_state_dict", "latent_stats", "fae_fingerprint",
            "num_classes", "latent_shape", "flow", "config", "step")
FAMILIES = {sit_export.FORMAT: "sit", FORMAT: "flow", t2i_export.FORMAT: "t2i"}


def save_flow_export(path: str | Path, **fields) -> Path:
    """Write the export with ``fields`` (all of ``REQUIRED``) to ``path`` atomically."""
    return sit_export.save_generator_export(path, FORMAT, VERSION, REQUIRED, fields, GROUPS, "flow export",
                                            generator="flow")


def load_flow_export(path: str | Path) -> dict:
    """Read and check an export written by ``save_flow_export``."""
    return sit_export.load_generator_export(path, FORMAT, VERSION, "train-flow", "flow export")


def generator_family(path: str | Path) -> str:
    """"sit", "flow" or "t2i": which generator wrote the export at ``path`` (by its format tag).

    Anything else (missing, pickled, another format) answers "sit", so the SiT loader reports it
    with its precise one-line error (not found, convert-export, wrong format).
    """
    return FAMILIES.get((read_export_meta(path) or {}).get("format"), "sit") if Path(path).is_file() else "sit"


def build_flow_from_export(payload: dict, use_ema: bool = True) -> torch.nn.Module:
    """The trained flow in eval mode, with EMA weights when asked for and present."""
    return sit_export.build_sit_from_export(payload, use_ema)
