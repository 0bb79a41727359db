"""``EmbedTextTask``: one storage shard of index captions -> frozen text-encoder embeddings (``embed-text``).

Every caption slot of every sample of the shard (index order; a blank or missing
caption is an empty slot: length 0, zero rows) goes through ``FrozenTextEncoder.encode``
in batches of ``text_encoder.batch_size`` captions cut from the shard's own first
caption, so the bits written never depend on ``--shards`` or ``--workers``. Tokens are
stored as float16 (zero past each length), lengths as int32, the pooled vector when
the tower has one. A sample without any caption is an invalid row, recorded as a
failure of the shard (as an unreadable image is for ``extract``), so ``verify``
checks the ``valid`` column against the records the same way for every store kind.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.errors import UserError

NO_CAPTION = "no caption in the index"


class EmbedTextTask:
    """Shard task for ``run_shards``: captions -> float16 token embeddings, lengths, pooled vectors.

    ``encoder``: {"directory", "fingerprint", "max_length", "precision", "device"} of the text encoder;
    ``dataset_fingerprint``: the index the coordinator planned from (a changed index is refused in workers).
    """

    def __init__(self, index_path: str, dataset_fingerprint: str, encoder: dict, batch_size: int,
                 captions_per_sample: int):
        self.index_path, self.dataset_fingerprint = index_path, dataset_fingerprint
        self.spec = dict(encoder)
        self.batch_size, self.captions_per_sample = int(batch_size), int(captions_per_sample)
        # the runner reuses a prepared task per process by this key: it must name every setting
        self.cache_key = "embed-text:" + json.dumps([index_path, dataset_fingerprint, self.spec, self.batch_size,
                                                     self.captions_per_sample], sort_keys=True)
        self.encoder = None
        self.index = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["encoder"] = state["index"] = None  # rebuilt by setup() in each worker
        return state

    def adopt(self, encoder) -> None:
        """Reuse the encoder the coordinator already built (in-process runs load it once)."""
        self.encoder = encoder

    def setup(self) -> None:
        from fae_pipe.data.index import read_index
        from fae_pipe.encoders.text import FrozenTextEncoder

        self.index = read_index(self.index_path)
        if self.index.fingerprint != self.dataset_fingerprint:
            raise UserError(f"embed-text: {self.index_path} changed while the store was being written (dataset "
                            f"fingerprint {self.index.fingerprint[:12]} != {self.dataset_fingerprint[:12]}); "
                            "run `fae-pipe embed-text` again")
        if self.encoder is None:
            s = self.spec
            self.encoder = FrozenTextEncoder(s["directory"], s["max_length"], s["device"], s["precision"])
        if self.encoder.fingerprint != self.spec["fingerprint"]:
            raise UserError(f"embed-text: the text encoder directory {self.spec['directory']} changed while the "
                            "store was being written; run `fae-pipe embed-text` again")

    def compute(self, shard_index: int, start: int, stop: int,
                progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        enc, n, k = self.encoder, stop - start, self.captions_per_sample
        t, d = enc.max_length, enc.dim
        tokens = np.zeros((n, k, t, d), np.float16)
        lengths = np.zeros((n, k), np.int32)
        pooled = np.zeros((n, k, d), np.float16) if enc.has_pooled else None
        items = [(r, j, c) for r in range(n) for j, c in enumerate(self.index.captions.of(start + r))
                 if schema.caption_filled(c)]
        if any(j >= k for _, j, _ in items):
            raise UserError(f"embed-text: a sample of shard {shard_index} has more than {k} captions; "
                            "run `fae-pipe embed-text` again")
        reported = 0
        for lo in range(0, len(items), self.batch_size):
            batch = items[lo:lo + self.batch_size]
            rows = np.array([r for r, _, _ in batch])
            slots = np.array([j for _, j, _ in batch])
            tok, length, pool = enc.encode([c for _, _, c in batch])
            tokens[rows, slots] = tok.numpy().astype(np.float16)
            lengths[rows, slots] = length.numpy().astype(np.int32)
            if pooled is not None:
                pooled[rows, slots] = pool.numpy().astype(np.float16)
            done = items[lo + self.batch_size][0] if lo + self.batch_size < len(items) else n  # rows before: done
            if progress is not None and done > reported:
                progress(done - reported)
                reported = done
        if progress is not None and n > reported:
            progress(n - reported)
        if not (np.isfinite(tokens).all() and (pooled is None or np.isfinite(pooled).all())):
            raise UserError(f"embed-text: captions of samples {start}..{stop - 1} (shard {shard_index}) give "
                            f"embeddings beyond float16's range; check text_encoder.weights = "
                            f"{self.spec['directory']} (or try text_encoder.precision = fp32)")
        valid = lengths.max(axis=1) > 0
        failures = [{"sample": start + int(r), "file": self.index.shown(start + int(r)), "reason": NO_CAPTION}
                    for r in np.flatnonzero(~valid)]
        arrays = {schema.TOKENS: tokens, schema.LENGTHS: lengths, schema.VALID: valid,
                  schema.SAMPLE_IDS: self.index.ids[start:stop].copy()}
        if pooled is not None:
            arrays[schema.POOLED] = pooled
        return arrays, {"failures": failures, "captions": len(items)}
