"""``fae-pipe convert-export OLD.pt [--out NEW.safetensors]``: a pickled export of an earlier release -> safetensors.

Why explicit and one-time: fae-pipe never unpickles an export where a safetensors file
is expected (a pickle can run code on load). The pickled ``fae.pt``, ``decoder.pt``
(+ ``decoder_stage<N>.pt``) and ``sit.pt`` of earlier releases held only tensors and
plain types, so this reads them with ``torch.load(weights_only=True)`` (a file holding
anything else is refused unread), recognises the format tag and writes the new file
beside the old one (``fae.pt`` -> ``fae.safetensors``).

Fingerprints: the new file has another sha256, so it records the old one as
``converted_from``; the fingerprint checks (encode's store config hash, sample's
``check_fae_match``, evaluate's warning) accept either, so latents and SiT runs made
from the old ``fae.pt`` stay valid with the converted file.
"""

from __future__ import annotations

from pathlib import Path

from fae_pipe.artifacts import file_fingerprint, load_payload, save_export
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import DECODER_FORMAT, DECODER_GROUPS, FAE_FORMAT, FAE_GROUPS, split_payload
from fae_pipe.training import sit_export

# old format tag -> (new format tag, tensor groups, what it is)
OLD_FORMATS = {
    "fae-pipe/fae-v1": (FAE_FORMAT, FAE_GROUPS, "FAE export"),
    "fae-pipe/pixel-decoder-v1": (DECODER_FORMAT, DECODER_GROUPS, "pixel decoder export"),
    "fae-pipe/sit-export": (sit_export.FORMAT, sit_export.GROUPS, "SiT export"),
}


def convert(old: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the safetensors form of the pickled export ``old``; returns (new path, what it is)."""
    old = Path(old)
    if not old.is_file():
        raise UserError(f"convert-export: {old} not found")
    payload = load_payload(old, None, "train-*")
    tag = payload.get("format")
    if tag not in OLD_FORMATS:
        raise UserError(f"{old} has format {tag!r}, not a pickled fae-pipe export "
                        f"({', '.join(sorted(OLD_FORMATS))}): nothing to convert")
    if tag == sit_export.FORMAT and payload.get("version") != 1:
        raise UserError(f"{old}: SiT export version {payload.get('version')!r}; convert-export reads version 1")
    new_tag, group_keys, what = OLD_FORMATS[tag]
    target = Path(out) if out is not None else old.with_suffix(".safetensors")
    if target.resolve() == old.resolve():
        raise UserError(f"convert-export: --out {target} is the input file; pass another path")
    groups, meta = split_payload(payload, group_keys)
    meta.update(format=new_tag, converted_from=file_fingerprint(old))
    if new_tag == sit_export.FORMAT:
        meta["version"] = sit_export.VERSION
    try:
        save_export(target, groups, meta)
    except (TypeError, ValueError) as e:
        raise UserError(f"{old} cannot be converted: {e}") from None
    return target, what


def run(old: str, out: str | None = None) -> Path:
    target, what = convert(old, out)
    print(f"convert-export: {old} -> {target} ({what}; tensors in safetensors, metadata as JSON under "
          f"__metadata__['fae_pipe'], converted_from {file_fingerprint(old)[:19]}...)")
    return target
