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
# # 8. DDIM and fast samplers
#
# **Notation.** From here on the series uses the signal and noise scales of Kingma et al.
# (VDM): $x_t = \alpha_t x_0 + \sigma_t \epsilon$, so for DDPM's schedule
# $\alpha_t = \sqrt{\bar\alpha_t}$ and $\sigma_t = \sqrt{1 - \bar\alpha_t}$. This $\alpha_t$ is
# **not** DDPM's $\alpha_t = 1 - \beta_t$ of tutorials 3-6. The DPM-Solvers use
# $\lambda_t = \log(\alpha_t / \sigma_t)$, **half** the log-SNR $\log(\alpha_t^2 / \sigma_t^2)$
# of tutorials 3 and 7 (difflab's `logsnr`). [docs/NOTATION.md](../docs/NOTATION.md) lists every
# symbol with its code name. The first cell checks these relations on difflab's schedule.
#
# DDPM samples with $T = 1000$ network evaluations. *Denoising Diffusion Implicit Models*
# [Song 2021 (DDIM)] noticed that training only fixes the marginals $q(x_t \mid x_0)$, and
# that a whole family of (non-Markovian) processes shares them. Their reverse steps, from $t$
# to an earlier $s$ on any grid, are [Song 2021, Eq. 12]
#
# $$x_s = \alpha_s \hat x_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\epsilon + c\,z, \qquad
#   c = \eta\,\sqrt{\tilde\beta_{t \to s}}, \quad z \sim \mathcal{N}(0, I),$$
#
# where $\tilde\beta_{t \to s}$ is the variance of $q(x_s \mid x_t, x_0)$. $\eta = 1$ is DDPM's
# ancestral sampler; $\eta = 0$ is deterministic, and it is the Euler method for the
# *probability-flow ODE* in the scaled variables $y = x/\alpha$, $s = \sigma/\alpha$
# [Karras 2022, Eq. 3-4]:
#
# $$\frac{dy}{ds} = \frac{y - D(y; s)}{s}, \qquad D(y; s) = \mathbb{E}[x_0 \mid x_t].$$
#
# Once sampling is solving an ODE, better ODE solvers apply: Heun's second-order method
# [Karras 2022, Algorithm 1] and the exponential integrators DPM-Solver++ (2M, 3M, 2S)
# [Lu 2022b], which integrate the linear part exactly in $\lambda = \log(\alpha/\sigma)$.
# The same exponential integrator also solves the reverse *SDE* (`dpm++2m-sde`,
# SDE-DPM-Solver++(2M) [Lu 2022b]): it injects fresh noise at each step, which on a trained
# network corrects part of the denoiser's error where the ODE carries it along (on MNIST it is
# the best sampler at 10 NFE, see BENCHMARKS.md).
#
# Every difflab sampler has the same signature, so they can be compared on one model. We use a
# model with **no training error**: for the 8-Gaussians data the optimal denoiser
# $\mathbb{E}[x_0 \mid x_t]$ is known in closed form (`oracles.GMMDenoiser`), so every
# difference below comes from the sampler. Then, on Gaussian data, where the ODE itself has a
# closed-form solution, we measure each solver's **order of convergence**.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab import viz
from difflab.data.toy import eight_gaussians_gmm
from difflab.metrics import sliced_wasserstein
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss
from difflab.oracles import GaussianDenoiser, GMMDenoiser, gaussian_pf_ode_solution
from difflab.parameterization import ModelDenoiser
from difflab.process import q_posterior
from difflab.samplers import SAMPLERS, ddim, default_spacing, dpm_solver_pp, nfe, sample
from difflab.schedules import DiscreteSchedule, sampling_timesteps

THREADS = use_threads(1)  # tiny matrix products: one thread is fastest; restored at the end
F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
sched = DiscreteSchedule.from_name("linear", T)
gmm = eight_gaussians_gmm()
exact = GMMDenoiser(gmm, sched)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# %%
t_all = torch.arange(0, T + 1, dtype=F64)
alpha_t, sigma_t = sched.alpha_sigma(t_all)  # VDM's alpha and sigma
lam_t = torch.log(alpha_t[1:] / sigma_t[1:])  # lambda = log(alpha / sigma), t = 1..T
RESULTS["notation_max_abs"] = max(
    float((alpha_t - sched.alpha_bar.sqrt()).abs().max()),
    float((sigma_t - (1 - sched.alpha_bar).sqrt()).abs().max()),
    float((2 * lam_t - sched.logsnr(t_all[1:])).abs().max()),  # lambda is half the log-SNR
)
assert RESULTS["notation_max_abs"] < 1e-9
assert float((alpha_t[1:] - (1 - sched.betas)).abs().max()) > 0.1  # not DDPM's alpha_t

# %% [markdown]
# ## 1. DDIM by hand
#
# **The non-Markovian forward process.** DDPM's loss only ever sees the marginals
# $q(x_t \mid x_0) = \mathcal{N}(\alpha_t x_0, \sigma_t^2 I)$. Song et al. replace the chain by
# a family of processes indexed by a noise level $c$ per step [Song 2021, Eq. 7], written here
# from $t$ to any earlier $s$:
#
# $$q_c(x_s \mid x_t, x_0) = \mathcal{N}\Big(\alpha_s x_0 + \sqrt{\sigma_s^2 - c^2}\;
#   \frac{x_t - \alpha_t x_0}{\sigma_t},\ c^2 I\Big).$$
#
# Why it keeps the marginals, in three lines: if $x_t = \alpha_t x_0 + \sigma_t \epsilon$ with
# $\epsilon \sim \mathcal{N}(0, I)$, then
# 1. $(x_t - \alpha_t x_0)/\sigma_t = \epsilon$, so a draw of $q_c$ is
#    $x_s = \alpha_s x_0 + \sqrt{\sigma_s^2 - c^2}\,\epsilon + c\,z$ with $z$ independent of
#    $\epsilon$;
# 2. a sum of independent Gaussians has mean $\alpha_s x_0$ and variance
#    $(\sigma_s^2 - c^2) + c^2 = \sigma_s^2$ (tutorial 1);
# 3. so $q_c(x_s \mid x_0) = \mathcal{N}(\alpha_s x_0, \sigma_s^2 I)$ for **every** $c$: the
#    same marginals, the same training loss, the same trained network.
#
# The process is non-Markovian (each step looks at $x_0$), and each choice of $c$ gives a
# sampler: replace $x_0$ by $\hat x_0$ and $(x_t - \alpha_t x_0)/\sigma_t$ by $\hat\epsilon$
# [Song 2021, Eq. 12]. With $c^2 = \tilde\beta_{t \to s}$, the variance of DDPM's posterior
# $q(x_s \mid x_t, x_0)$, $q_c$ **is** that posterior (the mean agrees too, checked below), so
# $c = \eta\sqrt{\tilde\beta_{t \to s}}$ [Song 2021, Eq. 16] interpolates between DDPM
# ($\eta = 1$) and the deterministic DDIM ($\eta = 0$). In the $\alpha, \sigma$ notation
# $\tilde\beta_{t \to s} = \sigma_s^2 \sigma_t^{-2} (1 - \alpha_t^2 / \alpha_s^2)$.
#
# The checks: the two moments of $x_s$ by Monte Carlo for $\eta = 0.5$, and the $\eta = 1$ mean
# against difflab's `q_posterior` (an exact identity).

# %%
x0_fixed = torch.tensor([1.5, -0.5], dtype=F64)
t_hi, t_lo, n_mc = 700, 400, pick(20_000, 200_000)
(a_t, a_s), (s_t, s_s) = (
    v.tolist() for v in sched.alpha_sigma(torch.tensor([t_hi, t_lo], dtype=F64))
)
beta_tilde_ts = s_s**2 / s_t**2 * (1 - a_t**2 / a_s**2)
xt_mc = a_t * x0_fixed + s_t * torch.randn(n_mc, 2, dtype=F64, generator=gen)
c = 0.5 * math.sqrt(beta_tilde_ts)
xs_mc = (
    a_s * x0_fixed
    + math.sqrt(s_s**2 - c**2) * (xt_mc - a_t * x0_fixed) / s_t
    + c * torch.randn(n_mc, 2, dtype=F64, generator=gen)
)
se_mean = s_s / math.sqrt(n_mc)
se_var = s_s**2 * math.sqrt(2 / (n_mc - 1))  # the sample variance of a Gaussian
RESULTS["q_c_marginal_mean_max_abs_z"] = float(
    ((xs_mc.mean(0) - a_s * x0_fixed) / se_mean).abs().max()
)
RESULTS["q_c_marginal_var_max_abs_z"] = float(((xs_mc.var(0) - s_s**2) / se_var).abs().max())
print(f"q_c(x_s | x0), eta = 0.5: mean and variance within "
      f"{RESULTS['q_c_marginal_mean_max_abs_z']:.1f} and "
      f"{RESULTS['q_c_marginal_var_max_abs_z']:.1f} SE of alpha_s x0 and sigma_s^2")  # fmt: skip
assert RESULTS["q_c_marginal_mean_max_abs_z"] < 4 and RESULTS["q_c_marginal_var_max_abs_z"] < 4
# eta = 1: q_c is DDPM's posterior q(x_s | x_t, x0)
xt_probe = xt_mc[:100]
mean_c1 = a_s * x0_fixed + math.sqrt(s_s**2 - beta_tilde_ts) * (xt_probe - a_t * x0_fixed) / s_t
mean_post, var_post = q_posterior(
    x0_fixed.expand(100, 2), xt_probe, float(t_hi), float(t_lo), sched
)
RESULTS["q_c_eta1_vs_posterior_max_abs"] = max(
    float((mean_c1 - mean_post).abs().max()), float((var_post - beta_tilde_ts).abs().max())
)
assert RESULTS["q_c_eta1_vs_posterior_max_abs"] < 1e-12

# %% [markdown]
# **Skipping steps.** The sampler need not visit every $t$: it walks down a *grid*
# $t_0 > t_1 > \dots > t_N = 0$ and takes each step $t_i \to t_{i+1}$ with the formula above,
# whatever the gap. DDIM's default grid in difflab is **trailing** [Lin 2024, Table 2]: $N$
# evenly spaced integers that start at $T$ itself, $t_i = \mathrm{round}(T - iT/N)$, then 0.
# (The older "leading" grid $1 + k\lfloor T/N \rfloor$ never reaches $T$: its first step treats
# pure noise as $x_t$ at a $t < T$ where $x_t$ still carries some signal [Lin 2024].)
#
# **The loop.** About ten lines: $\hat x_0$ and $\hat\epsilon$ from the denoiser, then Eq. 12 with
# $c = \eta\sqrt{\tilde\beta_{t \to s}}$. With the same prior noise and generator it must give
# `sample(sampler="ddim")`'s samples, for $\eta = 0$ and $\eta = 1$, to float64 rounding.


# %%
@torch.no_grad()
def ddim_by_hand(denoiser, x: torch.Tensor, ts: list[int], eta: float, generator) -> torch.Tensor:
    for t, s in zip(ts[:-1], ts[1:]):
        ts_pair = torch.tensor([t, s], dtype=F64)
        (a_t, a_s), (s_t, s_s) = (v.tolist() for v in sched.alpha_sigma(ts_pair))
        pred = denoiser(x, torch.full((x.shape[0],), float(t), dtype=F64))  # x0_hat, eps_hat
        c = eta * s_s / s_t * math.sqrt(1 - a_t**2 / a_s**2)  # eta sqrt(beta_tilde), Eq. (16)
        x = a_s * pred.x0 + math.sqrt(s_s**2 - c**2) * pred.eps  # Eq. (12) [Song 2021]
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


n_hand = 10
trailing = [round(T - i * T / n_hand) for i in range(n_hand)] + [0]
RESULTS["trailing_grid_vs_library_max_abs"] = float(
    (torch.tensor(trailing, dtype=F64) - sampling_timesteps(sched, n_hand, spacing="trailing"))
    .abs()
    .max()
)
assert RESULTS["trailing_grid_vs_library_max_abs"] == 0.0
print("trailing grid, 10 steps:", trailing)
for eta in (0.0, 1.0):
    g_hand, g_lib = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x_prior = torch.randn(256, 2, dtype=F64, generator=g_hand)
    by_hand = ddim_by_hand(exact, x_prior, trailing, eta, g_hand)
    library = sample(
        exact, sched, (256, 2), sampler="ddim", steps=n_hand, eta=eta, generator=g_lib, dtype=F64
    )
    RESULTS[f"ddim_by_hand_eta{eta:.0f}_max_abs"] = float((by_hand - library).abs().max())
    print(f"eta = {eta}: max |DDIM by hand - difflab ddim| = "
          f"{RESULTS[f'ddim_by_hand_eta{eta:.0f}_max_abs']:.1e}")  # fmt: skip
    assert RESULTS[f"ddim_by_hand_eta{eta:.0f}_max_abs"] < 1e-10
# the check can fail: eta = 1 by hand against difflab's eta = 0
wrong = ddim_by_hand(
    exact, torch.randn(256, 2, dtype=F64, generator=seeded(9)), trailing, 1.0, seeded(1)
)
assert float((wrong - library).abs().max()) > 1e-2

# %% [markdown]
# ## 2. Three identities
#
# The same prior noise and the same generator go into each pair of samplers (float64, so that
# only rounding separates them):
#
# * DDIM with $\eta = 1$ **is** DDPM with the posterior variance $\tilde\beta$: the same
#   samples;
# * DDIM with $\eta = 0$ **is** the Euler method of the probability-flow ODE (`euler`);
# * DPM-Solver++ of order 1 **is** DDIM with $\eta = 0$ [Lu 2022b].
#
# A mismatch, e.g. DDPM with the "large" variance $\beta$ against DDIM with $\eta = 1$, gives
# visibly different samples, so the checks can fail.

# %%
shape, n_steps = (256, 2), 20


def run(sampler: str, **options) -> torch.Tensor:
    return sample(
        exact, sched, shape, sampler=sampler, steps=n_steps, spacing="trailing",
        generator=seeded(5), dtype=F64, **options,
    )  # fmt: skip


ts20 = sampling_timesteps(sched, n_steps, spacing="trailing")
x_T = torch.randn(shape, dtype=F64, generator=seeded(5))
pairs = {
    "ddim_eta1_vs_ddpm_small": (run("ddim", eta=1.0), run("ddpm", variance="small")),
    "ddim_eta0_vs_euler": (run("ddim", eta=0.0), run("euler")),
    "dpmpp_order1_vs_ddim": (
        dpm_solver_pp(exact, x_T, ts20, schedule=sched, order=1),
        ddim(exact, x_T, ts20, schedule=sched, eta=0.0),
    ),
    "mismatch_ddim_eta1_vs_ddpm_large": (run("ddim", eta=1.0), run("ddpm", variance="large")),
}
for name, (a, b) in pairs.items():
    RESULTS[f"{name}_max_abs"] = float((a - b).abs().max())
    print(f"{name:34s} max |difference| = {RESULTS[f'{name}_max_abs']:.1e}")
for name in ("ddim_eta1_vs_ddpm_small", "ddim_eta0_vs_euler", "dpmpp_order1_vs_ddim"):
    assert RESULTS[f"{name}_max_abs"] < 1e-10, name
assert RESULTS["mismatch_ddim_eta1_vs_ddpm_large_max_abs"] > 1e-2

# %% [markdown]
# ## 3. Sample quality against the number of network evaluations
#
# Each sampler runs with its default time grid (`default_spacing`: trailing for `ddpm` and
# `ddim`, Karras' $\rho = 7$ grid for the ODE solvers) and a budget of network function
# evaluations (NFE; Heun and DPM-Solver++(2S) call the network twice per step, `nfe` counts).
# Two measures:
#
# * **distribution**: the sliced Wasserstein distance of the samples to fresh data, next to the
#   floor (two data sets of the same size);
# * **ODE error** (deterministic samplers only): the distance of each sample to the exact end
#   point of its probability-flow trajectory, estimated by DPM-Solver++(3M) with many steps
#   from the same $x_T$.
#
# The exact denoiser makes the ODE error a pure discretisation error.

# %%
budgets = pick([5, 10, 20, 50], [5, 10, 20, 50, 100, 200])
n_dist, n_ode = pick(1000, 5000), pick(256, 1000)
data_ref, data_other = gmm.sample(n_dist, seeded(11)), gmm.sample(n_dist, seeded(12))


def sw(x: torch.Tensor) -> float:
    return sliced_wasserstein(x, data_ref, n_projections=64, generator=seeded(1))


def steps_for(sampler: str, budget: int) -> int:
    """The most steps whose NFE stays within the budget."""
    return max(k for k in range(1, budget + 1) if nfe(sampler, k) <= budget)


RESULTS["sw_floor"] = sw(data_other)
deterministic = ("ddim", "euler", "heun", "dpm++2m", "dpm++3m", "dpm++2s", "ipndm")
x_T_ode = torch.randn(n_ode, 2, dtype=F64, generator=seeded(21))
ts_ref = sampling_timesteps(sched, pick(400, 1000), spacing="logsnr")
reference = SAMPLERS["dpm++3m"](exact, x_T_ode, ts_ref, schedule=sched)


drawn: dict[tuple[str, int], torch.Tensor] = {}  # (sampler, budget) -> samples, for figures


def sweep(denoiser, label: str, samplers) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """For each sampler: (NFE, SW to data, median ODE error or nan) at every budget."""
    out = {}
    for name in samplers:
        nfes, sws, odes = [], [], []
        for budget in budgets:
            k = steps_for(name, budget)
            x = sample(denoiser, sched, (n_dist, 2), sampler=name, steps=k, generator=seeded(3))
            if denoiser is exact:
                drawn[name, budget] = x
            nfes.append(nfe(name, k))
            sws.append(sw(x))
            ode = math.nan
            if name in deterministic and denoiser is exact:
                ts = sampling_timesteps(sched, k, spacing=default_spacing(name, sched))
                end = SAMPLERS[name](exact, x_T_ode, ts, schedule=sched)
                ode = float((end - reference).norm(dim=1).median())
            odes.append(ode)
        out[name] = (nfes, sws, odes)
        print(
            f"{label}, {name:16s} SW " + " ".join(f"{v:.3f}" for v in sws)
            + ("   ODE error " + " ".join(f"{v:.1e}" for v in odes) if odes[0] == odes[0] else "")
        )  # fmt: skip
    return out


# the samplers of this tutorial: flow-euler is DDIM's step under its flow-matching name and
# flow-heun is Heun in the schedule's own time (tutorial 14); consistency expects a consistency
# model instead of a denoiser (tutorial 15)
DIFFUSION_SAMPLERS = [n for n in SAMPLERS if n not in ("flow-euler", "flow-heun", "consistency")]
results = sweep(exact, "exact", DIFFUSION_SAMPLERS)
print(f"floor {RESULTS['sw_floor']:.3f}")
for name, (nfes, sws, odes) in results.items():
    RESULTS[f"sw_{name}_nfe{nfes[-1]}"] = sws[-1]
    RESULTS[f"sw_{name}_nfe{nfes[0]}"] = sws[0]
    assert sws[-1] < 2 * RESULTS["sw_floor"], name  # enough steps: at the floor
    assert sws[0] > sws[-1], name  # and 5 are not enough
    if name in deterministic:
        RESULTS[f"ode_error_{name}_nfe{nfes[-1]}"] = odes[-1]
# at the same budget, the second-order DPM-Solvers are much closer to the exact ODE solution
first = min(RESULTS[f"ode_error_{k}_nfe{budgets[-1]}"] for k in ("ddim", "euler"))
for name in ("dpm++2m", "dpm++2s"):
    k = results[name][0][-1]
    assert RESULTS[f"ode_error_{name}_nfe{k}"] < 0.5 * first, name

styles = dict(
    zip(
        DIFFUSION_SAMPLERS,
        ["C0o-", "C1s-", "C2^-", "C3v-", "C4D-", "C5<-", "C6>-", "C7x-", "C8P-", "C9*-"],
    )
)
assert set(styles) == set(DIFFUSION_SAMPLERS)
cols = [5, 10, 20]
show = ("ddpm", "ddim", "dpm++2m", "heun")
rows = [[drawn[name, b] for b in cols] for name in show]
fig = viz.scatter_grid(rows, list(show), [f"NFE <= {b}" for b in cols], lim=2.5, s=1.0)
save(fig, "08_samples_by_nfe.png")

# %% [markdown]
# What the plots say: with 50 evaluations every sampler reaches the floor of the distance measure.
# With fewer, the grid matters as much as the solver (section 4 separates the two): on these small,
# well separated clusters DDIM on the trailing grid is good already at 10 NFE, while the Karras grid
# spends its few steps at low noise, and Heun, at 2 NFE per step, gets only 3 to 5 steps. The ODE
# error separates the solvers more cleanly: at 50 NFE the second-order DPM-Solvers (2M, 2S) are
# several times closer to the exact trajectory than Euler and DDIM. Heun needs more steps before its
# second order pays off: the sharp clusters make the ODE stiff at low noise, and it has half as many
# steps per NFE (full mode goes up to 200 NFE).
#
# ## 4. Grid and solver, separated
#
# The comparison above confounds two choices: each solver ran on its own default grid. Three
# grids of $N$ steps, all from $t_0 = T$ to $t_N = 0$:
#
# * **trailing**: evenly spaced in $t$, $t_i = \mathrm{round}(T - iT/N)$ (section 1);
# * **Karras** ($\rho = 7$) [Karras 2022, Eq. 5]: evenly spaced in $s^{1/\rho}$, where
#   $s = \sigma/\alpha$ is the EDM noise level, between $s_{\max} = s(T)$ and $s_{\min} = s(1)$:
#   $s_i^{1/\rho} = s_{\max}^{1/\rho} + \tfrac{i}{N-1}(s_{\min}^{1/\rho} - s_{\max}^{1/\rho})$
#   for $i < N$, which crowds the steps at low noise;
# * **log-SNR**: evenly spaced in $\lambda$ [Lu 2022 (DPM-Solver)], the variable in which the
#   exponential integrators are derived.
#
# We build the Karras and log-SNR grids from their definitions, check them against
# `sampling_timesteps`, plot them, and then run the deterministic solvers **on one common grid**
# at a time, with the same $x_T$, measuring the ODE error (as above) at equal NFE.

# %%
n_grid = 10
grids = {
    name: sampling_timesteps(sched, n_grid, spacing=name)
    for name in ("trailing", "karras", "logsnr")
}
s_max, s_min = float(sched.edm_sigma(float(T))), float(sched.edm_sigma(1.0))
ramp = torch.arange(n_grid, dtype=F64) / (n_grid - 1)
karras_s = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
RESULTS["karras_grid_vs_definition_max_rel"] = float(
    (sched.edm_sigma(grids["karras"][:-1]) / karras_s - 1).abs().max()
)
lam_grid = sched.logsnr(grids["logsnr"][:-1]) / 2
RESULTS["logsnr_grid_spacing_spread"] = float(lam_grid.diff().max() - lam_grid.diff().min())
assert RESULTS["karras_grid_vs_definition_max_rel"] < 1e-9
assert RESULTS["logsnr_grid_spacing_spread"] < 1e-9
assert all(abs(float(g[0]) - T) < 1e-9 and float(g[-1]) == 0 for g in grids.values())

fig, axes = new_figure(1, 2, (10, 3.6))
for k, (name, g) in enumerate(grids.items()):
    axes[0, 0].plot(g.numpy(), np.full(g.numel(), k), "o", ms=5, label=name)
    lam = (sched.logsnr(g[:-1]) / 2).numpy()
    axes[0, 1].plot(range(n_grid), lam, "o-", ms=4, label=name)
axes[0, 0].set(xlabel="t", yticks=[0, 1, 2], yticklabels=list(grids), title=f"{n_grid}-step grids")
axes[0, 1].set(
    xlabel="step i",
    ylabel=r"$\lambda_{t_i} = \log(\alpha/\sigma)$",
    title=r"the same grids in $\lambda$",
)
axes[0, 1].legend(fontsize=8)
save(fig, "08_time_grids.png")

# %%
common_budgets = pick([10, 20], [10, 20, 50])
solvers = ("ddim", "heun", "dpm++2m", "dpm++3m")
ode_error: dict[tuple[str, str, int], float] = {}
for grid_name in grids:
    for name in solvers:
        for budget in common_budgets:
            ts = sampling_timesteps(sched, steps_for(name, budget), spacing=grid_name)
            end = SAMPLERS[name](exact, x_T_ode, ts, schedule=sched)
            ode_error[grid_name, name, budget] = float((end - reference).norm(dim=1).median())
print(
    "median ODE error on a common grid (rows: grid, solver; columns: NFE "
    + ", ".join(map(str, common_budgets))
    + ")"
)
for grid_name in grids:
    for name in solvers:
        errs = "  ".join(f"{ode_error[grid_name, name, b]:.1e}" for b in common_budgets)
        print(f"  {grid_name:8s} {name:8s} {errs}")
b0 = common_budgets[0]
for budget in common_budgets:  # on the log-SNR grid the exponential integrators win
    for name in ("dpm++2m", "dpm++3m"):
        assert ode_error["logsnr", name, budget] < ode_error["logsnr", "ddim", budget], name
# at 10 NFE the defaults (DDIM on trailing, DPM-Solver++ on Karras) rank the solvers the other
# way round: the grid, not the solver, decides that comparison
RESULTS["default_grids_dpmpp2m_over_ddim_nfe10"] = (
    ode_error["karras", "dpm++2m", b0] / ode_error["trailing", "ddim", b0]
)
RESULTS["logsnr_grid_dpmpp2m_over_ddim_nfe10"] = (
    ode_error["logsnr", "dpm++2m", b0] / ode_error["logsnr", "ddim", b0]
)
spread = [ode_error[g, "dpm++2m", b0] for g in grids]
RESULTS["dpmpp2m_grid_spread_nfe10"] = max(spread) / min(spread)
assert RESULTS["default_grids_dpmpp2m_over_ddim_nfe10"] > 1
assert RESULTS["logsnr_grid_dpmpp2m_over_ddim_nfe10"] < 1
assert RESULTS["dpmpp2m_grid_spread_nfe10"] > 2

fig, axes = new_figure(1, len(common_budgets), (5 * len(common_budgets), 3.6))
for ax, budget in zip(axes[0], common_budgets):
    width = 0.8 / len(solvers)
    for j, name in enumerate(solvers):
        heights = [ode_error[g, name, budget] for g in grids]
        ax.bar(np.arange(len(grids)) + j * width, heights, width, label=name)
    ax.set(xticks=np.arange(len(grids)) + 0.4 - width / 2, xticklabels=list(grids), yscale="log")
    ax.set(ylabel="median ODE error", title=f"one common grid per group, NFE {budget}")
    ax.legend(fontsize=7)
save(fig, "08_solvers_on_common_grids.png")

# %% [markdown]
# What the table says: on the log-SNR grid, the one they are derived in, DPM-Solver++(2M) and
# (3M) are closer to the exact ODE solution than DDIM at every budget. With the default grids
# at 10 NFE (DDIM on trailing, DPM-Solver++ on Karras) DDIM looks better, because Karras'
# $\rho = 7$ grid spends most of ten steps at low noise, where these sharp clusters need
# little work: the same solver's error changes by a factor of two or more between grids. Compare
# solvers on one grid; choose the grid for the data.

# %% [markdown]
# ## 5. Order of convergence, against the closed-form ODE solution
#
# For Gaussian data $x_0 \sim \mathcal{N}(m, C)$ the probability-flow ODE is linear and its
# solution is known (`oracles.gaussian_pf_ode_solution`):
#
# $$y(s_1) - m = \sqrt{(C + s_1^2 I)(C + s_0^2 I)^{-1}}\;(y(s_0) - m).$$
#
# We integrate from $t = T$ to $t = 1$ (stopping short of $t = 0$, whose "denoise to zero"
# last step is special) on grids uniform in log-SNR with $N = 8 \dots 128$ steps, and compare
# with the exact end point. A method of order $p$ has error $\propto N^{-p}$: a line of slope
# $-p$ on a log-log plot. We fit the slope on the four finest grids.

# %%
m = torch.tensor([0.4, -0.3], dtype=F64)
C = torch.tensor([[0.25, 0.05], [0.05, 0.04]], dtype=F64)
gauss = GaussianDenoiser(m, C, sched)
x_start = torch.randn(256, 2, dtype=F64, generator=seeded(31))
a_T, a_1 = float(sched.alpha(float(T))), float(sched.alpha(1.0))
s_T, s_1 = float(sched.edm_sigma(float(T))), float(sched.edm_sigma(1.0))
x_end = a_1 * gaussian_pf_ode_solution(x_start / a_T, s_T, s_1, m, C)

Ns = [8, 16, 32, 64, 128]
orders = {"euler": 1, "heun": 2, "dpm++2m": 2, "dpm++3m": 3}
errors = {}
for name in orders:
    errors[name] = []
    for N in Ns:
        ts = sampling_timesteps(sched, N, spacing="logsnr")[:-1]  # ends at t = 1
        x = SAMPLERS[name](gauss, x_start, ts, schedule=sched)
        errors[name].append(float((x - x_end).norm(dim=1).max()))
    slope = np.polyfit(np.log(Ns[1:]), np.log(errors[name][1:]), 1)[0]
    RESULTS[f"order_{name}"] = float(-slope)
    print(
        f"{name:8s} errors " + " ".join(f"{e:.1e}" for e in errors[name]) + f"   order {-slope:.2f}"
    )
assert 0.85 < RESULTS["order_euler"] < 1.15
assert 1.8 < RESULTS["order_heun"] < 2.3
assert 1.8 < RESULTS["order_dpm++2m"] < 2.3
assert RESULTS["order_dpm++3m"] > 2.7

fig, axes = new_figure(1, 1, (5.5, 4.2))
ax = axes[0, 0]
for name in orders:
    ax.loglog(Ns, errors[name], "o-", ms=4, label=f"{name}: slope -{RESULTS[f'order_{name}']:.2f}")
for p, ls in ((1, ":"), (2, "--"), (3, "-.")):
    ref = errors["euler"][0] * (np.array(Ns, dtype=float) / Ns[0]) ** (-p)
    ax.loglog(Ns, ref, "k" + ls, lw=0.8, alpha=0.6, label=f"N^-{p}")
ax.set(xlabel="steps N", ylabel="max error vs the exact ODE solution", title="Gaussian data")
ax.legend(fontsize=7)
save(fig, "08_convergence_order.png")

# %% [markdown]
# ## 6. A trained model
#
# The exact denoiser isolates the sampler. A trained network adds its own error, which no
# sampler removes: more steps then converge to the *network's* ODE solution, not to the data.
# Here a small MLP is trained on the same data (briefly in fast mode) and swept with a few
# samplers.

# %%
torch.manual_seed(0)
net = TimeMLP(2, hidden=pick(64, 128), depth=pick(2, 3))
model = ModelDenoiser(net, sched, parameterization="v")
steps = pick(200, 6000)
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.1)
for _ in range(steps):
    loss = diffusion_loss(model, gmm.sample(pick(256, 512), gen), generator=gen).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lr_sched.step()
model.eval()
trained = sweep(model, "MLP", pick(("ddim", "dpm++2m"), ("ddpm", "ddim", "dpm++2m", "heun")))
for name, (nfes, sws, _) in trained.items():
    RESULTS[f"trained_sw_{name}_nfe{nfes[-1]}"] = sws[-1]

fig, axes = new_figure(1, 3, (16, 4.4))
for name, (nfes, sws, odes) in results.items():
    axes[0, 0].loglog(nfes, sws, styles[name], ms=4, label=name)
    if name in deterministic:
        axes[0, 1].loglog(nfes, odes, styles[name], ms=4, label=name)
for name, (nfes, sws, _) in trained.items():
    axes[0, 2].loglog(nfes, sws, styles[name], ms=4, label=f"MLP, {name}")
    axes[0, 2].loglog(results[name][0], results[name][1], styles[name], ms=3, alpha=0.3)
for ax in (axes[0, 0], axes[0, 2]):
    ax.axhline(RESULTS["sw_floor"], color="k", ls=":", label="floor (data vs data)")
    ax.set(xlabel="NFE", ylabel="sliced Wasserstein to data")
axes[0, 0].set_title("exact GMM denoiser", fontsize=10)
axes[0, 1].set(xlabel="NFE", ylabel="median distance to the exact ODE end point")
axes[0, 1].set_title("exact GMM denoiser: ODE error", fontsize=10)
axes[0, 2].set_title("trained MLP (faint: exact denoiser)", fontsize=10)
for ax in axes[0]:
    ax.legend(fontsize=7)
save(fig, "08_quality_vs_nfe.png")

# %% [markdown]
# ## Summary
#
# * DDIM keeps DDPM's marginals with a non-Markovian forward process; its sampler is ten lines,
#   and $\eta$ moves it from the deterministic ODE sampler ($\eta = 0$) to DDPM ($\eta = 1$).
# * A sampler walks down a grid of times and may skip any number of steps; trailing, Karras
#   and log-SNR grids place those steps differently, and at 10 NFE the grid matters as much as
#   the solver.
# * Compared on one grid, the exponential integrators DPM-Solver++(2M, 3M) follow the exact ODE
#   more closely than DDIM (Euler), and on Gaussian data the solvers show their orders of
#   convergence 1, 2, 2 and 3.
# * A trained network adds its own error, which no sampler removes.
#
# ## Try this
#
# 1. Write the "leading" grid of the original DDIM code for $N = 10$,
#    $t_i = 1 + (N - 1 - i)\lfloor T/N \rfloor$, and compare it with
#    `sampling_timesteps(..., spacing="leading")`. Where does it start?
# 2. Run `ddim_by_hand` with $\eta = 0.5$ and compare with `sample(sampler="ddim", eta=0.5)`.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    leading = [1 + (n_hand - 1 - i) * (T // n_hand) for i in range(n_hand)] + [0]
    lib_leading = sampling_timesteps(sched, n_hand, spacing="leading")
    RESULTS["answer_leading_grid_max_abs"] = float(
        (torch.tensor(leading, dtype=F64) - lib_leading).abs().max()
    )
    print(f"1. leading grid {leading}: starts at t = {leading[0]}, not at T = {T}")
    assert RESULTS["answer_leading_grid_max_abs"] == 0.0 and leading[0] < T
    g_hand, g_lib = seeded(9), seeded(9)
    by_hand = ddim_by_hand(
        exact, torch.randn(256, 2, dtype=F64, generator=g_hand), trailing, 0.5, g_hand
    )
    library = sample(
        exact, sched, (256, 2), sampler="ddim", steps=n_hand, eta=0.5, generator=g_lib, dtype=F64
    )
    RESULTS["answer_ddim_eta_half_max_abs"] = float((by_hand - library).abs().max())
    print(f"2. eta = 0.5: max |by hand - difflab| = {RESULTS['answer_ddim_eta_half_max_abs']:.1e}")
    assert RESULTS["answer_ddim_eta_half_max_abs"] < 1e-10

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
