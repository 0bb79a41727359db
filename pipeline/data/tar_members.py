"""Images that stay inside WebDataset tar shards: the reference to one member's bytes.

A CC12M-style set arrives as thousands of tar shards (img2dataset: ``<key>.jpg``,
``<key>.txt``, ``<key>.json`` per sample). Unpacking them would double the disk and
create tens of millions of small files, so the index stores, per sample, which shard
holds it and where the member's bytes start (``fae_pipe.data.columns.TarColumn``); the
member's size is the index's ``size`` column. ``DatasetIndex.abspath(i)`` then returns a ``TarMember`` instead
of a path, and ``fae_pipe.data.transforms`` (``load_rgb`` and so every stage that
decodes pixels) reads exactly that byte range: one ``open``, ``seek`` and ``read``,
no tar parsing at training time.

``str(TarMember)`` is ``<tar path>[<member name>]``, so every error message that prints
the sample's "path" names the shard and the member.
"""

from __future__ import annotations

import io
from dataclasses import dataclass


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
