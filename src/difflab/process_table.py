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
``flow``     ``flow``: x_t = (1 - t) x0 + t eps, t in [0, 1],    the same with the velocity
             SD3's time shift ``diffusion.shift``                target u = eps - x0 and
             [Lipman 2023; Liu 2023; Esser 2024]                 logit-normal or mode times
===========  ==================================================  ================================

A process also says which settings of the other sections it cannot use (a learned variance, a
parameterisation singular at its ends), the loss options its settings make
(``loss_options``) and the ``time_scale`` its network sees (the flow-matching network is
called with 1000 t, the range of a DDPM step, which the sinusoidal time embeddings expect, and
diffusers' convention for its flow models).

Adding a process is its schedule and loss in their modules and one :class:`Process` entry
here; the app layer asks :func:`process_for` and names no process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from difflab.objectives import diffusion_loss
from difflab.schedules import (
    BETA_RANGE_SCHEDULES,
    BETA_SCHEDULES,
    DiscreteSchedule,
    EDMSchedule,
    FlowMatchSchedule,
    Schedule,
)

__all__ = [
    "PROCESSES",
    "Process",
    "SCHEDULE_NAMES",
    "diffusion_settings",
    "process_for",
    "process_of_settings",
]

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
        loss_options: ``loss_options(settings) -> dict``, the loss's keyword arguments that
            the process's own settings give (added to the options every run passes).
        parameterizations: the ``model.parameterization`` values it can use (None: all).
        learned_variance: whether it can train a learned variance (Improved DDPM's hybrid
            loss needs a discrete schedule).
        time_scale: the network is called with ``time_scale * t`` (see
            :class:`~difflab.parameterization.ModelDenoiser`).
        settings_of: ``settings_of(schedule_config) -> settings | None``: the ``diffusion``
            settings that rebuild a schedule of ``Schedule.to_config()`` (an imported model's),
            None when the schedule is not this process's or its settings cannot express it.
        sampler: (sampler, steps) for a model of this process that comes without a config
            (a diffusers folder).
    """

    name: str
    schedules: tuple[str, ...]
    make_schedule: Callable[[Settings], Schedule]
    check: Callable[[Settings], None]
    loss: Callable[..., Any] = diffusion_loss
    loss_options: Callable[[Settings], dict[str, Any]] = lambda d: {}
    parameterizations: tuple[str, ...] | None = None
    learned_variance: bool = False
    time_scale: float = 1.0
    settings_of: Callable[[Settings], dict[str, Any] | None] = lambda c: None
    sampler: tuple[str, int] = ("dpm++2m-sde", 10)

    def check_model(self, parameterization: str, learned_variance: bool) -> None:
        """One-line ``ValueError`` for a network output the process cannot use."""
        if self.parameterizations is not None and parameterization not in self.parameterizations:
            raise ValueError(
                f"model.parameterization={parameterization} does not suit diffusion.schedule="
                f"{self.schedules[0]}; choose one of: {', '.join(self.parameterizations)}"
            )
        if learned_variance and not self.learned_variance:
            raise ValueError(
                "model.learned_variance needs a discrete (DDPM) diffusion.schedule "
                f"(Improved DDPM's hybrid loss), not {self.schedules[0]!r}"
            )


def _discrete(d: Settings) -> Schedule:
    beta_range = {k: d[k] for k in ("beta_start", "beta_end") if d.get(k) is not None}
    return DiscreteSchedule.from_name(
        d["schedule"], d["T"], zero_terminal_snr=d.get("zero_terminal_snr", False), **beta_range
    )


# settings of the flow-matching process only, and the value that means "not set"
FLOW_ONLY = ("shift", "logit_mean", "logit_std", "mode_scale")
# time samplings of the flow-matching schedule only (they draw t in (0, 1))
FLOW_TIME_SAMPLINGS = ("logit-normal", "mode")


def _refuse_flow_settings(d: Settings) -> None:
    for key in FLOW_ONLY:
        if d.get(key) is not None:
            raise ValueError(
                f"diffusion.{key} applies to diffusion.schedule=flow, not {d['schedule']!r}"
            )
    if d.get("t_sampling") in FLOW_TIME_SAMPLINGS:
        raise ValueError(
            f"diffusion.t_sampling={d['t_sampling']} applies to diffusion.schedule=flow, "
            f"not {d['schedule']!r}"
        )


def _check_discrete(d: Settings) -> None:
    """A beta range is read by the schedules that have one, and must make valid betas."""
    _refuse_flow_settings(d)
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


def _discrete_settings(c: Settings) -> dict[str, Any] | None:
    if c.get("type") != "discrete" or c.get("name") not in BETA_SCHEDULES:
        return None
    extra = set(c) - {"type", "name", "T", "zero_terminal_snr", "beta_start", "beta_end"}
    if extra:  # e.g. a cosine offset, which the settings do not hold
        return None
    out = {
        "schedule": c["name"],
        "T": c["T"],
        "zero_terminal_snr": bool(c.get("zero_terminal_snr")),
    }
    out |= {k: float(c[k]) for k in ("beta_start", "beta_end") if k in c}
    return out


def _edm(d: Settings) -> Schedule:
    return EDMSchedule(d["sigma_min"], d["sigma_max"])


def _refuse_beta_settings(d: Settings) -> None:
    if d.get("beta_start") is not None or d.get("beta_end") is not None:
        names = ", ".join(BETA_RANGE_SCHEDULES)
        raise ValueError(
            f"diffusion.beta_start/beta_end apply to the {names} schedules, not {d['schedule']!r}"
        )
    if d.get("zero_terminal_snr"):
        raise ValueError(
            f"diffusion.zero_terminal_snr applies to the discrete schedules, not {d['schedule']!r}"
        )


def _check_edm(d: Settings) -> None:
    _refuse_beta_settings(d)
    _refuse_flow_settings(d)


def _flow(d: Settings) -> Schedule:
    return FlowMatchSchedule(shift=1.0 if d.get("shift") is None else d["shift"])


def _check_flow(d: Settings) -> None:
    """The flow-matching schedule has no betas and no integer steps: a beta range, zero
    terminal SNR (it ends in pure noise already) and importance sampling of steps do not
    apply; the shift and the time law's parameters must be valid."""
    _refuse_beta_settings(d)
    if d.get("t_sampling") == "importance":
        raise ValueError(
            "diffusion.t_sampling=importance draws integer steps of a discrete schedule; "
            "the flow schedule takes uniform, logit-normal, lognormal or mode"
        )
    if d.get("logit_std") is not None and not d["logit_std"] > 0:
        raise ValueError(f"diffusion.logit_std must be > 0, got {d['logit_std']}")
    lo, hi = -1.0, 2.0 / (math.pi - 2.0)  # a monotone map [Esser 2024, Eq. 20]
    if d.get("mode_scale") is not None and not lo <= d["mode_scale"] <= hi:
        raise ValueError(
            f"diffusion.mode_scale must be in [{lo:g}, {hi:.4f}], got {d['mode_scale']}"
        )
    if d.get("shift") is not None and not d["shift"] > 0:
        raise ValueError(f"diffusion.shift must be > 0, got {d['shift']}")


def _flow_settings(c: Settings) -> dict[str, Any] | None:
    if c.get("type") != "flow" or c.get("t_min") != FlowMatchSchedule().t_min:
        return None
    return {"schedule": "flow", "shift": None if c["shift"] == 1 else float(c["shift"])}


def _flow_loss_options(d: Settings) -> dict[str, Any]:
    """The time law's parameters: SD3's logit-normal(0, 1) and mode scale 1.29 unless set."""
    defaults = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
    return {f"flow_{k}": default if d.get(k) is None else d[k] for k, default in defaults.items()}


PROCESSES: dict[str, Process] = {
    p.name: p
    for p in (
        Process(
            "ddpm",
            BETA_SCHEDULES,
            _discrete,
            _check_discrete,
            learned_variance=True,
            settings_of=_discrete_settings,
        ),
        Process(
            "edm",
            ("edm",),
            _edm,
            _check_edm,
            settings_of=lambda c: (
                {"schedule": "edm", "sigma_min": c["sigma_min"], "sigma_max": c["sigma_max"]}
                if c.get("type") == "edm"
                else None
            ),
        ),
        # eps and edm outputs are singular where the flow schedule ends in pure noise (t = 1)
        Process(
            "flow",
            ("flow",),
            _flow,
            _check_flow,
            loss_options=_flow_loss_options,
            parameterizations=("flow", "x0", "v"),
            time_scale=1000.0,
            settings_of=_flow_settings,
            sampler=("flow-euler", 20),
        ),
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


def diffusion_settings(schedule_config: Settings) -> dict[str, Any] | None:
    """The ``diffusion`` settings that rebuild the schedule of ``schedule_config`` (a
    ``Schedule.to_config()``, e.g. of an imported model) by its process; None when no process's
    settings express it (a custom beta schedule)."""
    for p in PROCESSES.values():
        settings = p.settings_of(schedule_config)
        if settings is not None:
            return settings
    return None


def process_of_settings(schedule_config: Settings) -> Process | None:
    """The process whose settings rebuild ``schedule_config`` (see :func:`diffusion_settings`)."""
    settings = diffusion_settings(schedule_config)
    return None if settings is None else process_for(settings["schedule"])
