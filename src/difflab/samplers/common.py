"""Pieces shared by every sampler: the one signature, the callback, noise, thresholding.

Every sampler in :mod:`difflab.samplers` has the signature (k-diffusion style)::

    sampler(denoiser, x, ts, *, schedule, cond=None, generator=None, callback=None, **options)

where ``x`` (B, ...) is the sample at time ``ts[0]`` and ``ts`` a strictly decreasing float64
grid of schedule times, normally ending at 0 (from :func:`~difflab.schedules.sampling_timesteps`);
it returns the sample at time ``ts[-1]``, of the same shape and dtype as ``x``. ``schedule``
gives alpha(t) and sigma(t), ``cond`` is passed to the denoiser, ``generator`` draws the noise of
stochastic samplers (deterministic ones accept it and do not use it). The denoiser is called with
a (B,) float64 CPU tensor of times. Once per step, after the step's first network evaluation
(:meth:`SamplerContext.denoise_and_report`), the ``callback`` receives a dict ``{"i", "t",
"t_next", "x", "x0_hat"}``: ``x`` is the current sample at time ``t`` (for EDM samplers with
churn: after the temporary noise increase) and ``x0_hat`` the denoiser's estimate of the clean
data there.

That signature is written once, here: a sampler is its step loop ``body(ctx, x, **options)``
decorated with :func:`sampler`, which checks the grid, bundles the shared arguments into one
:class:`SamplerContext` ``ctx`` and runs the body without gradients. Each sampler's docstring
names only its own options.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Protocol, get_args

import torch
from torch import Tensor

from difflab._util import F64, broadcast_to, check_choice
from difflab.parameterization import Denoiser, Prediction
from difflab.schedules import Schedule

__all__ = [
    "Callback",
    "Sampler",
    "SamplerContext",
    "ThresholdMode",
    "THRESHOLD_MODES",
    "ThresholdedDenoiser",
    "call_denoiser",
    "check_grid",
    "coefficients",
    "grid_coefficients",
    "grid_steps",
    "prior_noise",
    "randn",
    "report",
    "sampler",
]

Callback = Callable[[dict[str, Any]], None]
ThresholdMode = Literal["clip", "dynamic"]
THRESHOLD_MODES: tuple[str, ...] = get_args(ThresholdMode)


def check_grid(ts: Tensor, schedule: Schedule, *, increasing: bool = False) -> Tensor:
    """Validate a time grid: 1-D, at least two times, strictly monotone, inside [0, t_max]."""
    ts = torch.as_tensor(ts, dtype=F64).detach().cpu()
    order = "increasing" if increasing else "decreasing"
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    steps = ts[1:] - ts[:-1]
    if bool((steps <= 0).any() if increasing else (steps >= 0).any()):
        raise ValueError(f"ts must be strictly {order}, got {ts.tolist()}")
    if float(ts.min()) < 0 or float(ts.max()) > schedule.t_max:
        raise ValueError(f"ts must lie in [0, {schedule.t_max}], got {ts.min():g}..{ts.max():g}")
    return ts


def grid_steps(ts: Tensor) -> Iterator[tuple[int, float, float]]:
    """The steps of a grid: (i, ts[i], ts[i + 1]) as Python floats, for i = 0 ... len(ts) - 2."""
    for i in range(ts.numel() - 1):
        yield i, float(ts[i]), float(ts[i + 1])


def grid_coefficients(schedule: Schedule, ts: Tensor) -> dict[str, list[float]]:
    """alpha, sigma, EDM sigma (sigma / alpha) and lambda = logsnr / 2 at every time of a grid,
    as lists of Python floats computed in float64 (one vectorised schedule call per quantity).
    At t = 0: alpha = 1, sigma = 0, EDM sigma = 0, lambda = inf."""
    ts = torch.as_tensor(ts, dtype=F64).cpu()
    alpha, sigma = schedule.alpha_sigma(ts)
    return {
        "alpha": alpha.tolist(),
        "sigma": sigma.tolist(),
        "edm_sigma": schedule.edm_sigma(ts).tolist(),
        "lam": (schedule.logsnr(ts) / 2).tolist(),
    }


def coefficients(schedule: Schedule, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as Python floats, computed in float64."""
    alpha, sigma = schedule.alpha_sigma(torch.tensor(float(t), dtype=F64))
    return float(alpha), float(sigma)


def call_denoiser(denoiser: Denoiser, x: Tensor, t: float, cond: Any = None) -> Prediction:
    """Evaluate the denoiser at a single time ``t`` for the whole batch (t as (B,) float64)."""
    return denoiser(x, torch.full((x.shape[0],), float(t), dtype=F64), cond)


def report(
    callback: Callback | None, i: int, t: float, t_next: float, x: Tensor, x0_hat: Tensor
) -> None:
    """Send the per-step dictionary to the callback, if there is one."""
    if callback is not None:
        callback({"i": i, "t": float(t), "t_next": float(t_next), "x": x, "x0_hat": x0_hat})


@dataclass(frozen=True)
class SamplerContext:
    """The arguments every sampler shares, as its body sees them (see the module docstring).

    Attributes:
        denoiser, schedule, cond, generator, callback: as given to the sampler.
        ts: the checked grid, (N + 1,) float64 on the CPU, decreasing.
    """

    denoiser: Denoiser
    schedule: Schedule
    ts: Tensor
    cond: Any = None
    generator: torch.Generator | None = None
    callback: Callback | None = None

    @cached_property
    def coef(self) -> dict[str, list[float]]:
        """:func:`grid_coefficients` of the grid: ``coef["alpha"][i]`` is alpha(ts[i]), ..."""
        return grid_coefficients(self.schedule, self.ts)

    @property
    def n(self) -> int:
        """The number of steps, len(ts) - 1."""
        return self.ts.numel() - 1

    def steps(self) -> Iterator[tuple[int, float, float]]:
        """(i, ts[i], ts[i + 1]) for every step (:func:`grid_steps`)."""
        return grid_steps(self.ts)

    def denoise(self, x: Tensor, t: float) -> Prediction:
        """The denoiser's prediction at ``x`` (B, ...) and time ``t``, with ``cond``."""
        return call_denoiser(self.denoiser, x, t, self.cond)

    def denoise_and_report(
        self, x: Tensor, i: int, t: float, t_next: float, t_eval: float | None = None
    ) -> Prediction:
        """The first network evaluation of step i (t -> t_next): the denoiser's prediction at
        the sample ``x`` (B, ...), at time ``t`` or at ``t_eval`` for a sampler that first moves
        off the grid (EDM's churn); the callback receives ``x`` and the prediction's x0."""
        pred = self.denoise(x, t if t_eval is None else t_eval)
        report(self.callback, i, t, t_next, x, pred.x0)
        return pred

    def noise(self, like: Tensor) -> Tensor:
        """Standard normal noise of ``like``'s shape, dtype and device, from ``generator``."""
        return randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)


class Sampler(Protocol):
    """The one sampler signature (see the module docstring)."""

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        ts: Tensor,
        *,
        schedule: Schedule,
        cond: Any = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        **options: Any,
    ) -> Tensor: ...


def sampler(body: Callable[..., Tensor]) -> Sampler:
    """Make a sampler of the one signature from its step loop ``body(ctx, x, **options)``.

    The sampler checks ``ts`` (:func:`check_grid`), builds the :class:`SamplerContext` and runs
    the body under ``torch.no_grad()``. Its name, docstring and reported signature (the shared
    arguments, then the body's keyword options) are the body's, so ``help`` and
    ``inspect.signature`` show what a caller passes.
    """

    @functools.wraps(body)
    def run(denoiser, x, ts, *, schedule, cond=None, generator=None, callback=None, **options):
        # typed by the Sampler protocol, whose parameters the reported signature shows
        ts = check_grid(ts, schedule)
        ctx = SamplerContext(denoiser, schedule, ts, cond, generator, callback)
        with torch.no_grad():
            return body(ctx, x, **options)

    shared = list(inspect.signature(Sampler.__call__).parameters.values())[1:-1]
    body_signature = inspect.signature(body)
    own = [p for p in body_signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    signature = inspect.Signature(shared + own, return_annotation=body_signature.return_annotation)
    run.__signature__ = signature  # type: ignore[attr-defined]
    return run


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    With a CPU generator the draws do not depend on ``device``, so a seed reproduces samples.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def prior_noise(
    schedule: Schedule,
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    t: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The standard prior x_T = sqrt(alpha^2 + sigma^2) eps, eps ~ N(0, I), at t (default t_max).

    sqrt(alpha^2 + sigma^2) is 1 for variance-preserving schedules and sqrt(1 + sigma_max^2)
    for EDM, whose Algorithm 1 [Karras 2022] draws N(0, sigma_max^2 I): the extra 1 (the
    variance of unit-scale data) makes the prior the exact marginal for such data and is
    negligible next to sigma_max^2.
    """
    t = schedule.t_max if t is None else float(t)
    alpha, sigma = coefficients(schedule, t)
    scale = math.sqrt(alpha**2 + sigma**2)
    return scale * randn(tuple(shape), generator=generator, dtype=dtype, device=device)


class ThresholdedDenoiser:
    """A denoiser whose x0 prediction is thresholded; eps is recomputed from the new x0.

    * ``"clip"``: x0 <- clamp(x0, -c, c) (the "clipped" DDPM sampler of [Ho 2020] code).
    * ``"dynamic"`` [Saharia 2022 (Imagen), Sec. 2.3]: per sample, s = the ``percentile``
      quantile of |x0|, s <- max(s, c); then x0 <- clamp(x0, -s, s) * c / s. With c = 1 this is
      the paper's "clip to [-s, s] and divide by s"; predictions already in [-c, c] are untouched.

    The noise estimate is made consistent with xt: eps = (xt - alpha x0) / sigma.

    Args:
        denoiser: the wrapped denoiser.
        schedule: gives alpha(t), sigma(t).
        mode: one of ``THRESHOLD_MODES``.
        c: the data range [-c, c] (1 for images in [-1, 1]).
        percentile: quantile p in (0, 1] of |x0| for dynamic thresholding (0.995 in Imagen).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        *,
        mode: ThresholdMode = "clip",
        c: float = 1.0,
        percentile: float = 0.995,
    ) -> None:
        check_choice("threshold mode", mode, THRESHOLD_MODES)
        if not c > 0:
            raise ValueError(f"the threshold c must be positive, got {c}")
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.mode = mode
        self.c = float(c)
        self.percentile = float(percentile)

    def threshold(self, x0: Tensor) -> Tensor:
        """Apply the thresholding to x0 (B, ...)."""
        if self.mode == "clip":
            return x0.clamp(-self.c, self.c)
        flat = x0.detach().abs().reshape(x0.shape[0], -1)
        q_dtype = flat.dtype if flat.dtype in (torch.float32, F64) else torch.float32
        s = torch.quantile(flat.to(q_dtype), self.percentile, dim=1).clamp(min=self.c)
        s = broadcast_to(s, x0)
        return torch.maximum(torch.minimum(x0, s), -s) * (self.c / s)

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        pred = self.denoiser(xt, t, cond)
        x0 = self.threshold(pred.x0)
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=F64).cpu())
        alpha = broadcast_to(alpha.expand(xt.shape[0]), xt)
        sigma = broadcast_to(sigma.expand(xt.shape[0]), xt)
        eps = (xt - alpha * x0) / sigma
        return Prediction(x0=x0, eps=eps, var_frac=pred.var_frac)
