# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. The reverse process and the diffusion ELBO
#
# Tutorial 3 destroyed data with a fixed chain $q(x_t \mid x_{t-1})$. A diffusion model learns
# to run it backwards with Gaussian steps [Ho 2020, Eq. 1]
#
# $$p_\theta(x_{t-1} \mid x_t) = \mathcal{N}\big(x_{t-1};\ \mu_\theta(x_t, t),\ \sigma_t^2 I\big),
#   \qquad p(x_T) = \mathcal{N}(0, I),$$
#
# and is trained by the ELBO of tutorial 2, with the noisy versions $x_1, \dots, x_T$ as the
# latent variables. This tutorial
#
# 1. derives the *forward-process posterior* $q(x_{t-1} \mid x_t, x_0)$ and checks it against
#    Bayes' rule computed numerically;
# 2. splits the bound into the prior term $L_T$, the diffusion terms $L_{t-1}$ and the decoder
#    term $L_0$, and evaluates every term **exactly** for Gaussian data, where the optimal
#    denoiser is known in closed form: with the true reverse kernels the bound equals
#    $-\log q(x_0)$ to rounding error; with DDPM's fixed variances it is strictly larger;
# 3. shows how DDPM's simple loss $\|\epsilon - \epsilon_\theta\|^2$ is $L_{t-1}$ up to a weight
#    $w_t$ and a constant $C_t$, derives both, and checks the identity term by term.

# %%
import math

import numpy as np
import torch
from _common import (
    all_combinations,
    answers_wanted,
    gauss_hermite,
    new_figure,
    out_path,
    pick,
    save,
)

from difflab.likelihood import (
    bits_per_dim,
    gaussian_log_likelihood,
    mean_and_stderr,
    normal_kl,
    prior_kl,
    vlb,
    vlb_term_from_prediction,
)
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import Prediction, broadcast_to, eps_from_x0, x0_from_eps
from difflab.process import q_posterior, q_sample
from difflab.schedules import DiscreteSchedule

F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
sched = DiscreteSchedule.from_name("linear", T)
ab, betas = sched.alpha_bar, sched.betas  # ab[t] = alpha-bar_t (ab[0] = 1), betas[t-1] = beta_t

# %% [markdown]
# ## 1. The forward-process posterior $q(x_{t-1} \mid x_t, x_0)$
#
# Given $x_0$, the chain is Markov, so Bayes' rule gives
#
# $$q(x_{t-1} \mid x_t, x_0) \propto q(x_t \mid x_{t-1})\, q(x_{t-1} \mid x_0)
#   = \mathcal{N}\big(x_t; \sqrt{\alpha_t}\,x_{t-1}, \beta_t\big)\,
#     \mathcal{N}\big(x_{t-1}; \sqrt{\bar\alpha_{t-1}}\,x_0, 1 - \bar\alpha_{t-1}\big).$$
#
# Both factors are Gaussian in $x_{t-1}$; their precisions add,
# $\frac{\alpha_t}{\beta_t} + \frac{1}{1 - \bar\alpha_{t-1}}
#  = \frac{1 - \bar\alpha_t}{\beta_t (1 - \bar\alpha_{t-1})}$ (using
# $\alpha_t (1 - \bar\alpha_{t-1}) + \beta_t = 1 - \bar\alpha_t$), and completing the square
# gives [Ho 2020, Eq. 6-7]
#
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal{N}\big(\tilde\mu_t(x_t, x_0), \tilde\beta_t I\big),\quad
#   \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\,x_0
#   + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\,x_t,\quad
#   \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\,\beta_t.$$
#
# We check `difflab.process.q_posterior` against these formulas and against Bayes' rule done
# by brute force: multiply the two densities on a fine grid of $x_{t-1}$, normalise, and take
# the mean and variance by summation. The grid is placed around the two factors, without using
# the answer.


# %%
def bayes_posterior(x0: float, xt: float, t: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Grid, normalised posterior density and its mean and variance, by Bayes' rule."""
    a_t, b_t, ab_prev = 1 - float(betas[t - 1]), float(betas[t - 1]), float(ab[t - 1])
    prior_mean, prior_sd = math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)
    lik_mean, lik_sd = xt / math.sqrt(a_t), math.sqrt(b_t / a_t)  # as a function of x_{t-1}
    width = 12 * min(prior_sd, lik_sd)
    lo, hi = min(prior_mean, lik_mean) - width, max(prior_mean, lik_mean) + width
    grid = np.linspace(lo, hi, 200_001)
    log_p = -0.5 * (xt - math.sqrt(a_t) * grid) ** 2 / b_t - 0.5 * (grid - prior_mean) ** 2 / (
        1 - ab_prev
    )
    p = np.exp(log_p - log_p.max())
    p /= p.sum() * (grid[1] - grid[0])
    dx = grid[1] - grid[0]
    mean = float((grid * p).sum() * dx)
    var = float(((grid - mean) ** 2 * p).sum() * dx)
    return grid, p, mean, var


def posterior_closed_form(x0: float, xt: float, t: int) -> tuple[float, float]:
    """Mean and variance of q(x_{t-1} | x_t, x0) from difflab.process.q_posterior."""
    mean, var = q_posterior(
        torch.tensor([x0], dtype=F64), torch.tensor([xt], dtype=F64), t, t - 1, sched
    )
    return float(mean), float(var)


x0_val = 0.7
err_mean, err_var, err_eq7 = [], [], []
for t in (2, 10, 100, 500, 1000):
    xt_val = float(q_sample(torch.tensor([x0_val], dtype=F64), t, sched, generator=gen))
    mean_lib, var_lib = posterior_closed_form(x0_val, xt_val, t)
    _, _, mean_bayes, var_bayes = bayes_posterior(x0_val, xt_val, t)
    b_t, ab_t, ab_prev = float(betas[t - 1]), float(ab[t]), float(ab[t - 1])
    mean_eq7 = (
        math.sqrt(ab_prev) * b_t / (1 - ab_t) * x0_val
        + math.sqrt(1 - b_t) * (1 - ab_prev) / (1 - ab_t) * xt_val
    )  # Eq. (7) [Ho 2020]
    var_eq7 = (1 - ab_prev) / (1 - ab_t) * b_t
    err_mean.append(abs(mean_lib - mean_bayes) / math.sqrt(var_bayes))
    err_var.append(abs(var_lib / var_bayes - 1))
    err_eq7.append(
        max(
            abs(mean_lib - mean_eq7),
            abs(var_lib - var_eq7),
            abs(var_lib - float(sched.beta_tilde[t - 1])),
        )
    )
    print(
        f"t = {t:4d}: mean {mean_lib:+.6f} (Bayes {mean_bayes:+.6f}), "
        f"variance {var_lib:.4e} (Bayes {var_bayes:.4e})"
    )
RESULTS["posterior_mean_err_in_sd"] = max(err_mean)
RESULTS["posterior_var_rel_err"] = max(err_var)
RESULTS["posterior_vs_eq7_max_abs"] = max(err_eq7)
assert RESULTS["posterior_mean_err_in_sd"] < 1e-6 and RESULTS["posterior_var_rel_err"] < 1e-6
assert RESULTS["posterior_vs_eq7_max_abs"] < 1e-12

# %%
t_show, xt_show = 10, 0.66
grid, post, _, _ = bayes_posterior(x0_val, xt_show, t_show)
a_t, b_t = 1 - float(betas[t_show - 1]), float(betas[t_show - 1])
fig, axes = new_figure(1, 1, (6, 3.6))
ax = axes[0, 0]
ab_prev = float(ab[t_show - 1])
prior = np.exp(-0.5 * (grid - math.sqrt(ab_prev) * x0_val) ** 2 / (1 - ab_prev))
lik = np.exp(-0.5 * (xt_show - math.sqrt(a_t) * grid) ** 2 / b_t)
dx = grid[1] - grid[0]
ax.plot(grid, prior / (prior.sum() * dx), label=r"$q(x_{t-1} \mid x_0)$")
ax.plot(grid, lik / (lik.sum() * dx), label=r"$q(x_t \mid x_{t-1})$ (normalised in $x_{t-1}$)")
ax.plot(grid, post, "k", lw=3, alpha=0.4, label="product, normalised (Bayes)")
m_cf, v_cf = posterior_closed_form(x0_val, xt_show, t_show)
ax.plot(
    grid,
    np.exp(-0.5 * (grid - m_cf) ** 2 / v_cf) / math.sqrt(2 * math.pi * v_cf),
    "r--",
    label=r"$\mathcal{N}(\tilde\mu_t, \tilde\beta_t)$",
)
ax.set(
    xlim=(0.55, 0.8),
    xlabel=r"$x_{t-1}$",
    title=f"posterior at t = {t_show}, $x_0$ = {x0_val}, $x_t$ = {xt_show}",
)
ax.legend(fontsize=7)
save(fig, "04_posterior.png")

# %% [markdown]
# ## 2. The bound and its terms
#
# The ELBO with latents $x_{1:T}$ and $q(x_{1:T} \mid x_0)$ as the variational distribution is
# $-\log p_\theta(x_0) \le
# \mathbb{E}_q\big[-\log \frac{p_\theta(x_{0:T})}{q(x_{1:T} \mid x_0)}\big]$.
# Split both joints into factors, $p_\theta(x_{0:T}) = p(x_T) \prod_{t \ge 1} p_\theta(x_{t-1}
# \mid x_t)$ and $q(x_{1:T} \mid x_0) = \prod_{t \ge 1} q(x_t \mid x_{t-1})$, and turn each
# forward step with $t \ge 2$ around with Bayes' rule (the chain is Markov, so $x_0$ may be
# added to the condition):
#
# $$q(x_t \mid x_{t-1}) = q(x_t \mid x_{t-1}, x_0)
#   = \frac{q(x_{t-1} \mid x_t, x_0)\; q(x_t \mid x_0)}{q(x_{t-1} \mid x_0)} .$$
#
# In the product over $t = 2..T$ the ratios **telescope**: $\prod_{t=2}^{T}
# \frac{q(x_t \mid x_0)}{q(x_{t-1} \mid x_0)} = \frac{q(x_2 \mid x_0)}{q(x_1 \mid x_0)} \cdot
# \frac{q(x_3 \mid x_0)}{q(x_2 \mid x_0)} \cdots \frac{q(x_T \mid x_0)}{q(x_{T-1} \mid x_0)}
# = \frac{q(x_T \mid x_0)}{q(x_1 \mid x_0)}$, and the $q(x_1 \mid x_0)$ left over cancels the
# $t = 1$ factor $q(x_1 \mid x_0)$ of $q(x_{1:T} \mid x_0)$. So
#
# $$-\log\frac{p_\theta(x_{0:T})}{q(x_{1:T} \mid x_0)} = -\log\frac{p(x_T)}{q(x_T \mid x_0)}
#   - \sum_{t=2}^{T} \log\frac{p_\theta(x_{t-1} \mid x_t)}{q(x_{t-1} \mid x_t, x_0)}
#   - \log p_\theta(x_0 \mid x_1),$$
#
# and taking the expectation under $q$ turns each log-ratio into a KL [Ho 2020, Eq. 5]:
#
# $$L = \underbrace{\mathrm{KL}\big(q(x_T \mid x_0) \,\|\, p(x_T)\big)}_{L_T}
#   + \sum_{t=2}^{T} \underbrace{\mathbb{E}_q\,\mathrm{KL}\big(q(x_{t-1} \mid x_t, x_0)
#     \,\|\, p_\theta(x_{t-1} \mid x_t)\big)}_{L_{t-1}}
#   \underbrace{- \mathbb{E}_q \log p_\theta(x_0 \mid x_1)}_{L_0}.$$
#
# Every KL is between Gaussians (tutorial 2). The mean of $p_\theta$ is the posterior mean with
# the network's estimate of $x_0$ in place of $x_0$:
# $\mu_\theta(x_t, t) = \tilde\mu_t(x_t, \hat x_0(x_t, t))$ [Ho 2020, Eq. 7 and 15]; section 3
# writes it in terms of the predicted noise.
#
# **Gaussian data.** Take $x_0 \sim \mathcal{N}(m, \mathrm{diag}(s^2))$ in two dimensions. Then
# $(x_0, x_t)$ is jointly Gaussian and the optimal denoiser is a conditional mean (tutorial 1),
# per coordinate
#
# $$\hat x_0(x_t) = \mathbb{E}[x_0 \mid x_t] = m + \frac{\sqrt{\bar\alpha_t}\, s^2}
#   {\bar\alpha_t s^2 + 1 - \bar\alpha_t}\,\big(x_t - \sqrt{\bar\alpha_t}\, m\big), \qquad
#   v_t := \mathrm{Var}[x_0 \mid x_t]
#   = \frac{s^2 (1 - \bar\alpha_t)}{\bar\alpha_t s^2 + 1 - \bar\alpha_t}.$$
#
# The true reverse kernel $q(x_{t-1} \mid x_t)$ is then Gaussian as well: averaging
# $q(x_{t-1} \mid x_t, x_0)$ over $x_0 \mid x_t$ gives mean $\tilde\mu_t(x_t, \hat x_0)$ and
# variance $\tilde\beta_t + c_t^2 v_t$, with $c_t = \sqrt{\bar\alpha_{t-1}}\,\beta_t /
# (1 - \bar\alpha_t)$ the coefficient of $x_0$ in $\tilde\mu_t$. Three models share the mean:
#
# * **ideal**: variance $\tilde\beta_t + c_t^2 v_t$, prior $p(x_T) = q(x_T)$, decoder
#   $q(x_0 \mid x_1)$. Its joint is exactly $q(x_{0:T})$, so
#   $\log p(x_{0:T}) - \log q(x_{1:T} \mid x_0) = \log q(x_0)$ for every path: the bound is
#   **tight**, $L = -\log q(x_0)$ for every $x_0$;
# * **DDPM, small**: $\sigma_t^2 = \tilde\beta_t$, prior $\mathcal{N}(0, I)$;
# * **DDPM, large**: $\sigma_t^2 = \beta_t$, prior $\mathcal{N}(0, I)$.
#
# The DDPM variants use `difflab.likelihood` (`prior_kl`, `vlb_term_from_prediction` with a
# Gaussian decoder whose variance is $\tilde\beta_2$, as in the reference code). Their bound
# averaged over the data can only exceed the data entropy
# $H = \mathbb{E}[-\log q(x_0)] = \sum_d \tfrac12 \log(2\pi e s_d^2)$: the bound is at least
# the model's cross-entropy $\mathbb{E}[-\log p_\theta(x_0)]$, which is at least $H$.
#
# All terms are quadratic in $(x_0, \epsilon)$, so Gauss-Hermite quadrature with 3 nodes per
# coordinate (exact up to degree 5; `_common.gauss_hermite`) computes their expectations
# **exactly** - no Monte Carlo error. Monte Carlo enters once, to check the library's sampled
# `vlb` against the exact value.

# %%
m = torch.tensor([0.4, -0.3], dtype=F64)
s2 = torch.tensor([0.5, 0.04], dtype=F64) ** 2  # per-coordinate data variance
D = 2


def denoiser(xt: torch.Tensor, t: torch.Tensor, cond=None) -> Prediction:
    """Exact E[x0 | xt] for x0 ~ N(m, diag(s2)) [Bishop 2006, Eq. 2.116], per coordinate."""
    a, sg = (broadcast_to(v, xt) for v in sched.alpha_sigma(torch.as_tensor(t, dtype=F64)))
    x0_hat = m + a * s2 / (a**2 * s2 + sg**2) * (xt - a * m)
    return Prediction(x0=x0_hat, eps=eps_from_x0(xt, x0_hat, a, sg))


# the inline denoiser agrees with the library's general oracle
probe_x = torch.randn(64, D, dtype=F64, generator=gen)
probe_t = torch.randint(1, T + 1, (64,), generator=gen).to(F64)
oracle = GaussianDenoiser(m, torch.diag(s2), sched)
RESULTS["denoiser_vs_oracle_max_abs"] = float(
    (denoiser(probe_x, probe_t).x0 - oracle(probe_x, probe_t).x0).abs().max()
)
assert RESULTS["denoiser_vs_oracle_max_abs"] < 1e-12

# E over N(0, I) as a weighted sum over 3 x 3 nodes, exact up to degree 5 per coordinate
nodes, weights = gauss_hermite(D, 3)
z1, z2 = nodes.T
assert abs(float((weights * z1**4 * z2**2).sum()) - 3.0) < 1e-12  # E[z1^4 z2^2] = 3 * 1
x0_nodes = m + s2.sqrt() * nodes  # nodes of the data law N(m, diag(s2)), same weights

# one row per (t, x0 node, eps node), t = 1..T
t_rows, x0_rows, eps_rows = all_combinations(torch.arange(1, T + 1, dtype=F64), x0_nodes, nodes)
n0, ne = x0_nodes.shape[0], nodes.shape[0]
xt_rows = q_sample(x0_rows, t_rows, sched, eps=eps_rows)
pred_rows = denoiser(xt_rows, t_rows)


def expect(values: torch.Tensor) -> torch.Tensor:
    """(T * n0 * ne,) per-row values -> (T, n0): exact expectation over eps given x0."""
    return (values.reshape(T, n0, ne) * weights).sum(-1)


# ideal model
idx = t_rows.long()
a_rows, sg_rows = (broadcast_to(v, xt_rows) for v in sched.alpha_sigma(t_rows))
v_rows = s2 * sg_rows**2 / (a_rows**2 * s2 + sg_rows**2)  # Var[x0 | xt]
c_rows = broadcast_to(ab[idx - 1].sqrt() * betas[idx - 1] / (1 - ab[idx]), xt_rows)
mean_q, var_q = q_posterior(x0_rows, xt_rows, t_rows, t_rows - 1, sched)
mean_p, _ = q_posterior(pred_rows.x0, xt_rows, t_rows, t_rows - 1, sched)
var_p = var_q + c_rows**2 * v_rows
kl_ideal = normal_kl(mean_q, var_q.log(), mean_p, var_p.log()).sum(-1)
decoder_ideal = -gaussian_log_likelihood(x0_rows, pred_rows.x0, v_rows.log()).sum(-1)
terms = {"ideal": expect(torch.where(t_rows == 1, decoder_ideal, kl_ideal))}
ab_T = ab[T]
prior = {
    "ideal": normal_kl(
        ab_T.sqrt() * x0_nodes, torch.log1p(-ab_T), ab_T.sqrt() * m, torch.log(ab_T * s2 + 1 - ab_T)
    ).sum(-1)
}
for variance in ("small", "large"):
    per_row = vlb_term_from_prediction(
        pred_rows, x0_rows, xt_rows, t_rows, sched, variance=variance, decoder="gaussian"
    )
    terms[variance] = expect(per_row)
    prior[variance] = prior_kl(x0_nodes, sched)
bound = {k: prior[k] + terms[k].sum(0) for k in terms}  # per x0 node, (n0,)

nll = -gaussian_log_likelihood(x0_nodes, m, s2.log()).sum(-1)  # -log q(x0)
entropy = float(0.5 * torch.log(2 * math.pi * math.e * s2).sum())
RESULTS["ideal_bound_minus_nll_max_abs"] = float((bound["ideal"] - nll).abs().max())
RESULTS["entropy_nats"] = entropy
RESULTS["entropy_by_quadrature_err"] = abs(float((weights * nll).sum()) - entropy)
for k in bound:
    RESULTS[f"bound_{k}_nats"] = float((weights * bound[k]).sum())
    RESULTS[f"gap_{k}_nats"] = RESULTS[f"bound_{k}_nats"] - entropy
    print(
        f"{k:6s}: E[L] = {RESULTS[f'bound_{k}_nats']:+.6f} nats "
        f"({float(bits_per_dim(RESULTS[f'bound_{k}_nats'], D)):+.4f} bits/dim), "
        f"L_T = {float((weights * prior[k]).sum()):.2e}, "
        f"L_0 = {float((weights * terms[k][0]).sum()):+.4f}, "
        f"sum of L_t-1 = {float((weights * terms[k][1:].sum(0)).sum()):.4f}"
    )
print(f"entropy H = E[-log q(x0)] = {entropy:+.6f} nats")
assert RESULTS["entropy_by_quadrature_err"] < 1e-12
assert RESULTS["ideal_bound_minus_nll_max_abs"] < 1e-9  # tight for every x0
assert RESULTS["gap_small_nats"] > 0 and RESULTS["gap_large_nats"] > 0
# the ideal variance is the best one for every single term: for a given mean, the expected KL
# (or decoder NLL) is smallest when the variance equals the true conditional variance, so no
# fixed choice beats it at any t
excess = torch.stack([(weights * (terms[k] - terms["ideal"])).sum(-1) for k in ("small", "large")])
RESULTS["min_excess_over_ideal"] = float(excess.min())
assert RESULTS["min_excess_over_ideal"] > -1e-12
assert RESULTS["bound_large_nats"] < RESULTS["bound_small_nats"]  # for this data, see below
assert bool((excess[0] < excess[1]).any() and (excess[0] > excess[1]).any())  # no single winner

# the ideal reverse variance equals the joint-Gaussian formula Var[x_{t-1} | x_t]
V = ab[:, None] * s2 + 1 - ab[:, None]  # Var[x_t], (T + 1, D)
alphas = 1 - betas
var_joint = V[:-1] - alphas[:, None] * V[:-1] ** 2 / V[1:]  # t = 1..T
v_t = s2 * (1 - ab[1:, None]) / V[1:]
var_ideal = sched.beta_tilde[:, None] + (ab[:-1].sqrt() * betas / (1 - ab[1:]))[:, None] ** 2 * v_t
RESULTS["reverse_variance_identity_max_abs"] = float((var_joint - var_ideal).abs().max())
assert RESULTS["reverse_variance_identity_max_abs"] < 1e-12

# %% [markdown]
# What the numbers say: the ideal kernels reach the entropy exactly, and both fixed variances
# pay for their choice. Here $\sigma_t^2 = \beta_t$ ("large") gives the better bound: at the
# first steps the data is spread much more widely than the noise added, and the true reverse
# variance $\tilde\beta_t + c_t^2 v_t$ is then close to $\beta_t$. At large $t$ it is close to
# $\tilde\beta_t$ instead, and "small" pays less there (middle panel of the figure below).
# Ho et al. note the two extremes [Ho 2020, Sec. 3.2]: $\tilde\beta_t$ is optimal for a
# deterministic $x_0$, $\beta_t$ for $x_0 \sim \mathcal{N}(0, I)$. No fixed choice is best
# at every $t$, which is why Improved DDPM learns the variance [Nichol & Dhariwal 2021].

# %% [markdown]
# The library's `vlb` estimates the same bound by sampling one $x_t$ per step and data point
# (and, in fast mode, every 10th step, weighted by 10 - an unbiased estimate). Its average over
# data points agrees with the exact value within Monte Carlo error.

# %%
batch = pick(2000, 2000)
stride = pick(10, 1)
x0_data = m + s2.sqrt() * torch.randn(batch, D, dtype=F64, generator=gen)
mc = vlb(
    denoiser, x0_data, sched, variance="small", decoder="gaussian", generator=gen, stride=stride
)
mc_mean, mc_se = mean_and_stderr(mc["total"])
RESULTS["vlb_monte_carlo_z"] = (mc_mean - RESULTS["bound_small_nats"]) / mc_se
print(f"vlb (Monte Carlo): {mc_mean:+.4f} +- {mc_se:.4f}; exact {RESULTS['bound_small_nats']:+.4f}")
assert abs(RESULTS["vlb_monte_carlo_z"]) < 4

# %% [markdown]
# ## 3. From $L_{t-1}$ to $L_\text{simple}$
#
# Parameterise the network by a noise prediction $\hat\epsilon = \epsilon_\theta(x_t, t)$ with
# $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$
# [Ho 2020, Eq. 15]. Put into the posterior mean of section 1, with
# $\sqrt{\bar\alpha_{t-1}} / \sqrt{\bar\alpha_t} = 1 / \sqrt{\alpha_t}$ and
# $\alpha_t(1 - \bar\alpha_{t-1}) + \beta_t = 1 - \bar\alpha_t$:
#
# $$\mu_\theta = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\,
#   \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}}
#   + \frac{\sqrt{\alpha_t}(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\,x_t
#   = \frac{\beta_t + \alpha_t(1 - \bar\alpha_{t-1})}{\sqrt{\alpha_t}(1 - \bar\alpha_t)}\,x_t
#   - \frac{\beta_t}{\sqrt{\alpha_t}\sqrt{1 - \bar\alpha_t}}\,\hat\epsilon
#   = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}}\,
#     \hat\epsilon\Big),$$
#
# Ho et al.'s Eq. 11, the mean that Algorithm 2 samples (tutorial 6); it is checked below
# against `q_posterior` at $\hat x_0$. The true $x_0$ satisfies the same relation with the true
# $\epsilon$, so
#
# $$\tilde\mu_t(x_t, x_0) - \mu_\theta(x_t, t) = c_t\,(x_0 - \hat x_0)
#   = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}
#     \cdot \frac{\sqrt{1 - \bar\alpha_t}}{\sqrt{\bar\alpha_t}}\,(\hat\epsilon - \epsilon)
#   = \frac{\beta_t}{\sqrt{\alpha_t}\sqrt{1 - \bar\alpha_t}}\,(\hat\epsilon - \epsilon),$$
#
# using $\bar\alpha_{t-1} / \bar\alpha_t = 1 / \alpha_t$. The KL between
# $\mathcal{N}(\tilde\mu_t, \tilde\beta_t I)$ and $\mathcal{N}(\mu_\theta, \sigma_t^2 I)$ in $D$
# dimensions is $\frac{D}{2}\big(\frac{\tilde\beta_t}{\sigma_t^2} - 1
#  - \log\frac{\tilde\beta_t}{\sigma_t^2}\big)
#  + \frac{\|\tilde\mu_t - \mu_\theta\|^2}{2\sigma_t^2}$,
# hence
#
# $$L_{t-1} = w_t\,\mathbb{E}\,\|\epsilon - \hat\epsilon\|^2 + C_t, \qquad
#   w_t = \frac{\beta_t^2}{2\sigma_t^2\,\alpha_t\,(1 - \bar\alpha_t)}, \qquad
#   C_t = \frac{D}{2}\Big(\frac{\tilde\beta_t}{\sigma_t^2} - 1
#     - \log\frac{\tilde\beta_t}{\sigma_t^2}\Big) \ge 0 .$$
#
# So $L_{t-1} = w_t\|\epsilon - \hat\epsilon\|^2$ holds exactly only for
# $\sigma_t^2 = \tilde\beta_t$, where $C_t = 0$ and $w_t$ simplifies to
# $\beta_t / (2\alpha_t(1 - \bar\alpha_{t-1}))$; for
# $\sigma_t^2 = \beta_t$ a constant $C_t > 0$ remains (it does not depend on the network).
# DDPM's $L_\text{simple} = \mathbb{E}_{t, x_0, \epsilon}\|\epsilon - \epsilon_\theta(x_t, t)\|^2$
# [Ho 2020, Eq. 14] drops $w_t$ and $C_t$. Each $t$ has its own minimiser
# $\mathbb{E}[\epsilon \mid x_t]$, so for a flexible network the optimum is unchanged; what changes
# is the weighting across $t$: $w_t$ is by far largest at the first, least noisy steps, so
# relative to the bound $L_\text{simple}$ down-weights them and spends more of its effort on
# noisier steps [Ho 2020, Sec. 3.4].
#
# The check: for data points, noises and an *arbitrary* prediction $\hat\epsilon$ (the exact one
# plus a random perturbation), `vlb_term_from_prediction` must equal
# $w_t\|\epsilon - \hat\epsilon\|^2 + C_t$ at every $t = 2..T$. Averaged over the data with the
# exact denoiser, $\mathbb{E}\|\epsilon - \hat\epsilon\|^2$ is the minimum mean squared error
# $\sum_d \bar\alpha_t s_d^2 / (\bar\alpha_t s_d^2 + 1 - \bar\alpha_t)$, which ties the weights
# to the exact terms of section 2.

# %%
n_pts = pick(64, 512)
t_pts = torch.arange(2, T + 1, dtype=F64).repeat_interleave(n_pts)
x0_pts = (m + s2.sqrt() * torch.randn(T - 1, n_pts, D, dtype=F64, generator=gen)).reshape(-1, D)
eps = torch.randn(x0_pts.shape, dtype=F64, generator=gen)
xt = q_sample(x0_pts, t_pts, sched, eps=eps)
a, sg = (broadcast_to(v, xt) for v in sched.alpha_sigma(t_pts))
eps_hat = denoiser(xt, t_pts).eps + 0.3 * torch.randn(xt.shape, dtype=F64, generator=gen)
pred = Prediction(x0=x0_from_eps(xt, eps_hat, a, sg), eps=eps_hat)
sq_err = ((eps - eps_hat) ** 2).sum(-1)

i = t_pts.long()
beta_t, alpha_t, ab_t, bt_t = betas[i - 1], 1 - betas[i - 1], ab[i], sched.beta_tilde[i - 1]

# Eq. (11) [Ho 2020]: mu_theta in epsilon form = the posterior mean of Eq. (7) at x0_hat
mu_eq11 = (xt - (beta_t / (1 - ab_t).sqrt())[:, None] * eps_hat) / alpha_t.sqrt()[:, None]
mu_eq7, _ = q_posterior(pred.x0, xt, t_pts, t_pts - 1, sched)
mu_no_sqrt = (xt - (beta_t / (1 - ab_t))[:, None] * eps_hat) / alpha_t.sqrt()[:, None]  # a slip
RESULTS["mu_eps_form_vs_posterior_max_abs"] = float((mu_eq11 - mu_eq7).abs().max())
print(f"max |mu_theta (Eq. 11) - posterior mean at x0_hat| = "
      f"{RESULTS['mu_eps_form_vs_posterior_max_abs']:.1e}")  # fmt: skip
assert RESULTS["mu_eps_form_vs_posterior_max_abs"] < 1e-10
assert float((mu_no_sqrt - mu_eq7).abs().max()) > 1e-2
weights_t = {}
for variance, sigma2 in (("small", bt_t), ("large", beta_t)):
    w_t = beta_t**2 / (2 * sigma2 * alpha_t * (1 - ab_t))  # Eq. (12) [Ho 2020]
    c_t = D / 2 * (bt_t / sigma2 - 1 - torch.log(bt_t / sigma2))
    kl = vlb_term_from_prediction(pred, x0_pts, xt, t_pts, sched, variance=variance)
    # relative to the size of the terms (a KL near 0 is computed with cancellation)
    rel = ((kl - (w_t * sq_err + c_t)).abs() / (w_t * (1 + sq_err) + c_t)).max()
    RESULTS[f"lsimple_identity_{variance}_max_rel_err"] = float(rel)
    weights_t[variance] = w_t.reshape(T - 1, n_pts)[:, 0]  # t = 2..T
    assert RESULTS[f"lsimple_identity_{variance}_max_rel_err"] < 1e-9
    assert int(weights_t[variance].argmax()) == 0  # the largest weight is at t = 2
w_small_simplified = betas[1:] / (2 * (1 - betas[1:]) * (1 - ab[1:-1]))
RESULTS["w_small_simplified_max_rel_err"] = float(
    ((weights_t["small"] - w_small_simplified) / w_small_simplified).abs().max()
)
assert RESULTS["w_small_simplified_max_rel_err"] < 1e-12

# with the exact denoiser, E[L_{t-1}] (section 2, exact) = w_t * MMSE_t
mmse = (ab[2:, None] * s2 / (ab[2:, None] * s2 + 1 - ab[2:, None])).sum(-1)
exact_small = (weights * terms["small"][1:]).sum(-1)  # E over data of L_{t-1}, t = 2..T
# (absolute: near t = T the terms are ~1e-7 and carry rounding error of the KL's mean difference)
RESULTS["weighted_mmse_vs_terms_max_abs"] = float(
    (weights_t["small"] * mmse - exact_small).abs().max()
)
print(
    f"L_t-1 = w_t E||eps - eps_hat||^2 (+ C_t): max relative error "
    f"{RESULTS['lsimple_identity_small_max_rel_err']:.1e} (small), "
    f"{RESULTS['lsimple_identity_large_max_rel_err']:.1e} (large)"
)
assert RESULTS["weighted_mmse_vs_terms_max_abs"] < 1e-12
RESULTS["w_small_t2_over_w_small_T"] = float(weights_t["small"][0] / weights_t["small"][-1])

# %%
fig, axes = new_figure(1, 3, (15, 4))
tt = np.arange(1, T + 1)
per_t = {k: (weights * terms[k]).sum(-1).numpy() for k in terms}  # E over data, t = 1..T
ax = axes[0, 0]
for k, style in (("ideal", "k-"), ("small", "C0--"), ("large", "C1:")):
    label = f"{k}: E[L] = {RESULTS[f'bound_{k}_nats']:.4f}"
    ax.loglog(tt[1:], per_t[k][1:], style, lw=1.5, label=label)
ax.set(xlabel="t", ylabel="nats", title=r"$\mathbb{E}\,L_{t-1}$, t = 2..T")
ax.legend(fontsize=8, title=f"entropy H = {entropy:.4f}", title_fontsize=8)
ax = axes[0, 1]
for k, style in (("small", "C0--"), ("large", "C1:")):
    ax.loglog(tt, per_t[k] - per_t["ideal"], style, lw=1.5, label=f"{k} - ideal")
ax.set(xlabel="t", title=r"excess over the ideal kernel ($L_0$ at t = 1)")
ax.legend(fontsize=8)
ax = axes[0, 2]
ax.loglog(tt[1:], weights_t["small"].numpy(), label=r"$\sigma_t^2 = \tilde\beta_t$")
ax.loglog(tt[1:], weights_t["large"].numpy(), label=r"$\sigma_t^2 = \beta_t$")
ax.set(xlabel="t", title=r"$w_t$ in $L_{t-1} = w_t\,\|\epsilon - \hat\epsilon\|^2 + C_t$")
ax.legend(fontsize=8)
save(fig, "04_elbo_terms_and_weights.png")

# %% [markdown]
# ## Summary
#
# * The forward-process posterior $q(x_{t-1} \mid x_t, x_0)$ is Gaussian (Bayes' rule with two
#   Gaussian factors), with mean $\tilde\mu_t$ and variance $\tilde\beta_t$.
# * Turning each forward step around with Bayes' rule makes the ratios telescope, and the
#   bound becomes $L_T + \sum_t L_{t-1} + L_0$, a sum of Gaussian KLs. With the true reverse
#   kernels it equals $-\log q(x_0)$ exactly; with DDPM's fixed variances it is larger.
# * With $\hat x_0$ written through the predicted noise, the reverse mean is
#   $\mu_\theta = (x_t - \beta_t \hat\epsilon / \sqrt{1 - \bar\alpha_t}) / \sqrt{\alpha_t}$
#   (Eq. 11), and $L_{t-1} = w_t\|\epsilon - \hat\epsilon\|^2 + C_t$: DDPM's $L_\text{simple}$ is
#   the bound with the weights $w_t$ dropped.
#
# ## Try this
#
# 1. For data $x_0 \sim \mathcal{N}(0, 1)$ per coordinate ($s^2 = 1$), compute the ideal reverse
#    variance $\tilde\beta_t + c_t^2 v_t$ of section 2. Which fixed choice does it equal?
# 2. Now let the data be a single point ($s^2 \to 0$). Which choice is ideal then?
#    (Ho et al. name both extremes, Sec. 3.2.)
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():

    def ideal_reverse_variance(data_var: float) -> torch.Tensor:
        """beta-tilde_t + c_t^2 Var[x0 | x_t] for x0 ~ N(m, data_var), t = 1..T."""
        v_post = data_var * (1 - ab[1:]) / (ab[1:] * data_var + 1 - ab[1:])
        c = ab[:-1].sqrt() * betas / (1 - ab[1:])
        return sched.beta_tilde + c**2 * v_post

    RESULTS["answer_unit_data_ideal_is_beta_max_rel"] = float(
        (ideal_reverse_variance(1.0) / betas - 1).abs().max()
    )
    RESULTS["answer_point_data_ideal_is_beta_tilde_max_abs"] = float(
        (ideal_reverse_variance(1e-12) - sched.beta_tilde).abs().max()
    )
    print("1. s^2 = 1: the ideal variance is beta_t ('large'), max relative difference "
          f"{RESULTS['answer_unit_data_ideal_is_beta_max_rel']:.1e}")  # fmt: skip
    print("2. s^2 -> 0: it is beta-tilde_t ('small'), max difference "
          f"{RESULTS['answer_point_data_ideal_is_beta_tilde_max_abs']:.1e}")  # fmt: skip
    assert RESULTS["answer_unit_data_ideal_is_beta_max_rel"] < 1e-9
    assert RESULTS["answer_point_data_ideal_is_beta_tilde_max_abs"] < 1e-12

# %%
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
