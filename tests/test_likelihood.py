"""Likelihood math: KL and discretised likelihood against Monte Carlo / scipy, the named VLB
terms against closed forms, and the full VLB and the probability-flow ODE NLL against the exact
answers for Gaussian data with the exact Gaussian denoiser."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from difflab.data.toy import GaussianMixture
from difflab.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    mean_and_stderr,
    normal_kl,
    prior_kl,
    vlb,
    vlb_term,
)
from difflab.ode_likelihood import pf_ode_nll
from difflab.oracles import GaussianDenoiser as ExactGaussianDenoiser
from difflab.oracles import GMMDenoiser
from difflab.parameterization import Prediction
from difflab.schedules import DiscreteSchedule, EDMSchedule

F64 = torch.float64


def _matmul(x, M):
    """x @ M for a small M by broadcasting (tiny BLAS calls are slow on a busy machine)."""
    return (x[:, :, None] * M).sum(1)


class GaussianDenoiser:
    """Exact E[x0 | xt] for x0 ~ N(m, C): m + alpha C (alpha^2 C + sigma^2 I)^-1 (xt - alpha m),
    applied in the eigenbasis C = Q diag(c) Q^T."""

    def __init__(self, m, C, schedule, var_frac=None):
        self.m, self.schedule, self.var_frac = m, schedule, var_frac
        self.c, self.Q = torch.linalg.eigh(C)

    def __call__(self, xt, t, cond=None):
        t = torch.as_tensor(t, dtype=F64).cpu().expand(xt.shape[0])
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = alpha.to(xt.dtype)[:, None], sigma.to(xt.dtype)[:, None]
        gain = a * self.c / (a**2 * self.c + s**2)
        x0 = self.m + _matmul(_matmul(xt - a * self.m, self.Q) * gain, self.Q.T)
        return Prediction(x0=x0, eps=(xt - a * x0) / s, var_frac=self.var_frac)


class OracleDenoiser:
    """Knows the clean data: x0_hat = x0 exactly (the true posterior mean)."""

    def __init__(self, x0, schedule, var_frac=None):
        self.x0, self.schedule, self.var_frac = x0, schedule, var_frac

    def __call__(self, xt, t, cond=None):
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=F64))
        shape = (-1, *([1] * (xt.ndim - 1)))
        eps = (xt - alpha.reshape(shape) * self.x0) / sigma.reshape(shape)
        vf = None if self.var_frac is None else torch.full_like(xt, self.var_frac)
        return Prediction(x0=self.x0, eps=eps, var_frac=vf)


def _gaussian_data(n, seed=0):
    m = torch.tensor([0.5, -0.3], dtype=F64)
    C = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x0 = m + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(C).T
    return m, C, x0, g


def _log_normal_pdf(x, m, C):
    return torch.distributions.MultivariateNormal(m, C).log_prob(x)


# ---- building blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0), (2, 4, 0, 0.3)]
)
def test_normal_kl_matches_monte_carlo(m1, v1, m2, v2):
    g = torch.Generator().manual_seed(1)
    x = m1 + math.sqrt(v1) * torch.randn(400_000, generator=g, dtype=F64)
    lv1, lv2 = torch.tensor(math.log(v1), dtype=F64), torch.tensor(math.log(v2), dtype=F64)
    log_ratio = gaussian_log_likelihood(x, m1, lv1) - gaussian_log_likelihood(x, m2, lv2)
    mc, se = mean_and_stderr(log_ratio)
    kl = float(normal_kl(torch.tensor(m1, dtype=F64), lv1, torch.tensor(m2, dtype=F64), lv2))
    assert abs(kl - mc) < 5 * se + 1e-12


@settings(max_examples=60, deadline=None)
@given(m=st.floats(-5, 5), lv=st.floats(-8, 4), dm=st.floats(-3, 3), dlv=st.floats(-3, 3))
def test_normal_kl_is_nonnegative_and_zero_only_at_equality(m, lv, dm, dlv):
    a = torch.tensor([m], dtype=F64)
    la = torch.tensor([lv], dtype=F64)
    assert float(normal_kl(a, la, a, la)) == pytest.approx(0.0, abs=1e-12)
    kl = float(normal_kl(a, la, a + dm, la + dlv))
    assert kl >= -1e-12
    if abs(dm) > 1e-3 or abs(dlv) > 1e-3:
        assert kl > 0


def test_gaussian_log_likelihood_matches_scipy():
    x = torch.linspace(-4, 4, 17, dtype=F64)
    mean, logvar = torch.tensor(0.7, dtype=F64), torch.tensor(math.log(1.7), dtype=F64)
    expected = stats.norm(0.7, math.sqrt(1.7)).logpdf(x.numpy())
    assert torch.allclose(gaussian_log_likelihood(x, mean, logvar), torch.from_numpy(expected))


@pytest.mark.parametrize("bins", [256, 16, 2])
@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.93, 1e-3), (-0.2, 1e-5), (3.0, 0.2), (0, 8)])
def test_discretized_likelihood_sums_to_one(bins, mean, scale):
    levels = torch.linspace(-1, 1, bins, dtype=F64)
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.tensor(mean, dtype=F64), torch.tensor(math.log(scale), dtype=F64), bins=bins
    )
    assert torch.isfinite(log_p).all()
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_matches_cdf_differences_and_logvar_form():
    levels = torch.linspace(-1, 1, 256, dtype=F64)
    mean, scale = 0.1, 0.3
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.tensor(mean, dtype=F64), logvar=torch.tensor(2 * math.log(scale), dtype=F64)
    )
    d = 1 / 255
    cdf = stats.norm(mean, scale).cdf
    upper = cdf(levels.numpy() + d)
    lower = cdf(levels.numpy() - d)
    upper[-1], lower[0] = 1.0, 0.0
    assert torch.allclose(log_p, torch.from_numpy(upper - lower).log(), rtol=1e-9, atol=1e-9)
    # far in a tail: finite, and equal to scipy's log survival-function difference
    x = torch.tensor([0.5], dtype=F64)
    mu, log_s = torch.tensor(-0.9, dtype=F64), torch.tensor(math.log(0.05), dtype=F64)
    far = discretized_gaussian_log_likelihood(x, mu, log_s)
    ls = stats.norm(-0.9, 0.05).logsf
    expected = ls(0.5 - d) + math.log1p(-math.exp(ls(0.5 + d) - ls(0.5 - d)))
    assert float(far) == pytest.approx(expected, rel=1e-9)


def test_discretized_likelihood_needs_exactly_one_scale():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="exactly one"):
        discretized_gaussian_log_likelihood(x, x)
    with pytest.raises(ValueError, match="exactly one"):
        discretized_gaussian_log_likelihood(x, x, x, logvar=x)


def test_bits_per_dim_offset_links_density_and_discrete_probability():
    # for a smooth density the probability of a 256-level bin is density * 2/255, so the
    # bits/dim of -log p(x) with the offset equal those of the discretised probability
    x = torch.linspace(-0.5, 0.5, 41, dtype=F64)
    mean, logvar = torch.tensor(0.1, dtype=F64), torch.tensor(math.log(0.3**2), dtype=F64)
    cont = -gaussian_log_likelihood(x, mean, logvar)
    disc = -discretized_gaussian_log_likelihood(x, mean, logvar=logvar)
    assert torch.allclose(bits_per_dim(cont, 1, bins=256), disc / math.log(2), atol=1e-4)
    assert float(bits_per_dim(torch.tensor(6 * math.log(2)), 3)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0)


def test_mean_and_stderr():
    v = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_and_stderr(v)
    assert mean == pytest.approx(3.5)
    assert se == pytest.approx(stats.sem(v.numpy()))


# ---- named VLB terms -------------------------------------------------------------------------


def test_prior_kl_closed_form():
    sched = DiscreteSchedule.from_name("linear", 100)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ab = float(sched.alpha_bar[-1])
    # KL(N(mu, v) || N(0, 1)) = (v + mu^2 - 1 - log v) / 2 per dimension
    expected = 0.5 * (ab * x0**2 + (1 - ab) - 1 - math.log(1 - ab)).sum(1)
    assert torch.allclose(prior_kl(x0, sched), expected, rtol=1e-12)


def _beta_tilde(sched, t):
    ab = sched.alpha_bar
    return float((1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t - 1])  # Eq. 7 [Ho 2020]


@pytest.mark.parametrize("t", [2, 37, 100])
def test_vlb_term_identities_with_the_true_posterior_mean(t):
    sched = DiscreteSchedule.from_name("cosine", 100)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, generator=g, dtype=F64)
    dims = x0.shape[1]
    bt, beta = _beta_tilde(sched, t), float(sched.betas[t - 1])
    kw = dict(decoder="gaussian", generator=g)
    # p = q exactly: small variance is the posterior variance and the mean is exact
    small = vlb_term(OracleDenoiser(x0, sched), x0, t, sched, variance="small", **kw)
    assert torch.allclose(small, torch.zeros(6, dtype=F64), atol=1e-9)
    # same mean, variance beta_t: KL = D/2 (r - 1 - log r) with r = beta-tilde / beta
    r = bt / beta
    large = vlb_term(OracleDenoiser(x0, sched), x0, t, sched, variance="large", **kw)
    assert torch.allclose(large, torch.full((6,), 0.5 * dims * (r - 1 - math.log(r)), dtype=F64))
    # learned: v = 0 -> beta-tilde, v = 1 -> beta, v = 1/2 -> geometric mean
    for frac, var in [(0.0, bt), (1.0, beta), (0.5, math.sqrt(bt * beta))]:
        den = OracleDenoiser(x0, sched, var_frac=frac)
        got = vlb_term(den, x0, t, sched, variance="learned", **kw)
        r = bt / var
        assert torch.allclose(got, torch.full((6,), 0.5 * dims * (r - 1 - math.log(r)), dtype=F64))


def test_decoder_terms_with_the_true_x0():
    sched = DiscreteSchedule.from_name("linear", 1000)
    x0 = torch.tensor([[-1.0, 1.0, 0.0, 3 / 255]], dtype=F64)
    v = _beta_tilde(sched, 2)  # beta-tilde_1 = 0 is replaced by beta-tilde_2
    den = OracleDenoiser(x0, sched)
    gauss = vlb_term(den, x0, 1, sched, variance="small", decoder="gaussian")
    assert float(gauss) == pytest.approx(0.5 * 4 * math.log(2 * math.pi * v), rel=1e-10)
    large = vlb_term(den, x0, 1, sched, variance="large", decoder="gaussian")
    assert float(large) == pytest.approx(float(gauss), rel=1e-12)  # also beta-tilde_2 at t = 1
    disc = vlb_term(den, x0, 1, sched, variance="small", decoder="discretized")
    half = (1 / 255) / math.sqrt(v)
    edge = -stats.norm.logcdf(half)  # the edge bins extend to infinity
    inner = -math.log(stats.norm.cdf(half) - stats.norm.cdf(-half))
    assert float(disc) == pytest.approx(2 * edge + 2 * inner, rel=1e-9)


def test_vlb_term_with_mixed_steps_equals_separate_calls():
    sched = DiscreteSchedule.from_name("linear", 50)
    m, C, x0, _ = _gaussian_data(4)
    den = GaussianDenoiser(m, C, sched)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    t = torch.tensor([1.0, 2.0, 30.0, 50.0])
    kw = dict(variance="large", decoder="gaussian")
    mixed = vlb_term(den, x0, t, sched, noise=noise, **kw)
    for i in range(4):
        one = vlb_term(den, x0[i : i + 1], t[i], sched, noise=noise[i : i + 1], **kw)
        assert float(mixed[i]) == pytest.approx(float(one), rel=1e-12)


def test_vlb_rejects_bad_arguments():
    sched = DiscreteSchedule.from_name("linear", 10)
    x0 = torch.zeros(2, 2, dtype=F64)
    den = OracleDenoiser(x0, sched)
    with pytest.raises(ValueError, match="small, large, learned"):
        vlb_term(den, x0, 3, sched, variance="big")
    with pytest.raises(ValueError, match="1..10"):
        vlb_term(den, x0, 11, sched)
    with pytest.raises(ValueError, match="learned_variance"):
        vlb_term(den, x0, 3, sched, variance="learned")
    with pytest.raises(ValueError, match="DiscreteSchedule"):
        prior_kl(x0, EDMSchedule())


# ---- the full bound for Gaussian data ----------------------------------------------------------


def _analytic_vlb(m, C, sched):
    """Expected VLB terms two ways, for x0 ~ N(m, C), the exact mean and small variances.

    Route 1 (term by term): E L_T, E L_{t-1} = c_t^2 tr Cov(x0|xt) / (2 beta-tilde_t), E L_0.
    Route 2 (chain rule): E VLB = H(x0) + KL(q(x_{0:T}) || p(x_{0:T})), the KL being the prior
    mismatch plus the covariance mismatch of each reverse step (the means are exact).
    """
    c = torch.linalg.eigvalsh(C)
    D, T = c.numel(), sched.T
    ab, betas = sched.alpha_bar, sched.betas
    bt = [None] + [_beta_tilde(sched, t) for t in range(1, T + 1)]
    v1 = bt[2]

    def post_var(t):  # eigenvalues of Cov(x0 | x_t)
        return c * (1 - ab[t]) / (ab[t] * c + 1 - ab[t])

    coef = [None] + [float(ab[t - 1].sqrt() * betas[t - 1] / (1 - ab[t])) for t in range(1, T + 1)]
    e_prior = 0.5 * float(D * (1 - ab[T]) + ab[T] * (m @ m + c.sum()) - D - D * (1 - ab[T]).log())
    e_terms = [float(coef[t] ** 2 * post_var(t).sum() / (2 * bt[t])) for t in range(2, T + 1)]
    e_dec = 0.5 * D * math.log(2 * math.pi * v1) + float(post_var(1).sum()) / (2 * v1)
    route1 = {"prior": e_prior, "diffusion": sum(e_terms), "decoder": e_dec}

    entropy = 0.5 * float(torch.log(2 * math.pi * math.e * c).sum())
    sig_T = ab[T] * c + 1 - ab[T]
    gap = 0.5 * float(sig_T.sum() + ab[T] * (m @ m) - D - sig_T.log().sum())
    for t in range(2, T + 1):
        rho = 1 + coef[t] ** 2 * post_var(t) / bt[t]
        gap += 0.5 * float((rho - 1 - rho.log()).sum())
    rho = post_var(1) / v1
    gap += 0.5 * float((rho - 1 - rho.log()).sum())
    return route1, entropy, gap


def test_full_vlb_of_gaussian_data_is_an_upper_bound_with_the_predicted_gap():
    sched = DiscreteSchedule.from_name("linear", 1000)
    m, C, x0, g = _gaussian_data(1000, seed=4)
    route1, entropy, gap = _analytic_vlb(m, C, sched)
    # the two analytic routes agree: E VLB = H + KL >= H
    assert sum(route1.values()) == pytest.approx(entropy + gap, rel=1e-10)
    # Band: near the data beta_t / (1 - alpha_bar_{t-1}) ~ 1/(t-1), so step t adds about
    # (x - log(1 + x)) / 2 per dimension with x = 1/(t-1); these sum to Euler's gamma / 2. The
    # decoder's variance mismatch and the later steps add less than half a nat per dimension.
    D, euler_gamma = 2, 0.5772156649
    assert D * euler_gamma / 2 < gap < D * (euler_gamma / 2 + 0.5)
    out = vlb(GaussianDenoiser(m, C, sched), x0, sched, decoder="gaussian", generator=g)
    for name in ("prior", "diffusion", "decoder"):
        mean, se = mean_and_stderr(out[name])
        assert abs(mean - route1[name]) < 4 * se + 1e-9, name
    # per-sample gap VLB(x0) + log q(x0): its mean is the KL, and it is a bound on average
    per_sample_gap = out["total"] + _log_normal_pdf(x0, m, C)
    mean, se = mean_and_stderr(per_sample_gap)
    assert abs(mean - gap) < 4 * se
    assert mean > -4 * se
    assert out["terms"].shape == (1000, 1000) and bool((out["t"][:, 0] == 1).all())


def test_strided_vlb_is_unbiased():
    sched = DiscreteSchedule.from_name("linear", 1000)
    m, C, x0, g = _gaussian_data(1000, seed=5)
    route1, _, _ = _analytic_vlb(m, C, sched)
    out = vlb(GaussianDenoiser(m, C, sched), x0, sched, decoder="gaussian", generator=g, stride=50)
    assert out["terms"].shape[1] == 1 + len(range(2, 1001, 50))
    mean, se = mean_and_stderr(out["diffusion"])
    assert abs(mean - route1["diffusion"]) < 4 * se


# ---- probability-flow ODE likelihood ---------------------------------------------------------


def _model_nll(x0, m, C, sched, t_eps):
    """The pf-ODE model's exact NLL: the Gaussian ODE solution pushed to the N(0, 1+S^2) prior.

    In y = x / alpha each eigen-coordinate of y - m is scaled by sqrt((c + s^2)/(c + s_eps^2)).
    """
    c, Q = torch.linalg.eigh(C)
    a_eps, s_eps = float(sched.alpha(t_eps)), float(sched.edm_sigma(t_eps))
    S = sched.sigma_max
    z = (x0 / a_eps - m) @ Q * torch.sqrt((c + S**2) / (c + s_eps**2))
    y_max = m + z @ Q.T
    log_prior = stats.norm(0, math.sqrt(1 + S**2)).logpdf(y_max.numpy()).sum(1)
    log_det = 0.5 * torch.log((c + S**2) / (c + s_eps**2)).sum()
    return -(torch.from_numpy(log_prior) + log_det) + x0.shape[1] * math.log(a_eps)


@pytest.mark.parametrize("method,steps,order,tol", [("rk4", 16, 4, 2e-3), ("heun", 32, 2, 0.05)])
def test_pf_ode_nll_with_exact_trace_matches_the_gaussian_density(method, steps, order, tol):
    sched = DiscreteSchedule.from_name("linear", 1000)
    m, C, x0, _ = _gaussian_data(32)
    t_eps = 0.01
    den = GaussianDenoiser(m, C, sched)
    model = _model_nll(x0, m, C, sched, t_eps)
    errors = []
    for n in (steps, 2 * steps):
        nll = pf_ode_nll(den, x0, sched, steps=n, method=method, hutchinson="exact", t_eps=t_eps)
        errors.append(float((nll - model).abs().max()))
    # converges to the model density at the solver's order (error / 2^order per doubling)
    assert errors[1] < errors[0] / (0.7 * 2**order)
    assert errors[1] < tol
    # the model density differs from the data density only through the N(0, I) prior: the
    # pointwise log-ratio at x_T is ~ m . y_T / S^2 = O(|m| / S), S = sigma_max ~ 157
    a_eps = float(sched.alpha(t_eps))
    s2 = float(sched.edm_sigma(t_eps)) ** 2
    data = -_log_normal_pdf(x0, a_eps * m, a_eps**2 * (C + s2 * torch.eye(2, dtype=F64)))
    assert torch.allclose(nll, data, atol=10 * float(m.norm()) / sched.sigma_max + tol)
    assert torch.allclose(data, -_log_normal_pdf(x0, m, C), atol=1e-3)  # t_eps is small


def test_pf_ode_nll_at_a_noisy_start_includes_the_alpha_change_of_variables():
    # from t_eps = 300 (alpha^2 ~ 0.53) the result is the density of x_300 = alpha x0 + sigma eps
    sched = DiscreteSchedule.from_name("linear", 1000)
    m, C, x0, _ = _gaussian_data(16, seed=8)
    nll = pf_ode_nll(GaussianDenoiser(m, C, sched), x0, sched, hutchinson="exact", t_eps=300.0)
    assert torch.allclose(nll, _model_nll(x0, m, C, sched, 300.0), atol=1e-3)
    a, s = (float(v) for v in sched.alpha_sigma(torch.tensor(300.0, dtype=F64)))
    data = -_log_normal_pdf(x0, a * m, a**2 * C + s**2 * torch.eye(2, dtype=F64))
    assert torch.allclose(nll, data, atol=10 * float(m.norm()) / sched.sigma_max + 1e-3)


def test_pf_ode_nll_hutchinson_is_unbiased_and_exact_for_diagonal_jacobians():
    sched = DiscreteSchedule.from_name("linear", 1000)
    m, C, x0, g = _gaussian_data(48, seed=2)
    den = GaussianDenoiser(m, C, sched)
    kw = dict(steps=10, method="rk4", t_eps=0.01)
    exact = pf_ode_nll(den, x0, sched, hutchinson="exact", **kw)
    for est in ("rademacher", "gaussian"):
        approx = pf_ode_nll(den, x0, sched, hutchinson=est, n_probes=2, generator=g, **kw)
        mean, se = mean_and_stderr(approx - exact)
        assert se > 1e-3  # the estimator is noisy for a non-diagonal Jacobian ...
        assert abs(mean) < 4 * se  # ... but unbiased
    # for a diagonal Jacobian Rademacher probes give the trace exactly: z_i^2 = 1
    diag = GaussianDenoiser(m, torch.diag(torch.tensor([1.2, 0.3], dtype=F64)), sched)
    exact = pf_ode_nll(diag, x0, sched, hutchinson="exact", **kw)
    rad = pf_ode_nll(diag, x0, sched, hutchinson="rademacher", generator=g, **kw)
    assert torch.allclose(rad, exact, atol=1e-10)


def test_pf_ode_nll_on_a_variance_exploding_schedule():
    sched = EDMSchedule(sigma_min=0.002, sigma_max=80.0)
    m = torch.zeros(2, dtype=F64)
    C = torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=F64)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    nll = pf_ode_nll(GaussianDenoiser(m, C, sched), x0, sched, hutchinson="exact")  # RK4, 32
    assert torch.allclose(nll, _model_nll(x0, m, C, sched, sched.t_min), atol=2e-3)
    # with m = 0 and unit-scale data the N(0, 1 + S^2) prior is nearly exact
    assert torch.allclose(nll, -_log_normal_pdf(x0, m, C), atol=2e-3)


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("std", [1.0, 0.6])
def test_pf_ode_nll_prior_term_at_a_small_sigma_max(kind, std):
    """The prior N(0, (1 + S^2) I) in y = x / alpha at a small S = sigma_max, where
    log(1 + S^2) and log(S^2) differ by O(1) per dimension (at S ~ 157 by 4e-5).

    Oracle, for data N(0, std^2 I) and its exact denoiser (``difflab.oracles``): the flow maps
    y(s_eps) to y(S) = y(s_eps) sqrt((std^2 + S^2) / (std^2 + s_eps^2)) per coordinate
    (``gaussian_pf_ode_solution``), so -log p = -log N(y(S); 0, 1 + S^2) - log|det| +
    D log alpha_eps in closed form; for std = 1 it is the data density itself, N(0, I) for VP.
    Tolerance 1e-4 nats: the RK4 error with 32 steps is < 1e-5 here (16x less per doubling).
    """
    D = 3
    if kind == "vp":
        sched, t_hi = DiscreteSchedule.from_name("linear", 1000), 100.0  # S ~ 0.35
    else:
        sched, t_hi = EDMSchedule(sigma_min=0.002, sigma_max=0.5), 0.5
    x0 = std * torch.randn(16, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    den = ExactGaussianDenoiser(torch.zeros(D, dtype=F64), std**2 * torch.eye(D, dtype=F64), sched)
    nll = pf_ode_nll(den, x0, sched, hutchinson="exact", t_max=t_hi)  # RK4, 32 steps
    a_eps, s_eps = float(sched.alpha(sched.t_min)), sched.sigma_min
    S = float(sched.edm_sigma(t_hi))
    assert S < 0.6
    gain = math.sqrt((std**2 + S**2) / (std**2 + s_eps**2))
    y_max = x0 / a_eps * gain
    log_prior = stats.norm(0, math.sqrt(1 + S**2)).logpdf(y_max.numpy()).sum(1)
    exact = -(torch.from_numpy(log_prior) + D * math.log(gain)) + D * math.log(a_eps)
    assert torch.allclose(nll, exact, atol=1e-4, rtol=0)
    if std == 1.0:  # the prior is the true marginal: the NLL is that of x_{t_eps}
        var = a_eps**2 * (1 + s_eps**2) * torch.eye(D, dtype=F64)  # = I for VP
        data = -_log_normal_pdf(x0, torch.zeros(D, dtype=F64), var)
        assert torch.allclose(nll, data, atol=1e-4, rtol=0)


def test_pf_ode_nll_rk4_is_fourth_order_with_a_denoiser_whose_divergence_depends_on_x(one_thread):
    """RK4 on Gaussian-mixture data, whose exact divergence dims - tr(dD/dy) changes with y.

    With a Gaussian denoiser the divergence is the same at every y, so the two midpoint stages
    give the same divergence and a wrong midpoint stage cannot be seen. Here it can. Oracles:
    (1) fourth-order convergence of the exact-trace NLL, measured against 64 steps: the
    error ratio between 16 and 32 steps is (1 - 4^-4) / (2^-4 - 4^-4) = 17 at order 4 and
    (1 - 4^-2) / (2^-2 - 4^-2) = 5 at order 2; (2) the limit is the mixture's own density at
    t_eps, -log sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I), up to the N(0, I)
    prior's O(|mu| / sigma_max) error. Bug caught: the divergence quadrature taking only the
    first midpoint stage (``w_mid * d2`` for ``w_mid * (d2 + d3) / 2``) makes the likelihood
    second order (ratio ~4.9 here) and passes every Gaussian-data test.
    """
    sched = DiscreteSchedule.from_name("linear", 1000)
    gmm = GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=F64),
        torch.tensor([[1.0, 0.5], [-0.8, -0.4]], dtype=F64),
        torch.tensor([[[0.3, 0.1], [0.1, 0.4]], [[0.5, -0.1], [-0.1, 0.2]]], dtype=F64),
    )
    den = GMMDenoiser(gmm, sched)
    x0 = gmm.sample(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    t_eps = 20.0  # alpha ~ 0.995, sigma ~ 0.1: the mixture stays bimodal
    nll = {
        n: pf_ode_nll(den, x0, sched, steps=n, method="rk4", hutchinson="exact", t_eps=t_eps)
        for n in (16, 32, 64)
    }
    e16, e32 = (float((nll[n] - nll[64]).abs().max()) for n in (16, 32))
    assert e16 / e32 > 10, (e16, e32)
    a, s = (float(v) for v in sched.alpha_sigma(torch.tensor(t_eps, dtype=F64)))
    data = -gmm.noised(a, s).log_prob(x0)
    assert torch.allclose(nll[64], data, atol=10 * float(gmm.means.norm(dim=1).max()) / 157 + 1e-3)


def test_pf_ode_nll_validates_its_options():
    sched = DiscreteSchedule.from_name("linear", 10)
    x0 = torch.zeros(2, 2, dtype=F64)
    den = OracleDenoiser(x0, sched)
    with pytest.raises(ValueError, match="heun, rk4"):
        pf_ode_nll(den, x0, sched, method="euler")
    with pytest.raises(ValueError, match="rademacher, gaussian, exact"):
        pf_ode_nll(den, x0, sched, hutchinson="bernoulli")
    with pytest.raises(ValueError, match="t_eps"):
        pf_ode_nll(den, x0, sched, t_eps=20.0)
