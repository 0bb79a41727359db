"""``FeatureExtractTask``: one storage shard of images -> frozen image-encoder tokens (``extract``).

Image decode + preprocessing run in background threads (so decoding overlaps the
encoder forward), ``image_encoder.batch_size`` images per forward (all their views
in one), float16 patch and cls tokens, plus the shard's per-channel moments of the
stored patch tokens (merged into the store's statistics when it completes). Batches
are cut from the storage shard's own start, so the bits written never depend on
``--shards`` or ``--workers``.
Unreadable images become zero rows with ``valid = False`` and a recorded
(file, reason), or a UserError with ``on_error=fail``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fae_pipe.cache import schema
from fae_pipe.cache.feature_stats import shard_moments_of_features
from fae_pipe.errors import UserError


def build_encoder_from(spec: dict):
    """Build the frozen encoder of ``spec`` (``encoders.timm_vit.encoder_spec``; random weights are seeded there)."""
    from fae_pipe.encoders.timm_vit import build_from_spec

    return build_from_spec(spec)


class FeatureExtractTask:
    """Shard task for ``run_shards``: image decode -> encoder -> float16 tokens, per storage shard."""

    def __init__(self, index_path: str, encoder_spec: dict, image_size: int, views: list[str],
                 batch_size: int, decode_workers: int, on_error: str):
        self.index_path = index_path
        self.spec = dict(encoder_spec)
        self.image_size = image_size
        self.views = list(views)
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.on_error = on_error
        self.cache_key = "extract:" + json.dumps([index_path, self.spec], sort_keys=True)
        self.encoder = None
        self.index = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["encoder"] = state["index"] = None  # workers build their own
        return state

    def adopt(self, encoder) -> None:
        """Reuse an encoder the coordinator already built (in-process runs build it once)."""
        self.encoder = encoder

    def setup(self) -> None:
        from fae_pipe.data.index import read_index

        self.index = read_index(self.index_path)
        if self.encoder is None:
            self.encoder = build_encoder_from(self.spec)

    def _load(self, i: int):
        """Decode + crop + views + encoder preprocessing of sample ``i`` (runs in a thread)."""
        from fae_pipe.data.transforms import ImageDecodeError, load_pixels

        try:
            pixels = load_pixels(self.index.abspath(i), self.image_size, self.views)
        except ImageDecodeError as e:
            return e
        return self.encoder.preprocess(pixels)

    def _prefetched(self, indices: range):
        """Yield ``(i, tensor or ImageDecodeError)`` in order, decoding up to two batches ahead."""
        if self.decode_workers == 0:
            for i in indices:
                yield i, self._load(i)
            return
        window = 2 * self.batch_size
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
            pending = {}
            upcoming = iter(indices)
            for i in upcoming:
                pending[i] = pool.submit(self._load, i)
                if len(pending) >= window:
                    break
            for i in indices:
                result = pending.pop(i).result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending[nxt] = pool.submit(self._load, nxt)
                yield i, result

    def decoded_batches(self, start: int, stop: int, valid: np.ndarray, failures: list, progress=None):
        """Yield ``(rows, inputs)`` per batch of ``batch_size`` samples cut from ``start``: the shard-relative
        rows that decoded and their preprocessed inputs (``_load``). An unreadable image clears its ``valid``
        flag and is appended to ``failures`` (or is a UserError with ``on_error=fail``); ``progress(n)``
        is called once the consumer has had the batch. Shared by every task that starts from images."""
        from fae_pipe.data.transforms import ImageDecodeError

        stream = self._prefetched(range(start, stop))
        for b0 in range(start, stop, self.batch_size):
            rows, inputs = [], []
            for i, item in (next(stream) for _ in range(b0, min(stop, b0 + self.batch_size))):
                if isinstance(item, ImageDecodeError):
                    if self.on_error == "fail":
                        raise UserError(f"cannot decode image {self.index.abspath(i)}: {item.reason} "
                                        "(set data.on_error=skip to record it and continue)")
                    valid[i - start] = False
                    failures.append({"sample": i, "sample_id": int(self.index.ids[i]), "file": self.index.shown(i),
                                     "reason": item.reason})
                else:
                    rows.append(i - start)
                    inputs.append(item)
            yield rows, inputs
            if progress is not None:
                progress(min(stop, b0 + self.batch_size) - b0)

    def compute(self, shard_index, start, stop, progress=None):
        import torch

        enc, n, v = self.encoder, stop - start, len(self.views)
        tokens = int(enc.grid[0]) * int(enc.grid[1])
        feats = np.zeros((n, v, tokens, enc.dim), np.float16)
        cls = np.zeros((n, v, enc.dim), np.float16)
        valid = np.ones(n, bool)
        failures = []
        for rows, inputs in self.decoded_batches(start, stop, valid, failures, progress):
            if inputs:
                with torch.inference_mode():
                    patch, cls_tok = enc.encode(torch.cat(inputs))
                feats[rows] = patch.float().cpu().numpy().reshape(len(rows), v, tokens, enc.dim).astype(np.float16)
                cls[rows] = cls_tok.float().cpu().numpy().reshape(len(rows), v, enc.dim).astype(np.float16)
        arrays = {schema.FEATURES: feats, schema.CLS: cls, schema.VALID: valid,
                  schema.LABELS: self.index.labels[start:stop].copy(),
                  schema.SAMPLE_IDS: self.index.ids[start:stop].copy()}
        # the shard's exact per-channel moments ride in its completion record (cache.feature_stats)
        return arrays, {"failures": failures, "moments": shard_moments_of_features(feats, valid)}
