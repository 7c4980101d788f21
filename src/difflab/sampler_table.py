"""The sampler table: one :class:`SamplerSpec` per sampler name, the only list of samplers.

:mod:`difflab.samplers` derives ``SAMPLERS``, ``SAMPLER_OPTIONS``, ``DEFAULT_SPACING`` and
:func:`~difflab.samplers.nfe` from it, and the command line reads :data:`SAMPLER_NAMES`. This
module imports neither torch nor the sampler functions (each is named by a "module:function"
string and imported by :meth:`SamplerSpec.load`), so ``difflab --help`` can list the names
without importing torch.

Adding a sampler: write its step loop ``body(ctx, x, *, options)`` under the ``@sampler``
decorator of :mod:`difflab.samplers.common` (which gives it the common signature) in a module
of :mod:`difflab.samplers`; add one ``SamplerSpec`` below; give it step counts in
``GAUSSIAN_STEPS`` and ``GMM_STEPS`` of ``tests/test_samplers.py`` (every test parametrised
over the samplers then covers it) and a convergence-order case.

Default spacing (on DDPM schedules; every sampler uses ``karras`` on the others): trailing
spacing starts at the most noisy level [Lin 2024]; Karras spacing concentrates the steps at low
noise, where the ODE solvers need them [Karras 2022, Eq. 5].
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

__all__ = ["SamplerSpec", "SAMPLER_TABLE", "SAMPLER_NAMES"]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: what ``sample(..., sampler=name)`` runs and what it may be given.

    Attributes:
        name: the name users type (``--sampler``, ``sample(sampler=...)``).
        function: ``"module:function"`` of the sampler function (common signature).
        options: the keyword options a user may set (the function's keyword parameters after
            ``callback``, less those in ``fixed``; a test keeps them equal).
        default_spacing: the time grid on a DDPM schedule (a ``schedules.Spacing`` name).
        evals_per_step: network evaluations per step; with 2, the step to t = 0 takes one.
        fixed: keyword arguments this entry always passes (``heun`` is the EDM sampler with
            ``second_order=True``).
        paper: the algorithm's source.
        consistency: the sampler expects a consistency function f(x_t, t) (the end point of
            the probability-flow ODE, a distilled or tuned consistency model) as its denoiser,
            not the posterior mean E[x0 | x_t].
    """

    name: str
    function: str
    options: tuple[str, ...]
    default_spacing: str
    evals_per_step: int = 1
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    paper: str = ""
    consistency: bool = False

    def load(self) -> Callable[..., Any]:
        """The sampler function with the ``fixed`` options bound (imports its module)."""
        module, _, attr = self.function.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        return functools.partial(fn, **self.fixed) if self.fixed else fn

    def nfe(self, steps: int) -> int:
        """Network evaluations for ``steps`` steps of a grid ending at t = 0."""
        return self.evals_per_step * steps - (self.evals_per_step - 1)


def _fixed(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(kwargs)


_DPM = "difflab.samplers.dpm_solver"
_EDM = "difflab.samplers.edm"
# dpm++3m and heun are these samplers with another fixed option
_DPMPP_2M = SamplerSpec(
    "dpm++2m",
    f"{_DPM}:dpm_solver_pp",
    ("lower_order_final",),
    "karras",
    fixed=_fixed(order=2),
    paper="Lu 2022b, Algorithm 2",
)
_EULER = SamplerSpec(
    "euler",
    f"{_EDM}:edm_sampler",
    ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "karras",
    fixed=_fixed(second_order=False),
    paper="Karras 2022, Algorithm 2 without the 2nd-order correction",
)

SAMPLER_TABLE: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "ddpm",
            "difflab.samplers.ancestral:ddpm",
            ("variance",),
            "trailing",
            paper="Ho 2020, Algorithm 2",
        ),
        SamplerSpec(
            "ddim",
            "difflab.samplers.ddim:ddim",
            ("eta",),
            "trailing",
            paper="Song 2021, Eq. 12",
        ),
        _DPMPP_2M,
        replace(
            _DPMPP_2M, name="dpm++3m", fixed=_fixed(order=3), paper="Lu 2022b, multistep of order 3"
        ),
        SamplerSpec(
            "dpm++2s",
            f"{_DPM}:dpmpp_2s",
            ("r",),
            "karras",
            evals_per_step=2,
            paper="Lu 2022b, Algorithm 1",
        ),
        SamplerSpec(
            "dpm++2m-sde",
            f"{_DPM}:dpmpp_sde",
            ("eta", "s_noise", "lower_order_final"),
            "karras",
            fixed=_fixed(order=2),
            paper="Lu 2022b, SDE-DPM-Solver++(2M)",
        ),
        _EULER,
        replace(
            _EULER,
            name="heun",
            evals_per_step=2,
            fixed=_fixed(second_order=True),
            paper="Karras 2022, Algorithm 2",
        ),
        SamplerSpec(
            "euler-ancestral",
            f"{_EDM}:euler_ancestral",
            ("eta", "s_noise"),
            "karras",
            paper="k-diffusion euler_a; DDPM posterior steps in the EDM view",
        ),
        SamplerSpec(
            "flow-euler",
            "difflab.samplers.ddim:ddim",
            (),
            "trailing",
            fixed=_fixed(eta=0.0),
            paper="Lipman 2023; Liu 2023; exactly DDIM with eta = 0 (samplers/flow.py)",
        ),
        SamplerSpec(
            "flow-heun",
            "difflab.samplers.flow:flow_heun",
            ("s_churn", "s_noise"),
            "trailing",
            evals_per_step=2,
            fixed=_fixed(second_order=True),
            paper="Heun in the schedule's time t (Karras 2022, Alg. 1-2; Esser 2024)",
        ),
        SamplerSpec(
            "ipndm",
            "difflab.samplers.ipndm:ipndm",
            ("max_order",),
            "karras",
            paper="Zhang & Chen 2023 (DEIS), iPNDM",
        ),
        SamplerSpec(
            "consistency",
            "difflab.samplers.consistency:consistency",
            (),
            "trailing",
            paper="Song 2023 (Consistency Models), Algorithm 1",
            consistency=True,
        ),
    )
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_TABLE)
