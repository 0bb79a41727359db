"""The config sections: one dataclass per pipeline section, with every field's default, help and range.

Defaults reproduce the paper (ImageNet 256, App. D of arXiv 2512.07829). This module is
the schema only; reading files, ``--set`` overrides, coercion and the cross-field
checks live in ``fae_pipe.config`` (which re-exports these names).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

def F(default, help: str, *, choices=None, min=None, max=None):  # noqa: A002 - mirrors click
    """A config field with its help text and constraints stored as metadata."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Paths:
    index: str = F("cache/index.npz", "dataset index written by `prepare` (.npz; a .json path gets the old JSON format)")
    features: str = F("cache/features.zarr", "DINOv2 feature store written by `extract`")
    latents: str = F("cache/latents.zarr", "FAE latent store written by `encode`")
    text: str = F("cache/text.zarr", "caption embedding store written by `embed-text` (text-to-image)")
    fae_run: str = F("runs/fae", "train-fae run directory (checkpoints, logs)")
    decoder_run: str = F("runs/decoder", "train-decoder run directory")
    sit_run: str = F("runs/sit", "train-sit run directory")
    flow_run: str = F("runs/flow", "train-flow run directory (the normalizing-flow generator)")
    t2i_run: str = F("runs/t2i", "train-t2i run directory (the text-conditioned MMDiT)")
    samples: str = F("samples", "where `sample` writes grids and .npz files")
    metrics: str = F("metrics", "where stages write metric JSON files for DVC")


@dataclass
class Data:
    root: str = F("data/imagenet/train", "the images: a class folder root/<class>/<image>, a captions folder or tar "
                   "shards (see data.source)")
    source: str = F("folder", "what prepare indexes: folder (root/<class>/<image>), captions_folder (images under root "
                    "with x.txt captions beside x.jpg, one per line), manifest (data.manifest), webdataset (tar "
                    "shards: root is their directory or a pattern like shards/{00000..00099}.tar)",
                    choices=["folder", "captions_folder", "manifest", "webdataset"])
    manifest: str = F("", "source=manifest: a .jsonl, .csv or .parquet file of path, caption or captions, optional "
                      "heldout (paths relative to its directory); '' with caption_demo = root/manifest.jsonl")
    caption_demo: bool = F(False, "prepare writes the procedural caption demo set into `root` and indexes its "
                           "manifest (source=manifest; its heldout field is the split)")
    caption_demo_images: int = F(2000, "caption demo: number of images (side data.demo_size, seed data.seed)", min=1)
    demo: bool = F(False, "prepare writes the procedural offline demo set into `root` first")
    demo_classes: int = F(10, "demo: number of classes", min=2, max=1000)
    demo_per_class: int = F(200, "demo: images per class", min=1)
    demo_size: int = F(64, "demo: image side in pixels", min=16)
    seed: int = F(0, "seed for the demo set and the train/holdout split", min=0)
    image_size: int = F(256, "ADM centre-crop side: the pixels the decoder reconstructs", min=8)
    views: list = F(["orig", "flip"], "views cached per sample (orig, flip)", choices=["orig", "flip"])
    holdout_fraction: float = F(0.01, "fraction of samples in the held-out split", min=0.0, max=0.5)
    on_error: str = F("skip", "unreadable images: skip (recorded) or fail", choices=["skip", "fail"])
    check: str = F("auto", "prepare's image check: stat (exists and non-empty: the cheapest, for tens of millions), "
                   "header (cheap), full (decode every image), auto (full for the demo sets, header otherwise)",
                   choices=["auto", "stat", "header", "full"])
    decode_workers: int = F(4, "background threads decoding and preprocessing images", min=0)


@dataclass
class ImageEncoder:
    name: str = F("vit_giant_patch14_dinov2", "timm ViT name, optionally <name>.<pretrained tag>: DINOv2 "
                  "(vit_*_patch14[_reg4]_dinov2), DINOv3 (vit_*_patch16_dinov3), SigLIP/SigLIP2 "
                  "(vit_*_patch16_siglip_*[.v2_webli]) or any timm ViT with mean/std (docs/encoders.md)")
    weights: str = F("hub", "'hub' (timm pretrained), 'random' (explicit, for tests/demo) or a local file")
    input_size: int = F(224, "encoder input side in pixels (multiple of the patch: 224 at patch 14 and 256 at "
                        "patch 16 give 16x16 tokens)", min=14)
    precision: str = F("bf16", "encoder compute precision", choices=["fp32", "bf16"])
    batch_size: int = F(256, "images per encoder forward", min=1)
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")
    layer: int = F(0, "features of: 0 = the last block through the final norm; k = block k's output", min=0)
    layer_norm: bool = F(True, "an intermediate layer goes through the final norm (DINOv2's get_intermediate_layers)")
    model_args: list = F([], "timm create_model overrides as key=value items (e.g. [embed_dim=384, depth=2]): a "
                         "modified architecture of the same family; recorded in the store")
    mean: list = F([], "RGB normalisation mean; [] = the family's own (required for a timm ViT outside the families)")
    std: list = F([], "RGB normalisation std; [] = the family's own")


@dataclass
class Extract:
    shards: int = F(64, "number of work units (contiguous sample ranges, one dask task each)", min=1)
    shard_samples: int = F(1024, "samples per zarr storage shard (written whole by one writer)", min=1)
    chunk_samples: int = F(16, "samples per zarr inner chunk (the read granularity)", min=1)
    workers: int = F(0, "dask LocalCluster workers; 0 runs in-process", min=0)
    scheduler: str = F("", "address of an existing dask scheduler (overrides workers)")
    threads: int = F(0, "torch threads per worker; 0 = cores / workers", min=0)


@dataclass
class TextEncoder:
    """The frozen text encoder of ``embed-text`` (and of ``sample``'s prompts): ``fae_pipe.encoders.text``."""

    weights: str = F("", "a local transformers directory holding the model and its tokenizer (as save_pretrained "
                     "writes it: a T5 / Flan-T5 / mT5 / UMT5, CLIP or SigLIP(2) text tower), or 'random' (a tiny T5 "
                     "with a word-level tokenizer trained on the index's captions, written to text_encoder_random "
                     "beside paths.index: tests and the offline demo only)")
    max_length: int = F(128, "tokens per caption, padded or truncated (T5-style 128; CLIP towers allow 77)", min=1)
    precision: str = F("fp32", "text encoder compute precision (the store holds float16 either way)",
                       choices=["fp32", "bf16"])
    batch_size: int = F(128, "captions per text encoder forward", min=1)
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")
    random_width: int = F(64, "weights 'random': width of the tiny T5 (a multiple of its 4 heads)", min=4)
    random_layers: int = F(2, "weights 'random': layers of the tiny T5", min=1)


@dataclass
class EmbedText:
    shards: int = F(64, "number of work units (contiguous sample ranges, one dask task each)", min=1)
    shard_samples: int = F(256, "samples per zarr storage shard (written whole by one writer; all caption slots "
                           "of a sample: 5 COCO captions x 128 T5-XL tokens are 2.6 MB per sample)", min=1)
    chunk_samples: int = F(16, "samples per zarr inner chunk (the read granularity)", min=1)
    workers: int = F(0, "dask LocalCluster workers; 0 runs in-process", min=0)
    scheduler: str = F("", "address of an existing dask scheduler (overrides workers)")
    threads: int = F(0, "torch threads per worker; 0 = cores / workers", min=0)


@dataclass
class Train:
    """The loop settings every training stage shares; ``fae_pipe.training`` is their one reader.

    Each training section holds one (``fae.train``, ``decoder.train``, ``sit.train``)
    with that stage's paper defaults, so a new generator adds a section, not a
    fourth copy of these keys.
    """

    steps: int = F(1_000_000, "optimizer steps", min=1)
    batch_size: int = F(512, "global batch size (all processes, after accumulation)", min=1)
    grad_accum: int = F(1, "gradient accumulation steps", min=1)
    lr: float = F(1e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = F(0.0, "AdamW weight decay", min=0.0)
    schedule: str = F("cosine", "learning rate after the warm-up", choices=["cosine", "constant"])
    warmup: int = F(1000, "linear warm-up steps", min=0)
    ema_decay: float = F(0.0, "EMA decay; 0 disables EMA", min=0.0, max=1.0)
    grad_clip: float = F(1.0, "max gradient norm; 0 disables clipping", min=0.0)
    precision: str = F("bf16", "mixed precision (fp32 = none; fp16 on CUDA only)", choices=["fp32", "bf16", "fp16"])
    seed: int = F(0, "training seed", min=0)
    checkpoint_every: int = F(10_000, "steps between checkpoints", min=1)
    keep_last: int = F(2, "checkpoints kept (the newest)", min=1)
    eval_every: int = F(10_000, "steps between held-out evaluations", min=1)
    log_every: int = F(50, "steps between loss reductions, finiteness checks and log rows", min=1)
    log_with: str = F("tensorboard", "Accelerate tracker beside loss.csv (skipped with a note when not installed)",
                      choices=["tensorboard", "wandb", "mlflow", "aim", "none"])
    memory_budget_gb: float = F(4.0, "hold the whole store in RAM when it fits this budget, else stream shards",
                                min=0.0)
    shuffle_buffer: int = F(8, "storage shards mixed in the streaming shuffle buffer", min=1)


def T(help: str, **defaults):  # noqa: A002
    """A nested ``Train`` field whose defaults are one stage's paper settings."""
    return field(default_factory=lambda: Train(**defaults), metadata={"help": help})


@dataclass
class Fae:
    model: str = F("fae_dinov2_g", "registry name of the FAE (encoder + feature decoder + pixel decoder)")
    beta: float = F(1e-4, "KL weight in L2(x_hat, x) + beta * KL", min=0.0)
    train: Train = T("train-fae loop", steps=1_000_000, batch_size=1024)


@dataclass
class Decoder:
    phase: int = F(1, "1: noisy real features x + N(0, sigma^2); 2: fine-tune on x_hat", choices=[1, 2])
    noise_sigma: float = F(0.4, "phase-1 noise std relative to the per-token feature RMS", min=0.0)
    noise_schedule: str = F("fixed", "phase-1 noise level: fixed = noise_sigma (FAE); uniform = per sample "
                            "U(0, noise_sigma) (RAE, with noise_sigma 0.8)", choices=["fixed", "uniform"])
    rec_loss: str = F("l1", "pixel reconstruction loss", choices=["l1", "l2"])
    lpips_weight: float = F(1.0, "LPIPS weight", min=0.0)
    lpips_backbone: str = F("vgg", "LPIPS backbone; random only for tests/demo", choices=["vgg", "alex", "random"])
    gan_weight: float = F(0.75, "GAN weight (scaled by the VQGAN adaptive weight)", min=0.0)
    gan_loss: str = F("hinge", "GAN loss", choices=["hinge", "nonsat"])
    gan_start: int = F(500_000, "step at which the GAN term switches on", min=0)
    discriminator: str = F("patchgan", "registry name of the discriminator")
    disc_lr: float = F(1e-4, "discriminator learning rate", min=0.0)
    eval_images: int = F(64, "held-out images for PSNR/LPIPS and the grid", min=1)
    train: Train = T("train-decoder loop", steps=1_000_000, batch_size=512)


@dataclass
class Encode:
    shards: int = F(64, "number of work units", min=1)
    workers: int = F(0, "dask LocalCluster workers; 0 runs in-process", min=0)
    scheduler: str = F("", "address of an existing dask scheduler")
    threads: int = F(0, "torch threads per worker; 0 = cores / workers", min=0)
    batch_size: int = F(256, "samples per FAE encoder forward", min=1)
    store_std: bool = F(False, "also store posterior standard deviations (a VAE store always holds them)")
    device: str = F("auto", "auto (cuda when present), cpu, cuda or cuda:N")
    source: str = F("fae", "what writes paths.latents: fae (the FAE encoder over paths.features) or sdvae (the "
                    "`vae` section's AutoencoderKL straight from the images of paths.index)",
                    choices=["fae", "sdvae"])


@dataclass
class Vae:
    """The pretrained VAE of ``encode.source = sdvae`` (diffusers ``AutoencoderKL``, e.g. stabilityai/sd-vae-ft-ema)."""

    weights: str = F("", "a local diffusers AutoencoderKL directory (config.json + weights, as save_pretrained "
                     "writes it) or 'random' (the SD-VAE architecture, fixed seed: tests and demos only)")
    precision: str = F("fp32", "VAE compute precision (encode and decode)", choices=["fp32", "bf16"])
    batch_size: int = F(32, "images per VAE encoder forward (all their views in one)", min=1)


@dataclass
class Sit:
    model: str = F("sit_xl", "registry name of the SiT backbone")
    patch_size: int = F(1, "patch size on the latent grid", min=1)
    label_dropout: float = F(0.1, "probability of replacing the label by the null class", min=0.0, max=1.0)
    time_dist: str = F("uniform", "training time distribution", choices=["uniform", "logit_normal"])
    time_mean: float = F(0.0, "logit-normal mean")
    time_std: float = F(1.0, "logit-normal std", min=0.0)
    input: str = F("latents", "what the generator diffuses: latents (paths.latents, FAE) or features "
                   "(paths.features patch tokens as channel x height x width: RAE)", choices=["latents", "features"])
    feature_norm: str = F("channel", "features input: exact store statistics per channel, or per position and "
                          "channel (RAE)", choices=["channel", "position"])
    repa_weight: float = F(0.0, "REPA loss weight lambda (0.5 in REPA); 0 = no REPA. Targets: the cached "
                           "paths.features tokens of each batch's samples and views", min=0.0)
    repa_depth: int = F(0, "block whose output REPA aligns; 0 = the model's default (8 for depth 28)", min=0)
    repa_projector: str = F("repa_projector", "registry name of the REPA projector MLP")
    posterior: str = F("mean", "latents served to the generator: mean (the stored posterior means) or sample (a "
                       "fresh mean + std * noise per sample and epoch, REPA's way; needs stored stds: a VAE store or "
                       "encode.store_std; the noise is a function of train.seed, epoch, sample id and view)",
                       choices=["mean", "sample"])
    shift_mode: str = F("auto", "timestep shift form; auto = dim for features input (RAE's rule), scalar for "
                        "latents", choices=["auto", "none", "scalar", "dim"])
    shift: float = F(0.4, "scalar timestep shift (shift_mode=scalar)", min=0.0)
    shift_base_dim: int = F(4096, "base dimension n in a = sqrt(m / n) (shift_mode=dim)", min=1)
    eval_samples: int = F(10_000, "images drawn every train.eval_every steps for the quality curve (FD-DINOv2, "
                          "precision/recall into eval.csv; fixed noise and labels); 0 = no curve", min=0)
    eval_sampler_steps: int = F(50, "sampler steps of those draws (sample.method, sample.guidance)", min=1)
    train: Train = T("train-sit loop", steps=2_000_000, batch_size=512, schedule="constant", warmup=0,
                     ema_decay=0.9999, checkpoint_every=50_000, keep_last=3, memory_budget_gb=64.0,
                     eval_every=50_000)


@dataclass
class Flow:
    """The normalizing-flow generator (TARFlow/STARFlow, ``fae_pipe.models.tarflow`` + ``fae_pipe.flow``): docs/flow.md."""

    model: str = F("starflow_xl", "registry name of the flow (kind flow: tarflow_*, starflow_*)")
    patch_size: int = F(1, "patch size on the latent grid (1 on FAE latents, 2 on SD-VAE latents)", min=1)
    noise_sigma: float = F(0.3, "std of the Gaussian noise added to the normalised training latents (STARFlow: "
                           "0.3); sampling undoes it with the denoising step", min=0.0)
    label_dropout: float = F(0.1, "probability of replacing the label by the null class", min=0.0, max=1.0)
    denoise: str = F("tweedie", "after inversion: tweedie = x + sigma^2 grad log p(x) by autograd; none = keep the "
                     "noisy sample", choices=["tweedie", "none"])
    guidance: float = F(1.0, "sampling: guidance scale w (1 = none)", min=0.0)
    guidance_schedule: str = F("ramp", "sampling: w per token of a block: constant, or ramp 1 -> w over the "
                               "tokens (TARFlow's annealed guidance)", choices=["constant", "ramp"])
    guidance_mode: str = F("product", "sampling: product = the Gaussian p_c^w p_u^(1-w) per token (STARFlow); "
                           "extrapolate = mu and log-scale extrapolated (TARFlow)", choices=["product", "extrapolate"])
    eval_samples: int = F(10_000, "images drawn every train.eval_every steps for the quality curve (eval.csv); "
                          "0 = no curve", min=0)
    train: Train = T("train-flow loop", steps=1_000_000, batch_size=512, warmup=1000, ema_decay=0.9999,
                     checkpoint_every=50_000, keep_last=3, memory_budget_gb=64.0, eval_every=50_000)


@dataclass
class T2i:
    """The text-to-image generator (MMDiT on paths.latents + paths.text, ``stages/train_t2i.py``); the transport
    keys mean what they mean in ``sit``."""

    model: str = F("mmdit_600m", "registry name of the text-conditioned generator (kind text_generator: mmdit_*; "
                   "its text_dim / pooled_dim come from the text store)")
    patch_size: int = F(1, "patch size on the latent grid", min=1)
    caption_dropout: float = F(0.1, "probability of replacing a caption by the stored empty caption's embedding "
                               "(classifier-free guidance)", min=0.0, max=1.0)
    time_dist: str = F("uniform", "training time distribution", choices=["uniform", "logit_normal"])
    time_mean: float = F(0.0, "logit-normal mean")
    time_std: float = F(1.0, "logit-normal std", min=0.0)
    shift_mode: str = F("auto", "timestep shift form; auto = scalar on latents", choices=["auto", "none", "scalar", "dim"])
    shift: float = F(0.4, "scalar timestep shift (shift_mode=scalar)", min=0.0)
    shift_base_dim: int = F(4096, "base dimension n in a = sqrt(m / n) (shift_mode=dim)", min=1)
    train: Train = T("train-t2i loop", steps=1_000_000, batch_size=512, schedule="constant", warmup=1000,
                     ema_decay=0.9999, checkpoint_every=50_000, keep_last=3, memory_budget_gb=64.0)


@dataclass
class Runtime:
    attention: str = F("sdpa", "attention kernel: sdpa (PyTorch, every device) or xformers (CUDA tensors only; "
                       "needs the cuda extra)", choices=["sdpa", "xformers"])
    threads: int = F(0, "torch CPU threads per process; 0 = auto: OMP_NUM_THREADS if set, else usable cores / "
                     "processes on this machine (fae_pipe.threads)", min=0)
    compile: bool = F(False, "torch.compile the trained generators and decoders (inductor); falls back to eager "
                      "with a note where the backend cannot run")
    stop_signals: list = F(["SIGTERM"], "signals that stop a train-*/extract/encode/embed-text run cleanly "
                           "(checkpoint or finished shard, exit code 75; add SIGUSR1 for SLURM's --signal); [] = none",
                           choices=["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"])


@dataclass
class Storage:
    """Stores on object storage (any ``paths.features`` / ``paths.latents`` given as a URL: ``fae_pipe.cache.location``)."""

    options: dict = F({}, "fsspec storage options per protocol, e.g. {s3: {endpoint_url: 'http://minio:9000'}}; "
                      "the provider's environment variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) apply too")
    lease_seconds: float = F(60.0, "object-store writer lock: lease renewed every third of it; a dead holder's "
                             "lock is taken over once it expires", min=3.0)


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
    prompts: str = F("", "text-to-image exports: a prompts file (.txt one per line, or .jsonl {prompt, ...}); "
                     "sample.num_samples are spread over its prompts, grid_per_class images per prompt row")


@dataclass
class Evaluate:
    inception_weights: str = F("", "local FID Inception weights file; empty = FID/IS reported unavailable")
    knn_k: int = F(3, "k of the k-NN precision/recall estimate", min=1)
    max_reference: int = F(50_000, "reference images/features used at most", min=2)
    batch_size: int = F(64, "images per forward", min=1)
    recon_images: int = F(256, "held-out images for the FAE reconstruction metrics", min=2)
    clip_weights: str = F("", "text-to-image: a local transformers CLIP directory for the CLIP score; empty = "
                          "CLIP score reported unavailable (never computed with random weights)")
    reference_encoder: ImageEncoder = field(
        default_factory=lambda: ImageEncoder(name="", batch_size=64),
        metadata={"help": "the DINOv2 behind FD-DINOv2 when the feature store's encoder is not DINOv2 (e.g. "
                          "SigLIP2): its reference features are computed from the reference images; name '' = "
                          "the store's own encoder, which must then be a DINOv2 at layer 0"})


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
    image_encoder: ImageEncoder = field(default_factory=ImageEncoder)
    extract: Extract = field(default_factory=Extract)
    fae: Fae = field(default_factory=Fae)
    decoder: Decoder = field(default_factory=Decoder)
    encode: Encode = field(default_factory=Encode)
    vae: Vae = field(default_factory=Vae)
    text_encoder: TextEncoder = field(default_factory=TextEncoder)
    embed_text: EmbedText = field(default_factory=EmbedText)
    sit: Sit = field(default_factory=Sit)
    sample: Sample = field(default_factory=Sample)
    evaluate: Evaluate = field(default_factory=Evaluate)
    probe: Probe = field(default_factory=Probe)
    runtime: Runtime = field(default_factory=Runtime)
    storage: Storage = field(default_factory=Storage)
    flow: Flow = field(default_factory=Flow)
    t2i: T2i = field(default_factory=T2i)
    generator: str = field(default="sit", metadata={
        "top": True, "help": "the generator train/sample/evaluate run on the latents: sit (diffusion, sit.*) or "
                             "flow (normalizing flow, flow.*)", "choices": ["sit", "flow"], "min": None, "max": None})
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict:
        return {**{s: dataclasses.asdict(getattr(self, s)) for s in section_names()},
                **{k: getattr(self, k) for k in top_keys()}}


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if not (f.metadata.get("internal") or f.metadata.get("top"))]


def top_keys() -> list[str]:
    """Keys that are a value at the top level of the config, not a section (``generator``)."""
    return [f.name for f in dataclasses.fields(Config) if f.metadata.get("top")]
