"""Likelihoods of diffusion models: Gaussian KL and log-densities and the variational bound.
Pure functions; nats unless a name says bits.

Per-sample results are summed over the data dimensions, shape (B,); :func:`bits_per_dim`
converts them. The variational bound of a :class:`~difflab.schedules.DiscreteSchedule`
[Ho 2020, Eq. 5] is split into named terms:

============  ==================================================  =====================
term          definition                                          function
============  ==================================================  =====================
L_T           KL(q(x_T | x0) || N(0, I))                          :func:`prior_kl`
L_{t-1}       KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), t>=2  :func:`vlb_term`
L_0           -log p(x0 | x1), discretised or Gaussian            :func:`vlb_term` (t = 1)
============  ==================================================  =====================

The reverse kernel p(x_{t-1} | x_t) = N(mu_theta, Sigma_t) has the posterior mean with x0_hat
in place of x0 [Ho 2020, Eq. 7 and 11] and one of three variances: ``small`` beta-tilde_t,
``large`` beta_t [Ho 2020, Sec. 3.2], or ``learned``, the interpolation
exp(v log beta_t + (1 - v) log beta-tilde_t) [Nichol & Dhariwal 2021, Eq. 15]. As in the
reference implementations, beta-tilde_1 = 0 is replaced by beta-tilde_2, and ``large`` also uses
beta-tilde_2 at t = 1 (it gives a better decoder likelihood).

The exact likelihood through the probability-flow ODE is in :mod:`difflab.ode_likelihood`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from difflab._util import F64, broadcast_to, check_choice
from difflab.parameterization import Denoiser, Prediction
from difflab.process import VARIANCES, Variance, grid_posterior, q_posterior, q_sample
from difflab.schedules import DiscreteSchedule, Schedule

__all__ = [
    "VarianceType",
    "VARIANCE_TYPES",
    "DecoderType",
    "DECODER_TYPES",
    "normal_kl",
    "gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "reverse_mean_logvar",
    "prior_kl",
    "vlb_term_from_prediction",
    "vlb_term",
    "vlb",
    "bits_per_dim",
    "mean_and_stderr",
]

VarianceType = Variance  # the reverse-step variances, defined in difflab.process
VARIANCE_TYPES: tuple[str, ...] = VARIANCES
DecoderType = Literal["discretized", "gaussian"]
DECODER_TYPES: tuple[str, ...] = get_args(DecoderType)
_LOG_2PI = math.log(2 * math.pi)


# ---- Gaussian building blocks ----------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats.

    KL = 1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1).
    Arguments broadcast against each other.
    """
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


def gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, e^logvar), elementwise, in nats (a density, not a probability)."""
    return -0.5 * (_LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - e^a) for a <= 0, accurate for all a (Maechler 2012)."""
    a = a.clamp(max=-torch.finfo(a.dtype).tiny)  # an empty bin gives a finite log
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def discretized_gaussian_log_likelihood(
    x: Tensor,
    mean: Tensor,
    log_scale: Tensor | None = None,
    *,
    logvar: Tensor | None = None,
    bins: int = 256,
) -> Tensor:
    """log P(x) for data in [-1, 1] quantised to ``bins`` levels, elementwise [Ho 2020, Eq. 13].

    P(x) = Phi((x + d - mean) / scale) - Phi((x - d - mean) / scale) with half-width
    d = 1 / (bins - 1); the lowest level's bin extends to -inf and the highest's to +inf, so
    the probabilities of the ``bins`` levels sum to one. The difference of normal CDFs is taken
    in log space on the side of the smaller tail, so tiny bins far in a tail stay finite.

    Args:
        x: quantised data in [-1, 1], any shape.
        mean: Gaussian mean, broadcastable to x.
        log_scale: log standard deviation; or give ``logvar`` (log variance) instead.
        bins: number of quantisation levels (256 for 8-bit images).
    """
    if (log_scale is None) == (logvar is None):
        raise ValueError("give exactly one of log_scale and logvar")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if log_scale is None:
        log_scale = 0.5 * torch.as_tensor(logvar)
    half = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x + half - mean) * inv_scale
    lower = (x - half - mean) * inv_scale
    lowest = x < -1.0 + half
    highest = x > 1.0 - half
    # log(Phi(b) - Phi(a)); for a > 0 use the mirror image log(Phi(-a) - Phi(-b))
    mirror = lower > 0
    b = torch.where(mirror, -lower, upper)
    a = torch.where(mirror, -upper, lower)
    log_cdf_b = torch.special.log_ndtr(b)
    log_mid = log_cdf_b + _log1mexp(torch.special.log_ndtr(a) - log_cdf_b)
    log_p = torch.where(lowest, torch.special.log_ndtr(upper), log_mid)
    return torch.where(highest, torch.special.log_ndtr(-lower), log_p)


# ---- the variational bound of a discrete-time model ------------------------------------------


def _check_discrete(schedule: Schedule) -> DiscreteSchedule:
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError("the variational bound needs a DiscreteSchedule (integer steps 1..T)")
    return schedule


def _step_index(t: Tensor | int, batch: int, schedule: DiscreteSchedule) -> Tensor:
    """Validate integer steps in 1..T and return them as a (B,) float64 CPU tensor."""
    t = torch.as_tensor(t, dtype=F64).detach().cpu()
    t = t.expand(batch).clone() if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    if bool(((t != t.round()) | (t < 1) | (t > schedule.T)).any()):
        raise ValueError(f"t must hold integer steps in 1..{schedule.T}")
    return t


@functools.lru_cache(maxsize=4)  # one table per schedule, not one per VLB term
def _log_variances(schedule: DiscreteSchedule) -> tuple[Tensor, Tensor, Tensor]:
    """(log small, log large, log beta) of the reverse steps t = 1..T, (T,) float64 each.

    Read off :func:`~difflab.process.grid_posterior` on the full grid T, ..., 1, 0: small is
    log beta-tilde_t with beta-tilde_1 = 0 replaced by beta-tilde_2; large is log beta_t except
    at t = 1, where it takes the same beta-tilde_2 (as the reference code).
    """
    table = grid_posterior(schedule, torch.arange(schedule.T, -1, -1, dtype=F64))
    log_small = table["log_beta_tilde"].flip(0)
    log_beta = table["beta_step"].flip(0).log()
    return log_small, torch.cat([log_small[:1], log_beta[1:]]), log_beta


def reverse_mean_logvar(
    pred: Prediction,
    xt: Tensor,
    t: Tensor | int,
    schedule: DiscreteSchedule,
    *,
    variance: VarianceType = "small",
    clip_x0: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) [Ho 2020, Eq. 7, 11; Nichol 2021, Eq. 15].

    Args:
        pred: the denoiser's prediction at (xt, t); ``var_frac`` is needed for ``learned``.
        xt: (B, ...). t: integer steps 1..T, scalar or (B,).
        variance: ``small`` (beta-tilde_t), ``large`` (beta_t) or ``learned``.
        clip_x0: clamp x0_hat to [-1, 1] first (images).
    Returns:
        mean (B, ...) and logvar broadcastable to (B, ...).
    """
    schedule = _check_discrete(schedule)
    check_choice("variance", variance, VARIANCE_TYPES)
    t = _step_index(t, xt.shape[0], schedule)
    idx = t.long() - 1
    x0_hat = pred.x0.clamp(-1, 1) if clip_x0 else pred.x0
    mean, _ = q_posterior(x0_hat, xt, t, t - 1, schedule)  # Eq. (7) [Ho 2020], x0_hat
    log_small, log_large, log_beta = (broadcast_to(v[idx], xt) for v in _log_variances(schedule))
    if variance == "small":
        return mean, log_small
    if variance == "large":
        return mean, log_large
    if pred.var_frac is None:
        raise ValueError("variance='learned' needs a denoiser with learned_variance=True")
    # Eq. (15) [Nichol & Dhariwal 2021]: log Sigma = v log beta_t + (1 - v) log beta-tilde_t
    return mean, pred.var_frac * log_beta + (1 - pred.var_frac) * log_small


def prior_kl(x0: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample, (B,) nats [Ho 2020, Eq. 5]."""
    schedule = _check_discrete(schedule)
    ab = schedule.alpha_bar[-1]
    mean = ab.sqrt().to(x0.dtype) * x0
    logvar = torch.log1p(-ab).to(x0.dtype)  # q(x_T|x0) = N(sqrt(ab_T) x0, (1 - ab_T) I)
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return normal_kl(mean, logvar, zero, zero).flatten(1).sum(1)


def vlb_term_from_prediction(
    pred: Prediction,
    x0: Tensor,
    xt: Tensor,
    t: Tensor | int,
    schedule: DiscreteSchedule,
    *,
    variance: VarianceType = "small",
    decoder: DecoderType = "discretized",
    clip_x0: bool = False,
) -> Tensor:
    """L_{t-1} for a given prediction at (xt, t): KL for t >= 2, decoder NLL for t = 1.

    Returns (B,) nats summed over dimensions [Ho 2020, Eq. 5 and 13]. ``decoder`` is
    ``discretized`` (data in [-1, 1] with 256 levels) or ``gaussian`` (continuous data).
    """
    check_choice("decoder", decoder, DECODER_TYPES)
    schedule = _check_discrete(schedule)
    t = _step_index(t, x0.shape[0], schedule)
    mean_p, logvar_p = reverse_mean_logvar(
        pred, xt, t, schedule, variance=variance, clip_x0=clip_x0
    )
    mean_q, _ = q_posterior(x0, xt, t, t - 1, schedule)  # Eq. (6-7) [Ho 2020]
    logvar_q = broadcast_to(_log_variances(schedule)[0][t.long() - 1], x0)
    kl = normal_kl(mean_q, logvar_q, mean_p, logvar_p).flatten(1).sum(1)
    if decoder == "discretized":
        log_px = discretized_gaussian_log_likelihood(x0, mean_p, logvar=logvar_p)
    else:
        log_px = gaussian_log_likelihood(x0, mean_p, logvar_p)
    nll = -log_px.flatten(1).sum(1)
    return torch.where((t == 1).to(kl.device), nll, kl)


def vlb_term(
    denoiser: Denoiser,
    x0: Tensor,
    t: Tensor | int,
    schedule: DiscreteSchedule,
    *,
    variance: VarianceType = "small",
    decoder: DecoderType = "discretized",
    cond: Any = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    clip_x0: bool = False,
) -> Tensor:
    """One term of the bound: draw x_t ~ q(x_t | x0), then :func:`vlb_term_from_prediction`.

    Args:
        x0: data (B, ...). t: integer step(s) 1..T, scalar or (B,).
        noise: the eps of x_t (drawn with ``generator`` when None).
    Returns:
        (B,) nats: L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 2, -log p(x0|x1)
        for t = 1.
    """
    schedule = _check_discrete(schedule)
    t = _step_index(t, x0.shape[0], schedule)
    xt = q_sample(x0, t, schedule, eps=noise, generator=generator)  # Eq. (4) [Ho 2020]
    pred = denoiser(xt, t, cond)
    return vlb_term_from_prediction(
        pred, x0, xt, t, schedule, variance=variance, decoder=decoder, clip_x0=clip_x0
    )


@torch.no_grad()
def vlb(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: DiscreteSchedule,
    *,
    variance: VarianceType = "small",
    decoder: DecoderType = "discretized",
    cond: Any = None,
    generator: torch.Generator | None = None,
    stride: int = 1,
    clip_x0: bool = False,
) -> dict[str, Tensor]:
    """The variational bound per sample, L_T + sum_{t>=2} L_{t-1} + L_0 [Ho 2020, Eq. 5].

    With ``stride = 1`` every step is evaluated (T network calls, fresh noise each). With
    ``stride = k > 1`` the diffusion sum is estimated by systematic sampling: for each sample
    the steps 2 + r, 2 + r + k, ... with its own random offset r in 0..k-1, weighted by k; each
    step is included with probability 1/k, so the estimate of every sample is unbiased.

    Returns:
        dict of (B,) tensors in nats: ``total``, ``prior`` (L_T), ``diffusion`` (sum of
        L_{t-1}, t >= 2), ``decoder`` (L_0); plus ``terms`` (B, n) and ``t`` (B, n), the
        unweighted evaluated terms and their steps (column 0 is t = 1; with a stride, t = 0
        and a zero term pad the samples whose offset leaves them one step short).
    """
    schedule = _check_discrete(schedule)
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    batch = x0.shape[0]
    offset = torch.zeros(batch, dtype=torch.long)
    if stride > 1:
        offset = torch.randint(0, stride, (batch,), generator=generator)
    kwargs = dict(variance=variance, decoder=decoder, cond=cond, clip_x0=clip_x0)
    steps = [torch.ones(batch, dtype=torch.long)]
    terms = [vlb_term(denoiser, x0, 1, schedule, generator=generator, **kwargs)]
    for j in range(math.ceil((schedule.T - 1) / stride)):
        t = 2 + offset + j * stride
        valid = t <= schedule.T
        t_j = t.clamp(max=schedule.T)
        term = vlb_term(denoiser, x0, t_j, schedule, generator=generator, **kwargs)
        terms.append(term * valid.to(term.device, term.dtype))
        steps.append(t * valid)
    terms_t = torch.stack(terms, dim=1)
    prior = prior_kl(x0, schedule)
    decoder_nll = terms_t[:, 0]
    diffusion = stride * terms_t[:, 1:].sum(1)
    return {
        "total": prior + diffusion + decoder_nll,
        "prior": prior,
        "diffusion": diffusion,
        "decoder": decoder_nll,
        "terms": terms_t,
        "t": torch.stack(steps, dim=1).to(F64),
    }


def bits_per_dim(nats_per_sample: Tensor | float, dims: int, *, bins: int | None = None) -> Tensor:
    """Convert per-sample nats to bits per dimension: nats / (dims * ln 2).

    ``bins`` converts a *continuous* density of data in [-1, 1] (e.g. from :func:`pf_ode_nll`)
    into bits/dim of the discrete ``bins``-level data: the levels are 2 / (bins - 1) apart, so
    P(level) ~ p(x) * 2 / (bins - 1) and each dimension adds log((bins - 1) / 2) nats
    (log 127.5 for 8-bit images). Song et al. use log 128 (uniform dequantisation over a
    width 2/256), a 0.0056 bits/dim difference. Leave ``bins`` None for the discretised VLB,
    which is already a probability of the quantised data.
    """
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    nats = torch.as_tensor(nats_per_sample, dtype=F64)
    if bins is not None:
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        nats = nats + dims * math.log((bins - 1) / 2)
    return nats / (dims * math.log(2))


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error std / sqrt(n) (std with n - 1) of a 1-D set of values."""
    v = torch.as_tensor(values, dtype=F64).flatten()
    if v.numel() < 2:
        raise ValueError("need at least two values for a standard error")
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))
