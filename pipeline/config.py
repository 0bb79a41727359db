"""Typed, validated configuration: one dataclass per pipeline section.

Defaults reproduce the paper (ImageNet 256, App. D of arXiv 2512.07829); named
files in ``configs/`` override them and ``params.yaml`` is the active config that
DVC tracks. Every field carries its help text and valid range here, so the CLI,
the docs and the validator read one source. A bad key, type or value raises
``UserError`` with one line naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fae_pipe.errors import UserError

DEFAULT_CONFIG = "params.yaml"


def F(default, help: str, *, choices=None, min=None, max=None):  # noqa: A002 - mirrors click
    """A config field with its help text and constraints stored as metadata."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Paths:
    index: str = F("cache/index.json", "dataset index written by `prepare`")
    features: str = F("cache/features.zarr", "DINOv2 feature store written by `extract`")
    latents: str = F("cache/latents.zarr", "FAE latent store written by `encode`")
    fae_run: str = F("runs/fae", "train-fae run directory (checkpoints, logs)")
    decoder_run: str = F("runs/decoder", "train-decoder run directory")
    sit_run: str = F("runs/sit", "train-sit run directory")
    samples: str = F("samples", "where `sample` writes grids and .npz files")
    metrics: str = F("metrics", "where stages write metric JSON files for DVC")


@dataclass
class Data:
    root: str = F("data/imagenet/train", "image folder root/<class>/<image>")
    demo: bool = F(False, "prepare writes the procedural offline demo set into `root` first")
    demo_classes: int = F(10, "demo: number of classes", min=2, max=1000)
    demo_per_class: int = F(200, "demo: images per class", min=1)
    demo_size: int = F(64, "demo: image side in pixels", min=16)
    seed: int = F(0, "seed for the demo set and the train/holdout split", min=0)
    image_size: int = F(256, "ADM centre-crop side: the pixels the decoder reconstructs", min=8)
    views: list = F(["orig", "flip"], "views cached per sample (orig, flip)", choices=["orig", "flip"])
    holdout_fraction: float = F(0.01, "fraction of samples in the held-out split", min=0.0, max=0.5)
    on_error: str = F("skip", "unreadable images: skip (recorded) or fail", choices=["skip", "fail"])
    check: str = F("auto", "prepare's image check: header (cheap), full (decode every image), "
                   "auto (full for the demo set, header otherwise)", choices=["auto", "header", "full"])
    decode_workers: int = F(4, "background threads decoding and preprocessing images", min=0)


@dataclass
class Encoder:
    name: str = F("vit_giant_patch14_dinov2", "timm DINOv2 model name")
    weights: str = F("hub", "'hub' (timm pretrained), 'random' (explicit, for tests/demo) or a local file")
    input_size: int = F(224, "encoder input side in pixels (multiple of 14)", min=14)
    precision: str = F("bf16", "encoder compute precision", choices=["fp32", "bf16"])
    batch_size: int = F(256, "images per encoder forward", min=1)
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")


@dataclass
class Extract:
    shards: int = F(64, "number of work units (contiguous sample ranges, one dask task each)", min=1)
    shard_samples: int = F(1024, "samples per zarr storage shard (written whole by one writer)", min=1)
    chunk_samples: int = F(16, "samples per zarr inner chunk (the read granularity)", min=1)
    workers: int = F(0, "dask LocalCluster workers; 0 runs in-process", min=0)
    scheduler: str = F("", "address of an existing dask scheduler (overrides workers)")
    threads: int = F(0, "torch threads per worker; 0 = cores / workers", min=0)


@dataclass
class Fae:
    model: str = F("fae_dinov2_g", "registry name of the FAE (encoder + feature decoder + pixel decoder)")
    beta: float = F(1e-4, "KL weight in L2(x_hat, x) + beta * KL", min=0.0)
    steps: int = F(1_000_000, "optimizer steps", min=1)
    batch_size: int = F(1024, "global batch size", min=1)
    lr: float = F(1e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = F(0.0, "AdamW weight decay", min=0.0)
    warmup: int = F(1000, "linear warm-up steps before the cosine decay", min=0)
    ema_decay: float = F(0.0, "EMA decay; 0 disables EMA", min=0.0, max=1.0)
    grad_clip: float = F(1.0, "max gradient norm; 0 disables clipping", min=0.0)
    checkpoint_every: int = F(10_000, "steps between checkpoints", min=1)
    keep_last: int = F(2, "checkpoints kept (the newest)", min=1)
    eval_every: int = F(10_000, "steps between held-out evaluations", min=1)
    precision: str = F("bf16", "mixed precision (fp32 = none)", choices=["fp32", "bf16", "fp16"])
    seed: int = F(0, "training seed", min=0)


@dataclass
class Decoder:
    stage: int = F(1, "1: noisy real features x + N(0, sigma^2); 2: fine-tune on x_hat", choices=[1, 2])
    noise_sigma: float = F(0.4, "stage-1 noise std relative to the per-token feature RMS", min=0.0)
    rec_loss: str = F("l1", "pixel reconstruction loss", choices=["l1", "l2"])
    lpips_weight: float = F(1.0, "LPIPS weight", min=0.0)
    lpips_backbone: str = F("vgg", "LPIPS backbone; random only for tests/demo", choices=["vgg", "alex", "random"])
    gan_weight: float = F(0.75, "GAN weight (scaled by the VQGAN adaptive weight)", min=0.0)
    gan_loss: str = F("hinge", "GAN loss", choices=["hinge", "nonsat"])
    gan_start: int = F(500_000, "step at which the GAN term switches on", min=0)
    discriminator: str = F("patchgan", "registry name of the discriminator")
    disc_lr: float = F(1e-4, "discriminator learning rate", min=0.0)
    steps: int = F(1_000_000, "optimizer steps", min=1)
    batch_size: int = F(512, "global batch size", min=1)
    lr: float = F(1e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = F(0.0, "AdamW weight decay", min=0.0)
    warmup: int = F(1000, "linear warm-up steps before the cosine decay", min=0)
    ema_decay: float = F(0.0, "EMA decay; 0 disables EMA", min=0.0, max=1.0)
    grad_clip: float = F(1.0, "max gradient norm; 0 disables clipping", min=0.0)
    checkpoint_every: int = F(10_000, "steps between checkpoints", min=1)
    keep_last: int = F(2, "checkpoints kept (the newest)", min=1)
    eval_every: int = F(10_000, "steps between held-out evaluations", min=1)
    eval_images: int = F(64, "held-out images for PSNR/LPIPS and the grid", min=1)
    precision: str = F("bf16", "mixed precision (fp32 = none)", choices=["fp32", "bf16", "fp16"])
    seed: int = F(0, "training seed", min=0)


@dataclass
class Encode:
    shards: int = F(64, "number of work units", min=1)
    workers: int = F(0, "dask LocalCluster workers; 0 runs in-process", min=0)
    scheduler: str = F("", "address of an existing dask scheduler")
    threads: int = F(0, "torch threads per worker; 0 = cores / workers", min=0)
    batch_size: int = F(256, "samples per FAE encoder forward", min=1)
    store_std: bool = F(False, "also store posterior standard deviations")
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")


@dataclass
class Sit:
    model: str = F("sit_xl", "registry name of the SiT backbone")
    patch_size: int = F(1, "patch size on the latent grid", min=1)
    steps: int = F(2_000_000, "optimizer steps", min=1)
    batch_size: int = F(512, "global batch size (all processes, after accumulation)", min=1)
    grad_accum: int = F(1, "gradient accumulation steps", min=1)
    lr: float = F(1e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = F(0.0, "AdamW weight decay", min=0.0)
    warmup: int = F(0, "linear warm-up steps, then constant", min=0)
    ema_decay: float = F(0.9999, "EMA decay; 0 disables EMA", min=0.0, max=1.0)
    grad_clip: float = F(1.0, "max gradient norm; 0 disables clipping", min=0.0)
    label_dropout: float = F(0.1, "probability of replacing the label by the null class", min=0.0, max=1.0)
    time_dist: str = F("uniform", "training time distribution", choices=["uniform", "logit_normal"])
    time_mean: float = F(0.0, "logit-normal mean")
    time_std: float = F(1.0, "logit-normal std", min=0.0)
    shift_mode: str = F("scalar", "timestep shift form", choices=["none", "scalar", "dim"])
    shift: float = F(0.4, "scalar timestep shift (shift_mode=scalar)", min=0.0)
    shift_base_dim: int = F(4096, "base dimension n in a = sqrt(m / n) (shift_mode=dim)", min=1)
    checkpoint_every: int = F(50_000, "steps between checkpoints", min=1)
    keep_last: int = F(3, "checkpoints kept (the newest)", min=1)
    memory_budget_gb: float = F(64.0, "hold the whole latent store in RAM when it fits this budget", min=0.0)
    shuffle_buffer: int = F(8, "storage shards mixed in the streaming shuffle buffer", min=1)
    precision: str = F("bf16", "mixed precision (fp32 = none)", choices=["fp32", "bf16"])
    seed: int = F(0, "training seed", min=0)


@dataclass
class Sample:
    method: str = F("euler", "sampler", choices=["euler", "heun", "dopri5", "sde"])
    steps: int = F(250, "sampler steps", min=1)
    guidance: list = F([[0.9, 1.0, 0.9], [0.7, 0.9, 1.7], [0.0, 0.7, 2.5]],
                       "CFG segments [[t_start, t_end, scale], ...]; scale 1 = no guidance")
    classes: list = F([], "classes to sample; empty = all classes of the latent store")
    num_samples: int = F(50_000, "images to sample in total (balanced over classes)", min=1)
    grid_per_class: int = F(8, "images per class row in the PNG grid", min=1)
    batch_size: int = F(125, "samples per batch", min=1)
    use_ema: bool = F(True, "sample with the EMA weights")
    seed: int = F(0, "sampling seed", min=0)
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")


@dataclass
class Evaluate:
    inception_weights: str = F("", "local FID Inception weights file; empty = FID/IS reported unavailable")
    knn_k: int = F(3, "k of the k-NN precision/recall estimate", min=1)
    max_reference: int = F(50_000, "reference images/features used at most", min=2)
    batch_size: int = F(64, "images per forward", min=1)
    recon_images: int = F(256, "held-out images for the FAE reconstruction metrics", min=2)


@dataclass
class Probe:
    holdout_fraction: float = F(0.2, "held-out fraction for the linear probe", min=0.01, max=0.9)
    max_samples: int = F(20_000, "samples used at most", min=10)
    iterations: int = F(200, "optimizer iterations of the logistic regression", min=1)
    seed: int = F(0, "split seed", min=0)


@dataclass
class Config:
    paths: Paths = field(default_factory=Paths)
    data: Data = field(default_factory=Data)
    encoder: Encoder = field(default_factory=Encoder)
    extract: Extract = field(default_factory=Extract)
    fae: Fae = field(default_factory=Fae)
    decoder: Decoder = field(default_factory=Decoder)
    encode: Encode = field(default_factory=Encode)
    sit: Sit = field(default_factory=Sit)
    sample: Sample = field(default_factory=Sample)
    evaluate: Evaluate = field(default_factory=Evaluate)
    probe: Probe = field(default_factory=Probe)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in section_names()}

    def section_dict(self, *names: str) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in names}


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


def section_fields(section: str) -> list[dataclasses.Field]:
    cls = typing.get_type_hints(Config)[section]
    return list(dataclasses.fields(cls))


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list"}[tp]


def coerce(key: str, value: Any, f: dataclasses.Field, where: str = "") -> Any:
    """Convert ``value`` to the type of field ``f`` and check its constraints."""
    hints = typing.get_type_hints(_owner(key))
    tp = hints[f.name]
    meta = f.metadata
    loc = f" ({where})" if where else ""

    def bad(what: str):
        return UserError(f"config error{loc}: {key} = {value!r} is invalid: expected {what}")

    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tp is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise bad(_type_name(int)) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(_type_name(int))
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad(_type_name(float)) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(_type_name(float))
        value = float(value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad(_type_name(str))
    elif tp is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                raise bad("a list like [a, b] or a,b") from None
        if not isinstance(value, list):
            raise bad(_type_name(list))
    choices = meta.get("choices")
    if choices is not None and "fp32" in choices and value in ("no", False):
        value = "fp32"  # accelerate's spelling; YAML 1.1 also reads a bare `no` as false
    if choices is not None:
        items = value if tp is list else [value]
        for item in items:
            if item not in choices:
                raise bad("one of " + ", ".join(map(str, choices)))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise bad(f"a value >= {lo}")
    if hi is not None and value > hi:
        raise bad(f"a value <= {hi}")
    return value


def _owner(key: str):
    section = key.split(".")[0]
    return typing.get_type_hints(Config)[section]


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    sections = section_names()
    if len(parts) != 2 or parts[0] not in sections:
        raise UserError(f"config error ({where}): unknown key '{key}'; sections are: {', '.join(sections)}")
    section, name = parts
    fields = {f.name: f for f in section_fields(section)}
    if name not in fields:
        raise UserError(f"config error ({where}): unknown key '{key}'; valid keys in '{section}': {', '.join(fields)}")
    setattr(getattr(cfg, section), name, coerce(key, value, fields[name], where))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (``params.yaml`` when present and none is given), then overrides."""
    cfg = Config()
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config error: file '{p}' not found; pass --config with an existing YAML file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise UserError(f"config error: '{p}' is not valid YAML{at}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config error: '{p}' must be a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if section not in section_names():
                raise UserError(f"config error ({p}): unknown section '{section}'; valid: {', '.join(section_names())}")
            if not isinstance(values, dict):
                raise UserError(f"config error ({p}): section '{section}' must be a mapping of keys")
            for name, value in values.items():
                _apply(cfg, f"{section}.{name}", value, str(p))
        cfg.source = str(p)
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value, "command line")
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: Config) -> None:
    """Constraints between keys, reported like single-key errors."""
    if cfg.encoder.input_size % 14:
        raise UserError(f"config error: encoder.input_size = {cfg.encoder.input_size} is invalid: expected a multiple of 14")
    if not cfg.data.views:
        raise UserError("config error: data.views = [] is invalid: expected at least one of orig, flip")
    if len(set(cfg.data.views)) != len(cfg.data.views):
        raise UserError(f"config error: data.views = {cfg.data.views} is invalid: views must not repeat")
    for seg in cfg.sample.guidance:
        if not (isinstance(seg, list) and len(seg) == 3 and all(isinstance(v, (int, float)) for v in seg)):
            raise UserError(f"config error: sample.guidance segment {seg!r} is invalid: expected [t_start, t_end, scale]")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
