"""WebDataset tar shards (``data.source=webdataset``) as written by img2dataset, read with stdlib tarfile.

A shard is a plain tar whose members are grouped by key: the member name up to the
first dot of its file name (``000000123.jpg``, ``000000123.txt``, ``000000123.json``
are sample ``000000123``), the WebDataset convention. Per key: the image (the first
member with an image extension), the captions (``.txt``, one per line; without one, the
``.json``'s ``caption``/``captions``) and ``heldout`` from the ``.json`` when present.
A key with no image member is recorded as a failure. The members of one key must be
consecutive (the WebDataset rule, which img2dataset follows); a tar re-packed in another
order (say, sorted by extension) shows up as "no image member" failures.

Only the tar headers and the small text members are read here (``tarfile`` seeks over
the image data); images stay in the shards and the index keeps each one's shard and
data offset (``fae_pipe.data.tar_members``). Shards: ``data.root`` is a directory (its
``*.tar``, sorted) or a pattern with ``{a..b}`` numeric ranges (zero padding kept),
``{x,y}`` lists and glob wildcards; the index root is the pattern's directory and shard
paths are stored relative to it. An unreadable or truncated shard is a ``UserError``
naming it (its samples cannot be located reliably).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from array import array
from pathlib import Path

import numpy as np

from fae_pipe.data.captions import _Rows, caption_lines, clean
from fae_pipe.data.folder import IMAGE_EXTENSIONS
from fae_pipe.data.columns import TarColumn
from fae_pipe.errors import UserError
from fae_pipe.phases import phase

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b``; ``{x,y}`` -> both; nested groups expand left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        step = 1 if hi >= lo else -1
        items = [f"{k:0{width}d}" for k in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def resolve_shards(spec: str) -> tuple[str, list[str]]:
    """(index root, shard paths relative to it) of ``data.root`` (a directory or a pattern)."""
    if os.path.isdir(spec):
        root, found = spec, sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    else:
        magic = min((spec.find(c) for c in "{*?[" if c in spec), default=-1)
        if magic < 0 and not os.path.isfile(spec):
            raise UserError(f"data.root '{spec}' (data.source=webdataset) is neither a directory of .tar shards, "
                            f"a shard nor a pattern like shards/{{00000..00099}}.tar or shards/*.tar")
        root = os.path.dirname(spec[:magic] if magic >= 0 else spec) or "."
        found = []
        for p in expand_braces(spec):
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            missing = [h for h in hits if not os.path.isfile(h)]
            if missing:
                raise UserError(f"data.root '{spec}': shard '{missing[0]}' does not exist")
            found.extend(hits)
    if not found:
        raise UserError(f"data.root '{spec}' matches no .tar shards")
    return root, [Path(os.path.relpath(p, root)).as_posix() for p in found]


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset key and extension of a member name: split at the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _sample(tf: tarfile.TarFile, members: dict, where: str):
    """(image TarInfo or None, captions, heldout) of one key's members."""
    image = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTENSIONS), None)
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(tf.extractfile(members["json"]).read())
        except ValueError as e:
            raise UserError(f"{where}: {members['json'].name} is not valid JSON ({e})") from None
        meta = meta if isinstance(meta, dict) else {}
    if "txt" in members:
        try:
            caps = caption_lines(tf.extractfile(members["txt"]).read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: {members['txt'].name} is not UTF-8 text ({e})") from None
    else:
        caps = meta.get("captions", meta.get("caption"))
        caps = clean([caps] if isinstance(caps, str) else [c for c in caps or [] if isinstance(c, str)])
    heldout = meta.get("heldout")
    if heldout is not None and not isinstance(heldout, bool):
        raise UserError(f"{where}: 'heldout' in {members['json'].name} must be true or false, got {heldout!r}")
    return image, caps, heldout


def read_webdataset(spec: str):
    """The ``Pairs`` of every sample of every shard, in shard order then member order."""
    root, shards = resolve_shards(spec)
    rows = _Rows(f"data.root '{spec}'")
    tar_ids, offsets, sizes = array("q"), array("q"), array("q")

    def flush(t: int, tf, key: str, members: dict, where: str) -> None:
        image, caps, heldout = _sample(tf, members, where)
        if image is None:
            rows.failures.append({"path": f"{shards[t]}[{key}]", "reason": "no image member "
                                  f"({', '.join('.' + e for e in members)} only)"})
            return
        rows.add(image.name, caps, heldout, row=f"{shards[t]}[{image.name}]")
        tar_ids.append(t)
        offsets.append(image.offset_data)
        sizes.append(image.size)

    from tqdm import tqdm

    with phase("captions: read tar shards"):
        for t, rel in enumerate(tqdm(shards, desc="reading shards", unit="tar", leave=False, disable=None)):
            path = os.path.join(root, *rel.split("/"))
            where = f"shard '{path}'"
            try:
                with tarfile.open(path, "r:") as tf:
                    key, members = None, {}
                    for m in tf:
                        if not m.isfile():
                            continue
                        k, ext = _key_ext(m.name)
                        if k != key and members:
                            flush(t, tf, key, members, where)
                            members = {}
                        key = k
                        members.setdefault(ext, m)
                    if members:
                        flush(t, tf, key, members, where)
                    tf.members = []  # the TarInfos of a 10k-sample shard are not kept past it
            except (tarfile.TarError, OSError, EOFError) as e:
                raise UserError(f"{where} is not a readable tar ({type(e).__name__}: {e}): fix or remove the shard")
    pairs = rows.finish(root)
    pairs.tars = TarColumn(shards, np.frombuffer(tar_ids, np.int64), np.frombuffer(offsets, np.int64))
    pairs.sizes = np.frombuffer(sizes, np.int64).copy()
    return pairs
