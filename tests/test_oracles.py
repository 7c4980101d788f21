"""Exact denoisers and the exact PF-ODE solution against Monte Carlo, Tweedie and the ODE."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.data.toy import default_gmm
from difflab.oracles import (
    GaussianConsistencyFunction,
    GaussianDenoiser,
    GMMDenoiser,
    gaussian_pf_ode_solution,
)
from difflab.schedules import DiscreteSchedule, EDMSchedule, FlowMatchSchedule

F64 = torch.float64
MEAN = torch.tensor([0.8, -0.5, 0.3], dtype=F64)
_A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.7, 0.0], [-0.3, 0.2, 0.4]], dtype=F64)
COV = _A @ _A.T  # non-diagonal, eigenvalues ~ 0.11, 0.45, 1.58


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests use many small tensors: run them on one thread (intra-op parallelism of
    tiny element-wise ops only adds synchronisation, which is costly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCHEDULES = {
    "linear": DiscreteSchedule.from_name("linear", 1000),
    "cosine": DiscreteSchedule.from_name("cosine", 200),
    "edm": EDMSchedule(),
}


def _alpha_sigma(schedule, t):
    a, s = schedule.alpha_sigma(torch.tensor(float(t), dtype=F64))
    return float(a), float(s)


@pytest.mark.parametrize("name,t", [("linear", 100), ("linear", 600), ("edm", 0.7)])
def test_gaussian_denoiser_is_the_regression_of_x0_on_xt(name, t):
    """E[x0 | xt] is the affine function of xt whose residual is uncorrelated with xt."""
    sched = SCHEDULES[name]
    den = GaussianDenoiser(MEAN, COV, sched)
    n = 50_000
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(COV).T
    alpha, sigma = _alpha_sigma(sched, t)
    xt = alpha * x0 + sigma * torch.randn(n, 3, generator=g, dtype=F64)
    r = x0 - den(xt, torch.full((n,), float(t), dtype=F64)).x0
    # E[r] = 0
    assert (r.mean(0).abs() <= 4 * r.std(0) / math.sqrt(n)).all()
    # E[r (xt - E xt)^T] = 0, the normal equations of least squares
    xc = xt - xt.mean(0)
    cross = r.T @ xc / n
    se = r.std(0)[:, None] * xc.std(0)[None, :] / math.sqrt(n)
    assert (cross.abs() <= 4.5 * se).all(), cross / se
    # and the estimate is affine in xt (so it is the posterior mean of a Gaussian)
    tt = torch.full((3,), float(t), dtype=F64)
    pts = torch.randn(3, 3, dtype=F64)
    mid = den(0.3 * pts + 0.7 * pts.flip(0), tt).x0
    assert torch.allclose(mid, 0.3 * den(pts, tt).x0 + 0.7 * den(pts.flip(0), tt).x0)
    # the residual is not trivially zero: its variance is below the prior variance
    assert bool((r.var(0) < COV.diag()).all()) and bool((r.var(0) > 0).all())


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(SCHEDULES)),
    frac=st.floats(0.002, 1.0),
    seed=st.integers(0, 2**16),
)
def test_tweedie_score_identity(name, frac, seed):
    """(alpha x0_hat - xt) / sigma^2 equals grad log q(xt), by autograd on the exact density."""
    sched = SCHEDULES[name]
    t = max(frac * sched.t_max, sched.t_min)
    alpha, sigma = _alpha_sigma(sched, t)
    g = torch.Generator().manual_seed(seed)
    gmm = default_gmm()
    cases = [
        (GaussianDenoiser(MEAN, COV, sched), 3, None),
        (GMMDenoiser(gmm, sched), 2, gmm.noised(alpha, sigma)),
    ]
    for den, d, noised in cases:
        scale = math.sqrt(alpha**2 + sigma**2)
        xt = (scale * torch.randn(16, d, generator=g, dtype=F64)).requires_grad_()
        if noised is None:
            cov_t = alpha**2 * COV + sigma**2 * torch.eye(3, dtype=F64)
            diff = xt - alpha * MEAN  # log N(xt; alpha m, cov_t) up to a constant
            logq = -0.5 * (diff * torch.linalg.solve(cov_t, diff.T).T).sum(1)
        else:
            logq = noised.log_prob(xt)
        (score,) = torch.autograd.grad(logq.sum(), xt)
        pred = den(xt.detach(), torch.full((16,), t, dtype=F64))
        tweedie = (alpha * pred.x0 - xt.detach()) / sigma**2
        assert torch.allclose(tweedie, score, rtol=1e-6, atol=1e-8 / sigma**2)
        # eps is the matching noise estimate, and the score is -eps / sigma
        assert torch.allclose(pred.eps, (xt.detach() - alpha * pred.x0) / sigma)
        assert torch.allclose(-pred.eps / sigma, score, rtol=1e-6, atol=1e-8 / sigma**2)


def test_gmm_denoiser_matches_importance_sampling():
    """E[x0 | xt] = E_p[x0 N(xt; alpha x0, sigma^2)] / E_p[N(xt; alpha x0, sigma^2)] (MC)."""
    gmm = default_gmm()
    sched = SCHEDULES["linear"]
    t = 150.0
    alpha, sigma = _alpha_sigma(sched, t)
    x0 = gmm.sample(400_000, torch.Generator().manual_seed(1), dtype=F64)
    xt = torch.tensor([[0.3, -0.2], [-1.0, 0.9], [1.2, -0.5]], dtype=F64)
    est = GMMDenoiser(gmm, sched)(xt, torch.full((3,), t, dtype=F64)).x0
    for j in range(3):
        logw = -0.5 * ((xt[j] - alpha * x0) ** 2).sum(1) / sigma**2
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        se = ((w[:, None] ** 2 * (x0 - mc) ** 2).sum(0)).sqrt()
        assert ((est[j] - mc).abs() <= 5 * se + 1e-4).all(), (est[j], mc, se)


def test_denoisers_accept_images_and_keep_the_dtype():
    sched = SCHEDULES["linear"]
    a = torch.randn(12, 12, dtype=F64)
    cov = a @ a.T / 12 + 0.1 * torch.eye(12, dtype=F64)
    den = GaussianDenoiser(torch.randn(12, dtype=F64), cov, sched)
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    t = torch.tensor([1.0, 10.0, 100.0, 500.0, 1000.0], dtype=F64)
    img, flat = den(x, t), den(x.reshape(5, 12), t)
    assert img.x0.shape == x.shape and img.eps.shape == x.shape
    assert torch.allclose(img.x0.reshape(5, 12), flat.x0)
    assert torch.allclose(img.eps.reshape(5, 12), flat.eps)
    p32 = den(x.float(), t)
    assert p32.x0.dtype == torch.float32 and p32.eps.dtype == torch.float32
    assert torch.allclose(p32.x0.double(), img.x0, atol=1e-4)
    gmm_den = GMMDenoiser(default_gmm(), sched)
    out = gmm_den(torch.randn(4, 1, 2, 1), torch.full((4,), 50.0, dtype=F64))
    assert out.x0.shape == (4, 1, 2, 1) and out.x0.dtype == torch.float32


def test_denoisers_reject_bad_input():
    sched = SCHEDULES["linear"]
    with pytest.raises(ValueError, match="cov must have shape"):
        GaussianDenoiser(MEAN, torch.eye(2, dtype=F64), sched)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianDenoiser(MEAN, -torch.eye(3, dtype=F64), sched)
    with pytest.raises(ValueError, match="3 numbers per sample"):
        GaussianDenoiser(MEAN, COV, sched)(torch.zeros(4, 2), torch.ones(4))


def test_pf_ode_solution_solves_the_ode():
    """Central differences in sigma of the solution equal (y - D(y; s)) / s [Karras 2022, Eq. 3]."""
    sched = EDMSchedule()
    den = GaussianDenoiser(MEAN, COV, sched)
    s0 = 20.0
    y0 = MEAN + s0 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for s in (0.05, 0.4, 1.0, 7.0):
        h = 1e-5 * s
        y = gaussian_pf_ode_solution(y0, s0, s, MEAN, COV)
        dy = (
            gaussian_pf_ode_solution(y0, s0, s + h, MEAN, COV)
            - gaussian_pf_ode_solution(y0, s0, s - h, MEAN, COV)
        ) / (2 * h)
        d = den(y, torch.full((8,), s, dtype=F64)).x0
        assert torch.allclose(dy, (y - d) / s, rtol=1e-6, atol=1e-8)
    # the flow from s0 to s0 is the identity; flows compose
    assert torch.allclose(gaussian_pf_ode_solution(y0, s0, s0, MEAN, COV), y0)
    y_mid = gaussian_pf_ode_solution(y0, s0, 2.0, MEAN, COV)
    assert torch.allclose(
        gaussian_pf_ode_solution(y_mid, 2.0, 0.0, MEAN, COV),
        gaussian_pf_ode_solution(y0, s0, 0.0, MEAN, COV),
    )


@pytest.mark.parametrize("s0,s1", [(80.0, 0.0), (3.0, 0.5), (0.2, 5.0)])
def test_pf_ode_solution_transports_the_noised_law(s0, s1):
    """The flow is affine, y -> m + A (y - m), with A (C + s0^2 I) A^T = C + s1^2 I."""
    eye = torch.eye(3, dtype=F64)
    a_mat = gaussian_pf_ode_solution(MEAN + eye, s0, s1, MEAN, COV) - MEAN  # rows A e_j
    a_mat = a_mat.T
    assert torch.allclose(a_mat @ (COV + s0**2 * eye) @ a_mat.T, COV + s1**2 * eye, atol=1e-9)
    assert torch.allclose(gaussian_pf_ode_solution(MEAN[None], s0, s1, MEAN, COV), MEAN[None])


def test_gaussian_consistency_function_is_the_pf_ode_end_point_and_finite_at_pure_noise():
    """f(xt, t) equals the closed-form ODE solution from (xt / alpha, sigma / alpha) to 0
    (an independent formula), and at t = 1 of the flow schedule (alpha = 0) it is the limit
    m + sqrt(C) xt / sigma instead of inf or nan. A missing sqrt, or alpha and sigma swapped in
    the gain, fails the first check; dividing by alpha fails the second."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.3 * torch.eye(3, dtype=torch.float64)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    sched = FlowMatchSchedule()
    f = GaussianConsistencyFunction(mean, cov, sched)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = sched.alpha_sigma(t)
    want = gaussian_pf_ode_solution(x / alpha[:, None], sigma / alpha, 0.0, mean, cov)
    torch.testing.assert_close(f(x, t).x0, want, rtol=1e-9, atol=1e-9)
    evals, evecs = torch.linalg.eigh(cov)
    sqrt_c = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    at_noise = f(x, torch.ones(64, dtype=torch.float64)).x0
    torch.testing.assert_close(at_noise, mean + x @ sqrt_c.T, rtol=1e-9, atol=1e-9)
