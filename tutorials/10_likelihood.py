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
# # 10. Likelihood: bits per dimension, by the bound and by the ODE
#
# A diffusion model is a likelihood model, and there are two ways to get its likelihood:
#
# * the **variational bound** of the discrete-time model [Ho 2020, Eq. 5]: an upper bound on
#   $-\log p_\theta(x_0)$, a sum of $T$ KL terms (tutorial 4), `likelihood.vlb`;
# * the **probability-flow ODE** [Song 2021 (score SDE), Sec. 4.3]: the deterministic sampler is an
#   invertible map from noise to data, so the change-of-variables formula gives the exact
#   log-density of the ODE model, $\log p(x) = \log p_T(y_T) + \int \nabla \cdot f \, ds$, with
#   the divergence estimated by Hutchinson's trick $\nabla \cdot f = \mathbb{E}_z[z^\top
#   (\partial f / \partial y)\, z]$ [Grathwohl 2019], `ode_likelihood.pf_ode_nll`.
#
# Both are reported in **bits per dimension**: nats divided by $D \ln 2$ (`bits_per_dim`).
#
# We first use Gaussian data and its exact denoiser, where the true NLL is known in closed form,
# and check both estimators against it. The bound needs the right reverse variances to be
# tight: with DDPM's fixed ones it stays above the NLL; with the variances an Improved-DDPM
# model would learn [Nichol & Dhariwal 2021], here computed exactly, it meets it. Then we
# train a small model on 2-D data with a known density and check what must hold for any
# model: its NLL is at least the data entropy.

# %%
import math

import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab.data.toy import default_gmm
from difflab.likelihood import bits_per_dim, gaussian_log_likelihood, mean_and_stderr
from difflab.likelihood import vlb as variational_bound
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss
from difflab.ode_likelihood import pf_ode_nll
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.schedules import DiscreteSchedule

THREADS = use_threads(1)  # tiny matrix products: one thread is fastest; restored at the end
F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
sched = DiscreteSchedule.from_name("linear", T)


def z_score(diff: torch.Tensor) -> tuple[float, float, float]:
    """(mean, standard error, mean / standard error) of per-sample differences."""
    mean, se = mean_and_stderr(diff)
    return mean, se, mean / se


# %% [markdown]
# ## 1. Gaussian data and its true NLL
#
# $x_0 \sim \mathcal{N}(m, C)$ in $D = 4$ dimensions with a diagonal $C$ (scales from 0.6 down
# to 0.05), so $-\log q(x_0)$ is known for every point. `oracles.GaussianDenoiser` is the exact
# $\mathbb{E}[x_0 \mid x_t]$.

# %%
D = 4
m = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=F64)
s2 = torch.tensor([0.6, 0.3, 0.1, 0.05], dtype=F64) ** 2
exact = GaussianDenoiser(m, torch.diag(s2), sched)
n = pick(1000, 4000)
x0 = m + s2.sqrt() * torch.randn(n, D, dtype=F64, generator=gen)
nll_true = -gaussian_log_likelihood(x0, m, s2.log()).sum(1)  # nats per point
entropy = float(0.5 * torch.log(2 * math.pi * math.e * s2).sum())
RESULTS["true_nll_bits_per_dim"] = float(bits_per_dim(nll_true.mean(), D))
RESULTS["entropy_bits_per_dim"] = float(bits_per_dim(entropy, D))
print(f"true NLL of the sample: {RESULTS['true_nll_bits_per_dim']:+.4f} bits/dim "
      f"(entropy of the law: {RESULTS['entropy_bits_per_dim']:+.4f})")  # fmt: skip

# %% [markdown]
# ## 2. The variational bound
#
# `vlb` samples one $x_t$ per step and point, so its value is a Monte Carlo estimate of the
# bound; with `stride = k` it evaluates every $k$-th step (with a random offset per point) and
# weights by $k$, which stays unbiased. The three variants below use the same random numbers,
# so their differences are measured with little noise. The decoder term $L_0$ is a Gaussian density
# (`decoder="gaussian"`), as the data are continuous.
#
# With DDPM's fixed variances ($\tilde\beta_t$, "small", or $\beta_t$, "large") the bound is
# larger than the NLL, even with the exact mean. The true reverse kernel of Gaussian data has
# variance $\tilde\beta_t + c_t^2\,\mathrm{Var}[x_0 \mid x_t]$, $c_t = \sqrt{\bar\alpha_{t-1}}
# \beta_t / (1 - \bar\alpha_t)$ (tutorial 4), per coordinate. Improved DDPM learns the log
# variance as an interpolation $v \log\beta_t + (1 - v)\log\tilde\beta_t$
# [Nichol & Dhariwal 2021, Eq. 15]; the wrapper below returns the $v$ that hits the true
# variance exactly (`Prediction.var_frac`), and `variance="learned"` uses it. With it, every
# term is the true one and the bound is tight, up to the prior term $L_T$, which is
# $\approx 10^{-5}$ nats here: the Monte Carlo estimate must agree with the true NLL.


# %%
class IdealVariance:
    """The exact denoiser plus the var_frac that makes each reverse variance the true one."""

    def __init__(self, base: GaussianDenoiser) -> None:
        self.base = base
        ab, betas, bt = sched.alpha_bar, sched.betas, sched.beta_tilde
        t = torch.arange(1, T + 1)
        v_post = s2 * (1 - ab[t, None]) / (ab[t, None] * s2 + 1 - ab[t, None])  # Var[x0 | x_t]
        c = (ab[t - 1].sqrt() * betas / (1 - ab[t]))[:, None]
        ideal = bt[:, None] + c**2 * v_post  # (T, D); at t = 1: Var[x0 | x1]
        small = torch.cat([bt[1:2], bt[1:]])[:, None]  # beta-tilde_1 = 0 is clipped to beta-tilde_2
        self.var_frac = torch.log(ideal / small) / torch.log(betas[:, None] / small)  # (T, D)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, cond=None) -> Prediction:
        pred = self.base(xt, t)
        frac = self.var_frac[torch.as_tensor(t).long() - 1].to(xt.dtype)
        return Prediction(x0=pred.x0, eps=pred.eps, var_frac=frac)


stride = pick(5, 1)
bounds = {}
for variance, den in (("small", exact), ("large", exact), ("learned", IdealVariance(exact))):
    out = variational_bound(
        den, x0, sched, variance=variance, decoder="gaussian", stride=stride,
        generator=torch.Generator().manual_seed(7),  # the same x_t for the three variances
    )  # fmt: skip
    bounds[variance] = out["total"]
    gap, se, z = z_score(out["total"] - nll_true)
    RESULTS[f"vlb_{variance}_bits_per_dim"] = float(bits_per_dim(out["total"].mean(), D))
    RESULTS[f"vlb_{variance}_gap_bits_per_dim"] = float(bits_per_dim(gap, D))
    RESULTS[f"vlb_{variance}_gap_z"] = z
    print(
        f"bound, {variance:7s} variance: {RESULTS[f'vlb_{variance}_bits_per_dim']:+.4f} bits/dim;"
        f" bound - NLL = {bits_per_dim(gap, D):+.4f} +- {bits_per_dim(se, D):.4f} (z = {z:+.1f})"
    )
assert abs(RESULTS["vlb_learned_gap_z"]) < 4  # tight: agrees with the true NLL
for variance in ("small", "large"):  # fixed variances: strictly above (paired, same x_t)
    _, _, z = z_score(bounds[variance] - bounds["learned"])
    RESULTS[f"vlb_{variance}_minus_learned_z"] = z
    assert z > 4, variance

# %% [markdown]
# ### Learning the variance: $L_\text{hybrid}$
#
# Improved DDPM does not know the true variances: its network outputs a second value $v$ per
# dimension, read as `var_frac` $= (v + 1)/2$, and is trained on
# $L_\text{hybrid} = L_\text{simple} + \lambda L_\text{vlb}$ with $\lambda = 0.001$
# [Nichol & Dhariwal 2021, Sec. 3.1], where $L_\text{vlb}$ is the bound term $L_{t-1}$ computed
# with the mean detached, so that it trains the variance only (`diffusion_loss` with
# `ModelDenoiser(..., learned_variance=True)`). To watch the variance alone, the mean here is
# the exact one and the trainable part is a small MLP of $t$ that outputs $v$ for each of the
# $D$ coordinates (for Gaussian data the true variance depends on $t$ and the coordinate, not
# on $x_t$). Checked: the largest error of the learned log-variance over $t$ and the
# coordinates shrinks, the bound's excess over the ideal variance's bound shrinks to under a
# quarter, and the bound is below both fixed choices (all paired, with the same $x_t$).


# %%
class LearnedVarianceNet(torch.nn.Module):
    """(x_t (B, D), t (B,)) -> (B, 2D): the exact eps, then v(t) from a small MLP of t."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(9, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, D)
        )
        torch.nn.init.zeros_(self.mlp[2].weight)  # start at v = 0: halfway between the
        torch.nn.init.zeros_(self.mlp[2].bias)  # log-variances beta-tilde_t and beta_t

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        u = (t.to(xt.dtype) / T)[:, None]
        k = torch.arange(1, 5, dtype=xt.dtype)
        feats = torch.cat([u, torch.sin(math.pi * k * u), torch.cos(math.pi * k * u)], 1)
        return torch.cat([exact(xt, t).eps, self.mlp(feats)], 1)


def log_variances(frac: torch.Tensor) -> torch.Tensor:
    """(T, D) var_frac -> log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t."""
    small = torch.cat([sched.beta_tilde[1:2], sched.beta_tilde[1:]]).log()[:, None]
    return frac * sched.betas.log()[:, None] + (1 - frac) * small


torch.manual_seed(0)
var_net = LearnedVarianceNet().double()
hybrid = ModelDenoiser(var_net, sched, parameterization="eps", learned_variance=True)
t_all = torch.arange(1, T + 1, dtype=F64)


def learned_frac() -> torch.Tensor:
    with torch.no_grad():
        return hybrid(torch.zeros(T, D, dtype=F64), t_all).var_frac  # (T, D)


def bound_of(denoiser) -> torch.Tensor:
    """Per-point bound (nats) with the learned variance, on the x_t of the bounds above."""
    return variational_bound(
        denoiser, x0, sched, variance="learned", decoder="gaussian", stride=stride,
        generator=torch.Generator().manual_seed(7),
    )["total"]  # fmt: skip


ideal_logvar = log_variances(IdealVariance(exact).var_frac)
logvar_err_before = float((log_variances(learned_frac()) - ideal_logvar).abs().max())
bounds["untrained"] = bound_of(hybrid)
opt_v = torch.optim.Adam(var_net.parameters(), lr=3e-2)
for _ in range(pick(300, 2000)):
    batch_x0 = m + s2.sqrt() * torch.randn(256, D, dtype=F64, generator=gen)
    loss = diffusion_loss(hybrid, batch_x0, generator=gen, decoder="gaussian").loss
    opt_v.zero_grad(set_to_none=True)
    loss.backward()
    opt_v.step()
logvar_err_after = float((log_variances(learned_frac()) - ideal_logvar).abs().max())
RESULTS["hybrid_logvar_err_before"] = logvar_err_before
RESULTS["hybrid_logvar_err_after"] = logvar_err_after
print(f"max |log sigma_t^2 (learned) - log sigma_t^2 (ideal)| over t and coordinates: "
      f"{logvar_err_before:.3f} before, {logvar_err_after:.3f} after training")  # fmt: skip
assert logvar_err_after < 0.5 * logvar_err_before

bounds["trained"] = bound_of(hybrid)
RESULTS["vlb_trained_bits_per_dim"] = float(bits_per_dim(bounds["trained"].mean(), D))
for k in ("untrained", "trained"):  # paired: the same x_t, so the noise mostly cancels
    excess, se, _ = z_score(bits_per_dim(bounds[k] - bounds["learned"], D))
    RESULTS[f"vlb_{k}_excess_over_ideal_bits_per_dim"] = excess
    print(f"bound - bound with the ideal variance, {k:9s}: {excess:+.4f} +- {se:.4f} bits/dim")
assert (
    RESULTS["vlb_trained_excess_over_ideal_bits_per_dim"]
    < 0.25 * RESULTS["vlb_untrained_excess_over_ideal_bits_per_dim"]
)
for variance in ("small", "large"):
    _, _, z = z_score(bounds[variance] - bounds["trained"])
    RESULTS[f"vlb_{variance}_minus_trained_z"] = z
    assert z > 4, variance
print(f"bound with the trained variance: {RESULTS['vlb_trained_bits_per_dim']:+.4f} bits/dim "
      f"(ideal {RESULTS['vlb_learned_bits_per_dim']:+.4f})")  # fmt: skip

fig, axes = new_figure(1, 2, (10, 3.6))
for d, color in zip(range(D), ("C0", "C1", "C2", "C3")):
    axes[0, 0].semilogx(t_all, ideal_logvar[:, d], color=color, lw=2, alpha=0.4)
    axes[0, 0].semilogx(t_all, log_variances(learned_frac())[:, d], "--", color=color, lw=1)
axes[0, 0].semilogx(t_all, sched.betas.log(), "k:", lw=0.8, label=r"$\log\beta_t$")
axes[0, 0].set(xlabel="t", ylabel=r"$\log\sigma_t^2$", title="ideal (thick) and learned (dashed)")
axes[0, 0].legend(fontsize=8)
axes[0, 1].semilogx(t_all, (log_variances(learned_frac()) - ideal_logvar).abs().mean(1))
axes[0, 1].set(xlabel="t", ylabel="mean |log-variance error|", yscale="log")
axes[0, 1].set_title(f"after {pick(300, 2000)} steps of L_hybrid", fontsize=10)
save(fig, "10_learned_variance.png")

# %% [markdown]
# ## 3. The probability-flow ODE
#
# `pf_ode_nll` integrates the ODE from $t_\epsilon = 1$ (the least noisy trained level) to
# $T$ with classical RK4 in the EDM variables and accumulates the divergence. It returns
# $-\log p_{t_\epsilon}(x)$, the density of the model's $x_{t_\epsilon}$ at the point $x$. For
# the exact denoiser that is the true noised law
# $q_{t_\epsilon} = \mathcal{N}(\alpha m, \alpha^2 C + \sigma^2 I)$ with $\sigma_1 = 0.01$,
# which differs from $q_0$ by a small, known amount. Two divergence estimators:
#
# * `hutchinson="exact"`: $D$ vector-Jacobian products per evaluation, so the result is
#   deterministic and must match the closed form point by point (up to the ODE solver's error);
# * `hutchinson="rademacher"`: one random $\pm 1$ probe per point, drawn once and kept along the
#   path: one vector-Jacobian product, unbiased, with Monte Carlo noise that averages out over
#   points.
#
# With a diagonal $C$ the Jacobian of the denoiser is diagonal, and then a Rademacher probe is
# exact ($z^\top J z = \sum_i J_{ii} z_i^2$ and $z_i^2 = 1$). To see the Monte Carlo noise we
# rotate the data by a random orthogonal $R$: the NLLs do not change ($|\det R| = 1$), but the
# Jacobian is no longer diagonal.

# %%
a1, sg1 = (float(v) for v in sched.alpha_sigma(1.0))
nll_t1 = -gaussian_log_likelihood(x0, a1 * m, torch.log(a1**2 * s2 + sg1**2)).sum(1)
# a rotated copy of the data: the same NLLs, but the denoiser's Jacobian is no longer diagonal
R = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=gen))[0]
rotated = GaussianDenoiser(R @ m, R @ torch.diag(s2) @ R.T, sched)
x0_rot = x0 @ R.T
n_ode, ode_steps = pick(200, 1000), pick(32, 64)
ode_exact = pf_ode_nll(rotated, x0_rot[:n_ode], sched, steps=ode_steps, hutchinson="exact")
ode_hutch = pf_ode_nll(rotated, x0_rot, sched, steps=ode_steps, generator=gen)
ode_diag = pf_ode_nll(exact, x0[:n_ode], sched, steps=ode_steps, generator=gen)
RESULTS["ode_exact_trace_max_abs_err_nats"] = float((ode_exact - nll_t1[:n_ode]).abs().max())
RESULTS["ode_diagonal_rademacher_vs_exact_max_abs"] = float((ode_diag - ode_exact).abs().max())
gap, se, z = z_score(ode_hutch - nll_t1)
RESULTS["ode_hutchinson_mean_err_z"] = z
RESULTS["ode_hutchinson_per_point_sd_nats"] = float((ode_hutch - nll_t1).std())
RESULTS["ode_bits_per_dim"] = float(bits_per_dim(ode_hutch.mean(), D))
RESULTS["q1_vs_q0_bits_per_dim"] = float(bits_per_dim((nll_t1 - nll_true).mean(), D))
print(
    f"ODE, exact trace: max |NLL - closed form| = "
    f"{RESULTS['ode_exact_trace_max_abs_err_nats']:.1e} nats"
)
print(
    f"ODE, Hutchinson: {RESULTS['ode_bits_per_dim']:+.4f} bits/dim; mean error "
    f"{bits_per_dim(gap, D):+.4f} +- {bits_per_dim(se, D):.4f} (z = {z:+.1f}), per-point sd "
    f"{RESULTS['ode_hutchinson_per_point_sd_nats']:.2f} nats"
)
print(
    "ODE, Rademacher probes on the unrotated data (diagonal Jacobian): max |difference from "
    f"the exact trace| = {RESULTS['ode_diagonal_rademacher_vs_exact_max_abs']:.1e} nats"
)
print(f"(-log q_1 vs -log q_0: {RESULTS['q1_vs_q0_bits_per_dim']:+.4f} bits/dim)")
assert RESULTS["ode_exact_trace_max_abs_err_nats"] < 2e-2
assert abs(RESULTS["ode_hutchinson_mean_err_z"]) < 4
assert RESULTS["ode_hutchinson_per_point_sd_nats"] > 0.1  # a real Monte Carlo estimate ...
assert RESULTS["ode_diagonal_rademacher_vs_exact_max_abs"] < 1e-6  # ... except for diagonal J

fig, axes = new_figure(1, 2, (11, 4))
ax = axes[0, 0]
lo, hi = float(nll_true.min()), float(nll_true.max())
ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
ax.scatter(nll_t1.numpy(), ode_hutch.numpy(), s=2, alpha=0.4, color="C3", label="ODE, one probe")
ax.scatter(nll_t1[:n_ode].numpy(), ode_exact.numpy(), s=5, color="C0", label="ODE, exact div.")
ax.set(xlabel=r"closed form $-\log q_1(x)$ (nats)", ylabel="estimate (nats)")
ax.set_title("Gaussian data (rotated), per point", fontsize=10)
ax.legend(fontsize=7)
ax = axes[0, 1]
names = ["true NLL", "bound, small", "bound, large", "bound, ideal", "ODE, Hutchinson"]
per_point = [nll_true, bounds["small"], bounds["large"], bounds["learned"], ode_hutch]
values = [float(bits_per_dim(v.mean(), D)) for v in per_point]
errors = [float(bits_per_dim(mean_and_stderr(v)[1], D)) for v in per_point]
ax.barh(names, values, xerr=errors, color=["k", "C0", "C1", "C2", "C3"], capsize=3)
ax.set(xlabel="bits per dimension (lower is better)")
ax.set_title("averages over the sample, with standard errors", fontsize=10)
save(fig, "10_gaussian_likelihoods.png")

# %% [markdown]
# ## 4. A trained model on 2-D data
#
# Now a `TimeMLP` trained on the `gmm` toy data (5 anisotropic Gaussians), whose density is
# known exactly. For a trained model no estimate can be checked against a closed form, but one
# inequality holds for **every** model: the data's average NLL under the model is at least the
# data's entropy, because the difference is $D_{KL}(q \,\|\, p_\theta) \ge 0$. The bound sits
# above the model's NLL, so it obeys the same inequality. We compute the per-point differences
# $-\log p_\theta(x) + \log q(x)$ (paired, so the data's own spread cancels) and check that
# their mean is not negative beyond Monte Carlo error; a sign error or a missing
# log-determinant would break it. In fast mode the model trains for a few seconds, so the
# differences are large; in full mode they shrink towards 0.

# %%
gmm = default_gmm()
torch.manual_seed(0)
net = TimeMLP(2, hidden=pick(64, 128), depth=pick(2, 3))
model = ModelDenoiser(net, sched, parameterization="eps")
steps = pick(300, 8000)
opt = torch.optim.Adam(net.parameters(), lr=pick(1e-2, 3e-3))
lr_sched = torch.optim.lr_scheduler.OneCycleLR(
    opt, max_lr=pick(1e-2, 3e-3), total_steps=steps, pct_start=0.1
)
for _ in range(steps):
    loss = diffusion_loss(model, gmm.sample(pick(256, 512), gen), generator=gen).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lr_sched.step()
model.eval()

n_2d = pick(500, 4000)
x_data = gmm.sample(n_2d, gen)  # float32, as the network runs
log_q = gmm.log_prob(x_data.double())
with torch.no_grad():
    vlb_2d = variational_bound(
        model, x_data, sched, variance="large", decoder="gaussian", generator=gen,
        stride=pick(20, 2),
    )["total"].double()  # fmt: skip
ode_2d = pf_ode_nll(model, x_data, sched, steps=pick(16, 48), generator=gen)
ode_2d_exact = pf_ode_nll(model, x_data, sched, steps=pick(16, 48), hutchinson="exact")
H = float(-log_q.mean())
RESULTS["gmm_entropy_bits_per_dim"] = float(bits_per_dim(H, 2))
for name, nll in (("vlb", vlb_2d), ("ode", ode_2d), ("ode_exact_trace", ode_2d_exact)):
    kl, se, z = z_score(nll + log_q)
    RESULTS[f"trained_{name}_bits_per_dim"] = float(bits_per_dim(nll.mean(), 2))
    RESULTS[f"trained_{name}_minus_entropy_z"] = z
    print(
        f"trained model, {name:16s}: {RESULTS[f'trained_{name}_bits_per_dim']:+.3f} bits/dim, "
        f"minus the entropy: {bits_per_dim(kl, 2):+.3f} +- {bits_per_dim(se, 2):.3f}"
    )
    assert z > -4, name  # KL(q || p) >= 0
_, _, z = z_score(ode_2d - ode_2d_exact)
RESULTS["trained_hutchinson_vs_exact_trace_z"] = z
print(f"data entropy {RESULTS['gmm_entropy_bits_per_dim']:+.3f} bits/dim; Hutchinson vs exact "
      f"trace on the same model: z = {z:+.1f}")  # fmt: skip
assert abs(z) < 4

fig, axes = new_figure(1, 3, (13, 4))
g1 = torch.linspace(-2.6, 2.6, 120)
grid = torch.cartesian_prod(g1, g1).flip(1)
dens = gmm.log_prob(grid.double()).exp().reshape(120, 120)
axes[0, 0].imshow(dens.numpy(), origin="lower", extent=(-2.6, 2.6, -2.6, 2.6), cmap="viridis")
axes[0, 0].set_title("data density", fontsize=10)
pts = x_data.numpy()
for ax, values, title in (
    (axes[0, 1], -ode_2d_exact.numpy(), "model log-density (ODE) at data points"),
    (axes[0, 2], (ode_2d_exact + log_q).numpy(), "-log p_model + log q at data points"),
):
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=values, s=4, cmap="viridis")
    fig.colorbar(sc, ax=ax, shrink=0.8)
    ax.set(title=title, xlim=(-2.6, 2.6), ylim=(-2.6, 2.6))
    ax.title.set_fontsize(10)
for ax in axes[0]:
    ax.set_aspect("equal")
save(fig, "10_trained_model.png")

# %% [markdown]
# ## Summary
#
# * The variational bound is an upper bound on the NLL; with DDPM's fixed variances it stays
#   above it even with the exact mean, and with the ideal variances it is tight.
# * Improved DDPM's $L_\text{hybrid}$ learns those variances; a few hundred steps bring the
#   learned ones close to the ideal ones and most of the bound's excess away.
# * The probability-flow ODE gives the exact likelihood of the ODE model, with an exact or a
#   Hutchinson divergence, and matches the closed form on Gaussian data.
# * No model beats the data entropy: a trained model's NLL lies above it.
#
# ## Try this
#
# 1. Convert the true NLL of section 1 from nats per point to bits per dimension by hand, and
#    compare with `bits_per_dim`.
# 2. For data $x_0 \sim \mathcal{N}(0, I)$, which fixed variance makes the bound tight? (See
#    tutorial 4's exercises.) Check with `vlb` against the true NLL. (Answer: $\beta_t$, the
#    reverse kernel of this stationary process, except at $t = 1$, where `large` takes
#    $\tilde\beta_2$ as the reference code does: the decoder then costs exactly
#    $\tfrac{D}{2}(1/r - 1 + \ln r)$ nats more, $r = \tilde\beta_2 / \beta_1$, and the answer
#    checks the measured gap against that.)
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    by_hand = float(nll_true.mean()) / (D * math.log(2))
    RESULTS["answer_bits_per_dim_err"] = abs(by_hand - RESULTS["true_nll_bits_per_dim"])
    print(f"1. {float(nll_true.mean()):.4f} nats / ({D} ln 2) = {by_hand:+.4f} bits/dim")
    assert RESULTS["answer_bits_per_dim_err"] < 1e-12
    zeros, eye = torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64)
    x_std = torch.randn(pick(500, 2000), D, dtype=F64, generator=gen)
    nll_std = -gaussian_log_likelihood(x_std, 0.0, torch.zeros(D, dtype=F64)).sum(1)
    tight = variational_bound(
        GaussianDenoiser(zeros, eye, sched), x_std, sched, variance="large", decoder="gaussian",
        stride=stride, generator=torch.Generator().manual_seed(7),
    )["total"]  # fmt: skip
    # tight for t >= 2; at t = 1 the decoder's variance is beta-tilde_2, not beta_1
    a_bar = sched.alpha_bar.to(F64)  # alpha_bar[0] = 1
    beta_1 = 1 - a_bar[1]
    r = float((1 - a_bar[2] / a_bar[1]) * (1 - a_bar[1]) / (1 - a_bar[2]) / beta_1)
    expected = 0.5 * D * (1 / r - 1 + math.log(r))
    gap, se, z = z_score(tight - nll_std - expected)
    RESULTS["answer_large_variance_tight_z"] = z
    print(f"2. 'large' (beta_t) on N(0, I) data: bound - NLL = {gap + expected:+.4f} +- "
          f"{se:.4f} nats; the decoder's beta-tilde_2 / beta_1 = {r:.3f} predicts "
          f"{expected:+.4f}")  # fmt: skip
    assert abs(z) < 4

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
