"""The dataset index: the one list of samples every later stage points back into.

Sample ``i`` is row ``i`` (ids are 0..N-1 in ImageFolder order), so a sample id stored
in a zarr cache identifies a file, its label and its split without ambiguity. The
index is written atomically and carries a fingerprint that caches record to detect a
changed dataset.

File format: every stage and every dask worker reads the index, so it is a binary
columnar file (``fae-pipe-index/2``, an uncompressed ``.npz``): the paths are one
UTF-8 byte blob plus offsets (``fae_pipe.data.columns.PathColumn``), labels/sizes/split
are numpy arrays, and a small JSON header holds the rest with a sha256 of the column
bytes. Reading ImageNet's 1.28M rows takes ~0.1 s and ~60 MB, and creates no per-sample Python
objects. The first format, one JSON document (``fae-pipe-index/1``), took 1.4 s and
~450 MB per process at 1.28M (measured by ``fae-pipe bench scale``, docs/scaling.md);
it is still read, and still written when ``paths.index`` ends in ``.json`` (small
sets, old configs). Both formats give the same fingerprint for the same samples.

Fingerprint: sha256 over a header (format version, split seed, holdout fraction)
and one line per sample ``relpath, size in bytes, label, split``. Modification times
and the root are left out on purpose: a copied or moved dataset keeps its
fingerprint, while adding, removing, renaming, relabelling or resizing any file, or
changing the split, changes it.

Captions (text-to-image sources, ``fae_pipe.data.captions``): an optional column of
several captions per sample, stored like the paths (one UTF-8 blob + offsets) plus
``caption_starts`` (sample i owns captions ``starts[i]:starts[i+1]``). A class-labelled
index has no such column and its file, columns and fingerprint are exactly as before;
a captioned index's fingerprint also covers every caption (``compute_fingerprint``), so
editing one caption marks every cache made from it stale.

Tar shards (WebDataset sources): optional columns ``tar_path_bytes``/``tar_path_offsets``
(each shard path once, relative to the root), ``tar_id`` and ``tar_offset`` per sample
(``fae_pipe.data.columns.TarColumn``); the path column holds the member name and
``size`` its size, and ``abspath`` returns a ``TarMember`` that ``load_rgb`` reads. Like
the captions they exist only when needed and are in the column checksum; they are not
in the fingerprint, which covers content (member name, size, captions, split), not how
the samples are packed into shards. A path written as absolute (a manifest may list
``/data/x.jpg``) is kept absolute: ``abspath`` returns it as it is.

Sample ids are the row numbers and are not stored. ``root`` is kept as given (often
relative to the project directory, where DVC runs the stages); ``abspath`` joins it.

Split: per class (stratified) ``n * holdout_fraction`` files, rounded half up, are
held out (never a whole class). Which ones is decided by ranking sha256(seed, relpath): stable
across machines and numpy versions, and adding a file disturbs few others.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fae_pipe.artifacts import atomic_write, atomic_write_text
from fae_pipe.data.columns import CaptionColumn, PathColumn, TarColumn
from fae_pipe.data.tar_members import TarMember
from fae_pipe.errors import UserError
from fae_pipe.phases import phase

INDEX_SCHEMA = "fae-pipe-index/2"  # binary columnar .npz
JSON_SCHEMA = "fae-pipe-index/1"  # the first format: one JSON document (read; written for .json paths)
FINGERPRINT_SCHEMA = JSON_SCHEMA  # part of every fingerprint: fixed, so a new file format keeps them
_COLUMNS = ("path_bytes", "path_offsets", "label", "size", "holdout")
_CAPTION_COLUMNS = ("caption_bytes", "caption_offsets", "caption_starts")  # present only in captioned indexes
_TAR_COLUMNS = ("tar_path_bytes", "tar_path_offsets", "tar_id", "tar_offset")  # present only for tar shards
LARGE_JSON_INDEX = 100_000  # samples beyond which prepare says the JSON format costs every process


def _file_rank(seed: int, relpath: str) -> int:
    """First 8 bytes of sha256(seed, relpath) as an integer: the file's place in the split draw."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{relpath}".encode()).digest()[:8], "big")


def holdout_count(n: int, fraction: float) -> int:
    """Held-out files in a class of ``n``: round half up, keeping at least one training file."""
    return max(0, min(int(n * fraction + 0.5), n - 1))


def stratified_holdout(paths: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean holdout mask: in each label, the ``holdout_count`` files of lowest hash rank."""
    labels = np.asarray(labels, dtype=np.int64)
    mask = np.zeros(len(paths), dtype=bool)
    if not len(paths) or fraction <= 0:
        return mask
    ranks = np.fromiter((_file_rank(seed, p) for p in paths), dtype=np.uint64, count=len(paths))
    order = np.lexsort((ranks, labels))  # by label, then rank
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(paths)) - np.repeat(starts, counts)  # place of each sorted row in its label
    take = np.array([holdout_count(int(n), fraction) for n in counts], dtype=np.int64)
    mask[order[position < np.repeat(take, counts)]] = True
    return mask


def compute_fingerprint(paths, sizes, labels, holdout, seed: int, fraction: float,
                        captions: CaptionColumn | None = None) -> str:
    """sha256 hex over the dataset content that matters (see module docstring).

    Without captions, exactly the first format's fingerprint; with captions, the sha256 of
    that fingerprint and ``captions.sha256()``.
    """
    header = f"{FINGERPRINT_SCHEMA}\nseed={int(seed)}\nholdout_fraction={float(fraction)!r}\n"
    h = hashlib.sha256(header.encode())
    rows = zip(paths, np.asarray(sizes).tolist(), np.asarray(labels).tolist(), np.asarray(holdout, bool).tolist())
    while block := list(islice(rows, 65536)):  # hashed in blocks: no 1.28M-row string in memory
        h.update("".join(f"{p}\t{s}\t{lab}\t{int(ho)}\n" for p, s, lab, ho in block).encode())
    if captions is None:
        return h.hexdigest()
    return hashlib.sha256(f"{h.hexdigest()}\n{captions.sha256()}\n".encode()).hexdigest()


def sample_path(root: str, rel: str) -> str:
    """``root`` joined with the posix path ``rel``; an absolute ``rel`` (from a manifest) as it is."""
    return rel if rel.startswith("/") else os.path.join(root, *rel.split("/"))


@dataclass
class DatasetIndex:
    """Samples of an image folder: path (relative to ``root``), label, size and split."""

    root: str
    classes: list[str]
    paths: PathColumn  # a list of str is accepted and converted
    labels: np.ndarray
    sizes: np.ndarray | None = None
    holdout: np.ndarray | None = None
    seed: int = 0
    holdout_fraction: float = 0.0
    fingerprint: str = ""
    failures: list[dict] = field(default_factory=list)
    ids: np.ndarray | None = None
    captions: CaptionColumn | None = None  # lists of str per sample are accepted and converted
    tars: TarColumn | None = None  # samples that are members of tar shards (paths = member names)

    def __post_init__(self):
        if not isinstance(self.paths, PathColumn):
            self.paths = PathColumn.from_strings(self.paths)
        n = len(self.paths)
        self.seed, self.holdout_fraction = int(self.seed), float(self.holdout_fraction)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.sizes = np.zeros(n, np.int64) if self.sizes is None else np.asarray(self.sizes, dtype=np.int64)
        self.holdout = np.zeros(n, bool) if self.holdout is None else np.asarray(self.holdout, dtype=bool)
        ids = np.arange(n, dtype=np.int64)
        if self.ids is not None and not np.array_equal(np.asarray(self.ids), ids):
            raise ValueError("DatasetIndex ids are the row numbers 0..N-1")
        self.ids = ids
        if self.captions is not None and not isinstance(self.captions, CaptionColumn):
            self.captions = CaptionColumn.from_lists(self.captions)
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"DatasetIndex has {n} samples but captions for {len(self.captions)}")
        if self.tars is not None and len(self.tars) != n:
            raise ValueError(f"DatasetIndex has {n} samples but tar offsets for {len(self.tars)}")
        if not self.fingerprint:
            self.fingerprint = self.recompute_fingerprint()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def recompute_fingerprint(self) -> str:
        return compute_fingerprint(self.paths, self.sizes, self.labels, self.holdout,
                                   self.seed, self.holdout_fraction, self.captions)

    def holdout_mask(self) -> np.ndarray:
        return self.holdout.copy()

    def train_ids(self) -> np.ndarray:
        return self.ids[~self.holdout]

    def holdout_ids(self) -> np.ndarray:
        return self.ids[self.holdout]

    def abspath(self, i: int) -> str | TarMember:
        """Path of sample ``i`` on this machine (``root`` joined with its relative path).

        A sample inside a tar shard gives a ``TarMember`` (its byte range), which
        ``load_rgb`` reads like a path and which prints as ``<tar>[<member>]``.
        """
        i = int(i)
        rel = self.paths[i]
        if self.tars is not None:
            tar = self.tars.tars[int(self.tars.ids[i])]
            return TarMember(sample_path(self.root, tar), rel, int(self.tars.offsets[i]), int(self.sizes[i]))
        return sample_path(self.root, rel)

    def shown(self, i: int) -> str:
        """Sample ``i`` as failure records name it: its path relative to ``root``, or ``<tar>[<member>]`` for a
        member of a tar shard (the shard relative to ``root``), so a record names the shard too."""
        rel = self.paths[int(i)]
        return rel if self.tars is None else self.tars.shown(i, rel)

    def to_json(self) -> dict:
        doc = {
            "schema": JSON_SCHEMA,
            "root": self.root,
            "classes": list(self.classes),
            "seed": int(self.seed),
            "holdout_fraction": float(self.holdout_fraction),
            "fingerprint": self.fingerprint,
            "num_samples": len(self),
            "samples": {
                "path": list(self.paths),
                "label": self.labels.tolist(),
                "size": self.sizes.tolist(),
                "holdout": self.holdout.astype(np.int8).tolist(),
            },
            "failures": list(self.failures),
        }
        if self.captions is not None:
            doc["samples"]["captions"] = self.captions.to_lists()
        if self.tars is not None:
            doc["tars"] = list(self.tars.tars)
            doc["samples"].update(tar_id=self.tars.ids.tolist(), tar_offset=self.tars.offsets.tolist())
        return doc


def _header(index: DatasetIndex) -> dict:
    return {"schema": INDEX_SCHEMA, "root": index.root, "classes": list(index.classes), "seed": int(index.seed),
            "holdout_fraction": float(index.holdout_fraction), "fingerprint": index.fingerprint,
            "num_samples": len(index), "failures": list(index.failures)}


def _column_arrays(index: DatasetIndex) -> dict[str, np.ndarray]:
    arrays = {"path_bytes": index.paths.blob, "path_offsets": index.paths.offsets,
              "label": index.labels.astype(np.int64), "size": index.sizes.astype(np.int64),
              "holdout": index.holdout.astype(np.uint8)}
    if index.captions is not None:
        arrays.update(caption_bytes=index.captions.texts.blob, caption_offsets=index.captions.texts.offsets,
                      caption_starts=index.captions.starts)
    if index.tars is not None:
        arrays.update(tar_path_bytes=index.tars.tars.blob, tar_path_offsets=index.tars.tars.offsets,
                      tar_id=index.tars.ids, tar_offset=index.tars.offsets)
    return arrays


def _columns_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the column bytes (C speed): the read-time check that replaces re-fingerprinting.

    Covers the caption and tar columns when present; an index without them hashes exactly as before.
    """
    h = hashlib.sha256()
    for name in _COLUMNS + tuple(c for c in _CAPTION_COLUMNS + _TAR_COLUMNS if c in arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def write_index(index: DatasetIndex, path) -> Path:
    """Write ``index`` atomically: binary (``INDEX_SCHEMA``), or the JSON format for a ``.json`` path."""
    with phase("index: write"):
        if Path(path).suffix.lower() == ".json":
            return atomic_write_text(path, json.dumps(index.to_json(), separators=(",", ":")) + "\n")
        arrays = _column_arrays(index)
        header = dict(_header(index), columns_sha256=_columns_sha256(arrays))
        arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        return atomic_write(path, write)


def read_index(path) -> DatasetIndex:
    """Load an index written by ``write_index`` (either format); missing or damaged files raise ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"index '{path}' not found: run `fae-pipe prepare` first")
    with phase("index: load"):
        try:
            with open(path, "rb") as f:
                magic = f.read(2)
        except OSError as e:
            raise _corrupt(path, f"unreadable: {e}") from None
        index = _read_npz(path) if magic == b"PK" else _read_json(path)
    n = len(index)
    if n and (index.labels.min() < 0 or index.labels.max() >= index.num_classes):
        raise _corrupt(path, "label out of range")
    return index


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"index '{path}' is corrupt ({why}): run `fae-pipe prepare` again")


def _read_npz(path: Path) -> DatasetIndex:
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode("utf-8"))
            arrays = {name: z[name] for name in _COLUMNS + _CAPTION_COLUMNS + _TAR_COLUMNS if name in z.files}
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as e:
        raise _corrupt(path, f"unreadable binary index: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict) or header.get("schema") != INDEX_SCHEMA:
        raise _corrupt(path, f"expected schema {INDEX_SCHEMA}")
    if header.get("columns_sha256") != _columns_sha256(arrays):
        raise _corrupt(path, "its columns do not match their checksum")
    missing = [name for name in _COLUMNS if name not in arrays]
    if missing or 0 < sum(name in arrays for name in _CAPTION_COLUMNS) < len(_CAPTION_COLUMNS):
        raise _corrupt(path, f"columns missing: {', '.join(missing) or 'part of the caption columns'}")
    if 0 < sum(name in arrays for name in _TAR_COLUMNS) < len(_TAR_COLUMNS):
        raise _corrupt(path, "columns missing: part of the tar columns")
    n = header.get("num_samples")
    if not (len(arrays["label"]) == len(arrays["size"]) == len(arrays["holdout"]) == len(arrays["path_offsets"]) - 1
            == n):
        raise _corrupt(path, "column lengths differ")
    try:
        captions = None
        if "caption_starts" in arrays:
            captions = CaptionColumn(PathColumn(arrays["caption_bytes"], arrays["caption_offsets"]),
                                     arrays["caption_starts"])
        tars = None
        if "tar_id" in arrays:
            tars = TarColumn(PathColumn(arrays["tar_path_bytes"], arrays["tar_path_offsets"]), arrays["tar_id"],
                             arrays["tar_offset"])
        return DatasetIndex(
            root=str(header["root"]), classes=[str(c) for c in header["classes"]], captions=captions, tars=tars,
            paths=PathColumn(arrays["path_bytes"], arrays["path_offsets"]), labels=arrays["label"],
            sizes=arrays["size"], holdout=arrays["holdout"].astype(bool), seed=int(header["seed"]),
            holdout_fraction=float(header["holdout_fraction"]), fingerprint=str(header["fingerprint"]),
            failures=list(header.get("failures", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, f"missing or invalid field {e}") from None


def _read_json(path: Path) -> DatasetIndex:
    """The first format (``JSON_SCHEMA``): parsed whole, fingerprint recomputed as its integrity check."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"unreadable JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != JSON_SCHEMA:
        raise _corrupt(path, f"expected schema {JSON_SCHEMA} (JSON) or {INDEX_SCHEMA} (binary)")
    try:
        s = doc["samples"]
        index = DatasetIndex(
            root=str(doc["root"]), classes=[str(c) for c in doc["classes"]], paths=[str(p) for p in s["path"]],
            labels=s["label"], sizes=s["size"], holdout=s["holdout"], seed=int(doc["seed"]),
            holdout_fraction=float(doc["holdout_fraction"]), fingerprint=str(doc["fingerprint"]),
            failures=list(doc.get("failures", [])), captions=s.get("captions"),
            tars=TarColumn(doc["tars"], s["tar_id"], s["tar_offset"]) if "tars" in doc else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, f"missing or invalid field {e}") from None
    n = len(index)
    if not (len(index.labels) == len(index.sizes) == len(index.holdout) == n == doc.get("num_samples")):
        raise _corrupt(path, "column lengths differ")
    if index.recompute_fingerprint() != index.fingerprint:
        raise _corrupt(path, "fingerprint does not match its samples")
    return index
