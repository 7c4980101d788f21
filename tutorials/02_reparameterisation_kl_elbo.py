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
# # 2. The reparameterisation trick, KL divergence and the ELBO
#
# Three tools turn "fit a probability model" into "minimise a loss with gradient descent", and a
# diffusion model uses all three:
#
# 1. the **reparameterisation trick** writes a Gaussian sample as a differentiable function of
#    its parameters, so Monte Carlo estimates of expectations can be differentiated;
# 2. the **KL divergence** between two Gaussians has a closed form, so most terms of the
#    diffusion loss need no sampling at all;
# 3. **Jensen's inequality** gives the *evidence lower bound* (ELBO) on $\log p(x)$ for a model
#    with latent variables, whose exact likelihood is out of reach. For a diffusion model the
#    latents are the noisy images $x_1, \dots, x_T$ (tutorial 4).
#
# Every claim is checked against a closed form.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, new_figure, out_path, pick, save

from difflab.likelihood import gaussian_log_likelihood, mean_and_stderr, normal_kl

F64 = torch.float64
N = pick(20_000, 400_000)  # Monte Carlo sample size
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)


def f64(value: float) -> torch.Tensor:
    """A float64 scalar tensor."""
    return torch.tensor(value, dtype=F64)


# %% [markdown]
# ## 1. The reparameterisation trick
#
# We want the gradient of $J(\mu, s) = \mathbb{E}_{x \sim \mathcal{N}(\mu, s^2)}[f(x)]$ with
# respect to $\mu$ and $s$. The distribution itself depends on the parameters, so we cannot
# simply differentiate $f$ at the samples. Writing the sample as
#
# $$x = \mu + s\,\epsilon, \qquad \epsilon \sim \mathcal{N}(0, 1),$$
#
# moves the parameters into the integrand: $J = \mathbb{E}_\epsilon[f(\mu + s\epsilon)]$, and
# $\nabla J = \mathbb{E}_\epsilon[\nabla f(\mu + s\epsilon)]$ is estimated by averaging the
# gradients of $f$ at the samples. Autograd computes them.
#
# For $f(x) = (x - c)^2$ everything is known: $J = (\mu - c)^2 + s^2$, so
# $\partial J/\partial\mu = 2(\mu - c)$ and $\partial J/\partial s = 2s$.
#
# The alternative without reparameterisation is the *score-function* (REINFORCE) estimator
# $\nabla J = \mathbb{E}[f(x)\, \nabla \log \mathcal{N}(x; \mu, s^2)]$, which only needs values
# of $f$. Both are unbiased; their variances differ a lot.

# %%
mu0, s0, c = 0.5, 1.5, 2.0
eps = torch.randn(N, dtype=F64, generator=gen)
# one copy of the parameters per sample, so that autograd returns per-sample gradients
mu = torch.full((N,), mu0, dtype=F64, requires_grad=True)
s = torch.full((N,), s0, dtype=F64, requires_grad=True)
x = mu + s * eps  # the reparameterisation
f = (x - c) ** 2
f.sum().backward()
grad_mu_rep, grad_s_rep = mu.grad.detach(), s.grad.detach()

x = x.detach()
f = f.detach()
grad_mu_sf = f * (x - mu0) / s0**2  # d/dmu log N(x; mu, s^2)
grad_s_sf = f * ((x - mu0) ** 2 - s0**2) / s0**3  # d/ds log N(x; mu, s^2)

exact = {"mu": 2 * (mu0 - c), "s": 2 * s0}
for name, g_rep, g_sf in (("mu", grad_mu_rep, grad_mu_sf), ("s", grad_s_rep, grad_s_sf)):
    m_rep, se_rep = mean_and_stderr(g_rep)
    m_sf, se_sf = mean_and_stderr(g_sf)
    RESULTS[f"reparam_grad_{name}_z"] = (m_rep - exact[name]) / se_rep
    RESULTS[f"score_function_grad_{name}_z"] = (m_sf - exact[name]) / se_sf
    RESULTS[f"variance_ratio_{name}"] = float(g_sf.var() / g_rep.var())
    print(
        f"dJ/d{name}: exact {exact[name]:+.4f} | reparameterised {m_rep:+.4f} +- {se_rep:.4f} | "
        f"score function {m_sf:+.4f} +- {se_sf:.4f} | variance ratio "
        f"{RESULTS[f'variance_ratio_{name}']:.1f}"
    )
    assert abs(RESULTS[f"reparam_grad_{name}_z"]) < 4
    assert abs(RESULTS[f"score_function_grad_{name}_z"]) < 4
    assert RESULTS[f"variance_ratio_{name}"] > 1  # the reparameterised estimator is less noisy

# %%
fig, axes = new_figure(1, 2, (9, 3.5))
for ax, name, g_rep, g_sf in (
    (axes[0, 0], r"\mu", grad_mu_rep, grad_mu_sf),
    (axes[0, 1], "s", grad_s_rep, grad_s_sf),
):
    true = exact["mu" if name == r"\mu" else "s"]
    lo, hi = np.percentile(g_sf.numpy(), [1, 99])
    bins = np.linspace(min(lo, -10), max(hi, 10), 80)
    ax.hist(g_sf.numpy(), bins=bins, density=True, alpha=0.5, label="score function")
    ax.hist(g_rep.numpy(), bins=bins, density=True, alpha=0.5, label="reparameterised")
    ax.axvline(true, color="k", lw=1, label="exact gradient")
    ax.set(title=f"per-sample estimates of $\\partial J / \\partial {name}$", yscale="log")
    ax.legend(fontsize=7)
save(fig, "02_gradient_estimators.png")

# %% [markdown]
# ## 2. KL divergence between Gaussians
#
# $$\mathrm{KL}(q \,\|\, p) = \mathbb{E}_{x \sim q}\big[\log q(x) - \log p(x)\big] \ge 0,$$
#
# zero only when $q = p$ (proved in section 3), and not symmetric. For one-dimensional
# Gaussians $q = \mathcal{N}(\mu_1, s_1^2)$, $p = \mathcal{N}(\mu_2, s_2^2)$ the expectation has a
# closed form. **Derivation.** The log-densities are
# $\log q(x) = -\frac12\log(2\pi s_1^2) - \frac{(x - \mu_1)^2}{2 s_1^2}$ and likewise for $p$.
# Under $x \sim q$, $\mathbb{E}[(x - \mu_1)^2] = s_1^2$, and writing
# $x - \mu_2 = (x - \mu_1) + (\mu_1 - \mu_2)$ (the cross term has mean zero),
# $\mathbb{E}[(x - \mu_2)^2] = s_1^2 + (\mu_1 - \mu_2)^2$. So
#
# $$\mathrm{KL}(q \,\|\, p) = -\tfrac12\log(2\pi s_1^2) - \tfrac12
#   + \tfrac12\log(2\pi s_2^2) + \frac{s_1^2 + (\mu_1 - \mu_2)^2}{2 s_2^2}
#   = \log\frac{s_2}{s_1} + \frac{s_1^2 + (\mu_1 - \mu_2)^2}{2 s_2^2} - \frac12 .$$
#
# The two expectations of the derivation and the KL itself are checked by integrating on a
# fine grid (no sampling), then the formula against the library and Monte Carlo.
#
# For diagonal Gaussians in $D$ dimensions the KL is the sum of the per-coordinate KLs.
# `difflab.likelihood.normal_kl(mean1, logvar1, mean2, logvar2)` implements the formula with
# log-variances. We compare it with the formula written out here and with Monte Carlo, where
# $\log q - \log p$ is averaged over samples of $q$
# (`difflab.likelihood.gaussian_log_likelihood` gives the log-densities).


# %%
def kl_formula(m1: float, s1: float, m2: float, s2: float) -> float:
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


pairs = [(0.0, 1.0, 0.0, 1.0), (1.0, 1.0, 0.0, 1.0), (0.5, 0.3, -0.2, 1.2), (0.0, 2.0, 1.0, 0.5)]

# the derivation, step by step, by quadrature on a grid that covers q to 12 standard deviations
derivation_err = []
for m1, s1, m2, s2 in pairs:
    x = np.linspace(m1 - 12 * s1, m1 + 12 * s1, 200_001)
    dx = x[1] - x[0]
    log_q = -0.5 * np.log(2 * np.pi * s1**2) - (x - m1) ** 2 / (2 * s1**2)
    log_p = -0.5 * np.log(2 * np.pi * s2**2) - (x - m2) ** 2 / (2 * s2**2)
    q = np.exp(log_q)
    derivation_err += [
        abs(((x - m2) ** 2 * q).sum() * dx - (s1**2 + (m1 - m2) ** 2)),  # E_q (x - mu2)^2
        abs(((log_q - log_p) * q).sum() * dx - kl_formula(m1, s1, m2, s2)),  # the KL
    ]
RESULTS["kl_derivation_by_quadrature_max_abs"] = max(derivation_err)
assert RESULTS["kl_derivation_by_quadrature_max_abs"] < 1e-9
kl_z, kl_lib_err = [], []
for m1, s1, m2, s2 in pairs:
    lv1, lv2 = f64(2 * math.log(s1)), f64(2 * math.log(s2))
    kl_lib = float(normal_kl(f64(m1), lv1, f64(m2), lv2))
    xq = m1 + s1 * torch.randn(N, dtype=F64, generator=gen)
    log_ratio = gaussian_log_likelihood(xq, m1, lv1) - gaussian_log_likelihood(xq, m2, lv2)
    kl_mc, se = mean_and_stderr(log_ratio)
    exact_kl = kl_formula(m1, s1, m2, s2)
    kl_lib_err.append(abs(kl_lib - exact_kl))
    # for q = p the log-ratio is exactly 0 for every sample: no Monte Carlo error at all
    kl_z.append(0.0 if se == 0 else (kl_mc - exact_kl) / se)
    print(
        f"KL(N({m1}, {s1}^2) || N({m2}, {s2}^2)) = {exact_kl:.5f}; normal_kl {kl_lib:.5f}; "
        f"Monte Carlo {kl_mc:.5f} +- {se:.5f}; reversed: {kl_formula(m2, s2, m1, s1):.5f}"
    )
RESULTS["kl_library_vs_formula_max_abs"] = max(kl_lib_err)
RESULTS["kl_monte_carlo_max_abs_z"] = float(np.abs(kl_z).max())
assert RESULTS["kl_library_vs_formula_max_abs"] < 1e-12
assert RESULTS["kl_monte_carlo_max_abs_z"] < 4

# a diagonal Gaussian in D dimensions: the KL is the sum over coordinates
D = 5
m1, m2 = torch.randn(D, dtype=F64, generator=gen), torch.randn(D, dtype=F64, generator=gen)
lv1, lv2 = torch.randn(D, dtype=F64, generator=gen), torch.randn(D, dtype=F64, generator=gen)
xq = m1 + (lv1 / 2).exp() * torch.randn(N, D, dtype=F64, generator=gen)
log_ratio = (gaussian_log_likelihood(xq, m1, lv1) - gaussian_log_likelihood(xq, m2, lv2)).sum(1)
kl_mc, se = mean_and_stderr(log_ratio)
kl_sum = float(normal_kl(m1, lv1, m2, lv2).sum())
RESULTS["kl_diagonal_5d_z"] = (kl_mc - kl_sum) / se
print(f"5-D diagonal Gaussians: sum of normal_kl {kl_sum:.4f}, Monte Carlo {kl_mc:.4f} +- {se:.4f}")
assert abs(RESULTS["kl_diagonal_5d_z"]) < 4

# %% [markdown]
# ## 3. Jensen's inequality
#
# For a concave function such as $\log$, $\log \mathbb{E}[Y] \ge \mathbb{E}[\log Y]$ for any
# positive random variable $Y$, with equality only when $Y$ is constant. Example: for
# $Y = e^Z$ with $Z \sim \mathcal{N}(0, 1)$, $\log\mathbb{E}[Y] = 1/2$ while
# $\mathbb{E}[\log Y] = 0$.

# %%
zj = torch.randn(N, dtype=F64, generator=gen)
mean_y, se_y = mean_and_stderr(zj.exp())
mean_log_y, se_log_y = mean_and_stderr(zj)
RESULTS["jensen_log_mean_z"] = (mean_y - math.exp(0.5)) / se_y  # E[e^Z] = e^(1/2)
RESULTS["jensen_mean_log_z"] = mean_log_y / se_log_y
print(f"log E[Y] = {math.log(mean_y):.4f} (exact 0.5) >= E[log Y] = {mean_log_y:.4f} (exact 0)")
assert abs(RESULTS["jensen_log_mean_z"]) < 4 and abs(RESULTS["jensen_mean_log_z"]) < 4

# %% [markdown]
# **Why $\mathrm{KL} \ge 0$.** Take $Y = p(x)/q(x)$ with $x \sim q$. Jensen's inequality gives
#
# $$-\mathrm{KL}(q \,\|\, p) = \mathbb{E}_q\Big[\log\frac{p(x)}{q(x)}\Big]
#   \le \log \mathbb{E}_q\Big[\frac{p(x)}{q(x)}\Big] = \log \int q(x)\frac{p(x)}{q(x)}\,dx
#   = \log \int p(x)\,dx = \log 1 = 0,$$
#
# with equality only when $p/q$ is constant, i.e. $p = q$. The check, exactly on discrete
# distributions (sums instead of integrals): for random pairs $(q, p)$ on ten points,
# $\mathbb{E}_q[p/q] = 1$, $\mathbb{E}_q[\log(p/q)] \le 0$, and the KL is 0 for $p = q$.

# %%
q_pmf = torch.rand(200, 10, dtype=F64, generator=gen) ** 3
p_pmf = torch.rand(200, 10, dtype=F64, generator=gen) ** 3
q_pmf, p_pmf = q_pmf / q_pmf.sum(1, keepdim=True), p_pmf / p_pmf.sum(1, keepdim=True)
mean_ratio = (q_pmf * p_pmf / q_pmf).sum(1)  # E_q[p / q] = sum of p = 1
kl_discrete = (q_pmf * (q_pmf / p_pmf).log()).sum(1)
RESULTS["jensen_mean_ratio_max_err"] = float((mean_ratio - 1).abs().max())
RESULTS["kl_discrete_min"] = float(kl_discrete.min())
RESULTS["kl_discrete_self_max_abs"] = float((q_pmf * (q_pmf / q_pmf).log()).sum(1).abs().max())
print(f"200 random pairs: smallest KL(q || p) = {RESULTS['kl_discrete_min']:.3e} >= 0")
assert RESULTS["jensen_mean_ratio_max_err"] < 1e-12
assert RESULTS["kl_discrete_min"] > 0 and RESULTS["kl_discrete_self_max_abs"] == 0.0

# %% [markdown]
# ## 4. The ELBO on a model whose likelihood is known
#
# A latent-variable model $p(x, z) = p(z)\,p(x \mid z)$ has evidence
# $p(x) = \int p(x, z)\,dz$. For any density $q(z)$, Jensen's inequality gives
#
# $$\log p(x) = \log \mathbb{E}_{q(z)}\Big[\frac{p(x, z)}{q(z)}\Big]
#   \;\ge\; \mathbb{E}_{q(z)}\big[\log p(x, z) - \log q(z)\big] =: \mathrm{ELBO}(q),$$
#
# and the gap is exactly a KL divergence:
# $\log p(x) - \mathrm{ELBO}(q) = \mathrm{KL}\big(q(z) \,\|\, p(z \mid x)\big)$. The bound is
# tight when $q$ is the true posterior; then $\log p(x, z) - \log q(z) = \log p(x)$ for *every*
# $z$, so even a one-sample estimate has no variance.
#
# We take the linear Gaussian model
#
# $$z \sim \mathcal{N}(0, 1), \qquad x \mid z \sim \mathcal{N}(w z + b, s_x^2),$$
#
# where everything is exact: $p(x) = \mathcal{N}(x; b, w^2 + s_x^2)$ (a sum of independent
# Gaussians, tutorial 1), and the posterior is $p(z \mid x) = \mathcal{N}(\mu_*, v_*)$ with
# $v_* = s_x^2 / (w^2 + s_x^2)$ and $\mu_* = w (x - b) / (w^2 + s_x^2)$ (a conditional
# Gaussian, tutorial 1). For $q = \mathcal{N}(m, v)$ the ELBO also has a closed form:
#
# $$\mathrm{ELBO}(m, v) = \underbrace{-\tfrac12\log(2\pi s_x^2)
#   - \frac{(x - w m - b)^2 + w^2 v}{2 s_x^2}}_{\mathbb{E}_q \log p(x \mid z)}
#   \underbrace{- \tfrac12 \log 2\pi - \frac{m^2 + v}{2}}_{\mathbb{E}_q \log p(z)}
#   + \underbrace{\tfrac12 \log(2\pi e v)}_{\text{entropy of } q}.$$

# %%
w, b, s_x, x_obs = 1.5, 0.5, 0.8, 2.0
var_x = w**2 + s_x**2  # p(x) = N(b, w^2 + s_x^2)
log_px = -0.5 * (x_obs - b) ** 2 / var_x - 0.5 * math.log(2 * math.pi * var_x)
v_post = s_x**2 / (w**2 + s_x**2)
mu_post = w * (x_obs - b) / (w**2 + s_x**2)


def elbo_closed_form(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    e_lik = -0.5 * math.log(2 * math.pi * s_x**2) - ((x_obs - w * m - b) ** 2 + w**2 * v) / (
        2 * s_x**2
    )
    e_prior = -0.5 * math.log(2 * math.pi) - (m**2 + v) / 2
    entropy = 0.5 * torch.log(2 * math.pi * math.e * v)
    return e_lik + e_prior + entropy


def log_joint(z: torch.Tensor) -> torch.Tensor:
    """log p(x_obs, z) = log p(z) + log p(x_obs | z)."""
    zero = torch.zeros((), dtype=F64)
    lv_x = f64(2 * math.log(s_x))
    return gaussian_log_likelihood(z, zero, zero) + gaussian_log_likelihood(
        f64(x_obs), w * z + b, lv_x
    )


def elbo_monte_carlo(m: float, v: float, n: int) -> tuple[float, float]:
    z = m + math.sqrt(v) * torch.randn(n, dtype=F64, generator=gen)
    lv = f64(math.log(v))
    return mean_and_stderr(log_joint(z) - gaussian_log_likelihood(z, m, lv))


# ELBO = log p(x) - KL(q || posterior) on a grid of q's, and never above log p(x)
ms = torch.linspace(-1.0, 2.5, 141, dtype=F64)
log_vs = torch.linspace(math.log(0.02), math.log(2.0), 121, dtype=F64)
M, LV = torch.meshgrid(ms, log_vs, indexing="ij")
elbo_grid = elbo_closed_form(M, LV.exp())
kl_to_post = normal_kl(M, LV, f64(mu_post), f64(math.log(v_post)))
RESULTS["elbo_gap_minus_kl_max_abs"] = float((log_px - elbo_grid - kl_to_post).abs().max())
RESULTS["elbo_max_over_grid_minus_log_px"] = float(elbo_grid.max()) - log_px
assert RESULTS["elbo_gap_minus_kl_max_abs"] < 1e-12
assert RESULTS["elbo_max_over_grid_minus_log_px"] <= 1e-12

# at the true posterior: closed form equals log p(x), and Monte Carlo has zero variance
elbo_post = float(elbo_closed_form(f64(mu_post), f64(v_post)))
mc_post, se_post = elbo_monte_carlo(mu_post, v_post, 1000)
RESULTS["elbo_at_posterior_minus_log_px"] = elbo_post - log_px
RESULTS["elbo_at_posterior_mc_stderr"] = se_post
assert abs(RESULTS["elbo_at_posterior_minus_log_px"]) < 1e-12 and se_post < 1e-12
assert abs(mc_post - log_px) < 1e-12

# a q that is not the posterior: Monte Carlo ELBO agrees with the closed form, and the
# Jensen gap shows up: log E_q[p(x,z)/q(z)] estimates log p(x), E_q[log p(x,z)/q(z)] is lower
m_q, v_q = mu_post + 0.4, 1.5 * v_post
elbo_q = float(elbo_closed_form(f64(m_q), f64(v_q)))
zq = m_q + math.sqrt(v_q) * torch.randn(N, dtype=F64, generator=gen)
log_w = log_joint(zq) - gaussian_log_likelihood(zq, m_q, f64(math.log(v_q)))
mc_elbo, se_elbo = mean_and_stderr(log_w)
mean_w, se_w = mean_and_stderr(log_w.exp())
RESULTS["elbo_mc_z"] = (mc_elbo - elbo_q) / se_elbo
RESULTS["importance_log_px_z"] = (mean_w - math.exp(log_px)) / se_w
RESULTS["log_px"] = log_px
RESULTS["elbo_q"] = elbo_q
print(f"log p(x)                    = {log_px:.5f}")
print(f"log mean of p(x,z)/q(z)     = {math.log(mean_w):.5f}  (estimates log p(x))")
print(f"ELBO(q), Monte Carlo        = {mc_elbo:.5f} +- {se_elbo:.5f}")
print(f"ELBO(q), closed form        = {elbo_q:.5f}  (gap = KL(q || posterior) > 0)")
print(f"ELBO(posterior), closed form = {elbo_post:.5f}")
assert abs(RESULTS["elbo_mc_z"]) < 4 and abs(RESULTS["importance_log_px_z"]) < 4
assert elbo_q < log_px

# %% [markdown]
# ## 5. Maximising the ELBO with reparameterised gradients
#
# In practice the ELBO is maximised by stochastic gradient ascent: sample
# $z = m + \sqrt{v}\,\epsilon$, evaluate $\log p(x, z)$, add the entropy of $q$ in closed form,
# and let autograd differentiate through the sample. Starting from $q = p(z) = \mathcal{N}(0,1)$,
# Adam on $(m, \log s)$ walks to the true posterior $(\mu_*, v_*)$. A diffusion model is trained
# the same way: the network's outputs play the role of $(m, v)$, and the ELBO over the noisy
# latents becomes the loss of tutorial 4.

# %%
steps = pick(300, 600)
m_param = torch.zeros((), dtype=F64, requires_grad=True)
log_s_param = torch.zeros((), dtype=F64, requires_grad=True)
opt = torch.optim.Adam([m_param, log_s_param], lr=0.05)
sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-3)
path = []
for _ in range(steps):
    e = torch.randn(256, dtype=F64, generator=gen)
    z = m_param + log_s_param.exp() * e  # reparameterised sample of q
    entropy = 0.5 * math.log(2 * math.pi * math.e) + log_s_param
    loss = -(log_joint(z).mean() + entropy)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched_lr.step()
    path.append((m_param.item(), 2 * log_s_param.item()))
m_fit, log_v_fit = path[-1]
RESULTS["fit_mean_error"] = abs(m_fit - mu_post)
RESULTS["fit_log_var_error"] = abs(log_v_fit - math.log(v_post))
elbo_fit = float(elbo_closed_form(f64(m_fit), f64(math.exp(log_v_fit))))
RESULTS["fit_elbo_gap"] = log_px - elbo_fit
print(f"fitted q: mean {m_fit:.4f} (posterior {mu_post:.4f}), variance {math.exp(log_v_fit):.4f}")
print(f"(posterior {v_post:.4f}); remaining gap log p(x) - ELBO = {RESULTS['fit_elbo_gap']:.2e}")
assert RESULTS["fit_mean_error"] < 0.05 and RESULTS["fit_log_var_error"] < 0.1

# %%
fig, axes = new_figure(1, 2, (10, 4))
ax = axes[0, 0]
levels = log_px - np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.05, 0.01])
cs = ax.contour(M.numpy(), LV.numpy(), elbo_grid.numpy(), levels=levels, cmap="viridis")
ax.clabel(cs, fontsize=6, fmt="%.2f")
p = np.array(path)
ax.plot(p[:, 0], p[:, 1], "C1-", lw=1, label="Adam on the reparameterised ELBO")
ax.plot([mu_post], [math.log(v_post)], "r*", ms=12, label=r"true posterior $(\mu_*, \log v_*)$")
ax.plot([0], [0], "ko", ms=5, label="start: the prior")
ax.set(xlabel="mean m of q", ylabel="log variance of q", title=f"ELBO(q); log p(x) = {log_px:.3f}")
ax.legend(fontsize=7, loc="lower right")
ax = axes[0, 1]
zz = torch.linspace(-1.5, 3.0, 400, dtype=F64)
post = gaussian_log_likelihood(zz, mu_post, f64(math.log(v_post))).exp()
ax.plot(zz, post, "r", lw=2, label=r"posterior $p(z \mid x)$")
ax.plot(zz, (log_joint(zz) - log_px).exp(), "k:", lw=2, label=r"$p(x, z) / p(x)$")
ax.plot(
    zz,
    gaussian_log_likelihood(zz, m_fit, f64(log_v_fit)).exp(),
    "C1--",
    label="fitted q",
)
ax.plot(zz, gaussian_log_likelihood(zz, 0.0, f64(0.0)).exp(), "C0", label="prior p(z)")
ax.set(xlabel="z", title="posterior, Bayes' rule and the fitted q")
ax.legend(fontsize=7)
save(fig, "02_elbo.png")

# %% [markdown]
# ## Summary
#
# * Writing a sample as $\mu + s\epsilon$ (reparameterisation) makes a Monte Carlo estimate
#   differentiable in $\mu$ and $s$, with far less variance than the score-function estimator.
# * The KL divergence is never negative (Jensen), zero only for equal distributions, and not
#   symmetric; between Gaussians it has a closed form, derived above from two expectations.
# * The ELBO is $\log p(x)$ minus a KL, so it is a lower bound, tight when $q$ is the posterior;
#   maximising it with reparameterised gradients finds that posterior. Tutorial 4 applies the
#   same bound with the noisy images $x_{1:T}$ as latents.
#
# ## Try this
#
# 1. Compute $\mathrm{KL}(\mathcal{N}(0, 1) \,\|\, \mathcal{N}(1, 1))$ and the reversed KL. Why
#    are they equal here?
# 2. Compute $\mathrm{KL}(\mathcal{N}(0, 1) \,\|\, \mathcal{N}(0, 2^2))$ and
#    $\mathrm{KL}(\mathcal{N}(0, 2^2) \,\|\, \mathcal{N}(0, 1))$. Which is larger, and why?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    zero, lv_1, lv_4 = f64(0.0), f64(0.0), f64(math.log(4.0))  # log-variances of 1 and 4
    forward = float(normal_kl(zero, lv_1, f64(1.0), lv_1))
    backward = float(normal_kl(f64(1.0), lv_1, zero, lv_1))
    # equal variances: KL = (mu1 - mu2)^2 / (2 s^2) = 1/2, symmetric in the means
    RESULTS["answer_equal_variance_kl_err"] = max(abs(forward - 0.5), abs(backward - 0.5))
    print(
        f"1. KL = {forward:.4f} both ways: with equal variances only (mu1 - mu2)^2 / 2s^2 is left"
    )
    assert RESULTS["answer_equal_variance_kl_err"] < 1e-12
    narrow_in_wide = float(normal_kl(zero, lv_1, zero, lv_4))  # log 2 + 1/8 - 1/2
    wide_in_narrow = float(normal_kl(zero, lv_4, zero, lv_1))  # -log 2 + 2 - 1/2
    RESULTS["answer_narrow_in_wide_kl"] = narrow_in_wide
    RESULTS["answer_wide_in_narrow_kl"] = wide_in_narrow
    RESULTS["answer_variance_kl_err"] = max(
        abs(narrow_in_wide - (math.log(2) + 1 / 8 - 1 / 2)),
        abs(wide_in_narrow - (-math.log(2) + 2 - 1 / 2)),
    )
    print(f"2. KL(N(0,1) || N(0,4)) = {narrow_in_wide:.4f} < KL(N(0,4) || N(0,1)) = "
          f"{wide_in_narrow:.4f}: a q wider than p puts mass where p is tiny")  # fmt: skip
    assert RESULTS["answer_variance_kl_err"] < 1e-12 and wide_in_narrow > narrow_in_wide

# %%
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
