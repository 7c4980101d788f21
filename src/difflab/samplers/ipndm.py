"""iPNDM [Zhang & Chen 2023 (DEIS), Sec. 4 and App.]: improved pseudo linear multistep.

The probability-flow ODE in the scaled variable y = x / alpha with the EDM noise level
s = sigma / alpha (see :mod:`difflab.samplers.edm`) is

    dy/ds = d(y, s) = (y - D(y; s)) / s.                        [Karras 2022, Eq. 1 with Eq. 3]

iPNDM integrates it with the explicit Adams-Bashforth method of order k: a step s_i -> s_{i+1}
with h = s_{i+1} - s_i extrapolates the stored directions d_i, d_{i-1}, ...:

    k = 1:  y_{i+1} = y_i + h d_i
    k = 2:  y_{i+1} = y_i + h (3 d_i - d_{i-1}) / 2
    k = 3:  y_{i+1} = y_i + h (23 d_i - 16 d_{i-1} + 5 d_{i-2}) / 12
    k = 4:  y_{i+1} = y_i + h (55 d_i - 59 d_{i-1} + 37 d_{i-2} - 9 d_{i-3}) / 24

PNDM [Liu 2022] starts the history with Runge-Kutta steps (4 NFE each); iPNDM's improvement is
to start it with the lower-order formulas instead (k = 1, 2, 3 on the first three steps), so
every step costs one network evaluation. The coefficients are those of equal steps, used
unchanged on any grid: the method has order k on a grid uniform in s, and order 2 on a
non-uniform one such as the Karras grid (the coefficients are then off by O(h) times a first
difference of d). The step to s = 0 is the Euler step, which returns x0_hat, as in every
difflab sampler; a step from pure noise (s = inf, the flow-matching schedule's t = 1) is the
limit of the Euler step, x0_hat + s_next eps_hat (DDIM), and starts no history. Notation:

==============  ===============================================
code            meaning
==============  ===============================================
``s_cur``       EDM noise level s_i at step i
``y``           the sample in the scaled variable y = x / alpha
``history``     d_i, d_{i-1}, ... (most recent first)
``max_order``   the largest k used (4 in the paper)
==============  ===============================================
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.samplers.common import SamplerContext, sampler

__all__ = ["ADAMS_BASHFORTH", "ipndm"]

# coefficients of d_i, d_{i-1}, ... in the Adams-Bashforth step of order k (equal steps)
ADAMS_BASHFORTH: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@sampler
def ipndm(ctx: SamplerContext, x: Tensor, *, max_order: int = 4) -> Tensor:
    """iPNDM sampling [Zhang & Chen 2023]: Adams-Bashforth multistep in (y, s), 1 NFE per step.

    Step i uses order min(i + 1, max_order) (the lower-order warm start); the step to t = 0
    returns x0_hat. With ``max_order=1`` this is the Euler sampler. Deterministic.

    Args:
        max_order: the highest Adams-Bashforth order, 1 to 4.
    """
    if max_order not in ADAMS_BASHFORTH:
        raise ValueError(f"max_order must be one of: 1, 2, 3, 4, got {max_order!r}")
    coef = ctx.coef
    alpha_0 = coef["alpha"][0]
    y = x / alpha_0 if alpha_0 > 0 else x  # at pure noise (alpha = 0) x is kept until step 0
    history: list[Tensor] = []  # d_i, d_{i-1}, ... (most recent first)
    for i, t_cur, t_next in ctx.steps():
        s_cur, s_next = coef["edm_sigma"][i], coef["edm_sigma"][i + 1]
        if math.isinf(s_cur):  # from pure noise: the Euler step's limit x0_hat + s_next eps_hat
            pred = ctx.denoise_and_report(y, i, t_cur, t_next)
            y = pred.x0 + s_next * pred.eps
            continue  # an infinite step is no history for the equal-step extrapolation
        x0_hat = ctx.denoise_and_report(coef["alpha"][i] * y, i, t_cur, t_next).x0
        if s_next == 0:
            y = x0_hat  # the Euler step to s = 0: denoise to zero
            continue
        history = [(y - x0_hat) / s_cur, *history[: max_order - 1]]
        weights = ADAMS_BASHFORTH[len(history)]
        y = y + (s_next - s_cur) * sum(w * d for w, d in zip(weights, history))
    return coef["alpha"][-1] * y
