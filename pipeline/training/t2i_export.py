"""``t2i.safetensors``: the one file text-to-image sampling needs from a train-t2i run.

Same layout and loader as the SiT and flow exports (``fae_pipe.training.sit_export``:
registry name and full kwargs, raw and EMA weights, the latent store's statistics, FAE
fingerprint and latent source, the transport record, the resolved config), plus what a
text-conditioned generator needs to be *prompted* without ``text.zarr``:

* ``text``: the text store's encoder record (``A_TEXT_ENCODER``: tower, directory,
  directory fingerprint, random flag, width, max_length) and the empty caption's length,
  so ``sample`` embeds prompts with the very encoder (checked by fingerprint) and the same
  padding the captions had;
* the tensor group ``empty_caption`` (``tokens`` (L, D) and, for encoders with one,
  ``pooled`` (D,)): the embedding caption dropout trained on, which classifier-free
  guidance uses as the unconditional branch.

The format tag ``fae-pipe/t2i-export`` and ``generator: "t2i"`` name the family for
``flow_export.generator_family``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fae_pipe.training import sit_export

FORMAT = "fae-pipe/t2i-export"
VERSION = 1
T2I_FILE = "t2i.safetensors"
EMPTY = "empty_caption"
GROUPS = (*sit_export.GROUPS, EMPTY)
REQUIRED = ("model_name", "model_kwargs", "state_dict", "ema_state_dict", "latent_stats", "fae_fingerprint",
            "latent_source", "latent_shape", "transport", "text", EMPTY, "config", "step")


def save_t2i_export(path: str | Path, **fields) -> Path:
    """Write the export with ``fields`` (all of ``REQUIRED``; ``empty_caption``: {"tokens", ["pooled"]}) atomically."""
    return sit_export.save_generator_export(path, FORMAT, VERSION, REQUIRED, fields, GROUPS, "t2i export",
                                            generator="t2i")


def load_t2i_export(path: str | Path) -> dict:
    """Read and check an export written by ``save_t2i_export`` (tensors of ``empty_caption`` as stored)."""
    return sit_export.load_generator_export(path, FORMAT, VERSION, "train-t2i", "t2i export", GROUPS)


def build_t2i_from_export(payload: dict, use_ema: bool = True) -> torch.nn.Module:
    """The trained MMDiT in eval mode, with EMA weights when asked for and present."""
    return sit_export.build_sit_from_export(payload, use_ema)
