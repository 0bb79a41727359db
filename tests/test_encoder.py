"""Frozen timm ViT wrapper (DINOv2 here; the other families: test_encoder_families.py) on tiny inputs: token split, weight sources, fingerprints, precision, FLOPs."""

from __future__ import annotations

import copy
import hashlib
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from fae_pipe.data.transforms import encoder_input
from fae_pipe.encoders.timm_vit import RANDOM_WARNING, _hub_cached_file, build_encoder
from fae_pipe.errors import UserError

NAME = "vit_small_patch14_dinov2"



@pytest.fixture(scope="module")
def enc():
    return build_encoder(NAME, "random", 28, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def test_encode_splits_prefix_and_patch_tokens(enc, x):
    patch, cls = enc.encode(x)
    assert patch.shape == (3, 4, 384) and cls.shape == (3, 384) and patch.dtype == cls.dtype == torch.float32
    with torch.no_grad():
        tokens = enc.model.forward_features(x)
    assert torch.equal(patch, tokens[:, 1:]) and torch.equal(cls, tokens[:, 0])
    assert (enc.grid, enc.dim, enc.num_prefix_tokens, enc.input_size) == ((2, 2), 384, 1, 28)
    assert enc.random_weights and enc.weights_fingerprint == "random" and enc.weights == "random"
    assert not any(p.requires_grad for p in enc.parameters()) and not patch.requires_grad
    enc.train()
    assert not enc.model.training
    with pytest.raises(ValueError):
        enc.encode(torch.zeros(1, 3, 42, 42))


def test_encode_pixels_uses_the_shared_preprocessing(enc):
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a, b = enc.encode_pixels(pixels), enc.encode(encoder_input(pixels, 28))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reg4_drops_five_prefix_tokens(x):
    reg = build_encoder("vit_small_patch14_reg4_dinov2", "random", 28, device="cpu", precision="fp32")
    patch, cls = reg.encode(x)
    with torch.no_grad():
        tokens = reg.model.forward_features(x)
    assert reg.num_prefix_tokens == 5 and tokens.shape[1] == 9
    assert torch.equal(patch, tokens[:, 5:]) and torch.equal(cls, tokens[:, 0])


def test_random_is_reproducible_warns_and_bf16_is_close(enc, x, caplog):
    with caplog.at_level(logging.WARNING, logger="fae_pipe.encoders.timm_vit"):
        bf16 = build_encoder(NAME, "random", 28, device="cpu", precision="bf16")
    assert RANDOM_WARNING in caplog.text
    same = all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), bf16.state_dict().values()))
    assert same, "random weights must be identical in every process"
    p32, c32 = enc.encode(x)
    p16, c16 = bf16.encode(x)
    assert p16.dtype == torch.float32 and not torch.equal(p16, p32)
    cos = torch.nn.functional.cosine_similarity(p16.flatten(0, 1), p32.flatten(0, 1), dim=-1)
    assert cos.min() > 0.99
    assert torch.nn.functional.cosine_similarity(c16, c32, dim=-1).min() > 0.99


def test_local_checkpoint_gives_the_same_features(enc, x, tmp_path):
    reference = copy.deepcopy(enc.model)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = build_encoder(NAME, str(path), 28, device="cpu", precision="fp32")
    assert loaded.weights_fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.random_weights and loaded.weights == str(path)
    patch, cls = loaded.encode(x)
    with torch.no_grad():
        tokens = reference.forward_features(x)
    assert (patch - tokens[:, 1:]).abs().max() <= 1e-6 and (cls - tokens[:, 0]).abs().max() <= 1e-6
    assert not torch.allclose(patch, enc.encode(x)[0], atol=1e-3)


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a timm model") as err:
        build_encoder("vit_huge_patch14_dinov2", "random", 28)
    assert all(f in str(err.value) for f in ("dinov2", "dinov2_reg", "dinov3", "siglip2", "vit_*_patch16_dinov3"))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match=str(missing)):
        build_encoder(NAME, str(missing), 28)
    with pytest.raises(UserError, match="multiple of 14"):
        build_encoder(NAME, "random", 30)
    with pytest.raises(UserError, match="precision"):
        build_encoder(NAME, "random", 28, precision="fp16")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load it"):
        build_encoder(NAME, str(garbage), 28)


def test_hub_without_network_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if _hub_cached_file(f"timm/{NAME}.lvd142m"):  # weights in the local cache load without network
        assert build_encoder(NAME, "hub", 28).weights_fingerprint == f"hub:{NAME}.lvd142m"
    else:
        with pytest.raises(UserError, match="no network") as err:
            build_encoder(NAME, "hub", 28)
        assert "\n" not in str(err.value)


def test_flops_estimate_matches_counted_matmuls_plus_attention(enc):
    with FlopCounterMode(display=False) as counter:
        enc.encode(torch.zeros(1, 3, 28, 28))
    tokens = 1 + 4
    attention = 4 * len(enc.model.blocks) * tokens * tokens * enc.dim
    measured = counter.get_total_flops()
    assert measured > 0
    assert abs(enc.flops_per_image() - (measured + attention)) / (measured + attention) < 0.05


def test_default_dinov2_path_is_unchanged_by_the_encoder_registry():
    """The demo's DINOv2-S random at 112 px: weights and encoder input pinned to their values before the
    registry (commit 81915a5), so the features a demo store holds are bit-identical (same weights, same
    input, same forward_features; measured identical in fp32 and bf16 at the change)."""
    enc = build_encoder(NAME, "random", 112, device="cpu", precision="fp32")
    h = hashlib.sha256()
    for k, v in enc.model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    x = enc.preprocess(pixels)
    assert h.hexdigest()[:16] == "84950412781d76f0"
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] == "5d4bdc1872fce324"
    assert torch.equal(x, encoder_input(pixels, 112))
    assert (enc.family, enc.pooled, enc.mean) == ("dinov2", "cls", (0.485, 0.456, 0.406))
