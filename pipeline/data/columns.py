"""The dataset index's columnar storage: many strings as one UTF-8 blob + offsets, no str per row.

Why one module: an index of 1.28M (or 10M web) samples must load in a fraction of a
second in every process, so its per-sample text (relative paths, captions, tar shard
names) never becomes a Python list. ``PathColumn`` is that storage for one string per
row; ``CaptionColumn`` groups a ``PathColumn`` of all captions by sample;
``TarColumn`` names each sample's tar shard (each shard's path stored once) and the
member's data offset. ``fae_pipe.data.index`` writes and reads these columns
(``fae-pipe-index/2``); the caption and tar sources (``fae_pipe.data.captions*``)
build them without decoding a string per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class PathColumn(Sequence):
    """The relative paths as one UTF-8 blob + offsets: a list of str without a str per row.

    Behaves as a read-only sequence of ``str`` (indexing decodes one row); equal to any
    sequence with the same strings, so ``index.paths == ["a/x.png", ...]`` still holds.
    """

    def __init__(self, blob, offsets: np.ndarray):
        self.blob = np.frombuffer(blob, dtype=np.uint8) if isinstance(blob, bytes) else np.asarray(blob, np.uint8)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or not len(self.offsets) or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.blob) or (np.diff(self.offsets) < 0).any():
            raise ValueError("path offsets do not describe the path blob")

    @classmethod
    def from_strings(cls, paths) -> "PathColumn":
        encoded = [str(p).encode("utf-8") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path {i} out of range (0..{len(self) - 1})")
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self):
        blob, off = self.blob.tobytes(), self.offsets.tolist()
        for a, b in zip(off, off[1:]):
            yield blob[a:b].decode("utf-8")

    def take(self, keep: np.ndarray) -> "PathColumn":
        """The rows where the boolean mask ``keep`` is true, without decoding a string (all kept: itself)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        lengths = np.diff(self.offsets)
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        return PathColumn(self.blob[np.repeat(keep, lengths)], offsets)

    def __eq__(self, other) -> bool:
        if isinstance(other, PathColumn):
            return np.array_equal(self.blob, other.blob) and np.array_equal(self.offsets, other.offsets)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PathColumn({len(self)} paths)"


class CaptionColumn:
    """Several captions per sample: all captions as one ``PathColumn`` plus per-sample starts.

    ``of(i)`` is sample ``i``'s list of captions (possibly empty), ``counts`` the number per
    sample; no Python string exists per caption until one is asked for.
    """

    def __init__(self, texts: PathColumn, starts: np.ndarray):
        self.texts = texts
        self.starts = np.asarray(starts, dtype=np.int64)
        if self.starts.ndim != 1 or not len(self.starts) or self.starts[0] != 0 \
                or self.starts[-1] != len(texts) or (np.diff(self.starts) < 0).any():
            raise ValueError("caption starts do not describe the caption column")

    @classmethod
    def from_lists(cls, captions) -> "CaptionColumn":
        """From one list of caption strings per sample."""
        flat, counts = [], []
        for caps in captions:
            caps = [caps] if isinstance(caps, str) else list(caps)
            flat.extend(caps)
            counts.append(len(caps))
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(PathColumn.from_strings(flat), starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    def of(self, i: int) -> list[str]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (0..{len(self) - 1})")
        return [self.texts[j] for j in range(int(self.starts[i]), int(self.starts[i + 1]))]

    def take(self, keep: np.ndarray) -> "CaptionColumn":
        """The samples where the boolean mask ``keep`` is true, with all their captions (all kept: itself)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        counts = self.counts
        starts = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(counts[keep], out=starts[1:])
        return CaptionColumn(self.texts.take(np.repeat(keep, counts)), starts)

    def to_lists(self) -> list[list[str]]:
        texts = list(self.texts)
        return [texts[a:b] for a, b in zip(self.starts[:-1].tolist(), self.starts[1:].tolist())]

    def sha256(self) -> str:
        """sha256 over every sample's captions, in order (the part of the fingerprint they own)."""
        h = hashlib.sha256(b"captions\n")
        for a, b in ((self.texts.offsets, self.texts.blob), (self.starts, None)):
            h.update(memoryview(np.ascontiguousarray(a.astype("<i8"))).cast("B"))
            if b is not None:
                h.update(memoryview(np.ascontiguousarray(b)).cast("B"))
        return h.hexdigest()

    def __eq__(self, other) -> bool:
        return isinstance(other, CaptionColumn) and self.texts == other.texts \
            and np.array_equal(self.starts, other.starts)

    def __repr__(self) -> str:
        return f"CaptionColumn({len(self)} samples, {len(self.texts)} captions)"


class TarColumn:
    """Per sample: the shard it lives in (``ids`` into the ``tars`` paths) and its data offset.

    The shard paths are stored once each (a ``PathColumn`` relative to the index root), not
    once per sample: at 10M samples in 1,000 shards that is 1,000 strings, not 10M.
    """

    def __init__(self, tars, ids: np.ndarray, offsets: np.ndarray):
        self.tars = tars if isinstance(tars, PathColumn) else PathColumn.from_strings(tars)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.ids.ndim != 1 or self.ids.shape != self.offsets.shape:
            raise ValueError("tar ids and offsets differ in shape")
        if len(self.ids) and (self.ids.min() < 0 or self.ids.max() >= len(self.tars)):
            raise ValueError("tar id out of range")

    def __len__(self) -> int:
        return len(self.ids)

    def shown(self, i: int, member: str) -> str:
        """Row ``i``'s ``member`` as failure records name it: ``<tar>[<member>]``, the tar relative to the root."""
        return f"{self.tars[int(self.ids[i])]}[{member}]"

    def take(self, keep: np.ndarray) -> "TarColumn":
        """The rows where the boolean mask ``keep`` is true (the shard table is kept whole)."""
        return TarColumn(self.tars, self.ids[keep], self.offsets[keep])

    def __eq__(self, other) -> bool:
        return isinstance(other, TarColumn) and self.tars == other.tars \
            and np.array_equal(self.ids, other.ids) and np.array_equal(self.offsets, other.offsets)

    def __repr__(self) -> str:
        return f"TarColumn({len(self)} samples in {len(self.tars)} tars)"
