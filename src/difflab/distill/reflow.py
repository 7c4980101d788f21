"""Reflow [Liu 2023 (Rectified Flow), Algorithm 1]: straighten a flow-matching model's ODE by
training on the (noise, sample) pairs of its own ODE.

Notation (difflab's time: t = 0 is data, t = 1 is noise; Liu's Z_0 is our noise end, Z_1 our
data end, with t -> 1 - t):

==================  =================  =======================================================
code                paper              meaning
==================  =================  =======================================================
``noise, x0``       (Z_0, Z_1)         a coupling: the ODE's start and end point
``x_t``             X_t                (1 - t) x0 + t noise, the straight line between them
``u``               v(X_t, t)          the velocity dx/dt = eps_hat - x0_hat (flow schedule)
``S``               S(Z)               straightness, Liu 2023 Eq. 8 (Definition 3.2 ff.)
==================  =================  =======================================================

One reflow step: draw noise, solve the teacher's ODE from it (:func:`reflow_pairs`), and fit a
new velocity to the *fixed* pairs by :func:`reflow_loss`. The flow of the independent coupling
(flow matching) crosses itself on average and its trajectories curve; the rectified coupling's
flow is straighter (its straightness S falls), so it needs fewer steps. S = 0 exactly when
every trajectory is a straight line travelled at constant speed: one Euler step is then exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab._util import F64, broadcast_to
from difflab.parameterization import Denoiser
from difflab.samplers import sample
from difflab.samplers.flow import ode_velocity
from difflab.schedules import FlowMatchSchedule, Schedule

__all__ = ["reflow_loss", "reflow_pairs", "straightness"]


def _check_flow(schedule: Schedule) -> None:
    if not isinstance(schedule, FlowMatchSchedule):
        raise ValueError(
            "reflow straightens a flow-matching model (FlowMatchSchedule, "
            f"diffusion.schedule=flow); got {type(schedule).__name__}"
        )


def reflow_pairs(
    teacher: Denoiser,
    schedule: Schedule,
    noise: Tensor,
    *,
    steps: int = 50,
    sampler: str = "flow-heun",
    cond: Any = None,
) -> tuple[Tensor, Tensor]:
    """(noise, x0): the teacher's ODE solved from ``noise`` (B, ...) at t = 1 to t = 0 with a
    deterministic ``sampler`` in ``steps`` steps [Liu 2023, Algorithm 1: (Z_0, Z_1) =
    (X_0, ODE[v](X_0))]. The pair is the new coupling a reflowed model is trained on."""
    _check_flow(schedule)
    x0 = sample(
        teacher, schedule, tuple(noise.shape), sampler=sampler, steps=steps, x_init=noise,
        cond=cond, dtype=noise.dtype, device=noise.device,
    )  # fmt: skip
    return noise, x0


def reflow_loss(
    model: Denoiser,
    x0: Tensor,
    noise: Tensor,
    *,
    schedule: Schedule,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    cond: Any = None,
) -> Tensor:
    """The rectified-flow loss on a fixed coupling [Liu 2023, Eq. 1]: per pair t ~ U(0, 1)
    (or the given (B,) ``t``), x_t = (1 - t) x0 + t noise, and
    ||(noise - x0) - u_hat(x_t, t)||^2 summed over the dimensions; mean over the batch.
    x0, noise (B, ...); returns a scalar."""
    _check_flow(schedule)
    b = x0.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator, dtype=F64)
    t = torch.as_tensor(t, dtype=F64).cpu()
    tt = broadcast_to(t, x0).to(x0.device, x0.dtype)
    x_t = (1 - tt) * x0 + tt * noise
    u_hat = model(x_t, t, cond).u()
    return (noise - x0 - u_hat).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def straightness(
    model: Denoiser, schedule: Schedule, noise: Tensor, *, steps: int = 100, cond: Any = None
) -> Tensor:
    """Straightness S = int_0^1 E ||(z_1 - z_0) - u(z_t, t)||^2 dt of the model's flow
    [Liu 2023, Eq. 8], along the ODE trajectories z_t from ``noise`` (B, ...) at t = 1.

    The trajectory is integrated by Heun's method on a uniform grid of ``steps`` steps; the
    integral is the trapezoid rule over the velocities at t = 1, 1 - h, ..., h (the velocity at
    t = 0 needs the noise of a noiseless point), the last interval [0, h] taking u(h).
    z_1 - z_0 is noise minus the trajectory's end. Squared norms over all dimensions; mean
    over the batch. The trajectory and the sums are float64; the model is called in the dtype
    of ``noise``. Returns a float64 scalar (0 for straight, constant-speed trajectories)."""
    _check_flow(schedule)
    if steps < 2:
        raise ValueError(f"straightness needs at least 2 steps, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    b, dtype = noise.shape[0], noise.dtype  # the model sees the noise's dtype
    x = noise.to(F64)
    velocities = []
    for i in range(steps):
        t, s = float(ts[i]), float(ts[i + 1])
        u = ode_velocity(model(x.to(dtype), torch.full((b,), t, dtype=F64), cond), schedule, t)
        u = u.to(F64)
        velocities.append(u)
        x_euler = x + (s - t) * u
        if s == 0:  # the step to t = 0: Euler (the velocity there is undefined)
            x = x_euler
            continue
        u_next = ode_velocity(
            model(x_euler.to(dtype), torch.full((b,), s, dtype=F64), cond), schedule, s
        )
        x = x + (s - t) * 0.5 * (u + u_next.to(F64))
    d = noise.to(F64) - x  # z_1 - z_0: the straight line's velocity
    h = 1.0 / steps
    weights = [h / 2] + [h] * (steps - 2) + [1.5 * h]  # trapezoid on [h, 1], rectangle on [0, h]
    return sum(w * (d - u).pow(2).flatten(1).sum(1).mean() for w, u in zip(weights, velocities))
