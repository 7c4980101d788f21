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
# # 7. What the network predicts: $\epsilon$, $x_0$ or $v$, and how errors are weighted
#
# Given $x_t = \alpha_t x_0 + \sigma_t \epsilon$ (variance preserving: $\alpha_t^2 + \sigma_t^2
# = 1$), a denoiser may output any of three targets, each a linear function of the others:
#
# * $\epsilon$, the noise [Ho 2020]: $\hat x_0 = (x_t - \sigma_t \hat\epsilon) / \alpha_t$;
# * $x_0$, the clean data [Ho 2020, Sec. 3.2]: $\hat\epsilon = (x_t - \alpha_t \hat x_0) /
#   \sigma_t$;
# * $v = \alpha_t \epsilon - \sigma_t x_0$, the "velocity" [Salimans & Ho 2022, Sec. 4]:
#   $\hat x_0 = \alpha_t x_t - \sigma_t \hat v$, $\hat\epsilon = \sigma_t x_t + \alpha_t \hat v$.
#
# Because the conversions are linear, **the squared errors are proportional** at each noise
# level. With $\mathrm{SNR}_t = \alpha_t^2 / \sigma_t^2 = e^{\lambda_t}$:
#
# $$\lVert \hat\epsilon - \epsilon \rVert^2 = \mathrm{SNR}_t\,\lVert \hat x_0 - x_0 \rVert^2,
#   \qquad
#   \lVert \hat v - v \rVert^2 = (\mathrm{SNR}_t + 1)\,\lVert \hat x_0 - x_0 \rVert^2
#   = \Big(1 + \frac{1}{\mathrm{SNR}_t}\Big) \lVert \hat\epsilon - \epsilon \rVert^2 .$$
#
# So the choice of target is, for the loss, a choice of **weighting over noise levels**: an
# unweighted $x_0$-loss is the $\epsilon$-loss weighted by $1/\mathrm{SNR}$, which stresses
# the noisiest levels; an unweighted $v$-loss weights it by $1 + 1/\mathrm{SNR}$. The targets
# also differ in what an error *does*: an $\epsilon$-error of size $e$ moves $\hat x_0$ by
# $e\,\sigma_t / \alpha_t$, a factor $1/\sqrt{\mathrm{SNR}_T} \approx 157$ at the last step of
# DDPM's schedule. This tutorial checks the conversions and the weight identities numerically,
# in difflab's `parameterization` and `objectives` modules, and trains one small MLP with each
# target on a 2-D data set.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab import viz
from difflab.data.toy import sample_toy
from difflab.metrics import mmd, sliced_wasserstein
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss, loss_weight
from difflab.parameterization import (
    ModelDenoiser,
    broadcast_to,
    eps_from_v,
    eps_from_x0,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule

THREADS = use_threads(1)  # tiny matrix products: one thread is fastest; restored at the end
F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)  # initial weights
sched = DiscreteSchedule.from_name("linear", T)

# %% [markdown]
# ## 1. The conversions
#
# For random $x_0$, $\epsilon$ and $t$ we form $x_t$ and the three targets, and convert each
# one back: every round trip must be exact up to float64 rounding.

# %%
n = 4096
x0 = 2 * torch.randn(n, 2, dtype=F64, generator=gen)
eps = torch.randn(n, 2, dtype=F64, generator=gen)
t = torch.randint(1, T + 1, (n,), generator=gen).to(F64)
a, s = (broadcast_to(c, x0) for c in sched.alpha_sigma(t))
xt = a * x0 + s * eps
v = v_from_x0_eps(x0, eps, a, s)
errors = {
    "x0_from_eps": x0_from_eps(xt, eps, a, s) - x0,
    "eps_from_x0": eps_from_x0(xt, x0, a, s) - eps,
    "x0_from_v": x0_from_v(xt, v, a, s) - x0,
    "eps_from_v": eps_from_v(xt, v, a, s) - eps,
    "v_is_alpha_eps_minus_sigma_x0": v - (a * eps - s * x0),
}
for name, err in errors.items():
    RESULTS[f"{name}_max_err"] = float(err.abs().max())
    print(f"{name:32s} max error {RESULTS[f'{name}_max_err']:.1e}")
    assert RESULTS[f"{name}_max_err"] < 1e-10
# v in terms of x_t and x0: sigma v = alpha x_t - x0
RESULTS["v_from_xt_max_err"] = float(((a * xt - x0) / s - v).abs().max())
assert RESULTS["v_from_xt_max_err"] < 1e-10

# %% [markdown]
# ## 2. The squared errors are proportional
#
# Now an arbitrary *wrong* prediction: $\hat x_0 = x_0 + \delta$ with random $\delta$, and the
# $\hat\epsilon$, $\hat v$ it implies at the same $x_t$. The ratios of the squared errors must be
# $\mathrm{SNR}_t$ and $\mathrm{SNR}_t + 1$ exactly, for every sample and every $t$.
#
# difflab's `diffusion_loss` can read one network's output in any target space (`target=`), and
# its `weighting="snr"` is defined as the weight $\mathrm{SNR}$ on the $x_0$-error, converted to
# each target (`loss_weight`): $1$ on the $\epsilon$-error, $\mathrm{SNR}/(\mathrm{SNR} + 1)$ on
# the $v$-error. With that weighting the three per-sample losses of the same prediction must
# coincide: all are the $\epsilon$-error.

# %%
delta = 0.3 * torch.randn(n, 2, dtype=F64, generator=gen)
x0_hat = x0 + delta
eps_hat = eps_from_x0(xt, x0_hat, a, s)
v_hat = v_from_x0_eps(x0_hat, eps_hat, a, s)
se_x0 = ((x0_hat - x0) ** 2).sum(1)
se_eps = ((eps_hat - eps) ** 2).sum(1)
se_v = ((v_hat - v) ** 2).sum(1)
snr = sched.logsnr(t).exp()
RESULTS["eps_err_over_x0_err_vs_snr_max_rel"] = float((se_eps / se_x0 / snr - 1).abs().max())
RESULTS["v_err_over_x0_err_vs_snr_plus_1_max_rel"] = float(
    (se_v / se_x0 / (snr + 1) - 1).abs().max()
)
print(f"|(eps err / x0 err) / SNR - 1|     <= {RESULTS['eps_err_over_x0_err_vs_snr_max_rel']:.1e}")
print(
    f"|(v err / x0 err) / (SNR + 1) - 1| <= "
    f"{RESULTS['v_err_over_x0_err_vs_snr_plus_1_max_rel']:.1e}"
)
assert RESULTS["eps_err_over_x0_err_vs_snr_max_rel"] < 1e-8
assert RESULTS["v_err_over_x0_err_vs_snr_plus_1_max_rel"] < 1e-8


# the same, through the library's loss: one (untrained) network, three target spaces, SNR
# weighting. The network runs in float32; its output is cast to float64, so that the
# conversions between targets (which divide by alpha_t) add no float32 rounding.
class Float64Output(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(x.float(), t.float(), cond).double()


probe = ModelDenoiser(Float64Output(TimeMLP(2, hidden=32, depth=1)), sched)
per_target = {
    target: diffusion_loss(
        probe, x0, t=t, noise=eps, target=target, weighting="snr"
    ).per_sample.detach()
    for target in ("eps", "x0", "v")
}
RESULTS["snr_weighted_losses_agree_max_rel"] = max(
    float(((per_target[k] - per_target["eps"]) / per_target["eps"]).abs().max())
    for k in ("x0", "v")
)
print(f"SNR-weighted eps/x0/v losses of one prediction agree to "
      f"{RESULTS['snr_weighted_losses_agree_max_rel']:.1e}")  # fmt: skip
assert RESULTS["snr_weighted_losses_agree_max_rel"] < 1e-9

# the unweighted losses of each target, as weights on the eps-error
lam = torch.linspace(-12, 12, 241, dtype=F64)
implied = {  # weight on the eps-MSE of an unweighted loss on each target
    "eps": torch.ones_like(lam),
    "x0": torch.exp(-lam),  # 1 / SNR
    "v": 1 + torch.exp(-lam),  # 1 + 1 / SNR
}
for target in ("x0", "v"):
    ratio = loss_weight(lam, weighting="snr", target=target)  # = SNR weight, in target space
    RESULTS[f"loss_weight_snr_{target}_vs_1_over_implied_max_rel"] = float(
        (ratio * implied[target] - 1).abs().max()
    )
    assert RESULTS[f"loss_weight_snr_{target}_vs_1_over_implied_max_rel"] < 1e-12
min_snr = loss_weight(lam, weighting="min-snr", target="eps", gamma=5.0)  # Hang 2023

RESULTS["x0_error_amplification_at_T"] = float(sched.sigma(T) / sched.alpha(T))
amp = RESULTS["x0_error_amplification_at_T"]
print(f"an eps-error at t = T moves x0_hat {amp:.0f} times as far")

# %% [markdown]
# ## 3. Training with each target
#
# Three identical MLPs (`TimeMLP`), each trained with the unweighted loss on its own target:
# the common practice, and, by section 2, three different weightings of the same objective.
# The data are the two moons. We sample with DDPM's ancestral sampler on 100 respaced steps
# (`ddpm`) and with deterministic DDIM on 50 steps (`ddim`), and measure the samples against
# fresh data in two ways, each next to its floor (data vs data) and the prior
# $\mathcal{N}(0, I)$:
#
# * the sliced Wasserstein distance (a transport distance: a sample that lands far away costs
#   its full distance);
# * the squared maximum mean discrepancy with Gaussian kernels (`metrics.mmd`; the kernel is
#   bounded, so a few stray samples barely move it);
#
# and we count the samples that land far from the data ($\lVert x \rVert > 4$; the moons lie
# within $\lVert x \rVert < 2$).

# %%
dataset = "moons"
steps, batch, n_samples = pick(400, 5000), pick(256, 512), pick(2000, 5000)
n_mmd = pick(1000, 2000)
data_ref = sample_toy(dataset, n_samples, generator=gen)


def sw(x: torch.Tensor) -> float:
    return sliced_wasserstein(x, data_ref, generator=torch.Generator().manual_seed(1))


def mmd2(x: torch.Tensor) -> float:
    return mmd(x[:n_mmd], data_ref[:n_mmd])


data_other = sample_toy(dataset, n_samples, generator=gen)
prior = torch.randn(n_samples, 2, generator=gen)
RESULTS["sw_floor"], RESULTS["sw_prior"] = sw(data_other), sw(prior)
RESULTS["mmd_floor"], RESULTS["mmd_prior"] = mmd2(data_other), mmd2(prior)
samples, curves = {}, {}
for target in ("eps", "x0", "v"):
    torch.manual_seed(0)  # the same initial weights for all three
    net = TimeMLP(2, hidden=pick(64, 128), depth=pick(2, 3))
    den = ModelDenoiser(net, sched, parameterization=target)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.1)
    curve = []
    for _ in range(steps):
        out = diffusion_loss(den, sample_toy(dataset, batch, generator=gen), generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        lr_sched.step()
        curve.append(out.loss.item())
    curves[target] = curve
    for sampler, k in (("ddpm", 100), ("ddim", 50)):
        x = sample(den, sched, (n_samples, 2), sampler=sampler, steps=k, generator=gen)
        samples[target, sampler] = x
        RESULTS[f"sw_{target}_{sampler}"] = sw(x)
        RESULTS[f"mmd_{target}_{sampler}"] = mmd2(x)
        RESULTS[f"far_fraction_{target}_{sampler}"] = float((x.norm(dim=1) > 4).double().mean())

print(f"{'':14s} {'SW':>8s} {'MMD^2':>9s} {'far':>7s}")
print(f"{'data (floor)':14s} {RESULTS['sw_floor']:8.4f} {RESULTS['mmd_floor']:9.5f}")
print(f"{'prior N(0, I)':14s} {RESULTS['sw_prior']:8.4f} {RESULTS['mmd_prior']:9.5f}")
for target in ("eps", "x0", "v"):
    for sampler in ("ddpm", "ddim"):
        key = f"{target}_{sampler}"
        print(
            f"{target + ', ' + sampler:14s} {RESULTS['sw_' + key]:8.4f} "
            f"{RESULTS['mmd_' + key]:9.5f} {RESULTS['far_fraction_' + key]:7.2%}"
        )
        assert RESULTS["mmd_" + key] < 0.5 * RESULTS["mmd_prior"], key

# %% [markdown]
# By MMD every model is much closer to the data than the prior is. In fast mode (a few seconds
# of training) the pictures also show the weightings at work. The $x_0$-model, whose loss
# weights the $\epsilon$-error by $1/\mathrm{SNR}$, i.e. hardly at all at low noise, gets the
# shape of the moons first but not their width, which only the low-noise levels decide. The
# $\epsilon$-model typically leaves a few samples far from the data, which the sliced
# Wasserstein distance punishes and the MMD hardly sees: its loss is the $x_0$-loss weighted by
# $\mathrm{SNR}_t$, almost nothing at high noise, so a briefly trained $\epsilon$-model makes
# large $x_0$-errors there (its $\epsilon$-errors are multiplied by $\sigma_t / \alpha_t$), and a
# sample pushed off early drifts into a region the network never saw; a deterministic sampler
# has no noise to pull it back. This is one reason why $v$-prediction is preferred with
# few-step samplers [Salimans & Ho 2022]. With longer training (full mode) the differences
# shrink. Which target wins depends on the data, the network and the sampler; the identities
# above say only that the three differ by a weighting over noise levels and in how their
# errors propagate.

# %%
fig, axes = new_figure(1, 2, (11, 3.8))
ax = axes[0, 0]
for target, style in (("eps", "k-"), ("x0", "C0--"), ("v", "C1-.")):
    ax.semilogy(lam.numpy(), implied[target].numpy(), style, label=f"unweighted {target}-loss")
ax.semilogy(lam.numpy(), min_snr.numpy(), "C2:", label=r"min-SNR-5 [Hang 2023]")
lam_lo, lam_hi = float(sched.logsnr(T)), float(sched.logsnr(1))
ax.axvspan(lam_lo, lam_hi, color="0.9", zorder=0, label="DDPM linear, t = 1..T")
ax.set(xlabel=r"log-SNR $\lambda$", ylabel=r"weight on $\|\hat\epsilon - \epsilon\|^2$")
ax.legend(fontsize=8)
ax = axes[0, 1]
for target in ("eps", "x0", "v"):
    ax.plot(viz.ema_smooth(np.array(curves[target]), 0.95), label=f"{target} (its own MSE)")
ax.set(xlabel="step", ylabel="training loss (EMA)", yscale="log")
ax.legend(fontsize=8)
save(fig, "07_weights_and_losses.png")

rows = [[data_ref] + [samples[k, smp] for k in ("eps", "x0", "v")] for smp in ("ddpm", "ddim")]
fig = viz.scatter_grid(
    rows,
    ["ddpm, 100 steps", "ddim, 50 steps"],
    ["data", "eps-prediction", "x0-prediction", "v-prediction"],
    lim=2.5,
    s=1.0,
)
save(fig, "07_samples.png")

# %% [markdown]
# ## Summary
#
# * $\epsilon$, $x_0$ and $v$ are linear functions of each other at each noise level, so a
#   network predicting one predicts all three.
# * Their squared errors differ only by factors of $\mathrm{SNR}_t$: choosing the target is
#   choosing a weighting over noise levels. The unweighted $\epsilon$-loss barely weighs
#   $x_0$-errors at high noise (tutorial 6 shows what that does to samples), the $x_0$-loss
#   stresses them, and $v$ sits in between.
# * Trained on the same 2-D data with each target, all three models end far closer to the data
#   than the prior.
#
# ## Try this
#
# 1. At which $t$ are the $\epsilon$-error and the $x_0$-error of a prediction equal? Check with
#    a random prediction at that $t$.
# 2. What weight does min-SNR-$\gamma$ with $\gamma = 5$ [Hang 2023] put on the $\epsilon$-error
#    at $\mathrm{SNR} = 10$ and at $\mathrm{SNR} = 1$? Compare with `loss_weight`.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    t_eq = float(sched.t_from_logsnr(0.0))  # SNR = 1: the two errors are equal
    a_eq, s_eq = (float(c) for c in sched.alpha_sigma(torch.tensor(t_eq, dtype=F64)))
    x0_true = torch.randn(256, 2, dtype=F64, generator=gen)
    eps_true = torch.randn(256, 2, dtype=F64, generator=gen)
    x_eq = a_eq * x0_true + s_eq * eps_true
    x0_guess = x0_true + 0.3 * torch.randn(256, 2, dtype=F64, generator=gen)
    eps_guess = eps_from_x0(x_eq, x0_guess, a_eq, s_eq)
    ratio = float(((eps_guess - eps_true) ** 2).sum() / ((x0_guess - x0_true) ** 2).sum())
    RESULTS["answer_equal_errors_ratio_err"] = abs(ratio - 1)
    print(f"1. at t = {t_eq:.1f} (log-SNR 0): eps-error / x0-error = {ratio:.12f}")
    assert RESULTS["answer_equal_errors_ratio_err"] < 1e-9
    lam_probe = torch.tensor([math.log(10.0), 0.0], dtype=F64)
    w = loss_weight(lam_probe, weighting="min-snr", target="eps", gamma=5.0)
    RESULTS["answer_min_snr_weights_err"] = float(
        (w - torch.tensor([0.5, 1.0], dtype=F64)).abs().max()
    )
    print(f"2. min(SNR, 5) / SNR = {float(w[0]):.2f} at SNR = 10, {float(w[1]):.2f} at SNR = 1")
    assert RESULTS["answer_min_snr_weights_err"] < 1e-12

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
