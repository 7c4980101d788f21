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
# # 14. Flow matching is diffusion
#
# Flow matching [Lipman 2023] and rectified flow [Liu 2023], the training recipe of Stable
# Diffusion 3 [Esser 2024] and Flux, draw a time $t \in [0, 1]$, mix data and noise on a
# straight line and regress a velocity:
#
# $$x_t = (1 - t)\,x_0 + t\,\epsilon, \qquad u = \frac{dx_t}{dt} = \epsilon - x_0, \qquad
#   \mathcal{L} = \mathbb{E}\,\lVert \hat u(x_t, t) - u \rVert^2 .$$
#
# That is a Gaussian diffusion with $\alpha_t = 1 - t$ and $\sigma_t = t$ (tutorial 8's
# notation), and a fourth parameterisation next to $\epsilon$, $x_0$ and $v$ (tutorial 7).
# Solving $x_t = (1 - t) x_0 + t \epsilon$ and $u = \epsilon - x_0$ for the two unknowns:
#
# $$\hat x_0 = x_t - t\,\hat u, \qquad \hat\epsilon = x_t + (1 - t)\,\hat u .$$
#
# Three consequences, each checked below:
#
# 1. **The loss is a weighted diffusion loss.** $\hat u - u = (\hat\epsilon - \epsilon) -
#    (\hat x_0 - x_0)$ and $\hat\epsilon - \epsilon = -\frac{1 - t}{t}(\hat x_0 - x_0)$, so
#    $\lVert \hat u - u \rVert^2 = \lVert \hat x_0 - x_0 \rVert^2 / t^2
#    = \lVert \hat\epsilon - \epsilon \rVert^2 / (1 - t)^2$.
# 2. **The flow-matching Euler step is DDIM.** From $t$ to $s$:
#    $(1 - s)\hat x_0 + s\hat\epsilon = (1-s)(x_t - t\hat u) + s(x_t + (1-t)\hat u)
#    = x_t + (s - t)\,\hat u$.
# 3. **Every diffusion sampler, guidance and likelihood works on a flow model**, because a
#    velocity network is one more way to give the denoiser $(\hat x_0, \hat\epsilon)$.
#
# In difflab the interpolant is `FlowMatchSchedule` and the velocity is the `flow`
# parameterisation of `ModelDenoiser`. It is not Salimans & Ho's
# $v = \alpha\epsilon - \sigma x_0$: both are called "velocity" in papers, and difflab keeps
# them apart.

# %%
import math

import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab.data.toy import eight_gaussians_gmm
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss, sample_flow_times
from difflab.oracles import GaussianDenoiser, GMMDenoiser
from difflab.parameterization import ModelDenoiser
from difflab.process import q_sample
from difflab.samplers import SAMPLERS, ddim, dpm_solver_pp, sample
from difflab.schedules import (
    DiscreteSchedule,
    FlowMatchSchedule,
    flux_shift,
    sampling_timesteps,
)

THREADS = use_threads(1)  # tiny matrix products: one thread is fastest; restored at the end
F64 = torch.float64
RESULTS: dict[str, float] = {}
flow = FlowMatchSchedule()
gmm = eight_gaussians_gmm()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Velocity(torch.nn.Module):
    """A small untrained velocity network: any function of (x, t) will do for identities."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2)
        ).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(torch.cat([x, t.to(x.dtype)[:, None]], dim=1))


velocity_model = ModelDenoiser(Velocity(), flow, parameterization="flow")

# %% [markdown]
# ## 1. The equivalence, numerically
#
# The denoiser built from the velocity network gives $\hat x_0 = x_t - t\hat u$ and
# $\hat\epsilon = x_t + (1 - t)\hat u$; a ten-line flow-matching Euler loop gives the same
# samples as difflab's DDIM with $\eta = 0$ on the same grid; and `diffusion_loss` with the
# `flow`, `eps` and `x0` targets gives losses in the ratio $1 : (1-t)^2 : t^2$.

# %%
x0 = gmm.sample(512, seeded(1), dtype=F64)
eps = torch.randn(512, 2, generator=seeded(2), dtype=F64)
t = torch.rand(512, generator=seeded(3), dtype=F64).clamp(0.01, 0.99)
xt = q_sample(x0, t, flow, eps=eps)
with torch.no_grad():
    u_hat = velocity_model.network_output(xt, t)
    pred = velocity_model(xt, t)
tc = t[:, None]
RESULTS["x0_eps_from_u_max_abs"] = max(
    float((pred.x0 - (xt - tc * u_hat)).abs().max()),
    float((pred.eps - (xt + (1 - tc) * u_hat)).abs().max()),
)
assert RESULTS["x0_eps_from_u_max_abs"] < 1e-12


def flow_euler_by_hand(model: ModelDenoiser, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """x_s = x_t + (s - t) u_hat(x_t, t) down the grid ts (from 1 to 0)."""
    with torch.no_grad():
        for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
            u = model.network_output(x, torch.full((x.shape[0],), t_cur, dtype=F64))
            x = x + (t_next - t_cur) * u
    return x


grid = sampling_timesteps(flow, 10)
x1 = torch.randn(256, 2, generator=seeded(4), dtype=F64)
by_hand = flow_euler_by_hand(velocity_model, x1, grid)
RESULTS["flow_euler_vs_ddim_max_abs"] = float(
    (by_hand - ddim(velocity_model, x1, grid, schedule=flow)).abs().max()
)
print(f"flow-matching Euler by hand vs DDIM (eta = 0): {RESULTS['flow_euler_vs_ddim_max_abs']:.1e}")
assert RESULTS["flow_euler_vs_ddim_max_abs"] < 1e-12

raw = {
    target: diffusion_loss(velocity_model, x0, t=t, noise=eps, target=target).terms["raw"].detach()
    for target in ("flow", "eps", "x0")
}
RESULTS["loss_flow_vs_eps_max_rel"] = float(
    ((raw["flow"] * (1 - t) ** 2 - raw["eps"]) / raw["eps"]).abs().max()
)
RESULTS["loss_flow_vs_x0_max_rel"] = float(
    ((raw["flow"] * t**2 - raw["x0"]) / raw["x0"]).abs().max()
)
print(
    "||u err||^2 (1-t)^2 / ||eps err||^2 - 1:",
    f"{RESULTS['loss_flow_vs_eps_max_rel']:.1e};",
    "||u err||^2 t^2 / ||x0 err||^2 - 1:",
    f"{RESULTS['loss_flow_vs_x0_max_rel']:.1e}",
)
assert RESULTS["loss_flow_vs_eps_max_rel"] < 1e-9 and RESULTS["loss_flow_vs_x0_max_rel"] < 1e-9

# %% [markdown]
# So the plain flow-matching loss is the $\epsilon$-loss weighted by $1/(1-t)^2 =
# (1 + \sqrt{\mathrm{SNR}})^2 / \mathrm{SNR}$: compared with DDPM's unweighted $\epsilon$-loss
# it stresses the noisy end ($t \to 1$), as the $x_0$- and $v$-losses of tutorial 7 do.
# Together with the time distribution (uniform, or SD3's logit-normal, section 3) this weight
# is all that distinguishes "flow matching" from "diffusion" in training.
#
# ## 2. One ODE, straight and curved coordinates
#
# A deterministic sampler solves the probability-flow ODE. In EDM's scaled variables
# $y = x/\alpha$, $s = \sigma/\alpha$ every schedule has **the same** ODE,
# $dy/ds = (y - D(y; s))/s$ (tutorial 8); a schedule only chooses the coordinates
# $x = \alpha y$ in which we look at it and the times at which we step. The flow schedule has
# $s = t / (1 - t)$ and $x = y/(1 + s)$, DDPM's VP schedule $x = y/\sqrt{1 + s^2}$.
#
# Two checks make this concrete with the exact denoiser of the 8-Gaussians data:
#
# * DPM-Solver++ works in $\lambda = \log(\alpha/\sigma)$ and $x/\sigma$, which do not depend
#   on the schedule: run on the flow schedule and on DDPM's linear schedule over the same
#   grid of $\lambda$, from the same point, it returns the same samples to round-off.
# * The trajectories differ in shape, and which coordinates draw them straight depends on the
#   data. For data at one point $m$ the flow path $x_t = (1 - t)m + t\epsilon$ is a line and
#   the VP path $\alpha_t m + \sigma_t \epsilon$ (with $\alpha^2 + \sigma^2 = 1$) an arc; for
#   data $\mathcal{N}(m, I)$ the exact ODE solution is $x = \alpha m + \sqrt{\alpha^2 +
#   \sigma^2}\, z$, a line for VP and a curve for the flow schedule. We measure the
#   straightness (chord / path length, 1 for a line) of exact ODE solutions from the same
#   starting $y$, drawn in each coordinate system, for both cases and for the 8 Gaussians.

# %%
vp = DiscreteSchedule.from_name("linear", 1000)
exact_flow, exact_vp = GMMDenoiser(gmm, flow), GMMDenoiser(gmm, vp)
n_paths, n_steps = pick(48, 200), pick(30, 200)
lam_hi, lam_lo = float(vp.logsnr(vp.t_max)) / 2, float(vp.logsnr(1.0)) / 2
lam_grid = torch.linspace(lam_hi, lam_lo, 25, dtype=F64)
ts_flow = torch.cat([flow.t_from_logsnr(2 * lam_grid), torch.zeros(1, dtype=F64)])
ts_vp = torch.cat([vp.t_from_logsnr(2 * lam_grid), torch.zeros(1, dtype=F64)])
y_start = torch.randn(n_paths, 2, generator=seeded(5), dtype=F64) / float(vp.alpha(vp.t_max))
x_flow_start = float(flow.alpha(ts_flow[0])) * y_start
x_vp_start = float(vp.alpha(ts_vp[0])) * y_start
end_flow = dpm_solver_pp(exact_flow, x_flow_start, ts_flow, schedule=flow)
end_vp = dpm_solver_pp(exact_vp, x_vp_start, ts_vp, schedule=vp)
RESULTS["dpmpp_flow_vs_vp_max_abs"] = float((end_flow - end_vp).abs().max())
print(
    "DPM-Solver++(2M), flow vs VP schedule, same lambda grid:",
    f"{RESULTS['dpmpp_flow_vs_vp_max_abs']:.1e}",
)
assert RESULTS["dpmpp_flow_vs_vp_max_abs"] < 1e-8


def trajectory(schedule, denoiser, x_start, ts):
    """The sample after every step of flow-heun (Heun in the schedule's own time)."""
    xs = [x_start]
    for i in range(ts.numel() - 1):
        xs.append(SAMPLERS["flow-heun"](denoiser, xs[-1], ts[i : i + 2], schedule=schedule))
    return torch.stack(xs)  # (steps + 1, B, 2)


def straightness(path: torch.Tensor) -> float:
    """Mean over trajectories of |x_end - x_start| / path length (1 for straight lines)."""
    length = (path[1:] - path[:-1]).norm(dim=-1).sum(0)
    return float(((path[-1] - path[0]).norm(dim=-1) / length).mean())


# the same ODE solutions drawn in both coordinate systems, from the same y at s = 20
s_top = 20.0
t_top = {"flow": float(flow.t_from_edm_sigma(torch.tensor(s_top, dtype=F64)))}
t_top["vp"] = float(vp.t_from_edm_sigma(torch.tensor(s_top, dtype=F64)))
grids_2d = {
    "flow": torch.cat(
        [torch.linspace(t_top["flow"], flow.t_min, n_steps, dtype=F64), torch.zeros(1, dtype=F64)]
    ),
    "vp": sampling_timesteps(vp, n_steps, spacing="karras", t_start=t_top["vp"]),
}
m_point = torch.tensor([2.0, 1.0], dtype=F64)
data_laws = {
    "one point": (m_point, 1e-8 * torch.eye(2, dtype=F64)),
    "N(m, I)": (m_point, torch.eye(2, dtype=F64)),
}
y_top = s_top * torch.randn(n_paths, 2, generator=seeded(6), dtype=F64)
paths = {}
for law, (mean, cov) in data_laws.items():
    for name, sched in (("flow", flow), ("vp", vp)):
        den = GaussianDenoiser(mean, cov, sched)
        x_start = float(sched.alpha(t_top[name])) * (mean + y_top)
        paths[law, name] = trajectory(sched, den, x_start, grids_2d[name])
for name, sched, den in (("flow", flow, exact_flow), ("vp", vp, exact_vp)):
    x_start = float(sched.alpha(t_top[name])) * y_top
    paths["8 Gaussians", name] = trajectory(sched, den, x_start, grids_2d[name])
short = {"one point": "point", "N(m, I)": "unit_gaussian", "8 Gaussians": "8gaussians"}
for (law, name), path in paths.items():
    RESULTS[f"straightness_{short[law]}_{name}"] = straightness(path)
print({f"{law} / {name}": round(straightness(p), 3) for (law, name), p in paths.items()})
assert straightness(paths["one point", "flow"]) > 0.999 > straightness(paths["one point", "vp"])
assert straightness(paths["N(m, I)", "vp"]) > 0.999 > straightness(paths["N(m, I)", "flow"])
RESULTS["endpoint_flow_vs_vp_median"] = float(
    (paths["8 Gaussians", "flow"][-1] - paths["8 Gaussians", "vp"][-1]).norm(dim=-1).median()
)
assert RESULTS["endpoint_flow_vs_vp_median"] < 0.05  # one ODE, solved twice

fig, axes = new_figure(3, 2, (8.0, 11.0))
for row, law in enumerate(("one point", "N(m, I)", "8 Gaussians")):
    for col, (name, label) in enumerate(
        (("flow", "x = y / (1 + s)"), ("vp", "x = y / sqrt(1 + s^2)"))
    ):
        ax, path = axes[row, col], paths[law, name]
        for k in range(min(n_paths, 24)):
            ax.plot(path[:, k, 0], path[:, k, 1], lw=0.7, alpha=0.7)
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, c="k", zorder=3)
        ax.set_title(f"{law}, {name}: {label}; straightness {straightness(path):.2f}", fontsize=8)
        ax.set_aspect("equal")
save(fig, "14_straight_and_curved_paths.png")

# %% [markdown]
# The end points agree (one ODE, solved in two coordinate systems). Straightness is a property
# of the coordinates *and* the data: the flow schedule draws straight lines for a point mass,
# the VP schedule for unit Gaussians, and neither for the mixture. It matters for solvers that
# are not schedule-free (Heun in $t$ is not Heun in $s$), and it is why a uniform grid in $t$
# suits the flow schedule. For DDIM it does not matter at all: DDIM, i.e. flow-matching Euler,
# depends only on the grid of noise levels $s_i$, whatever the coordinates (exercise 2).
#
# ## 3. The time shift of SD3 and Flux
#
# At high resolution an image keeps more signal at the same $\sigma$ (neighbouring pixels
# average the noise away), so SD3 moves the times towards noise [Esser 2024, Sec. 5.3.2]:
#
# $$t' = \frac{s\,t}{1 + (s - 1)\,t}, \qquad \frac{t'}{1 - t'} = s\,\frac{t}{1 - t},$$
#
# i.e. the EDM noise level is multiplied by $s$ and the log-SNR lowered by $2\log s$; SD3 uses
# $s = 3$. Flux makes $s = e^{\mu}$ depend on the number of latent tokens $L$, with $\mu$ linear
# from 0.5 at $L = 256$ to 1.15 at $L = 4096$ (`flux_shift`). difflab applies the shift to the
# sampling grid (`FlowMatchSchedule(shift=s)`, trailing and uniform spacing) and to the
# training times (`sample_flow_times`), never to $\alpha$ and $\sigma$ themselves. The training
# default of SD3 draws $\mathrm{logit}(t) \sim \mathcal{N}(0, 1)$ (logit-normal).

# %%
shifts = {"s = 1": 1.0, "s = 3 (SD3)": 3.0, "Flux, 64x64 tokens": flux_shift(4096)}
grids = {name: sampling_timesteps(FlowMatchSchedule(shift=s), 20) for name, s in shifts.items()}
inner = slice(1, -1)  # both ends are fixed points (t = 1 and the final t = 0)
RESULTS["shift_logsnr_max_abs"] = max(
    float(
        (flow.logsnr(grids[name][inner]) - (flow.logsnr(grids["s = 1"][inner]) - 2 * math.log(s)))
        .abs()
        .max()
    )
    for name, s in shifts.items()
)
assert RESULTS["shift_logsnr_max_abs"] < 1e-9

n_times = pick(20_000, 200_000)
times = {
    name: sample_flow_times(FlowMatchSchedule(shift=s), n_times, generator=seeded(7))
    for name, s in shifts.items()
}
# the median of logit-normal(0, 1) times is 1/2, moved by the shift to s / (1 + s)
RESULTS["shifted_median_max_abs_err"] = max(
    abs(float(times[name].median()) - s / (1 + s)) for name, s in shifts.items()
)
assert RESULTS["shifted_median_max_abs_err"] < 4 * 1.253 * 0.25 / math.sqrt(n_times) * 4

fig, axes = new_figure(1, 2, (9.5, 3.8))
for name, g in grids.items():
    axes[0, 0].plot(range(g.numel()), g, "o-", ms=3, label=name)
    axes[0, 1].hist(times[name].numpy(), bins=60, density=True, histtype="step", label=name)
axes[0, 0].set(xlabel="step", ylabel="t", title="20-step trailing grids")
axes[0, 1].set(xlabel="t", ylabel="density", title="logit-normal(0, 1) training times")
for ax in axes[0]:
    ax.legend(fontsize=7)
save(fig, "14_time_shift.png")

# %% [markdown]
# ## 4. Which way does time run?
#
# | library | $t = 1$ is | $x_t$ | target | network input |
# | --- | --- | --- | --- | --- |
# | difflab `FlowMatchSchedule` | noise | $(1-t)x_0 + t\epsilon$ | $u = \epsilon - x_0$ | $t$ |
# | diffusers (flow) | noise | $(1-\sigma)x_0 + \sigma\epsilon$ | $\epsilon - x_0$ | $1000\sigma$ |
# | torchcfm `ConditionalFlowMatcher` | data | $t x_1 + (1-t)x_0$ | $x_1 - x_0 = -u$ | $t$ |
# | rectified-flow-pytorch | data | $t$ data $+ (1-t)$ noise | data − noise $= -u$ | $t$ |
#
# (diffusers' scheduler is `FlowMatchEulerDiscreteScheduler`, used by SD3 and Flux; its $\sigma$
# is difflab's $t$. torchcfm's $x_0$ is the noise and $x_1$ the data, with `sigma=0`.)
#
# So a torchcfm or rectified-flow-pytorch model is a difflab model after $t \mapsto 1 - t$ and
# $\hat u \mapsto -\hat u$, and a diffusers model after dividing its timestep by 1000. Two
# traps seen in the wild: diffusers' `set_timesteps` without explicit `sigmas` shifts the low
# end of its grid twice (diffusers #13243; difflab's trailing grid equals diffusers' grid
# *given* `sigmas=linspace(1, 1/N, N)`, `tests/test_flow.py`), and its `s_churn` adds noise
# after the network has been evaluated (#8549; difflab's `flow-heun` raises the noise first).
# The cell checks the torchcfm row by its formula (and with torchcfm itself when installed).

# %%
data, noise = x0[:64], eps[:64]
t_cfm = torch.rand(64, generator=seeded(8), dtype=F64)
xt_cfm = t_cfm[:, None] * data + (1 - t_cfm[:, None]) * noise  # torchcfm, sigma = 0
ut_cfm = data - noise
RESULTS["torchcfm_flip_max_abs"] = max(
    float((q_sample(data, 1 - t_cfm, flow, eps=noise) - xt_cfm).abs().max()),
    float(((noise - data) + ut_cfm).abs().max()),
)
assert RESULTS["torchcfm_flip_max_abs"] < 1e-12
try:
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
except ImportError:  # optional: the formula above is the check
    print("torchcfm is not installed; checked its formula only")
else:
    _, xt_lib, ut_lib = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(
        noise, data, t=t_cfm
    )
    gap = max(float((xt_lib - xt_cfm).abs().max()), float((ut_lib - ut_cfm).abs().max()))
    RESULTS["torchcfm_library_max_abs"] = gap
    print(f"torchcfm itself: max gap {gap:.1e}")
    assert gap < 1e-12

# %% [markdown]
# ## Summary
#
# * Flow matching is Gaussian diffusion on the schedule $\alpha_t = 1 - t$, $\sigma_t = t$
#   with a velocity network $\hat u$: $\hat x_0 = x_t - t\hat u$, $\hat\epsilon = x_t +
#   (1-t)\hat u$.
# * Its loss is the $\epsilon$-loss weighted by $1/(1 - t)^2$ (the $x_0$-loss by $1/t^2$); its
#   Euler sampler is DDIM; every difflab sampler runs on it from $t = 1$.
# * All schedules share one probability-flow ODE; schedule-free solvers (DPM-Solver++, DDIM)
#   give identical samples on matched grids. Whether its solutions look straight depends on
#   the coordinates and the data (a point mass: flow; unit Gaussians: VP).
# * SD3's shift multiplies the EDM noise level by $s$ (Flux: $s = e^\mu$); it moves times,
#   not the interpolant. Libraries disagree on the direction of time: mind the flip.
#
# ## Try this
#
# 1. Train a small velocity MLP on the 8 Gaussians with `diffusion_loss` (the `flow` target,
#    logit-normal times) for a few hundred steps and sample it with `flow-euler`. Does the
#    loss fall?
# 2. Take the flow grid of 12 trailing steps with shift 3, map it to DDPM's linear schedule
#    through the EDM noise level ($t_{VP} = $ `vp.t_from_edm_sigma(flow.edm_sigma(t))`) and
#    run DDIM there with the exact denoiser from the same $y$: is it the flow-matching Euler
#    sampler?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    # TimeMLP's sinusoidal embedding is made for times up to ~1000: time_scale hands it 1000 t
    torch.manual_seed(0)
    model = ModelDenoiser(
        TimeMLP(2, hidden=64, depth=2), flow, parameterization="flow", time_scale=1000.0
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses, g = [], seeded(10)
    for _ in range(pick(200, 3000)):
        batch = gmm.sample(256, g).float()
        loss = diffusion_loss(model, batch, t_sampling="logit-normal", generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    RESULTS["answer_flow_loss_drop"] = first - last
    with torch.no_grad():
        samples = sample(model, flow, (2000, 2), sampler="flow-euler", steps=20, generator=g)
    print(f"1. flow loss {first:.3f} -> {last:.3f}; sample spread {float(samples.std()):.2f}")
    assert last < first and bool(torch.isfinite(samples).all())

    g12 = sampling_timesteps(FlowMatchSchedule(shift=3.0), 12)
    t_vp = vp.t_from_edm_sigma(flow.edm_sigma(g12[1:-1]))
    # the first step from t = 1 (pure noise) on the flow schedule; from there both runs start
    # at the same y = x / alpha, at the same noise level s_1
    noise2 = torch.randn(500, 2, generator=seeded(11), dtype=F64)
    first_step_flow = ddim(exact_flow, noise2, g12[:2], schedule=flow)  # the step from t = 1
    y1 = first_step_flow / float(flow.alpha(g12[1]))
    rest_flow = ddim(exact_flow, first_step_flow, g12[1:], schedule=flow)
    rest_vp = ddim(
        exact_vp,
        float(vp.alpha(t_vp[0])) * y1,
        torch.cat([t_vp, torch.zeros(1, dtype=F64)]),
        schedule=vp,
    )
    RESULTS["answer_ddim_flow_vs_vp_max_abs"] = float((rest_flow - rest_vp).abs().max())
    gap = RESULTS["answer_ddim_flow_vs_vp_max_abs"]
    print(f"2. DDIM on the mapped VP grid vs flow-matching Euler: {gap:.1e}")
    assert RESULTS["answer_ddim_flow_vs_vp_max_abs"] < 1e-8

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
