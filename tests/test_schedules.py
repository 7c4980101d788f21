"""Schedules against their definitions: products, invariants, inverses, step grids."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.schedules import (
    BETA_SCHEDULES,
    SPACINGS,
    DiscreteSchedule,
    EDMSchedule,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_timesteps,
    schedule_from_config,
)

F64 = torch.float64


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [40, 1000])
def test_alpha_bar_is_the_product_up_to_t(name, T):
    sched = DiscreteSchedule.from_name(name, T)
    assert sched.betas.dtype == F64
    assert bool(((sched.betas > 0) & (sched.betas < 1)).all())
    for t in [0, 1, 2, T // 2, T]:
        direct = 1.0
        for s in range(1, t + 1):  # alpha_bar_t = prod_{s=1}^{t} (1 - beta_s), not up to T
            direct *= 1.0 - float(sched.betas[s - 1])
        assert float(sched.alpha_bar[t]) == pytest.approx(direct, rel=1e-12)
    assert bool((sched.alpha_bar[1:] < sched.alpha_bar[:-1]).all())


def test_linear_schedule_matches_ddpm():
    betas = make_betas("linear", 1000)
    assert float(betas[0]) == pytest.approx(1e-4)
    assert float(betas[-1]) == pytest.approx(0.02)
    assert float((betas[1:] - betas[:-1]).std()) < 1e-12  # equally spaced
    # other T keep the same total: T * mean beta is constant
    assert float(make_betas("linear", 250).sum()) == pytest.approx(float(betas.sum()), rel=1e-9)


def test_quadratic_and_sigmoid_shapes():
    q = make_betas("quadratic", 100)
    assert torch.allclose(q.sqrt()[1:] - q.sqrt()[:-1], (q.sqrt()[1] - q.sqrt()[0]).expand(99))
    s = make_betas("sigmoid", 100, beta_start=1e-4, beta_end=0.02)
    logit = torch.logit((s - 1e-4) / (0.02 - 1e-4))
    assert torch.allclose(logit, torch.linspace(-6, 6, 100, dtype=F64), atol=1e-6)


def test_ldm_scaled_linear_range_and_its_run_config():
    # LDM's schedule: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012), and the run config's
    # beta range reaches it (a run with the defaults would get DDPM's 1e-4..0.02 instead)
    from difflab.app.build import build_schedule
    from difflab.app.config import apply_overrides, get_preset

    q = make_betas("quadratic", 1000, beta_start=0.00085, beta_end=0.012)
    assert float(q[0]) == pytest.approx(0.00085) and float(q[-1]) == pytest.approx(0.012)
    assert float(q[499]) == pytest.approx(
        (0.00085**0.5 + 499 / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2
    )
    sets = [
        "diffusion.schedule=quadratic",
        "diffusion.beta_start=0.00085",
        "diffusion.beta_end=0.012",
    ]
    sched = build_schedule(apply_overrides(get_preset("mnist-eps"), sets))
    assert torch.equal(sched.betas, q)
    # one end set: the other keeps its default
    sched = build_schedule(apply_overrides(get_preset("mnist-eps"), ["diffusion.beta_end=0.012"]))
    assert float(sched.betas[0]) == pytest.approx(1e-4) and float(sched.betas[-1]) == pytest.approx(
        0.012
    )
    with pytest.raises(ValueError, match="cosine schedule has no beta_start"):
        make_betas("cosine", 10, beta_end=0.02)
    with pytest.raises(ValueError, match="must be below beta_end"):
        make_betas("quadratic", 1000, beta_start=0.03)  # above the default end 0.02


def test_cosine_alpha_bar_follows_eq17():
    T, s = 1000, 0.008
    sched = DiscreteSchedule.from_name("cosine", T)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in [1, 10, 100, 500, 900]:  # before the 0.999 clip takes over
        assert float(sched.alpha_bar[t]) == pytest.approx(f(t) / f(0), rel=1e-9)
    assert float(sched.betas.max()) <= 0.999


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_last_beta_is_capped_at_0_999(T):
    """[Nichol & Dhariwal 2021, Sec. 3.2]: beta_t = 1 - abar(t) / abar(t-1) with abar from
    Eq. 17, clipped at 0.999. Only beta_T reaches the cap (f(T) = cos^2(pi/2) = 0 makes it 1;
    beta_{T-1} ~ 3/4), so abar_T = abar_{T-1} (1 - 0.999) instead of ~1e-33. Oracle: Eq. 17 in
    math.cos; tolerance: float64 rounding of the product."""
    s = 0.008
    sched = DiscreteSchedule.from_name("cosine", T)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    raw = [1 - f(t) / f(t - 1) for t in range(1, T + 1)]
    assert raw[-1] == pytest.approx(1.0, abs=1e-12) and max(raw[:-1]) < 0.8
    assert float(sched.betas[-1]) == 0.999
    assert sched.betas[:-1].tolist() == pytest.approx(raw[:-1], rel=1e-9, abs=1e-15)
    assert float(sched.alpha_bar[T]) == pytest.approx(f(T - 1) / f(0) * (1 - 0.999), rel=1e-9)
    assert float(sched.alpha_bar[T - 1]) == pytest.approx(f(T - 1) / f(0), rel=1e-9)


def test_sohl_dickstein_schedule_leaves_about_1_over_T_of_the_variance():
    T = 40
    sched = DiscreteSchedule.from_name("sohl-dickstein", T)
    # baseline beta_t = 1/linspace(T, 2, T): the product telescopes to about 1/T
    assert float(sched.alpha_bar[-1]) == pytest.approx(1 / T, rel=0.2)
    assert float(sched.betas[0]) == pytest.approx(1e-3 + 1 / T, rel=0.01)


def test_beta_tilde_is_eq7():
    sched = DiscreteSchedule.from_name("linear", 100)
    t = 37
    ab = sched.alpha_bar
    expected = (1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t - 1]
    assert float(sched.beta_tilde[t - 1]) == pytest.approx(float(expected))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(BETA_SCHEDULES),
    u=st.floats(min_value=0.0, max_value=1.0),
)
def test_vp_invariants_and_inverse(name, u):
    sched = DiscreteSchedule.from_name(name, 200)
    t = torch.tensor(u * 200, dtype=F64)
    a, s = sched.alpha_sigma(t)
    assert float(a**2 + s**2) == pytest.approx(1.0, abs=1e-12)
    lam = sched.logsnr(t)
    if float(t) > 0:
        assert float(lam) == pytest.approx(float(2 * torch.log(a) - 2 * torch.log(s)), rel=1e-9)
        assert float(sched.t_from_logsnr(lam)) == pytest.approx(float(t), abs=1e-6)
        assert float(sched.t_from_edm_sigma(sched.edm_sigma(t))) == pytest.approx(
            float(t), abs=1e-6
        )
        assert float(sched.edm_sigma(t)) == pytest.approx(float(s / a), rel=1e-9)


def test_continuous_view_agrees_with_discrete_at_integers():
    sched = DiscreteSchedule.from_name("cosine", 50)
    t = torch.arange(51, dtype=F64)
    assert torch.allclose(sched.alpha(t) ** 2, sched.alpha_bar, rtol=1e-12, atol=0)
    assert torch.isinf(sched.logsnr(0.0)) and float(sched.sigma(0.0)) == 0.0
    # between integers log alpha_bar is linear in t
    mid = torch.tensor(10.5, dtype=F64)
    expected = 0.5 * (torch.log(sched.alpha_bar[10]) + torch.log(sched.alpha_bar[11]))
    assert float(torch.log(sched.alpha(mid) ** 2)) == pytest.approx(float(expected))


def test_edm_schedule():
    sched = EDMSchedule(0.002, 80.0)
    t = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    assert torch.equal(sched.alpha(t), torch.ones(3, dtype=F64))
    assert torch.allclose(sched.sigma(t), t)
    assert torch.allclose(sched.edm_sigma(t), t)
    assert torch.allclose(sched.t_from_logsnr(sched.logsnr(t)), t)
    assert sched.sigma_max == pytest.approx(80.0)


def test_zero_terminal_snr():
    betas = make_betas("linear", 1000)
    new = rescale_zero_terminal_snr(betas)
    ab_old = torch.cumprod(1 - betas, 0)
    ab_new = torch.cumprod(1 - new, 0)
    assert float(ab_new[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ab_new[0]) == pytest.approx(float(ab_old[0]), rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the old one
    x, y = ab_old.sqrt(), ab_new.sqrt()
    slope = (y[0] - y[-1]) / (x[0] - x[-1])
    assert torch.allclose(y, y[-1] + slope * (x - x[-1]), atol=1e-12)
    sched = DiscreteSchedule.from_name("linear", 1000, zero_terminal_snr=True)
    assert torch.isfinite(sched.logsnr(1000.0)) and float(sched.alpha(1000.0)) < 1e-8


def test_config_round_trip():
    for sched in [
        DiscreteSchedule.from_name("cosine", 100),
        DiscreteSchedule.from_name("linear", 10, zero_terminal_snr=True),
        DiscreteSchedule(torch.linspace(0.01, 0.2, 7)),
        EDMSchedule(0.01, 10.0),
    ]:
        again = schedule_from_config(sched.to_config())
        t = torch.linspace(sched.t_min, sched.t_max, 11, dtype=F64)
        assert torch.allclose(again.logsnr(t), sched.logsnr(t))


def test_trailing_leading_uniform_grids():
    sched = DiscreteSchedule.from_name("linear", 1000)
    ts = sampling_timesteps(sched, 10, spacing="trailing")
    assert ts.tolist() == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    ts = sampling_timesteps(sched, 10, spacing="leading")
    assert ts.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]
    ts = sampling_timesteps(sched, 1000, spacing="trailing")
    assert ts.tolist() == list(range(1000, -1, -1))
    ts = sampling_timesteps(sched, 4, spacing="uniform")
    assert ts.tolist() == [1000, 667, 334, 1, 0]


def test_karras_grid_is_eq5():
    sched = EDMSchedule(0.002, 80.0)
    n, rho = 6, 7.0
    ts = sampling_timesteps(sched, n, spacing="karras", rho=rho)
    for i in range(n):
        expected = (
            80.0 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))
        ) ** rho
        assert float(ts[i]) == pytest.approx(expected, rel=1e-9)
    assert float(ts[-1]) == 0.0


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 5, 50])
def test_grids_decrease_to_zero(spacing, steps):
    sched = DiscreteSchedule.from_name("cosine", 1000)
    ts = sampling_timesteps(sched, steps, spacing=spacing)
    assert ts.shape == (steps + 1,)
    assert float(ts[-1]) == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    assert float(ts[:-1].min()) >= sched.t_min


def test_logsnr_grid_is_uniform_in_logsnr():
    sched = DiscreteSchedule.from_name("linear", 1000)
    ts = sampling_timesteps(sched, 8, spacing="logsnr")[:-1]
    lam = sched.logsnr(ts)
    d = lam[1:] - lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="choose one of"):
        make_betas("triangle", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="positive integer"):
        sampling_timesteps(DiscreteSchedule.from_name("linear", 10), -3)
    with pytest.raises(ValueError, match="repeated"):
        sampling_timesteps(DiscreteSchedule.from_name("linear", 10), 50)
    with pytest.raises(ValueError, match="in \\[0, 10\\]"):
        DiscreteSchedule.from_name("linear", 10).alpha(11.0)
