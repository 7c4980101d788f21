"""Progressive distillation [Salimans & Ho 2022]: a student that takes one DDIM step where
its teacher takes two, halving the number of sampling steps each round.

Notation (Algorithm 2 of the paper, alpha/sigma as everywhere in difflab):

==================  ============  ===========================================================
code                paper         meaning
==================  ============  ===========================================================
``ts_teacher``      t = i / N     the teacher's grid of 2N DDIM steps, decreasing to 0
``ts_teacher[::2]`` (student)     the student's grid of N steps (every other teacher time)
``t, t_mid, t_end`` t, t', t''    a student step t -> t'' and the teacher's midpoint t'
``z_t, z_end``      z_t, z_t''    the noisy input and the teacher's two-step result
``x_tilde``         x~            the student's x0 target, Eq. in Algorithm 2
``weighting``       w(lambda_t)   ``truncated-snr``: max(SNR, 1), ``snr+1``: SNR + 1 (Sec. 4)
==================  ============  ===========================================================

The target x~ is the x0 that takes the student from z_t to z_t'' in one deterministic DDIM
step: z_t'' = alpha_t'' x~ + (sigma_t'' / sigma_t)(z_t - alpha_t x~), solved for x~.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from difflab._util import F64, broadcast_to, check_choice
from difflab.parameterization import Denoiser
from difflab.schedules import Schedule, Spacing, sampling_timesteps

__all__ = [
    "DistillWeighting",
    "DISTILL_WEIGHTINGS",
    "ddim_step",
    "distillation_target",
    "progressive_distillation",
    "progressive_grids",
    "progressive_loss",
    "progressive_round",
]

DistillWeighting = Literal["truncated-snr", "snr+1"]
DISTILL_WEIGHTINGS: tuple[str, ...] = get_args(DistillWeighting)


def ddim_step(
    x0_hat: Tensor, z_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> Tensor:
    """Deterministic DDIM step t -> s: alpha_s x0 + (sigma_s / sigma_t)(z_t - alpha_t x0)
    [Song 2021 (DDIM), Eq. 12 with eta = 0; the eps_hat of the sampler is (z_t - alpha_t
    x0) / sigma_t]. Coefficients broadcast to z_t (B, ...)."""
    return alpha_s * x0_hat + (sigma_s / sigma_t) * (z_t - alpha_t * x0_hat)


def distillation_target(
    z_t: Tensor,
    z_end: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_end: Tensor,
    sigma_end: Tensor,
) -> Tensor:
    """x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
    [Salimans & Ho 2022, Algorithm 2]: the x0 whose :func:`ddim_step` from z_t lands on z_t''.
    At t'' = 0 (sigma_t'' = 0) it is z_t'' itself."""
    ratio = sigma_end / sigma_t
    return (z_end - ratio * z_t) / (alpha_end - ratio * alpha_t)


def progressive_grids(
    schedule: Schedule, student_steps: int, *, spacing: Spacing = "trailing"
) -> tuple[Tensor, Tensor]:
    """(teacher grid of 2N steps, student grid of N steps = every other teacher time).

    The student must be sampled with DDIM on the returned student grid; with ``trailing``
    spacing it is ``sampling_timesteps(schedule, N)`` itself, so the run's default grid works.
    """
    ts_teacher = sampling_timesteps(schedule, 2 * student_steps, spacing=spacing)
    return ts_teacher, ts_teacher[::2].clone()


def _coef(schedule: Schedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    alpha, sigma = schedule.alpha_sigma(t)
    return broadcast_to(alpha, x), broadcast_to(sigma, x)


def progressive_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    *,
    schedule: Schedule,
    ts_teacher: Tensor,
    weighting: DistillWeighting = "truncated-snr",
    generator: torch.Generator | None = None,
    cond: Any = None,
) -> Tensor:
    """The loss of Algorithm 2 [Salimans & Ho 2022] on a batch x0 (B, ...).

    Per sample a student step i ~ U{0, ..., N-1} of the grid (t = ts_teacher[2i],
    t' = ts_teacher[2i+1], t'' = ts_teacher[2i+2]); z_t = alpha_t x0 + sigma_t eps; two teacher
    DDIM steps give z_t''; the loss is w(lambda_t) ||x~ - x0_hat_student(z_t)||^2 (mean over
    dimensions), with w = max(SNR, 1) ("truncated SNR", = max(||x - x^||^2, ||eps - eps^||^2))
    or SNR + 1 (the v loss), in x space whatever the student's parameterisation. Scalar.
    """
    check_choice("weighting", weighting, DISTILL_WEIGHTINGS)
    ts = torch.as_tensor(ts_teacher, dtype=F64).cpu()
    if ts.ndim != 1 or ts.numel() < 3 or ts.numel() % 2 == 0:
        raise ValueError(f"ts_teacher must hold 2N + 1 times (N >= 1), got {ts.numel()}")
    i = torch.randint(0, (ts.numel() - 1) // 2, (x0.shape[0],), generator=generator)
    t, t_mid, t_end = ts[2 * i], ts[2 * i + 1], ts[2 * i + 2]
    (a_t, s_t), (a_mid, s_mid), (a_end, s_end) = (_coef(schedule, u, x0) for u in (t, t_mid, t_end))
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    z_t = a_t * x0 + s_t * eps
    with torch.no_grad():  # the teacher's two DDIM steps
        z_mid = ddim_step(teacher(z_t, t, cond).x0, z_t, a_t, s_t, a_mid, s_mid)
        z_end = ddim_step(teacher(z_mid, t_mid, cond).x0, z_mid, a_mid, s_mid, a_end, s_end)
        x_tilde = distillation_target(z_t, z_end, a_t, s_t, a_end, s_end)
    snr = torch.exp(schedule.logsnr(t))
    w = snr.clamp(min=1) if weighting == "truncated-snr" else snr + 1
    err = (student(z_t, t, cond).x0 - x_tilde).pow(2).flatten(1).mean(1)
    return (w.to(x0.device, x0.dtype) * err).mean()


def progressive_round(
    student: nn.Module,
    teacher: Denoiser,
    data: Iterator[Any],
    *,
    schedule: Schedule,
    ts_teacher: Tensor,
    iterations: int,
    lr: float = 1e-4,
    weighting: DistillWeighting = "truncated-snr",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Train ``student`` (a denoiser module, in place) for ``iterations`` Adam steps of
    :func:`progressive_loss` on batches from ``data`` (each x0 (B, ...), or a pair (x0, cond)
    for a conditional teacher); returns the student."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(iterations):
        batch = next(data)
        x0, cond = batch if isinstance(batch, (tuple, list)) else (batch, None)
        loss = progressive_loss(
            student, teacher, x0, schedule=schedule, ts_teacher=ts_teacher,
            weighting=weighting, generator=generator, cond=cond,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student


def progressive_distillation(
    model: nn.Module,
    data: Iterator[Any],
    *,
    schedule: Schedule,
    teacher_steps: int,
    final_steps: int = 1,
    iterations: int,
    spacing: Spacing = "trailing",
    on_round: Callable[[int, nn.Module], None] | None = None,
    **round_options: Any,
) -> nn.Module:
    """Rounds of :func:`progressive_round` from ``teacher_steps`` down to ``final_steps``,
    each student initialised from the previous model [Salimans & Ho 2022, Algorithm 2]:
    a copy of ``model`` (whose weights are never modified; it is put in eval mode as the first
    teacher) learns N = teacher_steps / 2, its copy N / 2, ...
    ``on_round(N, student)`` runs after each round (to record its quality). Both step counts
    are powers of two apart. Returns the last student.
    """
    n = teacher_steps
    if (
        final_steps < 1
        or n <= final_steps
        or n % final_steps
        or (n // final_steps) & (n // final_steps - 1)
    ):
        raise ValueError(
            f"teacher_steps ({teacher_steps}) must be final_steps ({final_steps}) "
            "times a power of 2"
        )
    teacher = model
    while n > final_steps:
        n //= 2
        student = copy.deepcopy(teacher).train()
        ts_teacher, _ = progressive_grids(schedule, n, spacing=spacing)
        progressive_round(
            student, teacher.eval(), data, schedule=schedule, ts_teacher=ts_teacher,
            iterations=iterations, **round_options,
        )  # fmt: skip
        if on_round is not None:
            on_round(n, student)
        teacher = student
    return teacher
