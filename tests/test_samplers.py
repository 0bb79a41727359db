"""Samplers and guidance driven by exact velocity fields.

For Gaussian data N(mu, Sigma) the field E[eps - x0 | x_t] is closed form, so every
sampler's output distribution can be compared with the target, and its error must
shrink with more steps. ODE tests start from noise whitened to exactly mean 0 and
covariance I, so what remains is discretisation error. Guidance uses a two-class
Gaussian mixture: class fields are Gaussian, the null class gets the mixture field.
"""

import sys

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.transport import GuidanceSchedule, guided_velocity, sample

D = torch.float64
MU = torch.tensor([1.0, -0.5, 2.0], dtype=D)
SIGMA = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.8, -0.1], [0.0, -0.1, 0.3]], dtype=D)
MUS = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=D)
SIGMAS = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=D), torch.diag(torch.tensor([0.5, 0.1], dtype=D))])
NULL = 2


def gaussian_terms(x, t, mu, sigma, with_logp=True):
    """Exact velocity (and log-density of x_t) for N(mu, sigma) data; samplers pass one t."""
    assert torch.all(t == t[0])
    s = t[0]
    eye = torch.eye(mu.shape[0], dtype=D)
    cov = (1 - s) ** 2 * sigma + s**2 * eye
    centred = x - (1 - s) * mu
    sol = torch.linalg.solve(cov, centred.T).T
    v = sol @ (s * eye - (1 - s) * sigma) - mu
    if not with_logp:
        return v, None
    return v, -0.5 * (centred * sol).sum(-1) - 0.5 * torch.logdet(cov)


def gaussian_model(x, t, y=None):
    return gaussian_terms(x, t, MU, SIGMA, with_logp=False)[0]


def mixture_model(x, t, y):
    """Class k in {0, 1}: that Gaussian's field; NULL: the equal-weight mixture field."""
    terms = [gaussian_terms(x, t, MUS[k], SIGMAS[k]) for k in range(2)]
    vs = torch.stack([v for v, _ in terms])
    weights = torch.softmax(torch.stack([lp for _, lp in terms]), dim=0)
    v_mix = (weights[..., None] * vs).sum(0)
    v_cls = torch.where((y == 1)[:, None], vs[1], vs[0])
    return torch.where((y == NULL)[:, None], v_mix, v_cls)


def whitened_noise(n, d, seed):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D)
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T


def error(samples, mu, sigma):
    return max((samples.mean(0) - mu).abs().max().item(), (torch.cov(samples.T) - sigma).abs().max().item())


def gauss_error(method, steps, noise, **kw):
    return error(sample(gaussian_model, noise, method=method, steps=steps, **kw), MU, SIGMA)


def test_euler_converges_with_steps():
    noise = whitened_noise(2_000, 3, seed=0)
    coarse, fine = gauss_error("euler", 8, noise), gauss_error("euler", 64, noise)
    assert fine < coarse / 5 and fine < 0.05  # first order: about 8x less


def test_heun_beats_euler_and_converges():
    noise = whitened_noise(2_000, 3, seed=1)
    assert gauss_error("heun", 8, noise) < gauss_error("euler", 8, noise) / 4
    assert gauss_error("heun", 32, noise) < 1e-3


def test_dopri5_matches_target():
    noise = whitened_noise(2_000, 3, seed=2)
    assert gauss_error("dopri5", 1, noise, rtol=1e-7, atol=1e-7) < 1e-5


def test_shifted_grid_converges():
    noise = whitened_noise(2_000, 3, seed=3)
    coarse, fine = gauss_error("euler", 8, noise, shift=2.5), gauss_error("euler", 64, noise, shift=2.5)
    assert fine < coarse / 5 and fine < 0.05


def test_sde_converges_with_steps():
    noise = whitened_noise(40_000, 3, seed=4)
    errs = {s: gauss_error("sde", s, noise, generator=torch.Generator().manual_seed(5)) for s in (8, 64)}
    assert errs[64] < errs[8] / 2 and errs[64] < 0.03
    with_t_min = gauss_error("sde", 64, noise, generator=torch.Generator().manual_seed(5), sde_t_min=0.02)
    assert with_t_min < 0.03


def test_unconditional_mixture_sampler_reaches_mixture():
    """Checks the mixture field used below: it transports noise to the mixture."""
    noise = whitened_noise(20_000, 2, seed=6)
    y = torch.full((20_000,), NULL)
    out = sample(mixture_model, noise, y, method="heun", steps=64)
    mean = MUS.mean(0)
    spread = (MUS - mean).T @ (MUS - mean) / 2
    assert error(out, mean, SIGMAS.mean(0) + spread) < 0.03


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_guidance_scale_one_equals_conditional_sampler(method):
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(7), dtype=D)
    y = torch.arange(512) % 2
    plain = sample(mixture_model, noise, y, method=method, steps=16, generator=torch.Generator().manual_seed(8))
    for guidance in (1.0, GuidanceSchedule([(0.0, 0.5, 1.0), (0.5, 1.0, 1.0)])):
        guided = sample(
            mixture_model, noise, y, method=method, steps=16, guidance=guidance, null_class=NULL,
            generator=torch.Generator().manual_seed(8),
        )
        assert torch.equal(plain, guided)


def test_unconditional_pass_only_inside_guided_segments():
    calls = []

    def counting_model(x, t, y):
        calls.append((t[0].item(), x.shape[0], bool((y == NULL).any())))
        return mixture_model(x, t, y)

    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(9), dtype=D)
    y = torch.arange(64) % 2
    steps = 25  # grid 1, 0.96, ..., 0.72, 0.68, ..., 0.04: 17 points inside [0, 0.7]
    sample(counting_model, noise, y, steps=steps, guidance=GuidanceSchedule.interval(2.5, 0.0, 0.7), null_class=NULL)
    assert len(calls) == steps
    for t, batch, has_null in calls:
        assert has_null == (t <= 0.7)
        assert batch == (128 if t <= 0.7 else 64)
    assert sum(has_null for _, _, has_null in calls) == 17


def test_guided_velocity_formula_and_schedule_lookup():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(32, 2, generator=g, dtype=D)
    y = torch.arange(32) % 2
    sched = GuidanceSchedule.three_part(early=0.9, middle=1.7, late=2.5)
    for t_val, scale in ((0.95, 0.9), (1.0, 0.9), (0.8, 1.7), (0.7, 2.5), (0.3, 2.5), (0.0, 2.5)):
        t = torch.full((32,), t_val, dtype=D)
        v_c, v_u = mixture_model(x, t, y), mixture_model(x, t, torch.full_like(y, NULL))
        got = guided_velocity(mixture_model, x, t, y, NULL, sched)
        assert torch.allclose(got, v_u + scale * (v_c - v_u), atol=1e-12), t_val


def test_guidance_zero_is_unconditional_sampler():
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(11), dtype=D)
    y = torch.arange(256) % 2
    uncond = sample(mixture_model, noise, torch.full_like(y, NULL), steps=12)
    guided = sample(mixture_model, noise, y, steps=12, guidance=0.0, null_class=NULL)
    assert torch.allclose(guided, uncond, atol=1e-12)
    assert not torch.allclose(sample(mixture_model, noise, y, steps=12), uncond, atol=1e-3)


@pytest.mark.parametrize(
    "segments",
    [
        [(0.0, 0.8, 2.0), (0.7, 1.0, 1.0)],  # overlap
        [(0.5, 1.2, 2.0)],  # beyond 1
        [(-0.1, 0.5, 2.0)],  # below 0
        [(0.4, 0.4, 2.0)],  # empty
        [(0.0, 0.5, float("nan"))],
        [(0.0, 0.5)],
    ],
)
def test_invalid_segments_raise(segments):
    with pytest.raises(UserError):
        GuidanceSchedule(segments)


def test_touching_segments_and_either_order_are_valid():
    sched = GuidanceSchedule([(1.0, 0.9, 0.9), (0.0, 0.9, 2.5)])
    assert [(s.t_lo, s.t_hi) for s in sched.segments] == [(0.0, 0.9), (0.9, 1.0)]


def test_sampler_argument_errors(monkeypatch):
    noise = torch.randn(4, 2, dtype=D)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError):
        sample(mixture_model, noise, y, method="rk4")
    with pytest.raises(UserError):
        sample(mixture_model, noise, None, guidance=2.0, null_class=NULL)
    with pytest.raises(UserError):
        sample(mixture_model, noise, y, guidance=2.0)
    with pytest.raises(UserError):
        sample(mixture_model, noise, y, steps=0)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(UserError, match="pip install torchdiffeq"):
        sample(mixture_model, noise, y, method="dopri5")
