"""``fae-pipe sample``: images from the trained generator (class-conditional SiT or flow, or the
text-to-image MMDiT with prompts), decoded through the FAE.

Thin over ``fae_pipe.sampling``: resolve the classes and labels, let each process
generate its share of the global batches (``accelerate launch`` gives several; a
plain call is one), gather on the main process, and write

- ``<samples>/samples.npz``: ADM layout, ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` labels;
- ``<samples>/grid.png``: one row per class (at most ``MAX_GRID_ROWS``), class names on the left;
- ``<samples>/samples.json``: how the samples were made (read back by ``evaluate``).

Text-to-image (a ``t2i.safetensors``): the prompts (``--prompt`` and/or ``--prompts FILE`` /
``sample.prompts``) take the place of the classes: ``arr_1`` numbers the prompt of each
image, the grid has one row per prompt captioned with it, and ``samples.json`` lists the
prompts with their extra fields (the caption demo's attributes, for the oracle).

Same seed, same images, whatever the batch split over processes (``plan.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fae_pipe.artifacts import atomic_write, atomic_write_json, file_fingerprint
from fae_pipe.config import Config
from fae_pipe.device import pick_device
from fae_pipe.errors import UserError
from fae_pipe.sampling.generator import ImageGenerator, default_paths
from fae_pipe.sampling.grid import make_grid
from fae_pipe.sampling.outputs import SAMPLES_FILE, gather_parts, save_samples, write_part
from fae_pipe.sampling.plan import balanced_labels, process_batches, resolve_classes
from fae_pipe.sampling.prompts import resolve_prompts

MAX_GRID_ROWS = 64  # a 1000-class grid would be a 258k-pixel-tall PNG; the first 64 classes show enough
META_FILE = "samples.json"


def class_names(latents_path: str, num_classes: int) -> list[str] | None:
    """Class names recorded in the latent store's attrs (copied from the index by extract/encode), if any."""
    from fae_pipe.cache import schema

    try:
        group, _ = schema.open_store(latents_path)
    except UserError:
        return None
    names = group.attrs.get(schema.A_CLASSES)
    return [str(n) for n in names] if names and len(names) == num_classes else None


def _distributed_state():
    """(rank, world size, device, barrier) from Accelerate; one process when not launched."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device, state.wait_for_everyone


def run(cfg: Config, export: str | None = None, prompt: tuple[str, ...] = ()) -> dict:
    """``export``: the generator file to sample (``--export``; default: the configured ``generator``'s in its
    run directory); its family (SiT, flow or t2i) comes from the file. ``prompt``: ``--prompt`` values."""
    s, paths = cfg.sample, cfg.paths
    t0 = time.perf_counter()
    rank, world, launch_device, barrier = _distributed_state()
    device = launch_device if (s.device == "auto" and world > 1) else pick_device(s.device)
    sit_path, fae_path, decoder_path = default_paths(paths, cfg.generator)
    sit_path = Path(export) if export else sit_path
    if (prompt or s.prompts) and not sit_path.is_file():
        raise UserError(f"text-to-image export '{sit_path}' not found: run `fae-pipe train-t2i` first, "
                        f"then pass its t2i.safetensors with --export")
    gen = ImageGenerator.load(sit_path, fae_path, decoder_path, use_ema=s.use_ema, device=device,
                              attention=cfg.runtime.attention, flow_denoise=cfg.flow.denoise == "tweedie")
    how = _how(cfg, gen)
    prompts = None
    if gen.family == "t2i":
        prompts = resolve_prompts(prompt, s.prompts or None)
        gen.set_prompts([p["prompt"] for p in prompts], s.device)
        names, classes = [p["prompt"] for p in prompts], list(range(len(prompts)))
        how["record"]["prompts"] = prompts
    elif prompt or s.prompts:
        raise UserError(f"--prompt / sample.prompts are for text-to-image exports, but {sit_path} is a "
                        f"class-conditional {gen.family} export: use sample.classes")
    else:
        names = class_names(paths.latents, gen.num_classes)
        classes = resolve_classes(list(s.classes), gen.num_classes, names)
    labels = balanced_labels(classes, s.num_samples)
    mine = process_batches(s.num_samples, s.batch_size, rank, world)
    my_count = sum(len(b) for b in mine)
    out_dir = Path(paths.samples)
    if rank == 0:
        c, h, w = gen.latent_shape
        what = (f"the flow (guidance {how['guidance']}, denoise {cfg.flow.denoise})" if gen.family == "flow" else
                f"{s.method} x {s.steps} steps, guidance {s.guidance or 'none'}, shift {gen.shift:.3g}")
        of = f"{len(classes)} prompt(s)" if prompts is not None else f"{len(classes)} class(es)"
        print(f"sample: {s.num_samples} images of {of} with {what}, {c}x{h}x{w} latents, "
              f"{'EMA' if s.use_ema else 'raw'} weights, {world} process(es) on {device}", file=sys.stderr)

    pieces = []
    with tqdm(total=my_count, desc="sample", unit="img", disable=rank != 0, dynamic_ncols=True) as bar:
        for batch in mine:
            pieces.append(gen.generate(batch, labels[batch.start:batch.stop], s.seed, s.method, s.steps,
                                       how["sampler_guidance"]))
            bar.update(len(batch))
    indices = np.concatenate([np.arange(b.start, b.stop) for b in mine]) if mine else np.zeros(0, np.int64)
    own = np.concatenate(pieces) if pieces else np.zeros((0, 1, 1, 3), np.uint8)

    if world > 1:
        write_part(out_dir, rank, world, indices, own)
        barrier()
    summary = {}
    if rank == 0:
        images = gather_parts(out_dir, world, s.num_samples) if world > 1 else own
        summary = _write_outputs(out_dir, images, labels, classes, names, s, gen, fae_path, sit_path, world)
        summary.update(how["record"])
        wall = time.perf_counter() - t0
        summary["wall_seconds"] = round(wall, 3)
        _write_meta(out_dir / META_FILE, summary)
        print(f"sample: {len(images)} images {images.shape[1]}x{images.shape[2]} in {wall:.1f} s "
              f"({len(images) / max(wall, 1e-9):.2f} img/s, {world} process(es)) -> {out_dir / SAMPLES_FILE}, "
              f"{out_dir / 'grid.png'}")
    if world > 1:
        barrier()
    return summary


def _how(cfg: Config, gen) -> dict:
    """How this generator samples: the guidance its sampler takes, and what samples.json records of it."""
    s, f = cfg.sample, cfg.flow
    if gen.family != "flow":
        return {"sampler_guidance": s.guidance, "record": {"generator": gen.family}}
    from fae_pipe.flow import configured

    guidance = {"scale": f.guidance, "schedule": f.guidance_schedule, "mode": f.guidance_mode}
    return {"sampler_guidance": configured(f.guidance, f.guidance_schedule, f.guidance_mode), "guidance": guidance,
            "record": {"generator": "flow", "method": "flow-inversion", "steps": None, "guidance": guidance,
                       "denoise": f.denoise, "noise_sigma": gen.flow_sigma, "shift_factor": None}}


def _write_outputs(out_dir: Path, images, labels, classes, names, s, gen, fae_path, sit_path, world) -> dict:
    save_samples(out_dir / SAMPLES_FILE, images, labels)
    shown = classes[:MAX_GRID_ROWS]
    grid = make_grid(images, labels, shown, s.grid_per_class, names, strip_em=24 if gen.family == "t2i" else 12)
    for name in ("grid.png", f"grid_{gen.family}.png"):  # the latest, and the generator's beside the other's
        atomic_write(out_dir / name, lambda tmp: grid.save(tmp, format="PNG"))
    if len(classes) > len(shown):
        rows = "prompts" if gen.family == "t2i" else "classes"
        print(f"sample: grid.png shows the first {len(shown)} of {len(classes)} {rows}", file=sys.stderr)
    return {
        "num_samples": int(len(images)), "image_size": [int(images.shape[1]), int(images.shape[2])],
        "classes": [int(c) for c in classes], "class_names": None if names is None else [names[c] for c in classes],
        "method": s.method, "steps": s.steps, "guidance": s.guidance, "seed": s.seed, "use_ema": s.use_ema,
        "batch_size": s.batch_size, "shift_factor": gen.shift, "world_size": world,
        "sit": str(sit_path), "sit_fingerprint": file_fingerprint(sit_path),
        # what decoded the samples: the FAE export, or the VAE a VAE latent store records (no FAE read then)
        "fae_fingerprint": None if _vae_decoded(gen) else file_fingerprint(fae_path),
        "latent_source": gen.latent_source,
    }


def _vae_decoded(gen) -> bool:
    from fae_pipe.cache.schema import SOURCE_SDVAE

    return (gen.latent_source or {}).get("kind") == SOURCE_SDVAE


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_json(path, meta)
