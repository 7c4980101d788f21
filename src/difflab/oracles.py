"""Exact denoisers for Gaussian and Gaussian-mixture data, and the exact probability-flow ODE.

For data whose law is known in closed form the optimal denoiser E[x0 | xt] is known too, so a
sampler given it must reproduce the data law up to its discretisation error. These denoisers are
the oracles of the sampler tests and of the tutorials.

* :class:`GaussianDenoiser` - x0 ~ N(m, C). With xt = alpha x0 + sigma eps the pair (x0, xt) is
  jointly Gaussian, and conditioning gives [Bishop 2006, Eq. 2.116]

      E[x0 | xt] = m + alpha C (alpha^2 C + sigma^2 I)^-1 (xt - alpha m).

* :class:`GMMDenoiser` - x0 from a :class:`~difflab.data.toy.GaussianMixture`; the posterior
  mean is the responsibility-weighted sum of the per-component Gaussian posterior means.
* :func:`gaussian_pf_ode_solution` - the closed-form solution of the probability-flow ODE of
  EDM [Karras 2022, Eq. 1 and 3], dy/ds = (y - D(y; s)) / s, for Gaussian data, and
  :func:`gaussian_sde_mean`, the mean of the reverse SDEs with the same marginals.

Both denoisers satisfy Tweedie's formula: the score of the noised law is
grad log q(xt) = (alpha E[x0 | xt] - xt) / sigma^2 [Efron 2011 (Tweedie's formula)].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab._util import F64
from difflab.data.toy import GaussianMixture
from difflab.parameterization import Prediction
from difflab.schedules import Schedule

__all__ = [
    "GaussianDenoiser",
    "GaussianConsistencyFunction",
    "GMMDenoiser",
    "gaussian_pf_ode_solution",
    "gaussian_sde_mean",
]


def _flat_f64(xt: Tensor, dim: int) -> Tensor:
    """(B, ...) -> (B, D) float64, checking that the trailing dimensions hold D numbers."""
    if xt.ndim < 1 or math.prod(xt.shape[1:]) != dim:
        raise ValueError(
            f"expected xt of shape (B, ...) with {dim} numbers per sample, got {tuple(xt.shape)}"
        )
    return xt.reshape(xt.shape[0], dim).to(F64)


def _coefficients(schedule: Schedule, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """alpha(t), sigma(t) as float64 CPU tensors of shape (B,), or (1,) when all t are equal."""
    t = torch.as_tensor(t, dtype=F64).detach().cpu().reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"t must be a scalar or have {batch} elements, got {t.numel()}")
    if t.numel() > 1 and bool((t == t[0]).all()):
        t = t[:1]  # one time for the whole batch (what samplers pass): compute it once
    return schedule.alpha_sigma(t)


def _prediction(xt: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
    """Prediction with eps = (xt - alpha x0) / sigma (0 where sigma = 0), in xt's dtype."""
    x = xt.reshape(x0.shape).to(F64)
    a, s = alpha[:, None].to(x.device), sigma[:, None].to(x.device)
    if bool((s > 0).all()):
        eps = (x - a * x0) / s
    else:  # at t = 0 the noise is undefined; report 0
        eps = torch.where(s > 0, (x - a * x0) / s.clamp(min=1e-300), torch.zeros_like(x))
    return Prediction(x0=x0.reshape(xt.shape).to(xt.dtype), eps=eps.reshape(xt.shape).to(xt.dtype))


class GaussianDenoiser:
    """The exact denoiser for Gaussian data x0 ~ N(mean, cov).

    E[x0 | xt] = m + alpha C (alpha^2 C + sigma^2 I)^-1 (xt - alpha m), computed in float64 in
    the eigenbasis C = U diag(l) U^T, where the gain is U diag(alpha l / (alpha^2 l + sigma^2)) U^T.

    Args:
        mean: m, shape (D,).
        cov: C, shape (D, D), symmetric positive semi-definite.
        schedule: gives alpha(t), sigma(t).

    Called as ``denoiser(xt, t, cond=None)`` with xt of shape (B, ...) holding D numbers per
    sample (points (B, D) or images (B, C, H, W) with C*H*W = D) and t of shape (B,).
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule) -> None:
        m = torch.as_tensor(mean, dtype=F64).detach().cpu().flatten()
        c = torch.as_tensor(cov, dtype=F64).detach().cpu()
        d = m.numel()
        if c.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) to match mean, got {tuple(c.shape)}")
        if not torch.allclose(c, c.T, rtol=1e-10, atol=1e-12):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
        if float(evals.min()) < -1e-10 * max(float(evals.abs().max()), 1.0):
            raise ValueError("cov must be positive semi-definite")
        self.mean = m
        self.cov = c
        self.schedule = schedule
        self._evals = evals.clamp(min=0)
        self._evecs = evecs

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def x0_posterior_mean(self, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | xt] for xt (B, D) float64 and per-sample alpha, sigma (B,); returns (B, D)."""
        dev = xt.device
        m, u, lam = self.mean.to(dev), self._evecs.to(dev), self._evals.to(dev)
        a, s = alpha.to(dev)[:, None], sigma.to(dev)[:, None]
        z = (xt - a * m) @ u  # U^T (xt - alpha m), one row per sample
        gain = a * lam / (a**2 * lam + s**2)  # alpha l / (alpha^2 l + sigma^2)
        return m + (gain * z) @ u.T

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        x = _flat_f64(xt, self.dim)
        alpha, sigma = _coefficients(self.schedule, t, x.shape[0])
        x0 = self.x0_posterior_mean(x, alpha, sigma)
        return _prediction(xt, x0, alpha, sigma)

    def __repr__(self) -> str:
        return f"GaussianDenoiser(dim={self.dim}, schedule={self.schedule!r})"


class GaussianConsistencyFunction:
    """The exact consistency function of Gaussian data x0 ~ N(mean, cov), as a denoiser.

    Its x0 is the end point at noise level 0 of the probability-flow ODE through (xt, t)
    [Song 2023, Eq. 3 with eps = 0], :func:`gaussian_pf_ode_solution` from y = xt / alpha at
    s = sigma / alpha: f(xt, t) = m + sqrt(C (C + s^2 I)^-1) (xt / alpha - m), an affine map.
    One step of a consistency sampler with it draws exactly from N(m, C); it is the oracle of
    the consistency sampler and of consistency distillation. xt (B, ...), t (B,).

    Multiplied out, sqrt(C (C + s^2 I)^-1) / alpha = sqrt(C) (alpha^2 C + sigma^2 I)^(-1/2), so
    f(xt, t) = m + sqrt(C) (alpha^2 C + sigma^2 I)^(-1/2) (xt - alpha m), which stays finite at
    alpha = 0 (pure noise, t = 1 of a flow-matching schedule): there f = m + sqrt(C) xt / sigma.
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule) -> None:
        self.gaussian = GaussianDenoiser(mean, cov, schedule)  # validates mean and cov
        self.schedule = schedule
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.gaussian.cov.to(F64))

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        g = self.gaussian
        x = _flat_f64(xt, g.dim)
        alpha, sigma = _coefficients(self.schedule, t, x.shape[0])
        a, s = alpha[:, None], sigma[:, None]
        lam, u = self.eigvals, self.eigvecs
        gain = lam.sqrt() / (a**2 * lam + s**2).sqrt()  # (B or 1, D) in C's eigenbasis
        z = (x.cpu() - a * g.mean) @ u  # xt - alpha m in the eigenbasis
        x0 = (g.mean + (gain * z) @ u.T).to(x.device)
        return _prediction(xt, x0, alpha, sigma)

    def __repr__(self) -> str:
        return f"GaussianConsistencyFunction(dim={self.gaussian.dim}, schedule={self.schedule!r})"


class GMMDenoiser:
    """The exact denoiser for Gaussian-mixture data, via ``GaussianMixture.x0_posterior_mean``.

    E[x0 | xt] = sum_k r_k(xt) (mu_k + alpha Sigma_k C_k^-1 (xt - alpha mu_k)),
    C_k = alpha^2 Sigma_k + sigma^2 I, r_k the posterior component probabilities (Bayes' rule).
    xt (B, ...) with D numbers per sample, t (B,).
    """

    def __init__(self, gmm: GaussianMixture, schedule: Schedule) -> None:
        self.gmm = gmm
        self.schedule = schedule

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        x = _flat_f64(xt, self.gmm.dim)
        alpha, sigma = _coefficients(self.schedule, t, x.shape[0])
        a, s = (alpha, sigma) if alpha.numel() > 1 else (alpha[0], sigma[0])
        x0 = self.gmm.x0_posterior_mean(x, a.to(x.device), s.to(x.device))
        return _prediction(xt, x0.to(F64), alpha, sigma)

    def __repr__(self) -> str:
        return f"GMMDenoiser({self.gmm!r}, schedule={self.schedule!r})"


def gaussian_pf_ode_solution(
    y_start: Tensor,
    sigma_start: float | Tensor,
    sigma_end: float | Tensor,
    mean: Tensor,
    cov: Tensor,
) -> Tensor:
    """Exact solution of the probability-flow ODE for Gaussian data x0 ~ N(m, C).

    In the scaled variable y = x / alpha with EDM noise level s = sigma / alpha the ODE is
    dy/ds = (y - D(y; s)) / s [Karras 2022, Eq. 3] with D(y; s) = m + C (C + s^2 I)^-1 (y - m),
    so dy/ds = s (C + s^2 I)^-1 (y - m). In the eigenbasis of C each coordinate z_i of y - m
    obeys d log z_i / ds = s / (l_i + s^2) = (1/2) d log(l_i + s^2) / ds, hence

        y(s_end) - m = sqrt((C + s_end^2 I) (C + s_start^2 I)^-1) (y(s_start) - m).

    Args:
        y_start: y at noise level ``sigma_start``, shape (B, D) (or (B, ...) with D numbers).
        sigma_start, sigma_end: EDM noise levels, floats or (B,) tensors; s_end = 0 gives the
            data point the ODE trajectory ends at.
        mean, cov: m (D,) and C (D, D).
    Returns:
        y(sigma_end), same shape and dtype as ``y_start``; computed in float64.
    """
    return gaussian_sde_mean(y_start, sigma_start, sigma_end, mean, cov, eta=0.0)


def gaussian_sde_mean(
    y_start: Tensor,
    sigma_start: float | Tensor,
    sigma_end: float | Tensor,
    mean: Tensor,
    cov: Tensor,
    *,
    eta: float = 1.0,
) -> Tensor:
    """E[y(s_end) | y(s_start)] for the reverse SDEs of Gaussian data x0 ~ N(m, C).

    In y = x / alpha and s = sigma / alpha the reverse SDEs with the data's marginals are
    dy = -(1 + eta) s ds score - sqrt(2 eta s) dw (s decreasing) [Karras 2022, Eq. 6 with
    beta = eta / s; Song 2021 (score SDE), Eq. 6 and 13]; eta = 0 is the probability-flow ODE,
    eta = 1 the reverse diffusion SDE. The score (D - y) / s^2 is affine in y for Gaussian data,
    so the mean obeys dm/ds = (1 + eta) s (C + s^2 I)^-1 (m - mean), and per eigenvalue l_i

        E[y(s_end)] - m = ((C + s_end^2 I) (C + s_start^2 I)^-1)^((1 + eta) / 2) (y_start - m).

    Args and return as :func:`gaussian_pf_ode_solution`; ``eta`` >= 0.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    m = torch.as_tensor(mean, dtype=F64).flatten()
    c = torch.as_tensor(cov, dtype=F64)
    lam, u = torch.linalg.eigh(0.5 * (c + c.T))
    lam = lam.clamp(min=0)
    y = _flat_f64(y_start, m.numel()).cpu()
    b = y.shape[0]
    s0 = torch.as_tensor(sigma_start, dtype=F64).cpu().expand(b)[:, None]
    s1 = torch.as_tensor(sigma_end, dtype=F64).cpu().expand(b)[:, None]
    ratio = ((lam + s1**2) / (lam + s0**2)) ** ((1.0 + eta) / 2)  # (B, D) eigenvalues
    y_end = m + (ratio * ((y - m) @ u)) @ u.T
    return y_end.reshape(y_start.shape).to(y_start.device, y_start.dtype)
