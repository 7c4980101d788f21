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
# # 5. The first diffusion model: Sohl-Dickstein et al. 2015 on the swiss roll
#
# Diffusion models start with *Deep Unsupervised Learning using Nonequilibrium Thermodynamics*
# [Sohl-Dickstein 2015]. The ideas of tutorials 3 and 4 are all there: a fixed forward chain
# that turns data into Gaussian noise in $T$ small steps, a learned reverse chain of Gaussian
# kernels, and training by a variational lower bound on the log-likelihood. What differs from
# DDPM [Ho 2020] is the parameterisation:
#
# * **short chain**: $T = 40$ steps, with a schedule that removes about $1/T$ of the original
#   signal variance per step;
# * **mean and variance are both learned**: the reverse kernel
#   $p(x_{t-1} \mid x_t) = \mathcal{N}(\mu_t(x_t), \Sigma_t(x_t))$ has a per-coordinate variance
#   output, where DDPM fixes it;
# * **time enters through a bump basis**: one network maps $x_t$ to $2 K$ numbers per coordinate,
#   independent of $t$, and $K$ Gaussian bumps in $t$ read them out into the mean and variance
#   coefficients of step $t$;
# * **training maximises the bound $K$** of Eq. 14 directly (no reweighting into a "simple"
#   loss), reported in bits relative to an isotropic unit Gaussian.
#
# `difflab.nn.sohl_dickstein.SohlDicksteinModel` implements it as in the reference code. This
# tutorial trains it on the swiss roll, reproduces the forward/reverse figure of the paper
# (Fig. 1) and checks three claims: an untrained model scores exactly 0 bits relative to the
# isotropic Gaussian, the trained model beats it, and its samples are much closer to the data
# than the prior is.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab import viz
from difflab.data.toy import sample_toy
from difflab.likelihood import mean_and_stderr
from difflab.metrics import sliced_wasserstein
from difflab.nn.sohl_dickstein import SohlDicksteinModel, temporal_basis

THREADS = use_threads(1)  # restored at the end
T = 40
RESULTS: dict[str, float] = {}
torch.manual_seed(0)  # the network's initial weights
gen = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. Data and forward process
#
# The model's bound is measured against $\mathcal{N}(0, I)$ and assumes data with zero mean and
# unit variance, so we standardise the swiss roll (`sample_toy("swissroll")` has mean zero
# exactly; the variances are estimated once from $2 \times 10^5$ points).
#
# The schedule (`make_betas("sohl-dickstein", T)`) is
# $\beta_t = 1 / (T - (t - 1)\,\tfrac{T - 2}{T - 1})$, from $\beta_1 \approx 1/T$ up to
# $\beta_T = 1/2$, with small safety margins. The product telescopes:
# $\prod_{s \le t} (1 - 1/k_s)$ with $k_s$ falling by about one per step is close to
# $1 - t/T$, so **each step destroys about $1/T$ of the original signal variance**: the signal
# fades linearly, not geometrically as with a constant $\beta$.

# %%
scale = sample_toy("swissroll", 200_000, generator=gen).std(0)


def swissroll(n: int) -> torch.Tensor:
    """Standardised swiss-roll points (n, 2)."""
    return sample_toy("swissroll", n, generator=gen) / scale


model = SohlDicksteinModel(dim=2, T=T, n_temporal_basis=10, hidden=128, depth=2)
sched = model.schedule
t_grid = torch.arange(T + 1, dtype=torch.float64)
RESULTS["alpha_bar_vs_linear_max_abs"] = float((sched.alpha_bar - (1 - t_grid / T)).abs().max())
RESULTS["beta_1"], RESULTS["beta_T"] = float(sched.betas[0]), float(sched.betas[-1])
print(f"data scale (std per coordinate): {scale.tolist()}")
print(f"beta_1 = {RESULTS['beta_1']:.4f}, beta_T = {RESULTS['beta_T']:.4f}")
print(f"max_t |alpha_bar_t - (1 - t/T)| = {RESULTS['alpha_bar_vs_linear_max_abs']:.4f}")
assert RESULTS["alpha_bar_vs_linear_max_abs"] < 0.03

# %% [markdown]
# ## 2. The reverse kernel
#
# The network (an MLP, the same for every step) maps $x_t \in \mathbb{R}^2$ to features
# $z \in \mathbb{R}^{2 \times 2 \times K}$. Step $t$ reads them out with the bump basis
# $b_k(t)$, $K = 10$ Gaussian bumps in $t$ normalised to sum to one (`temporal_basis`):
# $c_\mu = \sum_k z_{\mu,k}\, b_k(t)$ and $c_\beta = \sum_k z_{\beta,k}\, b_k(t)$, and then
# [Sohl-Dickstein 2015, reference code]
#
# $$\mu_t = x_t \sqrt{1 - \beta_t} + c_\mu \sqrt{\beta_t}, \qquad
#   \Sigma_t = \operatorname{sigmoid}\big(c_\beta / \sqrt{T} + \operatorname{logit} \beta_t\big).$$
#
# With $z = 0$ this is $\mathcal{N}(\sqrt{1 - \beta_t}\, x_t, \beta_t)$: the exact reverse of
# the forward step when the data is $\mathcal{N}(0, I)$ (the chain is then stationary and
# reversible). The readout layer starts at zero, so the **untrained model is the isotropic
# Gaussian**, and its bound must be exactly $-\log \mathcal{N}(x_0; 0, I)$ per point: the
# reverse chain equals the forward chain's reversal, so the bound is tight. Averaged over
# unit-variance data that is the entropy of $\mathcal{N}(0, I)$, i.e. **0 bits relative to the
# isotropic Gaussian**. We check that with a Monte Carlo estimate of the full bound (all
# $T - 1$ KL terms, fresh noise each).

# %%
basis = temporal_basis(T, 10)
RESULTS["temporal_basis_sum_max_err"] = float((basis.sum(0) - 1).abs().max())
assert RESULTS["temporal_basis_sum_max_err"] < 1e-12

x_probe = torch.randn(64, 2, generator=gen)
with torch.no_grad():
    mean0, var0 = model.reverse_mean_var(x_probe, 17)
beta17 = float(sched.betas[16])
RESULTS["untrained_kernel_max_err"] = max(
    float((mean0 - math.sqrt(1 - beta17) * x_probe).abs().max()), float((var0 - beta17).abs().max())
)
assert RESULTS["untrained_kernel_max_err"] < 1e-6  # float32 network

n_eval = pick(4000, 20_000)
with torch.no_grad():
    bits0 = model.relative_bits_per_dim(model.nll_bound(swissroll(n_eval), gen, full=True))
m0, se0 = mean_and_stderr(bits0)
RESULTS["untrained_bound_rel_bits_z"] = m0 / se0
print(f"untrained: bound = {m0:+.4f} +- {se0:.4f} bits/dim relative to N(0, I)")
assert abs(RESULTS["untrained_bound_rel_bits_z"]) < 4

fig, axes = new_figure(1, 1, (6, 2.8))
for k in range(basis.shape[0]):
    axes[0, 0].plot(np.arange(1, T + 1), basis[k].numpy(), lw=1.2)
axes[0, 0].set(xlabel="step t", ylabel="weight", title=f"bump basis b_k(t), K = {basis.shape[0]}")
save(fig, "05_temporal_basis.png")

# %% [markdown]
# ## 3. Training: maximise the bound
#
# The bound of Eq. 14 [Sohl-Dickstein 2015, App. B],
#
# $$K = -\sum_{t=2}^{T} \mathbb{E}_q\, D_{KL}\big(q(x_{t-1} \mid x_t, x_0) \,\|\,
#   p(x_{t-1} \mid x_t)\big) + H_q(X_T \mid X_0) - H_q(X_1 \mid X_0) - H_p(X_T),$$
#
# is estimated with one random step $t$ per data point, the KL scaled by $T - 1$ (unbiased):
# `model.loss` returns $-K$ in bits per dimension relative to the isotropic Gaussian. The
# first reverse step is tied to the forward one (App. B.2), which produces the entropy terms.
# Adam with a one-cycle learning-rate schedule; a few thousand steps in full mode.

# %%
steps = pick(1000, 20_000)
batch = pick(256, 512)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.1)
losses = []
for _ in range(steps):
    loss = model.loss(swissroll(batch), gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lr_sched.step()
    losses.append(loss.item())
print(f"{steps} steps; loss (bits/dim vs N(0, I)) first 100: {np.mean(losses[:100]):+.3f}, "
      f"last 100: {np.mean(losses[-100:]):+.3f}")  # fmt: skip
fig = viz.plot_loss_curve(np.arange(steps), np.array(losses), logy=False)
fig.axes[0].set_ylabel("-K, bits/dim relative to N(0, I)")
save(fig, "05_training.png")

# %% [markdown]
# ## 4. The bound after training
#
# The full bound on fresh data, in bits per dimension: relative to the isotropic Gaussian
# (negative is better) and as an absolute upper bound on the negative log-likelihood, which adds
# the Gaussian's $\tfrac12 \log_2(2\pi e) \approx 2.05$ bits. On the original (unstandardised)
# scale, the density changes by the Jacobian of the scaling: add $\log_2$ of the scale per
# dimension.

# %%
with torch.no_grad():
    bits = model.relative_bits_per_dim(model.nll_bound(swissroll(n_eval), gen, full=True))
m1, se1 = mean_and_stderr(bits)
gauss_bits = 0.5 * math.log2(2 * math.pi * math.e)
RESULTS["trained_bound_rel_bits"] = m1
RESULTS["trained_bound_rel_bits_z"] = m1 / se1
RESULTS["trained_nll_bound_bits_per_dim"] = m1 + gauss_bits
RESULTS["trained_nll_bound_bits_per_dim_original_scale"] = (
    m1 + gauss_bits + float(torch.log2(scale).mean())
)
print(f"trained: bound = {m1:+.4f} +- {se1:.4f} bits/dim relative to N(0, I)")
print(f"         -log2 p(x) <= {RESULTS['trained_nll_bound_bits_per_dim']:.3f} bits/dim "
      f"(standardised), {RESULTS['trained_nll_bound_bits_per_dim_original_scale']:.3f} "
      "bits/dim (original scale)")  # fmt: skip
assert RESULTS["trained_bound_rel_bits_z"] < -4  # better than N(0, I) by > 4 standard errors

# %% [markdown]
# ## 5. Samples, and the paper's figure
#
# Ancestral sampling: $x_T \sim \mathcal{N}(0, I)$, then $x_{t-1} \sim p(x_{t-1} \mid x_t)$ for
# $t = T, \dots, 1$. The figure shows, as Fig. 1 of the paper, the forward chain started at
# data (top) and the reverse chain started at noise (bottom) at $t = 0, T/2, T$. A second
# figure shows the learned drift $\mu_t(x) - x$ on a grid (arrows rescaled in each panel):
# near $t = T$ it mostly pulls towards the origin, like the reversal of the Gaussian chain;
# near $t = 0$ it pulls points onto the roll.
#
# Sample quality is measured by the sliced Wasserstein distance to fresh data
# (`metrics.sliced_wasserstein`, the same projections for every comparison); the prior
# $\mathcal{N}(0, I)$ has the data's mean and variance, so only the structure separates the
# two. The floor is the distance between two independent data sets of the same size.

# %%
n_samples = pick(5000, 20_000)
with torch.no_grad():
    samples, reverse_traj = model.sample(n_samples, gen, return_trajectory=True)
    forward_traj = model.forward_trajectory(swissroll(n_samples), gen)
data_ref, data_other = swissroll(n_samples), swissroll(n_samples)
prior = torch.randn(n_samples, 2, generator=gen)


def sw(x: torch.Tensor) -> float:
    return sliced_wasserstein(x, data_ref, generator=torch.Generator().manual_seed(1))


RESULTS["sw_samples"], RESULTS["sw_prior"], RESULTS["sw_floor"] = (
    sw(samples), sw(prior), sw(data_other)
)  # fmt: skip
print(
    f"sliced Wasserstein to data: samples {RESULTS['sw_samples']:.4f}, prior "
    f"{RESULTS['sw_prior']:.4f}, data-vs-data floor {RESULTS['sw_floor']:.4f}"
)
assert RESULTS["sw_samples"] < 0.5 * RESULTS["sw_prior"]

cols = [0, T // 2, T]
fig = viz.scatter_grid(
    [[forward_traj[t] for t in cols], [reverse_traj[t] for t in cols]],
    [r"forward $q(x_t)$", r"reverse $p(x_t)$"],
    [f"t = {t}" for t in cols],
    lim=3.0,
    s=1.0,
)
save(fig, "05_forward_reverse.png")

g1 = torch.linspace(-2.5, 2.5, 21)
grid = torch.cartesian_prod(g1, g1)
fig, axes = new_figure(1, 3, (11, 3.8))
for ax, t in zip(axes[0], [1, T // 2, T]):
    with torch.no_grad():
        mean, _ = model.reverse_mean_var(grid, t)
    drift, pts, ref = (mean - grid).numpy(), grid.numpy(), data_ref[:2000].numpy()
    ax.quiver(pts[:, 0], pts[:, 1], drift[:, 0], drift[:, 1], angles="xy", color="C3")
    ax.scatter(ref[:, 0], ref[:, 1], s=0.5, color="0.6")
    ax.set(title=rf"drift $\mu_t(x) - x$, t = {t}", xlim=(-2.7, 2.7), ylim=(-2.7, 2.7))
    ax.set_aspect("equal")
save(fig, "05_drift.png")

# %% [markdown]
# ## Summary
#
# * The first diffusion model already has the whole structure: a fixed forward chain that
#   destroys the data, a learned Gaussian reverse chain, and training on the variational bound.
# * With Sohl-Dickstein's schedule each step removes about $1/T$ of the signal variance, so the
#   signal fades linearly in $t$.
# * The bound is reported relative to the isotropic Gaussian: an untrained model scores exactly
#   0 bits, and training makes it negative (better), by more than 4 standard errors.
#
# ## Try this
#
# 1. The isotropic Gaussian itself costs $\tfrac12 \log_2(2\pi e) \approx 2.05$ bits per
#    dimension on data drawn from it. Check this by Monte Carlo.
# 2. At which step $t$ is half of the signal variance gone ($\bar\alpha_t = 1/2$) with this
#    schedule? Compare with the linear guess $t = T/2$.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    z_std = torch.randn(pick(20_000, 200_000), 2, dtype=torch.float64, generator=gen)
    log2_density = (-0.5 * z_std**2 - 0.5 * math.log(2 * math.pi)) / math.log(2)  # per dim
    est, se = mean_and_stderr(-log2_density.mean(1))
    RESULTS["answer_gaussian_bits_z"] = (est - gauss_bits) / se
    print(f"1. -log2 N(z; 0, I) per dimension: {est:.4f} +- {se:.4f} (exact {gauss_bits:.4f})")
    assert abs(RESULTS["answer_gaussian_bits_z"]) < 4
    t_half = int((sched.alpha_bar <= 0.5).nonzero()[0])
    RESULTS["answer_t_half"] = float(t_half)
    print(f"2. alpha_bar_t <= 1/2 first at t = {t_half} of T = {T} (linear guess {T // 2})")
    assert abs(t_half - T / 2) <= 0.03 * T + 1  # within the 0.03 of section 1, in steps

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
