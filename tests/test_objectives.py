"""Training objectives: exact targets give zero loss, the targets' errors are related by the
closed-form SNR factors, weightings match their formulas, time samplers have the right laws,
importance weights are unbiased, and the hybrid loss stops the gradient on the mean."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from difflab.likelihood import vlb_term
from difflab.objectives import (
    ImportanceTimeSampler,
    diffusion_loss,
    elementwise_loss,
    loss_weight,
    sample_training_times,
)
from difflab.parameterization import ModelDenoiser
from difflab.schedules import DiscreteSchedule, EDMSchedule

F64 = torch.float64
TARGETS = ("eps", "x0", "v", "edm")
SD = 0.5  # sigma_data


def _alpha_sigma(schedule, t):
    """alpha, sigma from first principles: sqrt(alpha_bar_t) for DDPM, (1, t) for EDM."""
    if isinstance(schedule, EDMSchedule):
        return torch.ones_like(t), t
    ab = schedule.alpha_bar[t.long()]
    return ab.sqrt(), (1 - ab).sqrt()


def _true_target(kind, x0, eps, alpha, sigma):
    a, s = alpha[:, None], sigma[:, None]
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    se = s / a  # EDM sigma of y = xt / alpha; Table 1 [Karras 2022]
    c_skip = SD**2 / (se**2 + SD**2)
    c_out = se * SD / (se**2 + SD**2).sqrt()
    return (x0 - c_skip * (a * x0 + s * eps) / a) / c_out


class ExactNet(nn.Module):
    """A fake network that outputs the true target for the batch it was built with."""

    def __init__(self, kind, x0, eps, t, schedule, perturb=0.0):
        super().__init__()
        alpha, sigma = _alpha_sigma(schedule, t)
        self.out = _true_target(kind, x0, eps, alpha, sigma) + perturb

    def forward(self, x, t, cond=None):
        return self.out


class LinearNet(nn.Module):
    def __init__(self, dim=3, out=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim + 1, out or dim).double()

    def forward(self, x, t, cond=None):
        return self.lin(torch.cat([x, t.to(x.dtype)[:, None] / 100], 1))


def _batch(n=6, dim=3, seed=0, T=100):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, dim, generator=g, dtype=F64)
    eps = torch.randn(n, dim, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (n,), generator=g).to(F64)
    return x0, eps, t


@pytest.mark.parametrize("schedule", [DiscreteSchedule.from_name("cosine", 100), EDMSchedule()])
@pytest.mark.parametrize("param", TARGETS)
def test_loss_is_zero_for_the_exact_target_and_positive_otherwise(schedule, param):
    x0, eps, t = _batch()
    if isinstance(schedule, EDMSchedule):
        t = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=F64)
    for perturb, check in [(0.0, lambda v: v < 1e-18), (0.1, lambda v: v > 1e-12)]:
        net = ExactNet(param, x0, eps, t, schedule, perturb)
        den = ModelDenoiser(net, schedule, parameterization=param, sigma_data=SD)
        for target in TARGETS:
            if target == "v" and not schedule.variance_preserving:
                continue
            out = diffusion_loss(den, x0, t=t, noise=eps, target=target)
            assert out.per_sample.shape == (6,)
            assert check(float(out.per_sample.max() if perturb == 0 else out.per_sample.min()))


def test_target_errors_are_related_by_snr_factors():
    sched = DiscreteSchedule.from_name("linear", 100)
    x0, eps, t = _batch(n=8)
    den = ModelDenoiser(LinearNet(), sched, parameterization="eps")
    per = {k: diffusion_loss(den, x0, t=t, noise=eps, target=k).per_sample for k in TARGETS}
    alpha, sigma = _alpha_sigma(sched, t)
    # ||x0_hat - x0||^2 = (sigma / alpha)^2 ||eps_hat - eps||^2
    assert torch.allclose(per["x0"], (sigma / alpha) ** 2 * per["eps"], rtol=1e-10)
    # v error = eps error / alpha for alpha^2 + sigma^2 = 1
    assert torch.allclose(per["v"], per["eps"] / alpha**2, rtol=1e-10)
    # EDM: F error^2 = lambda(sigma) * x0 error^2 [Karras 2022, Eq. 8]
    s = sigma / alpha
    lam = (s**2 + SD**2) / (s * SD) ** 2
    assert torch.allclose(per["edm"], lam * per["x0"], rtol=1e-10)


@pytest.mark.parametrize("weighting", ["snr", "min-snr", "edm"])
def test_weightings_mean_the_same_objective_for_every_target(weighting):
    sched = DiscreteSchedule.from_name("cosine", 100)
    x0, eps, t = _batch(n=8, seed=1)
    for param in ("eps", "v"):
        den = ModelDenoiser(LinearNet(seed=2), sched, parameterization=param)
        per = [
            diffusion_loss(den, x0, t=t, noise=eps, target=k, weighting=weighting).per_sample
            for k in TARGETS
        ]
        for other in per[1:]:
            assert torch.allclose(other, per[0], rtol=1e-9)


@settings(max_examples=50, deadline=None)
@given(logsnr=st.floats(-12, 12), gamma=st.floats(0.5, 20))
def test_min_snr_weights_match_their_closed_forms(logsnr, gamma):
    lam = torch.tensor([logsnr], dtype=F64)
    snr = math.exp(logsnr)
    expected = {
        "eps": min(snr, gamma) / snr,
        "x0": min(snr, gamma),
        "v": min(snr, gamma) / (snr + 1),
    }  # Eq. (8-10) [Hang 2023]
    for target, value in expected.items():
        w = loss_weight(lam, weighting="min-snr", target=target, gamma=gamma)
        assert float(w) == pytest.approx(value, rel=1e-10)
    assert float(loss_weight(lam, weighting="snr", target="eps")) == pytest.approx(1.0)
    assert float(loss_weight(lam, weighting="snr", target="x0")) == pytest.approx(snr)
    s2 = math.exp(-logsnr)
    lam_edm = (s2 + SD**2) / (s2 * SD**2)
    w_edm = loss_weight(lam, weighting="edm", target="x0", sigma_data=SD)
    assert float(w_edm) == pytest.approx(lam_edm, rel=1e-10)
    assert float(loss_weight(lam, weighting="edm", target="edm")) == pytest.approx(1.0)
    assert float(loss_weight(lam, weighting="uniform", target="v")) == 1.0


def test_edm_loss_is_lambda_weighted_denoiser_error():
    sched = EDMSchedule()
    x0, eps, _ = _batch(n=5)
    t = torch.tensor([0.002, 0.05, 0.6, 3.0, 80.0], dtype=F64)
    den = ModelDenoiser(LinearNet(), sched, parameterization="edm", sigma_data=SD)
    out = diffusion_loss(den, x0, t=t, noise=eps)
    D = den(x0 + t[:, None] * eps, t).x0
    lam = (t**2 + SD**2) / (t * SD) ** 2  # Eq. (8) [Karras 2022]
    assert torch.allclose(out.per_sample, lam * ((D - x0) ** 2).mean(1), rtol=1e-9)


def test_loss_types():
    pred = torch.tensor([[0.0, 0.5, -3.0]], dtype=F64)
    target = torch.zeros(1, 3, dtype=F64)
    assert float(elementwise_loss(pred, target)) == pytest.approx((0.25 + 9) / 3)
    assert float(elementwise_loss(pred, target, loss_type="l1")) == pytest.approx(3.5 / 3)
    # Huber, delta 1: 0.5 e^2 inside, delta (|e| - delta / 2) outside
    huber = float(elementwise_loss(pred, target, loss_type="huber"))
    assert huber == pytest.approx((0.125 + 2.5) / 3)
    huber2 = float(elementwise_loss(pred, target, loss_type="huber", huber_delta=0.25))
    assert huber2 == pytest.approx((0.25 * 0.375 + 0.25 * 2.875) / 3)
    with pytest.raises(ValueError, match="mse, l1, huber"):
        elementwise_loss(pred, target, loss_type="l3")


# ---- time sampling --------------------------------------------------------------------------


def test_uniform_times():
    g = torch.Generator().manual_seed(0)
    t = sample_training_times(DiscreteSchedule.from_name("linear", 10), 20_000, generator=g)
    assert t.dtype == F64 and bool((t == t.round()).all())
    counts = torch.bincount(t.long(), minlength=11)
    assert counts[0] == 0 and bool((counts[1:] > 0).all())
    chi2 = stats.chisquare(counts[1:].numpy())
    assert chi2.pvalue > 1e-4
    tc = sample_training_times(EDMSchedule(0.1, 3.0), 20_000, generator=g)
    assert float(tc.min()) >= 0.1 and float(tc.max()) <= 3.0
    assert abs(float(tc.mean()) - 1.55) < 5 * 2.9 / math.sqrt(12 * 20_000)


def test_lognormal_times_have_the_right_moments_in_log_sigma():
    n = 100_000
    g = torch.Generator().manual_seed(1)
    t = sample_training_times(EDMSchedule(), n, method="lognormal", generator=g)
    ln_sigma = t.log()
    assert abs(float(ln_sigma.mean()) + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(float(ln_sigma.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    # on a DDPM schedule: mapped through t_from_edm_sigma, clamped to [1, T]
    sched = DiscreteSchedule.from_name("linear", 1000)
    t = sample_training_times(sched, n, method="lognormal", generator=g)
    s = sched.edm_sigma(t)
    inside = (t > 1) & (t < 1000)
    p_low = stats.norm.cdf((math.log(sched.sigma_min) + 1.2) / 1.2)
    frac_low = float((t == 1).double().mean())
    assert abs(frac_low - p_low) < 5 * math.sqrt(p_low / n) + 1e-4
    # the median of sigma is exp(P_mean) (inside the clamped range)
    assert abs(float(s[inside].log().median()) + 1.2) < 0.02


def test_importance_sampler_uniform_before_warmup_then_prefers_large_losses():
    T, history = 20, 3
    sampler = ImportanceTimeSampler(T, history=history, uniform_prob=0.01)
    g = torch.Generator().manual_seed(0)
    t, w = sampler.sample(1000, g)
    assert torch.allclose(w, torch.ones(1000, dtype=F64))
    losses = torch.arange(1, T + 1, dtype=F64)  # L_t = t
    for _ in range(history - 1):
        sampler.update(torch.arange(1, T + 1), losses)
    assert not sampler.warmed_up  # one value still missing everywhere
    sampler.update(torch.arange(1, T), losses[:-1])
    assert not sampler.warmed_up
    sampler.update(torch.tensor([T]), losses[-1:])
    assert sampler.warmed_up
    p = sampler.probabilities()
    expected = 0.99 * losses / losses.sum() + 0.01 / T  # sqrt(E[L^2]) = t
    assert torch.allclose(p, expected)
    t, w = sampler.sample(20_000, g)
    assert float(t.mean()) > (T + 1) / 2 + 2  # high-loss steps are drawn more often
    assert torch.allclose(w, 1 / (T * p[t.long() - 1]))
    # unbiased: E_p[w L_t] = sum_t p_t L_t / (T p_t) = mean_t L_t, exactly
    assert float((p * sampler.weights(torch.arange(1, T + 1)) * losses).sum()) == pytest.approx(
        float(losses.mean()), rel=1e-12
    )


def test_importance_sampler_uses_the_root_mean_square_of_varying_losses():
    """Eq. (18) [Nichol & Dhariwal 2021]: p_t is proportional to sqrt(E[L_t^2]) over the last
    ``history`` losses, not to E[L_t]. Oracle: the RMS of each step's window worked out by
    hand; the two differ when losses vary within a step. Tolerance: float64 rounding only."""
    T, history = 3, 4
    sampler = ImportanceTimeSampler(T, history=history, uniform_prob=0.0)
    windows = {1: [9.0, 0.0, 0.0, 0.0, 4.0], 2: [2.0, 2.0, 2.0, 2.0], 3: [1.0, 3.0, 1.0, 3.0]}
    for step, values in windows.items():  # step 1 gets 5 values: the 9 drops out of the window
        sampler.update(torch.full((len(values),), step), torch.tensor(values))
    assert sampler.warmed_up
    # RMS of the windows: (0, 0, 0, 4) -> 2, (2, 2, 2, 2) -> 2, (1, 3, 1, 3) -> sqrt(5);
    # the means would be 1, 2, 2 (and 3.25 for step 1 had the 9 not dropped)
    rms = torch.tensor([2.0, 2.0, math.sqrt(5.0)], dtype=F64)
    assert torch.allclose(sampler.probabilities(), rms / rms.sum(), rtol=1e-12, atol=0)
    # the uniform mixture and the unbiasing weights 1 / (T p_t) use the same p_t
    mixed = ImportanceTimeSampler(T, history=history, uniform_prob=0.1)
    mixed.load_state_dict(sampler.state_dict())
    p = 0.9 * rms / rms.sum() + 0.1 / T
    assert torch.allclose(mixed.probabilities(), p, rtol=1e-12, atol=0)
    assert torch.allclose(mixed.weights(torch.arange(1, T + 1)), 1 / (T * p), rtol=1e-12, atol=0)


def test_importance_sampler_history_and_resume():
    sampler = ImportanceTimeSampler(4, history=2)
    for value in (1.0, 2.0, 3.0):  # the oldest value is dropped
        sampler.update(torch.tensor([1, 2, 3, 4]), torch.full((4,), value))
    state = sampler.state_dict()
    assert torch.equal(state["losses"][0], torch.tensor([2.0, 3.0], dtype=F64))
    resumed = ImportanceTimeSampler(4, history=2)
    resumed.load_state_dict(state)
    a = sampler.sample(50, torch.Generator().manual_seed(5))
    b = resumed.sample(50, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="needs"):
        ImportanceTimeSampler(5, history=2).load_state_dict(state)


def test_diffusion_loss_with_importance_sampling_updates_the_sampler():
    sched = DiscreteSchedule.from_name("linear", 10)
    den = ModelDenoiser(LinearNet(), sched)
    sampler = ImportanceTimeSampler(10, history=1)
    x0, _, _ = _batch(n=64)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        out = diffusion_loss(den, x0, t_sampling="importance", time_sampler=sampler, generator=g)
    assert int(sampler.state_dict()["counts"].sum()) == 10
    assert torch.allclose(out.per_sample, out.terms["importance_weight"] * out.terms["simple"])
    with pytest.raises(ValueError, match="needs a time_sampler"):
        diffusion_loss(den, x0, t_sampling="importance")
    with pytest.raises(ValueError, match="lognormal"):
        diffusion_loss(den, x0, t_sampling="lognormal", time_sampler=sampler)


# ---- hybrid loss, noise, reproducibility -------------------------------------------------------


class TwoHeads(nn.Module):
    """Mean and variance outputs from separate parameters."""

    def __init__(self, dim=2):
        super().__init__()
        torch.manual_seed(0)
        self.mean = nn.Linear(dim + 1, dim).double()
        self.var = nn.Linear(dim + 1, dim).double()

    def forward(self, x, t, cond=None):
        h = torch.cat([x, t.to(x.dtype)[:, None] / 50], 1)
        return torch.cat([self.mean(h), torch.tanh(self.var(h))], 1)


def test_hybrid_loss_vlb_part_trains_only_the_variance():
    sched = DiscreteSchedule.from_name("linear", 50)
    net = TwoHeads()
    den = ModelDenoiser(net, sched, learned_variance=True)
    x0, eps, _ = _batch(n=16, dim=2)
    t = torch.arange(1, 17, dtype=F64) * 3 - 2  # includes the decoder step t = 1
    out = diffusion_loss(den, x0, t=t, noise=eps, vlb_weight=0.001)
    # the vlb part: lambda * T * L_{t-1} in bits per dimension
    expected = vlb_term(den, x0, t, sched, variance="learned", decoder="gaussian", noise=eps)
    assert torch.allclose(out.terms["vlb"], 0.001 * 50 * expected / (2 * math.log(2)))
    grads = torch.autograd.grad(
        out.terms["vlb"].sum(), list(net.parameters()), allow_unused=True, retain_graph=True
    )
    mean_grads, var_grads = grads[:2], grads[2:]
    assert all(gr is None or float(gr.abs().max()) == 0 for gr in mean_grads)
    assert all(float(gr.abs().max()) > 0 for gr in var_grads)
    grads = torch.autograd.grad(
        out.terms["simple"].sum(), list(net.parameters()), allow_unused=True
    )
    assert all(float(gr.abs().max()) > 0 for gr in grads[:2])
    assert all(gr is None or float(gr.abs().max()) == 0 for gr in grads[2:])
    assert torch.allclose(out.per_sample, out.terms["simple"] + out.terms["vlb"])


def test_offset_noise_and_the_order_of_random_draws():
    sched = DiscreteSchedule.from_name("linear", 100)
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, cond=None):
            seen["xt"], seen["t"] = x, t
            return torch.zeros_like(x)

    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gen = torch.Generator().manual_seed(7)
    diffusion_loss(ModelDenoiser(Spy(), sched), x0, offset_noise=0.1, generator=gen)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(1, 101, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    eps = eps + 0.1 * torch.randn(4, 3, 1, 1, generator=g, dtype=F64)
    ab = sched.alpha_bar[t].reshape(4, 1, 1, 1)
    assert torch.equal(seen["t"], t.to(F64))
    assert torch.allclose(seen["xt"], ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_generator_makes_the_loss_reproducible():
    sched = DiscreteSchedule.from_name("linear", 100)
    den = ModelDenoiser(LinearNet(), sched, parameterization="v")
    x0, _, _ = _batch(n=32)

    def run(seed):
        return diffusion_loss(
            den, x0, weighting="min-snr", generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    assert not torch.equal(a.loss, c.loss)


def test_diffusion_loss_validates_its_options():
    sched = DiscreteSchedule.from_name("linear", 10)
    den = ModelDenoiser(LinearNet(), sched)
    x0, _, _ = _batch()
    with pytest.raises(ValueError, match="uniform, snr, min-snr, edm"):
        diffusion_loss(den, x0, weighting="p2")
    with pytest.raises(ValueError, match="eps, x0, v, edm"):
        diffusion_loss(den, x0, target="score")
    with pytest.raises(ValueError, match="uniform, lognormal, importance"):
        diffusion_loss(den, x0, t_sampling="beta")
    with pytest.raises(ValueError, match="offset_noise"):
        diffusion_loss(den, x0, noise=torch.zeros_like(x0), offset_noise=0.1)
    with pytest.raises(ValueError, match="variance-preserving"):
        edm_den = ModelDenoiser(LinearNet(), EDMSchedule(), parameterization="v")
        diffusion_loss(edm_den, x0, weighting="min-snr")
