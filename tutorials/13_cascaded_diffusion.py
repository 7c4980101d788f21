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
# # 13. Cascaded diffusion and super-resolution
#
# *Cascaded Diffusion Models for High Fidelity Image Generation* [Ho 2021] generates a large
# image in stages: a **base model** samples a low-resolution image $y$, and one or more
# **super-resolution (SR) models** each sample a larger image $x$ given the smaller one,
#
# $$p_\theta(x) = \int p_\theta(x \mid y)\, p_\theta(y)\, dy .$$
#
# Each SR model is a conditional diffusion model in the style of SR3 [Saharia 2021]: the
# low-resolution image is upsampled to the target size and **concatenated** to $x_t$ as extra
# input channels, so the network sees $[x_t, \mathrm{up}(y)]$ and predicts the noise of $x_t$
# (SR3 upsamples bicubically; difflab bilinearly).
# It is trained on pairs made from the data alone: $x$ a training image, $y$ its downsampled
# version. Every stage is small and is trained on its own.
#
# The key ingredient of Ho 2021 is **conditioning augmentation** (Sec. 3.2, 4.2): at training
# time the SR model sees a *corrupted* $\mathrm{up}(y)$, here Gaussian noise of a random level
# $s$, and is told $s$. This tutorial checks that the augmented input has the moments of the
# forward process at level $s$, shows in closed form why the noise closes the gap between real
# low-resolution images and the base model's samples, trains a tiny base and SR model with
# difflab (`difflab.cascade`), super-resolves real low-resolution digits against bilinear
# upsampling, and samples the whole chain.
#
# Data: in fast mode (`DIFFLAB_FAST=1`) seven-segment digits of 16 x 16 pixels (base model at
# 8 x 8); in full mode MNIST (28 x 28, base at 14 x 14) when `--data-dir`,
# `DIFFLAB_DATA_DIR` or `../shared/data` holds it, else 28 x 28 seven-segment digits.

# %%
import math

import torch
from _common import (
    answers_wanted,
    grid_panels,
    is_fast,
    load_digits,
    new_figure,
    out_path,
    pca_frechet,
    pick,
    save,
    use_threads,
)

from difflab.cascade import (
    SRStage,
    Stage,
    augment_low_res,
    cascade_sample,
    downsample_images,
    sr_cond,
    sr_loss,
    super_resolve,
    upsample_images,
)
from difflab.likelihood import normal_kl
from difflab.nn.autoencoder import psnr
from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer

F64 = torch.float64
THREADS = use_threads(pick(1, torch.get_num_threads()))  # fast mode: small convolutions
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)  # initial weights


n_val = pick(128, 256)
data, val_x, source = load_digits(n_val, generator=gen)
N, C, H, W = data.shape
factor = 2
h, w = H // factor, W // factor
print(f"{N} training images of {source}, {C}x{H}x{W}; base model at {h}x{w}")

# %% [markdown]
# ## 1. Two resolutions and the bilinear baseline
#
# The base model's data are the training images at low resolution. `downsample_images`
# averages $f \times f$ blocks ($f = 2$ here), so a low-resolution pixel is the mean of the
# four high-resolution pixels it covers (checked against a reshape and mean). Going back up,
# `upsample_images` interpolates bilinearly; that is the input the SR model is conditioned on,
# and the baseline it must beat: bilinear interpolation cannot invent the detail that
# averaging removed, so the upsampled digits are blurred. Its PSNR against the true images
# (tutorial 12: $10 \log_{10} (2^2 / \mathrm{MSE})$ dB) is the number to improve on.

# %%
low = downsample_images(data, factor)
val_y = downsample_images(val_x, factor)
blocks = val_x.reshape(n_val, C, h, factor, w, factor).mean(dim=(3, 5))
RESULTS["downsample_vs_block_mean_max_abs"] = float((val_y - blocks).abs().max())
assert RESULTS["downsample_vs_block_mean_max_abs"] < 1e-6
val_bilinear = upsample_images(val_y, factor)
RESULTS["bilinear_psnr_db"] = float(psnr(val_x, val_bilinear).mean())
RESULTS["bilinear_mse"] = float((val_bilinear - val_x).square().mean())
print(f"bilinear upsampling of held-out {h}x{w} images: PSNR {RESULTS['bilinear_psnr_db']:.1f} dB")

# %% [markdown]
# ## 2. Gaussian conditioning augmentation
#
# Ho 2021 (Sec. 3.2) corrupts the SR model's conditioning input during training. For Gaussian
# augmentation the corruption *is* the forward process of the model's own schedule, applied to
# the upsampled image:
#
# $$y_s = \alpha_s\, \mathrm{up}(y) + \sigma_s\, \epsilon, \qquad \epsilon \sim
#   \mathcal{N}(0, I), \qquad s \sim \mathcal{U}[0, s_\text{max}],$$
#
# with $\alpha_s^2 = \bar\alpha_s = \prod_{i \le s}(1 - \beta_i)$ and $\sigma_s^2 = 1 -
# \alpha_s^2$ (tutorial 3), and the level $s$ is given to the network as a second embedding
# next to $t$ (difflab's U-Net with `aug_level_embedding=True` adds an MLP of the sinusoidal
# features of $s$ to the time embedding). At sampling time one fixed level is used, chosen by
# a sweep over a few values (Sec. 7). `augment_low_res` computes $y_s$; `sr_cond` upsamples
# then augments and returns `{"image": y_s, "aug_level": s}`, the conditioning the U-Net takes.
#
# Where the noise goes differs between papers. Noising the *upsampled* image, as here, is the
# form of Imagen's noise conditioning augmentation [Saharia 2022]. CDM [Ho 2021, Sec. 4]
# corrupts the *low-resolution* image with the base model's forward process, in two variants:
# **non-truncated** (sample the base model to the end, then draw $z_s \sim q(z_s \mid z_0)$)
# and **truncated** (stop the base model's reverse process at step $s$ and hand its $z_s$ on:
# the same training, and $s$ fewer base steps); and it uses **Gaussian blur** rather than noise
# for its highest-resolution stage (64 to 256 pixels). Noise added before bilinear upsampling
# is spatially correlated and weaker per pixel; the idea is the same.
#
# The check: noising one upsampled image $n$ times at a level $s$, the per-pixel mean is
# $\alpha_s\,\mathrm{up}(y)$ and the variance $\sigma_s^2$, with $\alpha_s$ computed from the
# betas by hand. With $n$ draws the mean's standard error is $\sigma_s / \sqrt n$ and the
# variance's $\sigma_s^2 \sqrt{2/(n-1)}$; every pixel must lie within 5 standard errors.
# That is $2 \cdot 2 \cdot HW$ comparisons (two levels, mean and variance): with
# $P(|Z| > 5) = 5.7 \cdot 10^{-7}$ a false alarm has probability $1 - (1 - 5.7 \cdot
# 10^{-7})^{4HW}$, $6 \cdot 10^{-4}$ in fast mode ($16 \times 16$) and $1.8 \cdot 10^{-3}$ in
# full mode ($28 \times 28$), computed below.
#
# Which slips does it catch? Using $\bar\alpha_s$ where $\sqrt{\bar\alpha_s}$ belongs moves
# the mean by many standard errors at every pixel. The level $s - 1$ instead of $s$ is subtler:
# it changes $\sigma_s^2$ by $\bar\alpha_{s-1}\beta_s$, 3.6% at $s = 50$, which is only 1.6
# standard errors of one pixel's variance with $n = 4000$ (fast mode), so the per-pixel check
# misses it most of the time. Pooling helps: the pixels' noises are independent, so the mean
# of the $HW$ sample variances has standard error $\sigma_s^2 \sqrt{2/(n-1)} / \sqrt{HW}$, and
# the same slip is then about 26 standard errors away at $s = 50$ (checked on the same draws).
# At $s = 300$ one step changes $\sigma_s^2$ by only 0.4%, 0.2 standard errors of one pixel's
# variance: even pooled, fast mode's draws put the slip under 3 standard errors away, so it
# goes unseen there (full mode's larger $n$ and image move it to about 11).

# %%
sched = DiscreteSchedule.from_name("linear", 1000)
n_mc = pick(4000, 20_000)
p_beyond_5 = math.erfc(5 / math.sqrt(2))  # P(|Z| > 5) for a standard normal Z
RESULTS["aug_false_alarm_probability"] = 1 - (1 - p_beyond_5) ** (4 * H * W)
print(f"{4 * H * W} comparisons at 5 standard errors: false alarm probability "
      f"{RESULTS['aug_false_alarm_probability']:.1e}")  # fmt: skip
assert RESULTS["aug_false_alarm_probability"] < 2e-3
y_up = upsample_images(val_y[:1], factor).double()


def alpha_sigma_by_hand(level: int) -> tuple[float, float]:
    alpha_bar = float(torch.prod(1 - sched.betas[:level]))  # from the betas, t = 1 .. level
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


for level in (50, 300):
    alpha_s, sigma_s = alpha_sigma_by_hand(level)
    ys = augment_low_res(
        y_up.expand(n_mc, -1, -1, -1), float(level), schedule=sched,
        generator=torch.Generator().manual_seed(level),
    )  # fmt: skip
    mean_z = (ys.mean(0) - alpha_s * y_up[0]) / (sigma_s / math.sqrt(n_mc))
    var_z = (ys.var(0) - sigma_s**2) / (sigma_s**2 * math.sqrt(2 / (n_mc - 1)))
    RESULTS[f"aug_mean_max_abs_z_s{level}"] = float(mean_z.abs().max())
    RESULTS[f"aug_var_max_abs_z_s{level}"] = float(var_z.abs().max())
    worst = max(RESULTS[f"aug_mean_max_abs_z_s{level}"], RESULTS[f"aug_var_max_abs_z_s{level}"])
    # pooled over the H W independent pixels: the mean sample variance, and the slips
    pooled_se = sigma_s**2 * math.sqrt(2 / (n_mc - 1)) / math.sqrt(H * W)
    pooled = float(ys.var(0).mean())
    RESULTS[f"aug_pooled_var_z_s{level}"] = (pooled - sigma_s**2) / pooled_se
    RESULTS[f"aug_pooled_var_z_slip_s{level}"] = (
        pooled - alpha_sigma_by_hand(level - 1)[1] ** 2
    ) / pooled_se
    slip_mean_z = (ys.mean(0) - alpha_s**2 * y_up[0]) / (sigma_s / math.sqrt(n_mc))
    RESULTS[f"aug_mean_max_abs_z_slip_alpha_bar_s{level}"] = float(slip_mean_z.abs().max())
    print(f"s = {level}: alpha_s = {alpha_s:.3f}, sigma_s = {sigma_s:.3f}; per-pixel mean and "
          f"variance within {worst:.1f} standard errors, pooled variance z = "
          f"{RESULTS[f'aug_pooled_var_z_s{level}']:+.1f}; the slips: level s - 1 pooled z = "
          f"{RESULTS[f'aug_pooled_var_z_slip_s{level}']:+.1f}, alpha_bar for alpha "
          f"{RESULTS[f'aug_mean_max_abs_z_slip_alpha_bar_s{level}']:.0f}")  # fmt: skip
    assert worst < 5 and abs(RESULTS[f"aug_pooled_var_z_s{level}"]) < 5
    assert RESULTS[f"aug_mean_max_abs_z_slip_alpha_bar_s{level}"] > 5  # caught at every level
assert RESULTS["aug_pooled_var_z_slip_s50"] > 10  # level s - 1: caught by pooling at s = 50
# the slip s - 1 in numbers: the relative change of sigma_s^2, and it in one pixel's standard errors
for level in (50, 300):
    sig2, sig2_slip = (alpha_sigma_by_hand(v)[1] ** 2 for v in (level, level - 1))
    RESULTS[f"aug_slip_var_rel_change_s{level}"] = (sig2 - sig2_slip) / sig2
rel_50 = RESULTS["aug_slip_var_rel_change_s50"]
rel_se = math.sqrt(2 / (n_mc - 1))  # one pixel's variance: its relative standard error
print(f"level s - 1 lowers sigma_s^2 by {rel_50:.1%} at s = 50 ({rel_50 / rel_se:.1f}"
      f" standard errors of one pixel's variance), by "
      f"{RESULTS['aug_slip_var_rel_change_s300']:.2%} at s = 300")  # fmt: skip
assert 0.03 < rel_50 < 0.04 and 0.003 < RESULTS["aug_slip_var_rel_change_s300"] < 0.005
if is_fast():
    assert abs(RESULTS["aug_pooled_var_z_slip_s300"]) < 5  # at s = 300 the slip goes unseen

# %% [markdown]
# ## 3. Why it helps: the base model's images are not the training images
#
# The SR model is trained on $\mathrm{up}(y)$ of *real* low-resolution images, but in the
# cascade it receives the *base model's samples* $y'$, which carry their own artefacts (a
# slightly wrong stroke, noise, blur). Without augmentation the SR model has only ever seen
# exact real inputs, and errors of the base model compound: the SR stage treats the artefact as
# signal and sharpens it. With augmentation the SR model sees the conditioning only through
# $q(y_s \mid y) = \mathcal{N}(\alpha_s \mathrm{up}(y), \sigma_s^2 I)$, and two inputs that
# differ by $\Delta = \mathrm{up}(y') - \mathrm{up}(y)$ give distributions with
#
# $$\mathrm{KL}\big(q(y_s \mid y')\,\Vert\,q(y_s \mid y)\big)
#   = \frac{\alpha_s^2 \lVert \Delta \rVert^2}{2 \sigma_s^2}
#   = \tfrac12\, \mathrm{SNR}(s)\, \lVert \Delta \rVert^2 ,$$
#
# infinite at $s = 0$ and falling with $s$ in proportion to $\mathrm{SNR}(s)$. The KL bounds
# how well *any* test, the SR network included, can tell the two inputs apart: the
# augmentation divides the information the artefacts carry by the same factor at every
# level. It does not make them indistinguishable at the levels used: below (fast mode's
# numbers; full mode's $28 \times 28$ images carry more artefact and give larger ones), the KL
# for a small artefact falls from 317 nats at $s = 10$ to 5 nats at $s = 100$ (the level
# Sec. 6 samples at: the artefact is still visible to the model, as a likelihood ratio of
# about $e^5$) and under 0.1 nat only near $s = 500$. The price: large $s$ also hides real detail
# of $y$, and the SR model has to invent more. So the level is a trade-off, chosen at
# sampling time by a sweep (Sec. 7).
#
# The check: a held-out low-resolution digit and an "artefact" version of it (Gaussian noise
# of standard deviation 0.1 added to every low-resolution pixel), the KL by difflab's
# elementwise `normal_kl` against the closed form above, at levels from 10 to 500.

# %%
y_real = upsample_images(val_y[:1], factor).double()
y_artefact = upsample_images(val_y[:1] + 0.1 * torch.randn(val_y[:1].shape, generator=gen), factor)
delta_sq = float((y_artefact.double() - y_real).square().sum())
levels = [10, 25, 50, 100, 200, 500]
kls, kls_closed = [], []
for level in levels:
    a, s = (float(v) for v in sched.alpha_sigma(float(level)))
    logvar = torch.tensor(2 * math.log(s), dtype=F64)
    kls.append(float(normal_kl(a * y_artefact.double(), logvar, a * y_real, logvar).sum()))
    kls_closed.append(0.5 * float(sched.logsnr(float(level)).exp()) * delta_sq)
RESULTS["aug_kl_vs_closed_form_max_rel"] = max(abs(k / kc - 1) for k, kc in zip(kls, kls_closed))
assert RESULTS["aug_kl_vs_closed_form_max_rel"] < 1e-9
assert all(k1 > k2 for k1, k2 in zip(kls, kls[1:]))  # falls with the level
RESULTS["aug_kl_s100"] = kls[levels.index(100)]
print("KL(real || with artefacts) in nats: "
      + ", ".join(f"s = {lv}: {k:.3g}" for lv, k in zip(levels, kls)))  # fmt: skip
assert RESULTS["aug_kl_s100"] > 1  # at the level Sec. 6 samples at, the artefact still shows
if is_fast():  # the numbers quoted above
    assert 3 < RESULTS["aug_kl_s100"] < 8 and kls[levels.index(200)] > 0.1 > kls[-1]

# %% [markdown]
# ## 4. Training the two stages
#
# * **Base model**: an unconditional U-Net on the $h \times w$ images, trained with
#   `diffusion_loss` ($\epsilon$ prediction, tutorial 6).
# * **SR model**: a U-Net on the $H \times W$ images with one extra input channel for the
#   conditioning image (`cond_channels=1`, concatenated to $x_t$) and the level embedding
#   (`aug_level_embedding=True`), trained with `sr_loss`: downsample the batch, draw
#   $s \sim \mathcal{U}[0, s_\text{max}]$, form `sr_cond`, and take the diffusion loss of the
#   high-resolution images with that conditioning. It predicts $v$ (tutorial 7), a target
#   that stays well scaled at every noise level.
#
# Both train on the same schedule for 200 steps in fast mode (2000 in full mode); their
# held-out losses must fall. The SR model must also *use* its conditioning: given the
# conditioning image of another digit (the held-out batch rolled by one), its held-out loss
# rises.

# %%
s_max = 250.0  # training levels s ~ U[0, s_max]
SMALL = dict(channel_mult=(1, 2), attention_resolutions=(), mid_attention=not is_fast(),
             norm_groups=4, num_res_blocks=1)  # fmt: skip
base_net = build_unet("tiny", image_size=h, base_channels=pick(16, 32), **SMALL)
sr_net = build_unet(  # full mode: a 2x2 fold at the input (as the mnist-cpu preset), 4x cheaper
    "tiny", image_size=H, base_channels=pick(8, 32), cond_channels=C, aug_level_embedding=True,
    patch_size=pick(1, 2), **SMALL,
)  # fmt: skip
base = ModelDenoiser(base_net, sched, parameterization="eps")
sr = ModelDenoiser(sr_net, sched, parameterization="v")
sr_init = {k: v.clone() for k, v in sr_net.state_dict().items()}  # for Sec. 7's twin

# fixed held-out (image, t, noise) triples for both stages; SR conditioning at level 0
val_t = torch.randint(1, 1001, (n_val,), generator=gen).to(F64)
eps_low, eps_high = torch.randn(val_y.shape, generator=gen), torch.randn(val_x.shape, generator=gen)
a_t, s_t = (v.float()[:, None, None, None] for v in sched.alpha_sigma(val_t))
val_cond = sr_cond(val_y, 0.0, schedule=sched, factor=factor)
wrong_cond = {k: v.roll(1, 0) for k, v in val_cond.items()}


@torch.no_grad()
def heldout_loss(den, x0: torch.Tensor, eps: torch.Tensor, cond=None) -> float:
    """Held-out eps-MSE of a denoiser (any parameterization gives an eps estimate)."""
    return float((den(a_t * x0 + s_t * eps, val_t, cond).eps - eps).square().mean())


def make_trainer(net, loss, images: torch.Tensor, batch: int = 32) -> Trainer:
    return Trainer(
        net, lr=pick(5e-3, 1e-3), batch_size=batch, warmup_steps=pick(10, 100),
        batch_fn=lambda step, g: images[torch.randint(len(images), (batch,), generator=g)],
        loss_fn=lambda x, g: (loss(x, g).loss, {}), ema_half_life_images=pick(500, 10_000),
    )  # fmt: skip


base_trainer = make_trainer(base_net, lambda x, g: diffusion_loss(base, x, generator=g), low)
sr_trainer = make_trainer(
    sr_net, lambda x, g: sr_loss(sr, x, max_aug_level=s_max, factor=factor, generator=g), data
)
before = {
    "base": heldout_loss(base, val_y, eps_low),
    "sr": heldout_loss(sr, val_x, eps_high, val_cond),
}
steps = pick(200, 2000)
for _ in range(steps):
    base_trainer.train_step()
    sr_trainer.train_step()
base_ema = ModelDenoiser(base_trainer.ema.model, sched, parameterization="eps")
sr_ema = ModelDenoiser(sr_trainer.ema.model, sched, parameterization="v")
after = {
    "base": heldout_loss(base_ema, val_y, eps_low),
    "sr": heldout_loss(sr_ema, val_x, eps_high, val_cond),
    "sr_wrong_cond": heldout_loss(sr_ema, val_x, eps_high, wrong_cond),
}
for key in before:
    RESULTS[f"{key}_heldout_before"], RESULTS[f"{key}_heldout_after"] = before[key], after[key]
    print(f"{key}: held-out eps-MSE {before[key]:.3f} before, {after[key]:.3f} after {steps} steps")
    assert after[key] < 0.8 * before[key]
RESULTS["sr_heldout_wrong_cond"] = after["sr_wrong_cond"]
print(f"sr with another digit's conditioning image: {after['sr_wrong_cond']:.3f}")
assert after["sr_wrong_cond"] > 1.2 * after["sr"]

# %% [markdown]
# ## 5. Super-resolving real low-resolution digits
#
# `super_resolve(stage, y)` samples $x \sim p_\theta(x \mid y)$ with the SR stage: it
# augments $\mathrm{up}(y)$ to the stage's sampling level $s$ (a small $s = 20$ here:
# these inputs are real, not base samples) and runs a sampler (DDIM, $\hat x_0$ clipped to
# $[-1, 1]$). Compared with the true high-resolution digits:
#
# * a **sample** is one plausible high-resolution image; where $y$ leaves the detail
#   uncertain it picks one answer, and a sample's mean squared error is (for a perfect model)
#   twice the posterior variance: sharp images are not the minimum-MSE answer;
# * the **mean of $K$ samples** estimates the posterior mean $\mathbb{E}[x \mid y]$, the
#   minimum-MSE answer. By convexity of the squared error,
#   $\lVert \tfrac1K \sum_k x_k - x \rVert^2 \le \tfrac1K \sum_k \lVert x_k - x \rVert^2$
#   for any samples whatsoever, so the mean never does worse than the average sample (checked);
# * a good SR model is also **consistent**: its output, downsampled, gives back $y$. The
#   downsampled SR samples must lie closer to their own $y$ than to another digit's $y$.
#
# Against bilinear upsampling, the PSNR of a sample is not the fair yardstick: bilinear output
# is a smooth, cautious guess, and a sample that draws a sharp stroke one pixel off pays
# twice in MSE. Which one wins in PSNR depends on the data and on how long the SR model
# trained, so only fast mode asserts it: on its sharp seven-segment digits the SR sample wins
# by several dB (over 2 dB, asserted); on MNIST, BENCHMARKS.md's SR stage (`mnist-sr`, 5 CPU
# minutes) restores test digits at 22.3 dB against 18.3 dB for bilinear upsampling.
#
# What the SR stage must do is put back the *detail* that averaging removed: the part
# $d(x) = x - \mathrm{up}(\mathrm{down}(x))$ of an image that its own low-resolution version
# does not explain. Its energy alone would be a poor check (background speckle counts as
# detail too); the check is that the SR sample's detail is the *right* detail, closer to the
# true digit's, $\lVert d(x_\text{SR}) - d(x) \rVert^2 < \lVert d(x_\text{bilinear}) -
# d(x) \rVert^2$, where bilinear output has almost no detail at all. Speckle, or a stroke in
# the wrong place, adds to the left side.

# %%
s_sample = 20.0
sr_stage = SRStage(
    sr_ema, sched, steps=pick(20, 50), aug_level=s_sample, factor=factor,
    options={"threshold": "clip"},
)  # fmt: skip
K = 4
x_sr = super_resolve(sr_stage, val_y.repeat(K, 1, 1, 1), generator=torch.Generator().manual_seed(5))
x_sr = x_sr.clamp(-1, 1).reshape(K, n_val, C, H, W)
mse_samples = (x_sr - val_x).square().mean(dim=(2, 3, 4))  # (K, n_val)
mse_mean = (x_sr.mean(0) - val_x).square().mean(dim=(1, 2, 3))  # (n_val,)
assert bool((mse_mean <= mse_samples.mean(0) + 1e-7).all())  # convexity, image by image
RESULTS["sr_sample_mse"] = float(mse_samples.mean())
RESULTS["sr_mean_of_samples_mse"] = float(mse_mean.mean())
RESULTS["sr_sample_psnr_db"] = float(psnr(x_sr[0], val_x).mean())
RESULTS["sr_mean_psnr_db"] = float(psnr(x_sr.mean(0), val_x).mean())
down = downsample_images(x_sr[0], factor)
RESULTS["sr_consistency_mse"] = float((down - val_y).square().mean())
RESULTS["sr_consistency_other_mse"] = float((down - val_y.roll(1, 0)).square().mean())
print(f"held-out PSNR against the true {H}x{W} digits: bilinear {RESULTS['bilinear_psnr_db']:.1f} "
      f"dB, one SR sample {RESULTS['sr_sample_psnr_db']:.1f} dB, mean of {K} SR samples "
      f"{RESULTS['sr_mean_psnr_db']:.1f} dB")  # fmt: skip
print(f"MSE of the downsampled SR sample to its own y {RESULTS['sr_consistency_mse']:.4f}, "
      f"to another digit's y {RESULTS['sr_consistency_other_mse']:.4f}")  # fmt: skip
assert RESULTS["sr_consistency_mse"] < 0.5 * RESULTS["sr_consistency_other_mse"]
if is_fast():  # the text's "several dB" on seven-segment digits
    assert RESULTS["sr_sample_psnr_db"] > RESULTS["bilinear_psnr_db"] + 2


def detail_energy(x: torch.Tensor) -> float:
    """Mean square of x - up(down(x)): the detail the low-resolution image does not hold."""
    return float((x - upsample_images(downsample_images(x, factor), factor)).square().mean())


def detail(x: torch.Tensor) -> torch.Tensor:
    return x - upsample_images(downsample_images(x, factor), factor)


for key, images in (("true", val_x), ("bilinear", val_bilinear), ("sr", x_sr[0])):
    RESULTS[f"detail_energy_{key}"] = detail_energy(images)
    RESULTS[f"detail_error_{key}"] = float((detail(images) - detail(val_x)).square().mean())
print("detail energy: " + ", ".join(
    f"{key} {RESULTS[f'detail_energy_{key}']:.4f}" for key in ("true", "bilinear", "sr")
) + "; error in the detail: " + ", ".join(
    f"{key} {RESULTS[f'detail_error_{key}']:.4f}" for key in ("bilinear", "sr")
))  # fmt: skip
assert RESULTS["detail_error_sr"] < RESULTS["detail_error_bilinear"]

panels = [
    (upsample_images(val_y[:16], factor, "nearest"), f"input y ({h}x{w}, shown enlarged)"),
    (val_bilinear[:16], f"bilinear, {RESULTS['bilinear_psnr_db']:.1f} dB"),
    (x_sr[0, :16], f"SR sample, {RESULTS['sr_sample_psnr_db']:.1f} dB"),
    (val_x[:16], f"true {H}x{W}"),
]
grid_panels(panels, "13_super_resolution.png", (12, 3.4), nrow=4)

# %% [markdown]
# ## 6. Sampling the cascade
#
# `cascade_sample(base_stage, sr_stage, shape)` runs the chain: base samples of the low
# resolution, clipped to $[-1, 1]$, then `super_resolve` on them at the SR stage's level $s$.
# One generator feeds every stage in order, so a seed reproduces the whole chain; the check
# below runs the two stages by hand with the same seed and gets the same images, bit for bit.
# Here the base samples are model samples, so the stage's level is the moderate
# $s = 100$ (Sec. 3 above: the artefacts of a tiny base model are not small).
#
# What the reader will see in the figure: at $s = 100$ the SR stage reads less of its input
# than at $s = 20$ (Sec. 5), so its outputs follow their base samples less closely (the
# consistency MSE printed below against Sec. 5's), and some add or drop a stroke that their
# base sample has or lacks. Sec. 7 measures whether that price buys anything.

# %%
n_show = 32
base_stage = Stage(base_ema, sched, steps=pick(20, 50), options={"threshold": "clip"})
sr_stage.aug_level = 100.0
low_samples, high_samples = cascade_sample(
    base_stage, sr_stage, (n_show, C, h, w), generator=torch.Generator().manual_seed(6)
)
g = torch.Generator().manual_seed(6)
by_hand = sample(
    base_ema, sched, (n_show, C, h, w), sampler="ddim", steps=base_stage.steps, generator=g,
    threshold="clip",
).clamp(-1, 1)  # fmt: skip
by_hand_high = super_resolve(sr_stage, by_hand, generator=g).clamp(-1, 1)
RESULTS["cascade_vs_by_hand_max_abs"] = max(
    float((low_samples - by_hand).abs().max()), float((high_samples - by_hand_high).abs().max())
)
assert RESULTS["cascade_vs_by_hand_max_abs"] == 0.0
down = downsample_images(high_samples, factor)
RESULTS["cascade_consistency_mse"] = float((down - low_samples).square().mean())
RESULTS["cascade_consistency_other_mse"] = float((down - low_samples.roll(1, 0)).square().mean())
print(f"cascade: {n_show} samples {tuple(low_samples.shape[1:])} -> "
      f"{tuple(high_samples.shape[1:])}; downsampled SR output vs its base sample: MSE "
      f"{RESULTS['cascade_consistency_mse']:.4f} (vs another base sample "
      f"{RESULTS['cascade_consistency_other_mse']:.4f})")  # fmt: skip
assert RESULTS["cascade_consistency_mse"] < 0.5 * RESULTS["cascade_consistency_other_mse"]
assert RESULTS["cascade_consistency_mse"] > RESULTS["sr_consistency_mse"]  # s = 100 vs s = 20

panels = [
    (upsample_images(low_samples, factor, "nearest"), f"base samples, {h}x{w} (enlarged)"),
    (upsample_images(low_samples, factor), f"bilinear upsampling to {H}x{W}"),
    (high_samples, f"SR stage (s = {sr_stage.aug_level:.0f}), {H}x{W}"),
]
grid_panels(panels, "13_cascade.png", (11, 2.9))

# %% [markdown]
# ## 7. The cascade with and without augmentation, and the choice of $s$
#
# The central experiment of Ho 2021 (Sec. 4.2, Tables 3 and 4): the same SR model trained with
# and without conditioning augmentation, each used in the cascade on the base model's
# samples. Here a second SR model is trained exactly as the first (same initial weights, same
# batches, times and noise, same steps) but with $s_\text{max} = 0$: it only ever sees exact
# upsampled real images. Both super-resolve the same base samples; the augmented one at a
# sweep of sampling levels $s$. Each set of outputs is scored by the Frechet distance in the
# top 16 principal components of the held-out high-resolution digits (`_common.pca_frechet`,
# a stand-in for FID; lower is better), beside two references: the base samples upsampled
# bilinearly, and the training digits themselves (the floor). Printed and plotted, with one
# assertion: that the SR stage, with or without augmentation, scores better than bilinear
# upsampling of the same base samples. Which $s$ is best, and by how much augmentation helps,
# depends on how wrong the base model's samples are, so in full mode they are printed, not
# asserted; fast mode asserts the two statements below.
#
# How to read the numbers (in fast mode, when this was written: without augmentation 5.7,
# with it 4.3 to 4.9 across the sweep, bilinear 20.5, two sets of real digits 1.65): the
# augmented model scores better at every level, $s = 0$ included (asserted in fast mode), so
# here training on noisy conditions also acts as a regulariser; and the curve over $s$ is flat
# to within a few tenths (under 1, asserted in fast mode), about the noise of a Frechet
# distance from 256 samples (the real-digit floor of 1.65 is that noise's size). So in this
# tiny setting augmentation helps, and the sampling level is not critical; Ho 2021 finds a
# clear optimum at ImageNet scale, and a sweep is how it is found.
#
# Full mode (1000 samples at 28 x 28, held-out and training digits drawn at random) printed,
# in the run recorded in BENCHMARKS.md ("Tutorials in full mode: 17 with the fold, and 13"):
# without augmentation 6.27; with it 5.98, 6.04, 6.10 and 6.73 at s = 0, 50, 100 and 250;
# bilinear 17.89; 1000 training digits 2.82 (the floor). Augmentation helps a little up to
# s = 100 (by 0.2 to 0.3, small beside the 2.82 that two sets of real digits score at this
# n), and the largest level is the worst, as in the first full-mode run (7.63 without, 7.47 to
# 8.06 with), whose reference and "floor" were MNIST's first images: its files are ordered by
# writer group, and there the training digits scored 10.85, worse than the samples.
#
# For scale at a real budget: BENCHMARKS.md trains a pixel model, a latent model and this
# cascade (14 x 14 base, 28 x 28 SR stage, $s$ fixed) for the same 10 CPU minutes on MNIST, and
# the cascade **loses**: FDD 61.3 against 39.4 for the pixel model, at twice the NFE. A cascade
# pays off when one model at full resolution is too expensive, not on 28 x 28 digits.

# %%
n_eval = pick(256, 1000)
frechet = pca_frechet(val_x)
sr_net_plain = build_unet(
    "tiny", image_size=H, base_channels=pick(8, 32), cond_channels=C, aug_level_embedding=True,
    patch_size=pick(1, 2), **SMALL,
)  # fmt: skip
sr_net_plain.load_state_dict(sr_init)  # the same initial weights as sr_net
sr_plain = ModelDenoiser(sr_net_plain, sched, parameterization="v")
plain_trainer = make_trainer(
    sr_net_plain, lambda x, g: sr_loss(sr_plain, x, max_aug_level=0.0, factor=factor, generator=g),
    data,
)  # fmt: skip
for _ in range(steps):
    plain_trainer.train_step()
sr_plain_ema = ModelDenoiser(plain_trainer.ema.model, sched, parameterization="v")

base_eval = sample(
    base_ema, sched, (n_eval, C, h, w), sampler="ddim", steps=base_stage.steps,
    generator=torch.Generator().manual_seed(9), threshold="clip",
).clamp(-1, 1)  # fmt: skip


def cascade_fd(den, level: float) -> tuple[float, torch.Tensor]:
    stage = SRStage(
        den, sched, steps=sr_stage.steps, aug_level=level, factor=factor,
        options={"threshold": "clip"},
    )  # fmt: skip
    x = super_resolve(stage, base_eval, generator=torch.Generator().manual_seed(10)).clamp(-1, 1)
    return frechet(x), x


sweep = [0.0, 50.0, 100.0, s_max]
fd_sweep, outputs = {}, {}
for level in sweep:
    fd_sweep[level], outputs[level] = cascade_fd(sr_ema, level)
fd_plain, outputs["plain"] = cascade_fd(sr_plain_ema, 0.0)
fd_bilinear = frechet(upsample_images(base_eval, factor))
fd_floor = frechet(data[:n_eval])
best = min(fd_sweep, key=fd_sweep.get)
print(f"Frechet distance to held-out {H}x{W} digits, {n_eval} cascade samples "
      f"(training digits: {fd_floor:.2f}; bilinear upsampling of the base samples: "
      f"{fd_bilinear:.2f}):")  # fmt: skip
print(f"  SR trained without augmentation: {fd_plain:.2f}")
for level in sweep:
    print(f"  SR trained with s ~ U[0, {s_max:.0f}], sampled at s = {level:3.0f}: "
          f"{fd_sweep[level]:.2f}{'  <- best' if level == best else ''}")  # fmt: skip
RESULTS["cascade_fd_floor"], RESULTS["cascade_fd_bilinear"] = fd_floor, fd_bilinear
RESULTS["cascade_fd_no_augmentation"] = fd_plain
RESULTS["cascade_fd_best_level"] = best
for level in sweep:
    RESULTS[f"cascade_fd_s{level:.0f}"] = fd_sweep[level]
assert max(fd_plain, fd_sweep[best]) < fd_bilinear
if is_fast():  # the statements of the text above
    assert max(fd_sweep.values()) < fd_plain and max(fd_sweep.values()) - fd_sweep[best] < 1

fig, axes = new_figure(1, 1, (5.5, 3.4))
ax = axes[0, 0]
ax.plot(sweep, [fd_sweep[v] for v in sweep], "o-", label=f"trained with s ~ U[0, {s_max:.0f}]")
ax.axhline(fd_plain, color="C1", ls="--", label="trained without augmentation (s = 0)")
ax.axhline(fd_bilinear, color="gray", ls=":", label="bilinear upsampling")
ax.set(xlabel="sampling level s", ylabel="Frechet distance (16 PCA components)")
ax.set_title("cascade samples: SR stage with and without augmentation", fontsize=9)
ax.legend(fontsize=8)
save(fig, "13_augmentation_sweep.png")
grid_panels(
    [
        (upsample_images(base_eval[:16], factor, "nearest"), "base samples (enlarged)"),
        (outputs["plain"][:16], f"SR without augmentation, FD {fd_plain:.1f}"),
        (outputs[best][:16], f"SR with augmentation, s = {best:.0f}, FD {fd_sweep[best]:.1f}"),
    ],
    "13_augmentation_samples.png", (11, 3.4), nrow=4,
)  # fmt: skip

# %% [markdown]
# ## Summary
#
# * A cascade factorises $p(x) = \int p(x \mid y) p(y)\,dy$: a base model at low resolution
#   and SR models, each a diffusion model conditioned on the bilinearly upsampled smaller image,
#   concatenated to $x_t$ as extra channels [Saharia 2021; Ho 2021]. Every stage is trained
#   on its own, on pairs made by downsampling the data.
# * Gaussian conditioning augmentation noises the conditioning image by the forward process at
#   a random level $s$ and tells the model $s$ (checked: the moments are those of
#   $q(y_s \mid y)$). It shrinks the difference between real inputs and base samples to a KL
#   of $\frac12 \mathrm{SNR}(s) \lVert\Delta\rVert^2$, so the SR model is robust to the base
#   model's artefacts, at the cost of reading less detail from $y$.
# * A super-resolved sample is one plausible image, not the minimum-MSE guess; the mean of
#   several samples never does worse than the average sample, and its output agrees with the
#   input once downsampled. Against bilinear upsampling it restores the missing detail;
#   whether it also wins in PSNR depends on the data and the training time (on the sharp
#   seven-segment digits of fast mode it does, by several dB).
# * `cascade_sample` is exactly base sampling, clipping and `super_resolve` in turn, with one
#   generator.
# * In the cascade, the SR stage trained with augmentation scored better than the one trained
#   without it at every sampling level tried (fast mode, Frechet distance in PCA features);
#   the level itself mattered little at this size. At an equal 10-minute budget on MNIST the
#   cascade loses to a single pixel model (BENCHMARKS.md: FDD 61.3 against 39.4).
#
# ## Try this
#
# 1. At which level $s$ does the augmentation leave as much noise as signal,
#    $\alpha_s = \sigma_s$ (log-SNR 0)? Find it with the schedule's `t_from_logsnr`.
# 2. Super-resolve the same base samples at $s = 0$ and at $s = s_\text{max}$. Which output
#    follows its base sample more closely once downsampled?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    s_half = float(sched.t_from_logsnr(0.0))
    a_half, s_half_sigma = (float(v) for v in sched.alpha_sigma(s_half))
    RESULTS["answer_level_snr_one"] = s_half
    RESULTS["answer_alpha_minus_sigma"] = a_half - s_half_sigma
    print(f"1. log-SNR 0 at s = {s_half:.1f}: alpha_s = {a_half:.4f}, sigma_s = {s_half_sigma:.4f}")
    assert abs(RESULTS["answer_alpha_minus_sigma"]) < 1e-9
    follow = {}
    for level in (0.0, s_max):
        sr_stage.aug_level = level
        x = super_resolve(sr_stage, low_samples, generator=torch.Generator().manual_seed(7))
        x = downsample_images(x.clamp(-1, 1), factor)
        follow[level] = float((x - low_samples).square().mean())
    RESULTS["answer_follow_mse_s0"] = follow[0.0]
    RESULTS["answer_follow_mse_smax"] = follow[s_max]
    print(f"2. downsampled SR output vs base sample: MSE {follow[0.0]:.4f} at s = 0, "
          f"{follow[s_max]:.4f} at s = {s_max:.0f}: more noise, less of y is kept")  # fmt: skip
    assert follow[0.0] < follow[s_max]

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
