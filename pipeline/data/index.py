"""The dataset index: the one list of samples every later stage points back into.

Sample ``i`` is row ``i`` (ids are 0..N-1 in ImageFolder order), so a sample id stored
in a zarr cache identifies a file, its label and its split without ambiguity. The
index is JSON (columnar, so ImageNet's 1.28M rows stay tens of MB), written
atomically, and carries a fingerprint that caches record to detect a changed dataset.

Fingerprint: sha256 over a header (format version, split seed, holdout fraction)
and one line per sample ``relpath, size in bytes, label, split``. Modification times
and the root are left out on purpose: a copied or moved dataset keeps its
fingerprint, while adding, removing, renaming, relabelling or resizing any file, or
changing the split, changes it.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fae_pipe.artifacts import atomic_write_text
from fae_pipe.errors import UserError

INDEX_SCHEMA = "fae-pipe-index/1"


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


def compute_fingerprint(paths, sizes, labels, holdout, seed: int, fraction: float) -> str:
    """sha256 hex over the dataset content that matters (see module docstring)."""
    header = f"{INDEX_SCHEMA}\nseed={int(seed)}\nholdout_fraction={float(fraction)!r}\n"
    rows = "".join(f"{p}\t{s}\t{lab}\t{int(ho)}\n" for p, s, lab, ho in zip(
        paths, np.asarray(sizes).tolist(), np.asarray(labels).tolist(), np.asarray(holdout, bool).tolist()))
    return hashlib.sha256((header + rows).encode()).hexdigest()


@dataclass
class DatasetIndex:
    """Samples of an image folder: path (relative to ``root``), label, size and split."""

    root: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray | None = None
    holdout: np.ndarray | None = None
    seed: int = 0
    holdout_fraction: float = 0.0
    fingerprint: str = ""
    failures: list[dict] = field(default_factory=list)
    ids: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.paths)
        self.paths = list(self.paths)
        self.seed, self.holdout_fraction = int(self.seed), float(self.holdout_fraction)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.sizes = np.zeros(n, np.int64) if self.sizes is None else np.asarray(self.sizes, dtype=np.int64)
        self.holdout = np.zeros(n, bool) if self.holdout is None else np.asarray(self.holdout, dtype=bool)
        ids = np.arange(n, dtype=np.int64)
        if self.ids is not None and not np.array_equal(np.asarray(self.ids), ids):
            raise ValueError("DatasetIndex ids are the row numbers 0..N-1")
        self.ids = ids
        if not self.fingerprint:
            self.fingerprint = self.recompute_fingerprint()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def recompute_fingerprint(self) -> str:
        return compute_fingerprint(self.paths, self.sizes, self.labels, self.holdout,
                                   self.seed, self.holdout_fraction)

    def holdout_mask(self) -> np.ndarray:
        return self.holdout.copy()

    def train_ids(self) -> np.ndarray:
        return self.ids[~self.holdout]

    def holdout_ids(self) -> np.ndarray:
        return self.ids[self.holdout]

    def abspath(self, i: int) -> str:
        """Path of sample ``i`` on this machine (``root`` joined with its relative path)."""
        return os.path.join(self.root, *self.paths[int(i)].split("/"))

    def to_json(self) -> dict:
        return {
            "schema": INDEX_SCHEMA,
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


def write_index(index: DatasetIndex, path) -> Path:
    """Write ``index`` as JSON atomically (temporary file in the same directory, then rename)."""
    return atomic_write_text(path, json.dumps(index.to_json(), separators=(",", ":")) + "\n")


def read_index(path) -> DatasetIndex:
    """Load an index written by ``write_index``; missing or damaged files raise ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"index '{path}' not found: run `fae-pipe prepare` first")

    def corrupt(why: str) -> UserError:
        return UserError(f"index '{path}' is corrupt ({why}): run `fae-pipe prepare` again")

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"unreadable JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != INDEX_SCHEMA:
        raise corrupt(f"expected schema {INDEX_SCHEMA}")
    try:
        s = doc["samples"]
        index = DatasetIndex(
            root=str(doc["root"]), classes=[str(c) for c in doc["classes"]], paths=[str(p) for p in s["path"]],
            labels=s["label"], sizes=s["size"], holdout=s["holdout"], seed=int(doc["seed"]),
            holdout_fraction=float(doc["holdout_fraction"]), fingerprint=str(doc["fingerprint"]),
            failures=list(doc.get("failures", [])),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(f"missing or invalid field {e}") from None
    n = len(index)
    if not (len(index.labels) == len(index.sizes) == len(index.holdout) == n == doc.get("num_samples")):
        raise corrupt("column lengths differ")
    if n and (index.labels.min() < 0 or index.labels.max() >= index.num_classes):
        raise corrupt("label out of range")
    if index.recompute_fingerprint() != index.fingerprint:
        raise corrupt("fingerprint does not match its samples")
    return index
