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
# # 11. difflab and diffusers side by side
#
# [diffusers](https://huggingface.co/docs/diffusers) is the library most diffusion code and
# most released models are written for, and the Hugging Face diffusion course teaches its
# habits: a training step spelled `add_noise`, `UNet2DModel`, MSE; a scheduler object and a
# loop; Stable Diffusion's scheduler config copied from a model card; `pred_original_sample`
# to watch a sample form; the autoencoder's `scaling_factor`. diffusers and difflab compute the
# same mathematics with different conventions, and `difflab.interop` translates between them
# ([docs/diffusers.md](../docs/diffusers.md) has the full correspondence table). This tutorial
# takes those habits one by one and checks, number for number, what each one is in difflab:
#
# | difflab | diffusers | section |
# |---|---|---|
# | `q_sample(x0, t, schedule, eps=...)` | `DDPMScheduler.add_noise(x0, noise, k)` | 1 |
# | `ddim(...)`, `sample(sampler="ddim")` | a loop over `DDIMScheduler.step` | 2 |
# | `build_unet(...)` (`difflab.nn.unet.UNet`) | `UNet2DModel` | 3 |
# | `diffusion_loss(..., t=, noise=)` | `add_noise`, `UNet2DModel`, `F.mse_loss` | 4 |
# | `ddim` on an explicit grid | Stable Diffusion's `DDIMScheduler` config | 5 |
# | `spacing="trailing"` when $N \nmid T$ | `DDIMScheduler` steps of `T // N` | 6 |
# | sampler `callback`, `info["x0_hat"]` | `step(...).pred_original_sample` | 7 |
# | `ddpm`, `variance="small"` / `"large"` | `variance_type="fixed_small"` / `"fixed_large"` | 8 |
# | `euler`, `dpm++2m` (Karras grid) | `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler` | 9 |
# | `latent_scale_factor` | `AutoencoderKL.scaling_factor`, `shift_factor` | 10 |
#
# **The one convention to remember.** difflab counts time as in the papers [Ho 2020]: $t = 0$
# is the data and $t = 1, \dots, T$ are the noisy steps, so $\bar\alpha_0 = 1$ and
# $\bar\alpha_t = \prod_{i=1}^{t} (1 - \beta_i)$. diffusers counts from zero, $k = 0, \dots,
# T - 1$, and its `alphas_cumprod[k]` is the product of the first $k + 1$ factors. So
#
# $$\text{diffusers' timestep } k \;=\; \text{difflab's time } t = k + 1 .$$
#
# Sections 1 to 4 each check an identity that would fail with $t = k$. Sections 5 to 10 are
# the settings a diffusers user meets first (Stable Diffusion's scheduler config, step counts,
# `pred_original_sample`, variance types, the sigma-based solvers, the latent scale), each
# reproduced number for number.
#
# Training on a folder of your own images with `difflab train` and exporting the run as a
# diffusers pipeline (`difflab export`, then `DDIMPipeline.from_pretrained`) is a task, not a
# convention: [docs/HOWTO.md](../docs/HOWTO.md) shows it step by step, and the test suite
# checks that the exported pipeline draws difflab's samples.

# %%
import math
import warnings

import torch
from _common import (
    answers_wanted,
    digit_like_images,
    is_fast,
    new_figure,
    out_path,
    pick,
    save,
    use_threads,
)

from difflab.interop import (
    DiffusersTimeDenoiser,
    diffusers_config_from_unet,
    schedule_from_diffusers,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
)
from difflab.latent import decode_latents, encode_to_latents, latent_scale_factor
from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import ModelDenoiser, v_from_x0_eps
from difflab.process import grid_posterior, q_sample
from difflab.samplers import SAMPLERS, ddim, sample
from difflab.schedules import DiscreteSchedule, sampling_timesteps

warnings.filterwarnings("ignore", category=DeprecationWarning)  # diffusers on numpy 2
warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' own deprecations
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook
import diffusers  # noqa: E402  (the dev extra installs it)

diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()

THREADS = use_threads(1)  # small convolutions: one thread is fastest; restored at the end
F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# %% [markdown]
# ## 1. Adding noise: `add_noise` at $k$ is `q_sample` at $t = k + 1$
#
# Both libraries draw $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$
# [Ho 2020, Eq. 4] in one step. We build diffusers' `DDPMScheduler` with DDPM's linear
# schedule ($\beta$ from $10^{-4}$ to $0.02$), read it into a difflab schedule with
# `schedule_from_diffusers`, and noise the same $x_0$ with the same $\epsilon$ on both sides.
# diffusers keeps $\bar\alpha$ in float32 and difflab in float64, so the two agree to float32
# rounding. How closely? Near $k = 0$ a rounding error $\delta$ in $\bar\alpha \approx 0.9999$
# (float32 values near 1 are $6 \cdot 10^{-8}$ apart) moves $\sqrt{1 - \bar\alpha} = 0.01$ by
# $\delta / (2 \cdot 0.01) = 50\,\delta$, and the noise term by $50\,\delta\,|\epsilon|$ with
# $|\epsilon|$ up to about 4. Rather than guess $\delta$, the cell reads it: for each $k$ it
# bounds the difference by $|\Delta\sqrt{\bar\alpha}|\,\max|x_0| + |\Delta\sqrt{1 -
# \bar\alpha}|\,\max|\epsilon|$ (the two square roots from float32 against float64), plus
# float32 rounding of the result, and checks each $k$ against its own bound. The largest
# bound, at $k = 0$, is $3 \cdot 10^{-6}$. Calling `q_sample` at $t = k$ instead is off by a
# whole step.

# %%
ddpm_scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
sched = schedule_from_diffusers(dict(ddpm_scheduler.config))
RESULTS["schedule_vs_from_name_max_abs"] = max_abs(
    sched.alpha_bar, DiscreteSchedule.from_name("linear", T).alpha_bar
)
RESULTS["alpha_bar_vs_alphas_cumprod_max_abs"] = max_abs(
    sched.alpha_bar[1:],
    ddpm_scheduler.alphas_cumprod,  # difflab alpha_bar[k + 1]
)
assert RESULTS["schedule_vs_from_name_max_abs"] == 0.0  # the same linear schedule
assert RESULTS["alpha_bar_vs_alphas_cumprod_max_abs"] < 1e-6  # float32 rounding
assert float(sched.alpha_bar[0]) == 1.0  # t = 0 is the data itself

x0_probe = torch.rand(4, 3, 16, 16, generator=seeded(0)) * 2 - 1
eps_probe = torch.randn(4, 3, 16, 16, generator=seeded(1))
k = torch.tensor([0, 99, 499, 999])
theirs = ddpm_scheduler.add_noise(x0_probe, eps_probe, k)
ours = q_sample(x0_probe.double(), (k + 1).double(), sched, eps=eps_probe.double())
wrong = q_sample(x0_probe.double(), k.double(), sched, eps=eps_probe.double())
RESULTS["add_noise_vs_q_sample_max_abs"] = max_abs(theirs, ours)
RESULTS["add_noise_vs_q_sample_at_k_max_abs"] = max_abs(theirs, wrong)
# the rounding bound per k, from diffusers' stored float32 alphas_cumprod
ab32, ab64 = ddpm_scheduler.alphas_cumprod[k].double(), sched.alpha_bar[k + 1]
per_image_max = lambda v: v.abs().flatten(1).amax(1)  # noqa: E731
bound = (
    (ab32.sqrt() - ab64.sqrt()).abs() * per_image_max(x0_probe)
    + ((1 - ab32).sqrt() - (1 - ab64).sqrt()).abs() * per_image_max(eps_probe)
    + 3 * 2.0**-24 * per_image_max(ours)  # float32 products and sum
)
gap = per_image_max(theirs.double() - ours)
RESULTS["add_noise_gap_over_bound_max"] = float((gap / bound).max())
print(f"max |add_noise(k) - q_sample(t = k + 1)| = {RESULTS['add_noise_vs_q_sample_max_abs']:.1e}"
      f" (rounding bounds {', '.join(f'{b:.1e}' for b in bound.tolist())} for k = "
      f"{k.tolist()}); t = k: {RESULTS['add_noise_vs_q_sample_at_k_max_abs']:.2f}")  # fmt: skip
assert bool((gap <= bound).all()) and RESULTS["add_noise_vs_q_sample_max_abs"] < 1e-5
assert RESULTS["add_noise_vs_q_sample_at_k_max_abs"] > 1e-2  # the check can fail

# %% [markdown]
# ## 2. One sampler, two spellings: `DDIMScheduler.step` and difflab's `ddim`
#
# In diffusers a sampler is a *scheduler* object plus a loop you write: set the number of
# steps, then for each timestep call the network and `scheduler.step`. In difflab it is one
# function of (denoiser, $x_T$, time grid). For deterministic DDIM ($\eta = 0$) both compute
# [Song 2021 (DDIM), Eq. 12] from time $t$ to the next grid time $s$:
#
# $$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}},\qquad
#   x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s}\,\hat\epsilon .$$
#
# To compare the samplers alone, the model is one without training error: for Gaussian data
# $x_0 \sim \mathcal{N}(m, C)$ the best noise prediction is known in closed form
# (`oracles.GaussianDenoiser`, tutorial 8). The diffusers loop calls it at $t = k + 1$. Its
# schedule is diffusers' own float32 $\bar\alpha$ (read into a difflab `DiscreteSchedule`), so
# that only rounding can separate the two; the settings `timestep_spacing="trailing"`,
# `set_alpha_to_one=True` and `steps_offset=0` are difflab's trailing grid
# $1000, 900, \dots, 100, 0$ ([docs/diffusers.md](../docs/diffusers.md)).

# %%
shape_g = (6, 3, 8, 8)  # Gaussian "images": D = 192 numbers each
D = math.prod(shape_g[1:])
basis = torch.randn(D, D, dtype=F64, generator=seeded(2)) / math.sqrt(D)
gauss_mean = 0.3 * torch.randn(D, dtype=F64, generator=seeded(3))
gauss_cov = 0.2 * basis @ basis.T + 0.01 * torch.eye(D, dtype=F64)

ddim_scheduler = diffusers.DDIMScheduler(
    num_train_timesteps=T, beta_schedule="linear", timestep_spacing="trailing",
    set_alpha_to_one=True, steps_offset=0, clip_sample=False, prediction_type="epsilon",
)  # fmt: skip
ab32 = torch.cat([torch.ones(1), ddim_scheduler.alphas_cumprod]).double()  # float32 values
sched32 = DiscreteSchedule(1 - ab32[1:] / ab32[:-1])
exact = GaussianDenoiser(gauss_mean, gauss_cov, sched32)


def eps_model(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The exact noise prediction, called the diffusers way: at timestep k = t - 1."""
    t = torch.full((x.shape[0],), float(k) + 1, dtype=F64)
    return exact(x, t).eps


ddim_scheduler.set_timesteps(10)
grid = sampling_timesteps(sched32, 10, spacing="trailing")
print("diffusers timesteps k:", ddim_scheduler.timesteps.tolist())
print("difflab grid t:       ", [int(t) for t in grid])
assert torch.equal(ddim_scheduler.timesteps.double() + 1, grid[:-1])

# one step, k = 999 -> 899, against Eq. 12 written out and difflab's ddim on the grid [1000, 900]
x_T = torch.randn(shape_g, dtype=F64, generator=seeded(4))
one_step = ddim_scheduler.step(eps_model(x_T, torch.tensor(999)), 999, x_T, eta=0.0)
ab_t, ab_s = float(sched32.alpha_bar[1000]), float(sched32.alpha_bar[900])
eps_hat = eps_model(x_T, torch.tensor(999))
x0_hat = (x_T - math.sqrt(1 - ab_t) * eps_hat) / math.sqrt(ab_t)
by_hand = math.sqrt(ab_s) * x0_hat + math.sqrt(1 - ab_s) * eps_hat  # Eq. 12, eta = 0
ours_one = ddim(exact, x_T, torch.tensor([1000.0, 900.0], dtype=F64), schedule=sched32)
RESULTS["ddim_one_step_diffusers_vs_hand_max_abs"] = max_abs(one_step.prev_sample, by_hand)
RESULTS["ddim_one_step_difflab_vs_hand_max_abs"] = max_abs(ours_one, by_hand)
assert RESULTS["ddim_one_step_diffusers_vs_hand_max_abs"] < 1e-6
assert RESULTS["ddim_one_step_difflab_vs_hand_max_abs"] < 1e-10

# the whole loop, the diffusers way, from the same x_T
x = x_T.clone()
for k in ddim_scheduler.timesteps:
    x = ddim_scheduler.step(eps_model(x, k), k, x, eta=0.0).prev_sample
ours_loop = sample(
    exact, sched32, shape_g, sampler="ddim", steps=10, spacing="trailing", eta=0.0,
    generator=seeded(4), dtype=F64,  # draws the same x_T from the same seed
)  # fmt: skip
RESULTS["ddim_loop_diffusers_vs_difflab_max_abs"] = max_abs(x, ours_loop)
print(f"10 DDIM steps: max |diffusers - difflab| = "
      f"{RESULTS['ddim_loop_diffusers_vs_difflab_max_abs']:.1e} (samples of size "
      f"{float(ours_loop.abs().max()):.1f})")  # fmt: skip
assert RESULTS["ddim_loop_diffusers_vs_difflab_max_abs"] < 1e-6
x = x_T.clone()  # the slip: the model called at t = k
for k in ddim_scheduler.timesteps:
    t_wrong = torch.full((x.shape[0],), float(k), dtype=F64)
    x = ddim_scheduler.step(exact(x, t_wrong).eps, k, x, eta=0.0).prev_sample
RESULTS["ddim_loop_model_at_k_max_abs"] = max_abs(x, ours_loop)
assert RESULTS["ddim_loop_model_at_k_max_abs"] > 1e-3

# %% [markdown]
# The tolerance $10^{-6}$: diffusers forms its coefficients from float32 $\bar\alpha$ values
# (about $6 \cdot 10^{-8}$ relative rounding each), and the ten steps carry values of size
# $\sim 1$; the gap we see is of that order, while the model called at $t = k$ instead of
# $k + 1$ moves the samples by more than $10^{-3}$ (checked above; exercise 3 shows a way a
# comparison can miss such a slip).
#
# ## 3. `UNet2DModel` and `build_unet`: the same network
#
# difflab's U-Net in the DDPM layout [Ho 2020, Appendix B] is diffusers' `UNet2DModel` with
# another naming of the weights. `tiny-ddpm` is that layout at toy size (two levels of 16 and 32
# channels, attention at 8 x 8); `diffusers_config_from_unet` writes its `UNet2DModel` config
# and `state_dict_to_diffusers` renames (and, for the attention, splits) its weights. The time
# shift is folded into the weights: a sin/cos feature of $k + 1$ is a fixed rotation of the
# features of $k$, which the first layer of the time MLP absorbs, so the converted network
# called at $k$ computes what difflab's computes at $t = k + 1$.
#
# A fresh difflab U-Net outputs exactly zero (its last layers start at zero, so every block
# starts as the identity), and two zeros agree whatever the mapping. So we first add random
# noise to every weight.
#
# The tolerance: both networks run in float32, and the sin/cos features of a time near 1000
# have arguments of up to 1000 radians, which float32 stores to about $6 \cdot 10^{-5}$; that
# error passes through the time MLP into every block, so outputs of size $\sim 1$ agree to
# $10^{-5}$ to $10^{-4}$. Calling the diffusers network at $t$ instead of $k = t - 1$ changes
# them by more than $10^{-2}$.

# %%
torch.manual_seed(0)  # the initial weights
unet = build_unet("tiny-ddpm", in_channels=3)  # 3 x 16 x 16 images
with torch.no_grad():
    g = seeded(5)
    for p in unet.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
unet.eval()
their_config = diffusers_config_from_unet(unet.config)
shown = ["sample_size", "block_out_channels", "down_block_types", "up_block_types"]
shown += ["layers_per_block", "freq_shift", "flip_sin_to_cos", "resnet_time_scale_shift"]
for key in shown:  # a few entries of the UNet2DModel config
    print(f"  {key:24s} {their_config[key]}")
their_unet = diffusers.UNet2DModel(
    **{k: v for k, v in their_config.items() if not k.startswith("_")}
).eval()
their_unet.load_state_dict(state_dict_to_diffusers(unet.state_dict(), unet.config))
n_ours = sum(p.numel() for p in unet.parameters())
n_theirs = sum(p.numel() for p in their_unet.parameters())
print(f"parameters: difflab {n_ours}, diffusers {n_theirs}")
assert n_ours == n_theirs

x_probe = torch.randn(3, 3, 16, 16, generator=seeded(6))
k_probe = torch.tensor([0.0, 250.0, 999.0])
with torch.no_grad():
    out_theirs = their_unet(x_probe, k_probe).sample
    out_ours = unet(x_probe, k_probe + 1)  # t = k + 1
    out_shifted = unet(x_probe, k_probe)  # the slip: t = k
RESULTS["unet_forward_max_abs"] = max_abs(out_theirs, out_ours)
RESULTS["unet_forward_at_k_max_abs"] = max_abs(out_theirs, out_shifted)
RESULTS["unet_output_scale"] = float(out_theirs.abs().max())
print(f"max |UNet2DModel(x, k) - difflab UNet(x, k + 1)| = {RESULTS['unet_forward_max_abs']:.1e}"
      f" (outputs up to {RESULTS['unet_output_scale']:.2f}); at t = k: "
      f"{RESULTS['unet_forward_at_k_max_abs']:.1e}")  # fmt: skip
assert RESULTS["unet_forward_max_abs"] < 1e-4  # float32 round-off (see below)
assert RESULTS["unet_forward_at_k_max_abs"] > 1e-2  # the check can fail

# and back: the diffusers weights read into difflab's layout are the weights we started with
back_config = unet_config_from_diffusers(their_config)
back = state_dict_from_diffusers(
    their_unet.state_dict(), back_config, flip_sin_to_cos=their_config["flip_sin_to_cos"]
)
RESULTS["unet_weights_round_trip_max_abs"] = max(
    max_abs(back[name], w) for name, w in unet.state_dict().items()
)
assert back_config == unet.config
assert RESULTS["unet_weights_round_trip_max_abs"] < 1e-6  # the time rotation, there and back

# %% [markdown]
# ## 4. A training step: `add_noise`, `UNet2DModel`, MSE against `diffusion_loss`
#
# The training loop of the Hugging Face course, in diffusers' spelling: draw a timestep
# $k \in \{0, \dots, T - 1\}$ and noise, `noisy = scheduler.add_noise(x0, noise, k)`, call the
# network at $k$ and take `F.mse_loss(prediction, noise)`. difflab's `diffusion_loss` does the
# same in one call (the $\epsilon$ target, uniform weighting) and accepts the time and the noise,
# so both can be fed the same draws: $t = k + 1$. With the two networks of section 3 (the same
# weights) the two losses agree to float32 rounding; feeding difflab $t = k$ does not.

# %%
x0_batch = torch.rand(8, 3, 16, 16, generator=seeded(20)) * 2 - 1
noise_batch = torch.randn(x0_batch.shape, generator=seeded(21))
k_batch = torch.randint(0, T, (8,), generator=seeded(22))
with torch.no_grad():
    noisy = ddpm_scheduler.add_noise(x0_batch, noise_batch, k_batch)
    loss_theirs = torch.nn.functional.mse_loss(their_unet(noisy, k_batch).sample, noise_batch)
    eps_denoiser = ModelDenoiser(unet, sched, parameterization="eps")
    loss_ours = diffusion_loss(eps_denoiser, x0_batch, t=(k_batch + 1).double(), noise=noise_batch)
    loss_at_k = diffusion_loss(eps_denoiser, x0_batch, t=k_batch.double(), noise=noise_batch)
RESULTS["train_step_loss_rel"] = abs(float(loss_ours.loss) / float(loss_theirs) - 1)
RESULTS["train_step_loss_at_k_rel"] = abs(float(loss_at_k.loss) / float(loss_theirs) - 1)
print(f"diffusers' training loss {float(loss_theirs):.6f}, diffusion_loss "
      f"{float(loss_ours.loss):.6f} (relative difference {RESULTS['train_step_loss_rel']:.1e}); "
      f"at t = k: {float(loss_at_k.loss):.6f}")  # fmt: skip
assert RESULTS["train_step_loss_rel"] < 1e-5
assert RESULTS["train_step_loss_at_k_rel"] > 1e-4  # the check can fail

# %% [markdown]
# ## 5. Stable Diffusion's DDIM settings: `leading`, `steps_offset=1`, `set_alpha_to_one=False`
#
# Section 2 used the settings that make diffusers' DDIM difflab's trailing grid. Stable
# Diffusion's scheduler config is different, and a student copying it gets another sampler:
#
# * `timestep_spacing="leading"` with `steps_offset=1`: the timesteps are $k = j\,(T/N) + 1$,
#   $j = N - 1, \dots, 0$, i.e. $901, 801, \dots, 101, 1$ for $N = 10$, so difflab times
#   $t = 902, 802, \dots, 2$: the first call is far from $t = T$ (a "leading" grid never
#   reaches $T$ [Lin 2024]);
# * `set_alpha_to_one=False`: the last step goes to `alphas_cumprod[0]`, that is
#   $\bar\alpha_1$, not to $\bar\alpha_0 = 1$: the sample is left at noise level
#   $\sqrt{1 - \bar\alpha_1} = 0.029$ (Stable Diffusion's $\beta_1 = 0.00085$).
#
# difflab's `ddim` runs on any grid of times, so the same sampler is `ddim` on
# $[902, 802, \dots, 2, 1]$. The check: equal to diffusers to rounding on the exact Gaussian
# denoiser (with diffusers' float32 $\bar\alpha$, as in section 2), and different from
# difflab's own `leading` grid ($901, \dots, 1, 0$) and from the same grid ending at $t = 0$.


# %%
def float32_schedule(scheduler) -> DiscreteSchedule:
    """A difflab schedule with a diffusers scheduler's float32 alphas_cumprod exactly."""
    ab = torch.cat([torch.ones(1), scheduler.alphas_cumprod]).double()
    return DiscreteSchedule(1 - ab[1:] / ab[:-1])


def diffusers_ddim_loop(scheduler, denoiser, x: torch.Tensor) -> torch.Tensor:
    for k in scheduler.timesteps:
        t = torch.full((x.shape[0],), float(k) + 1, dtype=F64)
        x = scheduler.step(denoiser(x, t).eps, k, x, eta=0.0).prev_sample
    return x


sd_scheduler = diffusers.DDIMScheduler(
    num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
)  # fmt: skip
sd_scheduler.set_timesteps(10)
sd32 = float32_schedule(sd_scheduler)
exact_sd = GaussianDenoiser(gauss_mean, gauss_cov, sd32)
sd_grid = torch.cat([sd_scheduler.timesteps.double() + 1, torch.ones(1, dtype=F64)])
print("Stable Diffusion's DDIM timesteps k:", sd_scheduler.timesteps.tolist())
print("as a difflab grid t:                ", [int(t) for t in sd_grid])
theirs_sd = diffusers_ddim_loop(sd_scheduler, exact_sd, x_T)
ours_sd = ddim(exact_sd, x_T, sd_grid, schedule=sd32)
to_zero = ddim(exact_sd, x_T, torch.cat([sd_grid[:-1], torch.zeros(1, dtype=F64)]), schedule=sd32)
plain_leading = ddim(exact_sd, x_T, sampling_timesteps(sd32, 10, spacing="leading"), schedule=sd32)
RESULTS["sd_ddim_vs_difflab_grid_max_abs"] = max_abs(theirs_sd, ours_sd)
RESULTS["sd_ddim_vs_ending_at_0_max_abs"] = max_abs(theirs_sd, to_zero)
RESULTS["sd_ddim_vs_difflab_leading_max_abs"] = max_abs(theirs_sd, plain_leading)
print(f"max |diffusers - difflab ddim on {[int(t) for t in sd_grid[-3:]]}| = "
      f"{RESULTS['sd_ddim_vs_difflab_grid_max_abs']:.1e}; the same grid ending at 0: "
      f"{RESULTS['sd_ddim_vs_ending_at_0_max_abs']:.3f}; difflab's leading grid: "
      f"{RESULTS['sd_ddim_vs_difflab_leading_max_abs']:.3f}; sqrt(1 - alpha_bar_1) = "
      f"{math.sqrt(1 - float(sd32.alpha_bar[1])):.3f}")  # fmt: skip
assert RESULTS["sd_ddim_vs_difflab_grid_max_abs"] < 1e-6
assert RESULTS["sd_ddim_vs_ending_at_0_max_abs"] > 1e-3
assert RESULTS["sd_ddim_vs_difflab_leading_max_abs"] > 1e-3
RESULTS["sd_final_noise_level"] = math.sqrt(1 - float(sd32.alpha_bar[1]))
assert abs(RESULTS["sd_final_noise_level"] - 0.029) < 5e-4  # where the SD config stops

# %% [markdown]
# ## 6. When the number of steps does not divide $T$
#
# `DDIMScheduler` lists its timesteps on the chosen grid, but each `step` goes from $k$ to
# $k - T // N$. When $N$ divides $T$ that is the next listed timestep. When it does not
# (e.g. $N = 30$, $T // N = 33$; trailing timesteps $999, 966, 932, \dots$), the step from 966
# lands on 933 while the next call treats the sample as being at 932: every few steps the
# sample's noise level and the level the network is told differ by one step, so the loop is
# not DDIM on any one grid. difflab steps from each grid time to the next [Song 2021 (DDIM),
# Eq. 12 on a sub-sequence]. With the exact denoiser, over a range of step counts $N$, the two
# agree to rounding ($< 10^{-6}$) exactly when $N$ divides 1000, and differ by more than
# $10^{-4}$ otherwise: by about $10^{-2}$ typically, and least (about $8 \cdot 10^{-4}$) when
# $T \bmod N = 1$, where a single call is one step off.
# The figure shows, for $N = 30$, the calls at which the network is told the wrong timestep.

# %%
lin32 = float32_schedule(ddim_scheduler)
gap_by_n = {}
for n_steps in pick((4, 5, 7, 8, 9, 10, 16, 20, 25, 30, 40, 50), range(2, 51)):
    ddim_scheduler.set_timesteps(n_steps)
    theirs_n = diffusers_ddim_loop(ddim_scheduler, exact, x_T)
    ours_n = ddim(
        exact, x_T, sampling_timesteps(lin32, n_steps, spacing="trailing"), schedule=lin32
    )
    gap_by_n[n_steps] = max_abs(theirs_n, ours_n)
for n_steps in (10, 50, 30, 7, 9):
    print(f"N = {n_steps:2d} (T % N = {T % n_steps:2d}): max |diffusers - difflab| = "
          f"{gap_by_n[n_steps]:.1e}")  # fmt: skip
RESULTS["ddim_n10_gap"], RESULTS["ddim_n30_gap"] = gap_by_n[10], gap_by_n[30]
divides = {n: T % n == 0 for n in gap_by_n}
RESULTS["ddim_gap_max_when_n_divides"] = max(g for n, g in gap_by_n.items() if divides[n])
RESULTS["ddim_gap_min_otherwise"] = min(g for n, g in gap_by_n.items() if not divides[n])
ddim_scheduler.set_timesteps(10)  # back to section 2's ten steps
assert RESULTS["ddim_gap_max_when_n_divides"] < 1e-6 < 1e-4 < RESULTS["ddim_gap_min_otherwise"]

ddim_scheduler.set_timesteps(30)
listed = ddim_scheduler.timesteps.tolist()
landed = [k - T // 30 for k in listed[:-1]]  # where each step puts the sample
told = listed[1:]  # the timestep the next call gives the network
mismatch = [a - b for a, b in zip(told, landed)]
print(f"N = 30: the network is told a timestep one step off in {sum(map(bool, mismatch))} of "
      f"{len(mismatch)} calls")  # fmt: skip
assert any(mismatch)
ddim_scheduler.set_timesteps(10)

fig, axes = new_figure(1, 2, (10, 3.6))
axes[0, 0].bar(range(1, len(mismatch) + 1), mismatch, color="C3")
axes[0, 0].set(xlabel="call", ylabel="told - actual timestep", ylim=(-1.5, 1.5),
               title="diffusers' DDIM, N = 30: the sample's step vs the network's")  # fmt: skip
for flag, colour, label in ((True, "C0", "N divides 1000"), (False, "C3", "it does not")):
    ns = [n for n in gap_by_n if divides[n] == flag]
    axes[0, 1].semilogy(ns, [max(gap_by_n[n], 1e-17) for n in ns], "o", color=colour, label=label)
axes[0, 1].set(xlabel="steps N", ylabel="max |diffusers - difflab|",
               title="DDIM, trailing, exact denoiser")  # fmt: skip
axes[0, 1].legend(fontsize=8)
save(fig, "11_grids_and_step_counts.png")

# %% [markdown]
# ## 7. `pred_original_sample` along the loop, and difflab's callback
#
# Each `DDIMScheduler.step` returns, besides `prev_sample`, the $\hat x_0$ it used:
# `pred_original_sample`, the picture a diffusers user plots to watch a sample form. difflab's
# samplers pass the same thing to a `callback` as `info["x0_hat"]` at every step (with `t`,
# `t_next` and the current `x`). Compared step by step on the ten-step loop of section 2, they
# agree to $10^{-4}$: the first steps divide by $\sqrt{\bar\alpha_T} \approx 1/157$, which
# magnifies diffusers' float32 rounding of about $10^{-7}$ a hundredfold; from the third step
# on they agree to a few $10^{-7}$ (under $10^{-6}$, checked).

# %%
x = x_T.clone()
theirs_x0 = []
for k in ddim_scheduler.timesteps:
    out = ddim_scheduler.step(eps_model(x, k), k, x, eta=0.0)
    theirs_x0.append(out.pred_original_sample)
    x = out.prev_sample
ours_x0: list[torch.Tensor] = []
sample(
    exact, sched32, shape_g, sampler="ddim", steps=10, spacing="trailing", generator=seeded(4),
    dtype=F64, callback=lambda info: ours_x0.append(info["x0_hat"]),
)  # fmt: skip
x0_gaps = [max_abs(a, b) for a, b in zip(theirs_x0, ours_x0)]
RESULTS["pred_original_sample_max_abs"] = max(x0_gaps)
print("max |pred_original_sample - x0_hat| per step:", ", ".join(f"{v:.0e}" for v in x0_gaps))
assert len(ours_x0) == len(theirs_x0) == 10 and RESULTS["pred_original_sample_max_abs"] < 1e-4
RESULTS["pred_original_sample_late_max_abs"] = max(x0_gaps[2:])
assert RESULTS["pred_original_sample_late_max_abs"] < 1e-6  # once 1 / alpha_t is small

# %% [markdown]
# ## 8. `variance_type`: the variance of an ancestral step
#
# `DDPMScheduler(variance_type=...)` picks the variance of the noise added at each DDPM step
# [Ho 2020, Sec. 3.2]: `"fixed_small"` is the posterior variance
# $\tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\beta_t$ (difflab's `ddpm`
# sampler with `variance="small"`, the default), `"fixed_large"` is $\beta_t$
# (`variance="large"`), and `"learned_range"` reads an interpolation between their logarithms
# from a second half of the network's output [Nichol & Dhariwal 2021] (difflab's
# `ModelDenoiser(learned_variance=True)`, tutorial 10). Both fixed choices, at every
# timestep, against difflab's `grid_posterior` on the full grid (diffusers' float32
# $\bar\alpha$ again); diffusers floors the last variance, which is 0, at $10^{-20}$, so the
# last step is left out. The tolerance: diffusers forms $\beta_t = 1 - \bar\alpha_t /
# \bar\alpha_{t-1}$ and $1 - \bar\alpha_{t-1}$ in float32, and near $t = 1$ these small
# numbers ($\beta_t \approx 10^{-4}$) keep only a few digits: an absolute error of about
# $2^{-24} \approx 6 \cdot 10^{-8}$ each, so a relative error up to about $4 \cdot
# 2^{-24} / \beta_t$ ($2 \cdot 10^{-3}$ at $t = 2$, $10^{-5}$ at $t = T$). Each timestep is
# checked against its own bound; the variance of the neighbouring step ($t = k$) misses it.

# %%
full_grid = torch.arange(T, -1, -1, dtype=F64)
posterior = grid_posterior(lin32, full_grid)
for variance_type, key in (("fixed_small", "beta_tilde"), ("fixed_large", "beta_step")):
    ddpm_v = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=variance_type)
    ddpm_v.set_timesteps(T)
    theirs_var = torch.tensor(
        [float(ddpm_v._get_variance(k)) for k in ddpm_v.timesteps[:-1]], dtype=F64
    )
    ours_var = posterior[key][: T - 1]  # t = T .. 2; the last step (t = 1 -> 0) is left out
    rel_bound = 4 * 2.0**-24 / posterior["beta_step"][: T - 1]
    rel = (theirs_var / ours_var - 1).abs()
    rel_slip = (theirs_var / posterior[key][1:T] - 1).abs()  # the variance of t - 1 instead
    RESULTS[f"variance_{variance_type}_max_rel"] = float(rel.max())
    RESULTS[f"variance_{variance_type}_over_bound"] = float((rel / rel_bound).max())
    print(f"{variance_type}: max relative difference from difflab's {key} "
          f"{RESULTS[f'variance_{variance_type}_max_rel']:.1e}, at most "
          f"{RESULTS[f'variance_{variance_type}_over_bound']:.2f} of its bound; one step off: "
          f"{float(rel_slip.min()):.1e} at least")  # fmt: skip
    assert bool((rel <= rel_bound).all()) and bool((rel_slip > rel_bound).all())

# %% [markdown]
# ## 9. Euler and DPM-Solver++(2M): the same solvers, one difference in the time input
#
# `EulerDiscreteScheduler` and `DPMSolverMultistepScheduler` work with the noise level
# $\sigma = \sigma_t / \alpha_t$ (EDM's, tutorial 8) and, on a Karras grid, call the network
# at a timestep found by interpolating $\log\sigma$ between integer steps (DPM-Solver rounds
# it). difflab calls the network at the exact time of the noise level, so on a Karras grid the
# *network* sees slightly different times; `DiffusersTimeDenoiser` reproduces diffusers'
# choice, and with it difflab's `euler` and `dpm++2m` give diffusers' numbers to float32
# rounding. Euler scales its input: diffusers keeps $x / \alpha$ (variance-exploding form,
# `init_noise_sigma` times the noise at the start, `scale_model_input` before each call),
# difflab keeps $x$ itself, so the starting points correspond by $x = \alpha\,y$. On the
# networks of section 3, 8 Karras steps each, with their outputs read as $v$ (tutorial 7):
# read as $\hat\epsilon$, the networks' float32 disagreement of about $10^{-5}$ (section 3)
# would be multiplied by $\sigma$, up to 157, in $\hat x_0$, while $\hat x_0 = \alpha_t x_t -
# \sigma_t \hat v$ multiplies it by at most 1; so the solvers are compared, not the networks.

# %%
x_probe8 = torch.randn(2, 3, 16, 16, generator=seeded(23))
solver_gaps = {}
for name, scheduler, time_input in (
    ("euler", diffusers.EulerDiscreteScheduler, "log_sigma"),
    ("dpm++2m", diffusers.DPMSolverMultistepScheduler, "log_sigma_rounded"),
):
    options = dict(
        num_train_timesteps=T, beta_schedule="linear", use_karras_sigmas=True,
        prediction_type="v_prediction",
    )  # fmt: skip
    if name == "dpm++2m":
        options.update(solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
                       final_sigmas_type="zero")  # fmt: skip
    sch = scheduler(**options)
    sch.set_timesteps(8)
    y = x_probe8 * sch.init_noise_sigma
    with torch.no_grad():
        for k in sch.timesteps:
            y = sch.step(their_unet(sch.scale_model_input(y, k), k).sample, k, y).prev_sample
    sch32 = float32_schedule(sch)
    den = DiffusersTimeDenoiser(unet, sch32, parameterization="v", time_input=time_input)
    ts = sampling_timesteps(sch32, 8, spacing="karras")
    start = x_probe8 * (sch.init_noise_sigma * float(sch32.alpha(ts[0])) if name == "euler" else 1)
    with torch.no_grad():
        ours_solver = SAMPLERS[name](den, start, ts, schedule=sch32)
    solver_gaps[name] = max_abs(y, ours_solver)
    print(f"{name}: 8 Karras steps, max |diffusers - difflab| = {solver_gaps[name]:.1e}")
RESULTS["euler_vs_diffusers_max_abs"] = solver_gaps["euler"]
RESULTS["dpmpp2m_vs_diffusers_max_abs"] = solver_gaps["dpm++2m"]
assert max(solver_gaps.values()) < 1e-4

# %% [markdown]
# ## 10. Latent models: `AutoencoderKL.scaling_factor`, `shift_factor` and difflab's scale
#
# A latent diffusion pipeline in diffusers multiplies the autoencoder's latents before the
# diffusion model sees them and undoes it before decoding: `latents = (z - shift_factor) *
# scaling_factor`, and `z = latents / scaling_factor + shift_factor` (both in the
# `AutoencoderKL` config; Stable Diffusion 1.x and 2.x use `scaling_factor = 0.18215` and no
# shift, later models such as SD3 add a shift). difflab's latent scale (tutorial 12) is the
# same idea without the shift: `encode_to_latents(ae, x, s)` returns $s z$ and
# `decode_latents(ae, z, s)` decodes $\mathcal{D}(z / s)$, with $s = 1/\mathrm{std}(z)$ from
# `latent_scale_factor` (the standard deviation about the pooled mean, so a latent with a mean
# still has unit *variance*, not zero mean). A diffusers config with `shift_factor` $m$ and
# `scaling_factor` $s$ corresponds to difflab's $s$ when $m = 0$; with $m \ne 0$ subtract it
# first. The numbers of Stable Diffusion's autoencoder: $s = 0.18215$ means its raw latents
# have a standard deviation of $1/0.18215 = 5.49$.

# %%
sd_scale = 0.18215
RESULTS["sd_latent_std"] = 1 / sd_scale
print(f"Stable Diffusion 1.x: scaling_factor {sd_scale} <-> latent std {1 / sd_scale:.2f}")

# %% [markdown]
# The check, on a small (untrained) diffusers `AutoencoderKL` and seven-segment digits, with a
# three-line adapter that gives it difflab's autoencoder interface (`encode` returns the
# posterior, `decode` the images): difflab's `latent_scale_factor` is $1/\mathrm{std}(z)$ of the
# raw latents, which is what a diffusers `scaling_factor` is set to; with `shift_factor` $m$ set
# to the mean of $z$, diffusers' latents $(z - m)\,s$ are difflab's $s z$ shifted by $m s$
# (zero mean and unit variance against unit variance alone); and both decode to the same images
# by their own inverse maps. Forgetting to add the shift back before decoding changes the images.


# %%
class AsDifflabAutoencoder:
    """A diffusers AutoencoderKL with difflab's interface: encode -> posterior, decode."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, x: torch.Tensor):
        return self.vae.encode(x).latent_dist  # has .mode() and .sample(generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


torch.manual_seed(0)  # the initial weights
vae = diffusers.AutoencoderKL(
    in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16,
).eval()  # fmt: skip
ae = AsDifflabAutoencoder(vae)
digits, _ = digit_like_images(64, 16, generator=seeded(30))
with torch.no_grad():
    z = vae.encode(digits).latent_dist.mode()  # raw latents (64, 2, 8, 8)
    s = latent_scale_factor(ae, [digits[:32], digits[32:]])
    m = float(z.double().mean())
    vae.register_to_config(scaling_factor=s, shift_factor=m)  # as a model's config holds them
    cfg = vae.config
    theirs_z = (z - cfg.shift_factor) * cfg.scaling_factor  # what a diffusers pipeline feeds
    ours_z = encode_to_latents(ae, digits, s)
    decoded_theirs = vae.decode(theirs_z / cfg.scaling_factor + cfg.shift_factor).sample
    decoded_ours = decode_latents(ae, ours_z, s)
    decoded_no_shift = vae.decode(theirs_z / cfg.scaling_factor).sample  # the slip
RESULTS["latent_scale_times_std_minus_1"] = abs(s * float(z.double().std()) - 1)
RESULTS["latents_theirs_vs_ours_minus_shift_max_abs"] = max_abs(theirs_z, ours_z - m * s)
RESULTS["latents_decoded_max_abs"] = max_abs(decoded_theirs, decoded_ours)
RESULTS["latents_decoded_without_shift_max_abs"] = max_abs(decoded_no_shift, decoded_ours)
print(f"raw latents: mean {m:.3f}, std {float(z.std()):.3f}; scale s = {s:.3f}")
print(
    f"difflab's s z: mean {float(ours_z.mean()):.3f}, std {float(ours_z.std()):.3f}; "
    f"diffusers' (z - m) s: mean {float(theirs_z.mean()):.1e}, std {float(theirs_z.std()):.3f}"
)
print(
    f"decoded: max |diffusers - difflab| = {RESULTS['latents_decoded_max_abs']:.1e}; "
    f"without adding the shift back: {RESULTS['latents_decoded_without_shift_max_abs']:.2f}"
)
assert RESULTS["latent_scale_times_std_minus_1"] < 1e-6
assert abs(float(ours_z.double().std()) - 1) < 1e-5 and abs(float(theirs_z.mean())) < 1e-5
assert RESULTS["latents_theirs_vs_ours_minus_shift_max_abs"] < 1e-5
assert RESULTS["latents_decoded_max_abs"] < 1e-5
assert RESULTS["latents_decoded_without_shift_max_abs"] > 1e-3  # the check can fail

# %% [markdown]
# ## Summary
#
# * diffusers' timestep $k = 0, \dots, T - 1$ is difflab's $t = k + 1$; difflab keeps $t = 0$
#   for the data, as the papers do. `add_noise` at $k$ is `q_sample` at $t = k + 1$.
# * A diffusers sampler is a scheduler plus a loop you write; difflab's `ddim` is the same
#   DDIM update [Song 2021, Eq. 12] and gives the same numbers, to float32 rounding of
#   diffusers' $\bar\alpha$.
# * `UNet2DModel` in the DDPM layout and difflab's U-Net are one network: `difflab.interop`
#   maps the configs and the weights both ways, folding the time shift into the weights. Compare
#   networks only after perturbing them: a fresh difflab U-Net outputs zero.
# * The course's training step (`add_noise`, the network at $k$, MSE to the noise) is
#   `diffusion_loss` with $t = k + 1$ and the same noise.
# * Stable Diffusion's DDIM config (`leading`, `steps_offset=1`, `set_alpha_to_one=False`) is
#   DDIM on the grid $902, 802, \dots, 2, 1$: it never starts at $T$ and stops at noise level
#   0.029; difflab runs it with `ddim` on that explicit grid. When $N$ does not divide $T$,
#   diffusers' DDIM steps off its own grid; difflab's does not, so the two differ there.
# * `pred_original_sample` is difflab's `callback` `x0_hat`; `variance_type` `fixed_small` /
#   `fixed_large` are $\tilde\beta_t$ / $\beta_t$; Euler and DPM-Solver++(2M) agree once the
#   network is told diffusers' interpolated time (`DiffusersTimeDenoiser`).
# * `AutoencoderKL.scaling_factor` is difflab's latent scale $s = 1/\mathrm{std}(z)$ (0.18215
#   for Stable Diffusion: latents of standard deviation 5.5); `shift_factor` subtracts a mean
#   first, which difflab's scale does not, so diffusers' latents are difflab's minus $m s$.
# * Your own images, `difflab train` and `difflab export` to a diffusers pipeline:
#   [docs/HOWTO.md](../docs/HOWTO.md).
#
# ## Try this
#
# 1. [Lin 2024] recommends `timestep_spacing="trailing"` and `set_alpha_to_one=True` for
#    Stable Diffusion's scheduler. Change those two settings in section 5's config: which of
#    difflab's grids does the loop follow now?
# 2. diffusers' `DDPMScheduler.get_velocity(x0, noise, k)` is the target of v-prediction
#    [Salimans & Ho 2022], $v = \alpha_t \epsilon - \sigma_t x_0$. Compare it with difflab's
#    `v_from_x0_eps` at the right time.
# 3. Compare two *fresh* difflab U-Nets converted to diffusers, with the diffusers network
#    called at the wrong time $t$ instead of $t - 1$. Does the check of section 3 catch the
#    slip?
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    fixed = diffusers.DDIMScheduler.from_config(
        sd_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    fixed.set_timesteps(10)
    theirs_fixed = diffusers_ddim_loop(fixed, exact_sd, x_T)
    ours_fixed = ddim(
        exact_sd, x_T, sampling_timesteps(sd32, 10, spacing="trailing"), schedule=sd32
    )
    RESULTS["answer_sd_trailing_vs_difflab_max_abs"] = max_abs(theirs_fixed, ours_fixed)
    print(f"1. timesteps {fixed.timesteps.tolist()}: difflab's trailing grid "
          f"{[int(t) for t in sampling_timesteps(sd32, 10, spacing='trailing')]}, max |diffusers"
          f" - difflab| = {RESULTS['answer_sd_trailing_vs_difflab_max_abs']:.1e}")  # fmt: skip
    assert RESULTS["answer_sd_trailing_vs_difflab_max_abs"] < 1e-6

    k_v = torch.tensor([0, 99, 499, 999])
    v_theirs = ddpm_scheduler.get_velocity(x0_probe, eps_probe, k_v)
    alpha_v, sigma_v = (c[:, None, None, None] for c in sched.alpha_sigma((k_v + 1).double()))
    v_ours = v_from_x0_eps(x0_probe.double(), eps_probe.double(), alpha_v, sigma_v)
    RESULTS["answer_get_velocity_max_abs"] = max_abs(v_theirs, v_ours)
    print(f"2. get_velocity(k) vs v at t = k + 1: {RESULTS['answer_get_velocity_max_abs']:.1e}")
    assert RESULTS["answer_get_velocity_max_abs"] < 1e-5

    fresh_a = build_unet("tiny-ddpm", in_channels=3).eval()
    fresh_b = diffusers.UNet2DModel(
        **{k: v for k, v in diffusers_config_from_unet(fresh_a.config).items() if k[0] != "_"}
    ).eval()
    fresh_b.load_state_dict(state_dict_to_diffusers(fresh_a.state_dict(), fresh_a.config))
    with torch.no_grad():
        slip = max_abs(fresh_b(x_probe, k_probe + 1).sample, fresh_a(x_probe, k_probe + 1))
    RESULTS["answer_fresh_unets_wrong_time_max_abs"] = slip
    print(f"3. fresh networks, wrong time: max |difference| = {slip:.1e}: the slip goes unseen")
    assert slip == 0.0

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
