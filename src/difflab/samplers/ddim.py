"""DDIM sampling and inversion [Song 2021 (DDIM), Eq. 12], in alpha/sigma form.

A step t -> s (s < t) with the denoiser's (x0_hat, eps_hat) at (x_t, t) is

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,    z ~ N(0, I),

    c = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2)             [Song 2021, Eq. 16]

where sigma_{t|s}^2 sigma_s^2 / sigma_t^2 is the variance of q(x_s | x_t, x0) (beta-tilde), so
eta = 1 is DDPM ancestral sampling with the "small" variance and eta = 0 the deterministic DDIM
sampler, the Euler method for the probability-flow ODE in (x / alpha, sigma / alpha). With VP
schedules (alpha_s = sqrt(alpha_bar_s), sigma_s = sqrt(1 - alpha_bar_s)) this is Eq. 12 of the
paper; the alpha/sigma form also covers variance-exploding schedules (EDM).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.parameterization import Denoiser
from difflab.process import grid_posterior
from difflab.samplers.common import (
    Callback,
    SamplerContext,
    check_grid,
    report,
    sampler,
)
from difflab.schedules import Schedule

__all__ = ["ddim", "ddim_invert"]


@sampler
def ddim(ctx: SamplerContext, x: Tensor, *, eta: float = 0.0) -> Tensor:
    """DDIM sampling [Song 2021, Eq. 12] with stochasticity ``eta`` on the grid ``ts``, from the
    denoiser's (x0_hat, eps_hat).

    Args:
        eta: 0 for the deterministic sampler, 1 for DDPM's posterior variance; values above 1
            are allowed (the eps_hat coefficient is then clipped at 0).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    coef = ctx.coef
    post_var = grid_posterior(ctx.schedule, ctx.ts)["beta_tilde"].tolist() if eta > 0 else None
    for i, t, s in ctx.steps():
        pred = ctx.denoise_and_report(x, i, t, s)
        alpha_s, sigma_s = coef["alpha"][i + 1], coef["sigma"][i + 1]
        c = eta * math.sqrt(post_var[i]) if post_var is not None else 0.0  # Eq. (16)
        dir_coef = math.sqrt(max(sigma_s**2 - c**2, 0.0))
        x = alpha_s * pred.x0 + dir_coef * pred.eps  # Eq. (12) [Song 2021]
        if c > 0:
            x = x + c * ctx.noise(x)
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    ts_increasing: Tensor,
    *,
    schedule: Schedule,
    cond: Any = None,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM encoding x0 -> x_T: the eta = 0 steps run forward in time.

    A step t -> t' (t' > t) uses the noise estimate at the later time, eps_hat = D(x_t, t').eps
    (the network is not defined at t = 0, where x is clean data), the matching
    x0_hat = (x_t - sigma_t eps_hat) / alpha_t, and x_t' = alpha_t' x0_hat + sigma_t' eps_hat
    [Song 2021, Sec. 4.3 and Eq. 13: the ODE is reversible]. Running :func:`ddim` with eta = 0 on
    the reversed grid reconstructs x0 up to a discretisation error that vanishes as the grid is
    refined.

    Args:
        x0: data (or the sample at ``ts_increasing[0]``), shape (B, ...).
        ts_increasing: strictly increasing times, normally starting at 0.
    Returns:
        x at time ``ts_increasing[-1]``, same shape and dtype as ``x0``.
    """
    ts = check_grid(ts_increasing, schedule, increasing=True)
    ctx = SamplerContext(denoiser, schedule, ts, cond)
    coef = ctx.coef
    x = x0
    for i, t, t_next in ctx.steps():
        eps_hat = ctx.denoise(x, t_next).eps
        alpha_t, sigma_t = coef["alpha"][i], coef["sigma"][i]
        alpha_n, sigma_n = coef["alpha"][i + 1], coef["sigma"][i + 1]
        x0_hat = (x - sigma_t * eps_hat) / alpha_t
        report(callback, i, t, t_next, x, x0_hat)
        x = alpha_n * x0_hat + sigma_n * eps_hat  # Eq. (12) with eta = 0, forward in time
    return x
