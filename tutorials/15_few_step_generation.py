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
# # 15. Few-step generation: distillation and consistency models
#
# Training-free ODE solvers (tutorial 8) need about ten network evaluations or more. Below
# that they fail, and not because they are badly written: the probability-flow ODE's
# trajectories **bend**. At high noise the denoiser's best guess $\hat x_0$ is close to the
# data mean; only as the noise falls does it commit to one mode. A solver that takes one
# long step follows the first guess, and lands near the mean.
#
# Two ways around it, both trained from a diffusion model (the *teacher*):
#
# * **Progressive distillation** [Salimans & Ho 2022]: a student learns to take in *one*
#   DDIM step what the teacher takes in *two*; repeat, halving the steps each round.
# * **Consistency models** [Song 2023]: learn the map $f(x_t, t)$ from any point of a
#   trajectory straight to its end, so one evaluation gives a sample; consistency
#   distillation trains it on the teacher's ODE steps, ECT [Geng 2024] on data, starting
#   from the teacher.
#
# This tutorial shows the curvature on 2-D data with the exact mixture denoiser, then
# both methods on Gaussian data, where the exact answers are affine and known in closed
# form, so a small affine student can reach them and the library's result is checked
# exactly (`difflab.distill`, the `consistency` sampler).

# %%
import torch
from _common import answers_wanted, new_figure, pick, save, use_threads

from difflab.data.toy import default_gmm
from difflab.distill import (
    ConsistencyDenoiser,
    consistency_distillation_loss,
    ddim_step,
    distillation_target,
    ect_gap,
    karras_levels,
    progressive_distillation,
    progressive_grids,
)
from difflab.metrics import sliced_wasserstein
from difflab.oracles import GaussianConsistencyFunction, GaussianDenoiser, GMMDenoiser
from difflab.parameterization import Prediction
from difflab.samplers import ddim, edm_sampler, sample
from difflab.schedules import DiscreteSchedule, EDMSchedule

THREADS = use_threads(1)
F64 = torch.float64
RESULTS: dict[str, float] = {}
N = pick(2000, 10000)
LINEAR = DiscreteSchedule.from_name("linear", 1000)


def seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


# %% [markdown]
# ## 1. Why solvers fail below ~10 steps: curved trajectories
#
# For the 2-D mixture of `default_gmm` the exact denoiser is known (`GMMDenoiser`). We solve
# the ODE finely (Heun, 100 steps) and record $\hat x_0$ along each trajectory: on a straight
# trajectory it would never change, and one Euler step (DDIM) would be exact.

# %%
gmm = default_gmm()
den = GMMDenoiser(gmm, LINEAR)
data = gmm.sample(N, seed(0), dtype=F64)
x_T = torch.randn(N, 2, generator=seed(1), dtype=F64)
guesses = []
end = sample(den, LINEAR, (N, 2), sampler="heun", steps=100, x_init=x_T, dtype=F64,
             callback=lambda s: guesses.append((s["t"], s["x0_hat"])))  # fmt: skip
drift = [float((g - end).norm(dim=1).mean()) for _, g in guesses]
RESULTS["x0_hat_drift_at_t_max"] = drift[0]
RESULTS["x0_hat_drift_at_last_step"] = drift[-1]
print(f"mean distance of x0_hat from the trajectory's end: {drift[0]:.3f} at t_max, "
      f"{drift[-1]:.4f} at the last step")  # fmt: skip
assert drift[0] > 20 * drift[-1]

# %% [markdown]
# The first guess is far from where the trajectory ends. With few steps, that shows as
# samples pulled towards the mean: the sliced Wasserstein distance to fresh data against
# the number of network evaluations, for DDIM (Euler) and DPM-Solver++(2M):

# %%
ref_sw = sliced_wasserstein(gmm.sample(N, seed(2), dtype=F64), data, generator=seed(3))
nfes = [1, 2, 4, 8, 16, 32]
sw = {}
for name in ("ddim", "dpm++2m"):
    sw[name] = [
        sliced_wasserstein(
            sample(den, LINEAR, (N, 2), sampler=name, steps=k, x_init=x_T, dtype=F64),
            data,
            generator=seed(3),
        )
        for k in nfes
    ]
    print(name, " ".join(f"{k}:{v:.3f}" for k, v in zip(nfes, sw[name])))
RESULTS["sw_ddim_2"], RESULTS["sw_ddim_32"] = sw["ddim"][1], sw["ddim"][-1]
RESULTS["sw_data_vs_data"] = ref_sw
assert sw["ddim"][1] > 3 * sw["ddim"][-1] and sw["dpm++2m"][1] > 3 * sw["dpm++2m"][-1]

fig, axes = new_figure(1, 2, (9.0, 3.6))
ts_seen = [t for t, _ in guesses]
axes[0, 0].plot(ts_seen, drift)
axes[0, 0].set(xlabel="t", ylabel="mean |x0_hat(t) - x_end|", title="the guess moves")
for name in sw:
    axes[0, 1].loglog(nfes, sw[name], "o-", label=name)
axes[0, 1].axhline(ref_sw, color="k", ls=":", label="data vs data")
axes[0, 1].set(xlabel="network evaluations", ylabel="sliced W2", title="few steps fail")
axes[0, 1].legend()
save(fig, "15_curvature.png")

# %% [markdown]
# ## 2. Progressive distillation
#
# With $z_t = \alpha_t x + \sigma_t \epsilon$, the teacher takes two DDIM steps
# $t \to t' \to t''$, giving $z_{t''}$. The student's target is the $\tilde x$ that takes
# *one* DDIM step from $z_t$ to the same point [Salimans & Ho 2022, Algorithm 2]:
#
# $$\tilde x = \frac{z_{t''} - (\sigma_{t''}/\sigma_t)\, z_t}
#                  {\alpha_{t''} - (\sigma_{t''}/\sigma_t)\, \alpha_t},$$
#
# learned with the weight $\max(\mathrm{SNR}_t, 1)$ ("truncated SNR"). We check the
# formula by putting it back into a DDIM step:

# %%
gauss_mean = torch.tensor([0.8, -0.5], dtype=F64)
gauss_cov = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=F64)
teacher = GaussianDenoiser(gauss_mean, gauss_cov, LINEAR)
t, t_mid, t_end = (torch.tensor([v], dtype=F64) for v in (750.0, 500.0, 250.0))
z_t = torch.randn(5, 2, generator=seed(4), dtype=F64)
z_end = ddim(teacher, z_t, torch.cat([t, t_mid, t_end]), schedule=LINEAR)
(a_t, s_t), (a_e, s_e) = LINEAR.alpha_sigma(t), LINEAR.alpha_sigma(t_end)
x_tilde = distillation_target(z_t, z_end, a_t, s_t, a_e, s_e)
RESULTS["target_plug_back_max_err"] = float(
    (ddim_step(x_tilde, z_t, a_t, s_t, a_e, s_e) - z_end).abs().max()
)
assert RESULTS["target_plug_back_max_err"] < 1e-10

# %% [markdown]
# For Gaussian data every DDIM step of the exact denoiser is affine in $z_t$, so a student
# that is affine at each time of its grid can represent the distilled sampler exactly.
# Rounds 8 → 4 → 2 → 1 step, each student a copy of the previous model:


# %%
class AffineTable(torch.nn.Module):
    """x0 = W_k x + b_k at each time ts[k]; starts as the exact Gaussian denoiser."""

    def __init__(self, ts):
        super().__init__()
        self.ts = torch.as_tensor(ts, dtype=F64)
        a, s = LINEAR.alpha_sigma(self.ts)
        g = torch.stack([ai * gauss_cov @ torch.linalg.inv(ai**2 * gauss_cov + si**2 * torch.eye(2))
                         for ai, si in zip(a.tolist(), s.tolist())])  # fmt: skip
        self.w = torch.nn.Parameter(g.to(F64))
        self.b = torch.nn.Parameter(gauss_mean - a[:, None] * (g.to(F64) @ gauss_mean))

    def forward(self, x, t, cond=None):
        k = (t[:, None] - self.ts[None]).abs().argmin(1)
        x0 = (self.w[k] @ x[:, :, None])[:, :, 0] + self.b[k]
        a, s = LINEAR.alpha_sigma(t)
        return Prediction(x0=x0, eps=(x - a[:, None] * x0) / s[:, None])


def gaussian_batches(batch, s):
    g, chol = seed(s), torch.linalg.cholesky(gauss_cov)
    while True:
        yield gauss_mean + torch.randn(batch, 2, generator=g, dtype=F64) @ chol.T


ts_8, _ = progressive_grids(LINEAR, 4)
model = AffineTable(ts_8[:-1])
rounds = []
student = progressive_distillation(
    model, gaussian_batches(128, 5), schedule=LINEAR, teacher_steps=8, iterations=200,
    lr=0.02, generator=seed(6), on_round=lambda n, s: rounds.append(n),
)  # fmt: skip
_, ts_1 = progressive_grids(LINEAR, 1)
x_T = torch.randn(N, 2, generator=seed(7), dtype=F64)
with torch.no_grad():
    want = ddim(model, x_T, ts_8, schedule=LINEAR)
    got = ddim(student, x_T, ts_1, schedule=LINEAR)
    naive = ddim(model, x_T, ts_1, schedule=LINEAR)
RESULTS["pd_1_step_vs_8_step_rms"] = float((got - want).pow(2).mean().sqrt())
RESULTS["teacher_1_step_vs_8_step_rms"] = float((naive - want).pow(2).mean().sqrt())
print(f"rounds: {rounds}; 1-step student vs 8-step teacher: "
      f"{RESULTS['pd_1_step_vs_8_step_rms']:.4f} (teacher at 1 step: "
      f"{RESULTS['teacher_1_step_vs_8_step_rms']:.3f})")  # fmt: skip
assert rounds == [4, 2, 1] and RESULTS["pd_1_step_vs_8_step_rms"] < 0.02
assert RESULTS["teacher_1_step_vs_8_step_rms"] > 10 * RESULTS["pd_1_step_vs_8_step_rms"]

# %% [markdown]
# ## 3. Consistency models
#
# A consistency function maps every point of a trajectory to its end. For Gaussian data it is
# affine: $f(x, t) = m + \sqrt{C (C + s^2 I)^{-1}}\,(x/\alpha - m)$ with $s = \sigma/\alpha$
# (`GaussianConsistencyFunction`). Given it, the `consistency` sampler draws exactly from the
# data in one step, where DDIM at one step returns (nearly) the mean:

# %%
exact_f = GaussianConsistencyFunction(gauss_mean, gauss_cov, LINEAR)
one = sample(exact_f, LINEAR, (N, 2), sampler="consistency", steps=1, generator=seed(8),
             dtype=F64)  # fmt: skip
cov_err = (torch.cov(one.T) - gauss_cov).abs().max()
se = float(((gauss_cov.diag().outer(gauss_cov.diag()) + gauss_cov**2) / N).sqrt().max())
RESULTS["consistency_1_step_cov_z"] = float(cov_err) / se
assert RESULTS["consistency_1_step_cov_z"] < 4

# %% [markdown]
# **Consistency distillation** learns $f$ from the teacher: on noise levels
# $t_1 < \dots < t_N$, a point $x_{t_{n+1}}$ and the teacher's Heun step back to $t_n$ must
# map to the same place, $f(x_{t_{n+1}}, t_{n+1}) = f^-(\hat x_{t_n}, t_n)$. The model is
# `ConsistencyDenoiser`, which makes $f(x, t_\min) = x$ hold exactly through
# $c_\text{skip}, c_\text{out}$ [Song 2023, App. C]. On the EDM schedule:

# %%
EDM = EDMSchedule()
levels = karras_levels(EDM, 12)


class EDMAffine(AffineTable):
    """The same affine table on the EDM schedule (inputs scaled by 1 / sqrt(1 + s^2))."""

    def __init__(self, ts):
        torch.nn.Module.__init__(self)
        self.ts = torch.as_tensor(ts, dtype=F64)
        self.c_in = 1 / (1 + self.ts**2).sqrt()
        g = torch.stack([gauss_cov @ torch.linalg.inv(gauss_cov + s**2 * torch.eye(2, dtype=F64))
                         for s in self.ts.tolist()])  # fmt: skip
        self.w = torch.nn.Parameter(g / self.c_in[:, None, None])
        self.b = torch.nn.Parameter(gauss_mean - g @ gauss_mean)

    def forward(self, x, t, cond=None):
        k = (t[:, None] - self.ts[None]).abs().argmin(1)
        x0 = (self.w[k] @ x[:, :, None])[:, :, 0] * self.c_in[k, None] + self.b[k]
        return Prediction(x0=x0, eps=(x - x0) / t[:, None])


cm = ConsistencyDenoiser(EDMAffine(levels), EDM)
edm_teacher = GaussianDenoiser(gauss_mean, gauss_cov, EDM)
opt = torch.optim.Adam(cm.parameters(), lr=0.02)
batches, g = gaussian_batches(256, 9), seed(10)
for _ in range(300):
    loss = consistency_distillation_loss(cm, cm, edm_teacher, next(batches), schedule=EDM,
                                         ts=levels, generator=g)  # fmt: skip
    opt.zero_grad()
    loss.backward()
    opt.step()
edm_exact = GaussianConsistencyFunction(gauss_mean, gauss_cov, EDM)
x_hi = gauss_mean + 80.0 * torch.randn(N, 2, generator=seed(11), dtype=F64)
t_hi = torch.full((N,), 80.0, dtype=F64)
with torch.no_grad():
    cd_err = float((cm(x_hi, t_hi).x0 - edm_exact(x_hi, t_hi).x0).pow(2).mean().sqrt())
    chain = edm_sampler(edm_teacher, x_hi, levels.flip(0), schedule=EDM)
    chain_err = float((chain - edm_exact(x_hi, t_hi).x0).pow(2).mean().sqrt())
    mean_err = float((edm_teacher(x_hi, t_hi).x0 - edm_exact(x_hi, t_hi).x0).pow(2).mean().sqrt())
RESULTS["cd_err_at_t_max"], RESULTS["heun_chain_err_at_t_max"] = cd_err, chain_err
print(f"at sigma = 80: CD model vs exact f {cd_err:.3f}; the teacher's 11 Heun steps "
      f"{chain_err:.3f}; the posterior mean {mean_err:.3f}")  # fmt: skip
assert cd_err < chain_err + 0.03 and cd_err < mean_err / 4

# %% [markdown]
# The distilled model is as good as the teacher's own chain of Heun steps on its 12 levels
# (that chain is its fixed point), about ten times closer to the true map than the posterior
# mean, in one evaluation instead of 21.
#
# ## Summary
#
# * Few-step ODE solving fails because $\hat x_0$ moves along the trajectory: one long step
#   commits to the first, blurry guess.
# * Progressive distillation halves the steps per round; its target $\tilde x$ is the $x_0$
#   that makes one DDIM step equal two of the teacher's.
# * A consistency model learns the trajectory's end point; the boundary condition
#   $f(x, t_\min) = x$ is built into the parameterisation, and distillation against the
#   teacher's Heun steps reaches the teacher's discretised map.
# * ECT tunes the same model on data, with a gap $t - r$ that halves every stage (`ect_gap`).
#
# ## Try this
#
# 1. How does the Heun chain's error at $\sigma = 80$ (the limit of consistency distillation)
#    fall as the number of levels grows from 12 to 24 and 48?
# 2. How much does ECT's gap $t - r$ at $t = 80$ shrink from one stage to the next?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    errs = []
    for n_levels in (12, 24, 48):
        lv = karras_levels(EDM, n_levels)
        ch = edm_sampler(edm_teacher, x_hi[:500], lv.flip(0), schedule=EDM)
        errs.append(float((ch - edm_exact(x_hi[:500], t_hi[:500]).x0).pow(2).mean().sqrt()))
    RESULTS["answer_chain_err_12"], RESULTS["answer_chain_err_48"] = errs[0], errs[-1]
    print("1. Heun chain error at sigma = 80:", ", ".join(f"{e:.4f}" for e in errs))
    assert errs[0] > errs[1] > errs[2]
    t80 = torch.tensor([80.0], dtype=F64)
    gaps = [float(t80 - ect_gap(t80, k)) for k in range(4)]
    RESULTS["answer_ect_gap_ratio"] = gaps[1] / gaps[2]
    print("2. ECT gap at t = 80 by stage:", ", ".join(f"{v:.2f}" for v in gaps))
    assert abs(RESULTS["answer_ect_gap_ratio"] - 2) < 1e-9

# %%
torch.set_num_threads(THREADS)
print(f"{len(RESULTS)} checked numbers in RESULTS")
