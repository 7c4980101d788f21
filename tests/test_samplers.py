"""Samplers against oracles: exact denoisers for Gaussian and Gaussian-mixture data, the exact
probability-flow ODE solution, and algebraic identities between samplers.

Discretisation allowances: for the 2-D Gaussian below (eigenvalues 0.26 and 1.34) the step
counts in ``GAUSSIAN_STEPS`` keep the bias of every sampler (measured once with 4e5 samples)
below ~3% of sd_i sd_j on the covariance and ~1% of sd_i on the mean; the tests allow 6% and
1.5% on top of 4 Monte Carlo standard errors.
"""

import functools
import inspect
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
    gaussian_sde_mean,
)
from difflab.parameterization import Prediction
from difflab.samplers import (
    SAMPLER_OPTIONS,
    SAMPLER_TABLE,
    SAMPLERS,
    ThresholdedDenoiser,
    consistency,
    ddim,
    ddim_invert,
    ddpm,
    default_spacing,
    dpm_solver_pp,
    dpmpp_sde,
    edm_sampler,
    euler_ancestral,
    ipndm,
    nfe,
    prior_noise,
    sample,
)
from difflab.samplers.ancestral import reverse_log_variance
from difflab.samplers.common import THRESHOLD_MODES
from difflab.schedules import DiscreteSchedule, EDMSchedule, FlowMatchSchedule, sampling_timesteps

F64 = torch.float64
LINEAR = DiscreteSchedule.from_name("linear", 1000)
EDM = EDMSchedule()
FLOW = FlowMatchSchedule()  # grids start at pure noise, t = 1 (alpha = 0, log-SNR = -inf)
FLOW3 = FlowMatchSchedule(shift=3.0)
MEAN = torch.tensor([0.8, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)  # correlation 0.65


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests use many small tensors: run them on one thread (intra-op parallelism of
    tiny element-wise ops only adds synchronisation, which is costly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GAUSSIAN_STEPS = {
    "ddpm": 400,
    "ddim": 200,
    "dpm++2m": 40,
    "dpm++3m": 30,
    "dpm++2s": 25,
    "dpm++2m-sde": 100,
    "euler": 200,
    "heun": 40,
    "euler-ancestral": 400,
    "flow-euler": 200,
    "flow-heun": 40,
    "ipndm": 40,
    "consistency": 2,
}


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def assert_moments(x, mean, cov, *, mean_allow=0.015, cov_allow=0.06):
    """Sample mean and covariance within 4 standard errors plus a discretisation allowance."""
    n = x.shape[0]
    sd = cov.diag().sqrt()
    se_mean = sd / math.sqrt(n)
    se_cov = ((cov.diag().outer(cov.diag()) + cov**2) / n).sqrt()  # Var(x_i x_j) for Gaussians
    err_mean = (x.mean(0) - mean).abs()
    err_cov = (torch.cov(x.T) - cov).abs()
    assert bool((err_mean <= 4 * se_mean + mean_allow * sd).all()), (x.mean(0), mean)
    assert bool((err_cov <= 4 * se_cov + cov_allow * sd.outer(sd)).all()), (torch.cov(x.T), cov)


# ---- the data law is reproduced -------------------------------------------------------------

GAUSSIAN_CASES = [("linear", name, {}) for name in SAMPLERS] + [
    ("linear", "ddpm", {"variance": "large", "steps": 100}),
    ("linear", "ddim", {"eta": 0.5}),
    ("edm", "euler", {}),
    ("edm", "heun", {}),
    ("edm", "heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("edm", "euler-ancestral", {}),
    ("edm", "ddim", {}),
    ("edm", "dpm++2m", {}),
    ("edm", "dpm++3m", {}),
    ("edm", "dpm++2s", {}),
    ("edm", "dpm++2m-sde", {}),
    ("edm", "ipndm", {}),
    ("linear", "ipndm", {"max_order": 2}),
    ("linear", "dpm++2m-sde", {"eta": 0.5}),
    # every sampler from pure noise on the flow-matching schedule (its default trailing grid)
    *[("flow", name, {}) for name in SAMPLERS],
    ("flow3", "flow-heun", {}),
    ("flow3", "dpm++2m", {}),
    ("flow", "flow-heun", {"s_churn": 10.0}),
    ("flow", "heun", {"s_churn": 10.0}),
    ("flow", "dpm++2m-sde", {"eta": 0.0}),
    ("flow", "ddim", {"eta": 1.0}),
    ("edm", "consistency", {"steps": 1}),
    ("linear", "consistency", {"steps": 4}),
]


def _gaussian_oracle(name, sched):
    """The exact denoiser the sampler expects: the posterior mean, or for a consistency
    sampler the exact consistency function (the probability-flow ODE's end point)."""
    oracle = GaussianConsistencyFunction if SAMPLER_TABLE[name].consistency else GaussianDenoiser
    return oracle(MEAN, COV, sched)


@pytest.mark.parametrize("schedule,name,options", GAUSSIAN_CASES)
def test_samplers_reproduce_gaussian_data(schedule, name, options):
    sched = {"linear": LINEAR, "edm": EDM, "flow": FLOW, "flow3": FLOW3}[schedule]
    options = dict(options)
    steps = options.pop("steps", GAUSSIAN_STEPS[name])
    den = _gaussian_oracle(name, sched)
    x = sample(
        den,
        sched,
        (20_000, 2),
        sampler=name,
        steps=steps,
        generator=_seed(0),
        dtype=F64,
        **options,
    )
    assert x.shape == (20_000, 2) and x.dtype == F64
    assert_moments(x, MEAN, COV)


def test_moment_check_detects_a_coarse_sampler():
    """The tolerance is tight enough to fail: 20 DDPM steps under-disperse visibly."""
    x = sample(
        GaussianDenoiser(MEAN, COV, LINEAR),
        LINEAR,
        (20_000, 2),
        sampler="ddpm",
        steps=20,
        generator=_seed(0),
        dtype=F64,
    )
    with pytest.raises(AssertionError):
        assert_moments(x, MEAN, COV)


@functools.lru_cache(maxsize=1)
def _gmm_reference():
    gmm = default_gmm()
    ref = gmm.sample(5000, _seed(101), dtype=F64)
    ref2 = gmm.sample(5000, _seed(102), dtype=F64)
    return gmm, ref, ref2


def _component_mass(gmm, x):
    """Fraction of points whose most probable mixture component is k (Bayes' rule)."""
    log_r = torch.stack(
        [gmm.weights[k].log() + _component_log_prob(gmm, k, x) for k in range(5)], dim=1
    )
    return torch.bincount(log_r.argmax(1), minlength=5).to(F64) / x.shape[0]


def _component_log_prob(gmm, k, x):
    diff = x - gmm.means[k]
    cov = gmm.covariances[k]
    maha = (diff * torch.linalg.solve(cov, diff.T).T).sum(1)
    return -0.5 * (maha + torch.logdet(cov) + 2 * math.log(2 * math.pi))


def _sliced_w2(x, y, n_proj=64):
    theta = torch.randn(2, n_proj, generator=_seed(7), dtype=F64)
    theta = theta / theta.norm(dim=0)
    xs, ys = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    return float((xs - ys).pow(2).mean().sqrt())


GMM_STEPS = {
    "ddpm": 150,
    "ddim": 60,
    "dpm++2m": 30,
    "dpm++3m": 30,
    "dpm++2s": 20,
    "dpm++2m-sde": 60,
    "euler": 60,
    "heun": 30,
    "euler-ancestral": 150,
    "flow-euler": 60,
    "flow-heun": 30,
    "ipndm": 30,
    "consistency": 2,
}


class _ODEConsistency:
    """The consistency function of a denoiser: its probability-flow ODE solved from (xt, t)
    to t = 0 with 40 Heun steps (times equal across the batch, as samplers call it); from the
    least noisy level t_min, one step as in every sampler."""

    def __init__(self, den, sched):
        self.den, self.sched = den, sched

    def __call__(self, xt, t, cond=None):
        t_start = float(t[0])
        steps = 40 if t_start > 2 * self.sched.t_min else 1
        ts = sampling_timesteps(self.sched, steps, spacing="karras", t_start=t_start)
        x0 = edm_sampler(self.den, xt, ts, schedule=self.sched)
        alpha, sigma = self.sched.alpha_sigma(t)
        return Prediction(x0=x0, eps=(xt - alpha[:, None] * x0) / sigma[:, None])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_reproduce_a_gaussian_mixture(name):
    """Component masses, cross-entropy and sliced W2 match fresh data of the same size.

    The Karras grid puts the steps at low noise, where the narrow components are resolved.
    """
    gmm, ref, ref2 = _gmm_reference()
    n = ref.shape[0]
    den = GMMDenoiser(gmm, LINEAR)
    if SAMPLER_TABLE[name].consistency:
        den = _ODEConsistency(den, LINEAR)
    x = sample(
        den,
        LINEAR,
        (n, 2),
        sampler=name,
        steps=GMM_STEPS[name],
        spacing="karras",
        generator=_seed(0),
        dtype=F64,
    )
    # per-component mass: two-sample binomial test plus 1% allowance
    p_ref, p_x = _component_mass(gmm, ref), _component_mass(gmm, x)
    se = (2 * p_ref * (1 - p_ref) / n).sqrt()
    assert bool(((p_x - p_ref).abs() <= 4 * se + 0.01).all()), (p_x, p_ref)
    # cross-entropy under the true density vs the data entropy (a mode-seeking sampler has
    # a lower value, an over-dispersed one a higher value)
    lp_x, lp_ref = gmm.log_prob(x), gmm.log_prob(ref)
    se_nll = math.sqrt((lp_x.var() + lp_ref.var()) / n)
    assert abs(float(lp_x.mean() - lp_ref.mean())) <= 4 * se_nll + 0.1
    # sliced Wasserstein-2 distance of the order of that between two fresh data sets
    assert _sliced_w2(x, ref) <= 2.5 * _sliced_w2(ref2, ref)


def test_mixture_check_detects_a_wrong_law():
    """The mixture checks fail for samples from the mixture's moment-matched Gaussian."""
    gmm, ref, _ = _gmm_reference()
    g = _seed(3)
    x = (
        gmm.mean()
        + torch.randn(5000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(gmm.covariance()).T
    )
    lp_x, lp_ref = gmm.log_prob(x), gmm.log_prob(ref)
    assert abs(float(lp_x.mean() - lp_ref.mean())) > 0.3


# ---- identities between samplers ------------------------------------------------------------


@pytest.mark.parametrize("steps", [1000, 37])
def test_ddim_eta_one_equals_ddpm_sample_for_sample(steps):
    """eta = 1 makes DDIM's update the DDPM posterior step with beta-tilde (Song 2021, Eq. 16)."""
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    ts = sampling_timesteps(LINEAR, steps, spacing="trailing")
    x_t = torch.randn(256, 2, generator=_seed(1), dtype=F64)
    a = ddim(den, x_t, ts, schedule=LINEAR, eta=1.0, generator=_seed(2))
    b = ddpm(den, x_t, ts, schedule=LINEAR, variance="small", generator=_seed(2))
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    c = ddpm(den, x_t, ts, schedule=LINEAR, variance="small", generator=_seed(3))
    assert not torch.allclose(a, c, atol=1e-3)  # the noise matters


@pytest.mark.parametrize("sched", [LINEAR, EDM], ids=["linear", "edm"])
def test_euler_ancestral_equals_ddpm_posterior_sampling(sched):
    """In y = x / alpha, s_up^2 is the posterior variance and s_down = s'^2 / s its mean."""
    den = GaussianDenoiser(MEAN, COV, sched)
    ts = sampling_timesteps(sched, 30, spacing="karras")
    x_t = prior_noise(sched, (256, 2), generator=_seed(1), dtype=F64)
    a = euler_ancestral(den, x_t, ts, schedule=sched, generator=_seed(2))
    b = ddpm(den, x_t, ts, schedule=sched, generator=_seed(2))
    assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


def _random_schedule(kind: str, t_count: int, sigma_max: float):
    if kind == "edm":
        return EDMSchedule(0.002, sigma_max)
    return DiscreteSchedule.from_name(kind, t_count)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine", "edm"]),
    t_count=st.integers(10, 1000),
    sigma_max=st.floats(1.0, 200.0),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8, unique=True),
    shape=st.sampled_from([(5, 2), (3, 1, 2, 2), (4, 4)]),
    seed=st.integers(0, 2**16),
)
def test_ddim_equals_first_order_dpm_solver_and_euler(kind, t_count, sigma_max, cuts, shape, seed):
    """DDIM (eta = 0), DPM-Solver++ of order 1, EDM's Euler and iPNDM of order 1 are one map,
    step for step."""
    sched = _random_schedule(kind, t_count, sigma_max)
    times = sorted({sched.t_min + c * (sched.t_max - sched.t_min) for c in cuts}, reverse=True)
    ts = torch.tensor([*times, 0.0], dtype=F64)
    d = math.prod(shape[1:])
    a = torch.randn(d, d, generator=_seed(seed), dtype=F64)
    den = GaussianDenoiser(
        torch.randn(d, generator=_seed(seed + 1), dtype=F64),
        a @ a.T / d + 0.05 * torch.eye(d, dtype=F64),
        sched,
    )
    x = prior_noise(sched, shape, generator=_seed(seed + 2), t=times[0], dtype=F64)
    runs = []
    euler = (edm_sampler, {"second_order": False})
    for fn, opts in ((ddim, {}), (dpm_solver_pp, {"order": 1}), euler, (ipndm, {"max_order": 1})):
        traj = []
        out = fn(den, x, ts, schedule=sched, callback=lambda s, tr=traj: tr.append(s["x"]), **opts)
        runs.append((traj, out))
    (ref_traj, ref_out) = runs[0]
    # Euler works in y = x / alpha: float64 round-off there is ~1e-16 sigma_max / alpha_max
    # relative to x (sigma/alpha reaches 2.6e8 on a 10-step linear schedule)
    s_max = float(sched.edm_sigma(torch.tensor(times[0], dtype=F64)))
    scale = (1 + float(x.abs().max())) * (1 + 1e-6 * s_max)
    for traj, out in runs[1:]:
        assert len(traj) == len(ref_traj) == len(times)
        for u, v in zip(traj, ref_traj):
            assert torch.allclose(u, v, rtol=1e-7, atol=1e-9 * scale)
        assert torch.allclose(out, ref_out, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_first_order_sde_dpm_solver_is_ddpm_posterior_sampling(spacing):
    """SDE-DPM-Solver++1 with eta = 1 is DDIM with eta = 1 (DDPM's posterior step), draw for
    draw; with eta = 0 the second-order SDE solver is DPM-Solver++(2M)."""
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    ts = sampling_timesteps(LINEAR, 23, spacing=spacing)
    x_t = torch.randn(256, 2, generator=_seed(1), dtype=F64)
    a = dpmpp_sde(den, x_t, ts, schedule=LINEAR, order=1, generator=_seed(2))
    b = ddim(den, x_t, ts, schedule=LINEAR, eta=1.0, generator=_seed(2))
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    c = dpmpp_sde(den, x_t, ts, schedule=LINEAR, order=2, eta=0.0, generator=_seed(2))
    c_ode = dpm_solver_pp(den, x_t, ts, schedule=LINEAR, order=2)
    assert torch.allclose(c, c_ode, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(a, c, atol=1e-3)


def test_lower_order_final_makes_the_last_step_of_short_3m_grids_second_order():
    """On grids of fewer than 15 steps ending at 0, DPM-Solver++(3M) takes its step before the
    denoising one at order 2 (Lu 2022b, Algorithm 2, from the two latest D's); longer grids
    and DPM-Solver++(2M) are unchanged."""
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    x_t = torch.randn(64, 2, generator=_seed(1), dtype=F64)

    def run(steps, order, flag):
        ts = sampling_timesteps(LINEAR, steps, spacing="karras")
        seen = []
        out = dpm_solver_pp(den, x_t, ts, schedule=LINEAR, order=order, lower_order_final=flag,
                            callback=seen.append)  # fmt: skip
        return ts, seen, out

    ts, low, out_low = run(10, 3, True)
    _, high, out_high = run(10, 3, False)
    n = ts.numel() - 1
    for a, b in zip(low[: n - 1], high[: n - 1]):  # identical up to the sample at t_{n-2}
        assert torch.equal(a["x"], b["x"])
    assert not torch.allclose(out_low, out_high, atol=1e-6)
    # the sample at t_{n-1} is the second-order multistep update from t_{n-2}
    lam = (LINEAR.logsnr(ts) / 2).tolist()
    alpha, sigma = (v.tolist() for v in LINEAR.alpha_sigma(ts))
    i = n - 2
    h, r = lam[i + 1] - lam[i], (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    d0, d1 = low[i]["x0_hat"], low[i - 1]["x0_hat"]
    phi_1 = math.expm1(-h)
    expected = (
        sigma[i + 1] / sigma[i] * low[i]["x"]
        - alpha[i + 1] * phi_1 * d0
        - alpha[i + 1] * phi_1 * (d0 - d1) / (2 * r)
    )
    assert torch.allclose(low[n - 1]["x"], expected, atol=1e-12)
    for steps, order in ((20, 3), (10, 2)):
        assert torch.equal(run(steps, order, True)[2], run(steps, order, False)[2])


def test_ddim_eta_zero_is_deterministic():
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    x = torch.randn(64, 2, generator=_seed(0), dtype=F64)
    ts = sampling_timesteps(LINEAR, 20)
    a = ddim(den, x, ts, schedule=LINEAR, generator=_seed(1))
    b = ddim(den, x, ts, schedule=LINEAR, generator=_seed(2))
    assert torch.equal(a, b)


def test_ddim_inversion_reconstructs_the_data():
    """Invert then sample on the same grid: a first-order round trip, error ~ 1 / steps."""
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    x0 = MEAN + torch.randn(500, 2, generator=_seed(0), dtype=F64) @ torch.linalg.cholesky(COV).T
    errors = []
    for steps in (100, 200):
        ts = sampling_timesteps(LINEAR, steps, spacing="trailing")
        x_T = ddim_invert(den, x0, ts.flip(0), schedule=LINEAR)
        rec = ddim(den, x_T, ts, schedule=LINEAR)
        errors.append(float((rec - x0).pow(2).mean().sqrt()))
    assert errors[1] < 0.02
    assert 1.6 < errors[0] / errors[1] < 2.5
    # the encoding is Gaussian noise: x_T ~ N(~0, ~I) for Gaussian data
    assert torch.allclose(x_T.std(0), torch.ones(2, dtype=F64), atol=0.1)


def test_ddim_inversion_never_trusts_the_denoiser_at_t_0_and_follows_the_exact_ode():
    """Inversion with a denoiser that is wrong at t = 0 (as a network is: it never saw clean
    data; with eps-prediction its eps there is arbitrary) must equal inversion with the exact
    one, and converge at first order to the exact probability-flow ODE map of Gaussian data,
    x_T = alpha_T y(s_T), y(s_T) from ``gaussian_pf_ode_solution`` started at x0.

    Bug caught: taking eps_hat at the current time t instead of t' (eps_hat = D(x_t, t).eps):
    the exact Gaussian denoiser reports eps = 0 at t = 0 and hides it; here the first step
    adds sigma_t1 * eps(0) and the encoding is off by 3x the discretisation error.
    """
    exact = GaussianDenoiser(MEAN, COV, LINEAR)
    seen = []

    def wrong_at_0(xt, t, cond=None):
        seen.append(float(torch.as_tensor(t).min()))
        pred = exact(xt, t)
        at_0 = (torch.as_tensor(t) == 0).reshape(-1, 1)
        junk = torch.full_like(xt, 3.0)
        return Prediction(
            x0=torch.where(at_0, xt + junk, pred.x0), eps=torch.where(at_0, junk, pred.eps)
        )

    x0 = MEAN + torch.randn(200, 2, generator=_seed(0), dtype=F64) @ torch.linalg.cholesky(COV).T
    errors = []
    for steps in (50, 100):
        ts = sampling_timesteps(LINEAR, steps, spacing="trailing").flip(0)
        assert float(ts[0]) == 0.0
        x_T = ddim_invert(wrong_at_0, x0, ts, schedule=LINEAR)
        assert torch.equal(x_T, ddim_invert(exact, x0, ts, schedule=LINEAR))
        a_T, s_T = (float(v) for v in LINEAR.alpha_sigma(ts[-1]))
        ode = a_T * gaussian_pf_ode_solution(x0, 0.0, s_T / a_T, MEAN, COV)  # alpha_0 = 1
        errors.append(float((x_T - ode).pow(2).mean().sqrt()))
    assert min(seen) > 0  # the denoiser is never asked at t = 0
    assert errors[1] < 0.05  # measured 0.037; 0.12 with eps_hat taken at t
    assert 1.6 < errors[0] / errors[1] < 2.5  # first order


@pytest.mark.parametrize("s_churn,gamma", [(100.0, math.sqrt(2) - 1), (1.0, 0.2)])
def test_edm_churn_raises_the_noise_level_by_at_most_sqrt_2(s_churn, gamma):
    """Algorithm 2 of [Karras 2022]: gamma_i = min(S_churn / N, sqrt(2) - 1), t_hat = t (1 + gamma),
    and noise of variance t_hat^2 - t^2 is added. At the cap t_hat = sqrt(2) t, so the added
    noise has the std t of the current level (the sample's noise variance doubles).

    Oracle: the levels at which the denoiser is called (EDM: t = sigma) and the std of the added
    noise (4000 samples: 1.1% standard error, 5% allowed). Bugs caught: the cap missing or
    written sqrt(2) (t_hat = 21 t or 2.41 t at S_churn / N = 20), gamma = S_churn without / N.
    """
    ts = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0], dtype=F64)  # N = 5, below sigma_max
    den = GaussianDenoiser(MEAN, COV, EDM)
    calls = []

    def recording(xt, t, cond=None):
        calls.append((float(torch.as_tensor(t).reshape(-1)[0]), xt))
        return den(xt, t, cond)

    y0 = MEAN + 10.0 * torch.randn(4000, 2, generator=_seed(0), dtype=F64)
    edm_sampler(recording, y0, ts, schedule=EDM, s_churn=s_churn, generator=_seed(1))
    levels = [t for t, _ in calls][::2]  # Heun: D(y_hat; t_hat), then D(y_next; t_next)
    expected = [(1 + gamma) * float(t) for t in ts[:-1]]
    assert levels == pytest.approx(expected, rel=1e-9)
    added = calls[0][1] - y0  # y_hat - y_0 = sqrt(t_hat^2 - t_0^2) z
    noise_std = 10.0 * math.sqrt((1 + gamma) ** 2 - 1)
    assert torch.allclose(added.std(0), torch.full((2,), noise_std, dtype=F64), rtol=0.05)


# ---- convergence order against the exact probability-flow ODE -------------------------------

ORDER_CASES = [
    ("euler", "edm", 1.6, 2.5),
    ("heun", "edm", 3.0, 5.5),
    ("dpm++2m", "edm", 3.0, 5.5),
    ("dpm++2s", "edm", 3.0, 5.5),
    ("dpm++3m", "edm", 6.0, 11.0),
    ("dpm++2m", "linear", 3.0, 5.5),
    ("dpm++3m", "linear", 6.0, 11.0),
    # iPNDM's equal-step coefficients are off by O(h) on the non-uniform Karras grid, which
    # makes it second order there (its order-k accuracy shows on a uniform grid, tested below)
    ("ipndm", "edm", 3.0, 5.5),
    ("ipndm", "linear", 3.0, 5.5),
]


@pytest.mark.parametrize("name,schedule,lo,hi", ORDER_CASES)
def test_convergence_order(name, schedule, lo, hi):
    """The error falls by 2^order per doubling of steps.

    Reference: :func:`gaussian_pf_ode_solution` from sigma_max to the last non-zero level of
    the Karras grid (the final step to sigma = 0 is a first-order denoising step in every
    sampler, with an error set by sigma_min, not by the number of steps). Float64, 32 -> 64
    -> 128 steps: the asymptotic regime for rho = 7 (below ~16 steps the ratios are erratic).
    """
    sched = {"linear": LINEAR, "edm": EDM}[schedule]
    den = GaussianDenoiser(MEAN, COV, sched)
    fn = SAMPLERS[name]
    errors = []
    for steps in (32, 64, 128):
        ts = sampling_timesteps(sched, steps, spacing="karras")
        s_start = float(sched.edm_sigma(ts[0]))
        alpha_start = float(sched.alpha(ts[0]))
        y0 = MEAN + s_start * torch.randn(64, 2, generator=_seed(0), dtype=F64)
        seen = {}
        fn(den, alpha_start * y0, ts, schedule=sched, callback=lambda s, seen=seen: seen.update(s))
        t_last = torch.tensor(seen["t"], dtype=F64)
        assert seen["i"] == steps - 1 and seen["t"] == float(ts[-2])
        y_last = seen["x"] / float(sched.alpha(t_last))
        ref = gaussian_pf_ode_solution(y0, s_start, float(sched.edm_sigma(t_last)), MEAN, COV)
        errors.append(float((y_last - ref).pow(2).mean().sqrt()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(lo <= r <= hi for r in ratios), (errors, ratios)


def test_dpm_solver_3m_is_third_order_on_a_grid_of_alternating_step_sizes():
    """DPM-Solver++(3M) [Lu 2022b] estimates x0_hat' and x0_hat'' from the last three denoised
    points with the step ratios r0 = h_{i-1} / h_i and r1 = h_{i-2} / h_i. On grids uniform or
    smooth in lambda r0 and r1 are (nearly) equal and exchanging them only changes the error
    constant; on a grid whose steps in log sigma alternate h, 3h, h, 3h, ... (r0, r1 = 1/3, 3
    and 3, 1/3 in turn) only the right divided differences are consistent. Oracle: the
    closed-form PF-ODE solution of Gaussian data from sigma = 80 to 0.2; the error falls by
    2^3 per doubling of steps (measured 10.4, 9.5). Bugs caught: r1 for r0 in the weight of
    D1 (r0 / (r0 + r1)), which passes the uniform and Karras grids (ratios here 4.8, 2.4);
    r0 and r1 swapped altogether."""
    den = GaussianDenoiser(MEAN, COV, EDM)
    s_hi, s_lo = 80.0, 0.2
    y0 = MEAN + s_hi * torch.randn(64, 2, generator=_seed(0), dtype=F64)
    ref = gaussian_pf_ode_solution(y0, s_hi, s_lo, MEAN, COV)
    errors = []
    for steps in (16, 32, 64):
        w = torch.tensor([1.0, 3.0] * (steps // 2), dtype=F64)
        u = torch.cat([torch.zeros(1, dtype=F64), w.cumsum(0) / w.sum()])
        ts = s_hi * (s_lo / s_hi) ** u  # EDM: t = sigma; log sigma steps alternate h, 3h
        out = dpm_solver_pp(den, y0, ts, schedule=EDM, order=3)
        errors.append(float((out - ref).pow(2).mean().sqrt()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(6.0 <= r <= 12.0 for r in ratios), (errors, ratios)


@pytest.mark.parametrize(
    "max_order,lo,hi", [(1, 1.6, 2.5), (2, 3.0, 5.5), (3, 5.5, 11.0), (4, 9.0, 20.0)]
)
def test_ipndm_has_order_k_on_a_grid_uniform_in_sigma(max_order, lo, hi):
    """The Adams-Bashforth coefficients of order k assume equal steps: on a grid uniform in the
    EDM sigma the error falls by 2^k per doubling of steps (32 -> 64 -> 128), against the
    closed-form PF-ODE solution. The grid runs from sigma = 10, where the trajectory is nearly
    straight, so the lower-order warm-start steps add little, down to sigma = 1."""
    den = GaussianDenoiser(MEAN, COV, EDM)
    y0 = MEAN + 10.0 * torch.randn(64, 2, generator=_seed(0), dtype=F64)
    ref = gaussian_pf_ode_solution(y0, 10.0, 1.0, MEAN, COV)
    errors = []
    for steps in (32, 64, 128):
        ts = torch.linspace(10.0, 1.0, steps + 1, dtype=F64)  # EDM: t = sigma
        out = ipndm(den, y0, ts, schedule=EDM, max_order=max_order)
        errors.append(float((out - ref).pow(2).mean().sqrt()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(lo <= r <= hi for r in ratios), (errors, ratios)


@pytest.mark.parametrize("order", [1, 2])
def test_sde_dpm_solver_with_eta_one_has_the_exact_mean_for_gaussian_data(order):
    """Given the exact E[x0 | x_t], DDPM's posterior step (order 1, eta = 1) has the exact mean
    of x_s for any step size; along the exact mean path E[x0 | x] stays constant (a martingale
    of the reverse SDE), so the second-order correction D_i - D_{i-1} vanishes as well."""
    den = GaussianDenoiser(MEAN, COV, EDM)
    ts = sampling_timesteps(EDM, 7, spacing="karras")
    y0 = MEAN + 80.0 * torch.randn(16, 2, generator=_seed(0), dtype=F64)
    seen = {}
    dpmpp_sde(den, y0, ts, schedule=EDM, order=order, s_noise=0.0, callback=seen.update)
    ref = gaussian_sde_mean(
        y0, float(EDM.edm_sigma(ts[0])), float(EDM.edm_sigma(ts[-2])), MEAN, COV
    )
    assert torch.allclose(seen["x"], ref, atol=1e-10)


def test_sde_mean_of_gaussian_data_is_the_denoiser():
    """Run to s = 0 from y, the reverse diffusion SDE (eta = 1) samples the posterior of x0
    given y, so its mean is E[x0 | y] = D(y; s); the ODE (eta = 0) is the same oracle."""
    sched = EDM
    den = GaussianDenoiser(MEAN, COV, sched)
    y = 3.0 * torch.randn(32, 2, generator=_seed(0), dtype=F64)
    for s in (0.3, 2.0, 40.0):
        t = sched.t_from_edm_sigma(torch.tensor(s, dtype=F64))
        expected = den(y * float(sched.alpha(t)), t.expand(32)).x0
        assert torch.allclose(gaussian_sde_mean(y, s, 0.0, MEAN, COV), expected, atol=1e-10)
        ode = gaussian_pf_ode_solution(y, s, 0.5, MEAN, COV)
        assert torch.allclose(ode, gaussian_sde_mean(y, s, 0.5, MEAN, COV, eta=0.0))
        assert not torch.allclose(ode, gaussian_sde_mean(y, s, 0.5, MEAN, COV), atol=1e-3)


@pytest.mark.parametrize(
    "order,eta,lo,hi", [(1, 0.5, 1.6, 2.5), (2, 0.5, 3.0, 5.5), (2, 0.25, 3.0, 5.5)]
)
def test_sde_dpm_solver_mean_converges_at_its_order(order, eta, lo, hi):
    """For Gaussian data the update is affine in x, so with s_noise = 0 it computes the mean of
    the stochastic sampler's output; that mean converges to the exact mean of the SDE
    (:func:`gaussian_sde_mean`) at the method's order: the error falls by 2^order per doubling.

    (With eta = 1 the mean is exact here whatever the step size, see the test below, so the
    order shows only for eta < 1.)"""
    den = GaussianDenoiser(MEAN, COV, EDM)
    errors = []
    for steps in (32, 64, 128):
        ts = sampling_timesteps(EDM, steps, spacing="karras")
        s_start = float(EDM.edm_sigma(ts[0]))
        y0 = MEAN + s_start * torch.randn(64, 2, generator=_seed(0), dtype=F64)
        seen = {}
        dpmpp_sde(den, y0, ts, schedule=EDM, order=order, eta=eta, s_noise=0.0,
                  callback=lambda s, seen=seen: seen.update(s))  # fmt: skip
        ref = gaussian_sde_mean(y0, s_start, float(EDM.edm_sigma(seen["t"])), MEAN, COV, eta=eta)
        errors.append(float((seen["x"] - ref).pow(2).mean().sqrt()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(lo <= r <= hi for r in ratios), (errors, ratios)


# ---- DDPM variances -------------------------------------------------------------------------


class _WithVarFrac:
    def __init__(self, den, frac):
        self.den, self.frac = den, frac

    def __call__(self, xt, t, cond=None):
        p = self.den(xt, t, cond)
        return Prediction(x0=p.x0, eps=p.eps, var_frac=torch.full_like(xt, self.frac))


@pytest.mark.parametrize("variance,frac", [("small", None), ("large", None), ("learned", 0.3)])
def test_ddpm_step_has_the_posterior_mean_and_the_chosen_variance(variance, frac):
    """One step t -> t - 1 against Ho 2020, Eq. 7 built from the schedule's tables."""
    t, n = 3, 40_000
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    if frac is not None:
        den = _WithVarFrac(den, frac)
    x_t = torch.tensor([[0.4, -0.9]], dtype=F64).expand(n, 2)
    seen = []
    ddpm(
        den,
        x_t,
        torch.tensor([t, t - 1, 0.0], dtype=F64),
        schedule=LINEAR,
        variance=variance,
        generator=_seed(0),
        callback=seen.append,
    )
    x_s = seen[1]["x"]
    ab_t, ab_s = float(LINEAR.alpha_bar[t]), float(LINEAR.alpha_bar[t - 1])
    beta, beta_tilde = float(LINEAR.betas[t - 1]), float(LINEAR.beta_tilde[t - 1])
    x0_hat = seen[0]["x0_hat"][0]
    mean = (
        math.sqrt(ab_s) * beta / (1 - ab_t) * x0_hat
        + math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * x_t[0]
    )
    var = {
        "small": beta_tilde,
        "large": beta,
        "learned": math.exp(0.3 * math.log(beta) + 0.7 * math.log(beta_tilde)),
    }[variance]
    assert torch.allclose(x_s.mean(0), mean, atol=4 * math.sqrt(var / n))
    assert torch.allclose(x_s.var(0), torch.full((2,), var, dtype=F64), rtol=4 * math.sqrt(2 / n))


def test_learned_variance_interpolates_between_small_and_large():
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    ts = sampling_timesteps(LINEAR, 25)
    x = torch.randn(128, 2, generator=_seed(0), dtype=F64)
    for frac, fixed in ((0.0, "small"), (1.0, "large")):
        a = ddpm(
            _WithVarFrac(den, frac), x, ts, schedule=LINEAR, variance="learned", generator=_seed(1)
        )
        b = ddpm(den, x, ts, schedule=LINEAR, variance=fixed, generator=_seed(1))
        assert torch.allclose(a, b, atol=1e-9)
    # the step to 0 has beta-tilde = 0; its log is clipped to the step before (Improved DDPM)
    full = sampling_timesteps(LINEAR, 1000)
    last = reverse_log_variance(LINEAR, full, 999, variance="small")
    assert last == pytest.approx(math.log(float(LINEAR.beta_tilde[1])), rel=1e-9)
    learned = reverse_log_variance(
        LINEAR, full, 999, variance="learned", var_frac=torch.ones(2, dtype=F64)
    )
    assert torch.isfinite(learned).all()
    with pytest.raises(ValueError, match="var_frac"):
        ddpm(den, x, ts, schedule=LINEAR, variance="learned")


# ---- shapes, callbacks, NFE, dtypes, the last step -------------------------------------------


class _Counting:
    def __init__(self, den):
        self.den, self.calls = den, 0

    def __call__(self, xt, t, cond=None):
        assert t.shape == (xt.shape[0],) and t.dtype == F64
        self.calls += 1
        return self.den(xt, t, cond)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nfe_callback_and_shapes(name):
    d = 12
    a = torch.randn(d, d, generator=_seed(0), dtype=F64)
    den = _Counting(GaussianDenoiser(torch.zeros(d, dtype=F64), a @ a.T / d, LINEAR))
    seen = []
    img = sample(
        den,
        LINEAR,
        (6, 3, 2, 2),
        sampler=name,
        steps=7,
        generator=_seed(1),
        callback=seen.append,
        dtype=F64,
    )
    assert den.calls == nfe(name, 7)
    ts = sampling_timesteps(LINEAR, 7, spacing=default_spacing(name, LINEAR))
    assert [s["i"] for s in seen] == list(range(7))
    assert [s["t"] for s in seen] == pytest.approx(ts[:-1].tolist())
    assert [s["t_next"] for s in seen] == pytest.approx(ts[1:].tolist())
    assert all(set(s) == {"i", "t", "t_next", "x", "x0_hat"} for s in seen)
    assert all(s["x"].shape == s["x0_hat"].shape == (6, 3, 2, 2) for s in seen)
    # images and flat vectors are the same computation (same noise, same order)
    flat = sample(den, LINEAR, (6, 12), sampler=name, steps=7, generator=_seed(1), dtype=F64)
    assert img.shape == (6, 3, 2, 2)
    assert torch.allclose(img.reshape(6, 12), flat, atol=1e-12)
    # float32 in, float32 out; for the deterministic samplers close to the float64 result
    # (noise drawn in float32 differs from noise drawn in float64)
    x_init = prior_noise(LINEAR, (6, 3, 2, 2), generator=_seed(1), dtype=F64)
    x32 = sample(
        den, LINEAR, (6, 3, 2, 2), sampler=name, steps=7, generator=_seed(1), x_init=x_init.float()
    )
    assert x32.dtype == torch.float32 and bool(torch.isfinite(x32).all())
    if name not in ("ddpm", "euler-ancestral", "dpm++2m-sde", "consistency"):  # stochastic
        assert torch.allclose(x32.double(), img, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_last_step_returns_x0_hat_without_noise(name):
    """With a denoiser that always answers c, every sampler ends exactly at c."""
    c = torch.tensor([0.25, -1.5], dtype=F64)

    def constant(xt, t, cond=None):
        alpha, sigma = LINEAR.alpha_sigma(t)
        x0 = c.expand_as(xt)
        return Prediction(x0=x0, eps=(xt - alpha[:, None] * x0) / sigma[:, None])

    x = sample(constant, LINEAR, (50, 2), sampler=name, steps=5, generator=_seed(0), dtype=F64)
    assert torch.allclose(x, c.expand(50, 2), atol=1e-12)


def test_prior_noise():
    for sched, var in ((LINEAR, 1.0), (EDM, 1.0 + 80.0**2)):
        x = prior_noise(sched, (50_000, 2), generator=_seed(0), dtype=F64)
        assert abs(float(x.var()) / var - 1) < 4 * math.sqrt(2 / 1e5)
        assert torch.equal(x, prior_noise(sched, (50_000, 2), generator=_seed(0), dtype=F64))
    assert prior_noise(LINEAR, (3, 1, 4, 4)).dtype == torch.float32


def test_bad_input_is_rejected():
    den = GaussianDenoiser(MEAN, COV, LINEAR)
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="unknown sampler 'foo'; choose one of: ddpm, ddim"):
        sample(den, LINEAR, (4, 2), sampler="foo")
    with pytest.raises(ValueError, match="unknown sampler"):
        nfe("foo", 10)
    with pytest.raises(ValueError, match="small, large, learned"):
        ddpm(den, x, sampling_timesteps(LINEAR, 5), schedule=LINEAR, variance="tiny")
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(den, x, torch.tensor([10.0, 20.0, 0.0]), schedule=LINEAR)
    with pytest.raises(ValueError, match="must lie in"):
        ddim(den, x, torch.tensor([2000.0, 0.0]), schedule=LINEAR)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp(den, x, sampling_timesteps(LINEAR, 5), schedule=LINEAR, order=4)
    with pytest.raises(ValueError, match="max_order"):
        ipndm(den, x, sampling_timesteps(LINEAR, 5), schedule=LINEAR, max_order=5)
    with pytest.raises(ValueError, match="x_init has shape"):
        sample(den, LINEAR, (4, 2), x_init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="eta"):
        ddim(den, x, sampling_timesteps(LINEAR, 5), schedule=LINEAR, eta=-1.0)
    with pytest.raises(ValueError, match="clip, dynamic"):
        ThresholdedDenoiser(den, LINEAR, mode="soft")
    with pytest.raises(
        ValueError, match="sampler 'ddpm' has no option 'eta' .its options: variance"
    ):
        sample(den, LINEAR, (4, 2), sampler="ddpm", eta=0.5)
    ts = sampling_timesteps(LINEAR, 5)
    for bad in ({"order": 3}, {"eta": -0.1}, {"s_noise": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dpmpp_sde(den, x, ts, schedule=LINEAR, **bad)


def _keyword_options(fn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {
        "schedule", "cond", "generator", "callback"
    }  # fmt: skip


def test_sampler_options_are_the_keyword_options_of_the_functions():
    """Each table entry's options are its function's keyword options less the fixed ones, and
    SAMPLERS runs the function with the fixed ones bound."""
    assert list(SAMPLER_OPTIONS) == list(SAMPLERS) == list(SAMPLER_TABLE)
    for name, spec in SAMPLER_TABLE.items():
        fn = SAMPLERS[name]
        base = fn.func if isinstance(fn, functools.partial) else fn
        assert spec.function.endswith(":" + base.__name__), name
        assert dict(fn.keywords if base is not fn else {}) == dict(spec.fixed), name
        assert set(spec.fixed) <= _keyword_options(base), name
        assert set(SAMPLER_OPTIONS[name]) == _keyword_options(base) - set(spec.fixed), name


class _Linear(torch.nn.Module):
    """A denoiser with parameters (x0_hat = w x): a sampler must not record its graph."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))

    def forward(self, x, t, cond=None):
        alpha, sigma = LINEAR.alpha_sigma(t)
        x0 = self.w * x
        return Prediction(x0=x0, eps=(x - alpha[:, None] * x0) / sigma[:, None])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_sampler_decorator_gives_every_sampler_the_one_signature(name):
    """The shared arguments come first in every sampler's reported signature (what ``help``
    shows), the grid is checked before any step, and no gradient graph is recorded."""
    fn = SAMPLERS[name]
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:7]] == [
        "denoiser", "x", "ts", "schedule", "cond", "generator", "callback"
    ]  # fmt: skip
    assert all(p.kind is p.KEYWORD_ONLY for p in params[3:])
    x = torch.randn(8, 2, dtype=F64, generator=_seed(0))
    ts = sampling_timesteps(LINEAR, 4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fn(_Linear(), x, ts.flip(0), schedule=LINEAR)
    out = fn(_Linear(), x, ts, schedule=LINEAR, generator=_seed(1))
    assert out.shape == x.shape and not out.requires_grad


# ---- consistency sampling ------------------------------------------------------------------


@pytest.mark.parametrize("sched", [LINEAR, EDM])
def test_one_consistency_step_is_the_ode_end_point_of_the_prior_sample(sched):
    """With the exact consistency function, 1 step lands where the probability-flow ODE from
    the prior sample ends (:func:`gaussian_pf_ode_solution` from sigma_max to 0)."""
    x_t = prior_noise(sched, (64, 2), generator=_seed(0), dtype=F64)
    ts = sampling_timesteps(sched, 1)
    out = consistency(GaussianConsistencyFunction(MEAN, COV, sched), x_t, ts, schedule=sched)
    alpha = float(sched.alpha(ts[0]))
    ref = gaussian_pf_ode_solution(x_t / alpha, sched.sigma_max, 0.0, MEAN, COV)
    assert torch.allclose(out, ref, atol=1e-12)


def test_consistency_sampling_of_a_posterior_mean_is_detected():
    """Given E[x0 | x_T] instead of a consistency function, one step returns the data mean
    plus a shrunken spread: the moment check fails (the two oracles are not interchangeable)."""
    x = sample(
        GaussianDenoiser(MEAN, COV, LINEAR), LINEAR, (20_000, 2), sampler="consistency",
        steps=1, generator=_seed(0), dtype=F64,
    )  # fmt: skip
    with pytest.raises(AssertionError):
        assert_moments(x, MEAN, COV)


# ---- thresholding ---------------------------------------------------------------------------


class _Fixed:
    """A denoiser that predicts a fixed x0 (to test the wrapper on chosen values)."""

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, xt, t, cond=None):
        a, s = LINEAR.alpha_sigma(t)
        return Prediction(x0=self.x0, eps=(xt - a[:, None, None] * self.x0) / s[:, None, None])


def test_clip_thresholding_keeps_x0_in_range_and_eps_consistent():
    x0 = 3 * torch.randn(8, 4, 5, generator=_seed(0), dtype=F64)
    xt = torch.randn(8, 4, 5, generator=_seed(1), dtype=F64)
    t = torch.linspace(1, 1000, 8, dtype=F64)
    p = ThresholdedDenoiser(_Fixed(x0), LINEAR, mode="clip", c=1.5)(xt, t)
    assert float(p.x0.abs().max()) <= 1.5
    inside = x0.abs() <= 1.5
    assert torch.equal(p.x0[inside], x0[inside])
    a, s = LINEAR.alpha_sigma(t)
    assert torch.allclose(a[:, None, None] * p.x0 + s[:, None, None] * p.eps, xt)


def test_dynamic_thresholding():
    g = _seed(0)
    small = 0.9 * torch.rand(1, 200, generator=g, dtype=F64) * 2 - 0.9  # in [-0.9, 0.9]
    big = 4 * torch.randn(1, 200, generator=g, dtype=F64)
    x0 = torch.cat([small, big])[:, :, None]
    xt = torch.randn(2, 200, 1, generator=g, dtype=F64)
    t = torch.tensor([300.0, 300.0], dtype=F64)
    p = ThresholdedDenoiser(_Fixed(x0), LINEAR, mode="dynamic", percentile=0.9)(xt, t)
    assert torch.equal(p.x0[0], x0[0])  # in range: untouched
    s = torch.sort(x0[1].abs().flatten()).values
    q = float(torch.quantile(s, 0.9))
    assert q > 1
    expected = x0[1].clamp(-q, q) / q  # Imagen: clip to [-s, s], divide by s
    assert torch.allclose(p.x0[1], expected)
    assert float(p.x0.abs().max()) <= 1.0
    a, sig = LINEAR.alpha_sigma(t)
    assert torch.allclose(a[:, None, None] * p.x0 + sig[:, None, None] * p.eps, xt)
    # percentile 1 is the per-sample maximum
    p1 = ThresholdedDenoiser(_Fixed(x0), LINEAR, mode="dynamic", percentile=1.0)(xt, t)
    assert torch.allclose(p1.x0[1], x0[1] / x0[1].abs().max())


def test_sample_threshold_option_is_the_wrapper():
    """`sample(..., threshold=mode)` draws exactly what the wrapped denoiser draws."""
    x0 = 3 * torch.randn(6, 3, generator=_seed(2), dtype=F64)
    for mode in THRESHOLD_MODES:
        got = sample(_Fixed(x0), LINEAR, (6, 3), sampler="ddpm", steps=5, generator=_seed(3),
                     dtype=F64, threshold=mode)  # fmt: skip
        wrapped = ThresholdedDenoiser(_Fixed(x0), LINEAR, mode=mode)
        want = sample(wrapped, LINEAR, (6, 3), sampler="ddpm", steps=5, generator=_seed(3),
                      dtype=F64)  # fmt: skip
        assert torch.equal(got, want)
        assert float(got.abs().max()) <= 1.0 + 1e-9  # the last step returns the thresholded x0
    raw = sample(_Fixed(x0), LINEAR, (6, 3), sampler="ddpm", steps=5, generator=_seed(3),
                 dtype=F64)  # fmt: skip
    assert float(raw.abs().max()) > 1.0
    with pytest.raises(ValueError, match="clip, dynamic"):
        sample(_Fixed(x0), LINEAR, (6, 3), steps=5, threshold="soft")
