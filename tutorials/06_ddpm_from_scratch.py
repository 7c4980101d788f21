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
# # 6. DDPM from scratch on digits
#
# *Denoising Diffusion Probabilistic Models* [Ho 2020] trains a network
# $\epsilon_\theta(x_t, t)$ to predict the noise in $x_t = \sqrt{\bar\alpha_t}\,x_0 +
# \sqrt{1 - \bar\alpha_t}\,\epsilon$ (tutorial 4 showed why this is the bound up to a weight),
# and samples by running the reverse chain. The paper fits both procedures in a few lines:
#
# **Algorithm 1 (training).** Repeat until converged: draw $x_0 \sim q(x_0)$,
# $t \sim \mathrm{Uniform}\{1, \dots, T\}$ and $\epsilon \sim \mathcal{N}(0, I)$; take a
# gradient step on
# $\lVert \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon,
# \ t) \rVert^2$.
#
# **Algorithm 2 (sampling).** Draw $x_T \sim \mathcal{N}(0, I)$. For $t = T, \dots, 1$: draw
# $z \sim \mathcal{N}(0, I)$ if $t > 1$, else $z = 0$, and set
#
# $$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{1 - \alpha_t}{\sqrt{1 - \bar\alpha_t}}\,
#   \epsilon_\theta(x_t, t)\Big) + \sigma_t z .$$
#
# This tutorial writes both out by hand, with a network of twenty lines, on digits; then does
# the same with difflab (its U-Net, `Trainer` and samplers) and explains what differs and why.
# The check that ties the two halves together: **difflab's `ddpm` sampler and the hand-written
# Algorithm 2 give the same samples** for the same network and the same noise.
#
# Data: in fast mode (`DIFFLAB_FAST=1`) small synthetic seven-segment digits of 16 x 16 pixels
# (`_common.digit_like_images`), and $T = 100$; in full mode MNIST (28 x 28) when
# `--data-dir`, `DIFFLAB_DATA_DIR` or `../shared/data` holds it, and $T = 1000$ as in the paper.

# %%
import copy
import math

import torch
import torch.nn.functional as F
from _common import (
    answers_wanted,
    grid_panels,
    is_fast,
    load_digits,
    new_figure,
    out_path,
    pick,
    save,
    use_threads,
)
from torch import nn

from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser, x0_from_eps
from difflab.samplers import nfe, sample
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer
from difflab.viz import make_grid

F64 = torch.float64
THREADS = use_threads(pick(1, torch.get_num_threads()))  # fast mode: small convolutions
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)  # initial weights


n_val = pick(128, 512)
data, val_x0, source = load_digits(n_val, generator=gen)
N, C, H, W = data.shape
T = pick(100, 1000)
print(f"{N} training images of {source}, {C}x{H}x{W}; T = {T}")

# %% [markdown]
# ## 1. The schedule, by hand
#
# DDPM's linear schedule: $\beta_t$ from $10^{-4}$ to $0.02$ over $T = 1000$ steps
# [Ho 2020, Sec. 4]; for other $T$ both ends are multiplied by $1000 / T$, which keeps
# $\bar\alpha_T$ about the same [Nichol & Dhariwal 2021]. Then $\alpha_t = 1 - \beta_t$ and
# $\bar\alpha_t = \prod_{s \le t} \alpha_s$, with $\bar\alpha_0 = 1$ at index 0 so that the
# arrays are indexed by the paper's $t$. They must equal difflab's `DiscreteSchedule`.

# %%
betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=F64)  # betas[t - 1] = beta_t
alphas = 1 - betas
alpha_bar = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(alphas, 0)])  # alpha_bar[t]
beta_tilde = (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * betas  # Eq. (7) [Ho 2020]

sched = DiscreteSchedule.from_name("linear", T)
RESULTS["schedule_vs_library_max_abs"] = max(
    float((betas - sched.betas).abs().max()), float((alpha_bar - sched.alpha_bar).abs().max())
)
assert RESULTS["schedule_vs_library_max_abs"] < 1e-15
print(f"alpha_bar_T = {float(alpha_bar[T]):.2e}")

# %% [markdown]
# ## 2. A network in twenty lines
#
# $\epsilon_\theta$ must know the noise level: the same image needs a tiny correction at
# $t = 1$ and a complete redraw at $t = T$. The network embeds $t$ with sines and cosines of
# geometric frequencies (the Transformer position encoding that DDPM uses), maps the
# embedding to one bias per channel and adds it after two of its convolutions. Otherwise it
# is a minimal U-Net: one level down and up, and a skip connection at full resolution.


# %%
class TinyEpsNet(nn.Module):
    """eps_theta(x_t, t): x (B, 1, H, W), t (B,) -> (B, 1, H, W); H and W even."""

    def __init__(self, ch: int = 32, n_freq: int = 16) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.t_mlp = nn.Sequential(nn.Linear(2 * n_freq, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(ch, ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        k = torch.arange(self.n_freq, dtype=x.dtype, device=x.device)
        angle = t.to(x.dtype)[:, None] * torch.exp(-math.log(1000.0) * k / self.n_freq)
        emb = self.t_mlp(torch.cat([angle.sin(), angle.cos()], 1))[:, :, None, None]
        h1 = F.silu(self.inp(x) + emb)  # full resolution, knows t
        h2 = F.silu(self.mid(F.silu(self.down(h1))) + emb)  # half resolution, knows t
        return self.out(torch.cat([h1, F.silu(self.up(h2))], 1))  # skip connection


net = TinyEpsNet(ch=pick(16, 32))
print(f"TinyEpsNet: {sum(p.numel() for p in net.parameters())} parameters")

# %% [markdown]
# ## 3. Algorithm 1, by hand
#
# A held-out set of (image, $t$, $\epsilon$) triples, fixed once, measures progress without
# sampling noise: the same $x_t$ are scored before and after training.

# %%
val_t = torch.randint(1, T + 1, (n_val,), generator=gen)
val_eps = torch.randn(val_x0.shape, generator=gen)
val_xt = (
    alpha_bar[val_t].sqrt().float()[:, None, None, None] * val_x0
    + (1 - alpha_bar[val_t]).sqrt().float()[:, None, None, None] * val_eps
)


@torch.no_grad()
def heldout_loss(eps_fn, t_in: torch.Tensor = val_t) -> float:
    """Mean of (eps - eps_hat)^2 on the held-out triples; eps_fn(x_t, t) -> eps_hat.

    ``t_in`` is the time the network is told (the x_t were made with ``val_t``).
    """
    return float(((eps_fn(val_xt, t_in.float()) - val_eps) ** 2).mean())


@torch.no_grad()
def eps_mse_at(eps_fn, t: int) -> float:
    """Held-out eps-MSE with every held-out image noised to the same step t."""
    ab = float(alpha_bar[t])
    xt = math.sqrt(ab) * val_x0 + math.sqrt(1 - ab) * val_eps
    return float(((eps_fn(xt, torch.full((n_val,), float(t))) - val_eps) ** 2).mean())


steps, batch = pick(200, 1500), 32
opt = torch.optim.Adam(net.parameters(), lr=pick(3e-3, 1e-3))
RESULTS["scratch_heldout_before"] = heldout_loss(net)
scratch_losses = []
for _ in range(steps):
    x0 = data[torch.randint(0, N, (batch,), generator=gen)]  # x0 ~ q(x0)
    t = torch.randint(1, T + 1, (batch,), generator=gen)  # t ~ Uniform({1, ..., T})
    eps = torch.randn(x0.shape, generator=gen)  # eps ~ N(0, I)
    ab = alpha_bar[t].float()[:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Eq. (4) [Ho 2020]
    loss = ((eps - net(xt, t.float())) ** 2).mean()  # Eq. (14) [Ho 2020]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    scratch_losses.append(loss.item())
net.eval()
RESULTS["scratch_heldout_after"] = heldout_loss(net)
print(
    f"held-out eps-MSE: {RESULTS['scratch_heldout_before']:.3f} before, "
    f"{RESULTS['scratch_heldout_after']:.3f} after {steps} steps"
)
assert RESULTS["scratch_heldout_after"] < 0.6 * RESULTS["scratch_heldout_before"]

# %% [markdown]
# The network does use $t$: told the wrong noise level (every $t$ replaced by $T/2$), its
# held-out error rises.

# %%
RESULTS["scratch_heldout_wrong_t"] = heldout_loss(net, torch.full_like(val_t, T // 2))
print(f"held-out eps-MSE with t = T/2 everywhere: {RESULTS['scratch_heldout_wrong_t']:.3f}")
assert RESULTS["scratch_heldout_wrong_t"] > 1.2 * RESULTS["scratch_heldout_after"]

# %% [markdown]
# ## 4. Algorithm 2, by hand
#
# Ho et al. try two variances: $\sigma_t^2 = \beta_t$ and
# $\sigma_t^2 = \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\beta_t$
# (Sec. 3.2), the "large" and "small" choices of tutorial 4. The loop follows the algorithm
# line by line; the noise $z$ is drawn after the network call, from the generator passed in.


# %%
@torch.no_grad()
def algorithm2(eps_model, n: int, *, variance: str, generator: torch.Generator, dtype=F64):
    x = torch.randn((n, C, H, W), generator=generator, dtype=dtype)  # x_T ~ N(0, I)
    for t in range(T, 0, -1):
        eps_hat = eps_model(x, torch.full((n,), float(t), dtype=dtype))
        a, ab = float(alphas[t - 1]), float(alpha_bar[t])
        mean = (x - (1 - a) / math.sqrt(1 - ab) * eps_hat) / math.sqrt(a)  # Alg. 2, line 4
        if t > 1:
            var = float(betas[t - 1] if variance == "large" else beta_tilde[t - 1])
            z = torch.randn((n, C, H, W), generator=generator, dtype=dtype)
            x = mean + math.sqrt(var) * z
        else:
            x = mean  # z = 0 on the last step
    return x


# %% [markdown]
# ## 5. The same sampler in difflab: identical samples
#
# In difflab the network becomes a *denoiser* (`ModelDenoiser`, parameterization `"eps"`),
# which converts $\hat\epsilon$ into $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\hat\epsilon) /
# \sqrt{\bar\alpha_t}$; the `ddpm` sampler then samples the posterior
# $q(x_{t-1} \mid x_t, \hat x_0)$ of Eq. 7 with the chosen variance. Its mean
# $\tilde\mu_t(x_t, \hat x_0)$ is algebraically the same as line 4 of Algorithm 2, and the
# sampler draws its noise in the same order, so with the same network and the same seed the
# two loops must return the same samples, up to floating-point rounding (we run both in float64
# to make that rounding tiny). Pairing the variances the wrong way round makes them differ by
# a wide margin, so the check can fail.

# %%
net64 = copy.deepcopy(net).double()
denoiser64 = ModelDenoiser(net64, sched, parameterization="eps")
n_check = pick(8, 4)
ours, theirs = {}, {}
for variance in ("large", "small"):
    ours[variance] = algorithm2(
        net64, n_check, variance=variance, generator=torch.Generator().manual_seed(7)
    )
    theirs[variance] = sample(
        denoiser64, sched, (n_check, C, H, W), sampler="ddpm", steps=T, spacing="trailing",
        variance=variance, generator=torch.Generator().manual_seed(7), dtype=F64,
    )  # fmt: skip
    RESULTS[f"alg2_vs_difflab_{variance}_max_abs"] = float(
        (ours[variance] - theirs[variance]).abs().max()
    )
    print(f"{variance}: max |Alg. 2 by hand - difflab ddpm| = "
          f"{RESULTS[f'alg2_vs_difflab_{variance}_max_abs']:.2e}")  # fmt: skip
    assert RESULTS[f"alg2_vs_difflab_{variance}_max_abs"] < 1e-9
wrong_pairing = ours["large"] - theirs["small"]
RESULTS["alg2_large_vs_difflab_small_max_abs"] = float(wrong_pairing.abs().max())
assert RESULTS["alg2_large_vs_difflab_small_max_abs"] > 1e-2

scratch_samples = algorithm2(
    net, 64, variance="large", generator=torch.Generator().manual_seed(1), dtype=torch.float32
)

# %% [markdown]
# ## 6. The same with difflab: U-Net, `Trainer`, samplers
#
# * **network**: `build_unet(...)`, the DDPM / Improved-DDPM U-Net (residual blocks with
#   GroupNorm, the time embedding injected into every block as a scale and shift, optional
#   self-attention, skip connections at every resolution, last layers initialised at zero so a
#   fresh network predicts $\hat\epsilon = 0$: its held-out error is exactly the mean of
#   $\epsilon^2$, about 1);
# * **loss**: `diffusion_loss(denoiser, x0)`, Algorithm 1 (for the `eps` parameterization with
#   uniform weighting it is exactly the loss above);
# * **loop**: `Trainer` adds AdamW, learning-rate warm-up, gradient clipping, an exponential
#   moving average (EMA) of the weights with its decay given as a half-life in images, and
#   per-step random generators, so a resumed run repeats the uninterrupted one bit for bit;
# * **sampling**: any sampler by name; `ddim` with 20-50 steps instead of $T$ ancestral steps
#   (tutorial 8), with the EMA weights.

# %%
if is_fast():  # a very small U-Net: 8 channels, two levels, no attention
    unet = build_unet("tiny", base_channels=8, norm_groups=4, attention_resolutions=())
else:
    unet = build_unet("mnist-cpu", image_size=H)
denoiser = ModelDenoiser(unet, sched, parameterization="eps")
unet_batch = 32


def batch_fn(step: int, g: torch.Generator) -> torch.Tensor:
    return data[torch.randint(0, N, (unet_batch,), generator=g)]


def loss_fn(x0: torch.Tensor, g: torch.Generator):
    out = diffusion_loss(denoiser, x0, generator=g)  # Algorithm 1
    return out.loss, {}


trainer = Trainer(
    denoiser, batch_fn=batch_fn, loss_fn=loss_fn, lr=pick(1e-2, 1e-3), batch_size=unet_batch,
    warmup_steps=pick(20, 200), grad_clip=1.0, ema_half_life_images=pick(200, 5_000), seed=0,
)  # fmt: skip
RESULTS["unet_heldout_before"] = heldout_loss(lambda x, t: denoiser(x, t).eps)
unet_losses = [float(trainer.train_step()["loss"]) for _ in range(pick(60, 600))]
ema = trainer.ema.model
RESULTS["unet_heldout_after"] = heldout_loss(lambda x, t: denoiser(x, t).eps)
RESULTS["unet_ema_heldout_after"] = heldout_loss(lambda x, t: ema(x, t).eps)
print(
    f"U-Net ({sum(p.numel() for p in unet.parameters())} parameters), held-out eps-MSE: "
    f"{RESULTS['unet_heldout_before']:.3f} before, {RESULTS['unet_heldout_after']:.3f} after "
    f"{trainer.step} steps (EMA weights: {RESULTS['unet_ema_heldout_after']:.3f})"
)
assert abs(RESULTS["unet_heldout_before"] - float((val_eps**2).mean())) < 1e-6  # zero init
assert RESULTS["unet_heldout_after"] < 0.8 * RESULTS["unet_heldout_before"]


# %% [markdown]
# ## 7. Sampling the U-Net: clip $\hat x_0$ to the data range
#
# With the $\epsilon$ parameterisation the denoiser's clean image is [Ho 2020, Eq. 15]
#
# $$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}},
#   \qquad\text{so an error } \delta \text{ in } \hat\epsilon \text{ moves } \hat x_0
#   \text{ by } -\sqrt{\frac{1 - \bar\alpha_t}{\bar\alpha_t}}\;\delta
#   = -\frac{\delta}{\sqrt{\mathrm{SNR}_t}} .$$
#
# Near $t = T$ the factor $1/\sqrt{\mathrm{SNR}_T}$ is large: about 157 for $T = 1000$ and
# about 220 for the $T = 100$ of fast mode (both printed below, from $\bar\alpha_T$). This is
# tutorial 7's weighting seen from the sampler's side: $L_\text{simple}$, the unweighted
# $\epsilon$-loss, is the $x_0$-loss weighted by $\mathrm{SNR}_t$, only
# $1/220^2 \approx 2 \cdot 10^{-5}$ at $t = T$; training hardly penalises a wrong $\hat x_0$
# at high noise, and a briefly trained network predicts $\hat x_0$ far outside the data range
# $[-1, 1]$ there. A deterministic sampler starts from that $\hat x_0$
# ($x_s = \alpha_s \hat x_0 + \sigma_s \hat\epsilon$) and its samples come out saturated.
#
# Ho et al.'s reference sampler clips $\hat x_0$ to $[-1, 1]$ at every step. In difflab this
# is `sample(..., threshold="clip")`: the denoiser is wrapped in `ThresholdedDenoiser`, which
# clamps $\hat x_0$ and recomputes $\hat\epsilon = (x_t - \alpha_t \hat x_0) / \sigma_t$, so
# each step stays consistent with $x_t$. The checks: the factor, by perturbing $\hat\epsilon$
# in difflab's conversion; the trained U-Net's held-out $x_0$-error at $t = T$ is exactly the
# factor squared times its $\epsilon$-error (in fast mode a small $\epsilon$-MSE becomes an
# $x_0$-MSE over a hundred times the data variance, which predicting the data mean would give);
# DDIM without clipping sees most pixels of $\hat x_0$ out of range at its first step and ends far
# out of range (saturated black and white squares once displayed); with clipping it ends inside
# the range and nearer the data's pixel statistics (mean, spread, share of dark pixels).

# %%
amplification = math.sqrt((1 - float(alpha_bar[T])) / float(alpha_bar[T]))  # 1 / sqrt(SNR_T)
a_T, s_T = sched.alpha_sigma(torch.tensor(float(T), dtype=F64))
xt64, eps64 = val_xt.double(), val_eps.double()
# +-1e-3, random signs: a delta near 0 would leave the ratio to rounding (x0_hat is ~100s)
delta = 1e-3 * torch.randn(val_xt.shape, generator=gen, dtype=F64).sign()
moved = x0_from_eps(xt64, eps64 + delta, a_T, s_T) - x0_from_eps(xt64, eps64, a_T, s_T)
RESULTS["x0_hat_amplification_at_T"] = amplification
RESULTS["x0_hat_amplification_rel_err"] = float((moved / -delta / amplification - 1).abs().max())
amp_by_T = {n: math.sqrt(1 / float(DiscreteSchedule.from_name("linear", n).alpha_bar[n]) - 1)
            for n in (100, 1000)}  # fmt: skip
print(f"1 / sqrt(SNR_T) = {amp_by_T[100]:.0f} for T = 100, {amp_by_T[1000]:.0f} for T = 1000")
assert round(amp_by_T[100]) in range(215, 226) and round(amp_by_T[1000]) == 157  # as in the text
assert RESULTS["x0_hat_amplification_rel_err"] < 1e-8

# the trained U-Net at t = T: x0 error = amplification^2 * eps error, image by image
xT_val = float(alpha_bar[T]) ** 0.5 * val_x0 + (1 - float(alpha_bar[T])) ** 0.5 * val_eps
with torch.no_grad():
    pred_T = ema(xT_val, torch.full((n_val,), float(T)))
eps_err_T = float(((pred_T.eps - val_eps) ** 2).mean())
x0_err_T = float(((pred_T.x0 - val_x0) ** 2).mean())
RESULTS["x0_err_over_eps_err_at_T_rel"] = abs(x0_err_T / (amplification**2 * eps_err_T) - 1)
print(f"held-out at t = T: eps-MSE {eps_err_T:.4f}, x0-MSE {x0_err_T:.1f} "
      f"= {amplification:.0f}^2 x eps-MSE")  # fmt: skip
assert RESULTS["x0_err_over_eps_err_at_T_rel"] < 1e-4  # float32 rounding
RESULTS["x0_err_at_T_over_data_var"] = x0_err_T / float(val_x0.var())
if is_fast():  # a few seconds of training: far worse than predicting the data mean
    assert RESULTS["x0_err_at_T_over_data_var"] > 100

# the same prior noise, sampled without and with clipping; record x0-hat at every step
sampler_steps = {"ddim": pick(20, 50), "dpm++2m": pick(10, 20)}
out_of_range: list[tuple[float, float]] = []  # (t, fraction of |x0_hat| > 1), unclipped


def record(info: dict) -> None:
    out_of_range.append((info["t"], float((info["x0_hat"].abs() > 1).float().mean())))


clip_samples = {
    threshold: sample(
        ema,
        sched,
        (64, C, H, W),
        sampler="ddim",
        steps=sampler_steps["ddim"],
        generator=torch.Generator().manual_seed(3),
        threshold=threshold,
        callback=record if threshold is None else None,
    )  # fmt: skip
    for threshold in (None, "clip")
}


def pixel_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation of the pixels, and the fraction of dark pixels."""
    return torch.stack([x.mean(), x.std(), (x < 0).float().mean()])


data_stats = pixel_stats(data[:1000])
for threshold, key in ((None, "unclipped"), ("clip", "clipped")):
    x = clip_samples[threshold]
    RESULTS[f"{key}_max_abs_pixel"] = float(x.abs().max())
    RESULTS[f"{key}_pixel_std"] = float(x.std())
    RESULTS[f"{key}_stats_distance"] = float((pixel_stats(x) - data_stats).abs().sum())
    print(f"{key:9s}: pixel std {float(x.std()):.2f} (data {float(data_stats[1]):.2f}), "
          f"max |x| {RESULTS[f'{key}_max_abs_pixel']:.1f}")  # fmt: skip
RESULTS["unclipped_first_step_out_of_range"] = out_of_range[0][1]
print(f"unclipped: x0-hat outside [-1, 1] at the first step (t = T): "
      f"{100 * out_of_range[0][1]:.0f}% of the pixels")  # fmt: skip
assert RESULTS["unclipped_first_step_out_of_range"] > 0.5
assert RESULTS["unclipped_max_abs_pixel"] > 1.5  # the unclipped samples leave the data range
assert RESULTS["clipped_max_abs_pixel"] <= 1 + 1e-6  # the last step returns a clipped x0-hat
assert RESULTS["clipped_stats_distance"] < RESULTS["unclipped_stats_distance"]

unet_samples = {"ddim": clip_samples["clip"]}
unet_samples["dpm++2m"] = sample(
    ema, sched, (64, C, H, W), sampler="dpm++2m", steps=sampler_steps["dpm++2m"],
    generator=torch.Generator().manual_seed(3), threshold="clip",
)  # fmt: skip

fig, axes = new_figure(1, 3, (12, 3.8))
for ax, (threshold, title) in zip(axes[0, :2], ((None, "unclipped"), ("clip", "clipped"))):
    grid = make_grid(clip_samples[threshold].clamp(-1, 1), nrow=8)[:, :, 0]
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"U-Net + EMA, ddim, {title}", fontsize=9)
    ax.set_axis_off()
ax = axes[0, 2]
ax.plot(*zip(*out_of_range), "o-", ms=3)
ax.set(xlabel="t (sampling goes right to left)", ylim=(0, 1.02))
ax.set_title(r"unclipped: fraction of pixels with $|\hat x_0| > 1$", fontsize=9)
ax.invert_xaxis()
save(fig, "06_clipping.png")

# %% [markdown]
# ## 8. What differs, and why
#
# * **Time conditioning.** Both networks see $t$ through a sinusoidal embedding and an MLP.
#   The U-Net feeds it into *every* residual block, as a per-channel scale and shift after
#   GroupNorm (Improved DDPM's "scale-shift norm"), so every layer can adapt to the noise
#   level; the twenty-line network only adds a bias twice.
# * **Architecture.** Residual blocks, normalisation and attention let the U-Net grow deep and
#   wide and still train stably; zero-initialised output layers make the fresh network the
#   constant $\hat\epsilon = 0$ (checked above: held-out error = mean of $\epsilon^2$),
#   so training starts from a sensible denoiser rather than from random outputs.
# * **EMA.** Samples are drawn with an exponential moving average of the weights. The loss is
#   noisy (random $t$ and $\epsilon$), so the weights jitter; their average is a better
#   denoiser late in training. Early on it can lag behind the raw weights, which is why the
#   half-life is set in images seen (`ema_half_life_images`): short for short runs.
# * **Sampler.** Algorithm 2 needs $T$ network calls. The network defines the denoiser at any
#   noise level, so deterministic ODE samplers (`ddim`, `dpm++2m`; tutorial 8) reach similar
#   quality with 20-50 calls.
# * **Engineering.** Warm-up and gradient clipping avoid early blow-ups at larger learning
#   rates; per-step generators make runs reproducible and resumable; the CLI
#   (`difflab train --preset mnist-eps`) adds checkpoints, logs and sample grids.

# %%
fig, axes = new_figure(1, 2, (10, 3.5))
ax = axes[0, 0]
ax.plot(scratch_losses, lw=0.6, alpha=0.6, label="TinyEpsNet (Alg. 1 by hand)")
ax.plot(unet_losses, lw=0.6, alpha=0.6, label="U-Net (diffusion_loss + Trainer)")
ax.set(xlabel="step", ylabel=r"$\|\epsilon - \hat\epsilon\|^2$ per pixel", yscale="log")
ax.legend(fontsize=8)
ax = axes[0, 1]
t_curve = torch.linspace(1, T, 12).round().long()
for name, fn in (("TinyEpsNet", net), ("U-Net (EMA)", lambda x, t: ema(x, t).eps)):
    errs = [eps_mse_at(fn, int(t)) for t in t_curve]
    ax.plot(t_curve.numpy(), errs, "o-", ms=3, label=name)
ax.set(xlabel="t (every held-out image at this t)", ylabel="held-out eps-MSE", yscale="log")
ax.legend(fontsize=8)
save(fig, "06_losses.png")

panels = [
    (data[:64], f"data ({source})"),
    (scratch_samples, f"TinyEpsNet, Alg. 2 ({T} NFE)"),
    *[
        (unet_samples[name], f"U-Net + EMA, {name}, clipped ({nfe(name, k)} NFE)")
        for name, k in sampler_steps.items()
    ],
]
panels = [(images.clamp(-1, 1), title) for images, title in panels]
grid_panels(panels, "06_samples.png", (3.3 * len(panels), 3.6))

# %% [markdown]
# ## Summary
#
# * DDPM training (Algorithm 1) is five lines: draw $x_0$, $t$ and $\epsilon$, form $x_t$ in
#   closed form, regress $\epsilon$. Sampling (Algorithm 2) runs the reverse chain for $T$ steps.
# * difflab's `ddpm` sampler is the same algorithm: with the same network and noise it returns
#   the same samples to float64 rounding.
# * The U-Net, `Trainer` (EMA, warm-up, clipping) and fast samplers are engineering around the
#   same two algorithms. An $\epsilon$-error at $t = T$ is amplified about 220 times (157 for
#   $T = 1000$) in $\hat x_0$, so samplers clip $\hat x_0$ to the data range.
# * In fast mode the networks train for seconds: the clipped U-Net samples have the data's grey
#   levels and stroke-like patches but are not digits yet; full mode on MNIST shows digit
#   strokes, and good samples take hours (`difflab train --preset mnist-eps`).
#
# ## Try this
#
# 1. How large is the amplification $\sqrt{(1 - \bar\alpha_t)/\bar\alpha_t}$ at $t = 1$ and at
#    $t = T/2$? Compare your numbers with difflab's `sched.edm_sigma(t)`, which computes the
#    same ratio $\sigma_t/\alpha_t$ from the log-SNR.
# 2. Sample the U-Net with `threshold="dynamic"` (Imagen's dynamic thresholding) instead of
#    `"clip"`. Do the samples stay in $[-1, 1]$?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    amp = {t: math.sqrt((1 - float(alpha_bar[t])) / float(alpha_bar[t])) for t in (1, T // 2)}
    RESULTS["answer_amplification_t1"] = amp[1]
    RESULTS["answer_amplification_vs_edm_sigma_max_rel"] = max(
        abs(amp[t] / float(sched.edm_sigma(float(t))) - 1) for t in amp
    )
    print(f"1. amplification {amp[1]:.3f} at t = 1 (errors shrink), {amp[T // 2]:.2f} at t = T/2")
    assert RESULTS["answer_amplification_vs_edm_sigma_max_rel"] < 1e-9 and amp[1] < 0.1
    dynamic = sample(
        ema, sched, (16, C, H, W), sampler="ddim", steps=sampler_steps["ddim"],
        generator=torch.Generator().manual_seed(3), threshold="dynamic",
    )  # fmt: skip
    RESULTS["answer_dynamic_max_abs_pixel"] = float(dynamic.abs().max())
    print(f"2. dynamic thresholding: max |x| = {RESULTS['answer_dynamic_max_abs_pixel']:.3f} "
          "(x0-hat is rescaled into [-1, 1], and the last DDIM step returns x0-hat)")  # fmt: skip
    assert RESULTS["answer_dynamic_max_abs_pixel"] <= 1 + 1e-6

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
