"""Named model configs, timm style: ``create_model("sit_xl", in_channels=32)``.

Configs name a builder and its keyword arguments; stages and configs refer to
models by name and override single arguments, so the paper's shapes are written
down exactly once, here.

Naming scheme: an FAE is three separately trained modules, registered as
``<family>.encoder``, ``<family>.feature_decoder`` and ``<family>.pixel_decoder``
(families: fae_dinov2_g (paper), fae_dinov2_b, fae_dinov2_s, fae_siglip2_so400m (1152),
fae_dinov3_l (1024) and fae_tiny (the offline demo and the tests, 8x8 tokens of width 384));
``fae_parts(family)`` gives the three names. A family's ``in_dim`` is its encoder's token
width: the FAE encoder reads it, the feature decoder rebuilds it (``out_dim = in_dim``), and
train-fae / train-decoder refuse a store of another width with the family to pick. Generators are ``sit_*``
and ``lightningdit_*`` (``_dh``: with RAE's wide DDT head), discriminators ``patchgan*``,
REPA projectors ``repa_projector*`` (built with ``width=`` and ``target_dim=``). Text-to-image
generators are ``mmdit_*`` (``_cross``: the cross-attention layout). Each entry
also has a ``kind`` for ``list_models(kind)``: fae_encoder, feature_decoder,
pixel_decoder, sit, discriminator, projector, text_generator.

Parameter counts of the paper configs (``count_parameters``, App. D targets):
fae_dinov2_g.encoder 37,868,608 (38.17M, -0.79%), .feature_decoder 170,428,416
(170.43M, -0.00%), .pixel_decoder 304,934,656 (305.36M, -0.14%); sit_xl with
patch 1 on 16x16x32 674,853,152 (675M, -0.02%); lightningdit_xl (patch 1, 16x16x32)
674,965,856 (675M, -0.01%: SwiGLU biases, RMSNorm gains and QK-norm add 112,704);
lightningdit_xl_dh (+ 2 blocks at width 2048) 834,226,996 on 32 channels and
838,090,260 with ``in_channels=768`` (RAE's DiT-DH-XL on DINOv2-B features: 839M,
-0.11%). Tiny: sit_tiny 1,273,352, lightningdit_tiny 1,274,928, lightningdit_tiny_dh
3,777,880. See each model file for the design choices behind them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, NamedTuple

from torch import nn

from fae_pipe.errors import UserError

# Builders are named "module:attr" and imported on first use, so a stage imports only
# the model files it builds (train-sit never imports the pixel decoder).
FAEEncoder = "fae_pipe.models.fae_encoder:FAEEncoder"
FeatureDecoder = "fae_pipe.models.feature_decoder:FeatureDecoder"
PixelDecoder = "fae_pipe.models.pixel_decoder:PixelDecoder"
SiT = "fae_pipe.models.sit:SiT"
PatchDiscriminator = "fae_pipe.models.discriminator:PatchDiscriminator"
RepaProjector = "fae_pipe.models.repa:RepaProjector"
MMDiT = "fae_pipe.models.mmdit:MMDiT"
TARFlow = "fae_pipe.models.tarflow:TARFlow"


class ModelSpec(NamedTuple):
    """A registered config: the builder ("module:attr" or a callable), its kwargs, and its kind."""

    builder: str | Callable[..., nn.Module]
    kwargs: dict
    kind: str

    def resolve(self) -> Callable[..., nn.Module]:
        if callable(self.builder):
            return self.builder
        module, attr = self.builder.split(":")
        return getattr(importlib.import_module(module), attr)


KINDS = ("fae_encoder", "feature_decoder", "pixel_decoder", "sit", "discriminator", "projector", "text_generator",
         "flow")
FAE_PARTS = ("encoder", "feature_decoder", "pixel_decoder")
REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, builder: str | Callable[..., nn.Module], kind: str, **kwargs) -> None:
    """Add a named config; names are unique and kinds must be one of KINDS."""
    if name in REGISTRY:
        raise ValueError(f"model '{name}' is registered twice")
    if kind not in KINDS:
        raise ValueError(f"model '{name}': kind '{kind}' is not one of {KINDS}")
    REGISTRY[name] = ModelSpec(builder, kwargs, kind)


def _register_fae(family: str, in_dim: int, latent: int, enc_heads: int, enc_head_dim: int,
                  fd: dict, pd: dict) -> None:
    """Register the three parts of one FAE family with consistent in_dim / latent widths."""
    register(f"{family}.encoder", FAEEncoder, "fae_encoder",
             in_dim=in_dim, latent_channels=latent, heads=enc_heads, head_dim=enc_head_dim)
    register(f"{family}.feature_decoder", FeatureDecoder, "feature_decoder",
             latent_channels=latent, out_dim=in_dim, **fd)
    register(f"{family}.pixel_decoder", PixelDecoder, "pixel_decoder", in_dim=in_dim, **pd)


# Paper pixel decoder (ViT-L-like): 16x16 tokens -> 256 px.
_VIT_L_PIXEL = dict(grid_size=16, patch_size=16, width=1024, depth=24, heads=16, mlp_ratio=4.0)

# Paper (App. D), DINOv2-g/14 at 224 px: 16x16x1536 tokens -> 16x16x32 latent.
_register_fae("fae_dinov2_g", 1536, 32, 24, 256,
              fd=dict(width=1536, depth=6, heads=24, mlp_ratio=4.0, learned_pos_grid=16), pd=_VIT_L_PIXEL)
# Same recipe for smaller DINOv2s: attention 4x the token width, decoder width = token width.
_register_fae("fae_dinov2_b", 768, 32, 12, 256,
              fd=dict(width=768, depth=6, heads=12, mlp_ratio=4.0, learned_pos_grid=16), pd=_VIT_L_PIXEL)
_register_fae("fae_dinov2_s", 384, 32, 6, 256,
              fd=dict(width=384, depth=6, heads=6, mlp_ratio=4.0, learned_pos_grid=16), pd=_VIT_L_PIXEL)
# The same recipe for the other encoder families (docs/encoders.md), each at its token width on the 16x16 grid
# of 256 px (patch 16): SigLIP2-So400m/16 (1152; heads of 64 like the DINOv2 families) and DINOv3-L/16 (1024).
# 768-wide encoders (SigLIP2-B/16, DINOv3-B/16) use fae_dinov2_b, 384-wide ones fae_dinov2_s: same shapes.
_register_fae("fae_siglip2_so400m", 1152, 32, 18, 256,
              fd=dict(width=1152, depth=6, heads=18, mlp_ratio=4.0, learned_pos_grid=16), pd=_VIT_L_PIXEL)
_register_fae("fae_dinov3_l", 1024, 32, 16, 256,
              fd=dict(width=1024, depth=6, heads=16, mlp_ratio=4.0, learned_pos_grid=16), pd=_VIT_L_PIXEL)
# The offline demo and the tests: DINOv2-S at 112 px -> 8x8x384 tokens -> 8x8x8 latent -> 64 px images.
_register_fae("fae_tiny", 384, 8, 4, 32,
              fd=dict(width=128, depth=2, heads=4, mlp_ratio=4.0),
              pd=dict(grid_size=8, patch_size=8, width=128, depth=2, heads=4, mlp_ratio=4.0))

# SiT sizes (DiT table); defaults are FAE-32 latents at 256 px, patch 1, ImageNet classes.
_SIT_DATA = dict(input_size=16, patch_size=1, in_channels=32, num_classes=1000, mlp_ratio=4.0)
register("sit_s", SiT, "sit", width=384, depth=12, heads=6, **_SIT_DATA)
register("sit_b", SiT, "sit", width=768, depth=12, heads=12, **_SIT_DATA)
register("sit_l", SiT, "sit", width=1024, depth=24, heads=16, **_SIT_DATA)
register("sit_xl", SiT, "sit", width=1152, depth=28, heads=16, **_SIT_DATA)
_SIT_TINY = dict(width=128, depth=4, heads=4, mlp_ratio=4.0, input_size=8, patch_size=1, in_channels=8, num_classes=10)
register("sit_tiny", SiT, "sit", **_SIT_TINY)

# LightningDiT: the SiT shapes with LightningDiT's block options; _dh adds RAE's DiT-DH wide head.
_LIGHTNING = dict(mlp="swiglu", norm="rmsnorm", qk_norm=True, pos="rope")
_DDT_HEAD = dict(head_width=2048, head_depth=2, head_heads=16)
register("lightningdit_b", SiT, "sit", width=768, depth=12, heads=12, **_SIT_DATA, **_LIGHTNING)
register("lightningdit_l", SiT, "sit", width=1024, depth=24, heads=16, **_SIT_DATA, **_LIGHTNING)
register("lightningdit_xl", SiT, "sit", width=1152, depth=28, heads=16, **_SIT_DATA, **_LIGHTNING)
register("lightningdit_xl_dh", SiT, "sit", width=1152, depth=28, heads=16, **_SIT_DATA, **_LIGHTNING, **_DDT_HEAD)
register("lightningdit_tiny", SiT, "sit", **_SIT_TINY, **_LIGHTNING)
register("lightningdit_tiny_dh", SiT, "sit", **_SIT_TINY, **_LIGHTNING, head_width=256, head_depth=2, head_heads=4)

# Text-to-image generators (MMDiT, text_dim / pooled_dim come from the text store). mmdit_600m
# is the paper's ~600M size (SD3's depth-16 shape: width 64 x depth, 16 heads): 599,560,224
# parameters on 16x16x32 latents with 2048-wide (Flan-T5-XL) text tokens; _cross: 378,171,424.
_MMDIT_DATA = dict(input_size=16, patch_size=1, in_channels=32, text_dim=2048, mlp_ratio=4.0)
register("mmdit_600m", MMDiT, "text_generator", width=1024, depth=16, heads=16, **_MMDIT_DATA)
register("mmdit_600m_cross", MMDiT, "text_generator", width=1024, depth=16, heads=16, layout="cross", **_MMDIT_DATA)
_MMDIT_TINY = dict(input_size=8, patch_size=2, in_channels=8, text_dim=64, width=128, depth=4, heads=4, mlp_ratio=4.0)
register("mmdit_tiny", MMDiT, "text_generator", **_MMDIT_TINY)
register("mmdit_tiny_cross", MMDiT, "text_generator", layout="cross", **_MMDIT_TINY)

# Normalizing flows (fae_pipe.models.tarflow): TARFlow's uniform stacks (ImageNet-64 shapes: 8 blocks x 8
# layers at width 768 / 1024) and STARFlow's deep-shallow layout (blocks of 2 2 2 2 2 24 layers, data ->
# noise order) at SiT-XL's width, all on 16x16x32 latents at patch 1. Parameter counts (tests/test_flow.py):
# tarflow_b 461,955,584, tarflow_l 817,267,200, starflow_xl 551,340,672; tarflow_tiny 1,638,464 (8x8x8).
_FLOW_DATA = dict(input_size=16, patch_size=1, in_channels=32, num_classes=1000, mlp_ratio=4.0)
register("tarflow_b", TARFlow, "flow", width=768, heads=12, block_depths=[8] * 8, **_FLOW_DATA)
register("tarflow_l", TARFlow, "flow", width=1024, heads=16, block_depths=[8] * 8, **_FLOW_DATA)
register("starflow_xl", TARFlow, "flow", width=1152, heads=16, block_depths=[2, 2, 2, 2, 2, 24], **_FLOW_DATA)
_FLOW_TINY = dict(input_size=8, patch_size=1, in_channels=8, num_classes=10, mlp_ratio=4.0, width=128, heads=4)
register("tarflow_tiny", TARFlow, "flow", block_depths=[2, 2, 2, 2], **_FLOW_TINY)
register("starflow_tiny", TARFlow, "flow", block_depths=[1, 1, 1, 4], **_FLOW_TINY)

# REPA projector (width and target_dim come from the generator and the cached encoder).
register("repa_projector", RepaProjector, "projector", hidden=2048)
register("repa_projector_tiny", RepaProjector, "projector", hidden=256)

register("patchgan", PatchDiscriminator, "discriminator", base_channels=64, n_layers=3)
register("patchgan_tiny", PatchDiscriminator, "discriminator", base_channels=16, n_layers=2)


def list_models(kind: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those of one kind (see KINDS)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"model kind: '{kind}' is not valid; valid: {', '.join(KINDS)}")
    return sorted(n for n, spec in REGISTRY.items() if kind is None or spec.kind == kind)


def require_kind(name: str, kind: str, key: str, what: str) -> None:
    """Refuse, in one line naming the config ``key``, a ``name`` that is not a registered model of ``kind``."""
    spec = REGISTRY.get(name)
    if spec is None or spec.kind != kind:
        raise UserError(f"config error: {key} = {name!r} is not a registered {what}; valid: "
                        f"{', '.join(list_models(kind))}")


def fae_parts(family: str) -> dict[str, str]:
    """Registered names of an FAE family's parts: {"encoder": ..., "feature_decoder": ..., "pixel_decoder": ...}."""
    names = {part: f"{family}.{part}" for part in FAE_PARTS}
    if not all(n in REGISTRY for n in names.values()):
        families = sorted({n.split(".")[0] for n in REGISTRY if "." in n})
        raise UserError(f"fae family: '{family}' is not registered; valid: {', '.join(families)}")
    return names


def fae_families_for(width: int) -> list[str]:
    """FAE families whose encoder reads ``width``-wide tokens (to name the right one in an error)."""
    return sorted(n.split(".")[0] for n, spec in REGISTRY.items()
                  if spec.kind == "fae_encoder" and spec.kwargs.get("in_dim") == width)


def model_kwargs(name: str, **overrides) -> dict:
    """The full kwargs ``create_model(name, **overrides)`` would pass, after validation."""
    if name not in REGISTRY:
        raise UserError(f"model: '{name}' is not a registered model; valid: {', '.join(list_models())}")
    spec = REGISTRY[name]
    params = {p: v for p, v in inspect.signature(spec.resolve()).parameters.items() if p != "self"}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise UserError(f"model '{name}': unknown option(s) {', '.join(unknown)}; valid: {', '.join(params)}")
    kwargs = {**spec.kwargs, **overrides}
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise UserError(f"model '{name}': option(s) {', '.join(missing)} must be given")
    return kwargs


def create_model(name: str, **overrides) -> nn.Module:
    """Build the named model, with keyword overrides of its registered config.

    Build on the meta device (``with torch.device("meta"):``) to inspect shapes or
    count parameters without allocating memory.
    """
    kwargs = model_kwargs(name, **overrides)
    return REGISTRY[name].resolve()(**kwargs)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as fixed sin-cos tables are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
