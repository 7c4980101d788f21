"""Flow-matching samplers [Lipman 2023; Liu 2023; Esser 2024]: Euler and Heun in the schedule's
own time.

A denoiser's (x0_hat, eps_hat) at (x_t, t) gives the velocity of the probability-flow ODE in
the schedule's time, for any schedule x_t = alpha(t) x0 + sigma(t) eps:

    dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat            [Lipman 2023, Eq. 9 and Thm. 1]

(the conditional velocity alpha' x0 + sigma' eps averaged over x0 given x_t). On the linear
interpolant (:class:`~difflab.schedules.FlowMatchSchedule`, alpha = 1 - t, sigma = t) it is the
flow-matching velocity u_hat = eps_hat - x0_hat, the network's own output for the ``flow``
parameterisation.

* **Euler** (``flow-euler`` in the sampler table) is x_s = x_t + (s - t) u_hat. With
  x0_hat = x_t - t u_hat and eps_hat = x_t + (1 - t) u_hat the DDIM (eta = 0) step
  x_s = (1 - s) x0_hat + s eps_hat equals it exactly:
  (1 - s)(x_t - t u) + s (x_t + (1 - t) u) = x_t + (s - t) u. So ``flow-euler`` is the table
  entry of :func:`~difflab.samplers.ddim.ddim` with eta = 0; there is no second copy of it.
* **Heun** (:func:`flow_heun`, ``flow-heun``) is Heun's method in (t, x) with that velocity
  [Karras 2022, Algorithm 1 in the flow's coordinates; diffusers' FlowMatchHeun]. Unlike EDM's
  Heun (in y = x / alpha, s = sigma / alpha), whose first step from pure noise is infinitely
  long, every step here has length t - s <= 1. The step to t = 0 is an Euler step.
* **Stochastic**: ``s_churn`` first raises the noise level from t to t_hat by the forward
  process itself, x_hat = alpha_{hat|t} x_t + sqrt(sigma_hat^2 - alpha_{hat|t}^2 sigma_t^2) z
  (:func:`~difflab.process.transition`), then evaluates the network at (x_hat, t_hat) and
  integrates from t_hat [Karras 2022, Algorithm 2]. Evaluating it at (x_t, t) and stepping from
  t_hat, as diffusers' FlowMatchEulerDiscreteScheduler does with ``s_churn`` (its issue 8549),
  uses a velocity of the wrong point and biases the samples.

Notation: ``t_hat``/``x_hat`` the level and sample after the noise increase; ``u_cur`` the
velocity there; ``u_next`` the velocity at the Euler predictor (Heun's correction).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab._util import F64
from difflab.parameterization import Prediction
from difflab.process import transition
from difflab.samplers.common import SamplerContext, sampler
from difflab.schedules import FlowMatchSchedule, Schedule

__all__ = ["flow_heun", "ode_velocity", "schedule_derivatives"]


def schedule_derivatives(schedule: Schedule, t: float) -> tuple[float, float]:
    """(alpha'(t), sigma'(t)): exact for the flow-matching schedule (-1, 1), otherwise by
    float64 autograd through the schedule (one-sided at the knots of a discrete schedule)."""
    if isinstance(schedule, FlowMatchSchedule):
        return -1.0, 1.0
    tt = torch.tensor(float(t), dtype=F64, requires_grad=True)
    out = []
    with torch.enable_grad():
        for value in schedule.alpha_sigma(tt):
            if not value.requires_grad:  # a constant (EDM's alpha = 1)
                out.append(0.0)
                continue
            (grad,) = torch.autograd.grad(value, tt, allow_unused=True)
            out.append(0.0 if grad is None else float(grad))
    return out[0], out[1]


def ode_velocity(pred: Prediction, schedule: Schedule, t: float) -> Tensor:
    """dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat; u_hat = eps_hat - x0_hat for flow matching."""
    d_alpha, d_sigma = schedule_derivatives(schedule, t)
    if (d_alpha, d_sigma) == (-1.0, 1.0):
        return pred.u()
    return d_alpha * pred.x0 + d_sigma * pred.eps


def _raise_noise(ctx: SamplerContext, x: Tensor, t: float, t_hat: float, s_noise: float) -> Tensor:
    """x_hat ~ q(x_{t_hat} | x_t): alpha_{hat|t} x + sqrt(sigma_{hat|t}^2) s_noise z [Kingma 2021,
    Eq. 10], the forward process from t up to t_hat."""
    a, var = transition(ctx.schedule, torch.tensor(t_hat, dtype=F64), torch.tensor(t, dtype=F64))
    return float(a) * x + math.sqrt(float(var)) * s_noise * ctx.noise(x)


@sampler
def flow_heun(
    ctx: SamplerContext,
    x: Tensor,
    *,
    second_order: bool = True,
    s_churn: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's method for the probability-flow ODE in the schedule's time (``flow-heun``), or with
    ``second_order=False`` Euler's; optionally with EDM's churn done by the forward process.

    Per step t -> s: raise the noise to t_hat (EDM sigma times 1 + gamma, gamma =
    min(s_churn / N, sqrt(2) - 1), capped at t_max); u = dx/dt at (x_hat, t_hat);
    x_s = x_hat + (s - t_hat) u and Heun's correction with u' at (x_s, s):
    x_s = x_hat + (s - t_hat) (u + u') / 2. 2 NFE per step; the step to s = 0 returns x0_hat
    (1 NFE).

    Args:
        second_order: Heun (True) or Euler (False).
        s_churn: EDM's total stochasticity (0: the deterministic ODE sampler).
        s_noise: scale of the added noise (EDM's S_noise).
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be non-negative, got {s_churn}, {s_noise}")
    schedule, coef = ctx.schedule, ctx.coef
    gamma = min(s_churn / ctx.n, math.sqrt(2) - 1)
    for i, t_cur, t_next in ctx.steps():
        # Increase noise temporarily (from pure noise there is nothing to add).
        s_hat = coef["edm_sigma"][i] * (1 + gamma)
        t_hat = t_cur
        if gamma > 0 and math.isfinite(s_hat):
            t_hat = float(schedule.t_from_edm_sigma(torch.tensor(s_hat, dtype=F64)))
            t_hat = min(t_hat, schedule.t_max)
        x_hat = _raise_noise(ctx, x, t_cur, t_hat, s_noise) if t_hat > t_cur else x

        # Euler step (to t = 0: x0_hat, which it equals on the linear interpolant).
        pred = ctx.denoise_and_report(x_hat, i, t_cur, t_next, t_eval=t_hat)
        if t_next == 0:
            x = pred.x0
            continue
        u_cur = ode_velocity(pred, schedule, t_hat)
        x = x_hat + (t_next - t_hat) * u_cur

        # 2nd-order correction.
        if second_order:
            u_next = ode_velocity(ctx.denoise(x, t_next), schedule, t_next)
            x = x_hat + (t_next - t_hat) * 0.5 * (u_cur + u_next)
    return x
