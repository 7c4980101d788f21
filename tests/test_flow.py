"""Flow matching is diffusion on the linear interpolant: every piece against an oracle.

The schedule (alpha = 1 - t, sigma = t) against its definition and SD3's shift; the flow loss
against the diffusion losses (identities) and against its irreducible minimum for Gaussian data
(Monte Carlo); flow-Euler against DDIM (the same map); Euler and Heun against the exact flow map
of Gaussian data (convergence orders); the PF-ODE likelihood against the exact Gaussian density;
the time distributions against their closed-form CDFs; and diffusers' and torchcfm's
implementations of the same math (parity, optional).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.data.toy import default_gmm
from difflab.objectives import diffusion_loss, loss_weight, sample_flow_times
from difflab.ode_likelihood import pf_ode_nll
from difflab.oracles import GaussianDenoiser, GMMDenoiser
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.samplers import SAMPLERS, ddim, edm_sampler, flow_heun, sample
from difflab.schedules import EDMSchedule, FlowMatchSchedule, flux_shift, sampling_timesteps

F64 = torch.float64
FLOW = FlowMatchSchedule()
MEAN = torch.tensor([0.8, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


class VelocityMLP(torch.nn.Module):
    """A random velocity network u(x, t) (any function will do for the identities)."""

    def __init__(self, dim: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim)
        ).to(F64)

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t.to(x.dtype)[:, None]], dim=1))


class ExactVelocity(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t] of an oracle denoiser, as a network."""

    def __init__(self, oracle) -> None:
        super().__init__()
        self.oracle = oracle

    def forward(self, x, t, cond=None):
        return self.oracle(x, t.to(F64)).u()


def _gaussian_flow_map(x1: torch.Tensor) -> torch.Tensor:
    """The exact PF-ODE map from pure noise x1 (t = 1) to data (t = 0) for N(m, C):
    y(s) = m + sqrt(C + s^2 I) x1 / sigma_1 as s_start -> inf (oracles.gaussian_pf_ode_solution
    in its limit), so x0 = m + C^(1/2) x1."""
    lam, u = torch.linalg.eigh(COV)
    return MEAN + (x1 @ u) * lam.sqrt() @ u.T


# ---- the schedule ---------------------------------------------------------------------------


def test_flow_schedule_is_the_linear_interpolant_with_its_endpoints():
    t = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0], dtype=F64)
    alpha, sigma = FLOW.alpha_sigma(t)
    assert torch.equal(alpha, 1 - t) and torch.equal(sigma, t)
    # t = 0 is data (log-SNR +inf), t = 1 pure noise (alpha = 0, log-SNR -inf, EDM sigma inf)
    lam = FLOW.logsnr(t)
    assert lam[0] == math.inf and lam[-1] == -math.inf
    inner = slice(1, -1)
    assert torch.allclose(lam[inner], torch.log(alpha[inner] ** 2 / sigma[inner] ** 2))
    assert torch.allclose(FLOW.edm_sigma(t)[inner], t[inner] / (1 - t[inner]))
    assert FLOW.edm_sigma(1.0) == math.inf and FLOW.sigma_max == math.inf
    assert torch.allclose(FLOW.t_from_logsnr(lam), t, atol=1e-15)  # also at both ends
    assert torch.allclose(FLOW.t_from_edm_sigma(FLOW.edm_sigma(t)), t, atol=1e-15)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FLOW.alpha(1.5)


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(0.2, 8.0), t=st.floats(0.0, 1.0))
def test_sd3_shift_scales_the_edm_sigma_and_keeps_the_ends(shift, t):
    """t' = s t / (1 + (s - 1) t) [Esser 2024, Eq. 23] is the log-SNR shift by -2 log s."""
    sched = FlowMatchSchedule(shift=shift)
    tt = torch.tensor(t, dtype=F64)
    ts = sched.shift_time(tt)
    assert 0 <= float(ts) <= 1
    if 0 < t < 1:
        assert float(sched.edm_sigma(ts)) == pytest.approx(shift * float(FLOW.edm_sigma(tt)))
    assert float(sched.unshift_time(ts)) == pytest.approx(t, abs=1e-12)
    assert float(sched.shift_time(0.0)) == 0 and float(sched.shift_time(1.0)) == 1


def test_flux_shift_is_sd3_shift_with_exp_mu():
    # Flux: mu = 0.5 at 256 tokens and 1.15 at 4096, linear between; t' = e^mu / (e^mu + 1/t - 1)
    assert flux_shift(256) == pytest.approx(math.exp(0.5))
    assert flux_shift(4096) == pytest.approx(math.exp(1.15))
    assert flux_shift(2176) == pytest.approx(math.exp(0.825))
    t = torch.linspace(0.01, 0.99, 7, dtype=F64)
    mu = 0.9
    flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(FlowMatchSchedule(shift=math.exp(mu)).shift_time(t), flux)


def test_trailing_grid_is_the_shifted_uniform_grid():
    ts = sampling_timesteps(FlowMatchSchedule(shift=3.0), 4)
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=F64)
    expected = 3 * plain / (1 + 2 * plain)
    assert torch.allclose(ts, torch.cat([expected, torch.zeros(1, dtype=F64)]))
    with pytest.raises(ValueError, match="finite top noise level"):
        sampling_timesteps(FLOW, 4, spacing="karras")
    assert sampling_timesteps(FLOW, 4, spacing="karras", t_start=0.99)[0] == pytest.approx(0.99)


# ---- samplers -------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(steps=st.integers(1, 30), shift=st.floats(0.3, 6.0), seed=st.integers(0, 1000))
def test_flow_euler_is_ddim_with_eta_zero_for_any_velocity_model(steps, shift, seed):
    """x_t + (s - t) u_hat = (1 - s) x0_hat + s eps_hat: the same map, to round-off."""
    sched = FlowMatchSchedule(shift=shift)
    den = ModelDenoiser(VelocityMLP(seed=seed), sched, parameterization="flow")
    x = torch.randn(64, 2, generator=_seed(seed), dtype=F64)
    ts = sampling_timesteps(sched, steps)
    x_ddim = ddim(den, x, ts, schedule=sched)
    x_table = SAMPLERS["flow-euler"](den, x, ts, schedule=sched)
    x_euler = x.clone()  # the flow-matching Euler loop, written out
    with torch.no_grad():
        for t, s in zip(ts[:-1].tolist(), ts[1:].tolist()):
            u = den.network_output(x_euler, torch.full((64,), t, dtype=F64))
            x_euler = x_euler + (s - t) * u
    assert torch.allclose(x_ddim, x_euler, atol=1e-12, rtol=0)
    assert torch.equal(x_table, x_ddim)
    # EDM's Euler (in y = x / alpha, started at alpha = 0 in the limit) is the same map
    assert torch.allclose(SAMPLERS["euler"](den, x, ts, schedule=sched), x_euler, atol=1e-10)


def test_flow_heun_in_the_schedules_time_is_edms_heun_on_the_edm_schedule():
    """On EDM's schedule (alpha = 1, sigma = t) the velocity alpha' x0 + sigma' eps is eps and
    (t, x) = (s, y): flow-heun is EDM's Heun step for step; with second_order=False on the
    flow schedule it is flow-euler (DDIM)."""
    edm = EDMSchedule()
    den = GaussianDenoiser(MEAN, COV, edm)
    x = 80 * torch.randn(50, 2, generator=_seed(2), dtype=F64)
    ts = sampling_timesteps(edm, 10, spacing="karras")
    assert torch.allclose(
        flow_heun(den, x, ts, schedule=edm), edm_sampler(den, x, ts, schedule=edm)
    )
    fden = ModelDenoiser(VelocityMLP(seed=4), FLOW, parameterization="flow")
    fts = sampling_timesteps(FLOW, 9)
    euler = flow_heun(fden, x[:, :2] / 80, fts, schedule=FLOW, second_order=False)
    assert torch.allclose(euler, ddim(fden, x / 80, fts, schedule=FLOW), atol=1e-12)


def test_edm_heun_steps_from_pure_noise_by_the_trapezoid_rule_in_r():
    """From t = 1 (s = inf) EDM's Heun steps in r = 1 / s, z = x / sigma, where dz/dr = D: for a
    denoiser with D = a + b r the trapezoid rule is exact, z(r1) = z0 + a r1 + b r1^2 / 2."""
    a, b = torch.tensor([0.3, -0.7], dtype=F64), torch.tensor([1.1, 0.4], dtype=F64)

    def linear_in_r(xt, t, cond=None):
        alpha, sigma = FLOW.alpha_sigma(t)
        x0 = a + b * (alpha / sigma)[:, None]
        return Prediction(x0=x0, eps=(xt - alpha[:, None] * x0) / sigma[:, None])

    x = torch.randn(5, 2, generator=_seed(0), dtype=F64)
    t1 = 0.8
    r1 = (1 - t1) / t1
    out = edm_sampler(linear_in_r, x, torch.tensor([1.0, t1], dtype=F64), schedule=FLOW)
    assert torch.allclose(out, t1 * (x + a * r1 + b * r1**2 / 2), atol=1e-12)


@pytest.mark.parametrize("name,order", [("flow-euler", 1), ("flow-heun", 2), ("heun", 2)])
def test_flow_samplers_converge_at_their_order_to_the_exact_flow_map(name, order):
    """Exact velocity of Gaussian data; the error against x0 = m + C^(1/2) x1 falls by
    2^order per doubling of the steps (a sampler with the wrong sign of (s - t) or a
    half-weighted Heun correction stays at order 1 or diverges)."""
    den = GaussianDenoiser(MEAN, COV, FLOW)
    x1 = torch.randn(200, 2, generator=_seed(1), dtype=F64)
    exact = _gaussian_flow_map(x1)
    errs = []
    for steps in (8, 16, 32, 64):
        x = sample(den, FLOW, (200, 2), sampler=name, steps=steps, x_init=x1, dtype=F64)
        errs.append(float((x - exact).abs().max()))
    rates = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
    assert all(order - 0.35 < r < order + 0.5 for r in rates[1:]), (errs, rates)


def test_stochastic_flow_sampler_needs_the_network_at_the_noised_point():
    """Churn done right samples the data law; evaluating the velocity at the point before the
    noise increase (diffusers issue 8549) does not."""
    den = GaussianDenoiser(MEAN, COV, FLOW)

    class Stale:  # the prediction of the last *un-noised* sample, as the buggy loop uses
        def __init__(self):
            self.x_prev = None

        def __call__(self, x, t, cond=None):
            return den(x if self.x_prev is None else self.x_prev, t)

    kw = {"sampler": "flow-heun", "steps": 40, "dtype": F64, "s_churn": 20.0}
    good = sample(den, FLOW, (20_000, 2), generator=_seed(3), **kw)
    assert torch.allclose(good.mean(0), MEAN, atol=0.04)
    assert torch.allclose(torch.cov(good.T), COV, atol=0.06)

    ts = sampling_timesteps(FLOW, 40)
    x = torch.randn(20_000, 2, generator=_seed(3), dtype=F64)
    gen = _seed(4)
    gamma = min(20.0 / 40, math.sqrt(2) - 1)
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist()):  # the buggy order: u at (x, t)
        u = den(x, torch.full((x.shape[0],), t, dtype=F64)).u()
        t_hat = (
            t if t == 1 else float(FLOW.t_from_edm_sigma(torch.tensor(t / (1 - t) * (1 + gamma))))
        )
        if t_hat > t:
            a = (1 - t_hat) / (1 - t)
            x = a * x + math.sqrt(t_hat**2 - a**2 * t**2) * torch.randn(
                x.shape, generator=gen, dtype=F64
            )
        x = x + (s - t_hat) * u
    assert not torch.allclose(torch.cov(x.T), COV, atol=0.06)


def test_flow_samplers_reproduce_a_gaussian_mixture():
    """Mixture masses of the samples (Bayes' rule per point) match those of fresh data; the
    exact velocity of a Gaussian mixture, shifted grids from pure noise."""
    gmm = default_gmm()
    ref = gmm.sample(20_000, _seed(101), dtype=F64)
    den = GMMDenoiser(gmm, FlowMatchSchedule(shift=2.0))
    k = gmm.num_components

    def mass(x):
        log_r = torch.stack(
            [
                gmm.weights[j].log()
                + torch.distributions.MultivariateNormal(gmm.means[j], gmm.covariances[j]).log_prob(
                    x
                )
                for j in range(k)
            ],
            dim=1,
        )
        return torch.bincount(log_r.argmax(1), minlength=k).to(F64) / x.shape[0]

    for name in ("flow-heun", "dpm++2m"):
        x = sample(
            den, den.schedule, (20_000, 2), sampler=name, steps=30, generator=_seed(5), dtype=F64
        )
        assert torch.allclose(mass(x), mass(ref), atol=0.02), (name, mass(x), mass(ref))


def test_classifier_free_guidance_of_a_velocity_model_guides_the_velocity():
    """The wrappers work unchanged: guiding (x0_hat, eps_hat) with scale s is guiding u_hat,
    u_null + s (u_cond - u_null), because both are affine in u_hat at fixed (x_t, t)."""
    from difflab.guidance import ClassifierFreeGuidance

    nets = [VelocityMLP(seed=1), VelocityMLP(seed=2)]  # label 0: conditional, 1: null

    def by_label(x, t, cond):
        pick = (cond == 1)[:, None]
        return torch.where(pick, nets[1](x, t), nets[0](x, t))

    den = ModelDenoiser(by_label, FLOW, parameterization="flow")
    guided = ClassifierFreeGuidance(den, scale=3.0, null_label=1)
    x = torch.randn(40, 2, generator=_seed(0), dtype=F64)
    t = torch.rand(40, generator=_seed(1), dtype=F64)
    labels = torch.zeros(40, dtype=torch.long)
    with torch.no_grad():
        u_c, u_n = nets[0](x, t), nets[1](x, t)
        u_guided = guided(x, t, labels).u()
    assert torch.allclose(u_guided, u_n + 3.0 * (u_c - u_n), atol=1e-12)


# ---- the loss -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_flow_loss_identities(t, seed):
    """||u_hat - u||^2 = ||eps_hat - eps||^2 / (1 - t)^2 = ||x0_hat - x0||^2 / t^2, and the
    weighting of a target through x0 carries it: flow + snr weighting = the eps loss."""
    den = ModelDenoiser(VelocityMLP(seed=seed), FLOW, parameterization="flow")
    x0 = torch.randn(16, 2, generator=_seed(seed), dtype=F64)
    noise = torch.randn(16, 2, generator=_seed(seed + 1), dtype=F64)
    kw = {"t": torch.tensor(t, dtype=F64), "noise": noise}
    raw = {
        tg: diffusion_loss(den, x0, target=tg, **kw).terms["raw"] for tg in ("flow", "eps", "x0")
    }
    assert torch.allclose(raw["flow"], raw["eps"] / (1 - t) ** 2, rtol=1e-9)
    assert torch.allclose(raw["flow"], raw["x0"] / t**2, rtol=1e-9)
    snr_flow = diffusion_loss(den, x0, target="flow", weighting="snr", **kw).per_sample
    assert torch.allclose(snr_flow, raw["eps"], rtol=1e-9)
    lam = FLOW.logsnr(torch.tensor(t, dtype=F64))
    assert float(loss_weight(lam, weighting="snr", target="flow")) == pytest.approx(
        (1 - t) ** 2, rel=1e-9
    )


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_exact_velocity_reaches_the_irreducible_flow_loss(t):
    """For Gaussian data E||u - E[u | x_t]||^2 = tr(C (alpha^2 C + sigma^2 I)^-1) (the
    posterior covariance of x0 times 1/t^2); the Monte Carlo loss of the exact field matches it
    and any perturbed field does worse."""
    den = ModelDenoiser(
        ExactVelocity(GaussianDenoiser(MEAN, COV, FLOW)), FLOW, parameterization="flow"
    )
    n = 100_000
    x0 = MEAN + torch.randn(n, 2, generator=_seed(7), dtype=F64) @ torch.linalg.cholesky(COV).T
    out = diffusion_loss(den, x0, t=torch.tensor(t, dtype=F64), generator=_seed(8))
    per = out.terms["raw"] * 2  # the mean over the 2 dimensions -> the squared norm
    lam = torch.linalg.eigvalsh(COV)
    floor = float((lam / ((1 - t) ** 2 * lam + t**2)).sum())
    assert float(per.mean()) == pytest.approx(floor, abs=4 * float(per.std()) / math.sqrt(n))
    worse = ModelDenoiser(
        lambda x, tt, c: 1.05 * ExactVelocity(den.model.oracle)(x, tt),
        FLOW,
        parameterization="flow",
    )
    worse_loss = diffusion_loss(worse, x0, t=torch.tensor(t, dtype=F64), generator=_seed(8))
    assert float(worse_loss.loss) > float(out.loss)


# ---- time distributions ---------------------------------------------------------------------


def _ks(samples: torch.Tensor, cdf) -> float:
    x, _ = samples.sort()
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=F64) / n
    return float(torch.maximum(hi - f, f - (hi - 1 / n)).abs().max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(
    "method,params",
    [("logit-normal", (0.0, 1.0)), ("logit-normal", (0.5, 0.6)), ("mode", 1.29), ("uniform", None)],
)
def test_flow_times_follow_their_closed_form_law(method, params, shift):
    """Kolmogorov-Smirnov against the closed-form CDF after the shift: logit-normal
    P(t <= x) = Phi((logit x - m) / s), mode P(t <= x) = 1 - f^-1(x), uniform x; through the
    shift, CDF(unshift(x)). n = 40000: the 0.1% KS bound is 1.95 / sqrt(n) ~ 0.0098."""
    sched = FlowMatchSchedule(shift=shift)
    n = 40_000
    kw = {}
    if method == "logit-normal":
        kw = {"logit_mean": params[0], "logit_std": params[1]}
    elif method == "mode":
        kw = {"mode_scale": params}
    t = sample_flow_times(sched, n, method=method, generator=_seed(11), **kw)
    normal = torch.distributions.Normal(0.0, 1.0)

    def base_cdf(x):
        if method == "uniform":
            return x
        if method == "logit-normal":
            return normal.cdf((torch.logit(x) - params[0]) / params[1]).to(F64)
        # mode: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) is decreasing; invert by bisection
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            f = 1 - mid - params * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
            lo, hi = torch.where(f > x, mid, lo), torch.where(f > x, hi, mid)
        return 1 - (lo + hi) / 2

    d = _ks(t, lambda x: base_cdf(sched.unshift_time(x.clamp(1e-12, 1 - 1e-12))))
    assert d < 1.95 / math.sqrt(n), d
    if method == "mode" and shift == 1.0:  # E[t] = 1/2 exactly (E cos^2(pi u / 2) = 1/2)
        assert float(t.mean()) == pytest.approx(0.5, abs=4 * float(t.std()) / math.sqrt(n))


def test_time_samplings_are_checked_against_the_schedule():
    from difflab.objectives import check_time_sampling

    assert check_time_sampling(FLOW, "logit-normal") == "logit-normal"
    for bad, sched in (("mode", EDMSchedule()), ("logit-normal", EDMSchedule())):
        with pytest.raises(ValueError, match="flow-matching schedule"):
            check_time_sampling(sched, bad)
    with pytest.raises(ValueError, match="discrete"):
        check_time_sampling(FLOW, "importance")
    with pytest.raises(ValueError, match="choose one of"):
        check_time_sampling(FLOW, "beta")


def test_the_loss_draws_its_times_from_sample_flow_times():
    """diffusion_loss on the flow schedule draws t first from the generator, by the given law."""
    den = ModelDenoiser(VelocityMLP(), FLOW, parameterization="flow")
    x0 = torch.zeros(50, 2, dtype=F64)
    for method, kw, flow_kw in (
        (
            "logit-normal",
            {"logit_mean": 0.4, "logit_std": 0.7},
            {"flow_logit_mean": 0.4, "flow_logit_std": 0.7},
        ),
        ("mode", {"mode_scale": 0.5}, {"flow_mode_scale": 0.5}),
        ("uniform", {}, {}),
    ):
        t = diffusion_loss(den, x0, t_sampling=method, generator=_seed(3), **flow_kw).t
        assert torch.equal(t, sample_flow_times(FLOW, 50, method=method, generator=_seed(3), **kw))


def test_logit_normal_is_edm_lognormal_on_this_schedule():
    """logit(t) = log(EDM sigma) here: both draw the same times from the same normal draws."""
    a = sample_flow_times(
        FLOW, 100, method="logit-normal", logit_mean=-1.2, logit_std=1.2, generator=_seed(2)
    )
    b = FLOW.t_from_edm_sigma(
        torch.exp(-1.2 + 1.2 * torch.randn(100, generator=_seed(2), dtype=F64))
    )
    assert torch.allclose(a, b, atol=1e-14)


# ---- likelihood -----------------------------------------------------------------------------


def test_pf_ode_nll_of_a_flow_model_is_the_exact_gaussian_density():
    """Velocity-parameterised exact model on the flow schedule: -log p_{t_eps}(x) of
    x_{t_eps} ~ N((1 - t_eps) m, (1 - t_eps)^2 C + t_eps^2 I), from the default t_max (EDM
    sigma 1000, since t = 1 is infinitely far in log-SNR)."""
    den = ModelDenoiser(
        ExactVelocity(GaussianDenoiser(MEAN, COV, FLOW)), FLOW, parameterization="flow"
    )
    x = MEAN + torch.randn(6, 2, generator=_seed(9), dtype=F64)
    te = FLOW.t_min
    law = torch.distributions.MultivariateNormal(
        (1 - te) * MEAN, (1 - te) ** 2 * COV + te**2 * torch.eye(2, dtype=F64)
    )
    nll = pf_ode_nll(den, x, FLOW, steps=96, hutchinson="exact")
    assert torch.allclose(nll, -law.log_prob(x), atol=5e-4)
    with pytest.raises(ValueError, match="finite top noise level"):
        pf_ode_nll(den, x, FLOW, t_max=1.0)


# ---- peers ----------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_flow_match_euler_gives_the_same_trajectory(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler (t = 1 is noise too; its network time is
    1000 sigma) on the same velocity network and noise equals difflab's flow-euler on diffusers'
    own sigmas, to float32 round-off; given the unshifted sigmas linspace(1, 1/N, N) it shifts
    them once into difflab's trailing grid."""
    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist())
    ours = FlowMatchSchedule(shift=shift)
    assert torch.allclose(sched.sigmas.to(F64), sampling_timesteps(ours, steps), atol=1e-6)

    net = VelocityMLP(seed=3).float()
    x1 = torch.randn(32, 2, generator=_seed(6))
    x = x1.clone()
    with torch.no_grad():
        for timestep in sched.timesteps:  # the network sees diffusers' timestep, 1000 sigma
            u = net(x, torch.full((32,), float(timestep)))
            x = sched.step(u, timestep, x).prev_sample
    # the same network, called by difflab with 1000 t (time_scale), as diffusers calls it
    den = ModelDenoiser(net, ours, parameterization="flow", time_scale=1000.0)
    ts = sched.sigmas.to(F64)
    mine = sample(den, ours, (32, 2), sampler="flow-euler", steps=steps, x_init=x1)
    mine_on_theirs = SAMPLERS["flow-euler"](den, x1, ts, schedule=ours)
    assert torch.allclose(mine_on_theirs, x, atol=1e-5)
    assert torch.allclose(mine, x, atol=1e-5)


@pytest.mark.parity
def test_torchcfm_gives_the_same_xt_and_target_after_the_time_flip():
    """torchcfm's ConditionalFlowMatcher(sigma=0) runs from noise (t = 0) to data (t = 1):
    x_t = t x1 + (1 - t) x0, u_t = x1 - x0. With difflab's t' = 1 - t (noise at 1) the point is
    the same and the target is minus difflab's u = eps - x0."""
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    matcher = cfm.ConditionalFlowMatcher(sigma=0.0)
    data = torch.randn(64, 3, generator=_seed(1), dtype=F64)
    noise = torch.randn(64, 3, generator=_seed(2), dtype=F64)
    t_cfm = torch.rand(64, generator=_seed(3), dtype=F64)
    t_out, xt_cfm, ut_cfm = matcher.sample_location_and_conditional_flow(noise, data, t=t_cfm)
    t_ours = 1 - t_out

    captured = {}

    def net(x, t, cond=None):
        captured["xt"] = x
        return torch.zeros_like(x)

    den = ModelDenoiser(net, FLOW, parameterization="flow")
    out = diffusion_loss(den, data, t=t_ours, noise=noise)
    assert torch.allclose(captured["xt"], xt_cfm, atol=1e-12)
    # with a zero network the raw loss is the mean square of the target: check the target itself
    assert torch.allclose(out.terms["raw"], (ut_cfm**2).mean(1), atol=1e-12)
    from difflab.parameterization import u_from_x0_eps

    assert torch.allclose(u_from_x0_eps(data, noise), -ut_cfm, atol=1e-12)
