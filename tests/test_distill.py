"""Progressive distillation and consistency models against oracles.

Gaussian data x0 ~ N(m, C) has an exact posterior-mean denoiser and an exact, affine
probability-flow map (:mod:`difflab.oracles`), and every deterministic DDIM step of the exact
denoiser is affine too. So a student that is affine at each time of its grid (``AffineTable``)
can represent a distilled sampler or a consistency function *exactly*, and training must
reach them up to the optimiser's tolerance (a few seconds of Adam on 2-D points).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from difflab.distill import (
    ConsistencyDenoiser,
    consistency_distillation_loss,
    ddim_step,
    distillation_target,
    ect_gap,
    ect_loss,
    heun_step,
    karras_levels,
    progressive_distillation,
    progressive_grids,
    progressive_loss,
    progressive_round,
    pseudo_huber,
)
from difflab.oracles import GaussianConsistencyFunction, GaussianDenoiser
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.samplers import ddim, edm_sampler
from difflab.schedules import DiscreteSchedule, EDMSchedule
from helpers import randomise

F64 = torch.float64
LINEAR = DiscreteSchedule.from_name("linear", 1000)
EDM = EDMSchedule()
MEAN = torch.tensor([0.8, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def _gaussian_data(batch: int, seed: int):
    """An endless iterator of batches x0 ~ N(MEAN, COV)."""
    g, chol = _seed(seed), torch.linalg.cholesky(COV)
    while True:
        yield MEAN + torch.randn(batch, 2, generator=g, dtype=F64) @ chol.T


class AffineTable(nn.Module):
    """A denoiser with an affine x0 = W_k c_in x + b_k for each time ts[k] of a fixed set,
    c_in = 1 / sqrt(alpha^2 + sigma^2) (the input scaled to unit variance, as EDM's c_in, so
    that the weights are O(1) at every noise level).

    Initialised to the exact Gaussian posterior mean at every time (a "trained teacher"):
    E[x0 | x] = G x + (m - alpha G m), G = alpha C (alpha^2 C + sigma^2 I)^-1.
    """

    def __init__(self, ts, schedule):
        super().__init__()
        self.register_buffer("ts", torch.as_tensor(ts, dtype=F64).flatten())
        self.schedule = schedule
        a, s = schedule.alpha_sigma(self.ts)
        gains = [ai * COV @ torch.linalg.inv(ai**2 * COV + si**2 * torch.eye(2, dtype=F64))
                 for ai, si in zip(a, s)]  # fmt: skip
        g = torch.stack(gains)
        self.register_buffer("c_in", 1 / (a**2 + s**2).sqrt())
        self.w = nn.Parameter(g / self.c_in[:, None, None])
        self.b = nn.Parameter(MEAN - a[:, None] * (g @ MEAN))

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=F64).expand(x.shape[0])
        k = (t[:, None] - self.ts[None]).abs().argmin(1)
        assert torch.allclose(self.ts[k], t), "AffineTable called off its times"
        x0 = (self.w[k] @ x[:, :, None])[:, :, 0] * self.c_in[k, None] + self.b[k]
        a, s = self.schedule.alpha_sigma(t)
        return Prediction(x0=x0, eps=(x - a[:, None] * x0) / s[:, None])


# ---- progressive distillation -----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 1000).flatmap(
        lambda t: st.tuples(st.just(t), st.integers(1, t - 1)).flatmap(
            lambda tm: st.tuples(st.just(tm[0]), st.just(tm[1]), st.integers(0, tm[1] - 1))
        )
    ),
    st.integers(0, 2**16),
)
def test_the_target_plugged_back_gives_the_teachers_two_steps(times, seed):
    """One student DDIM step from z_t with x0 = x~ lands exactly on the teacher's z_t''.

    Bug caught: a flipped ratio sigma_t / sigma_t'' or alpha_t'' for alpha_t in the target."""
    t, t_mid, t_end = (torch.tensor([float(u)], dtype=F64) for u in times)
    g = _seed(seed)
    z_t = torch.randn(1, 3, generator=g, dtype=F64)
    den = GaussianDenoiser(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64) * 0.7, LINEAR)
    two = ddim(den, z_t, torch.cat([t, t_mid, t_end]), schedule=LINEAR)  # the library sampler
    (a_t, s_t), (a_end, s_end) = LINEAR.alpha_sigma(t), LINEAR.alpha_sigma(t_end)
    x_tilde = distillation_target(z_t, two, a_t, s_t, a_end, s_end)
    one = ddim_step(x_tilde, z_t, a_t, s_t, a_end, s_end)
    assert torch.allclose(one, two, atol=1e-9, rtol=1e-9)


class _Zero(nn.Module):
    def forward(self, x, t, cond=None):
        return Prediction(x0=torch.zeros_like(x), eps=torch.zeros_like(x))


@pytest.mark.parametrize("t", [100.0, 900.0])  # SNR > 1 and SNR < 1
@pytest.mark.parametrize("weighting", ["truncated-snr", "snr+1"])
def test_the_weighting_is_max_snr_1_or_snr_plus_1_at_the_student_time(t, weighting):
    """A teacher that always predicts c makes x~ = c (DDIM keeps a constant x0), so a student
    that predicts 0 has loss w(t) c^2 with w = max(SNR, 1) or SNR + 1 [Salimans & Ho 2022,
    Sec. 4]. Bugs caught: min for max, SNR at t'' instead of t, log-SNR for SNR."""
    c = torch.tensor([0.3, -1.2], dtype=F64)

    def constant(x, tt, cond=None):
        a, s = LINEAR.alpha_sigma(tt)
        x0 = c.expand_as(x)
        return Prediction(x0=x0, eps=(x - a[:, None] * x0) / s[:, None])

    ts = torch.tensor([t, t / 2, 0.0], dtype=F64)
    x0 = next(_gaussian_data(64, 0))
    loss = progressive_loss(_Zero(), constant, x0, schedule=LINEAR, ts_teacher=ts,
                            weighting=weighting, generator=_seed(1))  # fmt: skip
    snr = float(LINEAR.logsnr(t).exp())
    w = max(snr, 1.0) if weighting == "truncated-snr" else snr + 1
    assert loss.item() == pytest.approx(w * float(c.pow(2).mean()), rel=1e-10)


def _ddim_from(den, x_t, ts):
    return ddim(den, x_t, ts, schedule=LINEAR)


def test_a_distilled_2_step_student_matches_the_4_step_exact_teacher():
    """Distilling the exact Gaussian denoiser over 4 DDIM steps: the affine student's 2 DDIM
    steps reproduce the teacher's 4 (an affine map it can represent exactly), while the
    teacher's own 2 steps do not. Bug caught: a target from one teacher step, or the teacher's
    midpoint at t'' (then the student learns the teacher's 2-step sampler)."""
    teacher = GaussianDenoiser(MEAN, COV, LINEAR)
    ts_teacher, ts_student = progressive_grids(LINEAR, 2)
    student = AffineTable(ts_student[:-1], LINEAR)  # starts as the exact teacher
    data = _gaussian_data(128, 0)
    progressive_round(student, teacher, data, schedule=LINEAR, ts_teacher=ts_teacher,
                      iterations=200, lr=0.02, generator=_seed(1))  # fmt: skip
    x_t = torch.randn(2000, 2, generator=_seed(2), dtype=F64)
    with torch.no_grad():
        want = _ddim_from(teacher, x_t, ts_teacher)
        got = _ddim_from(student, x_t, ts_student)
        before = _ddim_from(teacher, x_t, ts_student)
    rms = lambda d: float(d.pow(2).mean().sqrt())  # noqa: E731
    assert rms(before - want) > 0.02  # the teacher at 2 steps is visibly off
    assert rms(got - want) < 2e-3, (rms(got - want), rms(before - want))


def test_rounds_halve_the_steps_from_copies_of_the_previous_model():
    """4 -> 2 -> 1 steps: each round's student starts from the previous model (the input is
    left unchanged), on_round sees N = 2 then 1, and the 1-step student reproduces the
    4-step teacher. Bug caught: training the teacher in place or not halving the grid."""
    _, ts_1 = progressive_grids(LINEAR, 1)
    ts_4, _ = progressive_grids(LINEAR, 2)
    model = AffineTable(ts_4[:-1], LINEAR)  # the exact denoiser at every teacher time
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    student = progressive_distillation(
        model, _gaussian_data(128, 0), schedule=LINEAR, teacher_steps=4, final_steps=1,
        iterations=200, lr=0.02, generator=_seed(1), on_round=lambda n, s: seen.append(n),
    )  # fmt: skip
    assert seen == [2, 1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    x_t = torch.randn(2000, 2, generator=_seed(2), dtype=F64)
    with torch.no_grad():
        want = _ddim_from(model, x_t, ts_4)
        got = _ddim_from(student, x_t, ts_1)
    assert float((got - want).pow(2).mean().sqrt()) < 5e-3
    with pytest.raises(ValueError, match="power of 2"):
        progressive_distillation(model, iter([]), schedule=LINEAR, teacher_steps=6,
                                 iterations=1)  # fmt: skip


# ---- consistency models -----------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, t, cond=None):
        t_in = (t.to(x.dtype) / 1000)[:, None].expand(x.shape[0], 1)
        return self.net(torch.cat([x, t_in], 1))


@settings(max_examples=16, deadline=None)
@given(
    st.integers(0, 2**16),
    st.sampled_from(["eps", "x0", "v", "edm"]),
    st.sampled_from(["linear", "edm"]),
    st.floats(0.05, 3.0),
)
def test_the_boundary_condition_holds_exactly_for_any_weights(seed, param, sched_name, std):
    """f(x, t_min) = x / alpha(t_min) bit for bit (= x on the EDM schedule), whatever the
    weights and the inner parameterisation [Song 2023, Eq. 3 and App. C]. Bug caught: c_skip
    with sigma^2 instead of (sigma - sigma_min)^2, or c_out without the (sigma - sigma_min)."""
    sched = {"linear": LINEAR, "edm": EDM}[sched_name]
    inner = ModelDenoiser(randomise(_Tiny().double(), seed, std), sched, parameterization=param)
    f = ConsistencyDenoiser(inner, sched)
    x = torch.randn(16, 2, generator=_seed(seed), dtype=F64) * 3
    t = torch.full((16,), sched.t_min, dtype=F64)
    out = f(x, t).x0
    assert torch.equal(out, x / sched.alpha(t)[:, None])
    if sched_name == "edm":
        assert torch.equal(out, x)


def test_wrapping_a_teacher_starts_close_to_it_away_from_the_boundary():
    """ECT's initialisation: f = D + O(sigma_min / sigma) for sigma >> sigma_min, so the
    wrapped teacher starts as the teacher. Bug caught: F used as D (f = sigma_data D at high
    noise)."""
    den = GaussianDenoiser(MEAN, COV, EDM)
    f = ConsistencyDenoiser(den, EDM)
    x = MEAN + 5.0 * torch.randn(256, 2, generator=_seed(0), dtype=F64)
    for s in (1.0, 5.0, 40.0):
        t = torch.full((256,), s, dtype=F64)
        gap = float((f(x, t).x0 - den(x, t).x0).abs().max())
        assert gap < 10 * EDM.sigma_min / s * float(x.abs().max()), (s, gap)


@pytest.mark.parametrize("sched", [LINEAR, EDM])
def test_heun_step_is_the_edm_samplers_step_per_sample(sched):
    """With a different time per sample, each row equals the EDM sampler's Heun step on its
    own two-point grid. Bug caught: the corrector evaluated at t instead of t_next, or alpha
    dropped on a VP schedule."""
    den = GaussianDenoiser(MEAN, COV, sched)
    levels = karras_levels(sched, 10)
    t_next, t = levels[2:6], levels[3:7]
    x = torch.randn(4, 2, generator=_seed(0), dtype=F64) * sched.sigma(t)[:, None]
    out = heun_step(den, x, t, t_next, schedule=sched)
    for i in range(4):
        ref = edm_sampler(den, x[i : i + 1], torch.stack([t[i], t_next[i]]), schedule=sched)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-12, rtol=1e-12)


def test_consistency_distillation_recovers_the_gaussian_pf_ode_map():
    """Consistency distillation of the exact Gaussian denoiser on 12 Karras levels. Its fixed
    point is the teacher's chain of Heun steps from each level down to sigma_min (where
    f = y): the consistency model (affine at each level, initialised as the teacher) must
    reach that chain, which is within the Heun error of 11 steps (~0.1 here) of the exact
    probability-flow map f(x, t) = m + sqrt(C (C + s^2)^-1)(x - m), while the teacher's
    posterior mean is ~0.9 away at high noise. Bug caught: the target network evaluated at
    t_{n+1} (the loss is then zero and f stays the posterior mean), or the Heun step taken
    the wrong way."""
    levels = karras_levels(EDM, 12)
    model = ConsistencyDenoiser(AffineTable(levels, EDM), EDM)
    teacher = GaussianDenoiser(MEAN, COV, EDM)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    data, g = _gaussian_data(256, 0), _seed(1)
    for _ in range(300):
        loss = consistency_distillation_loss(model, model, teacher, next(data), schedule=EDM,
                                             ts=levels, generator=g)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    exact = GaussianConsistencyFunction(MEAN, COV, EDM)
    rms = lambda d: float(d.pow(2).mean().sqrt())  # noqa: E731
    with torch.no_grad():
        for k in range(1, 12):
            t = float(levels[k])
            x = MEAN + math.sqrt(1 + t**2) * torch.randn(512, 2, generator=_seed(3), dtype=F64)
            tt = torch.full((512,), t, dtype=F64)
            f = model(x, tt).x0
            chain = edm_sampler(teacher, x, levels[: k + 1].flip(0), schedule=EDM)
            assert rms(f - chain) < 0.025, (t, rms(f - chain))
            err, far = rms(f - exact(x, tt).x0), rms(teacher(x, tt).x0 - exact(x, tt).x0)
            assert err < 0.15 and (t < 0.2 or err < far / 4), (t, err, far)


def test_ect_gap_schedule_against_its_formula():
    """r = t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)), clipped at 0 [Geng 2024, Sec. 3.2]:
    stage 0 gives r = 0 up to t = ln 7 (q = 2, k = 8: the denoising loss) and r -> t / 2 at
    high noise, and each stage halves the gap t - r. Bug caught: q^stage for q^(stage + 1),
    sigmoid(b t) for sigmoid(-b t)."""
    t = torch.tensor([0.002, 0.1, 1.0, 5.0, 80.0], dtype=F64)
    r0 = ect_gap(t, 0)
    assert torch.equal(r0[:3], torch.zeros(3, dtype=F64)) and float(r0[-1]) == pytest.approx(40.0)
    for stage in (0, 1, 3, 6):
        want = [
            max(s * (1 - (1 + 8 / (1 + math.exp(s))) / 2 ** (stage + 1)), 0.0) for s in t.tolist()
        ]
        assert ect_gap(t, stage).tolist() == pytest.approx(want, rel=1e-12)
    gap = lambda st_: t[-1] - ect_gap(t[-1:], st_)  # noqa: E731
    assert float(gap(4) / gap(5)) == pytest.approx(2.0, rel=1e-12)


def test_pseudo_huber_against_its_formula_and_limits():
    """sqrt(||d||^2 + c^2) - c: the L2 norm at c = 0, ||d||^2 / (2c) for ||d|| << c, and
    ||d|| - c for ||d|| >> c. Bug caught: a mean over dimensions, or a missing "- c"."""
    d = torch.randn(5, 3, 4, generator=_seed(0), dtype=F64)
    norm = d.flatten(1).norm(dim=1)
    assert torch.allclose(pseudo_huber(d, 0.0), norm, rtol=1e-14)
    assert torch.allclose(pseudo_huber(d, 0.3), (norm**2 + 0.09).sqrt() - 0.3, rtol=1e-14)
    assert torch.allclose(pseudo_huber(1e-4 * d, 1.0), (1e-4 * norm) ** 2 / 2, rtol=1e-6)
    assert torch.allclose(pseudo_huber(1e4 * d, 1.0), 1e4 * norm - 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="pseudo-Huber"):
        pseudo_huber(d, -1.0)


def test_ect_at_stage_0_is_a_weighted_denoising_loss():
    """With r = 0 the target is the clean data: loss = mean ||f(x0 + t z, t) - x0|| / t.
    (p_mean = -3 keeps every t below ln 7, where stage 0 has r = 0.) Bug caught: the boundary
    target taken from the model at r instead of the data."""
    model = ConsistencyDenoiser(GaussianDenoiser(MEAN, COV, EDM), EDM)
    x0 = next(_gaussian_data(128, 0))
    loss = ect_loss(model, x0, schedule=EDM, stage=0, p_mean=-3.0, p_std=0.5, generator=_seed(5))
    g = _seed(5)
    s = (-3.0 + 0.5 * torch.randn(128, generator=g, dtype=F64)).exp().clamp(0.002, 80.0)
    assert float(s.max()) < math.log(7)
    z = torch.randn(x0.shape, generator=g, dtype=F64)
    want = ((model(x0 + s[:, None] * z, s).x0 - x0).norm(dim=1) / s).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_ect_loss_against_its_formula_at_a_later_stage():
    """loss = mean_i (sqrt(||f(x0 + t z, t) - f(x0 + r z, r)||^2 + c^2) - c) / (t - r), with
    r from the gap schedule (0 below sigma_min, target x0), written out by hand for a fixed
    model. Bug caught: the weight 1 / t in place of 1 / (t - r)."""
    f = GaussianConsistencyFunction(MEAN, COV, EDM)
    x0 = next(_gaussian_data(128, 0))
    loss = ect_loss(f, x0, schedule=EDM, stage=3, c=0.1, generator=_seed(5))
    g = _seed(5)
    t = (-1.1 + 2.0 * torch.randn(128, generator=g, dtype=F64)).exp().clamp(0.002, 80.0)
    z = torch.randn(x0.shape, generator=g, dtype=F64)
    n = 1 + 8 / (1 + torch.exp(t))
    r = (t * (1 - n / 2**4)).clamp(min=0)
    r = torch.where(r < 0.002, torch.zeros_like(r), r)
    assert bool((r > 0).any()) and bool((r == 0).any())
    target = torch.where((r > 0)[:, None], f(x0 + r[:, None] * z, r.clamp(min=0.002)).x0, x0)
    d = (f(x0 + t[:, None] * z, t).x0 - target).norm(dim=1)
    want = (((d**2 + 0.01).sqrt() - 0.1) / (t - r)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_ect_loss_of_the_exact_consistency_function_converges_as_the_gap_shrinks():
    """For the exact consistency function, ||f(x_t, t) - f(x_r, r)|| / (t - r) tends to the
    derivative of f along the shared noise direction, so the loss stays put as stages halve
    the gap; with fresh noise at r it would double per stage. Bug caught: a new noise draw
    for x_r (the two points then lie on unrelated trajectories)."""
    exact = GaussianConsistencyFunction(MEAN, COV, EDM)
    x0 = next(_gaussian_data(4096, 0))
    losses = [ect_loss(exact, x0, schedule=EDM, stage=k, generator=_seed(7)).item()
              for k in (6, 8, 10)]  # fmt: skip
    assert losses[2] / losses[1] == pytest.approx(1.0, abs=0.05), losses
    assert losses[1] / losses[0] == pytest.approx(1.0, abs=0.1), losses


class _GaussianMap(nn.Module):
    """The consistency map of a Gaussian N(m, C) with learnable m and C = L L^T (EDM
    schedule): x0 = m + sqrt(C (C + s^2 I)^-1)(x - m). The family holds the exact answer."""

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(2, dtype=F64))
        self.l = nn.Parameter(torch.tensor([[0.7, 0.0], [0.2, 0.5]], dtype=F64))

    def cov(self):
        lower = torch.tril(self.l)
        return lower @ lower.T + 1e-6 * torch.eye(2, dtype=F64)

    def forward(self, x, t, cond=None):
        lam, u = torch.linalg.eigh(self.cov())
        x0 = self.m + (torch.sqrt(lam / (lam + t[:, None] ** 2)) * ((x - self.m) @ u)) @ u.T
        return Prediction(x0=x0, eps=(x - x0) / t[:, None])


def test_ect_on_gaussian_data_recovers_the_pf_ode_map_as_the_gap_shrinks():
    """Consistency tuning on data alone (no teacher calls) through 6 stages: the learned
    Gaussian map approaches the data's (m, C), while the first stage (gap t - r = t at low
    noise: a denoising loss on ||f - x0||) leaves C visibly wrong. The tolerance is the
    optimiser's noise at lr 0.01 with 256 points a step. Bug caught: a gap that does not
    shrink with the stage, or a target without the shared noise."""
    inner = _GaussianMap()
    model = ConsistencyDenoiser(inner, EDM)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data, g = _gaussian_data(256, 0), _seed(1)
    cov_err = []
    for stage in range(6):
        for _ in range(150):
            loss = ect_loss(model, next(data), schedule=EDM, stage=stage, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        cov_err.append(float((inner.cov().detach() - COV).abs().max()))
    assert cov_err[0] > 0.2 and cov_err[-1] < 0.08, cov_err
    assert float((inner.m.detach() - MEAN).abs().max()) < 0.08, inner.m
