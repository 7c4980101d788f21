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
from _common import is_fast, new_figure, out_path, pick, save, use_threads

from difflab import viz
from difflab.data.toy import eight_gaussians_gmm
from difflab.metrics import sliced_wasserstein
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss
from difflab.oracles import GaussianDenoiser, GMMDenoiser, gaussian_pf_ode_solution
from difflab.parameterization import ModelDenoiser
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


# %% [markdown]
# ## 1. Three identities
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
# ## 2. Sample quality against the number of network evaluations
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


results = sweep(exact, "exact", SAMPLERS)
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
    zip(SAMPLERS, ["C0o-", "C1s-", "C2^-", "C3v-", "C4D-", "C5<-", "C6>-", "C7x-", "C8P-", "C9*-"])
)
assert set(styles) == set(SAMPLERS)
cols = [5, 10, 20]
show = ("ddpm", "ddim", "dpm++2m", "heun")
rows = [[drawn[name, b] for b in cols] for name in show]
fig = viz.scatter_grid(rows, list(show), [f"NFE <= {b}" for b in cols], lim=2.5, s=1.0)
save(fig, "08_samples_by_nfe.png")

# %% [markdown]
# What the plots say: with 50 evaluations every sampler reaches the floor of the distance
# measure. With fewer, the grid matters as much as the solver: on these small, well separated
# clusters DDIM on the trailing grid is good already at 10 NFE, while the Karras grid spends
# its few steps at low noise, and Heun, at 2 NFE per step, gets only 3 to 5 steps. The ODE
# error separates the solvers more cleanly: at 50 NFE the second-order DPM-Solvers (2M, 2S)
# are several times closer to the exact trajectory than Euler and DDIM. Heun needs more steps
# before its second order pays off: the sharp clusters make the ODE stiff at low noise, and it
# has half as many steps per NFE (full mode goes up to 200 NFE).
#
# ## 3. Order of convergence, against the closed-form ODE solution
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
# ## 4. A trained model
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
# Checked above: the three sampler identities (to rounding), every sampler at the floor with
# enough steps, second-order solvers far closer to the exact ODE path at equal cost, and the
# orders of convergence 1 (Euler = DDIM), 2 (Heun, DPM-Solver++(2M)) and at least 3
# (DPM-Solver++(3M)).

# %%
torch.set_num_threads(THREADS)
for key, value in RESULTS.items():
    print(f"{key:44s} {value: .4e}")
print(f"figures in {out_path('')}; fast mode: {is_fast()}")
