"""The files a trained FAE is shipped as, and their validation.

Three small artefacts travel together in the FAE run directory:

- ``fae.pt``: encoder + feature decoder weights (EMA when enabled), the registry
  names to rebuild them, the token grid, the config and the fingerprint of the
  feature store they were trained on. Written by ``train-fae``.
- ``latent_stats.json``: exact per-channel mean/std of the encoded latents plus
  the sha256 of the ``fae.pt`` they were computed with. Written by ``encode``,
  so decoding never depends on finding the latent store.
- ``decoder.pt`` (decoder run directory): pixel decoder weights. Written by
  ``train-decoder``.

Every loader checks the ``format`` tag and names the file in its error, so a
wrong path is one line, not a traceback deep inside ``load_state_dict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fae_pipe.errors import UserError
from fae_pipe.artifacts import file_fingerprint

FAE_FORMAT = "fae-pipe/fae-v1"
DECODER_FORMAT = "fae-pipe/pixel-decoder-v1"
STATS_FORMAT = "fae-pipe/latent-stats-v1"
FAE_FILE = "fae.pt"
DECODER_FILE = "decoder.pt"
STATS_FILE = "latent_stats.json"


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` to a temp file, then rename: a killed writer never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_unless_same_weights(payload: dict, path: str | Path, weight_keys: tuple[str, ...]) -> bool:
    """Write ``payload`` unless ``path`` already holds the same weights; True when written.

    Why: downstream artefacts pin an export by its sha256 (the latent store's config
    hash, ``latent_stats.json``, every SiT checkpoint). A re-run that trains nothing,
    e.g. ``dvc repro`` after a code change resuming a finished run, must not give the
    same model a new fingerprint through run-specific fields such as wall time.
    """
    path = Path(path)
    if path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # unreadable: replace it
            old = None
        if isinstance(old, dict) and all(_same(old.get(k), payload[k]) for k in weight_keys):
            return False
    atomic_torch_save(payload, path)
    return True


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def atomic_write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _load(path: Path, fmt: str, made_by: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found: run `fae-pipe {made_by}` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"{path} cannot be read ({type(e).__name__}): "
                        f"pass a file written by `fae-pipe {made_by}`") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} file: pass the file written by `fae-pipe {made_by}`")
    return payload


def load_fae_file(path: str | Path) -> dict:
    """The ``fae.pt`` payload (validated format)."""
    return _load(Path(path), FAE_FORMAT, "train-fae")


def load_decoder_file(path: str | Path) -> dict:
    """The ``decoder.pt`` payload (validated format)."""
    return _load(Path(path), DECODER_FORMAT, "train-decoder")


def stats_path_for(fae_path: str | Path) -> Path:
    """Where the latent statistics of ``fae.pt`` live: beside it."""
    return Path(fae_path).with_name(STATS_FILE)


def write_latent_stats(fae_path: str | Path, mean, std, count: int, source: dict) -> Path:
    """Save the exact channel statistics next to ``fae.pt``, tied to its sha256."""
    payload = {
        "format": STATS_FORMAT,
        "fae_fingerprint": file_fingerprint(fae_path),
        "channel_mean": [float(v) for v in mean],
        "channel_std": [float(v) for v in std],
        "count_per_channel": int(count),
        "source": source,
    }
    return atomic_write_json(stats_path_for(fae_path), payload)


def load_latent_stats(fae_path: str | Path) -> dict:
    """The statistics saved beside ``fae.pt``; refuse stats that belong to another ``fae.pt``."""
    path = stats_path_for(fae_path)
    if not path.is_file():
        raise UserError(f"{path} not found: run `fae-pipe encode` to compute the latent statistics of {fae_path}")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: re-run `fae-pipe encode --overwrite`") from None
    if payload.get("format") != STATS_FORMAT:
        raise UserError(f"{path} is not a {STATS_FORMAT} file: re-run `fae-pipe encode --overwrite`")
    if payload["fae_fingerprint"] != file_fingerprint(fae_path):
        raise UserError(f"{path} was computed with a different {Path(fae_path).name} "
                        f"(fingerprint {payload['fae_fingerprint'][:19]}...): re-run `fae-pipe encode --overwrite`")
    return payload
