"""Parquet manifests (``data.source=manifest``, ``.parquet``): Arrow columns straight into index columns.

Same fields and rules as the JSONL/CSV manifests (``fae_pipe.data.captions``): ``path``,
``caption`` (string) or ``captions`` (list of strings), optional ``heldout`` (bool), extra
columns never read. Arrow already stores a string column as one byte buffer plus
offsets, which is exactly the index's ``PathColumn``, so paths and captions are moved
buffer to buffer and stripped/filtered with ``pyarrow.compute``: no Python string per
row. pyarrow is an optional extra (``pip install fae-pipe[parquet]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fae_pipe.data.columns import CaptionColumn, PathColumn
from fae_pipe.errors import UserError


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("a Parquet manifest needs pyarrow: pip install fae-pipe[parquet]") from None
    return pa, pc, pq


def _strings(arr, pa) -> PathColumn:
    """A (non-null) Arrow string array as a ``PathColumn``: a view of its data buffer, offsets widened to int64."""
    _, offsets, data = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(offsets, width)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    blob = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return PathColumn(blob[offsets[0]:offsets[-1]], offsets - offsets[0])


def _first(mask, pc) -> int:
    return int(pc.index(mask, True).as_py()) + 1  # 1-based data row (the header is no row here)


def read_parquet(path: Path):
    from fae_pipe.data.captions import Pairs

    pa, pc, pq = _pyarrow()
    where = f"manifest '{path}'"
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "path" not in names or ("caption" in names) == ("captions" in names):
            raise UserError(f"{where}: needs a 'path' column and one of 'caption' (string) or 'captions' (list of "
                            f"strings); it has {', '.join(names)}")
        table = pf.read(columns=[c for c in ("path", "caption", "captions", "heldout") if c in names])
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{where}: unreadable Parquet file ({e})") from None
    paths = table["path"].combine_chunks()
    if not (pa.types.is_string(paths.type) or pa.types.is_large_string(paths.type)):
        raise UserError(f"{where}: 'path' must be a string column, it is {paths.type}")
    empty = pc.or_kleene(pc.is_null(paths), pc.equal(pc.utf8_length(paths), 0)).fill_null(True)
    if pc.any(empty).as_py():
        raise UserError(f"{where} row {_first(empty, pc)}: 'path' must be a non-empty string")
    n = len(paths)
    if "captions" in names:
        lists = table["captions"].combine_chunks()
        if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)) \
                or not pa.types.is_string(lists.type.value_type) and not pa.types.is_large_string(lists.type.value_type):
            raise UserError(f"{where}: 'captions' must be a list-of-strings column, it is {lists.type}")
        flat, parents = pc.list_flatten(lists), np.asarray(pc.list_parent_indices(lists), np.int64)
    else:
        flat = table["caption"].combine_chunks()
        if not (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
            raise UserError(f"{where}: 'caption' must be a string column, it is {flat.type}")
        parents = np.arange(n, dtype=np.int64)
    if pc.any(pc.match_substring_regex(flat, r"^\s|\s$")).as_py():  # new buffers only when something changes
        flat = pc.utf8_trim_whitespace(flat)
    good = pc.greater(pc.utf8_length(flat), 0).fill_null(False)
    if not pc.all(good).as_py():
        flat = flat.filter(good)
    texts = _strings(flat, pa)
    counts = np.bincount(parents[np.asarray(good, bool)], minlength=n)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    heldout = None
    if "heldout" in names:
        column = table["heldout"].combine_chunks()
        if not (pa.types.is_boolean(column.type) or pa.types.is_integer(column.type)):
            raise UserError(f"{where}: 'heldout' must be a boolean column, it is {column.type}")
        if column.null_count:
            raise UserError(f"{where} row {_first(pc.is_null(column), pc)}: 'heldout' is missing: give it for "
                            f"every row or drop the column (then data.holdout_fraction decides)")
        heldout = np.asarray(column.cast(pa.bool_()), bool)
    return Pairs(root=str(path.parent), paths=_strings(paths, pa), captions=CaptionColumn(texts, starts),
                 heldout=heldout)
