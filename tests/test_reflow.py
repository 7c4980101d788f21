"""Reflow [Liu 2023] against the Gaussian oracle.

For Gaussian data x0 ~ N(m, s^2 I) and independent noise on the flow schedule
x_t = (1 - t) x0 + t eps, the exact flow (the posterior-mean velocity) moves every point along
x_t = (1 - t) m + sigma_t eps, sigma_t = sqrt((1 - t)^2 s^2 + t^2): a curved path, whose
straightness is S = D int_0^1 (1 - s - sigma_t')^2 dt. Its ODE couples eps with m + s eps;
the exact flow of that coupling moves along the straight lines between them at constant speed
(S = 0), and the reflow loss of the coupling vanishes for it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.distill.reflow import reflow_loss, reflow_pairs, straightness
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import Prediction
from difflab.schedules import EDMSchedule, FlowMatchSchedule

FLOW = FlowMatchSchedule()
M, S, D = 0.7, 0.4, 2
F64 = torch.float64


def _gaussian() -> GaussianDenoiser:
    return GaussianDenoiser(torch.full((D,), M), S**2 * torch.eye(D, dtype=F64), FLOW)


class ReflowedGaussian:
    """The exact flow of the coupling (eps, m + s eps): x_t = (1 - t)(m + s eps) + t eps is
    invertible for eps, and the velocity is eps - x0 there."""

    def __call__(self, xt, t, cond=None):
        tt = t.to(F64)[:, None]
        eps = (xt.to(F64) - (1 - tt) * M) / ((1 - tt) * S + tt)
        return Prediction(x0=(M + S * eps).to(xt.dtype), eps=eps.to(xt.dtype))


def _noise(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _closed_form_straightness() -> float:
    t = np.linspace(0.0, 1.0, 200_001)
    sig = np.sqrt((1 - t) ** 2 * S**2 + t**2)
    d_sig = (t - (1 - t) * S**2) / sig
    return D * np.trapezoid((1 - S - d_sig) ** 2, t)


def test_the_independent_couplings_exact_flow_is_curved_as_its_closed_form():
    """S of the exact flow-matching flow of Gaussian data equals the closed form (mean over
    256 noises of eps^2 = 1 per dimension: a relative Monte Carlo error of about
    sqrt(2 / (256 D)) = 6 %; 15 % allowed)."""
    s_num = float(straightness(_gaussian(), FLOW, _noise(), steps=200))
    s_exact = _closed_form_straightness()
    assert s_exact > 0.05  # curved
    assert s_num == pytest.approx(s_exact, rel=0.15)


def test_the_reflowed_coupling_is_straight():
    assert float(straightness(ReflowedGaussian(), FLOW, _noise(), steps=50)) < 1e-10


def test_pairs_are_the_pf_ode_map_and_their_exact_flow_has_zero_reflow_loss():
    noise, x0 = reflow_pairs(_gaussian(), FLOW, _noise(), steps=100)
    # the PF-ODE of isotropic Gaussian data maps eps to m + s eps (Heun: error O(h^2))
    torch.testing.assert_close(x0, M + S * noise, atol=1e-3, rtol=0)
    g = torch.Generator().manual_seed(1)
    assert float(reflow_loss(ReflowedGaussian(), x0, noise, schedule=FLOW, generator=g)) < 1e-5
    g = torch.Generator().manual_seed(1)
    assert float(reflow_loss(_gaussian(), x0, noise, schedule=FLOW, generator=g)) > 0.01


def test_reflow_loss_against_its_formula():
    """At given times, the loss is the mean squared distance between noise - x0 and the model's
    velocity at the point of the line; a constant model velocity c gives ||noise - x0 - c||^2."""
    noise, x0 = _noise(8, 1), _noise(8, 2)
    c = torch.tensor([0.3, -0.2], dtype=F64)

    def constant(xt, t, cond=None):  # x0_hat = xt - t c, eps_hat = xt + (1 - t) c: u = c
        tt = t.to(F64)[:, None]
        return Prediction(x0=xt - tt * c, eps=xt + (1 - tt) * c)

    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    got = reflow_loss(constant, x0, noise, schedule=FLOW, t=t)
    expected = (noise - x0 - c).pow(2).sum(1).mean()
    torch.testing.assert_close(got, expected)


def test_reflow_needs_the_flow_schedule():
    with pytest.raises(ValueError, match="flow-matching"):
        straightness(_gaussian(), EDMSchedule(), _noise())
