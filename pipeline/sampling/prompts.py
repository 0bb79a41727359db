"""Prompts for text-to-image sampling: ``--prompt "..."``, or a file of them (``--prompts FILE``).

A file is either plain text (one prompt per line; blank lines and lines starting with
``#`` are skipped) or JSONL (``.jsonl``: one object per line with a ``prompt`` string and
any other fields). The other fields travel with the prompt into ``samples.json``, which
is how ``evaluate`` gets the attributes its oracle compares images with (the caption
demo's ``prompts.jsonl`` carries colour, shape, count, background and heldout) and
which prompts belong to held-out combinations.
"""

from __future__ import annotations

import json
from pathlib import Path

from fae_pipe.errors import UserError


def read_prompts(path) -> list[dict]:
    """[{"prompt": str, ...extra fields}] from a .txt or .jsonl file; a bad file is a one-line ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file '{path}' not found: give a .txt file (one prompt per line) or a .jsonl file "
                        "({\"prompt\": ...} per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompts file '{path}' cannot be read: {e}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (path.suffix.lower() != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix.lower() != ".jsonl":
            rows.append({"prompt": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts file '{path}' line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"prompts file '{path}' line {number}: expected an object with a non-empty "
                            "\"prompt\" string")
        rows.append(row)
    if not rows:
        raise UserError(f"prompts file '{path}' holds no prompts")
    return rows


def resolve_prompts(prompt: tuple[str, ...] | list[str] | None, prompts_file: str | None) -> list[dict]:
    """The prompts to sample: ``--prompt`` values (repeatable) and/or the ``--prompts`` file, in that order."""
    rows = [{"prompt": p.strip()} for p in (prompt or ()) if p.strip()]
    if prompt and len(rows) != len(prompt):
        raise UserError("--prompt: an empty prompt is not valid (the empty caption is the unconditional branch)")
    if prompts_file:
        rows += read_prompts(prompts_file)
    if not rows:
        raise UserError("a text-to-image export needs prompts: pass --prompt \"...\" or --prompts FILE "
                        "(or set sample.prompts)")
    return rows
