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
# # 1. Random variables and Gaussians
#
# A diffusion model is built from one kind of object: the Gaussian. The forward process adds
# Gaussian noise, the reverse process is a chain of Gaussians, and the training loss is a sum of
# KL divergences between Gaussians. This tutorial collects the facts the series relies on, and
# checks every one of them numerically:
#
# 0. discrete and continuous random variables: probability mass, density and distribution
#    functions (PMF, PDF, CDF);
# 1. expectation and variance, and how Monte Carlo estimates them (with a standard error);
# 2. the Gaussian density in one and in several dimensions, covariance, isotropic noise;
# 3. conditioning a Gaussian on part of its coordinates (the formula behind every denoiser);
# 4. the sum of two independent Gaussians: the convolution of their densities, again a Gaussian
#    whose **variances** (not standard deviations) add.
#
# Run it as a script (`python tutorials/01_random_variables_and_gaussians.py`) or open it as a
# notebook with jupytext. `DIFFLAB_FAST=1` uses small sample sizes.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, new_figure, out_path, pick, save

from difflab import viz
from difflab.data.toy import GaussianMixture
from difflab.schedules import DiscreteSchedule

F64 = torch.float64
N = pick(20_000, 400_000)  # Monte Carlo sample size
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 0. Discrete and continuous random variables
#
# A **discrete** random variable takes countably many values $k$, each with a probability
# $P(X = k) = p(k)$: its **probability mass function** (PMF), with $p(k) \ge 0$ and
# $\sum_k p(k) = 1$. Example: the number of heads in $n = 10$ coin flips with $P(\text{head}) =
# 0.3$ is Binomial, $p(k) = \binom{n}{k} 0.3^k\, 0.7^{n-k}$.
#
# A **continuous** random variable (a pixel value, a noise sample) has $P(X = x) = 0$ for every
# single $x$; probabilities come from a **probability density function** (PDF) $p(x) \ge 0$ by
# integration, $P(a < X \le b) = \int_a^b p(x)\,dx$, with $\int p = 1$. A density is not a
# probability: it can exceed 1 (the uniform density on $[0, 0.5]$ is 2 there).
#
# Both have a **cumulative distribution function** (CDF) $F(x) = P(X \le x)$, rising from 0 to
# 1: a staircase $F(x) = \sum_{k \le x} p(k)$ for a discrete variable, a smooth curve
# $F(x) = \int_{-\infty}^x p(u)\,du$ with $F' = p$ for a continuous one. Diffusion models
# treat images as continuous (pixels scaled to $[-1, 1]$) and only at the very end account for
# the 256 discrete levels (tutorial 10's discretised decoder).
#
# The checks: the Binomial PMF sums to 1, its frequencies in samples match it, and its mean is
# $np$; for the standard Gaussian, the CDF is the integral of the PDF and the PDF the derivative
# of the CDF; and the empirical CDF of samples stays within the Dvoretzky-Kiefer-Wolfowitz band
# $\sup_x |F_n(x) - F(x)| \le \sqrt{\log(2/\delta)/(2n)}$, which fails with probability at
# most $\delta = 10^{-4}$.

# %%
n_flip, p_head = 10, 0.3
pmf = np.array([math.comb(n_flip, k) * p_head**k * (1 - p_head) ** (n_flip - k) for k in range(11)])
flips = (torch.rand(N, n_flip, dtype=F64, generator=gen) < p_head).sum(1).numpy()
freq = np.bincount(flips, minlength=11) / N
RESULTS["binomial_pmf_sum_err"] = abs(float(pmf.sum()) - 1)
RESULTS["binomial_pmf_mean_err"] = abs(float((np.arange(11) * pmf).sum()) - n_flip * p_head)
RESULTS["binomial_freq_max_abs_z"] = float(
    (np.abs(freq - pmf) / np.sqrt(pmf * (1 - pmf) / N + 1e-300))[pmf > 1e-4].max()
)
assert RESULTS["binomial_pmf_sum_err"] < 1e-12 and RESULTS["binomial_pmf_mean_err"] < 1e-12
assert RESULTS["binomial_freq_max_abs_z"] < 4.5  # the largest of 11 z-scores


def std_normal_pdf(x):
    return np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def std_normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


u = np.linspace(-8, 3, 110_001)
du = u[1] - u[0]
integral = np.concatenate(
    [[0], np.cumsum((std_normal_pdf(u[1:]) + std_normal_pdf(u[:-1])) / 2) * du]
)
RESULTS["cdf_is_integral_of_pdf_max_abs"] = float(np.abs(integral - std_normal_cdf(u)).max())
h = 1e-5
derivative = (std_normal_cdf(u[::1000] + h) - std_normal_cdf(u[::1000] - h)) / (2 * h)
RESULTS["pdf_is_derivative_of_cdf_max_abs"] = float(
    np.abs(derivative - std_normal_pdf(u[::1000])).max()
)
assert RESULTS["cdf_is_integral_of_pdf_max_abs"] < 1e-8  # trapezoid rule error ~ du^2
assert RESULTS["pdf_is_derivative_of_cdf_max_abs"] < 1e-8

normal_draws = torch.randn(N, dtype=F64, generator=gen).sort().values.numpy()
ecdf_hi = np.arange(1, N + 1) / N  # F_n just after each sample, and just before it:
RESULTS["ecdf_sup_distance"] = float(
    max(np.abs(ecdf_hi - std_normal_cdf(normal_draws)).max(),
        np.abs(ecdf_hi - 1 / N - std_normal_cdf(normal_draws)).max())
)  # fmt: skip
dkw = math.sqrt(math.log(2 / 1e-4) / (2 * N))
print(f"sup |F_n - F| = {RESULTS['ecdf_sup_distance']:.4f} <= DKW band {dkw:.4f}")
assert RESULTS["ecdf_sup_distance"] < dkw

fig, axes = new_figure(1, 3, (13, 3.4))
axes[0, 0].bar(range(11), pmf, color="C0", alpha=0.6, label="PMF")
axes[0, 0].plot(range(11), freq, "k.", label="sample frequencies")
axes[0, 0].step(range(11), pmf.cumsum(), "C1", where="post", label="CDF (a staircase)")
axes[0, 0].set(xlabel="k heads in 10 flips", title="discrete: Binomial(10, 0.3)")
axes[0, 1].plot(u, std_normal_pdf(u), label="PDF p(x)")
axes[0, 1].plot(u, std_normal_cdf(u), label="CDF F(x)")
axes[0, 1].set(xlim=(-4, 3), xlabel="x", title="continuous: N(0, 1)")
axes[0, 2].plot(normal_draws[:: max(N // 2000, 1)], ecdf_hi[:: max(N // 2000, 1)], label="F_n")
axes[0, 2].plot(u, std_normal_cdf(u), "k--", lw=0.8, label="F")
axes[0, 2].set(xlim=(-4, 3), xlabel="x", title=f"empirical CDF of {N} samples")
for ax in axes[0]:
    ax.legend(fontsize=7)
save(fig, "01_pmf_pdf_cdf.png")

# %% [markdown]
# ## 1. Expectation, variance and Monte Carlo
#
# For a random variable $X$ with density $p$,
#
# $$\mathbb{E}[X] = \int x\, p(x)\, dx, \qquad
#   \mathrm{Var}[X] = \mathbb{E}\big[(X - \mathbb{E}X)^2\big] = \mathbb{E}[X^2] - (\mathbb{E}X)^2.$$
#
# Two rules are used all the time: $\mathbb{E}[aX + b] = a\,\mathbb{E}[X] + b$ and
# $\mathrm{Var}[aX + b] = a^2\,\mathrm{Var}[X]$. The **square** matters: scaling a variable by
# $\sqrt{\bar\alpha_t}$ scales its variance by $\bar\alpha_t$.
#
# A Monte Carlo estimate replaces the integral by an average over $n$ samples. The average of
# $n$ independent copies of $f(X)$ has standard deviation $\mathrm{sd}[f(X)] / \sqrt{n}$, the
# *standard error* (SE). A correct estimate lies within 4 SE of the truth except with
# probability $6 \cdot 10^{-5}$; that is the test used throughout the series.
#
# Example: $X = U^2$ with $U \sim \mathcal{U}(0, 1)$, so $\mathbb{E}[X] = 1/3$ and
# $\mathrm{Var}[X] = \mathbb{E}[U^4] - 1/9 = 1/5 - 1/9 = 4/45$.


# %%
def mc_mean(values: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


x = torch.rand(N, dtype=F64, generator=gen) ** 2
mean, se_mean = mc_mean(x)
# the sample variance is itself a mean, of (x - mean)^2, so it has a standard error too
var, se_var = mc_mean((x - x.mean()) ** 2)
RESULTS["uniform_sq_mean_z"] = (mean - 1 / 3) / se_mean
RESULTS["uniform_sq_var_z"] = (var - 4 / 45) / se_var
print(f"E[U^2]   = {mean:.5f} +- {se_mean:.5f} (exact 1/3)")
print(f"Var[U^2] = {var:.5f} +- {se_var:.5f} (exact 4/45 = {4 / 45:.5f})")
assert abs(RESULTS["uniform_sq_mean_z"]) < 4 and abs(RESULTS["uniform_sq_var_z"]) < 4

# %% [markdown]
# ## 2. The Gaussian density
#
# $$\mathcal{N}(x; \mu, s^2) = \frac{1}{\sqrt{2\pi s^2}}
#   \exp\!\Big(-\frac{(x - \mu)^2}{2 s^2}\Big).$$
#
# Its parameters are the mean and the **variance** $s^2$; $s$ is the standard deviation. Samples
# are drawn by *shifting and scaling* a standard normal: $x = \mu + s z$, $z \sim \mathcal{N}(0,1)$
# (the reparameterisation of tutorial 2). We check that the density integrates to one, has mean
# $\mu$ and variance $s^2$ (quadrature on a grid), and that a histogram of samples matches it: the
# count in each bin is Binomial$(n, P_{\text{bin}})$ with $P_{\text{bin}}$ from the Gaussian CDF
# $\Phi(x) = \tfrac12\big(1 + \operatorname{erf}(x/\sqrt2)\big)$.


# %%
def normal_pdf(x, mu, s2):
    """N(x; mu, s2) with variance s2 (not the standard deviation)."""
    return np.exp(-0.5 * (x - mu) ** 2 / s2) / np.sqrt(2 * np.pi * s2)


def normal_cdf(x, mu, s2):
    return 0.5 * (1 + np.vectorize(math.erf)((x - mu) / np.sqrt(2 * s2)))


mu, s = 1.0, 0.7
grid = np.linspace(mu - 10 * s, mu + 10 * s, 20_001)
dx = grid[1] - grid[0]
p = normal_pdf(grid, mu, s**2)
mass = p.sum() * dx
grid_mean = (grid * p).sum() * dx
grid_var = ((grid - grid_mean) ** 2 * p).sum() * dx
print(f"integral {mass:.12f}, mean {grid_mean:.12f}, variance {grid_var:.12f} (s^2 = {s**2})")
assert abs(mass - 1) < 1e-10 and abs(grid_mean - mu) < 1e-10 and abs(grid_var - s**2) < 1e-10

samples = (mu + s * torch.randn(N, dtype=F64, generator=gen)).numpy()
edges = np.linspace(mu - 3 * s, mu + 3 * s, 31)
counts, _ = np.histogram(samples, bins=edges)
p_bin = np.diff(normal_cdf(edges, mu, s**2))
z_bins = (counts - N * p_bin) / np.sqrt(N * p_bin * (1 - p_bin))
RESULTS["histogram_max_abs_z"] = float(np.abs(z_bins).max())
print(f"largest |z| over 30 histogram bins: {RESULTS['histogram_max_abs_z']:.2f}")
# 30 bins: allow 4.5 SE for the largest one
assert RESULTS["histogram_max_abs_z"] < 4.5

# %% [markdown]
# ## 3. Multivariate Gaussians, covariance and isotropic noise
#
# In $D$ dimensions, with mean $m$ and covariance $\Sigma = \mathbb{E}[(x - m)(x - m)^\top]$,
#
# $$\mathcal{N}(x; m, \Sigma) = (2\pi)^{-D/2} |\Sigma|^{-1/2}
#   \exp\!\Big(-\tfrac12 (x - m)^\top \Sigma^{-1} (x - m)\Big).$$
#
# To sample, factor $\Sigma = L L^\top$ (Cholesky) and set $x = m + L z$ with
# $z \sim \mathcal{N}(0, I)$: then $\mathrm{Cov}[x] = L\,\mathrm{Cov}[z]\,L^\top = \Sigma$.
# The squared Mahalanobis distance $d^2 = (x - m)^\top \Sigma^{-1}(x - m) = \|z\|^2$ is a sum of
# $D$ squared standard normals ($\chi^2_D$), so $\mathbb{E}[d^2] = D$ and
# $\mathrm{Var}[d^2] = 2D$.
#
# An **isotropic** Gaussian has $\Sigma = s^2 I$: every direction has the same variance and the
# coordinates are independent, so the density is the product of $D$ one-dimensional densities.
# The noise $\epsilon \sim \mathcal{N}(0, I)$ of a diffusion model is isotropic.
#
# `difflab.data.toy.GaussianMixture` evaluates Gaussian-mixture densities; with one component
# it is a Gaussian and serves as an independent check of the formula above.


# %%
def mvn_logpdf(x: torch.Tensor, m: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; m, cov) for x (n, D), written out from the formula."""
    d = x.shape[1]
    diff = x - m
    maha = (diff @ torch.linalg.inv(cov) * diff).sum(1)
    return -0.5 * (d * math.log(2 * math.pi) + torch.logdet(cov) + maha)


m = torch.tensor([0.5, -1.0], dtype=F64)
cov = torch.tensor([[1.0, 0.8], [0.8, 2.0]], dtype=F64)
L = torch.linalg.cholesky(cov)
z = torch.randn(N, 2, dtype=F64, generator=gen)
xs = m + z @ L.T

gaussian = GaussianMixture(torch.ones(1), m[None], cov[None])
RESULTS["mvn_logpdf_vs_library_max_abs"] = float(
    (mvn_logpdf(xs[:1000], m, cov) - gaussian.log_prob(xs[:1000])).abs().max()
)
assert RESULTS["mvn_logpdf_vs_library_max_abs"] < 1e-10

# isotropic: the D-dimensional density is the product of 1-D densities
s_iso = 0.5
iso = mvn_logpdf(xs[:1000], m, s_iso**2 * torch.eye(2, dtype=F64))
prod_1d = np.log(normal_pdf(xs[:1000].numpy(), m.numpy(), s_iso**2)).sum(1)
assert np.abs(iso.numpy() - prod_1d).max() < 1e-10

# each covariance entry is a mean of products; compare with Sigma within 4 SE
centred = xs - xs.mean(0)
cov_z = torch.zeros(2, 2, dtype=F64)
for i in range(2):
    for j in range(2):
        est, se = mc_mean(centred[:, i] * centred[:, j])
        cov_z[i, j] = (est - cov[i, j]) / se
RESULTS["covariance_max_abs_z"] = float(cov_z.abs().max())
maha_mean, maha_se = mc_mean((z**2).sum(1))
RESULTS["mahalanobis_mean_z"] = (maha_mean - 2.0) / maha_se
print("sample covariance:\n", (centred.T @ centred / (N - 1)).numpy().round(4))
print(f"E[d^2] = {maha_mean:.4f} +- {maha_se:.4f} (exact D = 2)")
assert RESULTS["covariance_max_abs_z"] < 4 and abs(RESULTS["mahalanobis_mean_z"]) < 4

# %%
fig, axes = new_figure(1, 2, (9, 4.2))
u = np.linspace(-5, 5, 201)
gx, gy = np.meshgrid(u + 0.5, u - 1.0)
pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1))
for ax, c, title in (
    (axes[0, 0], cov, r"$\Sigma = [[1, 0.8], [0.8, 2]]$"),
    (axes[0, 1], torch.eye(2, dtype=F64), r"isotropic $\Sigma = I$"),
):
    sample = (m + z[:2000] @ torch.linalg.cholesky(c).T).numpy()
    viz.scatter(sample, ax=ax, title=title, lim=(-4.5, 4.5), s=3)
    dens = mvn_logpdf(pts, m, c).exp().reshape(gx.shape).numpy()
    ax.contour(gx, gy, dens, levels=4, colors="k", linewidths=0.8)
save(fig, "01_multivariate_gaussians.png")

# %% [markdown]
# ## 4. Conditional Gaussians
#
# Split a Gaussian vector into two blocks $(a, b)$ with mean $(m_a, m_b)$ and covariance
# $\begin{pmatrix}\Sigma_{aa} & \Sigma_{ab}\\ \Sigma_{ba} & \Sigma_{bb}\end{pmatrix}$.
# Then $a$ given $b$ is Gaussian again [Bishop 2006, Eq. 2.81-2.82]:
#
# $$p(a \mid b) = \mathcal{N}\big(a;\; m_a + \Sigma_{ab}\Sigma_{bb}^{-1}(b - m_b),\;
#   \Sigma_{aa} - \Sigma_{ab}\Sigma_{bb}^{-1}\Sigma_{ba}\big).$$
#
# The pair we care about is a clean value and its noisy version:
# $x_0 \sim \mathcal{N}(m, s^2)$ and $x_t = \alpha x_0 + \sigma \epsilon$. The pair is jointly
# Gaussian with $\mathrm{Var}[x_t] = \alpha^2 s^2 + \sigma^2$ and
# $\mathrm{Cov}[x_0, x_t] = \alpha s^2$, so the formula gives the *optimal denoiser*
# $\mathbb{E}[x_0 \mid x_t]$ and its error variance; tutorial 4 uses exactly this.
#
# Check by binning: keep the samples whose $x_t$ falls in a narrow bin and compare the mean and
# variance of their $x_0$ with the formula. The conditional mean is linear in $x_t$, so the bin
# average of $x_0$ equals the formula at the bin average of $x_t$; the bin variance is the
# conditional variance plus $k^2\,\mathrm{Var}[x_t \mid \text{bin}]$ (law of total variance, with
# $k = \Sigma_{ab}/\Sigma_{bb}$ the slope).

# %%
m0, s0, alpha, sigma = 0.5, 0.8, 0.6, 0.8
x0 = m0 + s0 * torch.randn(N, dtype=F64, generator=gen)
xt = alpha * x0 + sigma * torch.randn(N, dtype=F64, generator=gen)
S_aa, S_ab, S_bb = s0**2, alpha * s0**2, alpha**2 * s0**2 + sigma**2
k = S_ab / S_bb  # slope of E[x0 | xt]
cond_var = S_aa - S_ab**2 / S_bb

z_means, z_vars = [], []
half_width = 0.05
for b in (-1.0, 0.3, 1.2):
    in_bin = (xt - b).abs() < half_width
    a_bin, b_bin = x0[in_bin], xt[in_bin]
    pred_mean = m0 + k * (float(b_bin.mean()) - alpha * m0)
    pred_var = cond_var + k**2 * float(b_bin.var())
    est_mean, se_m = mc_mean(a_bin)
    est_var, se_v = mc_mean((a_bin - a_bin.mean()) ** 2)
    z_means.append((est_mean - pred_mean) / se_m)
    z_vars.append((est_var - pred_var) / se_v)
    print(
        f"xt ~ {b:+.1f} ({int(in_bin.sum())} samples): mean {est_mean:.4f} vs {pred_mean:.4f}, "
        f"var {est_var:.4f} vs {pred_var:.4f}"
    )
RESULTS["conditional_mean_max_abs_z"] = float(np.abs(z_means).max())
RESULTS["conditional_var_max_abs_z"] = float(np.abs(z_vars).max())
assert RESULTS["conditional_mean_max_abs_z"] < 4 and RESULTS["conditional_var_max_abs_z"] < 4

# %%
fig, axes = new_figure(1, 2, (9, 4))
ax = axes[0, 0]
ax.scatter(xt[:3000].numpy(), x0[:3000].numpy(), s=2, alpha=0.4, linewidths=0)
line = np.linspace(-3, 3, 10)
ax.plot(line, m0 + k * (line - alpha * m0), "r", lw=1.5, label=r"$\mathbb{E}[x_0 \mid x_t]$")
ax.axvspan(1.2 - half_width, 1.2 + half_width, color="C1", alpha=0.3)
ax.set(xlabel=r"$x_t$", ylabel=r"$x_0$", title="joint samples and the conditional mean")
ax.legend(fontsize=8)
ax = axes[0, 1]
in_bin = (xt - 1.2).abs() < half_width
ax.hist(x0[in_bin].numpy(), bins=30, density=True, color="C1", alpha=0.6, label="bin samples")
cm = m0 + k * (1.2 - alpha * m0)
a_grid = np.linspace(cm - 4 * math.sqrt(cond_var), cm + 4 * math.sqrt(cond_var), 200)
ax.plot(a_grid, normal_pdf(a_grid, cm, cond_var), "k", label=r"$p(x_0 \mid x_t = 1.2)$")
ax.set(xlabel=r"$x_0$", title="conditional density")
ax.legend(fontsize=8)
save(fig, "01_conditional_gaussian.png")

# %% [markdown]
# ## 5. Sums of independent Gaussians are convolutions
#
# If $X$ and $Y$ are independent with densities $p_X, p_Y$, then $Z = X + Y$ has density
#
# $$p_Z(z) = \int p_X(x)\, p_Y(z - x)\, dx = (p_X * p_Y)(z).$$
#
# For $X \sim \mathcal{N}(m_1, s_1^2)$ and $Y \sim \mathcal{N}(m_2, s_2^2)$ the convolution is
# $\mathcal{N}(m_1 + m_2,\; s_1^2 + s_2^2)$: means add and **variances** add. The standard
# deviation of the sum is $\sqrt{s_1^2 + s_2^2}$, not $s_1 + s_2$. We convolve the two
# densities numerically on a grid and compare with the closed form.

# %%
m1, s1, m2, s2 = -1.0, 0.6, 2.0, 1.1
h = 0.005
grid = np.arange(-12.0, 12.0 + h / 2, h)
conv = np.convolve(normal_pdf(grid, m1, s1**2), normal_pdf(grid, m2, s2**2)) * h
conv_grid = 2 * grid[0] + h * np.arange(conv.size)  # support of the full convolution
closed = normal_pdf(conv_grid, m1 + m2, s1**2 + s2**2)
wrong = normal_pdf(conv_grid, m1 + m2, (s1 + s2) ** 2)  # adding standard deviations
RESULTS["convolution_max_abs_err"] = float(np.abs(conv - closed).max())
RESULTS["std_added_max_abs_err"] = float(np.abs(conv - wrong).max())
print(f"max |convolution - N(m1 + m2, s1^2 + s2^2)|   = {RESULTS['convolution_max_abs_err']:.2e}")
print(f"max |convolution - N(m1 + m2, (s1 + s2)^2)| = {RESULTS['std_added_max_abs_err']:.2e}")
assert RESULTS["convolution_max_abs_err"] < 1e-8
assert RESULTS["std_added_max_abs_err"] > 1e-2

zs = (m1 + s1 * torch.randn(N, dtype=F64, generator=gen)) + (
    m2 + s2 * torch.randn(N, dtype=F64, generator=gen)
)

# %% [markdown]
# ### Why this matters for diffusion
#
# One forward step maps $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,x_0 + \sqrt{1-\bar\alpha_{t-1}}\,
# \epsilon'$ to $x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon''$. The two noises are
# independent Gaussians, so their sum is one Gaussian whose variance is the sum of the variances:
#
# $$(1 - \beta_t)(1 - \bar\alpha_{t-1}) + \beta_t = 1 - \bar\alpha_t,
#   \qquad \bar\alpha_t = \prod_{s=1}^{t} (1 - \beta_s).$$
#
# That is why $q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\,x_0, (1 - \bar\alpha_t) I)$ in
# closed form [Ho 2020, Eq. 4]. Note the noise of one step is scaled by $\sqrt{\beta_t}$ (its
# variance is $\beta_t$). We check the identity on difflab's linear schedule.

# %%
sched = DiscreteSchedule.from_name("linear", 1000)
ab = sched.alpha_bar  # paper-indexed: ab[0] = 1, ab[t] = prod_{s <= t} (1 - beta_s)
one_step_var = (1 - sched.betas) * (1 - ab[:-1]) + sched.betas
RESULTS["one_step_variance_identity_max_err"] = float((one_step_var - (1 - ab[1:])).abs().max())
assert RESULTS["one_step_variance_identity_max_err"] < 1e-12

# %%
fig, axes = new_figure(1, 2, (10, 3.8))
ax = axes[0, 0]
ax.plot(grid, normal_pdf(grid, m1, s1**2), label=r"$p_X = \mathcal{N}(-1, 0.6^2)$")
ax.plot(grid, normal_pdf(grid, m2, s2**2), label=r"$p_Y = \mathcal{N}(2, 1.1^2)$")
ax.plot(conv_grid, conv, "k", lw=2.5, alpha=0.5, label=r"$p_X * p_Y$ (numerical)")
ax.plot(conv_grid, closed, "r--", label=r"$\mathcal{N}(1, 0.6^2 + 1.1^2)$")
ax.plot(conv_grid, wrong, ":", color="gray", label=r"wrong: $\mathcal{N}(1, (0.6 + 1.1)^2)$")
ax.hist(zs.numpy(), bins=80, density=True, color="C2", alpha=0.25, label="samples of X + Y")
ax.set(xlim=(-5, 7), title="the sum of independent Gaussians", xlabel="z")
ax.legend(fontsize=7)
ax = axes[0, 1]
ax.semilogy(conv_grid, np.abs(conv - closed) + 1e-300, lw=0.8)
ax.set(xlim=(-8, 10), ylim=(1e-20, 1e-6), title="|numerical - closed form|", xlabel="z")
save(fig, "01_sum_is_convolution.png")

# %% [markdown]
# ## Summary
#
# * A random variable is discrete (a PMF that sums to one) or continuous (a PDF that integrates
#   to one and may exceed 1); the CDF describes both.
# * Expectations are integrals; Monte Carlo estimates them with a standard error that shrinks
#   as $1/\sqrt{n}$, and "within 4 standard errors" is the test used throughout the series.
# * Gaussians are sampled by shifting and scaling standard normals ($x = m + Lz$); conditioning
#   a jointly Gaussian pair gives a Gaussian whose mean is linear in the observed part: the
#   optimal denoiser for Gaussian data.
# * Independent Gaussians add by convolution: means add and **variances** add. That one fact
#   gives the closed form $q(x_t \mid x_0)$ of the forward process.
#
# ## Try this
#
# 1. $X \sim \mathcal{N}(0, 1)$ and $Y \sim \mathcal{N}(0, 2^2)$ are independent. What are the
#    variances of $X + Y$ and of $X - Y$? Check by Monte Carlo.
# 2. What is $P(|Z| > 2)$ for $Z \sim \mathcal{N}(0, 1)$? Get it from the CDF, then check it by
#    counting samples.
# 3. Compute the variance of the Binomial(10, 0.3) of section 0 from its PMF, and compare with
#    $np(1 - p)$.
#
# Try them before reading on: the next cell works them out, and runs only when
# `DIFFLAB_ANSWERS=1` is set (the test suite sets it and checks the answers).

# %%
if answers_wanted():
    xa = torch.randn(N, dtype=F64, generator=gen)
    ya = 2 * torch.randn(N, dtype=F64, generator=gen)
    for name, v in (("sum", xa + ya), ("difference", xa - ya)):  # 1 + 4 = 5 for both
        est, se = mc_mean((v - v.mean()) ** 2)
        RESULTS[f"answer_var_of_{name}_z"] = (est - 5.0) / se
        print(f"1. Var[X {'+' if name == 'sum' else '-'} Y] = {est:.3f} +- {se:.3f} (exact 5)")
        assert abs(RESULTS[f"answer_var_of_{name}_z"]) < 4
    tail = 2 * (1 - float(std_normal_cdf(np.array(2.0))))  # 2 (1 - Phi(2))
    frac, se = mc_mean((xa.abs() > 2).to(F64))
    RESULTS["answer_two_sd_tail"] = tail
    RESULTS["answer_two_sd_tail_z"] = (frac - tail) / se
    print(f"2. P(|Z| > 2) = {tail:.4f}; counted: {frac:.4f} +- {se:.4f}")
    assert abs(RESULTS["answer_two_sd_tail_z"]) < 4
    k = np.arange(11)
    var_pmf = float((k**2 * pmf).sum() - (k * pmf).sum() ** 2)
    RESULTS["answer_binomial_var_err"] = abs(var_pmf - n_flip * p_head * (1 - p_head))
    print(f"3. Var = {var_pmf:.6f} from the PMF, n p (1 - p) = {n_flip * p_head * (1 - p_head)}")
    assert RESULTS["answer_binomial_var_err"] < 1e-12

# %%
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
