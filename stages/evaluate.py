"""``fae-pipe evaluate``: generation and reconstruction metrics into ``<metrics>/eval.json``.

Generation (``<samples>/samples.npz`` against the real data):

- FD-DINOv2: Frechet distance of DINOv2 cls tokens, generated images vs up to
  ``evaluate.max_reference`` real images (valid rows, the reference view "orig"): the
  feature store's cached cls tokens when its encoder is DINOv2, else
  ``evaluate.reference_encoder`` (a DINOv2) run over those reference images. The
  store's encoder is rebuilt from the config and must be the one the store was made
  with (name, input size, precision, layer, model_args, weights fingerprint, mean/std).
- fd_encoder: the same distance in the store's own encoder space (its pooled vectors:
  cls token, or SigLIP's attention-pool head), equal to FD-DINOv2 for a DINOv2 store.
- precision / recall / density / coverage: k-NN manifolds (``evaluate.knn_k``) in the
  same cls space, real side capped at the number of generated images (equal sizes,
  as the metric's authors recommend).
- FID and Inception Score only with a local FID Inception file
  (``evaluate.inception_weights``); otherwise ``null`` with a ``*_status`` saying why.
  FID's real statistics come from the same reference images, decoded from the index.

Text-to-image samples (``samples.json`` with generator ``t2i``; ``arr_1`` = prompt numbers):
``text_to_image`` adds FD-DINOv2 of the held-out prompts' samples against the held-out
images (the index's held-out split: on the caption demo, the held-out colour-shape
pairs) and, as its yardstick, of the seen prompts' samples against the training images, the oracle's colour / shape / count accuracy on seen and held-out prompts when
the prompts carry attributes (``fae_pipe.metrics.oracle.by_split``), and the CLIP score
with a local CLIP (``evaluate.clip_weights``; otherwise reported unavailable).

Reconstruction (held-out images through the latent source the samples were decoded with,
``latent_source`` in ``samples.json``, copied from the latent store through the SiT export):
FAE: feature store tokens -> FAE encoder (posterior mean) -> feature decoder -> pixel
decoder; SD-VAE: the images' pixels -> VAE posterior mean -> VAE decoder (the VAE the
record names, fingerprint-checked); against the images' own pixels: rFD-DINOv2 (vs the
DINOv2 cls tokens of the same images), rfd_encoder
(vs their stored pooled vectors), PSNR, LPIPS
(VGG, only when torchvision's VGG-16 file is in the torch hub cache), rFID with
Inception weights. Metric maths lives in ``fae_pipe.metrics``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fae_pipe.cache import schema
from fae_pipe.config import Config
from fae_pipe.device import pick_device
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import FAE_FILE
from fae_pipe.fae.data import feature_split, open_feature_store
from fae_pipe.metrics.frechet import RunningStats, feature_stats, frechet_distance
from fae_pipe.metrics.weights import MetricUnavailable
from fae_pipe.sampling.outputs import SAMPLES_FILE, load_samples
from fae_pipe.sampling.reference import GenerationScorer, encoder_cls, fd, load_reference_pixels, read_view
from fae_pipe.training.logs import write_metrics

NO_INCEPTION = "unavailable: no evaluate.inception_weights"
PIXEL_BLOCK = 256  # reference images decoded per Inception pass (bounds RAM at ImageNet scale)


def load_inception(ev, device):
    """(model, None) or (None, status) for FID/IS."""
    if not ev.inception_weights:
        return None, NO_INCEPTION
    from fae_pipe.metrics.inception import load_fid_inception

    try:
        return load_fid_inception(ev.inception_weights, device), None
    except MetricUnavailable as e:
        return None, _short(e)


def inception_generation(model, images, index, sample_ids, image_size, view, ev, workers) -> dict:
    """FID of the samples against the reference images, and the samples' Inception Score."""
    from fae_pipe.metrics.inception import inception_features, inception_score

    pool, logits = inception_features(images, model, ev.batch_size)
    real = RunningStats()
    for lo in range(0, len(sample_ids), PIXEL_BLOCK):
        pixels = load_reference_pixels(index, sample_ids[lo:lo + PIXEL_BLOCK], image_size, view, workers)
        real.update(inception_features(pixels, model, ev.batch_size)[0])
    score, spread = inception_score(logits, splits=min(10, len(images)))
    return {"fid": frechet_distance(*feature_stats(pool), *real.finalize()), "fid_status": "ok",
            "inception_score": score, "inception_score_std": spread, "is_status": "ok"}


def rebuild(cfg: Config, group, rows, target: np.ndarray, view: tuple[int, str], device,
            latent_source: dict | None) -> np.ndarray:
    """uint8 reconstructions of the held-out ``rows`` through the latent source's own round trip:
    the VAE's (``target`` pixels -> posterior mean -> decoder) or the FAE's (stored features ->
    posterior mean -> feature decoder -> pixel decoder). A record without a kind is the FAE's."""
    from fae_pipe.sampling.generator import default_paths, to_uint8

    bs, out = cfg.evaluate.batch_size, []
    if (latent_source or {}).get("kind") == schema.SOURCE_SDVAE:
        from fae_pipe.models.vae import Vae, vae_input

        vae = Vae.from_record(latent_source.get("vae"), device, f"{cfg.paths.samples}/samples.json")
        for lo in range(0, len(target), bs):
            out.append(to_uint8(vae.decode(vae.posterior(vae_input(target[lo:lo + bs]))[0])))
        return np.concatenate(out)
    from fae_pipe.fae.autoencoder import FeatureAutoencoder

    _, fae_path, decoder_path = default_paths(cfg.paths)
    fae = FeatureAutoencoder.load(fae_path, decoder_path, device=device, attention=cfg.runtime.attention)
    for lo in range(0, len(rows), bs):
        feats = torch.from_numpy(read_view(group, schema.FEATURES, rows[lo:lo + bs], view[0]))
        out.append(to_uint8(fae.reconstruct(feats, "pixels")))
    return np.concatenate(out)


def reconstruction(cfg: Config, group, scorer: GenerationScorer, view: tuple[int, str], inception, device,
                   latent_source: dict | None = None) -> dict:
    """rFD-DINOv2, rFD in the store's encoder space, PSNR, LPIPS (and rFID) of held-out images rebuilt through
    the latent source (``rebuild``)."""
    from fae_pipe.data.index import read_index
    from fae_pipe.metrics.image import build_lpips, lpips_distance, psnr

    ev, paths = cfg.evaluate, cfg.paths
    rows = feature_split(group, paths.index, paths.features, need_train=False).holdout_rows(ev.recon_images)
    if len(rows) < 2:
        return {"status": f"unavailable: {len(rows)} held-out image(s) in {paths.features}; need 2 "
                          "(raise data.holdout_fraction and re-run prepare + extract)"}
    index = read_index(paths.index)
    ids = schema.read_array(group, schema.SAMPLE_IDS, rows)
    size = int(group.attrs[schema.A_IMAGE_SIZE])
    target = load_reference_pixels(index, ids, size, view[1], cfg.data.decode_workers)
    recon = rebuild(cfg, group, rows, target, view, device, latent_source)
    if recon.shape != target.shape:
        raise UserError(f"the pixel decoder makes {recon.shape[1]} px images but {paths.features} holds "
                        f"{size} px crops: train the decoder at data.image_size = {size}")
    stored = read_view(group, schema.CLS, rows, view[0])
    own = fd(encoder_cls(scorer.encoder, recon, ev.batch_size), stored)
    dino = fd(encoder_cls(scorer.dinov2, recon, ev.batch_size), encoder_cls(scorer.dinov2, target, ev.batch_size)) \
        if scorer.separate else own
    out = {"num_images": int(len(rows)), "psnr": _finite(psnr(recon, target)), "rfd_dinov2": dino, "rfd_encoder": own}
    try:
        model = build_lpips("vgg", device)
        nchw = [torch.from_numpy(a).permute(0, 3, 1, 2) for a in (recon, target)]
        out.update(lpips=float(lpips_distance(model, *nchw, batch_size=ev.batch_size).mean()), lpips_status="ok")
    except MetricUnavailable as e:
        out.update(lpips=None, lpips_status=_short(e))
    if inception is not None:
        from fae_pipe.metrics.inception import inception_features

        out["rfid"] = fd(inception_features(recon, inception, ev.batch_size)[0].numpy(),
                         inception_features(target, inception, ev.batch_size)[0].numpy())
    return out


def run(cfg: Config) -> dict:
    t0, ev, paths = time.perf_counter(), cfg.evaluate, cfg.paths
    device = pick_device(cfg.image_encoder.device)
    images, labels = load_samples(Path(paths.samples) / SAMPLES_FILE)
    if len(images) < 2:
        raise UserError(f"{Path(paths.samples) / SAMPLES_FILE} holds {len(images)} image(s); evaluate needs >= 2 "
                        "(raise sample.num_samples)")
    group = open_feature_store(paths.features)
    size = int(group.attrs[schema.A_IMAGE_SIZE])
    if images.shape[1:3] != (size, size):
        raise UserError(f"samples are {images.shape[1]}x{images.shape[2]} but {paths.features} holds {size} px "
                        "crops: the pixel decoder must produce data.image_size images")
    scorer = GenerationScorer(cfg, group, paths.features, device)
    rec, view, ref_rows = scorer.record, scorer.view, scorer.ref_rows
    result = {"num_generated": int(len(images)), "num_reference": int(len(ref_rows)), "reference_view": view[1]}
    result.update(scorer.score(scorer.features(images)))
    result["encoder"] = {"name": rec["name"], "weights": rec["weights"], "input_size": rec["input_size"],
                         "random_weights": bool(rec.get("random_weights"))}
    result["fd_dinov2_reference"] = scorer.dinov2_source
    result["reference_random_weights"] = bool(scorer.dinov2.random_weights)
    inception, status = load_inception(ev, device)
    if inception is None:
        result.update(fid=None, fid_status=status, inception_score=None, inception_score_std=None, is_status=status)
    else:
        from fae_pipe.data.index import read_index

        ids = schema.read_array(group, schema.SAMPLE_IDS, ref_rows)
        result.update(inception_generation(inception, images, read_index(paths.index), ids, size, view[1], ev,
                                           cfg.data.decode_workers))
    meta = _read_samples_json(Path(paths.samples))
    if (meta or {}).get("generator") == "t2i":
        result["text_to_image"] = text_to_image(cfg, group, images, labels, meta, device)
    source = (meta or {}).get("latent_source")
    result["latent_source"] = (source or {}).get("kind", schema.SOURCE_FAE)
    result["reconstruction"] = reconstruction(cfg, group, scorer, view, inception, device, source)
    result["warnings"] = _warnings(result, meta, Path(paths.fae_run) / FAE_FILE)
    result["samples"] = _samples_meta(meta)
    result["wall_seconds"] = round(time.perf_counter() - t0, 3)
    out = Path(paths.metrics) / "eval.json"
    write_metrics(out, result)
    # and under the generator's name, so a flow's and a SiT's numbers sit side by side (dvc.yaml metrics)
    write_metrics(Path(paths.metrics) / f"eval_{(result['samples'] or {}).get('generator', 'sit')}.json", result)
    print(summary_line(result, out))
    return result


def text_to_image(cfg: Config, group, images: np.ndarray, prompt_ids, meta: dict, device) -> dict:
    """Held-out FD-DINOv2, oracle accuracy (seen / held-out prompts) and CLIP score of text-to-image samples."""
    from fae_pipe.metrics.clip_score import ClipScorer
    from fae_pipe.metrics.oracle import by_split

    prompts = list(meta.get("prompts") or [])
    ids = np.asarray(prompt_ids if prompt_ids is not None else [], np.int64)
    if not prompts or len(ids) != len(images) or (ids.size and (ids.min() < 0 or ids.max() >= len(prompts))):
        raise UserError(f"{cfg.paths.samples}: samples.json lists {len(prompts)} prompts but samples.npz's arr_1 "
                        "does not number them: re-run `fae-pipe sample`")
    out: dict = {"prompts": len(prompts), "heldout_prompts": sum(bool(p.get("heldout")) for p in prompts)}
    held = np.array([bool(prompts[i].get("heldout")) for i in ids.tolist()], bool)
    split = feature_split(group, cfg.paths.index, cfg.paths.features, need_train=False)
    # each split's samples against that split's real images: the held-out number is the issue's, the seen
    # one its yardstick (the same sizes and encoder, on combinations the generator was trained on)
    for name, chosen, real in (("heldout", held, split.holdout), ("seen", ~held, split.train)):
        if chosen.sum() >= 2 and real.sum() >= 2:
            scorer = GenerationScorer(cfg, group, cfg.paths.features, device, mask=real)
            dino, _ = scorer.split(scorer.features(images[chosen]))
            out.update({f"fd_dinov2_{name}": fd(dino, scorer.reference_dinov2), f"{name}_samples": int(chosen.sum()),
                        f"{name}_reference": int(len(scorer.ref_rows))})
        else:
            out[f"fd_dinov2_{name}"] = None
            out[f"fd_dinov2_{name}_status"] = (f"unavailable: {int(chosen.sum())} samples of {name} prompts and "
                                               f"{int(real.sum())} {name} images (need 2 of each)")
    out["oracle"] = by_split(images, ids, prompts)
    try:
        clip = ClipScorer(cfg.evaluate.clip_weights, device)
        scores = clip.score(images, [prompts[i]["prompt"] for i in ids.tolist()], cfg.evaluate.batch_size)
        out.update(clip_score=float(scores.mean()), clip_score_seen=_mean(scores[~held]),
                   clip_score_heldout=_mean(scores[held]), clip_status="ok", clip_fingerprint=clip.fingerprint)
    except MetricUnavailable as e:
        out.update(clip_score=None, clip_status=_short(e))
    return out


def _mean(v: np.ndarray) -> float | None:
    return float(v.mean()) if v.size else None


def _read_samples_json(samples_dir: Path) -> dict | None:
    meta = samples_dir / "samples.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def _samples_meta(m: dict | None) -> dict | None:
    """The sampling settings recorded by ``sample`` (scalars only, so ``dvc metrics show`` stays readable)."""
    if m is None:
        return None
    out = {k: m.get(k) for k in ("method", "steps", "seed", "use_ema", "num_samples")}
    out["guidance"] = json.dumps(m.get("guidance"))
    out["generator"] = m.get("generator", "sit")  # which generator family made them (samples.json before: SiT)
    return out


def _short(e: Exception) -> str:
    """A metric's unavailability as a short status: the message up to its first ';'."""
    return f"unavailable: {str(e).split(';')[0]}"


def _warnings(result: dict, meta: dict | None, fae_path: Path) -> list[str]:
    notes = []
    if result["encoder"]["random_weights"] or result.get("reference_random_weights"):
        notes.append("encoder weights are RANDOM: FD-DINOv2, precision/recall and rFD are not DINOv2 numbers")
    if meta and fae_path.is_file() and result.get("latent_source") != schema.SOURCE_SDVAE:
        from fae_pipe.artifacts import export_fingerprints

        if meta.get("fae_fingerprint") not in export_fingerprints(fae_path):
            notes.append(f"the samples were decoded with another FAE export than {fae_path} (used for reconstruction)")
    for note in notes:
        print(f"evaluate: WARNING: {note}", file=sys.stderr)
    return notes


def _finite(v: float) -> float | None:
    """JSON has no infinity: a PSNR of identical images (+inf) is written as null."""
    return v if np.isfinite(v) else None


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def summary_line(r: dict, out: Path) -> str:
    rc = r["reconstruction"]
    made_by = f" ({r['samples']['generator']})" if r.get("samples") else ""
    return (f"evaluate: {r['num_generated']} samples{made_by} vs {r['num_reference']} reference: FD-DINOv2 "
            f"{_num(r['fd_dinov2'], '.4g')} (FD in {r['encoder'].get('name', 'the store encoder')} space "
            f"{_num(r.get('fd_encoder'), '.4g')}), "
            f"FID {_num(r['fid'], '.2f')}, IS {_num(r['inception_score'], '.2f')}, "
            f"precision {_num(r['precision'])}, recall {_num(r['recall'])}; reconstruction: rFD-DINOv2 "
            f"{_num(rc.get('rfd_dinov2'), '.4g')}, PSNR {_num(rc.get('psnr'), '.2f')} dB, LPIPS "
            f"{_num(rc.get('lpips'))}{' (RANDOM encoder)' if r['encoder']['random_weights'] else ''}"
            f"{_t2i_summary(r.get('text_to_image'))} in {r['wall_seconds']:.1f} s -> {out}")


def _t2i_summary(t: dict | None) -> str:
    if not t:
        return ""
    oracle = t.get("oracle") or {}
    acc = ", ".join(f"{split} colour {_num(oracle[split]['colour'], '.2f')} shape {_num(oracle[split]['shape'], '.2f')}"
                    for split in ("seen", "heldout") if split in oracle)
    return (f"; text-to-image: FD-DINOv2 held-out {_num(t.get('fd_dinov2_heldout'), '.4g')} / seen "
            f"{_num(t.get('fd_dinov2_seen'), '.4g')}"
            f"{', oracle ' + acc if acc else ''}, CLIP score {_num(t.get('clip_score'), '.2f')}")
