"""LightningDiT block options, the DDT wide head and the REPA hooks (tiny models; paper sizes on meta)."""

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.models.layers import RMSNorm
from fae_pipe.models.registry import count_parameters, create_model
from fae_pipe.models.repa import RepaProjector, align_targets, default_repa_depth, repa_loss
from fae_pipe.transport import training_loss

# Exact counts of the registered configs (patch 1, 16x16x32); see the registry docstring.
LIGHTNINGDIT_XL, LIGHTNINGDIT_XL_DH, LIGHTNINGDIT_XL_DH_768 = 674_965_856, 834_226_996, 838_090_260

SIT_DEPTH1_KEYS = [
    "patch_embed.weight", "patch_embed.bias", "t_embed.mlp.0.weight", "t_embed.mlp.0.bias",
    "t_embed.mlp.2.weight", "t_embed.mlp.2.bias", "y_embed.weight", "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "blocks.0.ada.1.weight",
    "blocks.0.ada.1.bias", "final_ada.1.weight", "final_ada.1.bias", "head.weight", "head.bias",
]


def _randomise(*modules):
    """Non-zero weights everywhere (adaLN-Zero gates included) so every path carries signal."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():  # norm gains stay near 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name else 0.0))


def _batch(model, b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.tensor([0, 9, model.num_classes])[:b]


def test_paper_parameter_counts_on_meta():
    with torch.device("meta"):
        xl, dh = create_model("lightningdit_xl"), create_model("lightningdit_xl_dh")
        dh_768 = create_model("lightningdit_xl_dh", in_channels=768)
    assert count_parameters(xl) == LIGHTNINGDIT_XL
    assert abs(LIGHTNINGDIT_XL / 675e6 - 1) < 0.001  # paper: 675M
    assert count_parameters(dh) == LIGHTNINGDIT_XL_DH
    assert count_parameters(dh_768) == LIGHTNINGDIT_XL_DH_768
    assert abs(LIGHTNINGDIT_XL_DH_768 / 839e6 - 1) < 0.002  # RAE's DiT-DH-XL on 768-channel features: 839M
    assert len(dh.ddt_blocks) == 2 and dh.ddt_blocks[0].attn.qkv.in_features == 2048


def test_block_options_change_structure_and_default_keys_stay():
    assert list(create_model("sit_tiny", depth=1).state_dict()) == SIT_DEPTH1_KEYS
    sit, ldit = create_model("sit_tiny"), create_model("lightningdit_tiny")
    assert not any("norm" in k for k in sit.state_dict())  # affine-free LayerNorms, no q/k norms
    assert all(isinstance(m, torch.nn.LayerNorm) for b in sit.blocks for m in (b.norm1, b.norm2))
    for block in ldit.blocks:
        assert isinstance(block.norm1, RMSNorm) and isinstance(block.norm2, RMSNorm)
        assert block.attn.qk_norm and block.attn.q_norm.weight.shape == (32,)  # per head: 128 / 4 heads
    assert isinstance(ldit.final_norm, RMSNorm) and ldit.rope is not None and ldit.pos is None
    only_qk = set(create_model("sit_tiny", depth=1, qk_norm=True).state_dict()) - set(SIT_DEPTH1_KEYS)
    assert only_qk == {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"}
    only_rms = set(create_model("sit_tiny", depth=1, norm="rmsnorm").state_dict()) - set(SIT_DEPTH1_KEYS)
    assert only_rms == {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "final_norm.weight"}
    assert not create_model("sit_tiny", head_depth=0, head_width=96).has_head


def test_bad_options_are_one_line_user_errors():
    for kwargs, key in ((dict(norm="batchnorm"), "sit norm"), (dict(head_depth=-1), "head_depth"),
                        (dict(head_depth=1, head_width=100, head_heads=3), "head_width")):
        with pytest.raises(UserError, match=key):
            create_model("sit_tiny", **kwargs)
    model = create_model("lightningdit_tiny")
    x, t, y = _batch(model)
    for k in (0, 5, True, 2.0):
        with pytest.raises(UserError, match="hidden_at"):
            model(x, t, y, hidden_at=k)
    with pytest.raises(UserError, match="target_dim"):
        create_model("repa_projector", width=8)


@pytest.mark.parametrize("name,pos", [("sit_tiny", None), ("lightningdit_tiny", None),
                                      ("lightningdit_tiny_dh", None), ("lightningdit_tiny_dh", "sincos")])
def test_zero_init_and_hidden_at_returns_the_plain_output(name, pos):
    model = create_model(name, **({} if pos is None else {"pos": pos}))
    x, t, y = _batch(model)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # adaLN-Zero, with or without the head
    _randomise(model)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, inp, out: seen.setdefault("h2", out))
    plain = model(x, t, y)
    seen.clear()
    out, h2 = model(x, t, y, hidden_at=2)
    assert plain.abs().sum() > 0 and torch.equal(out, plain)
    assert h2.shape == (3, 64, 128) and torch.equal(h2, seen["h2"])  # the output of block 2


def test_training_loss_hidden_at_leaves_the_loss_unchanged():
    model = create_model("lightningdit_tiny_dh")
    _randomise(model)
    x, _, y = _batch(model)
    g = torch.Generator().manual_seed(2)
    noise, t = torch.randn(x.shape, generator=g), torch.rand(3, generator=g)
    plain = training_loss(model, x, y, noise=noise, t=t)
    hooked = training_loss(model, x, y, noise=noise, t=t, hidden_at=3)
    assert plain.hidden is None and hooked.hidden.shape == (3, 64, 128)
    assert torch.equal(plain.loss, hooked.loss) and torch.equal(plain.per_sample, hooked.per_sample)


@pytest.mark.parametrize("name", ["lightningdit_tiny", "lightningdit_tiny_dh"])
def test_repa_gradients_reach_blocks_up_to_k_and_no_further(name):
    model, k = create_model(name), 2
    proj = create_model("repa_projector_tiny", width=128, target_dim=384)
    _randomise(model)
    x, _, y = _batch(model)
    out = training_loss(model, x, y, generator=torch.Generator().manual_seed(3), hidden_at=k)
    target = torch.randn(3, 64, 384, generator=torch.Generator().manual_seed(4))
    repa_loss(proj(out.hidden), target).backward()  # only the REPA term, nothing of out.loss

    def nonzero(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert nonzero(proj) and nonzero(model.patch_embed) and nonzero(model.t_embed)
    assert all(nonzero(b) for b in model.blocks[:k])
    after = list(model.blocks[k:]) + [model.final_ada, model.head, model.final_norm]
    after += [model.ddt_embed, model.ddt_cond, *model.ddt_blocks] if model.has_head else []
    assert all(p.grad is None or not p.grad.any() for m in after for p in m.parameters())


def test_align_targets_identity_and_area_resampling():
    target = torch.randn(2, 16, 5)
    assert align_targets(target, 4) is target  # equal grids: the very tensor
    # 4x4 -> 2x2: each generator token gets the mean of its 2x2 block of encoder tokens
    grid = torch.arange(16.0).view(1, 16, 1)
    assert align_targets(grid, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    # 2x2 -> 4x4: each encoder token is repeated over the 2x2 generator tokens inside it
    up = align_targets(torch.tensor([[[1.0], [2.0], [3.0], [4.0]]]), (4, 4)).view(4, 4)
    assert torch.equal(up, torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1))
    # 3x3 -> 2x2: overlapping cells (rows/cols {0, 1} and {1, 2}) averaged with equal weights
    nine = align_targets(torch.arange(9.0).view(1, 9, 1), 2).flatten().tolist()
    assert nine == [2.0, 3.0, 5.0, 6.0]
    # channels are resampled independently; a non-square source grid is given explicitly
    rect = torch.stack([torch.arange(6.0), -torch.arange(6.0)], dim=-1)[None]
    assert align_targets(rect, (1, 3), grid=(2, 3)).tolist() == [[[1.5, -1.5], [2.5, -2.5], [3.5, -3.5]]]
    with pytest.raises(UserError, match="square"):
        align_targets(torch.randn(1, 6, 2), 2)
    with pytest.raises(UserError, match="B, N, D"):
        align_targets(torch.randn(16, 5), 4)


def test_repa_loss_values_and_shapes():
    a = torch.randn(2, 5, 8)
    assert torch.allclose(repa_loss(a, 3.0 * a), torch.tensor(-1.0))
    assert torch.allclose(repa_loss(a, -a), torch.tensor(1.0))
    e = torch.eye(8)
    ortho = repa_loss(e[None, :4].repeat(2, 1, 1), e[None, 4:].repeat(2, 1, 1))
    assert abs(ortho.item()) < 1e-7
    target = torch.randn(2, 5, 8, requires_grad=True)
    repa_loss(a.requires_grad_(), target).backward()
    assert a.grad is not None and target.grad is None  # targets are fixed
    with pytest.raises(UserError, match="align_targets"):
        repa_loss(torch.randn(2, 5, 8), torch.randn(2, 4, 8))


def test_projector_is_repa_s_mlp_and_default_depth_rule():
    with torch.device("meta"):
        proj = create_model("repa_projector", width=1152, target_dim=1536)
    shapes = [(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else type(m).__name__
              for m in proj.mlp]
    assert shapes == [(1152, 2048), "SiLU", (2048, 2048), "SiLU", (2048, 1536)]
    assert RepaProjector(16, 4, hidden=8)(torch.randn(2, 3, 16)).shape == (2, 3, 4)
    assert [default_repa_depth(d) for d in (28, 24, 12, 4, 2, 1, 40)] == [8, 8, 4, 1, 1, 1, 8]
    with pytest.raises(UserError, match="repa depth"):
        default_repa_depth(0)
