"""What a network predicts, and the one place where predictions are converted.

With ``xt = alpha * x0 + sigma * eps`` every prediction target is a linear function of
(xt, x0) or (xt, eps). This module holds those conversions, the :class:`Prediction` type that
samplers consume, the :class:`Denoiser` interface, and :class:`ModelDenoiser`, the wrapper that
turns a raw network into a denoiser for a given parameterisation:

============  ==========================================================  =====================
name          network output                                              paper
============  ==========================================================  =====================
``eps``       eps_hat                                                     Ho 2020, Eq. 11
``x0``        x0_hat                                                      Ho 2020, Sec. 3.2
``v``         v_hat = alpha * eps - sigma * x0                            Salimans 2022, Sec. 4
``edm``       F, with D = c_skip * x + c_out * F(c_in * x; c_noise)      Karras 2022, Eq. 7
``flow``      u_hat = eps - x0, the flow-matching velocity                 Lipman 2023, Eq. 23
============  ==========================================================  =====================

The flow-matching velocity u = eps - x0 and Salimans & Ho's v = alpha eps - sigma x0 are two
different targets (equal only up to a time-dependent mix of x0 and eps); they keep their own
names here and everywhere. u is d x_t / dt on the linear interpolant x_t = (1 - t) x0 + t eps
(:class:`~difflab.schedules.FlowMatchSchedule`), where x0 = x_t - t u and eps = x_t + (1 - t) u.
On any schedule, x_t = (alpha + sigma) x0 + sigma u gives the general inversions below.

With ``learned_variance=True`` the network has twice the output channels; the second half is
the Improved-DDPM interpolation value v in [-1, 1] between log beta and log beta-tilde
[Nichol & Dhariwal 2021, Eq. 15], stored as ``Prediction.var_frac = (v + 1) / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor, nn

from difflab._util import F64, broadcast_to, check_choice  # broadcast_to: re-exported
from difflab.schedules import Schedule

__all__ = [
    "Parameterization",
    "PARAMETERIZATIONS",
    "Prediction",
    "Denoiser",
    "ModelDenoiser",
    "broadcast_to",
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_from_v",
    "eps_from_v",
    "u_from_x0_eps",
    "x0_from_u",
    "eps_from_u",
    "score_from_eps",
    "eps_from_score",
    "edm_preconditioning",
    "consistency_preconditioning",
]

Parameterization = Literal["eps", "x0", "v", "edm", "flow"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


# ---- conversions (alpha, sigma: scalars or tensors broadcastable to x) -----------------------


def x0_from_eps(xt: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (xt - sigma * eps) / alpha  [Ho 2020, Eq. 4 solved for x0; Eq. 15]."""
    return (xt - sigma * eps) / alpha


def eps_from_x0(xt: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (xt - alpha * x0) / sigma."""
    return (xt - alpha * x0) / sigma


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha * eps - sigma * x0  [Salimans & Ho 2022, Sec. 4]."""
    return alpha * eps - sigma * x0


def x0_from_v(xt: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (alpha * xt - sigma * v) / (alpha^2 + sigma^2); = alpha xt - sigma v for VP."""
    return (alpha * xt - sigma * v) / (alpha**2 + sigma**2)


def eps_from_v(xt: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (sigma * xt + alpha * v) / (alpha^2 + sigma^2); = sigma xt + alpha v for VP."""
    return (sigma * xt + alpha * v) / (alpha**2 + sigma**2)


def u_from_x0_eps(x0: Tensor, eps: Tensor) -> Tensor:
    """u = eps - x0: the flow-matching velocity, d x_t / dt of x_t = (1 - t) x0 + t eps
    [Lipman 2023, Eq. 23 with sigma_min = 0; Liu 2023 (rectified flow), Eq. 1]."""
    return eps - x0


def x0_from_u(xt: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (xt - sigma * u) / (alpha + sigma); = xt - t u on the linear interpolant."""
    return (xt - sigma * u) / (alpha + sigma)


def eps_from_u(xt: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (xt + alpha * u) / (alpha + sigma); = xt + (1 - t) u on the linear interpolant."""
    return (xt + alpha * u) / (alpha + sigma)


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """grad_xt log q(xt) = -E[eps | xt] / sigma  [Song 2021, Eq. 3; Vincent 2011]."""
    return -eps / sigma


def eps_from_score(score: Tensor, sigma: Tensor) -> Tensor:
    """eps = -sigma * score."""
    return -sigma * score


def edm_preconditioning(
    edm_sigma: Tensor, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM [Karras 2022, Table 1, "Ours"].

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.
    """
    s2 = edm_sigma**2
    sd2 = sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = edm_sigma * sigma_data / torch.sqrt(s2 + sd2)
    c_in = 1 / torch.sqrt(s2 + sd2)
    c_noise = torch.log(edm_sigma) / 4
    return c_skip, c_out, c_in, c_noise


def consistency_preconditioning(
    edm_sigma: Tensor, sigma_min: float, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a consistency model [Song 2023, Appendix C, Eq. for f_theta].

    c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(sd^2 + s^2):
    at s = s_min, c_skip = 1 and c_out = 0 exactly, so f(x, s_min) = x for any weights.
    """
    sd2 = sigma_data**2
    c_skip = sd2 / ((edm_sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (edm_sigma - sigma_min) / torch.sqrt(sd2 + edm_sigma**2)
    return c_skip, c_out


# ---- the interface samplers see ------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """A denoiser's answer at (xt, t). All tensors have the shape of xt (B, ...).

    Attributes:
        x0: estimate of the clean data E[x0 | xt].
        eps: the matching noise estimate, (xt - alpha x0) / sigma.
        var_frac: learned-variance interpolation in [0, 1] (Improved DDPM) or None.
    """

    x0: Tensor
    eps: Tensor
    var_frac: Tensor | None = None

    def v(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The v target implied by this prediction."""
        return v_from_x0_eps(self.x0, self.eps, alpha, sigma)

    def u(self) -> Tensor:
        """The flow-matching velocity implied by this prediction, eps - x0."""
        return u_from_x0_eps(self.x0, self.eps)


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(xt, t, cond=None) -> Prediction``; ``t`` is a (B,) tensor of schedule times."""

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction: ...


class ModelDenoiser(nn.Module):
    """Wrap a network ``model(x, t_in, cond) -> Tensor`` as a :class:`Denoiser`.

    For ``eps``/``x0``/``v``/``flow`` the network is called with the schedule time ``t`` itself
    (a velocity network on a :class:`~difflab.schedules.FlowMatchSchedule` is the flow-matching
    model: x0_hat = xt - t u_hat, eps_hat = xt + (1 - t) u_hat, finite at t = 0 and 1); for
    ``edm`` with the preconditioned input ``c_in * x / alpha`` and ``c_noise = ln(sigma)/4``.

    Args:
        model: the raw network.
        schedule: gives alpha(t), sigma(t).
        parameterization: what the network outputs, one of ``PARAMETERIZATIONS``.
        learned_variance: the network also outputs the Improved-DDPM variance value.
        sigma_data: EDM's data standard deviation (``edm`` only).
        time_scale: the network is called with ``time_scale * t`` (not under ``edm``). 1000
            suits a flow-matching network (t in [0, 1]) with a DDPM-style sinusoidal time
            embedding, and is diffusers' convention for its flow models (timestep = 1000 t).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        *,
        parameterization: Parameterization = "eps",
        learned_variance: bool = False,
        sigma_data: float = 0.5,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        self.learned_variance = learned_variance
        self.sigma_data = float(sigma_data)
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        self.time_scale = float(time_scale)

    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) cast to x's dtype/device and broadcast to x."""
        t = t.detach().to("cpu", F64)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return broadcast_to(alpha, x), broadcast_to(sigma, x)

    def network_output(self, xt: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The raw network output (before conversion), as the training losses see it."""
        t = torch.as_tensor(t, dtype=F64).expand(xt.shape[0])
        if self.parameterization == "edm":
            alpha, _ = self.coefficients(t, xt)
            s = self.schedule.edm_sigma(t.cpu())
            _, _, c_in, c_noise = edm_preconditioning(s, self.sigma_data)
            x_in = broadcast_to(c_in, xt) * (xt / alpha)
            return self.model(x_in, c_noise.to(xt.device, xt.dtype), cond)
        return self.model(xt, (self.time_scale * t).to(xt.device, xt.dtype), cond)

    def prediction_from_output(self, out: Tensor, xt: Tensor, t: Tensor) -> Prediction:
        """Convert a raw network output into a :class:`Prediction`."""
        t = torch.as_tensor(t, dtype=F64).expand(xt.shape[0])
        var_frac = None
        if self.learned_variance:
            out, v = out.chunk(2, dim=1)
            var_frac = (v + 1) / 2  # Eq. (15) [Nichol & Dhariwal 2021]
        alpha, sigma = self.coefficients(t, xt)
        p = self.parameterization
        if p == "eps":
            eps = out
            x0 = x0_from_eps(xt, eps, alpha, sigma)
        elif p == "x0":
            x0 = out
            eps = eps_from_x0(xt, x0, alpha, sigma)
        elif p == "v":
            x0 = x0_from_v(xt, out, alpha, sigma)
            eps = eps_from_v(xt, out, alpha, sigma)
        elif p == "flow":
            x0 = x0_from_u(xt, out, alpha, sigma)
            eps = eps_from_u(xt, out, alpha, sigma)
        else:  # edm, Eq. (7) [Karras 2022]
            s = self.schedule.edm_sigma(t.detach().cpu())
            c_skip, c_out, _, _ = edm_preconditioning(s, self.sigma_data)
            x_ve = xt / alpha
            x0 = broadcast_to(c_skip, xt) * x_ve + broadcast_to(c_out, xt) * out
            eps = (x_ve - x0) / broadcast_to(s, xt)
        return Prediction(x0=x0, eps=eps, var_frac=var_frac)

    def forward(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        return self.prediction_from_output(self.network_output(xt, t, cond), xt, t)
