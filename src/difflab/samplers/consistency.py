"""Multistep consistency sampling [Song 2023 (Consistency Models), Algorithm 1].

The denoiser here is a *consistency function*: its ``x0`` is the end point f(x_t, t) of the
probability-flow ODE trajectory through x_t (a consistency model, or
:class:`~difflab.oracles.GaussianConsistencyFunction`), not the posterior mean E[x0 | x_t]
that the other samplers expect. One step maps the prior sample straight to data; each further
step on the grid t_0 > t_1 > ... re-noises the estimate to t_{i+1} and maps it back:

    x0_hat = f(x_{t_i}, t_i),   x_{t_{i+1}} = alpha_{i+1} x0_hat + sigma_{i+1} z,  z ~ N(0, I),

the alpha/sigma form of Algorithm 1's x + sqrt(t_n^2 - eps^2) z (the paper's eps, the
boundary noise level sigma_min, is negligible next to t_n). The last step, to t = 0, returns
x0_hat. One network evaluation per step.
"""

from __future__ import annotations

from torch import Tensor

from difflab.samplers.common import SamplerContext, sampler

__all__ = ["consistency"]


@sampler
def consistency(ctx: SamplerContext, x: Tensor) -> Tensor:
    """Multistep consistency sampling [Song 2023, Algorithm 1] on the grid ``ts`` (1 step:
    x0 = f(x_T, T)); the denoiser must be a consistency function (module docstring)."""
    coef = ctx.coef
    for i, t, t_next in ctx.steps():
        x0_hat = ctx.denoise_and_report(x, i, t, t_next).x0
        if t_next == 0:
            x = x0_hat
        else:  # re-noise the estimate to the next level of the grid
            x = coef["alpha"][i + 1] * x0_hat + coef["sigma"][i + 1] * ctx.noise(x0_hat)
    return x
