"""Sohl-Dickstein 2015 model: readout formulas, the isotropic-Gaussian identity of the bound,
a short training run, sampling and the forward trajectory."""

import math

import pytest
import torch
from torch import nn

from difflab.nn.sohl_dickstein import SohlDicksteinModel, temporal_basis
from difflab.schedules import make_betas

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrix products run fastest on one thread (and never oversubscribe the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Zero(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return torch.zeros(x.shape[0], self.out, dtype=x.dtype)


def test_temporal_basis_is_the_normalised_bump_basis():
    T, K = 40, 10
    basis = temporal_basis(T, K)
    width = (2 / (K - 1)) / 2
    for t in (0, 13, 39):
        x = -1 + 2 * t / (T - 1)
        bumps = [math.exp(-((x - (-1 + 2 * k / (K - 1))) ** 2) / (2 * width**2)) for k in range(K)]
        expected = torch.tensor(bumps, dtype=F64) / sum(bumps)
        assert torch.allclose(basis[:, t], expected, rtol=1e-12)
    assert int(basis[:, 0].argmax()) == 0 and int(basis[:, -1].argmax()) == K - 1


def test_reverse_mean_and_variance_formulas():
    T, K, D = 40, 10, 2
    torch.manual_seed(0)
    net = nn.Linear(D, D * 2 * K).double()
    model = SohlDicksteinModel(D, T=T, n_temporal_basis=K, network=net).double()
    xt = torch.randn(5, D, dtype=F64)
    t = torch.tensor([1, 2, 17, 33, 40])
    with torch.no_grad():
        mean, var = model.reverse_mean_var(xt, t)
    betas = make_betas("sohl-dickstein", T)
    basis = temporal_basis(T, K)
    z = net(xt).detach().reshape(5, D, 2, K)
    for b in range(5):
        beta = float(betas[t[b] - 1])
        for d in range(D):
            mu_c = sum(float(z[b, d, 0, k] * basis[k, t[b] - 1]) for k in range(K))
            beta_c = sum(float(z[b, d, 1, k] * basis[k, t[b] - 1]) for k in range(K))
            m = float(xt[b, d]) * math.sqrt(1 - beta) + mu_c * math.sqrt(beta)
            logit = math.log(beta / (1 - beta))
            v = 1 / (1 + math.exp(-(beta_c / math.sqrt(T) + logit)))
            assert float(mean[b, d]) == pytest.approx(m, rel=1e-10)
            assert float(var[b, d]) == pytest.approx(v, rel=1e-10)


def _zero_model_expected_kl(x0, T=40):
    """E[KL_t | x0] (B, T-1) for t = 2..T, nats summed over dims, for the zero network,
    p(x_{t-1}|x_t) = N(sqrt(1-b) x_t, b), and the constant (entropy) part of -K per sample.

    With mu_q - mu_p = c1 x0 + (c2 - a) x_t and x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n
    [Ho 2020, Eq. 4, 7], E[(mu_q - mu_p)^2 | x0] is quadratic in x0.
    """
    betas = make_betas("sohl-dickstein", T)
    ab = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - betas, 0)])
    kls = []
    for t in range(2, T + 1):
        b, abt, abp = float(betas[t - 1]), float(ab[t]), float(ab[t - 1])
        c1 = math.sqrt(abp) * b / (1 - abt)
        c2 = math.sqrt(1 - b) * (1 - abp) / (1 - abt)
        a = math.sqrt(1 - b)
        bt = (1 - abp) / (1 - abt) * b
        sq = (c1 + (c2 - a) * math.sqrt(abt)) ** 2 * x0**2 + (c2 - a) ** 2 * (1 - abt)
        kls.append((0.5 * math.log(b / bt) + (bt + sq) / (2 * b) - 0.5).sum(1))
    h = 0.5 * (1 + math.log(2 * math.pi))
    entropies = 0.5 * math.log(float(betas[0])) - 0.5 * math.log(1 - float(ab[T])) + h
    return torch.stack(kls, 1), x0.shape[1] * entropies


def _zero_model_expected_bound(x0, T=40):
    kls, const = _zero_model_expected_kl(x0, T)
    return kls.sum(1) + const


def test_one_step_estimate_is_t_minus_one_times_the_step_kl():
    model = SohlDicksteinModel(2, network=Zero(2 * 2 * 10)).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(20_000, 2, generator=g, dtype=F64)
    kls, const = _zero_model_expected_kl(x0)
    for t in (2, 5, 40):
        got = model.nll_bound(x0, g, t=t)
        expected = 39 * kls[:, t - 2] + const
        resid = got - expected
        assert abs(float(resid.mean())) < 5 * float(resid.std()) / math.sqrt(20_000)
        assert float(kls[:, t - 2].mean()) > 0.01  # the step matters: a wrong factor would show


def test_zero_network_bound_matches_its_analytic_value_and_is_zero_for_unit_gaussians():
    model = SohlDicksteinModel(2, network=Zero(2 * 2 * 10)).double()
    g = torch.Generator().manual_seed(0)
    h = 0.5 * (1 + math.log(2 * math.pi))
    for scale in (1.0, 0.4):
        x0 = scale * torch.randn(50_000, 2, generator=g, dtype=F64)
        expected = _zero_model_expected_bound(x0)
        if scale == 1:
            # the bound is quadratic in x0, so its mean over N(0, I) is its mean over two points
            # whose coordinates have mean square 1: exactly the entropy of N(0, I), because the
            # zero network is the exact reversal of the chain for unit Gaussians (gap 0)
            unit = _zero_model_expected_bound(torch.eye(2, dtype=F64) * math.sqrt(2))
            assert float(unit.mean()) == pytest.approx(2 * h, abs=1e-10)
        for full in (False, True):
            n = 50_000 if not full else 5_000
            got = model.nll_bound(x0[:n], g, full=full)
            resid = got - expected[:n]  # only the x_t (and t) noise is left
            se = float(resid.std()) / math.sqrt(n)
            assert abs(float(resid.mean())) < 5 * se
        bits = model.loss(x0, g)
        se = float(model.relative_bits_per_dim(model.nll_bound(x0, g)).std()) / math.sqrt(50_000)
        target = float(model.relative_bits_per_dim(expected).mean())
        assert abs(float(bits) - target) < 5 * se
        if scale == 1:
            assert abs(float(bits)) < 5 * se  # the reference code's DEBUG identity


def _swissroll(n, g):
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([u * u.cos(), u * u.sin()], 1)
    x = x + 0.5 * torch.randn(n, 2, generator=g)
    return (x - x.mean(0)) / x.std()  # unit variance, as in the paper


def test_training_lowers_the_bound():
    torch.manual_seed(0)
    model = SohlDicksteinModel(2, hidden=64)
    g = torch.Generator().manual_seed(1)
    held_out = _swissroll(4000, g)

    def bound():
        with torch.no_grad():
            gen = torch.Generator().manual_seed(2)
            return float(
                model.relative_bits_per_dim(model.nll_bound(held_out, gen, full=True)).mean()
            )

    before = bound()
    assert abs(before) < 0.05  # the zero readout is the isotropic-Gaussian model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model.loss(_swissroll(256, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bound()
    assert after < before - 0.1  # bits per dimension better than a Gaussian


def test_sampling_shapes_reproducibility_and_forward_trajectory():
    torch.manual_seed(0)
    model = SohlDicksteinModel(2, T=10, hidden=16)
    nn.init.normal_(model.network[-1].weight, std=0.1)
    x = model.sample(7, torch.Generator().manual_seed(3))
    x2, traj = model.sample(7, torch.Generator().manual_seed(3), return_trajectory=True)
    assert x.shape == (7, 2) and traj.shape == (11, 7, 2)
    assert torch.equal(x, x2) and torch.equal(traj[0], x)
    assert not torch.equal(x, model.sample(7, torch.Generator().manual_seed(4)))
    # forward chain: traj[0] = x0 and, for unit Gaussian data, every marginal is N(0, I)
    x0 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(5))
    fwd = model.forward_trajectory(x0, torch.Generator().manual_seed(6))
    assert fwd.shape == (11, 20_000, 2) and torch.equal(fwd[0], x0)
    assert torch.allclose(fwd[10].var(0), torch.ones(2), atol=5 * math.sqrt(2 / 20_000))
    # the chain's correlation with x0 decays as sqrt(alpha_bar_T)
    corr = float((fwd[10] * x0).mean())
    assert corr == pytest.approx(math.sqrt(float(model.schedule.alpha_bar[-1])), abs=0.03)


def test_bad_inputs():
    model = SohlDicksteinModel(2, T=10)
    with pytest.raises(ValueError, match="1..10"):
        model.reverse_mean_var(torch.zeros(3, 2), 11)
    with pytest.raises(ValueError, match="2..T"):
        model.nll_bound(torch.zeros(3, 2), t=1)
    with pytest.raises(ValueError, match="network output"):
        SohlDicksteinModel(2, T=10, network=Zero(3)).reverse_mean_var(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError, match="shape"):
        model.reverse_mean_var(torch.zeros(3, 3), 5)
