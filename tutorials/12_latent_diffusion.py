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
# # 12. Latent diffusion
#
# *High-Resolution Image Synthesis with Latent Diffusion Models* [Rombach 2022] splits image
# generation in two stages:
#
# 1. a **first stage**, an autoencoder trained once: the encoder $\mathcal{E}$ maps an image
#    $x \in \mathbb{R}^{H \times W \times C}$ to a latent $z = \mathcal{E}(x) \in
#    \mathbb{R}^{h \times w \times c}$ with $h = H/f$, $w = W/f$ for a downsampling factor $f$,
#    and the decoder $\mathcal{D}$ maps it back, $\tilde x = \mathcal{D}(z) \approx x$;
# 2. a **diffusion model on the latents**, trained with the usual loss [Rombach 2022, Eq. 2]
#
# $$L_\text{LDM} = \mathbb{E}_{\mathcal{E}(x),\, \epsilon \sim \mathcal{N}(0, I),\, t}
#   \big\lVert \epsilon - \epsilon_\theta(z_t, t) \big\rVert_2^2 ,$$
#
#    and sampled as usual; a sample $z_0$ becomes an image $\mathcal{D}(z_0)$.
#
# The diffusion model never sees a pixel: it spends its capacity on the content the
# autoencoder keeps, and every network call costs what the smaller latent costs. This tutorial
# builds both stages with difflab (`difflab.nn.autoencoder`, `difflab.latent`) on digits and
# checks: the KL term of the autoencoder's loss against its closed form and a Monte Carlo
# estimate; the reconstruction PSNR as the ceiling of any latent model; the latent scale factor
# $1/\mathrm{std}(z)$, which gives the latents unit variance; and that `latent_sample` is
# "sample latents, then decode".
#
# Data: in fast mode (`DIFFLAB_FAST=1`) seven-segment digits of 16 x 16 pixels
# (`_common.digit_like_images`); in full mode MNIST (28 x 28) when `--data-dir`,
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
    pick,
    save,
    use_threads,
)
from torch.utils.flop_counter import FlopCounterMode

from difflab.latent import (
    decode_latents,
    encode_to_latents,
    latent_diffusion_loss,
    latent_sample,
    latent_scale_factor,
)
from difflab.nn.autoencoder import autoencoder_loss, build_autoencoder, psnr
from difflab.nn.unet import build_unet
from difflab.parameterization import ModelDenoiser
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer

F64 = torch.float64
THREADS = use_threads(pick(1, torch.get_num_threads()))  # fast mode: small convolutions
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)  # initial weights


n_val = pick(256, 1024)
data, val_x, source = load_digits(n_val, generator=gen)
N, C, H, W = data.shape
print(f"{N} training images of {source}, {C}x{H}x{W}")

# %% [markdown]
# ## 1. Why a latent space: the cost of a network call
#
# A diffusion model calls its network tens to thousands of times per sample, and trains on
# millions of (image, $t$) pairs; each call costs in proportion to the number of positions it
# processes. An autoencoder with downsampling factor $f$ and $c$ latent channels turns
# $H \times W \times C$ numbers into $\frac{H}{f} \times \frac{W}{f} \times c$, that is
#
# $$\frac{H W C}{(H/f)(W/f)\,c} = \frac{f^2 C}{c}$$
#
# times fewer. LDM's autoencoders for 256 x 256 RGB images range from $f = 1$ (pixels) to
# $f = 32$; Sec. 4.1 of the paper finds $f = 4$ to $16$ a good trade-off ("LDM-4" keeps
# $64 \times 64 \times 3$ latents: 16 times fewer numbers; Stable Diffusion's $f = 8$,
# $c = 4$ keeps 48 times fewer). Convolutions cost in proportion to the area, so a U-Net of
# the same width is $f^2$ times cheaper on the latent; self-attention over $h w$ positions
# costs $(h w)^2$, $f^4$ times less.
#
# Here: in fast mode $f = 2$, $c = 1$ (16 x 16 digits become 8 x 8 latents: 4 times fewer
# numbers), in full mode $f = 4$, $c = 4$ (28 x 28 becomes 7 x 7 x 4: 4 times fewer).
# difflab's `Autoencoder` halves the side once per level after the first, $f = 2^{L-1}$ for
# `channel_mult` of length $L$. The checks: the encoder's output has shape
# $(c, H/f, W/f)$; and counting the floating-point operations of one U-Net call (PyTorch's
# `FlopCounterMode`, which counts convolutions and matrix products exactly), the same U-Net
# costs about $f^2$ times less on the latent than on the pixels: a little less in fast mode,
# because the time-embedding MLP costs the same at any size; a little more in full mode, whose
# self-attention in the middle of the U-Net costs $f^4$ times less.

# %%
f = pick(2, 4)
latent_channels = pick(1, 4)
ae = build_autoencoder(
    "mnist-f4c4" if not is_fast() else "tiny",
    image_size=H, in_channels=C, latent_channels=latent_channels,
    channel_mult=pick((1, 2), (1, 2, 2)), base_channels=pick(8, 16), norm_groups=pick(4, 8),
    mid_attention=not is_fast(),
)  # fmt: skip
c, h, w = ae.latent_shape()
with torch.no_grad():
    z_shape = tuple(ae.encode(data[:2]).mean.shape[1:])
assert ae.downsample_factor == f and z_shape == (c, H // f, W // f) == (c, h, w)
RESULTS["pixels_over_latents"] = C * H * W / (c * h * w)
assert RESULTS["pixels_over_latents"] == f**2 * C / c
print(f"f = {f}, c = {c}: {C}x{H}x{W} = {C * H * W} pixels -> {c}x{h}x{w} = {c * h * w} "
      f"latent numbers ({RESULTS['pixels_over_latents']:.0f}x fewer)")  # fmt: skip


def unet_for(channels: int, size: int) -> torch.nn.Module:
    """The latent model's U-Net layout (no downsampling level, so any size fits)."""
    return build_unet(
        "tiny", image_size=size, in_channels=channels, base_channels=pick(16, 48),
        norm_groups=pick(4, 8), channel_mult=(1,), num_res_blocks=pick(1, 2),
        attention_resolutions=(), mid_attention=not is_fast(),
    )  # fmt: skip


def flops_per_call(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, *shape), torch.full((1,), 500.0))
    return counter.get_total_flops()


flops_pixels = flops_per_call(unet_for(C, H), (C, H, W))
flops_latents = flops_per_call(unet_for(c, h), (c, h, w))
RESULTS["flops_ratio_over_f2"] = flops_pixels / flops_latents / f**2
print(f"one U-Net call: {flops_pixels / 1e6:.1f} MFLOP on pixels, {flops_latents / 1e6:.2f} "
      f"MFLOP on latents, {flops_pixels / flops_latents:.1f}x = "
      f"{RESULTS['flops_ratio_over_f2']:.2f} f^2")  # fmt: skip
assert 0.7 < RESULTS["flops_ratio_over_f2"] < 1.3

# %% [markdown]
# ## 2. The KL-regularised autoencoder and its loss
#
# LDM's "KL" first stage is a variational autoencoder with a very small KL weight
# [Rombach 2022, Sec. 3.1 and App. G]. The encoder outputs a diagonal Gaussian posterior
# $q(z \mid x) = \mathcal{N}(\mu(x), \mathrm{diag}\,\sigma^2(x))$, a latent is drawn with the
# reparameterisation $z = \mu + \sigma \odot \epsilon$ (tutorial 2), and the loss per image is
#
# $$L_\text{AE} = \lVert x - \mathcal{D}(z) \rVert_1
#   + w_\text{KL}\, \mathrm{KL}\big(q(z \mid x)\,\Vert\,\mathcal{N}(0, I)\big),
#   \qquad \mathrm{KL} = \tfrac12 \sum_j \big(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2\big),$$
#
# with $w_\text{KL} = 10^{-6}$ (LDM also adds a perceptual and an adversarial term, which need
# pretrained networks; difflab leaves them out). `autoencoder_loss` divides both terms by the
# number of pixels $D = CHW$, which only rescales the loss. The tiny KL weight is not there to
# make $q(z)$ a standard Gaussian, as in a VAE that is sampled from its prior: it only keeps the
# latents from drifting to arbitrary scales and makes the decoder robust to small changes of
# $z$; the diffusion model, not a Gaussian prior, will model the latents.
#
# Before training, two checks on the fresh network: `autoencoder_loss` equals the formula
# evaluated by hand with the same posterior sample, and the KL that difflab computes in closed
# form equals the formula above.

# %%
x_check = val_x[:8]
with torch.no_grad():
    loss = autoencoder_loss(ae, x_check, generator=torch.Generator().manual_seed(1))[0]
    post = ae.encode(x_check)
    z = post.mean + post.std * torch.randn(
        post.mean.shape, generator=torch.Generator().manual_seed(1)
    )
    mu, logvar = post.mean.double(), post.logvar.double()
    kl_by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)  # (B,)
    rec = (x_check - ae.decode(z)).abs().flatten(1).sum(1)
    loss_by_hand = ((rec + 1e-6 * kl_by_hand.float()) / (C * H * W)).mean()
RESULTS["ae_loss_vs_by_hand_rel"] = float((loss / loss_by_hand - 1).abs())
RESULTS["kl_closed_form_vs_by_hand_rel"] = float((post.kl().double() / kl_by_hand - 1).abs().max())
print(f"autoencoder loss {float(loss):.4f} (by hand {float(loss_by_hand):.4f}); "
      f"KL per image {float(kl_by_hand.mean()):.1f} nats")  # fmt: skip
assert RESULTS["ae_loss_vs_by_hand_rel"] < 1e-5 and RESULTS["kl_closed_form_vs_by_hand_rel"] < 1e-5

# %% [markdown]
# ## 3. Training the autoencoder
#
# The autoencoder is trained once, on its own, and then frozen. A few hundred steps of Adam
# (a few thousand in full mode) on the $L_1$ loss above.

# %%
ae_batch = 32


def ae_loss_fn(x: torch.Tensor, g: torch.Generator):
    loss, logs = autoencoder_loss(ae, x, kl_weight=1e-6, generator=g)
    return loss, logs


ae_trainer = Trainer(
    ae, batch_fn=lambda step, g: data[torch.randint(0, N, (ae_batch,), generator=g)],
    loss_fn=ae_loss_fn, lr=pick(3e-3, 1e-3), batch_size=ae_batch, warmup_steps=pick(20, 100),
    seed=0,
)  # fmt: skip
ae_losses = [float(ae_trainer.train_step()["loss"]) for _ in range(pick(150, 3000))]
ae.eval().requires_grad_(False)
print(f"autoencoder loss: {ae_losses[0]:.3f} at the first step, {ae_losses[-1]:.3f} at the last")

# %% [markdown]
# The KL term once more, now on the trained encoder's posteriors of held-out digits, against a
# Monte Carlo estimate: $\mathrm{KL} = \mathbb{E}_{z \sim q}[\log q(z \mid x) - \log p(z)]$
# with
#
# $$\log q(z \mid x) - \log p(z) = \sum_j \Big(-\tfrac12 \log \sigma_j^2 - \tfrac12
#   \epsilon_j^2 + \tfrac12 z_j^2\Big), \qquad z = \mu + \sigma \odot \epsilon .$$
#
# With $M$ draws per image the estimate's standard error is the sample standard deviation over
# $\sqrt M$; the closed form must lie within 4 standard errors for every image checked.

# %%
n_mc, n_img = pick(4000, 20_000), 6
with torch.no_grad():
    post = ae.encode(val_x[:n_img])
mu, logvar = post.mean.double(), post.logvar.double()
kl_closed = post.kl().double()
eps = torch.randn((n_mc, *mu.shape), generator=gen, dtype=F64)
z = mu + (0.5 * logvar).exp() * eps
log_ratio = (-0.5 * logvar - 0.5 * eps**2 + 0.5 * z**2).flatten(2).sum(2)  # (n_mc, n_img)
kl_mc, kl_se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n_mc)
RESULTS["kl_monte_carlo_max_abs_z"] = float(((kl_mc - kl_closed) / kl_se).abs().max())
print(f"KL per image (nats): closed form {[round(v) for v in kl_closed.tolist()]}, "
      f"Monte Carlo within {RESULTS['kl_monte_carlo_max_abs_z']:.1f} standard errors")  # fmt: skip
assert RESULTS["kl_monte_carlo_max_abs_z"] < 4
RESULTS["posterior_std_mean"] = float(post.std.mean())
print(
    f"mean posterior std {RESULTS['posterior_std_mean']:.3f}: the encoder is nearly deterministic"
)

# %% [markdown]
# ## 4. Reconstruction quality: the ceiling of any latent model
#
# Whatever the diffusion model learns, its images are $\mathcal{D}(z_0)$. Even a perfect latent
# model, one that samples exactly the distribution of the latents of real images, produces
# $\mathcal{D}(\mathcal{E}(x))$ and not $x$: the autoencoder's reconstruction error is a floor
# under the error of every latent model (details the encoder drops cannot come back).
# LDM measures it by the peak signal-to-noise ratio,
#
# $$\mathrm{PSNR}(x, \tilde x) = 10 \log_{10} \frac{R^2}{\mathrm{MSE}(x, \tilde x)}
#   \ \text{dB}, \qquad R = 2 \text{ for pixels in } [-1, 1],$$
#
# and reports it, with a reconstruction FID, for each of its first-stage models. Checks:
# difflab's `psnr` equals the formula; the trained autoencoder reconstructs held-out digits far
# better (by 5 dB and more) than predicting the mean image for every digit.

# %%
with torch.no_grad():
    val_rec = ae.decode(ae.encode(val_x).mode()).clamp(-1, 1)
val_psnr = psnr(val_x, val_rec)
by_hand = 10 * torch.log10(4 / (val_x - val_rec).double().square().flatten(1).mean(1))
RESULTS["psnr_vs_formula_max_abs"] = float((val_psnr - by_hand).abs().max())
assert RESULTS["psnr_vs_formula_max_abs"] < 1e-9
RESULTS["psnr_reconstruction_db"] = float(val_psnr.mean())
RESULTS["psnr_mean_image_db"] = float(
    psnr(val_x, data.mean(0, keepdim=True).expand_as(val_x)).mean()
)
print(f"held-out PSNR: reconstructions {RESULTS['psnr_reconstruction_db']:.1f} dB, "
      f"the mean image {RESULTS['psnr_mean_image_db']:.1f} dB")  # fmt: skip
assert RESULTS["psnr_reconstruction_db"] > RESULTS["psnr_mean_image_db"] + 5

# %% [markdown]
# ## 5. The latent scale factor
#
# Nothing in the autoencoder's loss fixes the scale of $z$: with $w_\text{KL} = 10^{-6}$ the
# latents come out with whatever spread the encoder found convenient. A diffusion schedule
# assumes data of about unit variance: its $x_T = \alpha_T z + \sigma_T \epsilon$ is close to
# $\mathcal{N}(0, I)$ only then, and its signal-to-noise ratios mean what they say only then
# (for latents of variance $v$, every $\mathrm{SNR}_t$ is in effect multiplied by $v$).
# LDM therefore rescales the latents once, by
#
# $$s = \frac{1}{\mathrm{std}(z)}$$
#
# over the latents of a batch of training images [Rombach 2022, App. G; the well-known
# $s = 0.18215$ of Stable Diffusion is this number for its autoencoder], trains the diffusion
# model on $s z$ and decodes samples as $\mathcal{D}(z_0 / s)$. In difflab:
# `latent_scale_factor(ae, batches)`, then `encode_to_latents(ae, x, s)` and
# `decode_latents(ae, z, s)`. Checks: $s$ is one over the standard deviation of all latent
# entries pooled, and latents of *held-out* images, scaled by $s$, have a standard deviation
# within 0.15 of 1 (at least 256 images, so the relative standard error of a standard deviation
# is below $1/\sqrt{2 \cdot 256} \approx 0.044$: 0.15 is over 3 standard errors).

# %%
fit_batches = [data[i : i + 256] for i in range(0, pick(1024, 4096), 256)]
scale = latent_scale_factor(ae, fit_batches, generator=torch.Generator().manual_seed(2))
val_z_raw = encode_to_latents(ae, val_x, 1.0, torch.Generator().manual_seed(3))
val_z = encode_to_latents(ae, val_x, scale, torch.Generator().manual_seed(3))
RESULTS["latent_scale"] = scale
RESULTS["latent_std_before"] = float(val_z_raw.std())
RESULTS["latent_std_after"] = float(val_z.std())
print(f"scale s = {scale:.4f}; held-out latent std {RESULTS['latent_std_before']:.3f} "
      f"before, {RESULTS['latent_std_after']:.3f} after scaling")  # fmt: skip
all_fit = torch.cat(
    [encode_to_latents(ae, x, 1.0, None).double() for x in fit_batches]
)  # posterior means: the same pooled std as latent_scale_factor without a generator
RESULTS["scale_vs_pooled_std_rel"] = abs(
    latent_scale_factor(ae, fit_batches) * float(all_fit.std()) - 1
)
assert RESULTS["scale_vs_pooled_std_rel"] < 1e-6
assert abs(RESULTS["latent_std_after"] - 1) < 0.15

fig, axes = new_figure(1, 2, (9, 3.2))
grid = torch.linspace(-4, 4, 200)
for ax, (z_, title) in zip(axes[0], ((val_z_raw, "latents z"), (val_z, "scaled latents s z"))):
    ax.hist(z_.flatten().numpy(), bins=80, density=True, alpha=0.7, label="held-out latents")
    ax.plot(grid, torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi), "k--", label="N(0, 1)")
    ax.set_title(f"{title}: std {float(z_.std()):.2f}", fontsize=9)
    ax.legend(fontsize=8)
save(fig, "12_latent_scale.png")

# %% [markdown]
# The scaled latents have unit variance, not a Gaussian shape: the encoder owes the latents
# no particular distribution, and modelling it is the diffusion model's job.
#
# ## 6. A diffusion model on the latents
#
# The second stage is an ordinary diffusion model whose "images" are $c \times h \times w$
# latents: a U-Net with $c$ input channels and the $\epsilon$ loss, on LDM's schedule: $T = 1000$
# and $\beta_t$ from $0.00085$ to $0.012$, linear in $\sqrt{\beta_t}$ (difflab's `quadratic`
# schedule; "scaled linear" elsewhere). It ends less noisy than DDPM's: $\bar\alpha_T \approx
# 0.0047$, so an error in $\hat\epsilon$ at $t = T$ moves $\hat z_0$ by
# $1/\sqrt{\mathrm{SNR}_T} \approx 15$ times itself, not 157 times (tutorial 6, Sec. 7).
# Latents have no natural range to clip $\hat z_0$ to, so this matters: with DDPM's schedule
# a briefly trained latent model samples latents many times too large.
# `latent_diffusion_loss(denoiser, ae, x, s)` encodes a batch with the frozen
# autoencoder (a posterior sample, as LDM trains on) and calls `diffusion_loss` on $s z$;
# nothing else about diffusion changes. As in tutorial 6 a fixed held-out set of
# (latent, $t$, $\epsilon$) triples measures progress; the fresh U-Net predicts
# $\hat\epsilon = 0$ (its last layer starts at zero), so its held-out error is the mean of
# $\epsilon^2$.

# %%
sched = DiscreteSchedule.from_name("quadratic", 1000, beta_start=0.00085, beta_end=0.012)
RESULTS["amplification_at_T"] = math.sqrt(1 / float(sched.alpha_bar[1000]) - 1)
print(f"alpha_bar_T = {float(sched.alpha_bar[1000]):.4f}, "
      f"1 / sqrt(SNR_T) = {RESULTS['amplification_at_T']:.1f}")  # fmt: skip
assert 14 < RESULTS["amplification_at_T"] < 16
unet = unet_for(c, h)
denoiser = ModelDenoiser(unet, sched, parameterization="eps")
val_t = torch.randint(1, 1001, (n_val,), generator=gen).to(F64)
val_eps = torch.randn(val_z.shape, generator=gen)
alpha, sigma = (v.float()[:, None, None, None] for v in sched.alpha_sigma(val_t))
val_zt = alpha * val_z + sigma * val_eps


@torch.no_grad()
def heldout_eps_mse(den) -> float:
    return float((den(val_zt, val_t.float()).eps - val_eps).square().mean())


ldm_batch = pick(32, 64)
ldm_trainer = Trainer(
    denoiser, batch_fn=lambda step, g: data[torch.randint(0, N, (ldm_batch,), generator=g)],
    loss_fn=lambda x, g: (latent_diffusion_loss(denoiser, ae, x, scale, generator=g).loss, {}),
    lr=pick(5e-3, 1e-3), batch_size=ldm_batch, warmup_steps=pick(20, 200),
    ema_half_life_images=pick(500, 10_000), seed=0,
)  # fmt: skip
RESULTS["ldm_heldout_before"] = heldout_eps_mse(denoiser)
ldm_losses = [float(ldm_trainer.train_step()["loss"]) for _ in range(pick(200, 4000))]
ema = ldm_trainer.ema.model
RESULTS["ldm_heldout_after"] = heldout_eps_mse(denoiser)
RESULTS["ldm_ema_heldout_after"] = heldout_eps_mse(ema)
print(f"held-out eps-MSE on latents: {RESULTS['ldm_heldout_before']:.3f} before, "
      f"{RESULTS['ldm_heldout_after']:.3f} after {ldm_trainer.step} steps "
      f"(EMA {RESULTS['ldm_ema_heldout_after']:.3f})")  # fmt: skip
assert abs(RESULTS["ldm_heldout_before"] - float(val_eps.square().mean())) < 1e-6  # zero init
assert RESULTS["ldm_heldout_after"] < 0.8 * RESULTS["ldm_heldout_before"]

# %% [markdown]
# ## 7. Sampling, then decoding
#
# Sampling draws $z_T \sim \mathcal{N}(0, I)$ of the latent shape, runs any sampler (DDIM here,
# tutorial 8) to $z_0$, and decodes $\mathcal{D}(z_0 / s)$. `latent_sample` is exactly this:
# with the same seed it returns `decode_latents(ae, sample(...), s)` to the last bit.
# No clipping: $\hat z_0$ has no natural range (thresholding would clip latents, not pixels).
#
# The check that sampling learned something about the latents: decode plain Gaussian noise
# $\mathcal{D}(\epsilon / s)$, latents with the right variance and nothing else, and compare
# with the data's pixel statistics (mean, spread, share of dark pixels); the diffusion
# samples must lie closer to them.

# %%
n_show, ddim_steps = 64, pick(25, 50)
samples = latent_sample(
    ema, sched, ae, scale, n_show, sampler="ddim", steps=ddim_steps,
    generator=torch.Generator().manual_seed(4),
)  # fmt: skip
z0 = sample(
    ema, sched, (n_show, c, h, w), sampler="ddim", steps=ddim_steps,
    generator=torch.Generator().manual_seed(4),
)  # fmt: skip
with torch.no_grad():
    by_two_calls = decode_latents(ae, z0, scale)
    noise_decoded = decode_latents(ae, torch.randn(z0.shape, generator=gen), scale)
RESULTS["latent_sample_vs_decode_max_abs"] = float((samples - by_two_calls).abs().max())
assert RESULTS["latent_sample_vs_decode_max_abs"] < 1e-6
RESULTS["sampled_latent_std"] = float(z0.std())


def pixel_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation of the pixels, and the fraction of dark pixels."""
    return torch.stack([x.mean(), x.std(), (x < 0).float().mean()])


data_stats = pixel_stats(val_x)
RESULTS["samples_stats_distance"] = float(
    (pixel_stats(samples.clamp(-1, 1)) - data_stats).abs().sum()
)
RESULTS["noise_stats_distance"] = float(
    (pixel_stats(noise_decoded.clamp(-1, 1)) - data_stats).abs().sum()
)
print(f"sampled latents: std {RESULTS['sampled_latent_std']:.2f}; distance to the data's pixel "
      f"statistics: samples {RESULTS['samples_stats_distance']:.3f}, decoded noise "
      f"{RESULTS['noise_stats_distance']:.3f}")  # fmt: skip
assert RESULTS["samples_stats_distance"] < RESULTS["noise_stats_distance"]

panels = [
    (val_x[:n_show], f"held-out images ({source})"),
    (val_rec[:n_show], f"reconstructions D(E(x)), {RESULTS['psnr_reconstruction_db']:.1f} dB"),
    (samples.clamp(-1, 1), f"latent diffusion samples D(z0 / s), ddim {ddim_steps} steps"),
]
grid_panels(panels, "12_samples.png", (11, 4))

# %% [markdown]
# ## Summary
#
# * Latent diffusion moves the diffusion model from pixels to the latents of an autoencoder
#   with downsampling factor $f$ and $c$ channels: $f^2 C / c$ times fewer numbers, and a U-Net
#   call about $f^2$ times cheaper (counted above).
# * LDM's KL autoencoder is a VAE with a tiny KL weight ($10^{-6}$); its KL term is the closed
#   form $\frac12 \sum(\mu^2 + \sigma^2 - 1 - \log\sigma^2)$ (checked against Monte Carlo).
#   The weight is so small that the posterior is nearly deterministic and the latents'
#   scale is arbitrary.
# * The reconstruction PSNR bounds what any latent model can reach: a sample is at best a
#   reconstruction.
# * The scale factor $s = 1/\mathrm{std}(z)$ gives the latents the unit variance the noise
#   schedule assumes; it is computed once per autoencoder and used at both ends.
# * The diffusion part is unchanged: the same loss, U-Net, `Trainer` and samplers on $s z$, and
#   a final decode. In fast mode both models train for a few seconds, and many samples are
#   already recognisable seven-segment digits, others broken strokes; the 8 x 8 latent is
#   an easier target than the 16 x 16 image.
#
# ## Try this
#
# 1. Stable Diffusion maps 512 x 512 RGB images to 64 x 64 x 4 latents. What is $f$, how many
#    times fewer numbers is that, and how many `channel_mult` levels does a difflab
#    `Autoencoder` need for that $f$?
# 2. Forget the scale factor: train on $z$ instead of $s z$. By how much does that shift every
#    log-SNR of the schedule? Check it on the latents at $t = 200$: the variance of
#    $z_t = \alpha_t z + \sigma_t\epsilon$ is $\alpha_t^2 \mathrm{Var}(z) + \sigma_t^2$, not 1.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    sd = build_autoencoder(
        "tiny", image_size=64, in_channels=3, latent_channels=4, channel_mult=(1, 1, 1, 1)
    )
    RESULTS["answer_sd_pixels_over_latents"] = 512 * 512 * 3 / (64 * 64 * 4)
    print(f"1. f = {512 // 64}: {RESULTS['answer_sd_pixels_over_latents']:.0f}x fewer numbers; "
          f"4 levels give f = {sd.downsample_factor} (64 x 64 -> {sd.latent_shape()})")  # fmt: skip
    assert sd.downsample_factor == 8 and sd.latent_shape() == (4, 8, 8)
    assert RESULTS["answer_sd_pixels_over_latents"] == 48.0
    # 2. unscaled latents: SNR_t becomes Var(z) SNR_t, log-SNR shifts by log Var(z) = -2 log s
    shift = -2 * math.log(scale)
    a_t, s_t = (float(v) for v in sched.alpha_sigma(200.0))
    z_raw = val_z_raw.double()
    z_t = a_t * z_raw + s_t * torch.randn(z_raw.shape, generator=gen, dtype=F64)
    var_pred = a_t**2 * float(z_raw.var()) + s_t**2
    se = var_pred * math.sqrt(2 / n_val)  # conservative: one independent value per image
    RESULTS["answer_log_snr_shift"] = shift
    RESULTS["answer_var_zt_z"] = (float(z_t.var()) - var_pred) / se
    print(f"2. every log-SNR shifts by log Var(z) = {shift:+.2f}; at t = 200, Var(z_t) = "
          f"{float(z_t.var()):.3f} (predicted {var_pred:.3f}; 1 for scaled latents)")  # fmt: skip
    assert abs(RESULTS["answer_var_zt_z"]) < 4

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; {len(RESULTS)} checked numbers in RESULTS")
