"""Every encoder family on tiny timm models of its architecture (``model_args``): a checkpoint the test
writes loads and gives the in-memory model's features, the prefix tokens are dropped (a 16x16 grid at
224 px for patch 14, 256 px for patch 16), the pooled vector is the family's, the layer option, and the
store attrs of an extract name the encoder, layer, preprocessing and weights fingerprint."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
import zarr
from safetensors.torch import save_file

from fae_pipe.config import load_config
from fae_pipe.encoders.registry import FAMILIES, parse_model_args, resolve
from fae_pipe.encoders.timm_vit import build_encoder
from fae_pipe.errors import UserError

TINY_ARGS = ["embed_dim=32", "depth=2", "num_heads=2"]
# (family, timm name, prefix tokens, pooled)
CASES = [
    ("dinov2", "vit_small_patch14_dinov2", 1, "cls"),
    ("dinov2_reg", "vit_small_patch14_reg4_dinov2", 5, "cls"),
    ("dinov3", "vit_small_patch16_dinov3", 5, "cls"),
    ("siglip2", "vit_so400m_patch16_siglip_256.v2_webli", 0, "attention_pool"),
]


def _perturbed_checkpoint(enc, path):
    """Write the encoder's weights + a seeded perturbation as a timm-format safetensors file; return the model."""
    import copy

    reference = copy.deepcopy(enc.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference


@pytest.mark.parametrize("family, name, prefix, pooled", CASES, ids=[c[0] for c in CASES])
def test_family_checkpoint_grid_and_pooling(family, name, prefix, pooled, tmp_path):
    fam = resolve(name).family
    assert fam.family == family and fam.prefix_tokens == prefix and fam.pooled == pooled
    size = fam.grid_input_size
    assert size == {14: 224, 16: 256}[fam.patch]
    enc = build_encoder(name, "random", size, device="cpu", precision="fp32", model_args=TINY_ARGS)
    assert (enc.family, enc.grid, enc.dim, enc.num_prefix_tokens, enc.pooled) == (family, (16, 16), 32, prefix, pooled)
    path = tmp_path / f"{family}.safetensors"
    reference = _perturbed_checkpoint(enc, path)
    loaded = build_encoder(name, str(path), size, device="cpu", precision="fp32", model_args=TINY_ARGS)
    assert loaded.weights_fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    patch, vec = loaded.encode(x)
    with torch.no_grad():
        tokens = reference.forward_features(x)
        want_vec = reference.forward_head(tokens, pre_logits=True) if pooled == "attention_pool" else tokens[:, 0]
    assert tokens.shape[1] == prefix + 256 and patch.shape == (2, 256, 32)
    assert (patch - tokens[:, prefix:]).abs().max() <= 1e-5 and (vec - want_vec).abs().max() <= 1e-5
    assert not torch.allclose(patch, enc.encode(x)[0], atol=1e-3)  # the file's weights, not the random ones


def test_normalisation_matches_timm_pretrained_configs():
    for fam in FAMILIES:
        arch = next(n for n in timm.list_models(fam.patterns[0]))
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{fam.hub_tag}" if f"{arch}.{fam.hub_tag}" in
                                             timm.list_pretrained(arch + "*") else arch)
        assert (tuple(cfg.mean), tuple(cfg.std)) == (fam.mean, fam.std), fam.family


def test_preprocessing_uses_the_family_normalisation(tmp_path):
    sig = build_encoder("vit_base_patch16_siglip_256", "random", 32, device="cpu", precision="fp32",
                        model_args=TINY_ARGS)
    assert sig.family == "siglip" and (sig.mean, sig.std) == ((0.5,) * 3, (0.5,) * 3)
    px = np.full((1, 32, 32, 3), 255, np.uint8)
    assert torch.allclose(sig.preprocess(px), torch.ones(1, 3, 32, 32))  # (1 - 0.5) / 0.5
    assert sig.pooled == "attention_pool"
    so400m = build_encoder("vit_so400m_patch16_siglip_256", "random", 32, device="cpu", precision="fp32",
                           model_args=TINY_ARGS)  # SigLIP (v1) name whose default tag timm lacks at this size
    save_file({k: v.contiguous() for k, v in so400m.model.state_dict().items()}, str(tmp_path / "s.safetensors"))
    again = build_encoder("vit_so400m_patch16_siglip_256", str(tmp_path / "s.safetensors"), 32, device="cpu",
                          precision="fp32", model_args=TINY_ARGS)
    x = sig.preprocess(px)
    assert again.family == "siglip" and torch.equal(again.encode(x)[1], so400m.encode(x)[1])
    gap = build_encoder("vit_base_patch16_siglip_gap_256", "random", 32, device="cpu", precision="fp32",
                        model_args=TINY_ARGS)
    x = gap.preprocess(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    patch, vec = gap.encode(x)
    assert gap.pooled == "token_mean" and torch.allclose(vec, patch.mean(dim=1), atol=1e-6)  # no head to pool with


def test_intermediate_layer_and_its_norm():
    args = dict(device="cpu", precision="fp32", model_args=TINY_ARGS)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("vit_small_patch16_dinov3", "vit_base_patch16_siglip_256"):
        last = build_encoder(name, "random", 32, **args)
        as_block = build_encoder(name, "random", 32, layer=2, **args)
        first = build_encoder(name, "random", 32, layer=1, **args)
        raw = build_encoder(name, "random", 32, layer=1, layer_norm=False, **args)
        p_last, _ = last.encode(x)
        p2, v2 = as_block.encode(x)
        assert torch.allclose(p2, p_last, atol=1e-5)  # block depth through the final norm = forward_features
        p1, v1 = first.encode(x)
        assert not torch.allclose(p1, p_last, atol=1e-3)
        assert torch.allclose(first.model.norm(raw.encode(x)[0]), p1, atol=1e-5)
        # intermediate pooling: the cls token where there is one, else the token mean (never the last-layer head)
        assert first.pooled == ("cls" if last.num_prefix_tokens else "token_mean")
        if first.pooled == "token_mean":
            assert torch.allclose(v1, p1.mean(dim=1), atol=1e-6)


def test_bad_encoder_settings_are_one_line_errors():
    args = dict(device="cpu", precision="fp32", model_args=TINY_ARGS)
    with pytest.raises(UserError, match="image_encoder.layer = 3"):
        build_encoder("vit_small_patch16_dinov3", "random", 32, layer=3, **args)
    with pytest.raises(UserError, match="layer_norm = false"):
        build_encoder("vit_small_patch16_dinov3", "random", 32, layer_norm=False, **args)
    with pytest.raises(UserError, match="multiple of 16 .256 gives a 16x16"):
        build_encoder("vit_small_patch16_dinov3", "random", 200, **args)
    with pytest.raises(UserError, match="declare its preprocessing"):
        build_encoder("vit_tiny_patch16_224", "random", 32, **args)
    generic = build_encoder("vit_tiny_patch16_224", "random", 32, mean=[0.1, 0.2, 0.3], std=[1, 1, 1], **args)
    assert (generic.family, generic.pooled, generic.num_prefix_tokens) == ("timm_vit", "cls", 1)
    with pytest.raises(UserError, match="key=value"):
        parse_model_args(["depth"])
    with pytest.raises(UserError, match="builds patch 8"):
        build_encoder("vit_small_patch16_dinov3", "random", 32, model_args=TINY_ARGS + ["patch_size=8"],
                      device="cpu")


@pytest.fixture(scope="module")
def siglip_store(tmp_path_factory):
    """A 6-image SigLIP2-architecture store (tiny, random, layer 1) made by the real extract; (cfg, group)."""
    from fae_pipe.stages import prepare
    from fae_pipe.stages.extract import extract_features

    root = tmp_path_factory.mktemp("siglip")
    cfg = load_config(None, {
        "paths.index": str(root / "index.json"), "paths.features": str(root / "features.zarr"),
        "data.root": str(root / "demo"), "data.demo": True, "data.demo_classes": 2, "data.demo_per_class": 3,
        "data.demo_size": 32, "data.image_size": 32, "data.decode_workers": 0,
        "image_encoder.name": "vit_so400m_patch16_siglip_256.v2_webli", "image_encoder.weights": "random",
        "image_encoder.input_size": 32, "image_encoder.precision": "fp32", "image_encoder.device": "cpu",
        "image_encoder.model_args": TINY_ARGS, "image_encoder.layer": 1, "image_encoder.batch_size": 4,
        "extract.shards": 1, "extract.shard_samples": 8, "extract.chunk_samples": 2})
    prepare.run(cfg)
    extract_features(cfg, cfg.paths.features)
    return cfg, zarr.open_group(cfg.paths.features, mode="r")


def test_store_attrs_name_encoder_layer_preprocessing_and_fingerprint(siglip_store):
    cfg, group = siglip_store
    rec, attrs = group.attrs["encoder"], dict(group.attrs)
    assert rec["name"] == "vit_so400m_patch16_siglip_256.v2_webli" and rec["family"] == "siglip2"
    assert (rec["timm_model"], rec["pretrained_tag"]) == ("vit_so400m_patch16_siglip_256", "v2_webli")
    assert (rec["layer"], rec["layer_norm"], rec["pooled"], rec["num_prefix_tokens"]) == (1, True, "token_mean", 0)
    assert rec["weights_fingerprint"] == "random" and rec["random_weights"] is True
    assert rec["model_args"] == {"embed_dim": 32, "depth": 2, "num_heads": 2}
    assert rec["preprocessing"] == {"resize": "bicubic", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert attrs["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3} and list(attrs["grid"]) == [2, 2]
    assert group["features"].shape == (6, 2, 4, 32) and group["cls"].shape == (6, 2, 32)


def test_fd_dinov2_of_a_siglip_store_comes_from_the_reference_encoder(siglip_store):
    """The real reference images scored against themselves: FD ~ 0 in both spaces, DINOv2 columns first."""
    import copy

    from fae_pipe.config import set_key
    from fae_pipe.data.index import read_index
    from fae_pipe.sampling.reference import GenerationScorer, encoder_cls, load_reference_pixels

    cfg, group = siglip_store
    with pytest.raises(UserError, match="not DINOv2 cls tokens: set evaluate.reference_encoder"):
        GenerationScorer(cfg, group, cfg.paths.features, torch.device("cpu"))
    cfg = copy.deepcopy(cfg)
    for key, value in {"name": "vit_small_patch14_dinov2", "weights": "random", "input_size": 28,
                       "precision": "fp32", "device": "cpu", "model_args": TINY_ARGS}.items():
        set_key(cfg, f"evaluate.reference_encoder.{key}", value)
    scorer = GenerationScorer(cfg, group, cfg.paths.features, torch.device("cpu"))
    assert scorer.separate and scorer.width == 64 and "vit_small_patch14_dinov2" in scorer.dinov2_source
    ids = np.asarray(group["sample_ids"][:])[scorer.ref_rows]
    pixels = load_reference_pixels(read_index(cfg.paths.index), ids, 32, "orig", workers=0)
    assert np.allclose(scorer.reference_dinov2, encoder_cls(scorer.dinov2, pixels, 4))
    feats = scorer.features(pixels)
    assert np.allclose(feats[:, :32], scorer.reference_dinov2)
    assert np.allclose(feats[:, 32:], scorer.reference, atol=2e-3)  # the store holds float16
    out = scorer.score(feats)
    assert abs(out["fd_dinov2"]) < 1e-3 and abs(out["fd_encoder"]) < 1e-2


def test_fae_families_follow_the_encoder_width():
    from fae_pipe.models.registry import fae_families_for, model_kwargs
    from fae_pipe.stages.train_fae import build_module

    for family, width in (("fae_siglip2_so400m", 1152), ("fae_dinov3_l", 1024)):
        enc, fdec = model_kwargs(f"{family}.encoder"), model_kwargs(f"{family}.feature_decoder")
        assert enc["in_dim"] == fdec["out_dim"] == model_kwargs(f"{family}.pixel_decoder")["in_dim"] == width
        assert fdec["learned_pos_grid"] == 16 and family in fae_families_for(width)
    with pytest.raises(UserError, match="pick the family of the encoder: fae_siglip2_so400m"):
        build_module("fae_tiny", 1152, (8, 8))


def test_original_format_checkpoints_load_and_the_position_table_is_resized(tmp_path):
    """Meta's own key names (DINOv3: storage_tokens, ls1.gamma, rope periods; DINOv2: register_tokens,
    mask_token, a position table with the cls slot) go through timm's converters."""
    args = dict(device="cpu", precision="fp32", model_args=TINY_ARGS)
    d3 = build_encoder("vit_small_patch16_dinov3", "random", 32, **args)
    meta = {k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"):
            v.clone() for k, v in d3.model.state_dict().items()}
    meta.update({"mask_token": torch.zeros(1, 32), "rope_embed.periods": torch.ones(4)})
    save_file(meta, str(tmp_path / "dinov3_meta.safetensors"))
    loaded = build_encoder("vit_small_patch16_dinov3", str(tmp_path / "dinov3_meta.safetensors"), 32, **args)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x)[0], d3.encode(x)[0])

    d2 = build_encoder("vit_small_patch14_reg4_dinov2", "random", 56, **args)
    meta = {k.replace("reg_token", "register_tokens"): v.clone() for k, v in d2.model.state_dict().items()}
    meta["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), meta["pos_embed"]], 1)  # Meta keeps a cls position
    meta["mask_token"] = torch.zeros(1, 32)
    path = str(tmp_path / "dinov2_meta.safetensors")
    save_file(meta, path)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    assert torch.equal(build_encoder("vit_small_patch14_reg4_dinov2", path, 56, **args).encode(x)[0], d2.encode(x)[0])
    small = build_encoder("vit_small_patch14_reg4_dinov2", path, 28, **args)  # 4x4 table -> 2x2
    assert small.model.pos_embed.shape == (1, 4, 32) and small.encode(x[:, :, :28, :28])[0].shape == (2, 4, 32)


# README "Encoders and latent sources": name -> (input size, width, prefix tokens, bytes per image, fp16, 2 views)
README_ROWS = {
    "vit_giant_patch14_dinov2": (224, 1536, 1, 1_579_008),
    "vit_large_patch14_reg4_dinov2": (224, 1024, 5, 1_052_672),
    "vit_large_patch16_dinov3": (256, 1024, 5, 1_052_672),
    "vit_so400m_patch16_siglip_256.v2_webli": (256, 1152, 0, 1_184_256),
    "vit_base_patch16_siglip_256.v2_webli": (256, 768, 0, 789_504),
}


def test_the_readme_table_matches_the_full_size_models():
    """Full-size architectures on the meta device (no memory): width, prefix tokens and a 16x16 grid; the
    table's bytes = 2 views x (256 patch tokens + 1 pooled vector) x width x 2 bytes."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, (size, width, prefix, nbytes) in README_ROWS.items():
        choice = resolve(name)
        with torch.device("meta"):
            model = timm.create_model(choice.arch, pretrained=False, img_size=size)
        grid = size // int(model.patch_embed.patch_size[0])
        assert (int(model.num_features), int(model.num_prefix_tokens), grid) == (width, prefix, 16), name
        assert choice.family.grid_input_size == size and nbytes == 2 * (grid * grid + 1) * width * 2
        assert name in readme and f"{nbytes:,}" in readme, name
