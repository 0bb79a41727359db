"""Which frozen image encoders fae-pipe knows, and what each one needs: the one table.

An encoder is a timm ViT named by ``image_encoder.name`` (optionally ``<name>.<tag>``
for a pretrained tag, e.g. ``vit_so400m_patch16_siglip_256.v2_webli`` for SigLIP2).
Its family entry declares what a store made with it must record and what no stage
should guess:

* ``mean`` / ``std``: the normalisation the weights were trained with (ImageNet for
  DINOv2/DINOv3 LVD, 0.5/0.5 for SigLIP/SigLIP2);
* ``patch``: the patch size, so ``16 * patch`` px gives the paper's 16x16 token grid
  (224 px at patch 14, 256 px at patch 16);
* ``prefix_tokens``: tokens before the patch grid that ``encode`` drops (cls + registers;
  DINOv2 1, DINOv2-reg4 5, DINOv3 5 (cls + 4 registers, positions by RoPE), SigLIP 0);
* ``pooled``: the image vector stored beside the patch tokens (the ``cls`` array):
  ``cls`` (the cls token) or ``attention_pool`` (SigLIP has no cls token; its MAP
  attention-pool head, the vector SigLIP's contrastive loss is trained on). An
  intermediate ``image_encoder.layer`` uses the cls token at that block when one exists,
  else the token mean (the attention-pool head was trained on the last layer only).
* ``hub_tag``: the pretrained tag ``weights=hub`` downloads when the name has none.

Names outside the families are "any timm ViT": they need a declared normalisation
(``image_encoder.mean`` / ``std``); patch size, prefix tokens and pooling are read from
the built model (cls token when it has one, its attention-pool head when it has one,
else the token mean). The built model is always checked against the entry.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from fae_pipe.errors import UserError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
POOLINGS = ("cls", "attention_pool", "token_mean")
GRID = 16  # tokens per side of the paper's grid


@dataclass(frozen=True)
class Family:
    """One encoder family: which timm names it covers and what a store of it records."""

    family: str
    patterns: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch: int
    prefix_tokens: int
    pooled: str
    hub_tag: str
    tags: tuple[str, ...] = ()  # when set, the family covers only these tags (SigLIP2 = SigLIP + v2 tag)

    @property
    def grid_input_size(self) -> int:
        """Input side giving a 16x16 token grid."""
        return GRID * self.patch

    def covers(self, arch: str, tag: str) -> bool:
        if not any(fnmatch.fnmatchcase(arch, p) for p in self.patterns):
            return False
        return not self.tags or tag in self.tags


FAMILIES: tuple[Family, ...] = (
    Family("dinov2_reg", ("vit_*_patch14_reg4_dinov2",), *IMAGENET, patch=14, prefix_tokens=5, pooled="cls",
           hub_tag="lvd142m"),
    Family("dinov2", ("vit_*_patch14_dinov2",), *IMAGENET, patch=14, prefix_tokens=1, pooled="cls",
           hub_tag="lvd142m"),
    Family("dinov3", ("vit_*_patch16_dinov3", "vit_*_patch16_dinov3_qkvb"), *IMAGENET, patch=16, prefix_tokens=5,
           pooled="cls", hub_tag="lvd1689m"),
    Family("siglip2", ("vit_*_patch16_siglip_*",), *HALF, patch=16, prefix_tokens=0, pooled="attention_pool",
           hub_tag="v2_webli", tags=("v2_webli",)),
    Family("siglip", ("vit_*_patch16_siglip_*",), *HALF, patch=16, prefix_tokens=0, pooled="attention_pool",
           hub_tag="webli"),
)
GENERIC = "timm_vit"  # the family name recorded for any other timm ViT


@dataclass(frozen=True)
class EncoderChoice:
    """A resolved ``image_encoder.name``: timm architecture, pretrained tag and family (None = generic)."""

    name: str
    arch: str
    tag: str
    family: Family | None

    @property
    def family_name(self) -> str:
        return self.family.family if self.family else GENERIC

    @property
    def is_dinov2(self) -> bool:
        return self.family_name in ("dinov2", "dinov2_reg")


def split_name(name: str) -> tuple[str, str]:
    """``"arch.tag"`` -> (arch, tag); no tag -> (arch, "")."""
    arch, _, tag = name.partition(".")
    return arch, tag


def resolve(name: str) -> EncoderChoice:
    """The family of ``name``; a name timm does not know is a one-line error."""
    import timm

    arch, tag = split_name(name)
    if not arch or arch not in timm.list_models():
        known = ", ".join(f"{f.family} ({'|'.join(f.patterns)})" for f in FAMILIES)
        raise UserError(f"image_encoder.name = {name!r} is invalid: not a timm model; families: {known}, or any "
                        "timm ViT name with image_encoder.mean/std declared")
    family = next((f for f in FAMILIES if f.covers(arch, tag)), None)
    return EncoderChoice(name, arch, tag or (family.hub_tag if family else ""), family)


def normalisation(choice: EncoderChoice, mean: list, std: list) -> tuple[tuple, tuple]:
    """(mean, std): the configured ones when given, else the family's; generic names must declare them."""
    for key, value in (("mean", mean), ("std", std)):
        if value and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
            raise UserError(f"image_encoder.{key} = {value!r} is invalid: expected 3 numbers (RGB) or [] for the "
                            "family's own")
    if bool(mean) != bool(std):
        raise UserError("image_encoder.mean and image_encoder.std are set together (3 numbers each) or both []")
    if mean:
        if any(float(s) <= 0 for s in std):
            raise UserError(f"image_encoder.std = {std!r} is invalid: expected positive numbers")
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if choice.family is None:
        raise UserError(f"image_encoder.name = {choice.name!r} is not in a registered family "
                        f"({', '.join(f.family for f in FAMILIES)}): declare its preprocessing with "
                        "image_encoder.mean and image_encoder.std (3 numbers each)")
    return choice.family.mean, choice.family.std


def parse_model_args(items: list) -> dict:
    """``image_encoder.model_args`` items ``key=value`` (value read as YAML) -> timm create_model kwargs."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"image_encoder.model_args item {item!r} is invalid: expected key=value "
                            "(e.g. embed_dim=384)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def patch_size(name: str, model_args=()) -> int:
    """Patch size of encoder ``name`` without building its weights (a family's, else timm's on the meta device)."""
    choice = resolve(name)
    if choice.family is not None:
        return choice.family.patch
    import timm
    import torch

    kwargs = model_args if isinstance(model_args, dict) else parse_model_args(list(model_args))
    with torch.device("meta"):
        return int(timm.create_model(choice.arch, pretrained=False, **kwargs).patch_embed.patch_size[0])


SPEC_KEYS = ("name", "weights", "input_size", "device", "precision", "layer", "layer_norm", "model_args", "mean",
             "std")


def encoder_spec(section) -> dict:
    """The build settings of an ``image_encoder``-shaped config section as a plain (picklable, hashable) dict."""
    return {k: getattr(section, k) for k in SPEC_KEYS}
