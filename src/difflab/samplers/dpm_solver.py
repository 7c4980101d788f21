"""DPM-Solver++ [Lu 2022b]: exponential-integrator ODE solvers in data-prediction form.

With lambda = log(alpha / sigma) (half the log-SNR) the probability-flow ODE has the exact
solution [Lu 2022b, Sec. 4], for s < t and h = lambda_s - lambda_t > 0,

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lam x0_hat(lam) dlam.

Expanding x0_hat in a Taylor series in lambda around lambda_t and integrating each term exactly,
with phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:

    x_s = (sigma_s/sigma_t) x_t - alpha_s phi_1 D0 + alpha_s phi_2 D1 - 2 alpha_s phi_3 D2,

where D0 = x0_hat(lambda_t), D1 ~ h x0_hat' and D2 ~ h^2 x0_hat'' / 2 are estimated from earlier
denoiser outputs (multistep) or from an intermediate point (singlestep). (The factor 2 on the
last term is the Taylor coefficient int_0^h e^(u-h) u^2/2 du = -h^2 phi_3 divided by h^2 / 2;
with a factor 1 the third-order method would only converge at second order.) The second-order
methods use the paper's form -alpha_s phi_1 D1 / 2 for the D1 term (equal to alpha_s phi_2 D1
up to O(h^3)). Notation:

========  =====================================  =========================================
code      paper                                  meaning
========  =====================================  =========================================
``lam``   lambda_t                               log(alpha_t / sigma_t) = logsnr / 2
``h``     h_i = lambda_{t_i} - lambda_{t_{i-1}}  step size in lambda
``r``     r_i = h_{i-1} / h_i                    ratio of consecutive steps (multistep)
``d0``    D_i                                    denoiser output x0_hat at t_i
========  =====================================  =========================================

The step to t = 0 (sigma = 0, lambda = inf) returns x0_hat ("denoise to zero", first order):
the limit h -> inf of the first-order update. A step from pure noise (alpha = 0, lambda = -inf:
t = 1 of the flow-matching schedule) has h = inf too: the first-order update is then its limit
x_s = (sigma_s / sigma_t) x_t + alpha_s D (DDIM), and the multistep corrections vanish
(r = inf), so the history starts there without extrapolating across an infinite step.

SDE-DPM-Solver++ [Lu 2022b, Sec. 5 and App.] solves, in the same variables, the family of
reverse SDEs with the data's marginals dx = [f x - (1 + eta) g^2 / 2 score] dt + sqrt(eta) g dw
(eta = 0: the probability-flow ODE, eta = 1: the reverse diffusion SDE). With k = 1 + eta its
linear part is again integrated exactly, and the noise it injects over a step has the exact
variance of that step:

    x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-k h}) D
          + sigma_s sqrt(1 - e^{-2 eta h}) z,                    z ~ N(0, I).

With eta = 1 and D = D_i this first-order step is DDPM's posterior step (DDIM with eta = 1);
the second-order multistep method adds alpha_s (1 - e^{-k h}) (D_i - D_{i-1}) / (2 r), which for
eta = 0 is DPM-Solver++(2M) itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab._util import F64
from difflab.samplers.common import SamplerContext, coefficients, sampler
from difflab.schedules import Schedule

__all__ = ["dpm_solver_pp", "dpmpp_2s", "dpmpp_sde"]

_LOWER_ORDER_FINAL_BELOW = 15  # grids with fewer steps use lower orders at the end


def _lam(schedule: Schedule, t: float) -> float:
    """lambda_t = logsnr(t) / 2 as a float (inf at t = 0)."""
    return math.inf if t == 0 else float(schedule.logsnr(torch.tensor(t, dtype=F64))) / 2


def _step_order(order: int, i: int, n: int, lower_order_final: bool) -> int:
    """The order step i of n may use: ``order``, lowered to n - i on grids of fewer than 15
    steps with ``lower_order_final``."""
    if lower_order_final and n < _LOWER_ORDER_FINAL_BELOW:
        return min(order, n - i)
    return order


def _first_order(x: Tensor, d: Tensor, sigma_ratio: float, alpha_s: float, h: float) -> Tensor:
    """x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D, DPM-Solver++1 [Lu 2022b] (= DDIM)."""
    return sigma_ratio * x - alpha_s * math.expm1(-h) * d


@sampler
def dpm_solver_pp(
    ctx: SamplerContext, x: Tensor, *, order: int = 2, lower_order_final: bool = True
) -> Tensor:
    """Multistep DPM-Solver++ of order 1, 2 or 3 [Lu 2022b; order 2 is Algorithm 2].

    The first steps use the highest order the stored history allows (1, then 2, ...); the
    step to t = 0 returns x0_hat. Order 1 is DDIM with eta = 0. Deterministic.

    Args:
        order: 1, 2 or 3.
        lower_order_final: on grids of fewer than 15 steps, step i of n uses order at most
            n - i (the last steps, the largest in lambda on a Karras grid, are the least
            stable for a high-order extrapolation; the rule of the DPM-Solver reference code).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be one of: 1, 2, 3, got {order!r}")
    coef = ctx.coef
    history: list[tuple[Tensor, float]] = []  # (D_j, lambda_j), most recent last
    for i, t, s in ctx.steps():
        d0 = ctx.denoise_and_report(x, i, t, s).x0
        lam_t, lam_s = coef["lam"][i], coef["lam"][i + 1]
        history = [*history[-2:], (d0, lam_t)]
        if s == 0:
            x = d0  # denoise to zero
            continue
        alpha_s, sigma_s = coef["alpha"][i + 1], coef["sigma"][i + 1]
        sigma_t = coef["sigma"][i]
        h = lam_s - lam_t
        k = min(len(history), _step_order(order, i, ctx.n, lower_order_final))
        phi_1 = math.expm1(-h)
        x = (sigma_s / sigma_t) * x - alpha_s * phi_1 * d0  # first order [Lu 2022b]
        if k == 2:
            d_1, lam_1 = history[-2]
            r = (lam_t - lam_1) / h
            # D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}  [Lu 2022b, Algorithm 2]
            x = x - alpha_s * phi_1 * (d0 - d_1) / (2 * r)
        elif k == 3:
            (d_2, lam_2), (d_1, lam_1) = history[-3], history[-2]
            r0, r1 = (lam_t - lam_1) / h, (lam_1 - lam_2) / h
            d1_0 = (d0 - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # ~ h x0_hat'
            d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0_hat'' / 2
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = x + alpha_s * phi_2 * d1 - 2.0 * alpha_s * phi_3 * d2  # Taylor terms 1, 2
    return x


@sampler
def dpmpp_2s(ctx: SamplerContext, x: Tensor, *, r: float = 0.5) -> Tensor:
    """DPM-Solver++(2S), second-order singlestep [Lu 2022b, Algorithm 1]; 2 NFE per step.

    Per step: an intermediate point u at lambda_t + r h by a first-order step, then
    D = (1 - 1/(2r)) D_t + 1/(2r) D(u) and x_s = (sigma_s/sigma_t) x_t - alpha_s phi_1 D.
    The step to t = 0 returns x0_hat (1 NFE). Deterministic.
    """
    if not 0 < r < 1:
        raise ValueError(f"r must lie in (0, 1), got {r}")
    coef, schedule = ctx.coef, ctx.schedule
    for i, t, s in ctx.steps():
        d_t = ctx.denoise_and_report(x, i, t, s).x0
        if s == 0:
            x = d_t  # denoise to zero
            continue
        lam_t, lam_s = coef["lam"][i], coef["lam"][i + 1]
        h = lam_s - lam_t
        if math.isinf(h):  # from pure noise: no midpoint in lambda; the exact first-order limit
            x = _first_order(
                x, d_t, coef["sigma"][i + 1] / coef["sigma"][i], coef["alpha"][i + 1], h
            )
            continue
        t_mid = float(schedule.t_from_logsnr(torch.tensor(2 * (lam_t + r * h), dtype=F64)))
        r_mid = (_lam(schedule, t_mid) - lam_t) / h  # r, up to the schedule's round trip
        alpha_m, sigma_m = coefficients(schedule, t_mid)
        alpha_s, sigma_s = coef["alpha"][i + 1], coef["sigma"][i + 1]
        sigma_t = coef["sigma"][i]
        u = _first_order(x, d_t, sigma_m / sigma_t, alpha_m, r_mid * h)
        d_mid = ctx.denoise(u, t_mid).x0
        d = (1 - 1 / (2 * r_mid)) * d_t + (1 / (2 * r_mid)) * d_mid
        x = _first_order(x, d, sigma_s / sigma_t, alpha_s, h)
    return x


@sampler
def dpmpp_sde(
    ctx: SamplerContext,
    x: Tensor,
    *,
    order: int = 2,
    eta: float = 1.0,
    s_noise: float = 1.0,
    lower_order_final: bool = True,
) -> Tensor:
    """Multistep SDE-DPM-Solver++ of order 1 or 2 [Lu 2022b, SDE-DPM-Solver++(2M)]; 1 NFE/step.

    Per step t -> s, with h = lambda_s - lambda_t, k = 1 + eta and r = h_{i-1} / h_i::

        x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-k h}) D_i
              + alpha_s (1 - e^{-k h}) (D_i - D_{i-1}) / (2 r)        (order 2, from step 2 on)
              + s_noise sigma_s sqrt(1 - e^{-2 eta h}) z.

    The step to t = 0 returns x0_hat. With order 1 and eta = 1 this is DDPM's posterior
    sampling; with eta = 0 it is the deterministic DPM-Solver++ of the same order. Because the
    update is affine in x and in D, the mean of its output for an affine denoiser (Gaussian
    data) follows the same scheme with ``s_noise = 0``: the tests check that this mean
    converges to the exact mean of the SDE at the method's order.

    Args:
        order: 1 or 2.
        eta: 0 (the ODE) ... 1 (the reverse diffusion SDE); larger values inject more noise.
        s_noise: scale of the injected noise (1 for the SDE; 0 gives its mean for an affine
            denoiser).
        lower_order_final: as in :func:`dpm_solver_pp` (here it matters only on grids that
            stop above t = 0).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be one of: 1, 2, got {order!r}")
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be non-negative, got {s_noise}")
    coef = ctx.coef
    d_prev: Tensor | None = None
    h_prev = 0.0
    for i, t, s in ctx.steps():
        d0 = ctx.denoise_and_report(x, i, t, s).x0
        if s == 0:
            x = d0  # denoise to zero
            continue
        alpha_s, sigma_s, sigma_t = coef["alpha"][i + 1], coef["sigma"][i + 1], coef["sigma"][i]
        h = coef["lam"][i + 1] - coef["lam"][i]
        data_coef = -alpha_s * math.expm1(-(1.0 + eta) * h)  # alpha_s (1 - e^{-k h})
        d = d0
        if _step_order(order, i, ctx.n, lower_order_final) == 2 and d_prev is not None:
            d = d0 + (d0 - d_prev) / (2 * (h_prev / h))
        decay = math.exp(-eta * h) if eta > 0 else 1.0  # e^{-eta h}, 1 for the ODE at h = inf
        x = (sigma_s / sigma_t) * decay * x + data_coef * d
        noise = sigma_s * math.sqrt(1.0 - decay**2) * s_noise
        if noise > 0:
            x = x + noise * ctx.noise(x)
        d_prev, h_prev = d0, h
    return x
