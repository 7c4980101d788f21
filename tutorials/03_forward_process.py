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
# # 3. The forward process
#
# The forward process of a diffusion model [Sohl-Dickstein 2015; Ho 2020] destroys data step by
# step with a fixed Markov chain that adds a little Gaussian noise at each of $T$ steps:
#
# $$q(x_t \mid x_{t-1}) = \mathcal{N}\big(x_t;\ \sqrt{1 - \beta_t}\, x_{t-1},\ \beta_t I\big),
#   \qquad t = 1, \dots, T,$$
#
# i.e. $x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,z_t$ with $z_t \sim \mathcal{N}(0, I)$
# [Ho 2020, Eq. 2]. Composing the steps (sums of independent Gaussians, tutorial 1) gives the
# marginal in closed form [Ho 2020, Eq. 4]:
#
# $$q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big),
#   \qquad \alpha_t = 1 - \beta_t, \quad \bar\alpha_t = \prod_{s=1}^{t} \alpha_s,$$
#
# so $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ can be drawn in one shot.
#
# Three slips are common in tutorials and code; each one is shown to fail below:
#
# * the **variance** of $q(x_t \mid x_0)$ is $1 - \bar\alpha_t$; its square root
#   $\sqrt{1 - \bar\alpha_t}$ is the standard deviation, the factor in front of $\epsilon$;
# * the noise of one step is scaled by $\sqrt{\beta_t}$ (variance $\beta_t$), not by $\beta_t$;
# * $\bar\alpha_t$ is the product of the $\alpha_s$ **up to $t$**, not up to $T$.
#
# difflab: `DiscreteSchedule` holds $\beta_1..\beta_T$ and `alpha_bar` indexed as in the paper
# (`alpha_bar[0] = 1`, `alpha_bar[t]` $= \bar\alpha_t$); `q_step` is one step of the chain,
# `q_sample_iterative` runs it $t$ times and `q_sample` uses the closed form.

# %%
import math

import numpy as np
import torch
from _common import answers_wanted, data_dir, is_fast, out_path, pick, save
from PIL import Image, ImageDraw

from difflab import viz
from difflab.data.images import load_image_dataset, to_unit_range
from difflab.data.toy import sample_toy
from difflab.process import q_sample, q_step
from difflab.schedules import DiscreteSchedule

F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
sched = DiscreteSchedule.from_name("linear", T)

# %% [markdown]
# ## 1. $\bar\alpha_t$ is a product up to $t$
#
# `alpha_bar` is computed once with a cumulative product; here it is recomputed with an explicit
# loop for a few $t$. The "product up to $T$" slip would give the same number
# $\bar\alpha_T \approx 0$ at every step: pure noise from the first step on.

# %%
betas = sched.betas  # betas[t - 1] is beta_t
for t in (0, 1, 10, 250, 500, 1000):
    prod = 1.0
    for s in range(1, t + 1):
        prod *= 1.0 - float(betas[s - 1])
    assert abs(prod - float(sched.alpha_bar[t])) < 1e-12, t
    print(f"t = {t:4d}: alpha_bar_t = {prod:.6f}")
print(f"the product up to T instead would be {float(sched.alpha_bar[T]):.2e} at every t")
RESULTS["alpha_bar_T"] = float(sched.alpha_bar[T])

# %% [markdown]
# ## 2. An image, noised by the chain and by the closed form
#
# We use a drawn digit (or, in full mode with MNIST files at hand - `--data-dir`,
# `DIFFLAB_DATA_DIR` or `../shared/data` - a real one), scaled to $[-1, 1]$ as in
# [Ho 2020, Sec. 3.3]. The top strip is `q_sample` (closed form, one draw per $t$); the bottom
# strip is one run of the chain `q_step`, snapshotted at the same $t$. The two are different
# random draws from the same distributions.


# %%
def drawn_digit() -> torch.Tensor:
    """A hand-drawn '2' as a (1, 28, 28) float image in [-1, 1]."""
    img = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(img)
    draw.arc([30, 12, 82, 64], start=170, end=40, fill=255, width=11)
    draw.line([(76, 55), (30, 98)], fill=255, width=12)
    draw.line([(28, 96), (86, 96)], fill=255, width=11)
    small = np.asarray(img.resize((28, 28), Image.LANCZOS))
    return to_unit_range(torch.from_numpy(small.copy())[None])


def load_digit() -> tuple[torch.Tensor, str]:
    folder = None if is_fast() else data_dir()
    if folder is not None:
        try:
            mnist = load_image_dataset("mnist", data_dir=folder, train=False)
            index = int((mnist.labels == 2).nonzero()[0])
            return mnist[index][0], "MNIST test image"
        except (FileNotFoundError, ValueError):
            pass
    return drawn_digit(), "drawn digit"


x0_img, source = load_digit()
print(f"x0: {source}, shape {tuple(x0_img.shape)}, range [{x0_img.min():.1f}, {x0_img.max():.1f}]")
ts = [0, 25, 50, 100, 200, 400, 700, 1000]
labels = [f"t = {t}\n" + r"$\bar\alpha_t$" + f" = {float(sched.alpha_bar[t]):.3f}" for t in ts]

x0 = x0_img[None].to(F64)
closed_strip = [q_sample(x0, t, sched, generator=gen)[0] for t in ts]
x, chain_strip = x0, [x0[0]]
for t in range(1, T + 1):
    x = q_step(x, t, sched, generator=gen)
    if t in ts:
        chain_strip.append(x[0])
save(viz.forward_strip(closed_strip, labels), "03_forward_closed_form.png")
save(viz.forward_strip(chain_strip, labels), "03_forward_iterative.png")

# %% [markdown]
# ### The moments agree
#
# For a fixed $x_0$ the chain's output minus $\sqrt{\bar\alpha_t}\,x_0$ must be
# $\mathcal{N}(0, (1 - \bar\alpha_t) I)$. We run the chain on a batch of copies of the image
# and pool all pixels: the residual mean must be 0 and its variance $1 - \bar\alpha_t$, each
# within 4 standard errors. The same check on the two slips fails by a wide margin:
#
# * using $1 - \bar\alpha_t$ as the standard deviation (so the variance would be
#   $(1 - \bar\alpha_t)^2$), or using $\sqrt{1 - \bar\alpha_t}$ as the variance;
# * a chain whose noise is scaled by $\beta_t$: its variance stays below
#   $\sum_t \beta_t^2 \approx 0.13$ instead of reaching 1, so $x_T$ is not $\mathcal{N}(0, I)$.


# %%
def z_mean(r: torch.Tensor, mean: float) -> float:
    return float((r.mean() - mean) / (r.std() / math.sqrt(r.numel())))


def z_var(r: torch.Tensor, var: float) -> float:
    sq = (r - r.mean()) ** 2
    return float((sq.mean() - var) / (sq.std() / math.sqrt(r.numel())))


batch = pick(8, 256)
x0_batch = x0.expand(batch, -1, -1, -1)
check_ts = [1, 10, 100, 300, 1000]
x, x_bad = x0_batch, x0  # the slipped chain runs on one copy
z_means, z_vars, z_wrong_std, z_wrong_var = [], [], [], []
for t in range(1, T + 1):
    x = q_step(x, t, sched, generator=gen)
    beta = float(sched.betas[t - 1])
    x_bad = math.sqrt(1 - beta) * x_bad + beta * torch.randn(x0.shape, dtype=F64, generator=gen)
    if t in check_ts:
        ab = float(sched.alpha_bar[t])
        resid = x - math.sqrt(ab) * x0_batch
        z_means.append(z_mean(resid, 0.0))
        z_vars.append(z_var(resid, 1 - ab))
        z_wrong_std.append(z_var(resid, (1 - ab) ** 2))
        z_wrong_var.append(z_var(resid, math.sqrt(1 - ab)))
        print(
            f"t = {t:4d}: residual variance {float(resid.var()):.5f}, 1 - alpha_bar = {1 - ab:.5f}"
            f" (z = {z_vars[-1]:+.2f}); (1 - alpha_bar)^2 = {(1 - ab) ** 2:.5f},"
            f" sqrt(1 - alpha_bar) = {math.sqrt(1 - ab):.5f}"
        )
RESULTS["image_chain_mean_max_abs_z"] = float(np.abs(z_means).max())
RESULTS["image_chain_var_max_abs_z"] = float(np.abs(z_vars).max())
# t = 1000: 1 - alpha_bar ~ 1, so the slips only show at smaller t; take the largest z
RESULTS["slip_std_as_variance_max_abs_z"] = float(np.abs(z_wrong_std).max())
RESULTS["slip_sqrt_as_variance_max_abs_z"] = float(np.abs(z_wrong_var).max())
RESULTS["slip_beta_noise_var_at_T"] = float(x_bad.var())
RESULTS["beta_squared_sum"] = float((sched.betas**2).sum())
print(f"chain with beta_t-scaled noise: Var[x_T] = {RESULTS['slip_beta_noise_var_at_T']:.4f}")
assert RESULTS["image_chain_mean_max_abs_z"] < 4 and RESULTS["image_chain_var_max_abs_z"] < 4
assert RESULTS["slip_std_as_variance_max_abs_z"] > 20
assert RESULTS["slip_sqrt_as_variance_max_abs_z"] > 20
assert RESULTS["slip_beta_noise_var_at_T"] < RESULTS["beta_squared_sum"] < 0.2

# %% [markdown]
# ## 3. Two-dimensional data
#
# On the swiss roll (`difflab.data.toy.sample_toy`) the same two routes give the same clouds:
# the structure fades, and by $t = T$ both are $\mathcal{N}(0, I)$. The covariance of $x_t$ is
# $\bar\alpha_t\,\mathrm{Cov}[x_0] + (1 - \bar\alpha_t) I$. We compare the closed form and the
# chain at every column: the chain's residual must have mean 0 and covariance
# $(1 - \bar\alpha_t) I$ (each entry within 4 standard errors), and the per-coordinate variances
# of the two clouds must agree (a two-sample test).

# %%
n = pick(2000, 20_000)
x0_2d = sample_toy("swissroll", n, generator=gen).to(F64)
cols = [0, 50, 100, 200, 400, 1000]
closed_rows, chain_rows = [], []
x = x0_2d
z_resid, z_two_sample = [], []
for t in range(0, T + 1):
    if t > 0:
        x = q_step(x, t, sched, generator=gen)
    if t not in cols:
        continue
    xc = q_sample(x0_2d, t, sched, generator=gen)
    closed_rows.append(xc)
    chain_rows.append(x)
    if t == 0:
        continue
    ab = float(sched.alpha_bar[t])
    resid = x - math.sqrt(ab) * x0_2d
    for i in range(2):
        z_resid.append(z_mean(resid[:, i], 0.0))
        for j in range(2):
            prod = resid[:, i] * resid[:, j]
            target = (1 - ab) if i == j else 0.0
            z_resid.append(float((prod.mean() - target) / (prod.std() / math.sqrt(n))))
        # two-sample: variance of coordinate i, closed form vs chain
        sq_c, sq_k = (xc[:, i] - xc[:, i].mean()) ** 2, (x[:, i] - x[:, i].mean()) ** 2
        se = math.sqrt(float(sq_c.var() + sq_k.var()) / n)
        z_two_sample.append(float(sq_c.mean() - sq_k.mean()) / se)
    cov_pred = ab * torch.cov(x0_2d.T) + (1 - ab) * torch.eye(2, dtype=F64)
    print(
        f"t = {t:4d}: Cov[x_t] chain {torch.cov(x.T).numpy().round(3).tolist()}, "
        f"predicted {cov_pred.numpy().round(3).tolist()}"
    )
RESULTS["toy_chain_residual_max_abs_z"] = float(np.abs(z_resid).max())
RESULTS["toy_closed_vs_chain_var_max_abs_z"] = float(np.abs(z_two_sample).max())
assert RESULTS["toy_chain_residual_max_abs_z"] < 4.5  # 30 checks: allow the largest 4.5 SE
assert RESULTS["toy_closed_vs_chain_var_max_abs_z"] < 4

col_labels = [f"t = {t}" for t in cols]
fig = viz.scatter_grid(
    [closed_rows, chain_rows],
    [r"closed form $q(x_t \mid x_0)$", r"chain of $q(x_t \mid x_{t-1})$"],
    col_labels,
    lim=3.5,
    s=1.5,
)
save(fig, "03_forward_swissroll.png")

# %% [markdown]
# ## 4. Noise schedules
#
# The schedule decides how fast the signal fades. Three common choices (`make_betas`):
#
# * **linear** [Ho 2020]: $\beta_t$ linear from $10^{-4}$ to $0.02$;
# * **cosine** [Nichol & Dhariwal 2021, Eq. 17]: $\bar\alpha_t = f(t)/f(0)$,
#   $f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\cdot\tfrac{\pi}{2}\big)$, $s = 0.008$, with
#   $\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1}$ clipped at $0.999$;
# * **sigmoid**: $\beta_t$ follows a sigmoid between the same end points as linear.
#
# The most telling curve is the log signal-to-noise ratio
# $\lambda_t = \log\big(\bar\alpha_t / (1 - \bar\alpha_t)\big)$: the linear schedule drives it
# down quickly, so much of the chain is spent on almost pure noise, while the cosine schedule
# decreases it nearly linearly in $t$ over most of the range. We check, for every schedule, that
# `alpha_bar` is the running product of $1 - \beta_t$, that `logsnr` is
# $\log(\bar\alpha_t / (1 - \bar\alpha_t))$, that the cosine $\bar\alpha_t$ is Nichol and
# Dhariwal's $f(t)/f(0)$ wherever $\beta_t$ was not clipped, and that the cosine schedule
# reaches $\bar\alpha_t = 1/2$ (log-SNR 0) later than the linear one.

# %%
t_grid = torch.arange(T + 1, dtype=F64)
curves = {}
for name in ("linear", "cosine", "sigmoid"):
    sc = DiscreteSchedule.from_name(name, T)
    ab = sc.alpha_bar
    assert float(ab[0]) == 1.0
    assert torch.allclose(ab[1:], torch.cumprod(1 - sc.betas, 0), rtol=1e-12, atol=0)
    lam = sc.logsnr(t_grid)
    assert torch.allclose(lam[1:], torch.log(ab[1:] / (1 - ab[1:])), rtol=1e-9, atol=1e-9)
    RESULTS[f"t_half_{name}"] = float(sc.t_from_logsnr(0.0))  # where alpha_bar = 1/2
    RESULTS[f"alpha_bar_T_{name}"] = float(ab[T])
    beta = torch.cat([torch.full((1,), float("nan"), dtype=F64), sc.betas])  # no beta_0
    curves[name] = {"t": t_grid, "beta": beta, "alpha_bar": ab, "logsnr": lam}
    print(
        f"{name:8s}: alpha_bar_T = {float(ab[T]):.2e}, alpha_bar = 1/2 at t = "
        f"{RESULTS[f't_half_{name}']:.1f}, beta range [{float(sc.betas.min()):.1e}, "
        f"{float(sc.betas.max()):.3f}]"
    )

cos = DiscreteSchedule.from_name("cosine", T)
s_off = 0.008
f = torch.cos((t_grid / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
unclipped = int((cos.betas < 0.999).sum())  # steps 1..unclipped are not clipped
RESULTS["cosine_vs_eq17_max_abs"] = float((cos.alpha_bar - f / f[0])[: unclipped + 1].abs().max())
assert RESULTS["cosine_vs_eq17_max_abs"] < 1e-12
assert RESULTS["t_half_cosine"] > RESULTS["t_half_linear"]
assert all(RESULTS[f"alpha_bar_T_{k}"] < 1e-3 for k in ("linear", "cosine", "sigmoid"))

save(viz.plot_schedules(curves), "03_schedules.png")

# %% [markdown]
# ## Summary
#
# * The forward process adds Gaussian noise step by step; because variances add,
#   $q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\,x_0, (1 - \bar\alpha_t) I)$ in one draw,
#   and the chain and the closed form agree in distribution (checked by their moments).
# * The usual slips (the standard deviation used as a variance, $\alpha$ instead of
#   $\bar\alpha$) are not small: their z-scores are in the tens or hundreds.
# * The schedule decides how fast the log-SNR falls; the cosine schedule reaches
#   $\bar\alpha_t = 1/2$ much later than the linear one and spends fewer steps on pure noise.
#
# ## Try this
#
# 1. Find the first integer step $t$ at which the linear schedule has $\bar\alpha_t \le 1/2$,
#    from a running product of $1 - \beta_t$ that you write yourself.
# 2. Evaluate Nichol and Dhariwal's $f(t)/f(0)$ at $t = T/2$ and compare with the cosine
#    schedule's $\bar\alpha_{T/2}$.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    betas_lin = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    running = torch.cumprod(1 - betas_lin, 0)  # alpha_bar_1 .. alpha_bar_T
    t_first = int((running <= 0.5).nonzero()[0]) + 1
    RESULTS["answer_first_t_half_linear"] = float(t_first)
    print(f"1. alpha_bar_t <= 1/2 from t = {t_first} on "
          f"(difflab's continuous t_half = {RESULTS['t_half_linear']:.2f})")  # fmt: skip
    assert t_first - 1 <= RESULTS["t_half_linear"] <= t_first
    s_off = 0.008
    f_half = math.cos((0.5 + s_off) / (1 + s_off) * math.pi / 2) ** 2
    f_zero = math.cos(s_off / (1 + s_off) * math.pi / 2) ** 2
    cos_ab = float(DiscreteSchedule.from_name("cosine", T).alpha_bar[T // 2])
    RESULTS["answer_cosine_half_err"] = abs(f_half / f_zero - cos_ab)
    print(f"2. f(T/2) / f(0) = {f_half / f_zero:.6f}, cosine alpha_bar_(T/2) = {cos_ab:.6f}")
    assert RESULTS["answer_cosine_half_err"] < 1e-12

# %%
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
