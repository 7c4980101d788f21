"""Parameterisations: round trips, the score identity, EDM preconditioning, ModelDenoiser."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.parameterization import (
    PARAMETERIZATIONS,
    Denoiser,
    ModelDenoiser,
    edm_preconditioning,
    eps_from_score,
    eps_from_u,
    eps_from_v,
    eps_from_x0,
    score_from_eps,
    u_from_x0_eps,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_u,
    x0_from_v,
)
from difflab.schedules import DiscreteSchedule, EDMSchedule, FlowMatchSchedule

F64 = torch.float64


@settings(max_examples=80, deadline=None)
@given(
    alpha=st.floats(0.01, 1.0),
    sigma=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
)
def test_round_trips(alpha, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(8, 3, generator=g, dtype=F64)
    eps = torch.randn(8, 3, generator=g, dtype=F64)
    xt = alpha * x0 + sigma * eps
    tol = dict(rtol=1e-8, atol=1e-8 * (1 + sigma / alpha))
    assert torch.allclose(x0_from_eps(xt, eps, alpha, sigma), x0, **tol)
    assert torch.allclose(eps_from_x0(xt, x0, alpha, sigma), eps, **tol)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    assert torch.allclose(x0_from_v(xt, v, alpha, sigma), x0, **tol)
    assert torch.allclose(eps_from_v(xt, v, alpha, sigma), eps, **tol)
    u = u_from_x0_eps(x0, eps)
    assert torch.allclose(x0_from_u(xt, u, alpha, sigma), x0, **tol)
    assert torch.allclose(eps_from_u(xt, u, alpha, sigma), eps, **tol)
    assert torch.allclose(eps_from_score(score_from_eps(eps, sigma), sigma), eps)


def test_score_is_gradient_of_log_density():
    # q(xt | x0) = N(alpha x0, sigma^2): its score in xt is -eps / sigma
    alpha, sigma = 0.6, 0.8
    x0 = torch.randn(6, 2, dtype=F64)
    eps = torch.randn(6, 2, dtype=F64)
    xt = (alpha * x0 + sigma * eps).requires_grad_()
    logp = (-0.5 * (xt - alpha * x0) ** 2 / sigma**2).sum()
    (grad,) = torch.autograd.grad(logp, xt)
    assert torch.allclose(grad, score_from_eps(eps, sigma))


def test_edm_preconditioning_table1():
    sd = 0.5
    s = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(s, sd)
    # unit-variance network input when Var(x0) = sd^2: Var(c_in (x0 + s n)) = 1
    assert torch.allclose(c_in**2 * (sd**2 + s**2), torch.ones(4, dtype=F64))
    # c_skip minimises the effective-target variance and c_out makes it unit [Karras 2022, App. B.6]
    eff_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
    assert torch.allclose(eff_var, torch.ones(4, dtype=F64))
    assert torch.allclose(c_noise, torch.log(s) / 4)


def _oracle_network(target, x0, eps, sched, sigma_data=0.5):
    """A fake network that outputs the exact target of its parameterisation."""

    def net(x_in, t_in, cond=None):
        if target == "edm":
            s = torch.exp(4 * t_in.to(F64))
            c_skip, c_out, c_in, _ = edm_preconditioning(s, sigma_data)
            x_ve = x_in / c_in[:, None]
            return (x0 - c_skip[:, None] * x_ve) / c_out[:, None]
        a, s = sched.alpha_sigma(t_in.to(F64))
        a, s = a[:, None], s[:, None]
        v = v_from_x0_eps(x0, eps, a, s)
        return {"eps": eps, "x0": x0, "v": v, "flow": eps - x0}[target]

    return net


@pytest.mark.parametrize("target", PARAMETERIZATIONS)
@pytest.mark.parametrize("kind", ["vp", "ve", "flow"])
def test_model_denoiser_recovers_x0_and_eps(target, kind):
    if kind == "flow" and target == "edm":
        pytest.skip("EDM preconditioning of the flow schedule is tested with the VE one")
    sched = {
        "vp": DiscreteSchedule.from_name("cosine", 1000),
        "ve": EDMSchedule(),
        "flow": FlowMatchSchedule(),
    }[kind]
    n = 7
    x0 = torch.randn(n, 2, dtype=F64)
    eps = torch.randn(n, 2, dtype=F64)
    t = torch.linspace(sched.t_min * 2, sched.t_max * 0.9, n, dtype=F64)
    a, s = sched.alpha_sigma(t)
    xt = a[:, None] * x0 + s[:, None] * eps
    net = _oracle_network(target, x0, eps, sched)
    den = ModelDenoiser(lambda x, tt, c: net(x, tt, c), sched, parameterization=target)
    assert isinstance(den, Denoiser)
    pred = den(xt, t)
    assert torch.allclose(pred.x0, x0, atol=1e-8)
    assert torch.allclose(pred.eps, eps, atol=1e-6)
    assert pred.var_frac is None


def test_learned_variance_split_and_eq15_fraction():
    sched = DiscreteSchedule.from_name("linear", 100)

    def net(x, t, cond=None):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], dim=1)

    den = ModelDenoiser(net, sched, learned_variance=True)
    pred = den(torch.randn(3, 2), torch.full((3,), 40.0))
    assert pred.var_frac is not None and torch.allclose(pred.var_frac, torch.full((3, 2), 0.75))
    assert pred.x0.shape == (3, 2)


def test_unknown_parameterization():
    with pytest.raises(ValueError, match="choose one of: eps, x0, v, edm, flow"):
        ModelDenoiser(torch.nn.Identity(), EDMSchedule(), parameterization="score")  # type: ignore


def test_v_is_angle_velocity():
    # for VP, v = d x_phi / d phi with alpha = cos phi, sigma = sin phi [Salimans & Ho 2022]
    phi = 0.7
    x0, eps = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    dphi = 1e-6
    x = lambda p: math.cos(p) * x0 + math.sin(p) * eps  # noqa: E731
    numeric = (x(phi + dphi) - x(phi - dphi)) / (2 * dphi)
    assert torch.allclose(numeric, v_from_x0_eps(x0, eps, math.cos(phi), math.sin(phi)), atol=1e-8)


def test_flow_velocity_inversions_are_the_interpolant_ones():
    """On x_t = (1 - t) x0 + t eps: x0 = x_t - t u and eps = x_t + (1 - t) u with u = eps - x0
    (the general (alpha + sigma) denominators are 1 there), and u is not Salimans' v."""
    sched = FlowMatchSchedule()
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)[:, None]
    x0, eps = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    a, s = sched.alpha_sigma(t)
    xt = a * x0 + s * eps
    u = u_from_x0_eps(x0, eps)
    assert torch.allclose(u, eps - x0)
    assert torch.allclose(x0_from_u(xt, u, a, s), xt - t * u, atol=1e-12)
    assert torch.allclose(eps_from_u(xt, u, a, s), xt + (1 - t) * u, atol=1e-12)
    assert torch.allclose(x0_from_u(xt, u, a, s), x0, atol=1e-12)  # also at t = 0 and t = 1
    assert torch.allclose(eps_from_u(xt, u, a, s), eps, atol=1e-12)
    v = v_from_x0_eps(x0, eps, a, s)
    assert not torch.allclose(v[1:3], u[1:3])
    # the velocity is d x_t / dt of the interpolant (finite difference)
    h = 1e-6
    x_plus = (1 - (t + h)) * x0 + (t + h) * eps
    assert torch.allclose((x_plus - xt) / h, u, atol=1e-6)


def test_time_scale_multiplies_the_network_time_only():
    """time_scale = 1000 hands a flow network 1000 t (diffusers' timestep), in sampling and in
    the loss alike; the conversions still use the schedule's t."""
    seen = []

    def net(x, t_in, cond=None):
        seen.append(t_in.clone())
        return torch.zeros_like(x)

    den = ModelDenoiser(net, FlowMatchSchedule(), parameterization="flow", time_scale=1000.0)
    t = torch.tensor([0.25, 0.5], dtype=F64)
    xt = torch.ones(2, 2, dtype=F64)
    pred = den(xt, t)
    assert torch.allclose(seen[-1], 1000 * t)
    assert torch.allclose(pred.x0, xt) and torch.allclose(pred.eps, xt)  # u = 0
    with pytest.raises(ValueError, match="time_scale"):
        ModelDenoiser(net, FlowMatchSchedule(), time_scale=0.0)
