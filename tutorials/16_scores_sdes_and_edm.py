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
# # 16. Scores, SDEs and EDM
#
# Tutorials 3 to 8 built diffusion from a discrete Markov chain. The same models have a second
# description [Song 2021 (score SDE)]: the forward process is a **stochastic differential
# equation** (SDE) that turns data into noise in continuous time, the model estimates the
# **score** $\nabla_x \log q_t(x)$ of the noised data, and sampling integrates a reverse-time
# SDE or a deterministic **probability-flow ODE** with the same marginals. *Elucidating the
# Design Space of Diffusion-Based Generative Models* [Karras 2022, EDM] then writes every such
# model in one form, a denoiser $D(y; \sigma)$ of a noise level $\sigma$, and separates the
# design choices: the noise levels, the network's **preconditioning** and the **loss
# weighting**.
#
# Everything here is checked against the exact score of a Gaussian mixture (difflab's 2-D
# `gmm` law, five anisotropic components with unequal weights), which is known in closed form
# at every noise level, so no network stands between the math and the numbers:
#
# 1. the score and Tweedie's formula: $\nabla \log q_t(x_t) = -\hat\epsilon / \sigma_t$;
# 2. the forward SDE, simulated, has the marginals of `q_sample`;
# 3. the reverse SDE, integrated with the exact score, turns noise into the data law;
# 4. the probability-flow ODE does the same deterministically (against the closed-form
#    solution for Gaussian data);
# 5. EDM's $\sigma$, preconditioning and loss weight, and $\epsilon$-, $x_0$- and
#    $v$-prediction as three choices of the same two coefficients.

# %%
import math

import torch
from _common import answers_wanted, new_figure, out_path, pick, save, use_threads

from difflab.data.toy import default_gmm
from difflab.metrics import exact_nll
from difflab.objectives import loss_weight
from difflab.oracles import GaussianDenoiser, GMMDenoiser, gaussian_pf_ode_solution
from difflab.parameterization import edm_preconditioning
from difflab.process import q_sample
from difflab.schedules import DiscreteSchedule

F64 = torch.float64
THREADS = use_threads(1)  # 2-D points: one thread is fastest
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)

gmm = default_gmm()
sched = DiscreteSchedule.from_name("linear", 1000)
T = sched.T
exact = GMMDenoiser(gmm, sched)
print(f"data: {gmm.num_components}-component Gaussian mixture in {gmm.dim} dimensions; "
      f"schedule: DDPM linear, T = {T}")  # fmt: skip

# %% [markdown]
# ## 1. The score, and Tweedie's formula
#
# The **score** of a density $q$ is $\nabla_x \log q(x)$: a vector field pointing uphill in
# log-density, and free of the normalising constant. For $x_t = \alpha_t x_0 + \sigma_t
# \epsilon$ the noised law $q_t$ is the data law blurred by $\mathcal{N}(0, \sigma_t^2 I)$
# and shrunk by $\alpha_t$, and **Tweedie's formula** [Efron 2011] ties its score to the
# optimal denoiser:
#
# $$\nabla_x \log q_t(x) = \frac{\alpha_t\,\mathbb{E}[x_0 \mid x_t = x] - x}{\sigma_t^2}
#   = -\frac{\mathbb{E}[\epsilon \mid x_t = x]}{\sigma_t} .$$
#
# So an $\epsilon$-prediction network *is* a score model: $s_\theta(x, t) =
# -\hat\epsilon_\theta(x, t)/\sigma_t$, and the $\epsilon$ loss is denoising score matching
# [Vincent 2011] with weight $\sigma_t^2$. For a Gaussian mixture, $q_t$ is again a mixture
# (components $\mathcal{N}(\alpha_t \mu_k, \alpha_t^2 \Sigma_k + \sigma_t^2 I)$,
# `GaussianMixture.noised`), so its log-density is known in closed form and its gradient can be
# taken by autograd. The check, at five noise levels: the score from the exact denoiser
# (`GMMDenoiser`, through $\hat\epsilon$) equals the autograd gradient of $\log q_t$ to
# rounding.

# %%
x_probe = 2.5 * torch.randn(500, 2, dtype=F64, generator=gen)
score_err = 0.0
for t in (1.0, 50.0, 200.0, 500.0, 1000.0):
    a, s = (float(v) for v in sched.alpha_sigma(t))
    x = x_probe.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.noised(a, s).log_prob(x).sum(), x)
    pred = exact(x_probe, torch.full((500,), t, dtype=F64))
    score_tweedie = -pred.eps / s
    score_x0 = (a * pred.x0 - x_probe) / s**2
    score_err = max(score_err, float((score_tweedie - grad).abs().max() / grad.abs().max()))
    score_err = max(score_err, float((score_x0 - grad).abs().max() / grad.abs().max()))
RESULTS["score_tweedie_vs_autograd_max_rel"] = score_err
print(f"score by Tweedie's formula against autograd of log q_t: max relative error "
      f"{score_err:.1e}")  # fmt: skip
assert score_err < 1e-9

fig, axes = new_figure(1, 3, (11, 3.6))
g1 = torch.linspace(-3, 3, 17, dtype=F64)
grid_pts = torch.stack(torch.meshgrid(g1, g1, indexing="xy"), -1).reshape(-1, 2)
for ax, t in zip(axes[0], (20.0, 150.0, 600.0)):
    a, s = (float(v) for v in sched.alpha_sigma(t))
    field = -exact(grid_pts, torch.full((len(grid_pts),), t, dtype=F64)).eps / s
    field = field / field.norm(dim=1, keepdim=True).clamp(min=1e-12)
    pts = gmm.noised(a, s).sample(400, generator=torch.Generator().manual_seed(1), dtype=F64)
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
    ax.quiver(grid_pts[:, 0], grid_pts[:, 1], field[:, 0], field[:, 1], scale=30, width=0.004)
    ax.set_title(f"t = {t:.0f}: samples of q_t and score directions", fontsize=9)
    ax.set_aspect("equal")
save(fig, "16_score_field.png")

# %% [markdown]
# ## 2. The forward SDE
#
# DDPM's chain $x_t = \sqrt{1 - \beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon$ is, as the steps
# shrink, the **variance-preserving SDE** [Song 2021 (score SDE), Eq. 11]
#
# $$dx = -\tfrac12 \beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw ,$$
#
# with $w$ a Brownian motion and $\beta(t) = -\frac{d}{dt}\log\bar\alpha(t)$. Its solution
# from $x_0$ is Gaussian with mean $\alpha_t x_0$ and variance $\sigma_t^2 = 1 - \alpha_t^2$:
# the marginals of `q_sample`. difflab's discrete schedule extends $\log\bar\alpha$ linearly
# between integer steps, so $\beta(t) = -\log(1 - \beta_i)$ on step $i$. The check: simulate the
# SDE with the Euler-Maruyama method (4 substeps per unit of time) from one point $x_0$ up to
# $t = 300$, many paths, and compare the mean and variance of $x_{300}$ with $\alpha_{300} x_0$
# and $\sigma_{300}^2$ (within 4 standard errors per coordinate).

# %%
n_paths, t_end, sub = pick(4000, 20_000), 300, 4
x0_point = torch.tensor([1.0, -0.5], dtype=F64)
beta_c = -torch.log1p(-sched.betas)  # beta(t) on each unit step
x = x0_point.expand(n_paths, 2).clone()
paths = [x[:40].clone()]
dt = 1.0 / sub
for i in range(t_end):
    b = float(beta_c[i])
    for _ in range(sub):
        dw = math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=F64)
        x = x - 0.5 * b * x * dt + math.sqrt(b) * dw
    paths.append(x[:40].clone())
a_end, s_end = (float(v) for v in sched.alpha_sigma(float(t_end)))
mean_z = (x.mean(0) - a_end * x0_point) / (s_end / math.sqrt(n_paths))
var_z = (x.var(0) - s_end**2) / (s_end**2 * math.sqrt(2 / (n_paths - 1)))
closed = q_sample(x0_point.expand(n_paths, 2), float(t_end), sched, generator=gen)
RESULTS["sde_forward_mean_max_abs_z"] = float(mean_z.abs().max())
RESULTS["sde_forward_var_max_abs_z"] = float(var_z.abs().max())
worst_forward = max(RESULTS["sde_forward_mean_max_abs_z"], RESULTS["sde_forward_var_max_abs_z"])
print(f"Euler-Maruyama at t = {t_end}: mean {[round(v, 4) for v in x.mean(0).tolist()]} "
      f"(alpha x0 = {[round(v, 4) for v in (a_end * x0_point).tolist()]}), variance "
      f"{[round(v, 4) for v in x.var(0).tolist()]} (sigma^2 = {s_end**2:.4f}); within "
      f"{worst_forward:.1f} standard errors")  # fmt: skip
assert RESULTS["sde_forward_mean_max_abs_z"] < 4 and RESULTS["sde_forward_var_max_abs_z"] < 4

fig, axes = new_figure(1, 2, (10, 3.4))
path = torch.stack(paths)  # (t_end + 1, 40, 2)
axes[0, 0].plot(torch.arange(t_end + 1), path[:, :, 0], lw=0.6, alpha=0.6)
axes[0, 0].plot(torch.arange(t_end + 1), [float(sched.alpha(float(t))) for t in range(t_end + 1)],
                "k--", label="alpha_t x0[0]")  # fmt: skip
axes[0, 0].set(xlabel="t", ylabel="first coordinate", title="forward SDE paths from x0")
axes[0, 0].legend(fontsize=8)
axes[0, 1].scatter(x[:1000, 0], x[:1000, 1], s=2, alpha=0.5, label="SDE, Euler-Maruyama")
axes[0, 1].scatter(closed[:1000, 0], closed[:1000, 1], s=2, alpha=0.5, label="q_sample")
axes[0, 1].set_title(f"x_t at t = {t_end}", fontsize=9)
axes[0, 1].legend(fontsize=8)
save(fig, "16_forward_sde.png")

# %% [markdown]
# ## 3. The reverse SDE
#
# Anderson's theorem [Anderson 1982; Song 2021, Eq. 6]: the forward SDE run backwards in time
# is again an SDE, whose drift needs only the score,
#
# $$dx = \big[-\tfrac12 \beta(t)\,x - \beta(t)\,\nabla_x \log q_t(x)\big]\,dt
#   + \sqrt{\beta(t)}\,d\bar w \qquad (t \text{ from } T \text{ down to } 0).$$
#
# Started from $x_T \sim \mathcal{N}(0, I)$ (close to $q_T$: $\alpha_T = 0.006$), it ends
# with the data law. Integrated with Euler-Maruyama on a uniform grid, with the exact mixture
# score, the end points are compared with the mixture by the **negative log-likelihood** under
# the true density (`metrics.exact_nll`): for samples of the data law its expectation is the
# entropy of the data, estimated from true samples; the SDE's samples must score the same
# within 4 standard errors of the difference. (Euler-Maruyama has a bias of order $1/N$ in
# the step count; at the fast mode's 1000 steps it shows as a small excess of a few
# hundredths of a nat at most, inside that margin.) Ancestral DDPM sampling (tutorial 6) is
# one discretisation of this SDE.

# %%
n_gen = pick(4000, 20_000)
n_rev = pick(1000, 2000)  # Euler-Maruyama steps from T to 0, at most one unit of t each


def reverse_integrate(den, x: torch.Tensor, stochastic: bool, steps: int = n_rev) -> torch.Tensor:
    """Euler(-Maruyama) from t = T to 0 on a uniform grid; the PF-ODE when not stochastic.

    beta(t) is constant on each unit step of the discrete schedule, so a step must not cross
    an integer time (steps >= T, T divisible by steps or steps by T); beta is read at the
    step's midpoint, the score at its start.
    """
    assert steps >= T and (steps % T == 0)
    ts = torch.linspace(T, 0, steps + 1, dtype=F64)
    for t_hi, t_lo in zip(ts[:-1], ts[1:]):
        h = float(t_hi - t_lo)
        b = float(beta_c[int(math.ceil(0.5 * float(t_hi + t_lo))) - 1])
        s = float(sched.sigma(t_hi))
        score = -den(x, t_hi.expand(x.shape[0])).eps / s
        if stochastic:
            drift = -0.5 * b * x - b * score
            x = x - drift * h + math.sqrt(b * h) * torch.randn(x.shape, generator=gen, dtype=F64)
        else:
            x = x - (-0.5 * b * x - 0.5 * b * score) * h
    return x


x_T = torch.randn(n_gen, 2, dtype=F64, generator=gen)
sde_samples = reverse_integrate(exact, x_T, stochastic=True)
data_samples = gmm.sample(n_gen, generator=gen, dtype=F64)


def nll_and_se(points: torch.Tensor) -> tuple[float, float]:
    nll = -gmm.log_prob(points)
    return float(nll.mean()), float(nll.std() / math.sqrt(len(points)))


nll_data, se_data = nll_and_se(data_samples)
nll_sde, se_sde = nll_and_se(sde_samples)
RESULTS["nll_data"], RESULTS["nll_reverse_sde"] = nll_data, nll_sde
RESULTS["reverse_sde_nll_z"] = (nll_sde - nll_data) / math.hypot(se_data, se_sde)
assert abs(exact_nll(sde_samples, gmm) - nll_sde) < 1e-9
print(f"NLL under the true mixture (nats): data samples {nll_data:.4f} +- {se_data:.4f}, "
      f"reverse SDE ({n_rev} steps) {nll_sde:.4f} +- {se_sde:.4f}; z = "
      f"{RESULTS['reverse_sde_nll_z']:+.2f}")  # fmt: skip
assert abs(RESULTS["reverse_sde_nll_z"]) < 4

# %% [markdown]
# ## 4. The probability-flow ODE
#
# Removing the noise and halving the score term gives an ODE whose solutions have the *same
# marginals* $q_t$ as the SDE [Song 2021, Eq. 13]:
#
# $$\frac{dx}{dt} = -\tfrac12 \beta(t)\,x - \tfrac12 \beta(t)\,\nabla_x \log q_t(x) .$$
#
# It maps each noise sample to one data point, deterministically: this is what DDIM with
# $\eta = 0$ and the higher-order solvers of tutorial 8 integrate, and what makes exact
# likelihoods (tutorial 10) and inversion (tutorial 17) possible. Two checks:
#
# * for Gaussian data the ODE is linear and has a closed-form solution
#   (`oracles.gaussian_pf_ode_solution`); Euler's method is of first order, so halving the
#   step must about halve the error against it (ratio between 1.5 and 3). One detail: in
#   difflab's discrete schedule $\beta(t)$ is constant on each unit step and jumps at every
#   integer $t$, so the steps here never cross an integer time (a step across two unit steps
#   would use the wrong rate for half of it, an error that does not shrink with the step);
# * on the mixture, the ODE's end points must have the data's NLL, as the SDE's did.

# %%
g_mean = torch.tensor([0.5, -0.3], dtype=F64)
g_cov = torch.tensor([[0.6, 0.25], [0.25, 0.2]], dtype=F64)
exact_gauss = GaussianDenoiser(g_mean, g_cov, sched)
xT_gauss = torch.randn(200, 2, dtype=F64, generator=gen)
a_T, s_T = (float(v) for v in sched.alpha_sigma(float(T)))
closed_end = gaussian_pf_ode_solution(xT_gauss / a_T, s_T / a_T, 0.0, g_mean, g_cov)
ode_end = reverse_integrate(exact_gauss, xT_gauss, stochastic=False, steps=T)
RESULTS["pf_ode_gauss_vs_closed_form_max_abs"] = float((ode_end - closed_end).abs().max())
ode_end_fine = reverse_integrate(exact_gauss, xT_gauss, stochastic=False, steps=2 * T)
RESULTS["pf_ode_gauss_error_ratio"] = RESULTS["pf_ode_gauss_vs_closed_form_max_abs"] / float(
    (ode_end_fine - closed_end).abs().max()
)
print(f"probability-flow ODE, Gaussian data: Euler with {T} steps vs the closed form, "
      f"max |difference| {RESULTS['pf_ode_gauss_vs_closed_form_max_abs']:.1e}; with twice the "
      f"steps {RESULTS['pf_ode_gauss_error_ratio']:.2f} times smaller")  # fmt: skip
assert 1.5 < RESULTS["pf_ode_gauss_error_ratio"] < 3

ode_samples = reverse_integrate(exact, x_T, stochastic=False)
nll_ode, se_ode = nll_and_se(ode_samples)
RESULTS["nll_pf_ode"] = nll_ode
RESULTS["pf_ode_nll_z"] = (nll_ode - nll_data) / math.hypot(se_data, se_ode)
print(f"NLL of the probability-flow ODE's samples: {nll_ode:.4f} +- {se_ode:.4f}; z = "
      f"{RESULTS['pf_ode_nll_z']:+.2f}")  # fmt: skip
assert abs(RESULTS["pf_ode_nll_z"]) < 4

fig, axes = new_figure(1, 3, (11, 3.6))
for ax, (pts, title) in zip(
    axes[0],
    ((data_samples, "data (the mixture)"), (sde_samples, "reverse SDE"), (ode_samples, "PF ODE")),
):
    ax.scatter(pts[:2000, 0], pts[:2000, 1], s=1.5, alpha=0.5)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), title=title)
    ax.set_aspect("equal")
save(fig, "16_reverse_sde_and_ode.png")

# %% [markdown]
# ## 5. EDM: one denoiser, its preconditioning and its loss weight
#
# EDM [Karras 2022, Sec. 2] divides out the scale: with $y = x/\alpha$ and the noise level
# $\sigma = \sigma_t/\alpha_t$ (`schedule.edm_sigma(t)`) every model above becomes
# $y = x_0 + \sigma n$, $n \sim \mathcal{N}(0, I)$, and the probability-flow ODE becomes
# $dy/d\sigma = (y - D(y; \sigma))/\sigma$ with the denoiser $D(y; \sigma) =
# \mathbb{E}[x_0 \mid y]$. The schedule only decides which $\sigma$ are visited. The network
# $F_\theta$ is wrapped as [Karras 2022, Eq. 7]
#
# $$D(y; \sigma) = c_\text{skip}(\sigma)\,y + c_\text{out}(\sigma)\,F_\theta\big(c_\text{in}
#   (\sigma)\,y;\ c_\text{noise}(\sigma)\big),$$
#
# with $c_\text{in} = 1/\sqrt{\sigma^2 + \sigma_d^2}$, $c_\text{skip} = \sigma_d^2/(\sigma^2 +
# \sigma_d^2)$, $c_\text{out} = \sigma\sigma_d/\sqrt{\sigma^2 + \sigma_d^2}$ (Table 1;
# `parameterization.edm_preconditioning`), chosen so that for data of standard deviation
# $\sigma_d$ both the network's **input** $c_\text{in} y$ and its **training target**
# $F^* = (x_0 - c_\text{skip} y)/c_\text{out}$ have unit variance at *every* $\sigma$. The loss
# weight $\lambda(\sigma) = 1/c_\text{out}^2$ (Eq. 8; difflab's `weighting="edm"`) makes the
# loss in $D$ exactly the unit-weight MSE in $F$.
#
# Checks, on the mixture rescaled to $\sigma_d = 0.5$ per coordinate, at $\sigma$ from 0.01
# to 80: the variances of $c_\text{in} y$ and of $F^*$ are 1 (within 4 standard errors);
# $\lambda(\sigma)\,c_\text{out}^2 = 1$ (to rounding, with difflab's `loss_weight`). And the
# unification: $\epsilon$-, $x_0$- and $v$-prediction are the same form with other
# coefficients, $\epsilon$: $c_\text{skip} = 1$, $c_\text{out} = -\sigma$; $x_0$: $c_\text{skip}
# = 0$, $c_\text{out} = 1$; $v$: EDM's own coefficients with $\sigma_d = 1$ and $F = -v$
# (checked: the same $\hat x_0$ as $\alpha_t x_t - \sigma_t v$).

# %%
sigma_data = 0.5
data_pts = gmm.sample(pick(20_000, 100_000), generator=gen, dtype=F64)
data_pts = (data_pts - data_pts.mean(0)) / data_pts.std(0) * sigma_data  # per coordinate
n_pts = len(data_pts)
worst_z = 0.0
for sig in (0.01, 0.1, 0.5, 2.0, 10.0, 80.0):
    s_t = torch.tensor(sig, dtype=F64)
    c_skip, c_out, c_in, _ = edm_preconditioning(s_t, sigma_data)
    y = data_pts + sig * torch.randn(data_pts.shape, generator=gen, dtype=F64)
    for v in ((c_in * y).var(0), ((data_pts - c_skip * y) / c_out).var(0)):
        worst_z = max(worst_z, float(((v - 1) / math.sqrt(2 / (n_pts - 1))).abs().max()))
RESULTS["edm_unit_variance_max_abs_z"] = worst_z
print(f"Var(c_in y) and Var(F*) at sigma = 0.01 .. 80: 1 within {worst_z:.1f} standard errors")
assert worst_z < 4

sig_grid = torch.logspace(-2, math.log10(80), 50, dtype=F64)
_, c_out_grid, _, _ = edm_preconditioning(sig_grid, sigma_data)
lam = loss_weight(-2 * torch.log(sig_grid), weighting="edm", target="x0", sigma_data=sigma_data)
RESULTS["edm_lambda_c_out_sq_max_err"] = float((lam * c_out_grid**2 - 1).abs().max())
print(f"lambda(sigma) c_out(sigma)^2 - 1: max {RESULTS['edm_lambda_c_out_sq_max_err']:.1e}")
assert RESULTS["edm_lambda_c_out_sq_max_err"] < 1e-12

# v-prediction is EDM's form with sigma_d = 1 and F = -v
t_v = torch.tensor([10.0, 300.0, 900.0], dtype=F64)
alpha_v, sigma_v = (c[:, None] for c in sched.alpha_sigma(t_v))
xt_v = torch.randn(3, 2, dtype=F64, generator=gen)
v_hat = torch.randn(3, 2, dtype=F64, generator=gen)  # any network output
x0_from_v = alpha_v * xt_v - sigma_v * v_hat  # tutorial 7
c_skip1, c_out1, _, _ = edm_preconditioning(sched.edm_sigma(t_v)[:, None], 1.0)
x0_edm = c_skip1 * (xt_v / alpha_v) + c_out1 * (-v_hat)
RESULTS["v_as_edm_max_abs"] = float((x0_from_v - x0_edm).abs().max())
print(f"v-prediction's x0_hat vs EDM's D with sigma_d = 1, F = -v: max |difference| "
      f"{RESULTS['v_as_edm_max_abs']:.1e}")  # fmt: skip
assert RESULTS["v_as_edm_max_abs"] < 1e-12

fig, axes = new_figure(1, 1, (5.5, 3.4))
ax = axes[0, 0]
c_skip_g, c_out_g, c_in_g, _ = edm_preconditioning(sig_grid, sigma_data)
for values, name in ((c_skip_g, "c_skip"), (c_out_g, "c_out"), (c_in_g, "c_in")):
    ax.plot(sig_grid, values, label=name)
ax.set(xscale="log", xlabel="EDM noise level sigma", title="EDM preconditioning, sigma_d = 0.5")
ax.legend(fontsize=8)
save(fig, "16_edm_preconditioning.png")

# %% [markdown]
# ## Summary
#
# * The score $\nabla \log q_t$ of the noised data is the denoiser in disguise (Tweedie):
#   $-\hat\epsilon/\sigma_t$, or $(\alpha_t \hat x_0 - x_t)/\sigma_t^2$; checked against autograd
#   of the exact mixture density.
# * DDPM's forward chain is the variance-preserving SDE $dx = -\frac12\beta x\,dt +
#   \sqrt\beta\,dw$ (simulated: the marginals of `q_sample`); its time reversal needs only the
#   score, and integrated with the exact score it turns noise into the data law (NLL checked).
# * The probability-flow ODE has the same marginals without noise: the deterministic samplers
#   of tutorial 8 integrate it, and for Gaussian data it has a closed-form solution.
# * EDM writes every model as a denoiser $D(y; \sigma)$ with $y = x/\alpha$ and $\sigma =
#   \sigma_t/\alpha_t$; its preconditioning keeps the network's input and target at unit
#   variance at every $\sigma$, and $\lambda = 1/c_\text{out}^2$ weights the loss evenly in
#   $F$. $\epsilon$-, $x_0$- and $v$-prediction are the same form with other coefficients.
#
# ## Try this
#
# 1. Near $t = T$ the noised law is almost $\mathcal{N}(0, I)$. How close is its score to
#    $-x$ there (largest difference on the probe points of section 1)?
# 2. Write $\epsilon$-prediction in EDM's form: with $c_\text{skip} = 1$ and $c_\text{out} =
#    -\sigma$, is $D(y; \sigma) = y - \sigma\hat\epsilon$ the same $\hat x_0$ as
#    $(x_t - \sigma_t\hat\epsilon)/\alpha_t$?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    tT = torch.full((len(x_probe),), float(T), dtype=F64)
    score_T = -exact(x_probe, tT).eps / float(sched.sigma(float(T)))
    RESULTS["answer_score_T_vs_minus_x_max_abs"] = float((score_T + x_probe).abs().max())
    print(f"1. at t = T: max |score + x| = {RESULTS['answer_score_T_vs_minus_x_max_abs']:.1e} "
          f"on points up to |x| = {float(x_probe.abs().max()):.1f}")  # fmt: skip
    assert RESULTS["answer_score_T_vs_minus_x_max_abs"] < 0.05
    eps_hat = torch.randn(3, 2, dtype=F64, generator=gen)
    x0_eps = (xt_v - sigma_v * eps_hat) / alpha_v
    s_edm = sched.edm_sigma(t_v)[:, None]
    x0_edm_eps = 1.0 * (xt_v / alpha_v) + (-s_edm) * eps_hat
    RESULTS["answer_eps_as_edm_max_abs"] = float((x0_eps - x0_edm_eps).abs().max())
    print(f"2. eps-prediction as EDM's form: max |difference| "
          f"{RESULTS['answer_eps_as_edm_max_abs']:.1e}")  # fmt: skip
    assert RESULTS["answer_eps_as_edm_max_abs"] < 1e-12

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
