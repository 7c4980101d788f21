"""Samplers: walk from noise to data with any denoiser on any schedule.

All samplers share one signature, written once by the ``sampler`` decorator of
:mod:`difflab.samplers.common`::

    sampler(denoiser, x, ts, *, schedule, cond=None, generator=None, callback=None, **options)

The samplers are the entries of :data:`~difflab.sampler_table.SAMPLER_TABLE` (one
``SamplerSpec`` each: function, options, default spacing, network evaluations per step, fixed
options); ``SAMPLERS``, ``SAMPLER_OPTIONS``, ``DEFAULT_SPACING`` and :func:`nfe` are read off it:

=================== =========================================== ====== ========================
name                function                                    NFE    paper
=================== =========================================== ====== ========================
``ddpm``            :func:`ancestral.ddpm`                      N      Ho 2020, Algorithm 2
``ddim``            :func:`ddim.ddim`                           N      Song 2021, Eq. 12
``dpm++2m``         :func:`dpm_solver.dpm_solver_pp`, order 2   N      Lu 2022b, Algorithm 2
``dpm++3m``         :func:`dpm_solver.dpm_solver_pp`, order 3   N      Lu 2022b, order 3
``dpm++2s``         :func:`dpm_solver.dpmpp_2s`                 2N-1   Lu 2022b, Algorithm 1
``dpm++2m-sde``     :func:`dpm_solver.dpmpp_sde`, order 2       N      Lu 2022b, SDE-DPM-Solver++
``euler``           :func:`edm.edm_sampler`, first order        N      Karras 2022, Alg. 2
``heun``            :func:`edm.edm_sampler`, second order       2N-1   Karras 2022, Algorithm 2
``euler-ancestral`` :func:`edm.euler_ancestral`                 N      k-diffusion ``euler_a``
``flow-euler``      :func:`ddim.ddim` with eta = 0               N      Lipman 2023; = DDIM
``flow-heun``       :func:`flow.flow_heun`                      2N-1   Heun in t; Esser 2024
``ipndm``           :func:`ipndm.ipndm`                         N      Zhang & Chen 2023
``consistency``     :func:`consistency.consistency`             N      Song 2023, Algorithm 1
=================== =========================================== ====== ========================

``consistency`` expects a consistency model (``SamplerSpec.consistency``), the others a
posterior-mean denoiser. N is the number of steps of a grid ending at t = 0 (see
:func:`nfe`). ``SAMPLER_OPTIONS`` lists the options each sampler takes (e.g. ``eta`` of
DDIM); :func:`sample` rejects the others.

:func:`sample` is the high-level entry point: it builds the time grid, draws the prior noise and
runs a sampler by name.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from difflab._util import check_choice
from difflab.parameterization import Denoiser
from difflab.sampler_table import SAMPLER_NAMES, SAMPLER_TABLE, SamplerSpec
from difflab.samplers.ancestral import ddpm
from difflab.samplers.common import Callback, Sampler, ThresholdedDenoiser, prior_noise
from difflab.samplers.consistency import consistency
from difflab.samplers.ddim import ddim, ddim_invert
from difflab.samplers.dpm_solver import dpm_solver_pp, dpmpp_2s, dpmpp_sde
from difflab.samplers.edm import edm_sampler, euler_ancestral
from difflab.samplers.flow import flow_heun
from difflab.samplers.ipndm import ipndm
from difflab.schedules import DiscreteSchedule, Schedule, Spacing, sampling_timesteps

__all__ = [
    "SAMPLERS",
    "SAMPLER_OPTIONS",
    "DEFAULT_SPACING",
    "SAMPLER_NAMES",
    "SAMPLER_TABLE",
    "Sampler",
    "SamplerSpec",
    "ThresholdedDenoiser",
    "consistency",
    "ddim",
    "ddim_invert",
    "ddpm",
    "default_spacing",
    "dpm_solver_pp",
    "dpmpp_2s",
    "dpmpp_sde",
    "edm_sampler",
    "euler_ancestral",
    "flow_heun",
    "ipndm",
    "nfe",
    "prior_noise",
    "sample",
]

# read off the sampler table (difflab.sampler_table); nothing here is kept by hand
SAMPLERS: dict[str, Sampler] = {name: spec.load() for name, spec in SAMPLER_TABLE.items()}
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {n: s.options for n, s in SAMPLER_TABLE.items()}
DEFAULT_SPACING: dict[str, Spacing] = {
    name: cast(Spacing, spec.default_spacing) for name, spec in SAMPLER_TABLE.items()
}


def _check_sampler(name: str) -> str:
    return check_choice("sampler", name, tuple(SAMPLERS))


def default_spacing(sampler: str, schedule: Schedule) -> Spacing:
    """``DEFAULT_SPACING[sampler]`` for a discrete (DDPM) schedule; ``karras`` for the others,
    where a grid uniform in sigma would leave the low-noise levels to one large last step;
    ``trailing`` for a schedule that ends in pure noise (the flow-matching schedule: its
    shifted trailing grid is SD3's and Flux's, and Karras needs a finite top level)."""
    _check_sampler(sampler)
    if isinstance(schedule, DiscreteSchedule):
        return DEFAULT_SPACING[sampler]
    return "trailing" if math.isinf(schedule.sigma_max) else "karras"


def nfe(sampler: str, steps: int) -> int:
    """Number of network evaluations of ``sampler`` for ``steps`` steps ending at t = 0."""
    _check_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return SAMPLER_TABLE[sampler].nfe(steps)


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    shape: tuple[int, ...] | torch.Size,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    spacing: Spacing | None = None,
    t_start: float | None = None,
    generator: torch.Generator | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    threshold: str | None = None,
    **options: Any,
) -> Tensor:
    """Draw samples of ``shape`` (B, ...) with a named sampler.

    Args:
        denoiser: the model, as a :class:`~difflab.parameterization.Denoiser`.
        schedule: the noise schedule the denoiser was trained with.
        shape: output shape, e.g. (B, 2) for points or (B, C, H, W) for images.
        sampler: one of ``SAMPLERS``.
        steps: number of steps (see :func:`nfe` for the network evaluations).
        spacing: time grid (see :func:`~difflab.schedules.sampling_timesteps`); default
            :func:`default_spacing`.
        t_start: start below t_max (with ``x_init`` a noised image: SDEdit-style editing).
        generator: randomness for the prior noise and stochastic samplers.
        x_init: the starting sample at the first time of the grid (default: prior noise).
        threshold: None, ``"clip"`` or ``"dynamic"``: threshold the x0 prediction to the data
            range [-1, 1] (:class:`ThresholdedDenoiser`), for images in [-1, 1].
        **options: sampler options, those of ``SAMPLER_OPTIONS[sampler]`` (``eta``,
            ``variance``, ``s_churn``, ...).
    Returns:
        Samples at t = 0, shape ``shape``, dtype ``dtype`` on ``device``.
    """
    fn = SAMPLERS[_check_sampler(sampler)]
    for key in options:
        if key not in SAMPLER_OPTIONS[sampler]:
            takes = ", ".join(SAMPLER_OPTIONS[sampler]) or "none"
            raise ValueError(f"sampler {sampler!r} has no option {key!r} (its options: {takes})")
    if threshold is not None:
        denoiser = ThresholdedDenoiser(denoiser, schedule, mode=threshold)  # type: ignore[arg-type]
    ts = sampling_timesteps(
        schedule, steps, spacing=spacing or default_spacing(sampler, schedule), t_start=t_start
    )
    if x_init is None:
        x = prior_noise(
            schedule, shape, generator=generator, t=float(ts[0]), dtype=dtype, device=device
        )
    else:
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
        x = x_init.to(device=device, dtype=dtype)
    return fn(
        denoiser,
        x,
        ts,
        schedule=schedule,
        cond=cond,
        generator=generator,
        callback=callback,
        **options,
    )
