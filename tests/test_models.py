"""Tests for fae_pipe.models: tiny configs run for real, paper configs are counted on meta."""

import math

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.models.fae_encoder import DiagonalGaussian
from fae_pipe.models.layers import Rope2D, SelfAttention, apply_rope, attention, set_attention_backend, sincos_2d
from fae_pipe.models.registry import count_parameters, create_model, fae_parts, list_models


def _grads_finite(*modules):
    for m in modules:
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


def test_fae_tiny_forward_backward():
    torch.manual_seed(0)
    names = fae_parts("fae_tiny")
    enc, fdec, pdec = (create_model(names[p]) for p in ("encoder", "feature_decoder", "pixel_decoder"))
    x = torch.randn(2, 64, 384)
    mean, logvar = enc(x)
    assert mean.shape == logvar.shape == (2, 64, 8)
    post = enc.posterior(x)
    z = post.sample()
    feats = fdec(z)
    assert feats.shape == (2, 64, 384)
    img = pdec(feats)
    assert img.shape == (2, 3, 64, 64)
    loss = (feats - x).pow(2).mean() + 1e-4 * post.kl().mean() + img.abs().mean()
    assert torch.isfinite(loss)
    loss.backward()
    _grads_finite(enc, fdec, pdec)


def test_gaussian_kl_and_clamp():
    mean = torch.ones(2, 4, 3)
    post = DiagonalGaussian(mean, torch.zeros(2, 4, 3))
    assert torch.allclose(post.kl(), torch.full((2,), 0.5 * 12))  # 0.5 * mu^2 per element, summed
    assert torch.allclose(post.kl("mean"), torch.tensor(0.5))
    assert torch.equal(post.mode(), mean)
    assert DiagonalGaussian(mean, torch.full((2, 4, 3), 1e4)).logvar.max() == 20.0
    with pytest.raises(UserError):
        post.kl("median")


def test_sit_tiny_forward_backward_and_zero_init():
    torch.manual_seed(0)
    for pos in ("sincos", "rope"):
        sit = create_model("sit_tiny", pos=pos)
        x = torch.randn(3, 8, 8, 8)
        y = torch.tensor([0, 9, sit.num_classes])  # last one is the null (unconditional) class
        out = sit(x, torch.rand(3), y)
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero: exactly zero at init
        out.pow(2).sum().backward()
        # only the zero-initialised head sees a gradient at init; it must be finite
        assert torch.isfinite(sit.head.weight.grad).all()
    # scalar t and y broadcast over the batch; after a nudge the output is non-zero
    torch.nn.init.normal_(sit.head.weight, std=0.02)
    torch.nn.init.normal_(sit.final_ada[-1].weight, std=0.02)
    out = sit(x, 0.5, 3)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_sit_patch2_shapes():
    sit = create_model("sit_tiny", patch_size=2, in_channels=4)
    x = torch.randn(2, 4, 8, 8)
    assert sit(x, torch.rand(2), torch.tensor([1, 10])).shape == x.shape


def test_discriminator_tiny():
    for norm in ("spectral", "batch"):
        disc = create_model("patchgan_tiny", norm=norm)
        img = torch.rand(2, 3, 64, 64) * 2 - 1
        logits = disc(img)
        assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1
        logits.mean().backward()
        _grads_finite(disc)


PAPER_COUNTS = {
    "fae_dinov2_g.encoder": 38.17e6,
    "fae_dinov2_g.feature_decoder": 170.43e6,
    "fae_dinov2_g.pixel_decoder": 305.36e6,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert abs(count_parameters(model) / PAPER_COUNTS[name] - 1) < 0.01


def test_sit_xl_patch1_count():
    with torch.device("meta"):
        model = create_model("sit_xl", patch_size=1, in_channels=32, input_size=16)
    assert abs(count_parameters(model) / 675e6 - 1) < 0.01


def test_sdpa_matches_naive_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16, dtype=torch.float64) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    assert torch.allclose(attention(q, k, v), weights @ v, atol=1e-5)


def test_attention_backend_is_explicit_and_cpu_falls_back_to_sdpa():
    torch.manual_seed(0)
    model = create_model(fae_parts("fae_tiny")["feature_decoder"])
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert layers and all(m.backend == "sdpa" for m in layers)  # nothing switches because of an import
    x = torch.randn(2, 64, 8)
    ref = model(x)
    assert set_attention_backend([model, None], "xformers") is not None
    assert all(m.backend == "xformers" for m in layers)
    assert torch.equal(model(x), ref)  # CPU tensors: xformers has no CPU kernel, SDPA runs
    with pytest.raises(UserError, match="runtime.attention = 'flash' is invalid: expected one of sdpa, xformers"):
        set_attention_backend(model, "flash")


def test_xformers_asked_for_on_cuda_but_missing_is_one_line_error(monkeypatch):
    from fae_pipe.models import layers

    monkeypatch.setattr(layers, "_XFORMERS", False)  # as when xformers does not import
    with pytest.raises(UserError, match="runtime.attention = 'xformers' but xformers does not import"):
        layers._require_xformers()  # what a CUDA tensor with backend "xformers" calls


def test_rope_is_rotation_with_relative_dot_products():
    torch.manual_seed(0)
    rope = Rope2D(16)
    h = w = 6
    cos, sin = rope.cos_sin(h, w, "cpu", torch.float64)
    q = torch.randn(16, dtype=torch.float64).expand(h * w, 16)
    k = torch.randn(16, dtype=torch.float64).expand(h * w, 16)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1))
    idx = lambda r, c: r * w + c  # noqa: E731
    dots = qr @ kr.T
    # same offset (+1 row, +2 cols) at two different places -> same score
    assert torch.allclose(dots[idx(0, 0), idx(1, 2)], dots[idx(3, 1), idx(4, 3)])
    # a different offset gives a different score (positions actually matter)
    assert not torch.allclose(dots[idx(0, 0), idx(1, 2)], dots[idx(0, 0), idx(2, 1)])
    assert rope.cos_sin(h, w, "cpu", torch.float64)[0] is cos  # cached per grid


def test_sincos_table_shape_and_distinct_rows():
    table = sincos_2d(32, 4, 5)
    assert table.shape == (20, 32)
    assert torch.unique(table, dim=0).shape[0] == 20


def test_registry_errors_and_listing():
    with pytest.raises(UserError, match="sit_xl"):
        create_model("sit_xxl")
    with pytest.raises(UserError, match="depth"):
        create_model("sit_tiny", dept=3)
    with pytest.raises(UserError):
        list_models("vae")
    assert [n for n in list_models("sit") if n.startswith("sit_")] == ["sit_b", "sit_l", "sit_s", "sit_tiny", "sit_xl"]
    assert "fae_dinov2_g.encoder" in list_models("fae_encoder")


def test_input_shape_errors():
    fdec = create_model("fae_dinov2_g.feature_decoder", depth=1, width=64, heads=2, out_dim=64)
    with pytest.raises(UserError, match="16x16"):
        fdec(torch.randn(1, 64, 32))  # learned positions are for 16x16 tokens, not 8x8
    with pytest.raises(UserError, match="square"):
        create_model("fae_tiny.encoder")(torch.randn(1, 60, 384))


def test_unpatchify_places_each_patch_vector():
    pdec = create_model("fae_tiny.pixel_decoder", grid_size=2, patch_size=3, depth=1)
    g, p, c = 2, 3, 3
    vec = torch.arange(g * g * p * p * c, dtype=torch.float32).view(1, g * g, p * p * c)
    img = pdec.unpatchify(vec)
    assert img.shape == (1, c, g * p, g * p)
    for i in range(g):
        for j in range(g):
            for r in range(p):
                for s in range(p):
                    for ch in range(c):
                        assert img[0, ch, i * p + r, j * p + s] == vec[0, i * g + j, (r * p + s) * c + ch]
    # SiT: unpatchify inverts a patchify with the conv embedding's token order, (row, col, channel) inside
    sit = create_model("sit_tiny", input_size=4, patch_size=2, in_channels=3)
    x = torch.randn(2, 3, 4, 4)
    tokens = x.view(2, 3, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 12)
    assert torch.equal(sit.unpatchify(tokens), x)
