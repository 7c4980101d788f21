"""Forward process: closed form vs Markov chain (Monte Carlo), posterior vs Bayes' rule."""

import math

import pytest
import torch

from difflab.process import q_posterior, q_sample, q_sample_iterative, transition
from difflab.schedules import DiscreteSchedule, EDMSchedule

F64 = torch.float64


def test_closed_form_and_iterative_noising_have_the_same_law():
    sched = DiscreteSchedule.from_name("linear", 100)
    n, t = 40_000, 60
    x0 = torch.tensor([1.5, -0.5], dtype=F64).expand(n, 2)
    g = torch.Generator().manual_seed(0)
    closed = q_sample(x0, t, sched, generator=g)
    iterative = q_sample_iterative(x0, t, sched, generator=g)
    ab = float(sched.alpha_bar[t])
    mean = math.sqrt(ab) * x0[0]
    var = 1 - ab  # the variance is (1 - alpha_bar), not its square root
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / n)
    for xs in (closed, iterative):
        assert torch.allclose(xs.mean(0), mean, atol=5 * se_mean)
        assert torch.allclose(xs.var(0), torch.full((2,), var, dtype=F64), atol=5 * se_var)
    # the two samples agree with each other too (two-sample check of means and variances)
    assert torch.allclose(closed.mean(0), iterative.mean(0), atol=7 * se_mean)


def test_q_sample_with_given_noise_is_the_formula():
    sched = DiscreteSchedule.from_name("cosine", 50)
    x0 = torch.randn(4, 3, dtype=F64)
    eps = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([1.0, 10.0, 25.0, 50.0], dtype=F64)
    xt = q_sample(x0, t, sched, eps=eps)
    ab = sched.alpha_bar[t.long()]
    assert torch.allclose(xt, ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps)


def _bayes_posterior_1d(x0, xt, a_s, s_s, a_ts, var_ts):
    """Posterior moments of x_s from q(x_s|x0) q(x_t|x_s) on a fine grid."""
    grid = torch.linspace(-12, 12, 400_001, dtype=F64)
    log_prior = -0.5 * (grid - a_s * x0) ** 2 / s_s**2
    log_lik = -0.5 * (xt - a_ts * grid) ** 2 / var_ts
    w = torch.softmax(log_prior + log_lik, 0)
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    return float(mean), float(var)


@pytest.mark.parametrize("t,s", [(2, 1), (500, 499), (1000, 999), (700, 300), (1000, 20)])
def test_posterior_matches_bayes_rule(t, s):
    sched = DiscreteSchedule.from_name("linear", 1000)
    x0, xt = 0.7, -0.4
    a_s, s_s = (float(v) for v in sched.alpha_sigma(torch.tensor(float(s))))
    a_ts, var_ts = (
        float(v) for v in transition(sched, torch.tensor(t * 1.0), torch.tensor(s * 1.0))
    )
    mean_b, var_b = _bayes_posterior_1d(x0, xt, a_s, s_s, a_ts, var_ts)
    mean, var = q_posterior(
        torch.tensor([[x0]], dtype=F64), torch.tensor([[xt]], dtype=F64), t, s, sched
    )
    assert float(mean) == pytest.approx(mean_b, abs=1e-6 + 1e-4 * abs(mean_b))
    assert float(var) == pytest.approx(var_b, rel=1e-3)


def test_posterior_is_eq7_for_adjacent_steps():
    sched = DiscreteSchedule.from_name("cosine", 200)
    t = 120
    ab, ab_prev = sched.alpha_bar[t], sched.alpha_bar[t - 1]
    beta = sched.betas[t - 1]
    x0 = torch.randn(3, 2, dtype=F64)
    xt = torch.randn(3, 2, dtype=F64)
    mean, var = q_posterior(x0, xt, t, t - 1, sched)
    # Eq. (7) [Ho 2020]
    mu = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xt
    assert torch.allclose(mean, mu)
    assert torch.allclose(var.flatten(), sched.beta_tilde[t - 1].expand(3))
    a_ts, var_ts = transition(sched, torch.tensor(float(t)), torch.tensor(t - 1.0))
    assert float(var_ts) == pytest.approx(float(beta))
    assert float(a_ts) == pytest.approx(math.sqrt(1 - float(beta)))


def test_posterior_to_data_is_x0_and_ve_posterior():
    sched = DiscreteSchedule.from_name("linear", 100)
    x0, xt = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    mean, var = q_posterior(x0, xt, 30, 0, sched)
    assert torch.allclose(mean, x0) and float(var.abs().max()) == 0.0
    ve = EDMSchedule()
    # VE: x_s = x0 + s_s n, x_t = x_s + sqrt(s_t^2 - s_s^2) n' ; posterior by Bayes
    mean, var = q_posterior(torch.tensor([[0.3]]), torch.tensor([[2.0]]), 3.0, 1.0, ve)
    mb, vb = _bayes_posterior_1d(0.3, 2.0, 1.0, 1.0, 1.0, 8.0)
    assert float(mean) == pytest.approx(mb, abs=1e-5) and float(var) == pytest.approx(vb, rel=1e-3)
