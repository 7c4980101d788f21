"""Guidance as denoiser wrappers: a denoiser in, a denoiser out.

Classifier-free guidance [Ho & Salimans 2021, Eq. 6] mixes the conditional and unconditional
predictions of one network trained with label dropout. This module uses the guidance *scale*
``s`` of most libraries:

    eps_guided = eps_uncond + s * (eps_cond - eps_uncond)

so ``s = 0`` is the unconditional model, ``s = 1`` the conditional one, and the paper's ``w``
is ``s - 1``. x0 is mixed with the same weights, which keeps (x0, eps) consistent because
x0 = (xt - sigma eps) / alpha is affine in eps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.parameterization import Denoiser, Prediction

__all__ = ["ClassifierFreeGuidance"]


def _mix(u: Tensor, c: Tensor, scale: float) -> Tensor:
    return u + scale * (c - u)


class ClassifierFreeGuidance:
    """Classifier-free guidance around a class-conditional denoiser.

    Args:
        denoiser: a denoiser whose ``cond`` is a (B,) int64 label tensor.
        scale: guidance scale s (0 = unconditional, 1 = conditional, > 1 = guided).
        null_label: the label meaning "no class" (the network's ``num_classes``).

    Both branches run in one batched call of size 2B.
    """

    def __init__(self, denoiser: Denoiser, *, scale: float, null_label: int) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        if cond is None:
            raise ValueError("classifier-free guidance needs class labels as cond")
        labels = torch.as_tensor(cond, device=xt.device).long().expand(xt.shape[0])
        null = torch.full_like(labels, self.null_label)
        t = torch.as_tensor(t).expand(xt.shape[0])
        both = self.denoiser(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([labels, null]))
        c_x0, u_x0 = both.x0.chunk(2)
        c_eps, u_eps = both.eps.chunk(2)
        var = None if both.var_frac is None else both.var_frac.chunk(2)[0]
        return Prediction(
            x0=_mix(u_x0, c_x0, self.scale), eps=_mix(u_eps, c_eps, self.scale), var_frac=var
        )
