"""Tests for fae_pipe.metrics: Frechet numerics, PRDC, PSNR/LPIPS, FID Inception, linear probe.

Every test runs with the network disabled (socket connect/getaddrinfo raise), so a
metric that tried to download weights would fail here instead of passing by luck.
"""

import logging
import socket
import warnings

import lpips
import mpmath
import numpy as np
import pytest
import torch
import torchvision

from fae_pipe.errors import UserError
from fae_pipe.metrics.frechet import (
    RunningStats, feature_stats, frechet_distance, load_stats_npz, save_stats_npz, trace_sqrt_product,
)
from fae_pipe.metrics.image import build_lpips, lpips_distance, psnr, psnr_per_image
from fae_pipe.metrics.inception import (
    FID_WEIGHTS_FILENAME, build_fid_inception_architecture, inception_features, inception_score, load_fid_inception,
)
from fae_pipe.metrics.prdc import prdc
from fae_pipe.metrics.probe import fixed_split, linear_probe
from fae_pipe.metrics.weights import MetricUnavailable


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a metrics test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- Frechet


def test_identical_gaussians_give_zero():
    x = np.random.default_rng(0).normal(size=(300, 24)) * np.linspace(0.1, 5.0, 24)
    mu, sigma = feature_stats(x)
    scale = float(np.trace(sigma))
    assert abs(trace_sqrt_product(sigma, sigma) - scale) < 1e-10 * scale
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-8 * scale


def test_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    a, b = rng.uniform(0.01, 4.0, 32), rng.uniform(0.01, 4.0, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def _low_rank_reference(x, y):
    """High-precision FD for covariances from few samples.

    With centred data A (n, D), B (m, D): S1 S2 = A^T A B^T B / ((n-1)(m-1)), whose
    non-zero eigenvalues are the squared singular values of A B^T / sqrt((n-1)(m-1)),
    so tr sqrt(S1 S2) is the nuclear norm of that small n x m matrix (mpmath, 40 digits).
    """
    mpmath.mp.dps = 40
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    small = mpmath.matrix((a @ b.T).tolist()) / mpmath.sqrt((len(x) - 1) * (len(y) - 1))
    tr_sqrt = sum(mpmath.svd_r(small, compute_uv=False))
    tr1 = mpmath.fsum(mpmath.mpf(v) ** 2 for v in a.ravel()) / (len(x) - 1)
    tr2 = mpmath.fsum(mpmath.mpf(v) ** 2 for v in b.ravel()) / (len(y) - 1)
    mean_gap = mpmath.fsum((mpmath.mpf(u) - mpmath.mpf(v)) ** 2 for u, v in zip(x.mean(0), y.mean(0)))
    return float(tr_sqrt), float(mean_gap + tr1 + tr2 - 2 * tr_sqrt)


def test_rank_deficient_covariance_matches_high_precision_reference():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 64)) * rng.uniform(0.01, 3.0, 64)
    y = rng.normal(size=(10, 64)) + 0.05
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    assert np.linalg.matrix_rank(s1) == 9
    ref_tr, ref_fd = _low_rank_reference(x, y)
    assert trace_sqrt_product(s1, s2) == pytest.approx(ref_tr, rel=1e-11)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got >= 0.0
    assert got == pytest.approx(ref_fd, rel=1e-11)


def test_frechet_is_symmetric():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 20)), rng.normal(size=(15, 20)) * 2 + 1
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-11)


def test_running_stats_match_one_shot_with_large_offset():
    x = 1e4 + np.random.default_rng(4).normal(size=(250, 8))
    stats = RunningStats()
    for start in range(0, 250, 37):
        stats.update(torch.from_numpy(x[start:start + 37]))
    mu, sigma = stats.finalize()
    assert stats.count == 250
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_frechet_input_errors(tmp_path):
    with pytest.raises(UserError, match="different feature dims"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="at least 2"):
        RunningStats().finalize()
    save_stats_npz(tmp_path / "ref.npz", np.ones(3), 2 * np.eye(3))
    mu, sigma = load_stats_npz(tmp_path / "ref.npz")
    assert frechet_distance(mu, sigma, np.ones(3), 2 * np.eye(3)) < 1e-12
    np.savez(tmp_path / "bad.npz", m=np.ones(3))
    with pytest.raises(UserError, match="missing arrays"):
        load_stats_npz(tmp_path / "bad.npz")


# ---------------------------------------------------------------- precision / recall


def test_prdc_identical_and_disjoint_sets():
    real = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    same = prdc(real, real.clone(), k=3, chunk_size=64)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, real + 1000.0, k=3, chunk_size=64)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_computed_configuration():
    # k=1 in 1-D. Real radii: 0->1, 1->1, 3->2, 7->4, 30->1, 31->1.
    # Fake radii: 0.5->3.5, 4->3.5, 12->8, 20->8.
    # Fakes inside real balls: 0.5 (balls of 0 and 1), 4 (balls of 3 and 7); 12, 20 none.
    # Reals inside fake balls: 0, 1, 3 (ball of 0.5), 7 (ball of 4); 30, 31 none.
    real = np.array([[0.0], [1.0], [3.0], [7.0], [30.0], [31.0]])
    fake = np.array([[0.5], [4.0], [12.0], [20.0]])
    for chunk in (2, 1024):
        got = prdc(real, fake, k=1, chunk_size=chunk, dtype=torch.float64)
        assert got["precision"] == pytest.approx(2 / 4)
        assert got["recall"] == pytest.approx(4 / 6)
        assert got["density"] == pytest.approx(4 / 4)
        assert got["coverage"] == pytest.approx(4 / 6)
    with pytest.raises(UserError, match="k=6"):
        prdc(real, fake, k=6)


# ---------------------------------------------------------------- PSNR / LPIPS


def test_psnr_known_values_and_ranges():
    target = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    pred = torch.stack([torch.full((3, 4, 4), 0.1, dtype=torch.float64), torch.full((3, 4, 4), 0.01, dtype=torch.float64)])
    np.testing.assert_allclose(psnr_per_image(pred, target).numpy(), [20.0, 40.0], rtol=1e-12)
    assert psnr(pred, target) == pytest.approx(30.0, rel=1e-12)
    as_uint8 = (torch.rand(1, 3, 8, 8) * 255).round().to(torch.uint8)
    other = (torch.rand(1, 3, 8, 8) * 255).round().to(torch.uint8)
    assert psnr(as_uint8, other) == pytest.approx(psnr(as_uint8.double() / 255, other.double() / 255), rel=1e-12)
    assert psnr(as_uint8, as_uint8) == float("inf")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        psnr(pred * 2 - 1, target)


def test_lpips_random_backbone_warns_and_is_quiet(caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="fae_pipe.metrics.image"):
        model = build_lpips("random")
    assert "meaningless" in caplog.text
    assert capsys.readouterr().out == ""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lpips_distance(model, x, x), torch.zeros(2), atol=1e-7)
    assert (lpips_distance(model, x, x.flip(0)) > 0).all()


def test_lpips_loads_backbone_from_torch_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable, match="vgg16-397923af.pth") as info:
        build_lpips("vgg")
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    model = build_lpips("alex")
    assert capsys.readouterr().out == ""
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    d = lpips_distance(model, x, x.flip(0))
    assert torch.isfinite(d).all() and (d > 0).all()
    # lpips' own pretrained path reads the same cached file: both must agree.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated pretrained=
        native = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(d, native(x, x.flip(0), normalize=True).flatten())


# ---------------------------------------------------------------- FID Inception


def test_fid_inception_requires_a_local_file(tmp_path):
    with pytest.raises(MetricUnavailable, match="no Inception weights configured"):
        load_fid_inception(None)
    missing = tmp_path / "nowhere" / FID_WEIGHTS_FILENAME
    with pytest.raises(MetricUnavailable, match=str(missing)):
        load_fid_inception(missing)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not match"):
        load_fid_inception(tmp_path / "wrong.pth")


def test_fid_inception_features_from_local_file_match_pytorch_fid(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(build_fid_inception_architecture().net.state_dict(), path)
    model = load_fid_inception(path)

    images = torch.randint(0, 256, (2, 40, 40, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    pool, logits = inception_features(images, model, batch=2)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and pool.std() > 0
    again, _ = inception_features(images[:1].permute(0, 3, 1, 2), model, batch=1)
    torch.testing.assert_close(again, pool[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, pool @ model.net.fc.weight.t(), rtol=1e-4, atol=1e-5)

    # pytorch-fid's own wrapper finds the same file in the torch hub cache (no download).
    from pytorch_fid.inception import InceptionV3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = InceptionV3([3]).eval()
    with torch.no_grad():
        ref_pool = reference(images[:1].permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1)
    torch.testing.assert_close(pool[:1], ref_pool, rtol=1e-4, atol=1e-5)


def test_inception_score_closed_forms():
    uniform = torch.zeros(40, 1008)
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = 60.0 * torch.nn.functional.one_hot(torch.arange(40) % 10, 1008).double()
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-9) and std < 1e-9
    with pytest.raises(UserError, match="splits"):
        inception_score(uniform, splits=41)


# ---------------------------------------------------------------- linear probe


def test_fixed_split_is_deterministic_and_disjoint():
    train, hold = fixed_split(100, 0.2, seed=7)
    train2, hold2 = fixed_split(100, 0.2, seed=7)
    assert np.array_equal(train, train2) and np.array_equal(hold, hold2)
    assert len(hold) == 20 and sorted(np.concatenate([train, hold]).tolist()) == list(range(100))
    assert not np.array_equal(fixed_split(100, 0.2, seed=8)[1], hold)


def _blobs(n, dim, classes, seed, separation):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = rng.integers(0, classes, n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def test_probe_separable_classes_reach_full_accuracy():
    x, y = _blobs(300, 16, 4, seed=0, separation=6.0)
    train, hold = fixed_split(300, 0.3, seed=0)
    result = linear_probe(x, y, train, hold, max_iter=50)
    assert result.test_accuracy >= 0.98 and result.num_test == 90 and result.num_classes == 4
    assert linear_probe(x, y, train, hold, max_iter=50) == result


def test_probe_random_labels_stay_near_chance():
    x, _ = _blobs(400, 16, 4, seed=1, separation=6.0)
    y = np.random.default_rng(2).integers(0, 4, 400)
    train, hold = fixed_split(400, 0.5, seed=0)
    assert linear_probe(x, y, train, hold, max_iter=50).test_accuracy < 0.4
