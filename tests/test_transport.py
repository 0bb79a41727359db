"""Analytic checks of the interpolant, the time shift and the training loss.

Data is Gaussian N(mu, Sigma) with a full 3x3 covariance, so everything is closed
form: x_t ~ N((1 - t) mu, (1 - t)^2 Sigma + t^2 I), and with u = eps - x0,
E[u | x_t] = -mu + B C_t^{-1} (x_t - m_t) with B = Cov(u, x_t) = t I - (1 - t) Sigma.
That exact field is the "model"; its loss is the irreducible one,
tr(I + Sigma - B C_t^{-1} B) / d per sample.
"""

import math

import pytest
import torch

from fae_pipe.errors import UserError
from fae_pipe.transport import (
    interpolate,
    sample_t,
    shift_factor,
    shift_t,
    time_grid,
    training_loss,
    velocity_target,
    velocity_to_eps,
    velocity_to_score,
    velocity_to_x0,
)

D = torch.float64
MU = torch.tensor([1.0, -0.5, 2.0], dtype=D)
SIGMA = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.8, -0.1], [0.0, -0.1, 0.3]], dtype=D)


class GaussianField:
    """Closed-form quantities of the linear path for N(mu, Sigma) data."""

    def __init__(self, mu, sigma):
        self.mu, self.sigma, self.d = mu, sigma, mu.shape[0]

    def _mats(self, t):
        t = t.reshape(-1, 1, 1)
        eye = torch.eye(self.d, dtype=D)
        cov = (1 - t) ** 2 * self.sigma + t**2 * eye
        cross = t * eye - (1 - t) * self.sigma
        return cov, cross

    def __call__(self, x, t, y=None):
        cov, cross = self._mats(t)
        centred = (x - (1 - t)[:, None] * self.mu).unsqueeze(-1)
        return (cross @ torch.linalg.solve(cov, centred)).squeeze(-1) - self.mu

    def score(self, x, t):
        cov, _ = self._mats(t)
        centred = (x - (1 - t)[:, None] * self.mu).unsqueeze(-1)
        return -torch.linalg.solve(cov, centred).squeeze(-1)

    def irreducible(self, t):
        cov, cross = self._mats(t)
        eye = torch.eye(self.d, dtype=D)
        cond = eye + self.sigma - cross @ torch.linalg.solve(cov, cross)
        return cond.diagonal(dim1=-2, dim2=-1).sum(-1) / self.d


FIELD = GaussianField(MU, SIGMA)


def draw_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(SIGMA)
    return MU + torch.randn(n, 3, generator=g, dtype=D) @ chol.T, g


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_interpolant_marginals(t):
    x0, g = draw_data(200_000, seed=1)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    x_t = interpolate(x0, eps, torch.full((x0.shape[0],), t, dtype=D))
    assert torch.allclose(x_t.mean(0), (1 - t) * MU, atol=0.01)
    target = (1 - t) ** 2 * SIGMA + t**2 * torch.eye(3, dtype=D)
    assert torch.allclose(torch.cov(x_t.T), target, atol=0.015)


def test_velocity_conversions_recover_x0_and_eps():
    x0, g = draw_data(64, seed=2)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    t = torch.rand(64, generator=g, dtype=D)
    t[:2] = torch.tensor([0.0, 1.0], dtype=D)
    x_t, v = interpolate(x0, eps, t), velocity_target(x0, eps)
    assert torch.allclose(velocity_to_x0(x_t, v, t), x0, atol=1e-12)
    assert torch.allclose(velocity_to_eps(x_t, v, t), eps, atol=1e-12)


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_score_from_exact_velocity_matches_gaussian_score(t):
    x, _ = draw_data(256, seed=3)
    tt = torch.full((256,), t, dtype=D)
    got = velocity_to_score(x, FIELD(x, tt), tt)
    assert torch.allclose(got, FIELD.score(x, tt), atol=1e-9)
    if t == 1.0:
        assert torch.allclose(got, -x, atol=1e-12)


def test_score_is_finite_at_t_zero():
    x, _ = draw_data(8, seed=4)
    t = torch.zeros(8, dtype=D)
    assert torch.isfinite(velocity_to_score(x, FIELD(x, t), t)).all()


def test_exact_field_reaches_irreducible_loss_and_beats_perturbations():
    x0, g = draw_data(40_000, seed=5)
    exact = training_loss(FIELD, x0, generator=g)
    assert torch.allclose(exact.loss, exact.per_sample.mean(), rtol=1e-12)
    analytic = FIELD.irreducible(exact.t).mean()
    assert abs(exact.loss.item() - analytic.item()) < 0.02 * analytic.item()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    base = training_loss(FIELD, x0, noise=noise, t=exact.t).loss.item()
    direction = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    perturbed = {
        "offset": lambda x, t, y: FIELD(x, t) + direction,
        "scale": lambda x, t, y: 1.1 * FIELD(x, t),
        "linear_in_x": lambda x, t, y: FIELD(x, t) + 0.1 * x,
        "time_dependent": lambda x, t, y: FIELD(x, t) + 0.2 * (t - 0.5)[:, None],
    }
    for name, fn in perturbed.items():
        worse = training_loss(fn, x0, noise=noise, t=exact.t).loss.item()
        assert worse > base + 1e-3, name


def test_logit_normal_with_shift_loss_and_median():
    x0, g = draw_data(40_000, seed=6)
    a = shift_factor("scalar", 0.4)
    res = training_loss(FIELD, x0, generator=g, time_dist="logit_normal", shift=a)
    assert abs(res.t.median().item() - shift_t(0.5, a)) < 0.01
    analytic = FIELD.irreducible(res.t).mean().item()
    assert abs(res.loss.item() - analytic) < 0.02 * analytic


def test_loss_rejects_wrong_model_output():
    x0, g = draw_data(4, seed=7)
    with pytest.raises(UserError):
        training_loss(lambda x, t, y: x[:, :2], x0, generator=g)


def test_sample_t_distributions():
    g = torch.Generator().manual_seed(8)
    u = sample_t(50_000, g, "uniform", dtype=D)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_t(50_000, g, "logit_normal", mean=1.0, std=0.5, dtype=D)
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item() - 1.0) < 0.01 and abs(logits.std().item() - 0.5) < 0.01
    with pytest.raises(UserError):
        sample_t(4, g, "beta")


def test_shift_identity_monotone_endpoints():
    t = torch.linspace(0, 1, 101, dtype=D)
    assert torch.equal(shift_t(t, 1.0), t)
    for a in (0.2, 0.4, 1.41, 2.5, 7.0):
        s = shift_t(t, a)
        assert s[0] == 0 and s[-1] == 1
        assert (s[1:] > s[:-1]).all()
        assert torch.allclose(shift_t(s, 1 / a), t, atol=1e-12)
        assert (s[1:-1] > t[1:-1]).all() == (a > 1)


def test_shift_modes():
    assert shift_factor("none") == 1.0
    assert shift_factor("dim", latent_dim=4096) == 1.0
    assert shift_factor("dim", latent_dim=16 * 16 * 768) == pytest.approx(math.sqrt(48))
    a = shift_factor("scalar", 0.4)
    assert a == pytest.approx(2.5)
    # The paper's 0.4 applied in the data-at-1 clock u = 1 - t is the same map.
    t = torch.linspace(0, 1, 11, dtype=D)
    u = 1 - t
    assert torch.allclose(shift_t(t, a), 1 - 0.4 * u / (1 + (0.4 - 1) * u), atol=1e-12)
    for bad in (dict(mode="scalar"), dict(mode="scalar", value=0.0), dict(mode="dim"), dict(mode="x")):
        with pytest.raises(UserError):
            shift_factor(**bad)


def test_time_grid():
    g = time_grid(10)
    assert g.shape == (11,) and g[0] == 1 and g[-1] == 0
    assert torch.allclose(g, torch.linspace(1, 0, 11, dtype=D))
    gs = time_grid(10, shift=2.5)
    assert torch.allclose(gs, shift_t(torch.linspace(1, 0, 11, dtype=D), 2.5))
    gm = time_grid(7, shift=2.5, t_end=0.04)
    assert gm[0] == 1 and gm[-1] == 0.04 and (gm[1:] < gm[:-1]).all()
    for bad in (dict(steps=0), dict(steps=4, t_end=1.0), dict(steps=4, shift=-1.0)):
        with pytest.raises(UserError):
            time_grid(**bad)
