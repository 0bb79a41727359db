"""Text-to-image batches: the latents as ``LatentBatches`` serves them, plus one cached caption embedding per row.

Why it is built like this: the text encoder never runs in the training loop; ``text.zarr``
(``embed-text``) holds every caption's token embeddings, and this module serves, per
batch row, the embedding of one caption of that row's image. The latent store and the
text store may be sharded and ordered differently, so rows are matched by **sample id**
through ``fae_pipe.data.aligned.AlignedRows``, exactly as REPA targets are (same dataset
fingerprint check; every served sample must have a valid text row, else a one-line error
naming both stores).

Which caption: a sample may have several (COCO: 5). Row i's slot is drawn uniformly among
that sample's non-empty slots (length > 0) by ``caption_slots``, a pure function of
``(seed, epoch, sample id)`` (a counter-based hash, the keyed-RNG idea of
``latents.posterior_noise`` without a generator per row), so a resumed run and any world
size serve exactly the captions the uninterrupted run served, and every caption of a sample
is seen over the epochs.

Caption dropout (classifier-free guidance) is the stage's: it draws a per-row mask from the
step's generator and calls ``TextEmbeddings.drop``, which puts the store's empty-caption
embedding (``EMPTY_TOKENS`` / ``EMPTY_POOLED``, ``A_EMPTY_LENGTH`` real tokens) in those rows:
the very embedding sampling guides against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.cache.location import is_url
from fae_pipe.data.aligned import AlignedRows
from fae_pipe.data.latents import LatentBatches
from fae_pipe.data.sharded import ROWS, ShardedLoader
from fae_pipe.errors import UserError

CAPTION_STREAM = 4  # beside the loader's order / window / view streams and the posterior noise
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def caption_slots(seed: int, epoch: int, sample_ids, lengths: np.ndarray) -> np.ndarray:
    """int64 (B,): for row i, a slot among the non-empty ones of ``lengths[i]`` (B, slots), uniform, a
    pure function of (seed, epoch, sample_ids[i]) (and of which slots are non-empty)."""
    lengths = np.asarray(lengths)
    nonempty = lengths > 0
    counts = nonempty.sum(1)
    if (counts == 0).any():
        raise ValueError("caption_slots: a row has no non-empty caption slot")
    ids = np.asarray(sample_ids, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(ids.shape, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)) + np.uint64(CAPTION_STREAM))
        h = _mix(h ^ np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF))
        h = _mix(h ^ ids) & _M64
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
    pick = np.minimum((u * counts).astype(np.int64), counts - 1)  # the pick-th non-empty slot
    return np.argmax(np.cumsum(nonempty, axis=1) > pick[:, None], axis=1).astype(np.int64)


def open_text_store(path, key: str = "paths.text"):
    """The complete ``text.zarr`` at ``path``, or a one-line error naming ``key``."""
    group, kind = schema.open_store(path)
    if kind != schema.KIND_TEXT:
        raise UserError(f"{key} = {path} is a {kind} store; expected the text store written by `embed-text`")
    if group.attrs.get(schema.A_COMPLETE) is not True:
        raise UserError(f"text store {path} is incomplete: finish it with `fae-pipe embed-text` first")
    return group


class TextEmbeddings:
    """The text store aligned to a generator loader: caption choice, shard-grouped reads, the empty caption.

    Args:
        path: the ``text.zarr`` (complete).
        source: the latent loader whose rows are served.
        seed: the caption-choice seed (the training seed).
        keep_read: whole shards kept decoded when the store cannot be memory-mapped.
    """

    def __init__(self, path, source: ShardedLoader, seed: int, keep_read: int = 2):
        self.path = path if is_url(path) else Path(path)
        self.group = g = open_text_store(self.path)
        self.seed = int(seed)
        self.has_pooled = schema.POOLED in set(g.array_keys())
        _, self.slots, self.max_length, self.dim = (int(v) for v in g[schema.TOKENS].shape)
        self.pooled_dim = int(g[schema.POOLED].shape[-1]) if self.has_pooled else 0
        self.encoder = dict(g.attrs.get(schema.A_TEXT_ENCODER) or {})
        self.config_hash = g.attrs.get(schema.A_CONFIG_HASH)  # which captions, embedded how (embed-text's)
        self.rows = AlignedRows(self.path, g, source, [schema.TOKENS, *([schema.POOLED] if self.has_pooled else [])],
                                "text embeddings", "text store", "captions must describe the images they train with",
                                "run `fae-pipe embed-text` on the index the latents were made from", keep_read)
        self.lengths = np.asarray(schema.read_array(g, schema.LENGTHS), np.int64)  # (sample, slot): small
        served = source.served_rows()
        bare = served[(self.lengths[self.rows.row_of[served]] == 0).all(1)]
        if bare.size:
            raise UserError(f"{self.rows.pair(source)}: sample id {int(source.sample_ids[bare[0]])} has no non-empty "
                            f"caption ({bare.size} of {served.size} served samples have none); re-run `fae-pipe "
                            "prepare` so samples without a caption are skipped, then `embed-text`")
        self.empty_length = int(g.attrs[schema.A_EMPTY_LENGTH])
        self.empty_tokens = np.asarray(g[schema.EMPTY_TOKENS][...], np.float16)  # (token, channel)
        self.empty_pooled = np.asarray(g[schema.EMPTY_POOLED][...], np.float16) if self.has_pooled else None
        self._empty: dict[str, tuple] = {}

    def read(self, rows: np.ndarray, sample_ids: np.ndarray, epoch: int) -> tuple[np.ndarray, ...]:
        """float16 tokens (B, L, D), int64 lengths (B,) [, float16 pooled (B, D)] of one caption per row."""
        frow = self.rows.rows_of(rows)
        lengths = self.lengths[frow]
        slots = caption_slots(self.seed, epoch, sample_ids, lengths)
        got = self.rows.gather(rows, slots)
        out = (got[schema.TOKENS], lengths[np.arange(slots.size), slots])
        return (*out, got[schema.POOLED]) if self.has_pooled else out

    def empty(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The empty caption as one row on ``device``: tokens float (1, L, D), mask bool (1, L), pooled (1, D) or None."""
        device = torch.device(device)
        if str(device) not in self._empty:
            tokens = torch.from_numpy(self.empty_tokens).float()[None].to(device)
            mask = (torch.arange(self.max_length) < self.empty_length)[None].to(device)
            pooled = None if self.empty_pooled is None else torch.from_numpy(self.empty_pooled).float()[None].to(device)
            self._empty[str(device)] = (tokens, mask, pooled)
        return self._empty[str(device)]

    def drop(self, drop: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None):
        """Rows where ``drop`` (bool (B,)) is True get the empty caption's tokens, mask and pooled vector."""
        e_tokens, e_mask, e_pooled = self.empty(tokens.device)
        tokens = torch.where(drop[:, None, None], e_tokens, tokens)
        mask = torch.where(drop[:, None], e_mask, mask)
        pooled = None if pooled is None else torch.where(drop[:, None], e_pooled, pooled)
        return tokens, mask, pooled

    def record(self) -> dict:
        """What a generator trained on these embeddings must carry to embed prompts the same way."""
        return {"encoder": self.encoder, "max_length": self.max_length, "dim": self.dim,
                "pooled_dim": self.pooled_dim, "empty_length": self.empty_length,
                "captions_per_sample": self.slots}


class TextBatches(LatentBatches):
    """``(epoch, x, tokens, mask, pooled)`` batches for one process, resumable by step.

    ``x``: float32 (B, C, H, W), normalised with the latent store's statistics (``LatentBatches``);
    ``tokens``: float32 (B, L, D) of one caption per row (``caption_slots``), zero past its length;
    ``mask``: bool (B, L), True on real tokens; ``pooled``: float32 (B, D), or None when the
    text encoder has no pooled vector. The text store is ``text`` (``TextEmbeddings``).
    """

    def __init__(self, path, text_path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 memory_budget_bytes: int = 8 << 30, shuffle_buffer: int = 8):
        super().__init__(path, batch_size, seed, rank, world_size, memory_budget_bytes, shuffle_buffer)
        self.text = TextEmbeddings(text_path, self.loader, seed, keep_read=shuffle_buffer + 1)

    def _captions(self, span: dict, epoch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        tokens, lengths, *pooled = self.text.read(span[ROWS], span[schema.SAMPLE_IDS], epoch)
        mask = torch.arange(self.text.max_length)[None] < torch.from_numpy(lengths)[:, None]
        out = (torch.from_numpy(tokens).to(device).float(), mask.to(device))
        return (*out, torch.from_numpy(pooled[0]).to(device).float()) if pooled else out

    def from_step(self, step: int, device) -> Iterator[tuple]:
        """Infinite ``(epoch, x, tokens, mask, pooled)`` stream from this process's batch number ``step``."""
        for epoch, x, _labels, tokens, mask, *pooled in self._spans(step, device, self._captions):
            yield epoch, x, tokens, mask, (pooled[0] if pooled else None)
