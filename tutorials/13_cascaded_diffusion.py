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
    out_path,
    pick,
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
# a sweep over a few values. `augment_low_res` computes $y_s$; `sr_cond` upsamples
# then augments and returns `{"image": y_s, "aug_level": s}`, the conditioning the U-Net takes.
#
# The check: noising one upsampled image $n$ times at a level $s$, the per-pixel mean is
# $\alpha_s\,\mathrm{up}(y)$ and the variance $\sigma_s^2$, with $\alpha_s$ computed from the
# betas by hand. With $n$ draws the mean's standard error is $\sigma_s / \sqrt n$ and the
# variance's $\sigma_s^2 \sqrt{2/(n-1)}$; every pixel must lie within 5 standard errors
# (at most $2 \cdot 2 \cdot HW$ comparisons, so a false alarm has odds under $10^{-3}$).
# Using $\bar\alpha_s$ where $\sqrt{\bar\alpha_s}$ belongs, or level $s - 1$, fails it.

# %%
sched = DiscreteSchedule.from_name("linear", 1000)
n_mc = pick(4000, 20_000)
y_up = upsample_images(val_y[:1], factor).double()
for level in (50, 300):
    alpha_bar = float(torch.prod(1 - sched.betas[:level]))  # by hand, from the betas
    alpha_s, sigma_s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    ys = augment_low_res(
        y_up.expand(n_mc, -1, -1, -1), float(level), schedule=sched,
        generator=torch.Generator().manual_seed(level),
    )  # fmt: skip
    mean_z = (ys.mean(0) - alpha_s * y_up[0]) / (sigma_s / math.sqrt(n_mc))
    var_z = (ys.var(0) - sigma_s**2) / (sigma_s**2 * math.sqrt(2 / (n_mc - 1)))
    RESULTS[f"aug_mean_max_abs_z_s{level}"] = float(mean_z.abs().max())
    RESULTS[f"aug_var_max_abs_z_s{level}"] = float(var_z.abs().max())
    worst = max(RESULTS[f"aug_mean_max_abs_z_s{level}"], RESULTS[f"aug_var_max_abs_z_s{level}"])
    print(f"s = {level}: alpha_s = {alpha_s:.3f}, sigma_s = {sigma_s:.3f}; per-pixel mean and "
          f"variance within {worst:.1f} standard errors")  # fmt: skip
    assert worst < 5

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
# infinite at $s = 0$ and falling with $s$: above a modest level a real image and the same image
# with the base model's small artefacts are nearly indistinguishable to the SR model, so it
# cannot have learnt to rely on details the base model gets wrong. The price: large $s$ also
# hides real detail of $y$, and the SR model has to invent more; hence a level chosen at
# sampling time, by trying a few.
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
print("KL(real || with artefacts) in nats: "
      + ", ".join(f"s = {lv}: {k:.3g}" for lv, k in zip(levels, kls)))  # fmt: skip

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
# Both train on the same schedule for a few hundred steps here (2000 in full mode); their
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
# trained (printed, not asserted: a few hundred steps on MNIST are not enough to beat
# bilinear's 18-19 dB). What the SR stage must do is put back the *detail* that averaging
# removed. Measure it by the energy of $x - \mathrm{up}(\mathrm{down}(x))$, the part of an
# image that its own low-resolution version does not explain: bilinear output has almost
# none, the true digits have plenty, and the SR samples must come closer to the true amount
# than bilinear does.

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


def detail_energy(x: torch.Tensor) -> float:
    """Mean square of x - up(down(x)): the detail the low-resolution image does not hold."""
    return float((x - upsample_images(downsample_images(x, factor), factor)).square().mean())


for key, images in (("true", val_x), ("bilinear", val_bilinear), ("sr", x_sr[0])):
    RESULTS[f"detail_energy_{key}"] = detail_energy(images)
print("detail energy: " + ", ".join(
    f"{key} {RESULTS[f'detail_energy_{key}']:.4f}" for key in ("true", "bilinear", "sr")
))  # fmt: skip
gap = {key: abs(RESULTS[f"detail_energy_{key}"] - RESULTS["detail_energy_true"])
       for key in ("bilinear", "sr")}  # fmt: skip
assert gap["sr"] < gap["bilinear"]

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

panels = [
    (upsample_images(low_samples, factor, "nearest"), f"base samples, {h}x{w} (enlarged)"),
    (upsample_images(low_samples, factor), f"bilinear upsampling to {H}x{W}"),
    (high_samples, f"SR stage (s = {sr_stage.aug_level:.0f}), {H}x{W}"),
]
grid_panels(panels, "13_cascade.png", (11, 2.9))

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
