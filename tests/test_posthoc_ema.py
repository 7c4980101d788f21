"""Post-hoc EMA [Karras et al. 2024, EDM2, Sec. 3 and App. C] against closed forms.

Oracles: the relative standard deviation of the continuous profile by numerical integration
(Eq. 3), the power-function average of a known weight sequence computed directly (theta_t = t has
the exact sum T - sum_{t<T} (t/T)**(gamma+1); random weights the directly weighted sum), and the
Cauchy-Schwarz bound of a reconstruction by its least-squares residual.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from torch import nn

from difflab.posthoc_ema import (
    MAX_SIGMA_REL,
    PowerEMA,
    SnapshotStore,
    gamma_to_sigma_rel,
    parse_sigma_rels,
    posthoc_coefficients,
    power_ema_weights,
    reconstruct,
    sigma_rel_to_gamma,
)


def _profile_std(gamma: float) -> float:
    """std(tau / t) of the density (gamma + 1) tau**gamma on [0, 1], by quadrature."""

    def p(u: float) -> float:
        return (gamma + 1) * u**gamma

    m1 = quad(lambda u: u * p(u), 0, 1)[0]
    m2 = quad(lambda u: u * u * p(u), 0, 1)[0]
    return math.sqrt(m2 - m1 * m1)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.002, 0.29))
def test_sigma_rel_is_the_relative_std_of_the_profile(sigma_rel):
    # a squared (gamma + 2) dropped from Eq. 3, or the wrong root of the cubic, fails here
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > -0.382
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    assert _profile_std(gamma) == pytest.approx(sigma_rel, rel=1e-6)


def test_longer_ema_has_smaller_gamma_and_bad_lengths_are_one_line():
    assert sigma_rel_to_gamma(0.05) > sigma_rel_to_gamma(0.10) > 0
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.5, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)
    assert parse_sigma_rels("0.05,0.10") == (0.05, 0.1)
    for bad in ("0.05", "0.05,0.05", "a,b", "0.05,0.4"):
        with pytest.raises(ValueError):
            parse_sigma_rels(bad)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
def test_weights_are_the_profile_mass_of_each_step(gamma):
    T = 40
    w = power_ema_weights(T, gamma)
    mass = [quad(lambda u: (gamma + 1) * u**gamma / T ** (gamma + 1), i - 1, i,
                 epsabs=0, epsrel=1e-13)[0] for i in range(1, T + 1)]  # fmt: skip
    np.testing.assert_allclose(w, mass, rtol=1e-9, atol=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    padded = power_ema_weights(T, gamma, steps=T + 5)
    assert padded.shape == (T + 5,) and not padded[T:].any()


def _scalar_model(value: float = 0.0) -> nn.Module:
    m = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    nn.init.constant_(m.weight, value)
    return m


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_running_update_is_the_power_function_average_of_theta_t_equal_t(sigma_rel):
    # theta(t) = t: sum_t w_t t = T - sum_{t<T} (t/T)**(gamma+1) (summation by parts), exact;
    # beta = (1 - 1/t)**gamma (exponent off by one) or an update at t - 1 misses it by O(1)
    T = 300
    model = _scalar_model()
    ema = PowerEMA(model, [sigma_rel, 0.15])
    for t in range(1, T + 1):
        nn.init.constant_(model.weight, float(t))
        ema.update(model, step=t)
    gamma = sigma_rel_to_gamma(sigma_rel)
    exact = T - sum((t / T) ** (gamma + 1) for t in range(1, T))
    got = ema.models[0].weight
    torch.testing.assert_close(got, torch.full_like(got, exact), rtol=1e-12, atol=0)
    # and the continuous profile's mean (gamma + 1) / (gamma + 2) T within the O(1) of the grid
    assert abs(float(got[0, 0]) - (gamma + 1) / (gamma + 2) * T) < 1.0


def _run_profiles(tmp_path, thetas: torch.Tensor, every: int, keep: int = 1000):
    """Train-free: set the weights to thetas[t - 1] at step t, update, snapshot when due."""
    model = _scalar_model()
    ema = PowerEMA(model, [0.05, 0.10])
    store = SnapshotStore(tmp_path / "snapshots", every=every, keep=keep)
    for t in range(1, len(thetas) + 1):
        with torch.no_grad():
            model.weight.copy_(thetas[t - 1])
        ema.update(model, step=t)
        if store.due(t):
            store.write(t, ema)
    return ema, store


def _direct_average(thetas: torch.Tensor, sigma_rel: float) -> torch.Tensor:
    w = torch.from_numpy(power_ema_weights(len(thetas), sigma_rel_to_gamma(sigma_rel)))
    return (w[:, None, None] * thetas).sum(0)


def test_reconstructing_a_stored_profile_gives_it_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    thetas = torch.randn(400, 1, 3, generator=g, dtype=torch.float64).cumsum(0)
    ema, store = _run_profiles(tmp_path, thetas, every=40)
    for k, sigma_rel in enumerate((0.05, 0.10)):
        weights, info = reconstruct(store.snapshots(), sigma_rel)
        assert info["step"] == 400 and info["residual"] < 1e-12
        torch.testing.assert_close(weights["weight"], ema.models[k].weight, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(weights["weight"], _direct_average(thetas, sigma_rel))


@pytest.mark.parametrize("kind", ["random", "trajectory"])
def test_a_length_between_the_stored_ones_is_close_to_its_direct_average(tmp_path, kind):
    T, sigma_rel = 1000, 0.07
    g = torch.Generator().manual_seed(1)
    thetas = torch.randn(T, 1, 3, generator=g, dtype=torch.float64)
    if kind == "trajectory":  # a random walk, as SGD weights move
        thetas = thetas.cumsum(0) / 10
    _, store = _run_profiles(tmp_path, thetas, every=50)
    weights, info = reconstruct(store.snapshots(), sigma_rel)
    exact = _direct_average(thetas, sigma_rel)
    # Cauchy-Schwarz: |sum_t (Wx - w)_t theta_t| <= residual * ||theta(1..T)||_2 per coordinate
    bound = info["residual"] * thetas.norm(dim=0) + 1e-9
    err = (weights["weight"] - exact).abs()
    assert (err <= bound).all(), (err, bound)
    assert info["residual"] < 0.01 * np.linalg.norm(
        power_ema_weights(T, sigma_rel_to_gamma(sigma_rel))
    )
    # the test tells lengths apart: the stored profiles' averages are far outside the bound
    for other in (0.05, 0.10):
        assert ((_direct_average(thetas, other) - exact).abs() > 3 * bound).any()


def test_coefficients_do_not_depend_on_the_block_size():
    snaps = [(t, sigma_rel_to_gamma(s)) for t in range(20, 201, 20) for s in (0.05, 0.1)]
    gamma = sigma_rel_to_gamma(0.08)
    x1, r1 = posthoc_coefficients(snaps, step=200, gamma=gamma)
    x2, r2 = posthoc_coefficients(snaps, step=200, gamma=gamma, block=7)
    np.testing.assert_allclose(x1, x2, rtol=1e-6, atol=1e-8)
    assert r1 == pytest.approx(r2, rel=1e-6, abs=1e-14)
    with pytest.raises(ValueError, match="after the target step"):
        posthoc_coefficients(snaps, step=100, gamma=gamma)


def test_snapshots_on_disk_stay_bounded_and_keep_the_newest(tmp_path):
    model = _scalar_model(1.0)
    ema = PowerEMA(model, [0.05, 0.10])
    store = SnapshotStore(tmp_path, every=10, keep=4)
    for t in range(1, 1001):
        ema.update(model, step=t)
        if store.due(t):
            store.write(t, ema)
            steps = [s.step for s in store.snapshots()]
            assert len(steps) <= store.keep + 1 and steps[-1] == t
            interval = store.interval(t)
            assert all(s % interval == 0 for s in steps)
    store.write(1003, ema)  # the end of a run off the interval is kept beside them
    steps = [s.step for s in store.snapshots()]
    assert steps[-1] == 1003 and len(steps) <= store.keep + 1
    store.write(900, ema)  # resumed from a checkpoint before 1003: the later snapshot goes
    assert max(s.step for s in store.snapshots()) == 900
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file
