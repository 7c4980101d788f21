"""EDM samplers [Karras 2022]: Heun or Euler (Algorithm 2) and Euler-ancestral, on any schedule.

The samplers integrate the probability-flow ODE in the scaled variable y = x / alpha with the EDM
noise level s = sigma / alpha = ``schedule.edm_sigma(t)`` [Karras 2022, Eq. 4 with s(t) = alpha]:

    dy/ds = (y - D(y; s)) / s,                        [Karras 2022, Eq. 1 with Eq. 3]

where D(y; s) = x0_hat is the denoiser called at x = alpha(t) y and t = t_from_edm_sigma(s). For
the EDM schedule (alpha = 1, sigma = t) y is x itself. A grid may start at pure noise
(alpha = 0, s = inf: t = 1 of the flow-matching schedule); the first step is then taken in
(1 / s, y / s), where the ODE stays finite (:func:`_step_from_pure_noise`). Notation:

==============  ==================  ==============================================
code            paper (Alg. 2)      meaning
==============  ==================  ==============================================
``s_cur``       t_i                 EDM noise level at step i
``s_hat``       t-hat_i             level after "increase noise temporarily"
``y_cur``       x_i                 the sample in the scaled variable
``d_cur``       d_i                 (x - D(x; t)) / t, the ODE direction
``s_churn``     S_churn             total stochasticity, spread over the steps
``s_tmin/max``  S_tmin, S_tmax      range of noise levels where churn is applied
``s_noise``     S_noise             noise inflation (slightly above 1 in the paper)
==============  ==================  ==============================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab._util import F64
from difflab.samplers.common import SamplerContext, coefficients, sampler

__all__ = ["edm_sampler", "euler_ancestral"]


@sampler
def edm_sampler(
    ctx: SamplerContext,
    x: Tensor,
    *,
    second_order: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """The EDM sampler [Karras 2022, Algorithm 2]: Heun's 2nd-order method with churn, or with
    ``second_order=False`` the Euler method (the sampler table's ``heun`` and ``euler``).

    Heun takes 2 NFE per step, except the last step to noise level 0, which is an Euler step
    (2 * steps - 1 NFE in total); Euler takes 1 NFE per step and with ``s_churn = 0`` equals
    DDIM with eta = 0 on the same grid.

    Args:
        second_order: apply the 2nd-order correction (Heun) or not (Euler).
        s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (see module table);
            s_tmin, s_tmax are EDM noise levels. The temporary noise increase is capped at the
            schedule's sigma_max.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be non-negative, got {s_churn}, {s_noise}")
    coef, schedule = ctx.coef, ctx.schedule
    y_cur = _scaled(x, coef["alpha"][0])
    for i, t_cur, t_next in ctx.steps():
        s_cur, s_next = coef["edm_sigma"][i], coef["edm_sigma"][i + 1]
        if math.isinf(s_cur):  # a grid that starts at pure noise (flow matching, alpha = 0)
            y_cur = _step_from_pure_noise(ctx, x, i, second_order)
            continue

        # Increase noise temporarily.
        gamma = min(s_churn / ctx.n, math.sqrt(2) - 1) if s_tmin <= s_cur <= s_tmax else 0.0
        s_hat = min(s_cur * (1 + gamma), schedule.sigma_max)  # the model ends at sigma_max
        if s_hat > s_cur:
            t_hat = float(schedule.t_from_edm_sigma(torch.tensor(s_hat, dtype=F64)))
            y_hat = y_cur + math.sqrt(s_hat**2 - s_cur**2) * s_noise * ctx.noise(y_cur)
            alpha_hat = coefficients(schedule, t_hat)[0]
        else:
            s_hat, t_hat, y_hat, alpha_hat = s_cur, t_cur, y_cur, coef["alpha"][i]

        # Euler step.
        x0_hat = ctx.denoise_and_report(alpha_hat * y_hat, i, t_cur, t_next, t_eval=t_hat).x0
        d_cur = (y_hat - x0_hat) / s_hat
        y_next = y_hat + (s_next - s_hat) * d_cur

        # 2nd-order correction.
        if second_order and s_next > 0:
            x0_next = ctx.denoise(coef["alpha"][i + 1] * y_next, t_next).x0  # D(y_next; s_next)
            d_prime = (y_next - x0_next) / s_next
            y_next = y_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        y_cur = y_next
    return coef["alpha"][-1] * y_cur


def _scaled(x: Tensor, alpha: float) -> Tensor:
    """y = x / alpha; at alpha = 0 (pure noise) y is infinite and x itself is kept until the
    first step (:func:`_step_from_pure_noise`) replaces it."""
    return x / alpha if alpha > 0 else x


def _step_from_pure_noise(ctx: SamplerContext, x: Tensor, i: int, second_order: bool) -> Tensor:
    """The step from s = inf (alpha = 0, e.g. t = 1 of the flow-matching schedule) to s_next.

    y = x / alpha is infinite there, but in z = y / s = x / sigma and r = 1 / s = alpha / sigma
    the probability-flow ODE is dz/dr = D(z; r) [Lu 2022b, Eq. 9: data prediction], a finite
    field that starts at r = 0. Euler there gives y_next = D + s_next eps_hat (the limit of the
    EDM Euler step, i.e. DDIM); with ``second_order`` Heun's correction averages D at both ends
    (one more network evaluation, as on every Heun step except the one to s = 0). Returns
    y_next = x_next / alpha_next.
    """
    coef = ctx.coef
    t_cur, t_next = float(ctx.ts[i]), float(ctx.ts[i + 1])
    s_next, sigma_cur = coef["edm_sigma"][i + 1], coef["sigma"][i]
    pred = ctx.denoise_and_report(x, i, t_cur, t_next)
    z, r_next = x / sigma_cur, (1.0 / s_next if s_next > 0 else math.inf)
    if math.isinf(r_next):  # a one-step grid: pure noise to data
        return pred.x0
    y_next = s_next * (z + r_next * pred.x0)  # Euler in (r, z): = x0_hat + s_next eps_hat
    if second_order:
        x0_next = ctx.denoise(coef["alpha"][i + 1] * y_next, t_next).x0
        y_next = s_next * (z + r_next * 0.5 * (pred.x0 + x0_next))
    return y_next


@sampler
def euler_ancestral(
    ctx: SamplerContext, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """Euler-ancestral sampling (k-diffusion's ``euler_a``) in y = x / alpha.

    A step s -> s' splits the posterior q(y_s' | y_s, y0) of the variance-exploding process
    into a deterministic Euler step down to s_down and fresh noise of std s_up:

        s_up = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2)),  s_down = sqrt(s'^2 - s_up^2),
        y <- y + (s_down - s) (y - D(y; s)) / s + s_noise * s_up * z.

    With eta = 1 this is exactly DDPM ancestral sampling with the posterior ("small") variance
    (s_up^2 is the posterior variance and s_down = s'^2 / s gives the posterior mean); with
    eta = 0 it is the Euler sampler. 1 NFE per step; no noise on the step to s' = 0.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    coef = ctx.coef
    y = _scaled(x, coef["alpha"][0])
    for i, t_cur, t_next in ctx.steps():
        s_cur, s_next = coef["edm_sigma"][i], coef["edm_sigma"][i + 1]
        ratio = s_next / s_cur  # 0 on a step from pure noise (s_cur = inf)
        s_up = min(s_next, eta * s_next * math.sqrt(1.0 - ratio**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        if math.isinf(s_cur):  # from pure noise (alpha = 0, y = x kept as is): the limit
            pred = ctx.denoise_and_report(y, i, t_cur, t_next)
            y = pred.x0 + s_down * pred.eps  # of the Euler step, as in _step_from_pure_noise
        else:
            x0_hat = ctx.denoise_and_report(coef["alpha"][i] * y, i, t_cur, t_next).x0
            y = y + (s_down - s_cur) * (y - x0_hat) / s_cur  # Euler step to s_down
        if s_up > 0:
            y = y + s_noise * s_up * ctx.noise(y)
    return coef["alpha"][-1] * y
