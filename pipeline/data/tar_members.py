"""Images that stay inside WebDataset tar shards: a member reference and the index's tar columns.

A CC12M-style set arrives as thousands of tar shards (img2dataset: ``<key>.jpg``,
``<key>.txt``, ``<key>.json`` per sample). Unpacking them would double the disk and
create tens of millions of small files, so the index stores, per sample, which shard
holds it and where the member's bytes start (``TarColumn``); the member's size is the
index's ``size`` column. ``DatasetIndex.abspath(i)`` then returns a ``TarMember`` instead
of a path, and ``fae_pipe.data.transforms`` (``load_rgb`` and so every stage that
decodes pixels) reads exactly that byte range: one ``open``, ``seek`` and ``read``,
no tar parsing at training time.

``str(TarMember)`` is ``<tar path>[<member name>]``, so every error message that prints
the sample's "path" names the shard and the member.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TarMember:
    """The byte range of one member of a tar file: what ``load_rgb`` accepts besides a path."""

    tar: str
    member: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}[{self.member}]"

    def read(self) -> bytes:
        """The member's bytes; ``OSError`` when the tar is missing or shorter than the index says."""
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar ends {self.size - len(data)} bytes before the end of the member "
                          f"(the shard changed since prepare)")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())


class TarColumn:
    """Per sample: the shard it lives in (``ids`` into the ``tars`` paths) and its data offset.

    The shard paths are stored once each (a ``PathColumn`` relative to the index root), not
    once per sample: at 10M samples in 1,000 shards that is 1,000 strings, not 10M.
    """

    def __init__(self, tars, ids: np.ndarray, offsets: np.ndarray):
        from fae_pipe.data.index import PathColumn

        self.tars = tars if isinstance(tars, PathColumn) else PathColumn.from_strings(tars)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.ids.ndim != 1 or self.ids.shape != self.offsets.shape:
            raise ValueError("tar ids and offsets differ in shape")
        if len(self.ids) and (self.ids.min() < 0 or self.ids.max() >= len(self.tars)):
            raise ValueError("tar id out of range")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, keep: np.ndarray) -> "TarColumn":
        """The rows where the boolean mask ``keep`` is true (the shard table is kept whole)."""
        return TarColumn(self.tars, self.ids[keep], self.offsets[keep])

    def __eq__(self, other) -> bool:
        return isinstance(other, TarColumn) and self.tars == other.tars \
            and np.array_equal(self.ids, other.ids) and np.array_equal(self.offsets, other.offsets)

    def __repr__(self) -> str:
        return f"TarColumn({len(self)} samples in {len(self.tars)} tars)"
