"""Toy datasets and the Gaussian mixture: moments, density, posterior mean against oracles."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.data.toy import (
    TOY_DATASETS,
    GaussianMixture,
    default_gmm,
    eight_gaussians_gmm,
    sample_toy,
    toy_density,
)

F64 = torch.float64


def _random_spd(d: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(d, d, dtype=F64, generator=g)
    return scale * (a @ a.T / d + 0.2 * torch.eye(d, dtype=F64))


def _random_mixture(k: int, d: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, dtype=F64, generator=g) + 0.2
    mu = 2 * torch.randn(k, d, dtype=F64, generator=g)
    cov = torch.stack([_random_spd(d, g, 0.5) for _ in range(k)])
    return GaussianMixture(w, mu, cov)


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, n_se: float = 5.0):
    """Sample mean and covariance agree with (mean, cov) within n_se standard errors."""
    x = x.to(F64)
    n = x.shape[0]
    m_hat = x.mean(0)
    se_mean = (x.var(0) / n).sqrt()
    assert ((m_hat - mean).abs() <= n_se * se_mean).all(), (m_hat, mean)
    c = x - mean  # centred at the true mean: E[c_i c_j] = cov_ij
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= n_se * se_cov + 1e-12).all(), (prods.mean(0), cov)


# ----------------------------------------------------------------------------- GaussianMixture
@pytest.mark.parametrize(
    "gmm", [default_gmm(), eight_gaussians_gmm(), _random_mixture(3, 3, seed=1)], ids=repr
)
def test_sample_moments_match_mean_and_covariance(gmm):
    g = torch.Generator().manual_seed(0)
    x = gmm.sample(100_000, g, dtype=F64)
    assert x.shape == (100_000, gmm.dim) and x.dtype == F64
    _assert_moments(x, gmm.mean(), gmm.covariance())


def test_mixture_moments_closed_form_for_eight_gaussians():
    gmm = eight_gaussians_gmm()
    assert torch.allclose(gmm.mean(), torch.zeros(2, dtype=F64), atol=1e-12)
    expected = (1.5**2 / 2 + 0.15**2) * torch.eye(2, dtype=F64)  # ring radius r: E[x^2] = r^2/2
    assert torch.allclose(gmm.covariance(), expected, atol=1e-12)


@pytest.mark.parametrize("gmm", [default_gmm(), eight_gaussians_gmm()], ids=repr)
def test_log_prob_integrates_to_one_on_grid(gmm):
    h = 0.05  # the midpoint rule is spectrally accurate for Gaussians with std >= 2 h
    axis = torch.arange(-6, 6, h, dtype=F64) + h / 2
    grid = torch.cartesian_prod(axis, axis)
    total = gmm.log_prob(grid).exp().sum() * h * h
    assert abs(float(total) - 1.0) < 1e-6


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_log_prob_single_component_equals_gaussian_formula(d, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, dtype=F64, generator=g)
    cov = _random_spd(d, g)
    gmm = GaussianMixture(torch.ones(1), mu[None], cov[None])
    x = 2 * torch.randn(50, d, dtype=F64, generator=g)
    diff = x - mu
    maha = (diff @ torch.linalg.inv(cov) * diff).sum(-1)
    direct = -0.5 * (d * math.log(2 * math.pi) + torch.logdet(cov) + maha)
    assert torch.allclose(gmm.log_prob(x), direct, atol=1e-10)
    # torch.distributions as a second, independent implementation
    ref = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)
    assert torch.allclose(gmm.log_prob(x), ref, atol=1e-10)


def test_log_prob_of_mixture_is_weighted_sum_of_densities():
    gmm = _random_mixture(4, 2, seed=3)
    x = torch.randn(100, 2, dtype=F64)
    dens = sum(
        w * torch.distributions.MultivariateNormal(m, covariance_matrix=c).log_prob(x).exp()
        for w, m, c in zip(gmm.weights, gmm.means, gmm.covariances)
    )
    assert torch.allclose(gmm.log_prob(x), dens.log(), atol=1e-10)
    assert gmm.log_prob(x.float()).dtype == torch.float32


def test_score_is_gradient_of_log_prob():
    gmm = _random_mixture(3, 3, seed=4)
    x = torch.randn(64, 3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x).sum(), x)
    assert torch.allclose(gmm.score(x.detach()), grad, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    d=st.integers(1, 3),
    alpha=st.floats(0.0, 1.5),
    sigma=st.floats(0.05, 2.0),
    seed=st.integers(0, 10_000),
)
def test_posterior_mean_single_gaussian_closed_form(d, alpha, sigma, seed):
    """K = 1: E[x0 | xt] = mu + Cov(x0, xt) Var(xt)^{-1} (xt - E[xt]) (Gaussian conditioning)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, dtype=F64, generator=g)
    cov = _random_spd(d, g)
    gmm = GaussianMixture(torch.ones(1), mu[None], cov[None])
    xt = torch.randn(20, d, dtype=F64, generator=g)
    var_xt = alpha**2 * cov + sigma**2 * torch.eye(d, dtype=F64)
    cross = alpha * cov  # Cov(x0, xt)
    expected = mu + torch.linalg.solve(var_xt, (xt - alpha * mu).T).T @ cross.T
    assert torch.allclose(gmm.x0_posterior_mean(xt, alpha, sigma), expected, atol=1e-9)


def test_posterior_mean_scalar_1d_formula():
    gmm = GaussianMixture(torch.ones(1), torch.tensor([[0.7]]), torch.tensor([[[0.25]]]))
    xt = torch.linspace(-3, 3, 13, dtype=F64)[:, None]
    a, s = 0.6, 0.8
    expected = 0.7 + a * 0.25 / (a**2 * 0.25 + s**2) * (xt - a * 0.7)
    assert torch.allclose(gmm.x0_posterior_mean(xt, a, s), expected, atol=1e-12)


def test_posterior_mean_matches_importance_sampling_for_mixture():
    """Self-normalised importance sampling with the prior as proposal:
    E[x0 | xt] = E_p[x0 N(xt; alpha x0, sigma^2 I)] / E_p[N(xt; alpha x0, sigma^2 I)]."""
    gmm = default_gmm()
    alpha, sigma = 0.8, 0.6
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(200_000, g, dtype=F64)
    xt = torch.tensor([[0.0, 0.0], [-1.0, -0.5], [1.0, 1.0], [1.5, -1.0], [-0.3, 1.2]], dtype=F64)
    exact = gmm.x0_posterior_mean(xt, alpha, sigma)
    for i in range(xt.shape[0]):
        log_w = -((xt[i] - alpha * x0) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(log_w, dim=0)
        est = (w[:, None] * x0).sum(0)
        se = ((w[:, None] ** 2 * (x0 - est) ** 2).sum(0)).sqrt()  # delta-method standard error
        assert ((est - exact[i]).abs() <= 5 * se + 1e-6).all(), (i, est, exact[i], se)


def test_posterior_mean_per_sample_alpha_sigma_matches_scalar_calls():
    gmm = _random_mixture(3, 2, seed=5)
    xt = torch.randn(6, 2, dtype=F64)
    alpha = torch.linspace(0.1, 1.0, 6, dtype=F64)
    sigma = torch.linspace(1.0, 0.1, 6, dtype=F64)
    batched = gmm.x0_posterior_mean(xt, alpha, sigma)
    for i in range(6):
        row = gmm.x0_posterior_mean(xt[i : i + 1], float(alpha[i]), float(sigma[i]))
        assert torch.allclose(batched[i], row[0], atol=1e-12)
    zero_dim = gmm.x0_posterior_mean(xt, torch.tensor(0.5), torch.tensor(0.7))
    assert torch.allclose(zero_dim, gmm.x0_posterior_mean(xt, 0.5, 0.7), atol=1e-14)
    with pytest.raises(ValueError, match="alpha"):
        gmm.x0_posterior_mean(xt, torch.ones(4), 0.5)


@settings(max_examples=10, deadline=None)
@given(alpha=st.floats(0.1, 1.5), sigma=st.floats(0.05, 2.0))
def test_tweedie_identity_links_posterior_mean_and_noised_score(alpha, sigma):
    """Tweedie: alpha E[x0 | xt] = xt + sigma^2 grad log p_t(xt) for xt = alpha x0 + sigma eps."""
    gmm = _random_mixture(3, 2, seed=6)
    xt = 2 * torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    lhs = alpha * gmm.x0_posterior_mean(xt, alpha, sigma)
    rhs = xt + sigma**2 * gmm.noised(alpha, sigma).score(xt)
    assert torch.allclose(lhs, rhs, atol=1e-8)


def test_posterior_mean_limits():
    gmm = default_gmm()
    xt = torch.randn(10, 2, dtype=F64)
    assert torch.allclose(gmm.x0_posterior_mean(xt, 1.0, 0.0), xt, atol=1e-12)  # no noise
    prior_mean = gmm.mean().expand(10, 2)
    assert torch.allclose(gmm.x0_posterior_mean(xt, 0.0, 1.0), prior_mean, atol=1e-12)
    assert gmm.x0_posterior_mean(xt.float(), 0.5, 0.5).dtype == torch.float32


def test_noised_matches_monte_carlo_moments():
    gmm = default_gmm()
    alpha, sigma = 0.7, 0.5
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(100_000, g, dtype=F64)
    xt = alpha * x0 + sigma * torch.randn(x0.shape, dtype=F64, generator=g)
    noisy = gmm.noised(alpha, sigma)
    _assert_moments(xt, noisy.mean(), noisy.covariance())
    # and the closed form of those moments: alpha^2 Cov + sigma^2 I
    expected_cov = alpha**2 * gmm.covariance() + sigma**2 * torch.eye(2, dtype=F64)
    assert torch.allclose(noisy.covariance(), expected_cov, atol=1e-12)


def test_noised_log_prob_matches_histogram():
    gmm = eight_gaussians_gmm()
    noisy = gmm.noised(0.9, 0.3)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    xt = 0.9 * gmm.sample(n, g, dtype=F64) + 0.3 * torch.randn(n, 2, dtype=F64, generator=g)
    h = 0.5
    edges = np.arange(-2.5, 2.5 + h / 2, h)
    counts, _, _ = np.histogram2d(xt[:, 0].numpy(), xt[:, 1].numpy(), bins=[edges, edges])
    centres = torch.tensor((edges[:-1] + edges[1:]) / 2, dtype=F64)
    # cell probability by a 10 x 10 midpoint rule inside each cell
    sub = (torch.arange(10, dtype=F64) + 0.5) / 10 * h - h / 2
    offsets = torch.cartesian_prod(sub, sub)
    cells = torch.cartesian_prod(centres, centres)
    pts = (cells[:, None, :] + offsets[None]).reshape(-1, 2)
    prob = noisy.log_prob(pts).exp().reshape(len(cells), -1).mean(1) * h * h
    expected = torch.tensor(counts.reshape(-1), dtype=F64) / n
    se = (prob * (1 - prob) / n).sqrt()
    assert ((expected - prob).abs() <= 5 * se + 1e-4).all()


def test_mixture_validation_errors():
    eye = torch.eye(2).expand(2, 2, 2)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.stack([torch.eye(2), -eye[0]]))
    with pytest.raises(ValueError, match="shapes"):
        GaussianMixture(torch.ones(3), torch.zeros(2, 2), eye)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixture(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), eye)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        default_gmm().log_prob(torch.zeros(4, 3))


def test_weights_are_normalised():
    a = GaussianMixture(torch.tensor([2.0, 6.0]), torch.zeros(2, 1), torch.ones(2, 1, 1))
    assert torch.allclose(a.weights, torch.tensor([0.25, 0.75], dtype=F64))


# ----------------------------------------------------------------------------- toy datasets
def _quadrature_moments(curve, lo, hi, noise_std, n=50_001):
    """Mean and covariance of curve(u) + noise_std N(0, I), u ~ U(lo, hi), by the midpoint rule."""
    u = lo + (torch.arange(n, dtype=F64) + 0.5) * (hi - lo) / n
    pts = curve(u)
    mean = pts.mean(0)
    c = pts - mean
    return mean, c.T @ c / n + noise_std**2 * torch.eye(2, dtype=F64)


def _expected_moments(name):
    """Moments of each dataset's documented law (independent of the sampling code)."""
    if name == "swissroll":
        c = 2 / (3 * math.pi)
        return _quadrature_moments(
            lambda t: torch.stack([t * t.cos() - 2, t * t.sin() - c], 1) / 6,
            1.5 * math.pi,
            4.5 * math.pi,
            0.1,
        )
    if name == "moons":
        m_out, c_out = _quadrature_moments(
            lambda u: torch.stack([u.cos(), u.sin()], 1), 0, math.pi, 0.0
        )
        m_in, c_in = _quadrature_moments(
            lambda u: torch.stack([1 - u.cos(), 0.5 - u.sin()], 1), 0, math.pi, 0.0
        )
        mean = 0.5 * (m_out + m_in)  # equal mixture: law of total covariance
        d = (m_out - m_in)[:, None]
        cov = 0.5 * (c_out + c_in) + 0.25 * d @ d.T + 0.01 * torch.eye(2, dtype=F64)
        return mean - torch.tensor([0.5, 0.25], dtype=F64), cov
    if name == "checkerboard":  # uniform marginals on [-2, 2]; E[xy] = mean of centre products
        return torch.zeros(2, dtype=F64), torch.tensor([[4 / 3, 0.25], [0.25, 4 / 3]], dtype=F64)
    gmm = toy_density(name)
    return gmm.mean(), gmm.covariance()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_dataset_shape_dtype_and_moments(name):
    x = sample_toy(name, 100_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (100_000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    mean, cov = _expected_moments(name)
    assert mean.abs().max() < 1e-6  # every toy law is exactly zero-mean
    assert ((cov.diagonal() > 0.2) & (cov.diagonal() < 2.0)).all()  # order-one coordinates
    _assert_moments(x, mean, cov)


def test_documented_toy_variances():
    _, cov = _expected_moments("swissroll")
    assert torch.allclose(cov.diagonal(), torch.tensor([1.228, 1.352], dtype=F64), atol=1e-3)
    _, cov = _expected_moments("moons")
    assert torch.allclose(
        cov,
        torch.tensor(
            [[0.76, 0.125 - 1 / math.pi], [0.125 - 1 / math.pi, 0.5725 - 1 / math.pi]], dtype=F64
        ),
        atol=1e-6,
    )


def test_checkerboard_support():
    x = sample_toy("checkerboard", 5_000, generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 2
    cells = x.floor().long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_dataset_seed_reproduces(name):
    a = sample_toy(name, 500, generator=torch.Generator().manual_seed(123))
    b = sample_toy(name, 500, generator=torch.Generator().manual_seed(123))
    c = sample_toy(name, 500, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gmm_dataset_samples_default_gmm():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample_toy("gmm", 100, generator=g1), default_gmm().sample(100, g2))


def test_toy_errors():
    with pytest.raises(ValueError, match="swissroll, moons, 8gaussians, checkerboard, gmm"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="n must be"):
        sample_toy("moons", -1)
    with pytest.raises(ValueError, match="'8gaussians', 'gmm'"):
        toy_density("moons")
    assert sample_toy("gmm", 0).shape == (0, 2)


def test_the_toy_name_type_lists_the_toy_sources():
    """ToyName (for type checkers) names exactly the entries of TOY_SOURCES, in order."""
    from typing import get_args

    from difflab.data.toy import TOY_SOURCES, ToyName

    assert get_args(ToyName) == TOY_DATASETS == tuple(TOY_SOURCES)
