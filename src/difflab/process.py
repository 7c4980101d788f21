"""The forward (noising) process and its posterior.

* :func:`q_sample` draws xt ~ q(xt | x0) = N(alpha_t x0, sigma_t^2 I) in closed form
  [Ho 2020, Eq. 4].
* :func:`q_step` applies one step of the Markov chain q(x_t | x_{t-1}) =
  N(sqrt(1 - beta_t) x_{t-1}, beta_t I) [Ho 2020, Eq. 2]; :func:`q_sample_iterative` chains them.
* :func:`q_posterior` gives q(x_s | x_t, x0) for any s < t, which for s = t - 1 is the DDPM
  posterior of Eq. 6-7 [Ho 2020] and for other s the respaced posterior used by DDIM and
  Improved DDPM. In alpha/sigma form, with alpha_{t|s} = alpha_t / alpha_s and
  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 [Kingma 2021, Eq. 10-12]:

      mean = alpha_{t|s} sigma_s^2 / sigma_t^2 * x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 * x0
      var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2

* :func:`grid_posterior` tabulates the coefficients of q(x_s | x_t, x0) for every step of a
  grid of times. The reverse step p(x_s | x_t) of a model takes its variance from them
  (:data:`Variance`): ``small`` is the posterior variance beta-tilde, ``large`` the forward
  step's sigma_{t|s}^2 (beta_t) [Ho 2020, Sec. 3.2], ``learned`` their log-interpolation
  [Nichol & Dhariwal 2021, Eq. 15]. The DDPM sampler and the variational bound both read them
  here.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from difflab._util import F64, broadcast_to
from difflab.schedules import DiscreteSchedule, Schedule

__all__ = ["q_sample", "q_step", "q_sample_iterative", "q_posterior", "transition"]
__all__ += ["Variance", "VARIANCES", "grid_posterior"]  # the reverse-step variances

# the variance of a reverse step p(x_s | x_t): beta-tilde, beta, or learned between the two
Variance = Literal["small", "large", "learned"]
VARIANCES: tuple[str, ...] = get_args(Variance)


def _times(t: Tensor | float | int, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=F64).cpu()
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def q_sample(
    x0: Tensor,
    t: Tensor | float,
    schedule: Schedule,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """xt = alpha_t x0 + sigma_t eps, eps ~ N(0, I)  [Ho 2020, Eq. 4].

    Args:
        x0: clean data (B, ...).
        t: times, a scalar or (B,).
        eps: the noise to use (drawn with ``generator`` when None).
    Returns:
        xt (B, ...).
    """
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    tt = _times(t, x0)
    alpha, sigma = schedule.alpha_sigma(tt)
    return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * eps


def q_step(
    x_prev: Tensor,
    t: int,
    schedule: DiscreteSchedule,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One forward step x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z  [Ho 2020, Eq. 2].

    ``t`` is the paper's index (1..T); the noise is scaled by sqrt(beta_t), not beta_t.
    """
    if not 1 <= t <= schedule.T:
        raise ValueError(f"t must be in 1..{schedule.T}, got {t}")
    beta = float(schedule.betas[t - 1])
    z = torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype).to(x_prev.device)
    return (1 - beta) ** 0.5 * x_prev + beta**0.5 * z


def q_sample_iterative(
    x0: Tensor,
    t: int,
    schedule: DiscreteSchedule,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x_t by applying :func:`q_step` t times (the slow, literal Markov chain)."""
    x = x0
    for s in range(1, t + 1):
        x = q_step(x, s, schedule, generator=generator)
    return x


def transition(schedule: Schedule, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_{t|s}, sigma_{t|s}^2) of q(x_t | x_s) for s < t, float64  [Kingma 2021, Eq. 10].

    For a discrete schedule and s = t - 1 these are sqrt(1 - beta_t) and beta_t.
    """
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    a_ts = a_t / a_s
    var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp(min=0)
    return a_ts, var_ts


def q_posterior(
    x0: Tensor,
    xt: Tensor,
    t: Tensor | float,
    s: Tensor | float,
    schedule: Schedule,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x0) for s < t  [Ho 2020, Eq. 6-7; Kingma 2021, Eq. 12].

    Args:
        x0, xt: (B, ...).
        t, s: times (scalars or (B,)), s < t. s = 0 gives mean x0 and variance 0.
    Returns:
        mean (B, ...) and variance broadcastable to (B, ...), in xt's dtype.
    """
    tt, ss = _times(t, xt), _times(s, xt)
    a_ts, var_ts = transition(schedule, tt, ss)
    a_s, s_s = schedule.alpha_sigma(ss)
    s_t2 = schedule.sigma(tt) ** 2
    coef_xt = a_ts * s_s**2 / s_t2
    coef_x0 = a_s * var_ts / s_t2
    var = var_ts * s_s**2 / s_t2
    mean = broadcast_to(coef_xt, xt) * xt + broadcast_to(coef_x0, xt) * x0
    return mean, broadcast_to(var, xt)


def grid_posterior(schedule: Schedule, ts: Tensor) -> dict[str, Tensor]:
    """Coefficients of every step ts[i] -> ts[i + 1] of a grid, float64 tensors of shape (n,).

    ``coef_xt``, ``coef_x0``: the posterior mean of q(x_s | x_t, x0) is
    coef_xt * x_t + coef_x0 * x0 [Ho 2020, Eq. 7]; read off :func:`q_posterior`
    (linear in (x_t, x0)) at unit inputs, all steps at once.
    ``beta_tilde``: its variance; ``beta_step``: sigma_{t|s}^2 [Kingma 2021, Eq. 10].
    ``log_beta_tilde``: log beta_tilde, clipped on a step to t = 0 (where beta_tilde = 0) to the
    value of the step before, as Improved DDPM does (log beta_step on a one-step grid).
    """
    ts = torch.as_tensor(ts, dtype=F64).cpu()
    t, s = ts[:-1], ts[1:]
    one, zero = torch.ones(t.numel(), 1, dtype=F64), torch.zeros(t.numel(), 1, dtype=F64)
    coef_x0, beta_tilde = q_posterior(one, zero, t, s, schedule)
    coef_xt, _ = q_posterior(zero, one, t, s, schedule)
    _, beta_step = transition(schedule, t, s)
    beta_tilde = beta_tilde.flatten()
    clipped = beta_tilde.clone()
    for i in (clipped <= 0).nonzero().flatten().tolist():  # only a step to t = 0
        clipped[i] = clipped[i - 1] if i > 0 else beta_step[i]
    return {
        "coef_xt": coef_xt.flatten(),
        "coef_x0": coef_x0.flatten(),
        "beta_tilde": beta_tilde,
        "beta_step": beta_step,
        "log_beta_tilde": clipped.log(),
    }
