"""DDPM ancestral sampling [Ho 2020, Algorithm 2] on any grid of times.

Each step t -> s (s < t, the next time of the grid) samples the model's reverse transition
p(x_s | x_t) = N(mu, v I), where mu is the mean of the forward posterior q(x_s | x_t, x0) with
x0 replaced by the denoiser's x0_hat [Ho 2020, Eq. 6-7, 11]. On the full grid T, T-1, ..., 0 this
is the original sampler; on a subset of times it is the respaced sampler of Improved DDPM
[Nichol & Dhariwal 2021, Sec. 4]. Notation, with alpha_{t|s} = alpha_t / alpha_s:

* ``beta_step``  = sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (= 1 - alpha_bar_t /
  alpha_bar_s for VP schedules): beta_t of Ho 2020, Eq. 2, the "large" variance;
* ``beta_tilde`` = sigma_{t|s}^2 sigma_s^2 / sigma_t^2: beta-tilde_t of Ho 2020, Eq. 7, the
  variance of q(x_s | x_t, x0), the "small" variance;
* ``logvar``     = frac log beta_step + (1 - frac) log beta_tilde: the learned variance of
  Nichol & Dhariwal 2021, Eq. 15, with frac = ``Prediction.var_frac``.

The last step (s = 0) adds no noise: it returns the posterior mean, which is x0_hat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab._util import F64, check_choice
from difflab.process import VARIANCES, Variance, grid_posterior
from difflab.samplers.common import SamplerContext, sampler
from difflab.schedules import Schedule

# Variance, VARIANCES and grid_posterior live in difflab.process and are re-exported here
__all__ = ["Variance", "VARIANCES", "ddpm", "grid_posterior", "reverse_log_variance"]


def _log_variance(
    variance: str, log_beta_step: float, log_beta_tilde: float, var_frac: Tensor | None
) -> Tensor | float:
    if variance == "small":
        return log_beta_tilde
    if variance == "large":
        return log_beta_step
    if var_frac is None:
        raise ValueError(
            'variance="learned" needs a denoiser that predicts var_frac '
            "(a ModelDenoiser with learned_variance=True)"
        )
    return var_frac * log_beta_step + (1 - var_frac) * log_beta_tilde  # Eq. (15) [Nichol 2021]


def reverse_log_variance(
    schedule: Schedule,
    ts: Tensor,
    i: int,
    *,
    variance: Variance,
    var_frac: Tensor | None = None,
) -> Tensor | float:
    """log of the variance of the reverse step i, ts[i] -> ts[i + 1].

    ``"small"``: log beta_tilde; ``"large"``: log beta_step; ``"learned"``:
    frac log beta_step + (1 - frac) log beta_tilde [Nichol & Dhariwal 2021, Eq. 15] with
    ``frac = var_frac`` (a tensor of the sample's shape; the result is then a tensor too).
    On a step to t = 0 beta_tilde is clipped as in :func:`grid_posterior`; the sampler adds no
    noise on that step, so the clipped value only matters for likelihoods.
    """
    check_choice("variance", variance, VARIANCES)
    ts = torch.as_tensor(ts, dtype=F64)
    lo = max(i - 1, 0)
    table = grid_posterior(schedule, ts[lo : i + 2])
    j = i - lo
    log_step = float(table["beta_step"][j].log())
    return _log_variance(variance, log_step, float(table["log_beta_tilde"][j]), var_frac)


@sampler
def ddpm(ctx: SamplerContext, x: Tensor, *, variance: Variance = "small") -> Tensor:
    """DDPM ancestral sampling [Ho 2020, Algorithm 2], on the grid ``ts`` (respaced or full).

    Args:
        variance: ``"small"`` (beta-tilde, the posterior variance), ``"large"`` (beta_step) or
            ``"learned"`` (Improved DDPM interpolation of the two in the log domain, Eq. 15,
            using ``Prediction.var_frac``, which the denoiser must then give).
    """
    check_choice("variance", variance, VARIANCES)
    table = grid_posterior(ctx.schedule, ctx.ts)
    coef_xt, coef_x0 = table["coef_xt"].tolist(), table["coef_x0"].tolist()
    log_step, log_tilde = table["beta_step"].log().tolist(), table["log_beta_tilde"].tolist()
    for i, t, s in ctx.steps():
        pred = ctx.denoise_and_report(x, i, t, s)
        if variance == "learned" and pred.var_frac is None:
            _log_variance(variance, 0.0, 0.0, None)  # raises the error
        # posterior mean with x0 -> x0_hat  [Ho 2020, Eq. 7 and 11]
        mean = coef_xt[i] * x + coef_x0[i] * pred.x0
        if s == 0:
            x = mean  # no noise on the last step (Algorithm 2, "z = 0 if t = 1")
            continue
        logvar = _log_variance(variance, log_step[i], log_tilde[i], pred.var_frac)
        std = logvar.mul(0.5).exp() if isinstance(logvar, Tensor) else math.exp(0.5 * logvar)
        x = mean + std * ctx.noise(x)  # std is a float, or a tensor of x's shape (learned variance)
    return x
