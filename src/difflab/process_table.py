"""The process table: a diffusion process family is one :class:`Process`, chosen by the config's
``diffusion.schedule``.

A process says which schedule names it owns, how to build its :class:`~difflab.schedules.Schedule`
from the ``diffusion`` settings, what to check in them, and its training loss, in the way EDM's
``VPLoss``, ``VELoss`` and ``EDMLoss`` are small interchangeable objects [Karras 2022,
Table 1]; what the network predicts (``model.parameterization``), the time distribution
(``diffusion.t_sampling``) and the loss weighting (``diffusion.weighting``) are the loss's
options.

===========  ==================================================  ================================
process      schedules                                           loss
===========  ==================================================  ================================
``ddpm``     the discrete beta schedules (linear, cosine, ...)   :func:`difflab.objectives.\
diffusion_loss`
             [Ho 2020; Nichol & Dhariwal 2021]
``edm``      ``edm``: sigma(t) = t in [sigma_min, sigma_max]     the same, on EDM's schedule
             [Karras 2022]
===========  ==================================================  ================================

Adding a process (e.g. flow matching: a linear-interpolant schedule, the velocity target, its
loss) is its schedule and loss in their modules and one :class:`Process` entry here; the app
layer asks :func:`process_for` and names no process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from difflab.objectives import diffusion_loss
from difflab.schedules import (
    BETA_RANGE_SCHEDULES,
    BETA_SCHEDULES,
    DiscreteSchedule,
    EDMSchedule,
    Schedule,
)

__all__ = ["PROCESSES", "Process", "SCHEDULE_NAMES", "process_for"]

Settings = Mapping[str, Any]  # the fields of a run config's ``diffusion`` section


@dataclass(frozen=True)
class Process:
    """An entry of :data:`PROCESSES`.

    Attributes:
        name: its name in the table.
        schedules: the ``diffusion.schedule`` names that select it.
        make_schedule: ``make_schedule(settings) -> Schedule`` from the ``diffusion`` settings.
        check: ``check(settings)`` raises a one-line ``ValueError`` for settings it cannot use.
        loss: ``loss(denoiser, x0, **options) -> LossOutput``, the training objective.
    """

    name: str
    schedules: tuple[str, ...]
    make_schedule: Callable[[Settings], Schedule]
    check: Callable[[Settings], None]
    loss: Callable[..., Any] = diffusion_loss


def _discrete(d: Settings) -> Schedule:
    beta_range = {k: d[k] for k in ("beta_start", "beta_end") if d.get(k) is not None}
    return DiscreteSchedule.from_name(
        d["schedule"], d["T"], zero_terminal_snr=d.get("zero_terminal_snr", False), **beta_range
    )


def _check_discrete(d: Settings) -> None:
    """A beta range is read by the schedules that have one, and must make valid betas."""
    if d.get("beta_start") is None and d.get("beta_end") is None:
        return
    if d["schedule"] not in BETA_RANGE_SCHEDULES:
        names = ", ".join(BETA_RANGE_SCHEDULES)
        raise ValueError(
            f"diffusion.beta_start/beta_end apply to the {names} schedules, not {d['schedule']!r}"
        )
    try:  # the range as make_betas reads it: an end left unset takes its default
        _discrete(d)
    except ValueError as e:
        raise ValueError(f"diffusion.beta_start/beta_end: {e}") from None


def _edm(d: Settings) -> Schedule:
    return EDMSchedule(d["sigma_min"], d["sigma_max"])


def _check_edm(d: Settings) -> None:
    if d.get("beta_start") is not None or d.get("beta_end") is not None:
        names = ", ".join(BETA_RANGE_SCHEDULES)
        raise ValueError(
            f"diffusion.beta_start/beta_end apply to the {names} schedules, not {d['schedule']!r}"
        )


PROCESSES: dict[str, Process] = {
    p.name: p
    for p in (
        Process("ddpm", BETA_SCHEDULES, _discrete, _check_discrete),
        Process("edm", ("edm",), _edm, _check_edm),
    )
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(s for p in PROCESSES.values() for s in p.schedules)


def process_for(schedule: str) -> Process:
    """The process whose schedules include ``schedule`` (a ``diffusion.schedule``)."""
    for p in PROCESSES.values():
        if schedule in p.schedules:
            return p
    raise ValueError(
        f"unknown diffusion.schedule {schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}"
    )
