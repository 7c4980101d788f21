"""Inpainting with an unconditional model: replacement and RePaint resampling [Lugmayr 2022].

Known pixels ``x_known`` (where ``mask`` is 1) are enforced during sampling; the model fills in
the rest. At every step t -> s of the sampler's grid (RePaint, Algorithm 1, lines 4-8):

    x_s_known   = alpha_s x_known + sigma_s eps,  eps ~ N(0, I)          q(x_s | x0),  Eq. (8)
    x_s_unknown = one sampler step from x_t (DDPM by default)             p(x_s | x_t), Eq. (9)
    x_s         = mask * x_s_known + (1 - mask) * x_s_unknown                           Eq. (10)

With ``resample = 1`` this is the *replacement* method [Song 2021 (score SDE), App. I.2]: the
known region is noised independently of the sample, so the unknown region is only weakly
conditioned on it. RePaint harmonises the two by going back up: after reaching a jump point
the sample is re-noised ``jump`` grid steps with the forward process q(x_t | x_s) (Algorithm 1,
line 10, one jump of length j at once, which has the same law as j single steps) and denoised
again, ``resample - 1`` times per jump point (r and j of the paper, Sec. 4.2 and Fig. 4).

Jump points sit one grid step above t = 0 and every ``jump`` steps above that, as in the
reference implementation: the last step to t = 0, which returns the denoiser's mean without
noise, is never repeated (repeating it would shrink the sample towards posterior means). The
returned sample is at t = 0 and equals ``x_known`` exactly on the known pixels (the last step
is a ``torch.where`` with the mask).

Any sampler of :mod:`difflab.samplers` can make the downward steps; each step is run as a
one-step sampler call on the grid [t, s], so multistep solvers (DPM-Solver++ 2M/3M) fall back to
their first-order step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab._util import F64, check_choice
from difflab.parameterization import Denoiser
from difflab.process import q_sample, transition
from difflab.samplers import SAMPLERS, default_spacing, prior_noise
from difflab.samplers.common import Callback, randn
from difflab.schedules import Schedule, Spacing, sampling_timesteps

__all__ = ["inpaint", "repaint_schedule", "check_mask"]


def repaint_schedule(steps: int, *, jump: int = 1, resample: int = 1) -> list[int]:
    """The grid positions RePaint visits, from 0 (t_max) to ``steps`` (t = 0).

    Position p means time ``ts[p]`` of a grid of ``steps`` steps. The walk goes down one
    position at a time; on arriving at a jump point (``steps - 1 - p`` a multiple of ``jump``,
    with ``jump`` positions above it) it goes back up ``jump`` positions, ``resample - 1``
    times in all for that point, each time walking down again. ``resample = 1`` gives
    0, 1, ..., steps.

    Returns:
        The positions visited, e.g. steps=4, jump=2, resample=2 -> [0, 1, 2, 3, 1, 2, 3, 4].
    """
    for name, v in (("steps", steps), ("jump", jump), ("resample", resample)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    left = {p: resample - 1 for p in range(jump, steps) if (steps - p - 1) % jump == 0}
    path, p = [0], 0
    while p < steps:
        p += 1
        path.append(p)
        if left.get(p, 0) > 0:
            left[p] -= 1
            p -= jump
            path.append(p)
    return path


def _relay(callback: Callback | None, i: int) -> Callback | None:
    """The callback with the step counter ``i`` in place of the one-step sampler's 0."""
    if callback is None:
        return None
    return lambda info: callback({**info, "i": i})


def check_mask(mask: Tensor, x_known: Tensor) -> Tensor:
    """The mask as a bool tensor broadcast to x_known's shape; values must be 0/1 (or bool)."""
    m = torch.as_tensor(mask, device=x_known.device)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must hold only 0 (unknown) and 1 (known), or be boolean")
        m = m == 1
    try:
        return torch.broadcast_to(m, x_known.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not broadcast to x_known {tuple(x_known.shape)}"
        ) from None


def inpaint(
    denoiser: Denoiser,
    schedule: Schedule,
    x_known: Tensor,
    mask: Tensor,
    *,
    steps: int = 50,
    resample: int = 1,
    jump: int = 1,
    generator: torch.Generator | None = None,
    sampler: str = "ddpm",
    spacing: Spacing | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    **options: Any,
) -> Tensor:
    """Fill in ``x_known`` where ``mask`` is 0 [Lugmayr 2022, Algorithm 1].

    Args:
        denoiser: an unconditional (or otherwise conditioned, through ``cond``) denoiser.
        schedule: the schedule it was trained with.
        x_known: the image (B, ...) whose pixels with ``mask == 1`` are kept; the values under
            ``mask == 0`` are ignored.
        mask: 1 (or True) on known pixels, 0 on pixels to generate; broadcastable to x_known,
            e.g. (B, 1, H, W) to mask all channels of a pixel.
        steps: number of grid steps from t_max to 0 (one way).
        resample: RePaint's r, the number of times each jump point is denoised (1 = the
            replacement method).
        jump: RePaint's jump length j in grid steps.
        generator: randomness for the prior, the known-region noise and the sampler.
        sampler: the sampler making each downward step (any name in ``SAMPLERS``).
        spacing: the time grid (default :func:`~difflab.samplers.default_spacing`).
        callback: receives the sampler's per-step dict after each downward step, with ``"i"``
            counting all downward steps.
        **options: sampler options (``eta``, ``variance``, ...).
    Returns:
        The inpainted sample at t = 0, shape and dtype of ``x_known``; equal to ``x_known``
        (bit for bit) where ``mask`` is 1. There are ``steps + (resample - 1) * jump *
        ((steps - 1) // jump)`` downward steps, each costing the sampler's network
        evaluations for one step.
    """
    step_fn = SAMPLERS[check_choice("sampler", sampler, tuple(SAMPLERS))]
    known = check_mask(mask, x_known)
    ts = sampling_timesteps(schedule, steps, spacing=spacing or default_spacing(sampler, schedule))
    path = repaint_schedule(steps, jump=jump, resample=resample)
    x = prior_noise(
        schedule, x_known.shape, generator=generator, t=float(ts[0]), dtype=x_known.dtype,
        device=x_known.device,
    )  # fmt: skip
    n_down = 0
    for p, q in zip(path[:-1], path[1:]):
        if q > p:  # down: t -> s, Eq. (8)-(10)
            t, s = float(ts[p]), float(ts[q])
            x_unknown = step_fn(
                denoiser, x, torch.tensor([t, s], dtype=F64), schedule=schedule, cond=cond,
                generator=generator, callback=_relay(callback, n_down), **options,
            )  # fmt: skip
            if s == 0:
                x_known_s = x_known
            else:
                eps = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x_known_s = q_sample(x_known.to(x.dtype), s, schedule, eps=eps)
            x = torch.where(known, x_known_s, x_unknown)  # Eq. (10) [Lugmayr 2022]
            n_down += 1
        else:  # up: x_t ~ q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I), Algorithm 1 line 10
            t, s = float(ts[q]), float(ts[p])
            a_ts, var_ts = transition(
                schedule, torch.tensor(t, dtype=F64), torch.tensor(s, dtype=F64)
            )
            z = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = float(a_ts) * x + math.sqrt(float(var_ts)) * z
    return x
