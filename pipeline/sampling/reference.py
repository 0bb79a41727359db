"""The real side of the generation metrics: reference rows, their cached tokens and their pixels.

Why from the feature store: FD-DINOv2 compares generated images with real ones in
the encoder's space, and ``extract`` already ran the encoder over every real image.
Reading the stored cls tokens of a reference subset costs a few chunk decodes
instead of a second encoder pass over the dataset. The subset is spread over the
whole store (a seeded random choice, kept in store order), not the first rows,
because the store is in ImageFolder order and its first rows are a few classes.

Generated images go through exactly the preprocessing the stored tokens saw
(``FrozenEncoder.preprocess``: Pillow bicubic to the encoder size, the encoder's
mean/std), so both sides differ only in where the pixels came from. When the store's
encoder is not DINOv2 (SigLIP2, DINOv3, ...), FD-DINOv2's reference features cannot
come from the store: ``GenerationScorer`` runs ``evaluate.reference_encoder`` over the
same reference images instead.
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
    """Pooled vectors (cls tokens for DINOv2) (N, D) float32 of uint8 images (N, H, W, 3), ``batch_size`` at a time."""
    out = []
    for lo in range(0, len(images), batch_size):
        _, cls = encoder.encode(encoder.preprocess(images[lo:lo + batch_size]))
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


# config keys that must equal the store's record; a store made before a key existed holds its default
CHECKED_KEYS = {"name": None, "input_size": None, "precision": None, "weights": None, "layer": 0, "layer_norm": True}


def check_encoder(cfg_enc, attrs: dict, store: str) -> dict:
    """The store's encoder record, refused unless the configured encoder matches it."""
    from fae_pipe.encoders.registry import parse_model_args

    rec = attrs.get(schema.A_ENCODER)
    if not isinstance(rec, dict):
        raise UserError(f"{store} records no encoder settings (attrs 'encoder'); re-create it with `fae-pipe extract`")
    for key, legacy in CHECKED_KEYS.items():
        if rec.get(key, legacy) != getattr(cfg_enc, key):
            raise UserError(f"image_encoder.{key} = {getattr(cfg_enc, key)!r} differs from the "
                            f"{rec.get(key, legacy)!r} that made {store}: evaluate with the store's encoder settings")
    if rec.get("model_args", {}) != parse_model_args(cfg_enc.model_args):
        raise UserError(f"image_encoder.model_args = {cfg_enc.model_args!r} differs from the {rec.get('model_args')!r} "
                        f"that made {store}: evaluate with the store's encoder settings")
    return rec


def build_checked_encoder(cfg_enc, attrs: dict, store: str, device):
    """The encoder that made ``store``, rebuilt from the config, checked against its record (weights, normalisation)."""
    from fae_pipe.encoders.registry import encoder_spec
    from fae_pipe.encoders.timm_vit import build_from_spec

    rec = check_encoder(cfg_enc, attrs, store)
    enc = build_from_spec(encoder_spec(cfg_enc), device)
    if enc.weights_fingerprint != rec.get("weights_fingerprint"):
        raise UserError(f"encoder weights {enc.weights_fingerprint[:23]} differ from the "
                        f"{str(rec.get('weights_fingerprint'))[:23]} that made {store}")
    norm = attrs.get(schema.A_NORMALIZATION) or {}
    if norm and (list(norm.get("mean", [])), list(norm.get("std", []))) != (list(enc.mean), list(enc.std)):
        raise UserError(f"image_encoder.mean/std {list(enc.mean)}/{list(enc.std)} differ from the {norm.get('mean')}/"
                        f"{norm.get('std')} that made {store}: evaluate with the store's preprocessing")
    return rec, enc


def reference_dinov2(ref_cfg, store_cfg, rec: dict, store: str, device):
    """(DINOv2 encoder or None, description): None = the store's own encoder is the FD-DINOv2 reference.

    ``evaluate.reference_encoder.name`` empty, or equal settings to the store's encoder: the
    store's cached cls tokens are the reference (it must then be a DINOv2 at layer 0).
    Otherwise the configured DINOv2 is built and its reference features come from the
    reference images themselves (``GenerationScorer``).
    """
    from fae_pipe.encoders.registry import encoder_spec, resolve
    from fae_pipe.encoders.timm_vit import build_from_spec

    own = {"name": rec.get("name"), "family": rec.get("family", "dinov2"), "layer": rec.get("layer", 0)}
    same = not ref_cfg.name or {k: v for k, v in encoder_spec(ref_cfg).items() if k != "device"} == \
        {k: v for k, v in encoder_spec(store_cfg).items() if k != "device"}
    if same:
        if own["family"] not in ("dinov2", "dinov2_reg") or own["layer"] != 0:
            raise UserError(f"{store} holds {own['name']} features (family {own['family']}, layer {own['layer']}), not "
                            "DINOv2 cls tokens: set evaluate.reference_encoder.name / .weights / .input_size to a "
                            "DINOv2 (e.g. vit_giant_patch14_dinov2, a local checkpoint, 224) for FD-DINOv2 "
                            "(docs/encoders.md)")
        return None, f"the feature store's cached cls tokens ({own['name']})"
    choice = resolve(ref_cfg.name)
    if not choice.is_dinov2 or ref_cfg.layer != 0:
        raise UserError(f"evaluate.reference_encoder.name = {ref_cfg.name!r} (layer {ref_cfg.layer}) is invalid: "
                        "FD-DINOv2 needs a DINOv2 (vit_*_patch14[_reg4]_dinov2) at layer 0")
    enc = build_from_spec(encoder_spec(ref_cfg), device)
    return enc, f"{ref_cfg.name} ({enc.weights_fingerprint[:23]}) over the reference images"


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two feature sets (N, D)."""
    from fae_pipe.metrics.frechet import feature_stats, frechet_distance

    return frechet_distance(*feature_stats(a), *feature_stats(b))


class GenerationScorer:
    """FD-DINOv2, FD in the store's encoder space and k-NN precision/recall/density/coverage of generated images.

    The one implementation behind ``fae-pipe evaluate`` and the quality curves of the
    training stages (``fae_pipe.sampling.progress``), so a curve's last point and the
    final evaluation agree. Built once:

    * the encoder the feature store was made with (checked by name, input size,
      precision, layer, model_args, weights fingerprint and normalisation) and the cached
      pooled vectors (``cls`` array) of up to ``evaluate.max_reference`` real images spread
      over the store: ``fd_encoder``, FD in the store's own space;
    * the FD-DINOv2 reference, whatever encoder the FAE used: the same cached cls tokens
      when the store's encoder is the configured DINOv2 (``evaluate.reference_encoder``
      empty or equal), else ``evaluate.reference_encoder``'s cls tokens of the same
      reference images, decoded from the index (once per scorer). precision/recall/
      density/coverage are in the DINOv2 space, as before.

    ``features`` returns one array per image, DINOv2 columns first then (when the spaces
    differ) the store encoder's, so callers can gather it like any feature matrix.
    """

    def __init__(self, cfg, group, store: str, device, mask: np.ndarray | None = None):
        """``mask``: store rows eligible as reference (default: every valid row; text-to-image: the held-out ones)."""
        self.ev, self.device = cfg.evaluate, device
        attrs = dict(group.attrs)
        self.record, self.encoder = build_checked_encoder(cfg.image_encoder, attrs, store, device)
        self.view = reference_view(group)
        valid = np.asarray(schema.read_array(group, schema.VALID), bool)
        self.ref_rows = spread_rows(valid if mask is None else valid & np.asarray(mask, bool), self.ev.max_reference)
        self.reference = read_view(group, schema.CLS, self.ref_rows, self.view[0])
        dinov2, self.dinov2_source = reference_dinov2(self.ev.reference_encoder, cfg.image_encoder, self.record, store,
                                                      device)
        self.separate = dinov2 is not None
        self.dinov2 = dinov2 if self.separate else self.encoder
        self.reference_dinov2 = self._dinov2_reference(cfg, group) if self.separate else self.reference
        self.width = self.dinov2.dim + (self.encoder.dim if self.separate else 0)

    def _dinov2_reference(self, cfg, group) -> np.ndarray:
        """The reference DINOv2's cls tokens of the reference images (decoded from the index in blocks)."""
        from tqdm.auto import tqdm

        from fae_pipe.data.index import read_index

        index, size = read_index(cfg.paths.index), int(group.attrs[schema.A_IMAGE_SIZE])
        ids = schema.read_array(group, schema.SAMPLE_IDS, self.ref_rows)
        out = []
        for lo in tqdm(range(0, len(ids), READ_BLOCK), desc="FD-DINOv2 reference", unit="block", dynamic_ncols=True):
            pixels = load_reference_pixels(index, ids[lo:lo + READ_BLOCK], size, self.view[1], cfg.data.decode_workers)
            out.append(encoder_cls(self.dinov2, pixels, self.ev.batch_size))
        return np.concatenate(out) if out else np.zeros((0, self.dinov2.dim), np.float32)

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, width) of uint8 images (N, H, W, 3): DINOv2 cls tokens [+ the store encoder's pooled vectors]."""
        dino = encoder_cls(self.dinov2, images, self.ev.batch_size)
        if not self.separate:
            return dino
        return np.concatenate([dino, encoder_cls(self.encoder, images, self.ev.batch_size)], 1)

    def split(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(DINOv2 part, store-encoder part) of ``features`` rows."""
        d = self.dinov2.dim
        return feats[:, :d], (feats[:, d:] if self.separate else feats)

    def score(self, gen: np.ndarray) -> dict:
        """Metrics of generated ``features`` rows against the reference."""
        from fae_pipe.metrics.prdc import prdc

        dino, own = self.split(gen)
        out = {"fd_dinov2": fd(dino, self.reference_dinov2), "fd_encoder": fd(own, self.reference),
               "knn_k": self.ev.knn_k}
        out.update(prdc(self.reference_dinov2[:len(gen)], dino, k=self.ev.knn_k, device=self.device))
        return out
