"""The real side of the generation metrics: reference rows, their cached tokens and their pixels.

Why from the feature store: FD-DINOv2 compares generated images with real ones in
the encoder's space, and ``extract`` already ran the encoder over every real image.
Reading the stored cls tokens of a reference subset costs a few chunk decodes
instead of a second encoder pass over the dataset. The subset is spread over the
whole store (a seeded random choice, kept in store order), not the first rows,
because the store is in ImageFolder order and its first rows are a few classes.

Generated images go through exactly the preprocessing the stored tokens saw
(``transforms.encoder_input``: Pillow bicubic to the encoder size, ImageNet
mean/std), so both sides differ only in where the pixels came from.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.errors import UserError

READ_BLOCK = 4096  # store rows per orthogonal read: bounds memory, keeps chunk decodes shared


def spread_rows(mask: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` of the True rows of ``mask``: all of them, or a seeded random subset, sorted."""
    rows = np.flatnonzero(np.asarray(mask, bool))
    if rows.size <= limit:
        return rows
    pick = np.random.Generator(np.random.PCG64(seed)).choice(rows.size, size=limit, replace=False)
    return rows[np.sort(pick)]


def reference_view(group) -> tuple[int, str]:
    """(view index, view name) used as the reference: "orig" when stored, else the first view."""
    views = list(group.attrs.get(schema.A_VIEWS) or ["orig"])
    return (views.index("orig"), "orig") if "orig" in views else (0, views[0])


def read_view(group, name: str, rows: np.ndarray, view: int, dtype=np.float32) -> np.ndarray:
    """Rows ``rows`` (sorted) of per-sample array ``name`` at view ``view``, as ``dtype``."""
    arr = group[name]
    out = np.zeros((len(rows), *arr.shape[2:]), dtype)
    for lo in range(0, len(rows), READ_BLOCK):
        block = np.asarray(rows[lo:lo + READ_BLOCK], np.int64)
        out[lo:lo + len(block)] = np.asarray(schema.read_rows(group, name, block, view), dtype)
    return out


@torch.no_grad()
def encoder_cls(encoder, images: np.ndarray, batch_size: int) -> np.ndarray:
    """cls tokens (N, D) float32 of uint8 images (N, H, W, 3), computed ``batch_size`` at a time."""
    from fae_pipe.data.transforms import encoder_input

    out = []
    for lo in range(0, len(images), batch_size):
        _, cls = encoder.encode(encoder_input(images[lo:lo + batch_size], encoder.input_size))
        out.append(cls.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def load_reference_pixels(index, sample_ids, image_size: int, view: str, workers: int = 4) -> np.ndarray:
    """uint8 (N, S, S, 3) pixels of index samples ``sample_ids`` in ``view``, decoded in threads."""
    from fae_pipe.data.transforms import ImageDecodeError, load_pixels

    def load(i: int) -> np.ndarray:
        try:
            return load_pixels(index.abspath(int(i)), image_size, [view])[0]
        except ImageDecodeError as e:
            raise UserError(f"reference image {e.path} cannot be decoded any more ({e.reason}): "
                            "the dataset changed since extract; re-run `fae-pipe prepare` and `extract`") from None

    if len(sample_ids) == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    if workers <= 0:
        return np.stack([load(i) for i in sample_ids])
    with ThreadPoolExecutor(workers, thread_name_prefix="ref-decode") as pool:
        return np.stack(list(pool.map(load, sample_ids)))


def check_encoder(cfg_enc, attrs: dict, store: str) -> dict:
    """The store's encoder record, refused unless the configured encoder matches it."""
    rec = attrs.get(schema.A_ENCODER)
    if not isinstance(rec, dict):
        raise UserError(f"{store} records no encoder settings (attrs 'encoder'); re-create it with `fae-pipe extract`")
    for key in ("name", "input_size", "precision", "weights"):
        if rec.get(key) != getattr(cfg_enc, key):
            raise UserError(f"image_encoder.{key} = {getattr(cfg_enc, key)!r} differs from the {rec.get(key)!r} that made "
                            f"{store}: evaluate with the store's encoder settings")
    return rec


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two feature sets (N, D)."""
    from fae_pipe.metrics.frechet import feature_stats, frechet_distance

    return frechet_distance(*feature_stats(a), *feature_stats(b))


class GenerationScorer:
    """FD-DINOv2 and k-NN precision/recall/density/coverage of generated images, in the store's encoder space.

    The one implementation behind ``fae-pipe evaluate`` and the quality curves of the
    training stages (``fae_pipe.sampling.progress``), so a curve's last point and the
    final evaluation agree. Built once: the encoder the feature store was made with
    (checked by name, input size, precision and weights fingerprint) and the cached cls
    tokens of up to ``evaluate.max_reference`` real images spread over the store.
    """

    def __init__(self, cfg, group, store: str, device):
        from fae_pipe.encoders.dinov2 import build_encoder

        enc_cfg, self.ev, self.device = cfg.image_encoder, cfg.evaluate, device
        self.record = check_encoder(enc_cfg, dict(group.attrs), store)
        self.encoder = build_encoder(enc_cfg.name, enc_cfg.weights, enc_cfg.input_size, device, enc_cfg.precision)
        if self.encoder.weights_fingerprint != self.record.get("weights_fingerprint"):
            raise UserError(f"encoder weights {self.encoder.weights_fingerprint[:23]} differ from the "
                            f"{str(self.record.get('weights_fingerprint'))[:23]} that made {store}")
        self.view = reference_view(group)
        self.ref_rows = spread_rows(np.asarray(schema.read_array(group, schema.VALID), bool), self.ev.max_reference)
        self.reference = read_view(group, schema.CLS, self.ref_rows, self.view[0])

    def features(self, images: np.ndarray) -> np.ndarray:
        """cls tokens (N, D) of uint8 images (N, H, W, 3)."""
        return encoder_cls(self.encoder, images, self.ev.batch_size)

    def score(self, gen: np.ndarray) -> dict:
        """Metrics of generated cls tokens ``gen`` (from ``features``) against the reference."""
        from fae_pipe.metrics.prdc import prdc

        out = {"fd_dinov2": fd(gen, self.reference), "knn_k": self.ev.knn_k}
        out.update(prdc(self.reference[:len(gen)], gen, k=self.ev.knn_k, device=self.device))
        return out
