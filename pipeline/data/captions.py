"""Captioned data sources -> a captioned ``DatasetIndex`` (the text-to-image side of ``prepare``).

Sources (``data.source``; ``folder`` is the class folder of ``fae_pipe.data.folder``):

* ``captions_folder``: images anywhere under ``data.root`` (walked depth first in sorted
  order, symlinks followed once; hidden files and directories, such as macOS ``._x.jpg``,
  left out), each with a caption file beside it: ``x.jpg`` + ``x.txt``. A ``.txt`` holds
  one caption per line (COCO's five captions are five lines); blank lines are ignored.
* ``manifest``: ``data.manifest``, one row per image, as JSONL (``.jsonl``/``.ndjson``),
  CSV (``.csv``, header row) or Parquet (``.parquet``/``.pq``, needs pyarrow:
  ``pip install fae-pipe[parquet]``). Fields: ``path`` (relative to the manifest's
  directory, or absolute), ``caption`` (a string) or ``captions`` (a list of strings; in
  CSV a JSON list in the cell), optional ``heldout`` (true/false) and any extra fields
  (ignored: the manifest stays their owner). Paths are stored exactly as written.
* ``webdataset``: tar shards as img2dataset writes them (``<key>.jpg`` + ``<key>.txt`` +
  ``<key>.json``), given by ``data.root``: a directory (its ``*.tar``, sorted) or a
  brace/glob pattern (``shards/{00000..00099}.tar``, ``shards/*.tar``). Images stay in
  the tars (``fae_pipe.data.tar_members``): the index stores each sample's shard and
  data offset, and its path column holds the member name. Captions come from the
  ``.txt`` (one per line) or, without one, from the ``.json``'s ``caption``/``captions``.

Choices where the issue is silent:

* Captions are stripped of surrounding whitespace and empty ones dropped; a sample left
  with no caption is a failure ("no caption"), skipped and recorded or fatal exactly like
  an unreadable image (``data.on_error``); images get the class folder's checks
  (``data.check``: stat, header or full; ``auto`` = header).
* Captioned data has no classes: every sample has label 0 of one class, ``captioned``.
* Split: the ``heldout`` field (manifest row, or the webdataset ``.json``) when the source
  has it (then for every row), else the hash-ranked ``data.holdout_fraction`` of
  ``stratified_holdout``; with a given split the index records its realised fraction.
* A manifest that is malformed (bad JSON, no path, a caption that is not a string) is a
  ``UserError`` naming the file and row, whatever ``data.on_error`` says: that is the
  manifest, not an image, being broken. So is an unreadable tar shard.

Scale: rows are parsed one at a time straight into byte blobs and integer arrays
(``_Rows``); no Python object per row survives the parse, and Parquet columns go from
Arrow buffers to the index columns without a Python string per row. Measured by
``fae-pipe bench prepare`` (docs/scaling.md).
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fae_pipe.data.folder import IMAGE_EXTENSIONS, _checked, _walk_once, printable, refusal
from fae_pipe.data.columns import CaptionColumn, PathColumn, TarColumn
from fae_pipe.data.index import DatasetIndex, sample_path, stratified_holdout
from fae_pipe.data.tar_members import TarMember
from fae_pipe.errors import UserError
from fae_pipe.phases import phase

SOURCES = ("folder", "captions_folder", "manifest", "webdataset")
CLASS_NAME = "captioned"
MANIFEST_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
NO_CAPTION = "no caption (every caption empty, or no caption given)"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def clean(captions) -> list[str]:
    """Captions stripped, empty ones dropped."""
    return [c for c in (c.strip() for c in captions) if c]


def caption_lines(text: str) -> list[str]:
    """The captions of a caption file: one per non-blank line."""
    return clean(text.splitlines())


@dataclass
class Pairs:
    """(image, captions) pairs of a source before the image check: columns, no per-row objects."""

    root: str
    paths: PathColumn
    captions: CaptionColumn
    heldout: np.ndarray | None = None
    tars: TarColumn | None = None
    sizes: np.ndarray | None = None  # known without a stat (tar members)
    failures: list[dict] = field(default_factory=list)  # rows the reader could not even list

    def __len__(self) -> int:
        return len(self.paths)


class _Rows:
    """Columnar accumulator: each row appends to byte blobs and int arrays, nothing is kept per row."""

    def __init__(self, where: str):
        self.where = where
        self.paths, self.path_ends = bytearray(), array("q", [0])
        self.texts, self.text_ends, self.starts = bytearray(), array("q", [0]), array("q", [0])
        self.heldout = array("b")
        self.missing_heldout = None  # first row without heldout
        self.failures: list[dict] = []

    def add(self, path: str, captions: list[str], heldout: bool | None, row) -> None:
        self.paths += path.encode("utf-8")
        self.path_ends.append(len(self.paths))
        for c in captions:
            self.texts += c.encode("utf-8")
            self.text_ends.append(len(self.texts))
        self.starts.append(len(self.text_ends) - 1)
        if heldout is None:
            if self.missing_heldout is None:
                self.missing_heldout = row
        else:
            self.heldout.append(bool(heldout))
        if self.heldout and self.missing_heldout is not None:
            raise UserError(f"{self.where}: 'heldout' is given for some rows but not for {self.missing_heldout}: "
                            f"give it for every row or for none (then data.holdout_fraction decides)")

    def finish(self, root: str) -> Pairs:
        n = len(self.path_ends) - 1
        blob = lambda b: np.frombuffer(b, np.uint8) if b else np.zeros(0, np.uint8)  # noqa: E731 - no copy
        return Pairs(root=root, paths=PathColumn(blob(self.paths), np.frombuffer(self.path_ends, np.int64)),
                     captions=CaptionColumn(PathColumn(blob(self.texts), np.frombuffer(self.text_ends, np.int64)),
                                            np.frombuffer(self.starts, np.int64)),
                     heldout=np.frombuffer(self.heldout, np.int8).astype(bool) if n and len(self.heldout) else None,
                     failures=self.failures)


def _row_fields(row: dict, where: str):
    """(path, captions, heldout) of one JSON-like manifest row, validated."""
    path = row.get("path")
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: 'path' must be a non-empty string (the image, relative to the manifest's "
                        f"directory or absolute), got {path!r}")
    if "caption" in row and "captions" in row:
        raise UserError(f"{where}: give 'caption' (a string) or 'captions' (a list of strings), not both")
    if "captions" in row:
        caps = row["captions"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise UserError(f"{where}: 'captions' must be a list of strings, got {caps!r:.80}")
    else:
        caps = row.get("caption")
        if caps is not None and not isinstance(caps, str):
            raise UserError(f"{where}: 'caption' must be a string, got {caps!r:.80}")
        caps = [] if caps is None else [caps]
    heldout = row.get("heldout")
    if heldout is not None and not isinstance(heldout, bool):
        raise UserError(f"{where}: 'heldout' must be true or false, got {heldout!r}")
    return path, clean(caps), heldout


def read_jsonl(path: Path) -> Pairs:
    rows = _Rows(f"manifest '{path}'")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"manifest '{path}' line {lineno}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object with 'path' and 'caption' or 'captions'")
            rows.add(*_row_fields(row, where), row=f"line {lineno}")
    return rows.finish(str(path.parent))


def _csv_bool(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if not v:
        return None
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise UserError(f"{where}: 'heldout' must be true/false (or 1/0), got {value!r}")


def read_csv(path: Path) -> Pairs:
    rows = _Rows(f"manifest '{path}'")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        col = {name.strip(): k for k, name in enumerate(header)}
        if "path" not in col or ("caption" in col) == ("captions" in col):
            raise UserError(f"manifest '{path}': the header row must name a 'path' column and one of 'caption' "
                            f"or 'captions' (a JSON list of strings per cell); it has {', '.join(header) or 'nothing'}")
        ip, ih = col["path"], col.get("heldout")
        ic, many = (col["captions"], True) if "captions" in col else (col["caption"], False)
        width = max(ip, ic, -1 if ih is None else ih) + 1
        for rowno, r in enumerate(reader, 2):
            if not r:
                continue
            where = f"manifest '{path}' row {rowno}"
            if len(r) < width:
                raise UserError(f"{where}: {len(r)} fields, the header has {len(header)}")
            caps = r[ic]
            if many:
                try:
                    caps = json.loads(caps) if caps.strip() else []
                except ValueError:
                    raise UserError(f"{where}: 'captions' must be a JSON list of strings, got {caps!r:.80}") from None
            row = {"path": r[ip], ("captions" if many else "caption"): caps,
                   "heldout": None if ih is None else _csv_bool(r[ih], where)}
            rows.add(*_row_fields(row, where), row=f"row {rowno}")
    return rows.finish(str(path.parent))


def read_manifest(path) -> Pairs:
    """A JSONL, CSV or Parquet manifest (by its extension) as ``Pairs`` rooted at its directory."""
    path = Path(path)
    fmt = MANIFEST_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"data.manifest '{path}': unknown manifest format {path.suffix or '(no extension)'}; "
                        f"expected one of {', '.join(MANIFEST_FORMATS)}")
    if not path.is_file():
        raise UserError(f"data.manifest '{path}' does not exist")
    with phase(f"captions: read {fmt} manifest"):
        if fmt == "parquet":
            from fae_pipe.data.captions_parquet import read_parquet

            return read_parquet(path)
        return read_jsonl(path) if fmt == "jsonl" else read_csv(path)


def read_captions_folder(root) -> Pairs:
    """Every image under ``root`` (sorted walk) with the captions of the ``.txt`` beside it."""
    root_str, root = str(root), Path(root)
    if not root.is_dir():
        raise UserError(f"data.root '{root_str}' is not a directory: expected images with a caption file beside "
                        f"each (x.jpg + x.txt)")
    rows = _Rows(f"data.root '{root_str}'")
    with phase("captions: list folder"):
        for dirpath, dirnames, filenames in _walk_once(root, set()):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # walked in this order
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for fname in sorted(filenames):
                if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    rows.failures.append({"path": printable(rel), "reason": "file name is not valid UTF-8 (the "
                                          "index cannot store it): rename the file"})
                    continue
                text = os.path.join(dirpath, os.path.splitext(fname)[0] + ".txt")
                try:
                    with open(text, encoding="utf-8") as f:
                        caps = caption_lines(f.read())
                except FileNotFoundError:
                    caps = []
                except (OSError, UnicodeDecodeError) as e:
                    raise UserError(f"caption file '{text}' is unreadable ({e}): expected UTF-8 text, "
                                    f"one caption per line") from None
                rows.add(rel, caps, None, row=rel)
    if len(rows.path_ends) == 1 and not rows.failures:
        raise UserError(f"data.root '{root_str}' holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    return rows.finish(root_str)


def read_source(source: str, root: str, manifest: str = "") -> Pairs:
    """The ``Pairs`` of one captioned ``data.source``."""
    if source == "captions_folder":
        return read_captions_folder(root)
    if source == "manifest":
        if not manifest:
            raise UserError("data.source=manifest needs data.manifest: the .jsonl, .csv or .parquet file")
        return read_manifest(manifest)
    if source == "webdataset":
        from fae_pipe.data.captions_webdataset import read_webdataset

        return read_webdataset(root)
    raise UserError(f"data.source = {source!r} is not a captioned source: expected one of {', '.join(SOURCES[1:])}")


def _shown(pairs: Pairs, i: int) -> str:
    """A sample as the failure list shows it: its path, or ``<tar>[<member>]`` relative to the root."""
    if pairs.tars is None:
        return printable(pairs.paths[i])
    return pairs.tars.shown(i, pairs.paths[i])


def _source(pairs: Pairs, i: int, rel: str | None = None):
    """What the image check opens for row ``i``: a ``Path``, or a ``TarMember`` for a sample in a shard."""
    rel = pairs.paths[int(i)] if rel is None else rel
    if pairs.tars is None:
        return Path(sample_path(pairs.root, rel))
    tar = sample_path(pairs.root, pairs.tars.tars[int(pairs.tars.ids[i])])
    return TarMember(tar, rel, int(pairs.tars.offsets[i]), int(pairs.sizes[i]))


def sources(pairs: Pairs, rows: np.ndarray):
    """``_source`` of each of the sorted ``rows``, decoding the path column in one pass (no per-row lookup)."""
    wanted = np.zeros(len(pairs), bool)
    wanted[rows] = True
    for i, (want, rel) in enumerate(zip(wanted.tolist(), pairs.paths)):
        if want:
            yield _source(pairs, i, rel)


def index_pairs(pairs: Pairs, holdout_fraction: float, seed: int, on_error: str = "skip", check: str = "header",
                workers: int = 0, progress: bool = False) -> DatasetIndex:
    """Check every pair (captions, then the image) and build the captioned index of the good ones."""
    if on_error == "fail" and pairs.failures:
        raise refusal(pairs.failures[0]["path"], pairs.failures[0]["reason"])
    n = len(pairs)
    no_caption = pairs.captions.counts == 0
    first_bad = int(np.argmax(no_caption)) if no_caption.any() else n
    candidates = np.flatnonzero(~no_caption)
    if on_error == "fail":  # nothing after the first caption-less row can change the outcome
        candidates = candidates[candidates < first_bad]
    keep, sizes, bad_images = np.zeros(n, bool), np.zeros(n, np.int64), {}
    results = _checked(sources(pairs, candidates), len(candidates), check, workers, progress)
    with phase("captions: check images"):
        for i, (reason, size) in zip(candidates.tolist(), results):
            if reason is None:
                keep[i], sizes[i] = True, size
            elif on_error == "fail":
                results.close()
                raise refusal(str(_source(pairs, i)), reason)
            else:
                bad_images[i] = reason
    if on_error == "fail" and first_bad < n:
        raise refusal(str(_source(pairs, first_bad)), NO_CAPTION)
    failed = sorted(set(np.flatnonzero(no_caption).tolist()) | bad_images.keys())
    failures = pairs.failures + [{"path": _shown(pairs, i), "reason": bad_images.get(i, NO_CAPTION)} for i in failed]
    if not keep.any():
        first = failures[0] if failures else {"path": "-", "reason": "the source lists no samples"}
        raise UserError(f"captioned source under '{pairs.root}': none of its {n} samples could be indexed "
                        f"(first: {first['path']}: {first['reason']})")
    with phase("captions: split + fingerprint"):
        paths, captions = pairs.paths.take(keep), pairs.captions.take(keep)
        labels = np.zeros(len(paths), np.int64)
        if pairs.heldout is not None:
            holdout = pairs.heldout[keep]
            holdout_fraction = round(float(holdout.mean()), 6)
        else:
            holdout = stratified_holdout(paths, labels, holdout_fraction, seed)
        return DatasetIndex(root=pairs.root, classes=[CLASS_NAME], paths=paths, labels=labels, sizes=sizes[keep],
                            holdout=holdout, seed=seed, holdout_fraction=holdout_fraction, failures=failures,
                            captions=captions, tars=None if pairs.tars is None else pairs.tars.take(keep))


def scan_captioned(source: str, root: str, manifest: str, holdout_fraction: float, seed: int, on_error: str = "skip",
                   check: str = "header", workers: int = 0, progress: bool = False) -> DatasetIndex:
    """Read one captioned source and index it (``prepare`` for every ``data.source`` but ``folder``)."""
    pairs = read_source(source, root, manifest)
    return index_pairs(pairs, holdout_fraction, seed, on_error, check, workers, progress)
