"""TARFlow/STARFlow maths on tiny flows: exact inverses, log-determinants, likelihood, Tweedie, guidance, KV cache."""

import math

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.flow import FlowGuidance, denoise, invert, log_prob, mix, nll_per_dim, training_loss
from fae_pipe.models.registry import count_parameters, create_model, list_models
from fae_pipe.models.tarflow import FlowBlock, TARFlow


def random_flow(seed=0, depths=(1, 2), **kw) -> TARFlow:
    """A tiny flow whose output maps are not the identity (they are zero at init)."""
    torch.manual_seed(seed)
    args = dict(dict(input_size=4, patch_size=1, in_channels=2, width=32, heads=2, num_classes=3), **kw)
    model = TARFlow(block_depths=list(depths), **args)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.05)
            block.proj_out.bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("flip, depth", [(False, 1), (True, 1), (False, 4)], ids=["identity", "flip", "deep"])
def test_each_block_type_inverts_exactly(flip, depth):
    torch.manual_seed(1)
    block = FlowBlock(token_dim=3, num_tokens=9, width=32, depth=depth, heads=2, mlp_ratio=2.0, num_classes=3,
                      flip=flip)
    with torch.no_grad():
        block.proj_out.weight.normal_(0.0, 0.05)
    x, y = torch.randn(5, 9, 3), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        z, logdet = block(x, y)
        assert not torch.allclose(z, x, atol=1e-3) and logdet.abs().min() > 0  # not the identity
        assert torch.allclose(block.inverse(z, y), x, atol=1e-5)


@pytest.mark.parametrize("depths, patch", [((1, 2, 1), 1), ((1, 1, 3), 2)], ids=["tarflow", "starflow-patch2"])
def test_the_stack_inverts_exactly_and_cached_equals_uncached(depths, patch):
    model = random_flow(depths=depths, patch_size=patch)
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 2, 1, 3])
    with torch.no_grad():
        z, _ = model(x, y)
    assert torch.allclose(model.inverse(z, y), x, atol=1e-5)
    cached, uncached = invert(model, z, y, cache=True), invert(model, z, y, cache=False)
    assert torch.allclose(cached, x, atol=1e-5) and torch.allclose(cached, uncached, atol=1e-5)
    g = FlowGuidance(2.5, "ramp")
    assert torch.allclose(invert(model, z, y, g, cache=True), invert(model, z, y, g, cache=False), atol=1e-5)


def test_log_det_equals_the_autograd_jacobian():
    model = random_flow(depths=(1, 1)).double()
    x, y = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([1])
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 2, 4, 4), y)[0].flatten(), x.flatten())
    sign, expected = torch.linalg.slogdet(jac)
    assert sign != 0
    assert model(x, y)[1].item() == pytest.approx(expected.item(), abs=1e-8)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest, and does not fight the other test worker for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # 200 optimizer steps: ~5 s idle, the rest of this file takes ~2 s
def test_nll_on_a_known_gaussian_approaches_its_entropy(one_thread):
    """A correlated Gaussian is exactly representable (an affine autoregressive map is its Cholesky factor)."""
    torch.manual_seed(0)
    d = 8  # 2 channels x 2 x 2
    a = torch.randn(d, d) * 0.3 + torch.eye(d)
    cov = a @ a.T
    entropy = 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(cov).item()) / d  # nats / dim
    dist = torch.distributions.MultivariateNormal(torch.zeros(d), cov)
    model = TARFlow(input_size=2, in_channels=2, width=32, block_depths=[1, 1], heads=2, num_classes=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)
    y = torch.zeros(128, dtype=torch.long)
    start = None
    for _ in range(200):
        loss = training_loss(model, dist.sample((128,)).view(128, 2, 2, 2), y, sigma=0.0).loss
        start = start if start is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        held_out = nll_per_dim(model, dist.sample((4096,)).view(4096, 2, 2, 2), 0).mean().item()
    assert start - entropy > 0.3  # it had something to learn
    assert held_out == pytest.approx(entropy, abs=0.05)  # from 0.57 above it at the start


def test_tweedie_moves_noisy_gaussian_samples_by_the_predicted_amount():
    """x ~ N(m, s^2), x~ = x + sigma eps: the flow of N(m, s^2 + sigma^2) gives E[x | x~] exactly."""
    m, s, sigma = 0.7, 0.5, 0.4
    model = TARFlow(input_size=2, in_channels=2, width=16, block_depths=[1, 1], heads=2, num_classes=1)
    with torch.no_grad():  # proj_out weights are zero: constant per-token maps (bias = [alpha, mu])
        model.blocks[0].proj_out.bias.copy_(torch.tensor([math.log(math.hypot(s, sigma))] * 2 + [m] * 2))
    torch.manual_seed(0)
    clean = m + s * torch.randn(4096, 2, 2, 2)
    noisy = clean + sigma * torch.randn_like(clean)
    out = denoise(model, noisy, 0, sigma)
    predicted = -sigma ** 2 * (noisy - m) / (s ** 2 + sigma ** 2)
    assert torch.allclose(out - noisy, predicted, atol=1e-5)
    # toward the clean distribution: the error to the clean samples falls to the posterior variance
    post_var = s ** 2 * sigma ** 2 / (s ** 2 + sigma ** 2)
    assert (noisy - clean).pow(2).mean().item() == pytest.approx(sigma ** 2, rel=0.05)
    assert (out - clean).pow(2).mean().item() == pytest.approx(post_var, rel=0.05)


@pytest.mark.parametrize("mode", ["product", "extrapolate"])
def test_guidance_at_scale_one_equals_unguided_sampling(mode):
    model = random_flow(depths=(2, 1))
    z, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    plain = invert(model, z, y)
    for schedule in ("constant", "ramp"):
        assert torch.allclose(invert(model, z, y, FlowGuidance(1.0, schedule, mode)), plain, atol=1e-5)
    assert not torch.allclose(invert(model, z, y, FlowGuidance(3.0, "constant", mode)), plain, atol=1e-2)


def test_product_guidance_is_the_normalised_power_of_the_two_gaussians():
    mu_c, a_c, mu_u, a_u, w = torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(0.0), torch.tensor(0.2), 2.0
    mu, alpha = mix(mu_c, a_c, mu_u, a_u, w)
    xs = torch.linspace(-6, 8, 20001)
    logp = w * torch.distributions.Normal(mu_c, a_c.exp()).log_prob(xs) + \
        (1 - w) * torch.distributions.Normal(mu_u, a_u.exp()).log_prob(xs)
    p = torch.softmax(logp, 0)
    mean = (p * xs).sum()
    assert mean.item() == pytest.approx(mu.item(), abs=1e-3)
    assert ((p * (xs - mean) ** 2).sum().sqrt()).item() == pytest.approx(alpha.exp().item(), abs=1e-3)
    assert FlowGuidance(3.0, "ramp").scale_at(0, 4) == 1.5 and FlowGuidance(3.0, "ramp").scale_at(3, 4) == 3.0


def test_log_prob_of_the_identity_flow_is_the_standard_gaussian():
    model = TARFlow(input_size=2, in_channels=2, width=16, block_depths=[1], heads=2, num_classes=1)
    x = torch.randn(5, 2, 2, 2)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(log_prob(model, x, 0), expected, atol=1e-5)


def test_registered_flows_and_pinned_parameter_counts():
    assert {"tarflow_tiny", "starflow_tiny", "tarflow_b", "tarflow_l", "starflow_xl"} <= set(list_models("flow"))
    with torch.device("meta"):
        counts = {n: count_parameters(create_model(n)) for n in ("starflow_xl", "tarflow_b", "tarflow_tiny")}
    assert counts == {"starflow_xl": 551_340_672, "tarflow_b": 461_955_584, "tarflow_tiny": 1_638_464}
    with torch.device("meta"):
        deep = create_model("starflow_xl")
    assert [len(b.layers) for b in deep.blocks] == [2, 2, 2, 2, 2, 24]
    assert [b.flip for b in deep.blocks] == [False, True, False, True, False, True]


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(UserError, match="block_depths"):
        TARFlow(input_size=4, block_depths=[2, 0])
    with pytest.raises(UserError, match="expected"):
        random_flow()(torch.zeros(1, 3, 4, 4), 0)


def test_bench_flow_measures_every_candidate():
    from fae_pipe.config import load_config
    from fae_pipe.stages.bench_flow import measure

    cfg = load_config(None, {"flow.model": "starflow_tiny", "sit.model": "sit_tiny", "sample.steps": "2"})
    rows = measure(cfg, [2, 3], batch=2, uncached_max=4, channels=2, repeats=1)
    assert [r["tokens"] for r in rows] == [4, 9] and "flow_uncached_img_per_s" not in rows[1]
    assert all(r[k] > 0 for r in rows for k in r if k.endswith("_img_per_s"))
