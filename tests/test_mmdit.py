"""MMDiT (text-to-image generator): shapes, padding invariance, text really conditions, pinned sizes."""

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.models.registry import count_parameters, create_model


def _perturbed(name, **kw):
    """A tiny model with every weight random (the zero init would make every output 0)."""
    torch.manual_seed(0)
    m = create_model(name, input_size=8, patch_size=2, in_channels=4, text_dim=16, width=32, depth=2, heads=4, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, torch.tensor([0.2, 0.8]), text, mask


@pytest.mark.parametrize("name", ["mmdit_tiny", "mmdit_tiny_cross"])
def test_zero_init_outputs_zero(name):
    m = create_model(name, input_size=8, patch_size=2, in_channels=4, text_dim=16, width=32, depth=2, heads=4)
    x, t, text, mask = _batch()
    assert torch.equal(m(x, t, text, mask), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["mmdit_tiny", "mmdit_tiny_cross"])
def test_padding_is_invisible_and_text_conditions(name):
    m = _perturbed(name)
    x, t, text, mask = _batch()
    out = m(x, t, text, mask)
    assert out.shape == x.shape
    # more padding with garbage behind it changes nothing
    junk = torch.randn(2, 4, 16) * 100
    padded = m(x, t, torch.cat([text, junk], 1), torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1))
    assert torch.allclose(out, padded, atol=1e-5)
    # ...while changing a real token changes the prediction of that sample only
    other = text.clone()
    other[0, 1] += 1.0
    moved = m(x, t, other, mask)
    assert (moved[0] - out[0]).abs().max() > 1e-3
    assert torch.allclose(moved[1], out[1], atol=1e-6)


def test_pooled_vector_is_required_exactly_when_declared():
    m = _perturbed("mmdit_tiny", pooled_dim=8)
    x, t, text, mask = _batch()
    assert m(x, t, text, mask, pooled=torch.randn(2, 8)).shape == x.shape
    with pytest.raises(UserError, match="pooled_dim=8"):
        m(x, t, text, mask)
    with pytest.raises(UserError, match="expected tokens"):
        m(x, t, text[..., :8], mask)


def test_paper_size_is_pinned():
    with torch.device("meta"):
        assert count_parameters(create_model("mmdit_600m")) == 599_560_224
        assert count_parameters(create_model("mmdit_600m_cross")) == 378_171_424
