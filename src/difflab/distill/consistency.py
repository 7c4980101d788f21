"""Consistency models: the boundary-conditioned wrapper, consistency distillation, and
consistency tuning in ECT's form.

A consistency function f(x_t, t) maps every point of a probability-flow ODE trajectory to its
end point [Song 2023 (Consistency Models), Eq. 3]. Notation (EDM view: y = x / alpha,
s = sigma / alpha = ``schedule.edm_sigma(t)``; :mod:`difflab.samplers.edm`):

==================  ===============  ==========================================================
code                paper            meaning
==================  ===============  ==========================================================
``sigma_min``       eps (Song 2023)  boundary noise level, ``schedule.sigma_min``: f = y there
``c_skip, c_out``   same             Song 2023, App. C (``consistency_preconditioning``)
``s_next, s_cur``   t_{n+1}, t_n     adjacent levels of consistency distillation's grid
``target``          theta^-          the target network (EMA of the online one, or itself)
``t, r``            t, r (ECT)       noise levels of the online and the target evaluation
``stage``           ceil(i / d)      ECT's stage: the gap t - r halves with each (q = 2)
``c``               c                pseudo-Huber constant, sqrt(d^2 + c^2) - c
==================  ===============  ==========================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflab._util import F64, broadcast_to
from difflab.parameterization import (
    Denoiser,
    Prediction,
    consistency_preconditioning,
    edm_preconditioning,
)
from difflab.schedules import Schedule

__all__ = [
    "ConsistencyDenoiser",
    "consistency_distillation_loss",
    "ect_gap",
    "ect_loss",
    "heun_step",
    "karras_levels",
    "pseudo_huber",
]


def _edm_view(schedule: Schedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t) and the EDM sigma s(t) for (B,) times, broadcast to x (B, ...)."""
    t = torch.as_tensor(t, dtype=F64).detach().cpu().expand(x.shape[0])
    return broadcast_to(schedule.alpha(t), x), broadcast_to(schedule.edm_sigma(t), x)


class ConsistencyDenoiser(nn.Module):
    """A consistency model f(x, t) made from any denoiser D [Song 2023, App. C].

    D's x0 is read as EDM's D = c_skip^EDM y + c_out^EDM F [Karras 2022, Eq. 7]; the raw F it
    implies is put into the consistency model's boundary-conditioned form

        f = c_skip^CM(s) y + c_out^CM(s) F,   F = (D - c_skip^EDM y) / c_out^EDM,

    so at s = s_min (c_skip^CM = 1, c_out^CM = 0) f = y = x / alpha exactly, for any weights
    of D; and as c_out^CM / c_out^EDM = (s - s_min) / s, f = D + O(s_min / s) for s >> s_min:
    the wrapped teacher starts as the teacher, ECT's initialisation [Geng 2024, Sec. 3].
    Returns ``Prediction(x0=f, eps=(x - alpha f) / sigma)``.

    Args:
        denoiser: the inner denoiser (an ``nn.Module`` to train it), e.g. a copy of the teacher.
        schedule: gives alpha(t), s(t); the boundary is ``schedule.t_min``.
        sigma_data: EDM's data standard deviation (0.5 for images in [-1, 1]).
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule, *, sigma_data: float = 0.5):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.sigma_min = schedule.sigma_min  # computed as edm_sigma(t_min): exact at t_min

    def forward(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        alpha, s = _edm_view(self.schedule, t, xt)
        y = xt / alpha
        d = self.denoiser(xt, t, cond).x0
        c_skip_edm, c_out_edm, _, _ = edm_preconditioning(s, self.sigma_data)
        c_skip, c_out = consistency_preconditioning(s, self.sigma_min, self.sigma_data)
        f = c_skip * y + c_out * (d - c_skip_edm * y) / c_out_edm  # F read off D
        return Prediction(x0=f, eps=(y - f) / s)  # (x - alpha f) / sigma = (y - f) / s


def heun_step(
    denoiser: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, *, schedule: Schedule, cond=None
) -> Tensor:
    """One Heun step of the probability-flow ODE dy/ds = (y - D(y; s)) / s from t to t_next
    (per-sample (B,) times, s_next > 0) [Karras 2022, Algorithm 1 lines 5-8]: the step
    of :func:`~difflab.samplers.edm.edm_sampler` with times that differ within the batch, as
    consistency distillation needs [Song 2023, Algorithm 2, Phi = Heun]."""
    alpha, s = _edm_view(schedule, t, x)
    alpha_n, s_n = _edm_view(schedule, t_next, x)
    y = x / alpha
    d_cur = (y - denoiser(x, t, cond).x0) / s  # Euler step
    y_next = y + (s_n - s) * d_cur
    d_prime = (y_next - denoiser(alpha_n * y_next, t_next, cond).x0) / s_n  # 2nd-order corr.
    return alpha_n * (y + (s_n - s) * (0.5 * d_cur + 0.5 * d_prime))


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """sqrt(||d||^2 + c^2) - c per sample (B,) over all but the first dimension [Song & Dhariwal
    2023 (iCT), Eq. 12]; with c = 0 the L2 norm ||d|| (ECT's "adaptive weighting" p = 0.5)."""
    if not c >= 0:
        raise ValueError(f"the pseudo-Huber constant c must be >= 0, got {c}")
    return torch.sqrt(diff.flatten(1).pow(2).sum(1) + c**2) - c


def consistency_distillation_loss(
    model: Denoiser,
    target: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    *,
    schedule: Schedule,
    ts: Tensor,
    generator: torch.Generator | None = None,
    cond: Any = None,
) -> Tensor:
    """Consistency distillation [Song 2023, Algorithm 2] with a Heun step of the teacher.

    ``ts`` is an increasing grid t_1 = t_min < ... < t_N of schedule times (Karras levels in
    the paper). Per sample, n ~ U{1, ..., N - 1}, x_{n+1} = alpha x0 + sigma z, the teacher's
    Heun step gives x_n, and the loss is ||f(x_{n+1}, t_{n+1}) - f^-(x_n, t_n)||^2 (mean over
    dimensions), with f^- = ``target`` without gradient (an EMA of ``model``, or ``model``
    itself as in iCT). x0 (B, ...); returns the scalar loss.
    """
    ts = torch.as_tensor(ts, dtype=F64).cpu()
    if ts.ndim != 1 or ts.numel() < 2 or bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("ts must be an increasing 1-D grid of at least 2 times")
    n = torch.randint(0, ts.numel() - 1, (x0.shape[0],), generator=generator)
    t_cur, t_next = ts[n], ts[n + 1]
    alpha, sigma = (broadcast_to(c, x0) for c in schedule.alpha_sigma(t_next))
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_next = alpha * x0 + sigma * z
    with torch.no_grad():
        x_cur = heun_step(teacher, x_next, t_next, t_cur, schedule=schedule, cond=cond)
        f_target = target(x_cur, t_cur, cond).x0
    f = model(x_next, t_next, cond).x0
    return (f - f_target).pow(2).flatten(1).mean(1).mean()


def ect_gap(s: Tensor, stage: int, *, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping from t to r [Geng 2024 (ECT), Eq. 11 and Sec. 3.2], in EDM sigmas:

        r = max(t (1 - q^-(stage + 1) n(t)), 0),   n(t) = 1 + k sigmoid(-b t),

    so the gap t - r shrinks by q each stage; at stage 0 (q = 2, k = 8, b = 1) r = 0 for
    t <= ln 7 (the denoising loss there) and r -> t / 2 at high noise.
    ``s`` (B,) EDM sigmas; returns r, same shape."""
    if stage < 0 or not q > 1:
        raise ValueError(f"stage must be >= 0 and q > 1, got stage {stage}, q {q}")
    n = 1 + k * torch.sigmoid(-b * s)
    return (s * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_loss(
    model: Denoiser,
    x0: Tensor,
    *,
    schedule: Schedule,
    stage: int,
    c: float = 0.0,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    q: float = 2.0,
    generator: torch.Generator | None = None,
    cond: Any = None,
) -> Tensor:
    """Easy consistency tuning [Geng 2024 (ECT), Algorithm 1], without LPIPS.

    Per sample: t ~ lognormal(p_mean, p_std) (EDM's training levels, clamped to the
    schedule's [s_min, s_max]), r = :func:`ect_gap`, one noise z shared by both points,
    y_t = x0 + t z and y_r = x0 + r z; the target f(y_r, r) is taken without gradient (the
    online weights, no EMA), and is x0 itself where r < s_min (r is then 0, the end of the
    trajectory, as in ECT, so the weight stays 1 / t). The loss is
    pseudo-Huber over the sample, weighted by 1 / (t - r) [ECT's adaptive weighting].
    ``model`` is a consistency model (:class:`ConsistencyDenoiser`); x0 (B, ...).
    """
    b = x0.shape[0]
    eps = torch.randn(b, generator=generator, dtype=F64)
    s_t = (p_mean + p_std * eps).exp().clamp(schedule.sigma_min, schedule.sigma_max)
    s_r = ect_gap(s_t, stage, q=q)
    s_r = torch.where(s_r < schedule.sigma_min, torch.zeros_like(s_r), s_r)  # at the boundary
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    t = schedule.t_from_edm_sigma(s_t)
    alpha_t = broadcast_to(schedule.alpha(t), x0)
    f_t = model(alpha_t * (x0 + broadcast_to(s_t, x0) * z), t, cond).x0
    inside = (s_r > 0).to(x0.device).reshape(-1, *[1] * (x0.ndim - 1))
    f_r = x0.detach()
    if bool(inside.any()):
        with torch.no_grad():
            s_in = s_r.clamp(min=schedule.sigma_min)
            r = schedule.t_from_edm_sigma(s_in)
            y_r = x0 + broadcast_to(s_in, x0) * z
            f_r = torch.where(
                inside, model(broadcast_to(schedule.alpha(r), x0) * y_r, r, cond).x0, f_r
            )
    weight = 1 / (s_t - s_r)
    return (pseudo_huber(f_t - f_r, c) * weight.to(x0.device, x0.dtype)).mean()


def karras_levels(schedule: Schedule, n: int, rho: float = 7.0) -> Tensor:
    """N increasing schedule times of Karras levels from t_min to t_max [Song 2023, Sec. 5:
    the grid of consistency distillation; Karras 2022, Eq. 5]."""
    if n < 2:
        raise ValueError(f"consistency distillation needs at least 2 levels, got {n}")
    lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
    s = (lo + torch.linspace(0, 1, n, dtype=F64) * (hi - lo)) ** rho
    ts = schedule.t_from_edm_sigma(s)
    ts[0], ts[-1] = schedule.t_min, schedule.t_max
    return ts
