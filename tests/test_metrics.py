"""Metrics against closed forms: Frechet distance, sliced Wasserstein, MMD, KID, exact NLL."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.data.toy import GaussianMixture, default_gmm
from difflab.metrics import (
    exact_nll,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mmd,
    sliced_wasserstein,
)

F64 = torch.float64


def _spd(f: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(f, f, dtype=F64, generator=g)
    return a @ a.T / f + 0.1 * torch.eye(f, dtype=F64)


# ----------------------------------------------------------------------------- Frechet
@settings(max_examples=50, deadline=None)
@given(m1=st.floats(-5, 5), m2=st.floats(-5, 5), s1=st.floats(0.01, 5), s2=st.floats(0.01, 5))
def test_frechet_1d_gaussians(m1, m2, s1, s2):
    def t(v):
        return torch.tensor(v, dtype=F64)

    d2 = frechet_distance(t([m1]), t([[s1**2]]), t([m2]), t([[s2**2]]))
    assert d2 == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9, abs=1e-12)


def test_frechet_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, cov = torch.randn(32, dtype=F64, generator=g), _spd(32, g)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_commuting_covariances_closed_form():
    """Diagonal covariances: d^2 = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(10, dtype=F64, generator=g) + 0.1, torch.rand(10, dtype=F64, generator=g)
    m1, m2 = torch.randn(10, dtype=F64, generator=g), torch.randn(10, dtype=F64, generator=g)
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(m1, a.diag(), m2, b.diag()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("f", [3, 16, 64])
def test_frechet_matches_scipy_sqrtm_formula(f):
    g = torch.Generator().manual_seed(f)
    mu1, mu2 = torch.randn(f, dtype=F64, generator=g), torch.randn(f, dtype=F64, generator=g)
    c1, c2 = _spd(f, g), _spd(f, g)
    covmean = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(c1.numpy() + c2.numpy() - 2 * covmean))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its two arguments
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(expected, rel=1e-8)


def test_frechet_rank_deficient_covariance():
    """Features with fewer samples than dimensions give singular covariances; still finite."""
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(10, 20, generator=g), torch.randn(10, 20, generator=g) + 1
    d2 = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    c1, c2 = torch.cov(f1.T.double()).numpy(), torch.cov(f2.T.double()).numpy()
    m1, m2 = f1.double().mean(0).numpy(), f2.double().mean(0).numpy()
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert d2 == pytest.approx(float(ref), rel=1e-5)


def test_feature_statistics_match_numpy():
    x = torch.randn(200, 7, generator=torch.Generator().manual_seed(0))
    mu, cov = feature_statistics(x)
    assert mu.dtype == cov.dtype == F64
    assert np.allclose(mu.numpy(), x.double().numpy().mean(0))
    assert np.allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, cov, mu[:3], cov)


# ----------------------------------------------------------------------------- sliced Wasserstein
@pytest.mark.parametrize("d", [2, 5])
def test_sliced_wasserstein_of_shift_is_norm_over_dimension(d):
    """y = x + m: every projection shifts by theta.m, so W_2^2 = (theta.m)^2 and
    E_theta (theta.m)^2 = |m|^2 / D, with Var = |m|^4 2 (D - 1) / (D^2 (D + 2))."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, generator=g)
    m = torch.randn(d, generator=g)
    p_proj = 4000
    sw2 = sliced_wasserstein(x, x + m, n_projections=p_proj, generator=g) ** 2
    m2 = float(m.double().square().sum())
    se = m2 * math.sqrt(2 * (d - 1) / (d**2 * (d + 2)) / p_proj)
    assert abs(sw2 - m2 / d) <= 5 * se


def test_sliced_wasserstein_identical_sets_is_zero():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(100)]) == pytest.approx(0.0, abs=1e-12)
    # unequal sizes with the same empirical law
    assert sliced_wasserstein(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,m", [(50, 80), (37, 101), (64, 64)])
def test_sliced_wasserstein_1d_matches_scipy_w1(n, m):
    """D = 1: every direction is +-1, so SW_p = W_p; scipy computes W_1 exactly."""
    g = torch.Generator().manual_seed(n + m)
    x, y = torch.randn(n, 1, generator=g), 2 * torch.rand(m, 1, generator=g)
    ref = scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, n_projections=3, p=1) == pytest.approx(ref, rel=1e-9)


def test_sliced_wasserstein_1d_w2_matches_quantile_integral():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, generator=g).double(), torch.randn(70, 1, generator=g).double() + 1
    u = (torch.arange(2_000_000, dtype=F64) + 0.5) / 2_000_000
    qx = x[:, 0].sort().values[(u * 30).floor().long()]
    qy = y[:, 0].sort().values[(u * 70).floor().long()]
    ref = float(((qx - qy) ** 2).mean().sqrt())
    assert sliced_wasserstein(x, y, n_projections=1, p=2) == pytest.approx(ref, rel=1e-5)


def test_sliced_wasserstein_seeded_and_validated():
    x, y = torch.randn(50, 4), torch.randn(60, 4)
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1))
    b = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1))
    assert a == b > 0
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(x, y[:, :3])


# ----------------------------------------------------------------------------- MMD
def _rbf_mmd2_gaussians(delta2: float, s: float, d: int, h: float) -> float:
    """MMD^2 between N(mu1, s^2 I) and N(mu2, s^2 I), k = exp(-|a-b|^2 / (2 h^2)):
    a - b ~ N(mu1 - mu2, 2 s^2 I), E exp(-|z|^2/(2h^2)) = c exp(-|m|^2 / (2(h^2 + 2 s^2)))."""
    c = (h**2 / (h**2 + 2 * s**2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-delta2 / (2 * (h**2 + 2 * s**2))))


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_mmd_unbiased_against_closed_form(shift):
    d, s, bws = 2, 1.0, (0.5, 1.0, 2.0)
    g = torch.Generator().manual_seed(int(shift * 10))
    mu2 = torch.tensor([shift, 0.0])
    vals = []
    for _ in range(40):
        x = s * torch.randn(60, d, generator=g)
        y = s * torch.randn(70, d, generator=g) + mu2
        vals.append(mmd(x, y, bandwidths=bws))
    vals = torch.tensor(vals, dtype=F64)
    expected = sum(_rbf_mmd2_gaussians(shift**2, s, d, h) for h in bws)
    se = float(vals.std() / math.sqrt(len(vals)))
    assert abs(float(vals.mean()) - expected) <= 5 * se


def test_mmd_sign_and_identity():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    same = mmd(x, y)
    shifted = mmd(x, y + torch.tensor([1.0, 0.0]))
    assert abs(same) < 0.01 < shifted
    assert mmd(x, y + 2.0) > shifted
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, y, bandwidths=(0.0,))


def test_mmd_chunking_does_not_change_result():
    """Sets larger than one row block give the same value as a direct computation."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 2, generator=g).double(), torch.randn(1000, 2, generator=g).double()
    bws = (0.5, 1.0, 2.0, 3.0, 4.0)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bws)

    n, m, nh = len(x), len(y), len(bws)
    ref = (
        (k(x, x).sum() - n * nh) / (n * (n - 1))
        + (k(y, y).sum() - m * nh) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )
    assert mmd(x, y, bandwidths=bws) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- KID
def _poly_kernel_mean(mu_a, cov_a, mu_b, cov_b, f):
    """E (X.Y/F + 1)^3 for independent Gaussians X ~ N(mu_a, cov_a), Y ~ N(mu_b, cov_b)."""

    def third(mu, cov):  # E[X_i X_j X_k] of a Gaussian
        return (
            torch.einsum("i,j,k->ijk", mu, mu, mu)
            + torch.einsum("i,jk->ijk", mu, cov)
            + torch.einsum("j,ik->ijk", mu, cov)
            + torch.einsum("k,ij->ijk", mu, cov)
        )

    second_a, second_b = cov_a + torch.outer(mu_a, mu_a), cov_b + torch.outer(mu_b, mu_b)
    e1 = mu_a @ mu_b
    e2 = (second_a * second_b).sum()
    e3 = (third(mu_a, cov_a) * third(mu_b, cov_b)).sum()
    return float(e3 / f**3 + 3 * e2 / f**2 + 3 * e1 / f + 1)


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_kid_unbiased_against_closed_form(shift):
    f = 4
    g = torch.Generator().manual_seed(11)
    cov = _spd(f, g)
    chol = torch.linalg.cholesky(cov)
    mu1, mu2 = torch.zeros(f, dtype=F64), torch.full((f,), shift, dtype=F64)
    expected = (
        _poly_kernel_mean(mu1, cov, mu1, cov, f)
        + _poly_kernel_mean(mu2, cov, mu2, cov, f)
        - 2 * _poly_kernel_mean(mu1, cov, mu2, cov, f)
    )
    vals = []
    for _ in range(200):
        f1 = mu1 + torch.randn(60, f, dtype=F64, generator=g) @ chol.T
        f2 = mu2 + torch.randn(60, f, dtype=F64, generator=g) @ chol.T
        mean, std = kernel_inception_distance(f1, f2, n_subsets=1, subset_size=60, generator=g)
        assert std == 0.0
        vals.append(mean)
    vals = torch.tensor(vals, dtype=F64)
    se = float(vals.std() / math.sqrt(len(vals)))
    assert abs(float(vals.mean()) - expected) <= 5 * se
    if shift == 0.0:
        assert expected == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_seeded_and_validated():
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5
    a = kernel_inception_distance(
        f1, f2, n_subsets=10, subset_size=100, generator=torch.Generator().manual_seed(3)
    )
    b = kernel_inception_distance(
        f1, f2, n_subsets=10, subset_size=100, generator=torch.Generator().manual_seed(3)
    )
    assert a == b and a[0] > 0 and a[1] > 0
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(f1, f2, subset_size=1000)


# ----------------------------------------------------------------------------- exact NLL
def test_exact_nll_of_gaussian_is_entropy():
    """E[-log N(x; mu, Sigma)] under the same Gaussian = 0.5 (D log(2 pi e) + log det Sigma)."""
    g = torch.Generator().manual_seed(0)
    cov = _spd(3, g)
    gauss = GaussianMixture(torch.ones(1), torch.zeros(1, 3), cov[None])
    x = gauss.sample(200_000, g, dtype=F64)
    nll_samples = -gauss.log_prob(x)
    entropy = 0.5 * (3 * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))
    se = float(nll_samples.std()) / math.sqrt(len(x))
    assert abs(exact_nll(x, gauss) - entropy) <= 5 * se


def test_exact_nll_is_mean_negative_log_prob():
    gmm = default_gmm()
    x = gmm.sample(1000, torch.Generator().manual_seed(0))
    assert exact_nll(x, gmm) == pytest.approx(float(-gmm.log_prob(x.double()).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        exact_nll(x[0], gmm)
