"""Guidance as denoiser wrappers: a denoiser in, a denoiser out, usable with every sampler.

* :class:`ClassifierFreeGuidance` [Ho & Salimans 2021, Eq. 6] mixes the conditional and
  unconditional predictions of one network trained with label dropout. This module uses the
  guidance *scale* ``s`` of most libraries:

      eps_guided = eps_uncond + s * (eps_cond - eps_uncond)

  so ``s = 0`` is the unconditional model, ``s = 1`` the conditional one, and the paper's ``w``
  is ``s - 1``. x0 is mixed with the same weights, which keeps (x0, eps) consistent because
  x0 = (xt - sigma eps) / alpha is affine in eps.

* :class:`ClassifierGuidance` [Dhariwal & Nichol 2021, Sec. 4] adds the gradient of a
  noise-aware classifier log p(y | x_t) to the score. With score = -eps / sigma this is the
  noise-prediction update of their Eq. 14 (Algorithm 2), written for any schedule
  xt = alpha x0 + sigma eps:

      eps_hat <- eps_hat - s * sigma_t * grad_xt log p(y | x_t)           (Eq. 14)
      x0_hat  <- (xt - sigma_t eps_hat) / alpha_t = x0_hat + s sigma_t^2 / alpha_t grad

  Every sampler sees the shifted prediction: for the ODE samplers (DDIM, DPM-Solver, Heun) it
  is Algorithm 2; for ancestral sampling the posterior mean moves by
  s * sigma_{t|s}^2 / alpha_{t|s} * grad, which for one DDPM step is s * beta_t / sqrt(1 -
  beta_t) * grad: the mean shift s * Sigma * grad of Algorithm 1 with Sigma = beta_t, up to
  the factor 1 / sqrt(1 - beta_t) = 1 + O(beta_t) (a score shift applied to the mean). At
  ``s = 1`` with the exact p(y | x_t) the shifted score is exactly grad log p(x_t | y), so an
  exact denoiser then samples the conditional law p(x0 | y).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab._util import F64, broadcast_to
from difflab.parameterization import Denoiser, Prediction
from difflab.schedules import Schedule

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "labels_from_cond"]


def _mix(u: Tensor, c: Tensor, scale: float) -> Tensor:
    return u + scale * (c - u)


def labels_from_cond(cond: Any) -> Tensor | None:
    """The class labels in ``cond``: the tensor itself, ``cond["class"]``, or None."""
    if isinstance(cond, dict):
        return cond.get("class")
    if cond is None:
        return None
    return torch.as_tensor(cond)


class ClassifierFreeGuidance:
    """Classifier-free guidance around a class-conditional denoiser [Ho & Salimans 2021, Eq. 6].

    Args:
        denoiser: a denoiser whose ``cond`` is a (B,) int64 label tensor, or a dict with the
            labels under ``"class"`` (other entries, e.g. ``"image"``, go to both branches).
        scale: guidance scale s (0 = unconditional, 1 = conditional, > 1 = guided); the
            paper's w is s - 1.
        null_label: the label meaning "no class" (the network's ``num_classes``).

    Both branches run in one batched call of size 2B. ``var_frac`` (learned variance) is
    taken from the conditional branch.
    """

    def __init__(self, denoiser: Denoiser, *, scale: float, null_label: int) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        labels = labels_from_cond(cond)
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels as cond")
        labels = labels.to(xt.device).long().expand(xt.shape[0])
        null = torch.full_like(labels, self.null_label)
        t = torch.as_tensor(t).expand(xt.shape[0])
        both_labels = torch.cat([labels, null])
        if isinstance(cond, dict):
            both_cond: Any = {k: torch.cat([v, v]) for k, v in cond.items() if k != "class"}
            both_cond["class"] = both_labels
        else:
            both_cond = both_labels
        both = self.denoiser(torch.cat([xt, xt]), torch.cat([t, t]), both_cond)
        c_x0, u_x0 = both.x0.chunk(2)
        c_eps, u_eps = both.eps.chunk(2)
        var = None if both.var_frac is None else both.var_frac.chunk(2)[0]
        return Prediction(
            x0=_mix(u_x0, c_x0, self.scale), eps=_mix(u_eps, c_eps, self.scale), var_frac=var
        )


class ClassifierGuidance:
    """Classifier guidance [Dhariwal & Nichol 2021, Eq. 14 and Algorithms 1-2].

    ``eps_hat <- eps_hat - scale * sigma_t * grad_xt log p(y | x_t)``, and x0_hat to match.

    Args:
        denoiser: the diffusion model (unconditional, class-conditional or itself guided).
        classifier: a noise-aware classifier called as ``classifier(xt, t) -> logits (B, K)``
            with the same schedule times ``t`` (B,) as the denoiser; log p(y | x_t) is the
            log-softmax of the logits. An object with a method ``log_likelihood(xt, t, y) ->
            (B,)`` is used through that method instead (for other likelihoods, e.g. a
            continuous y).
        schedule: gives sigma(t) and alpha(t).
        scale: guidance scale s (0 = no guidance; 1 = Bayes' rule with an exact classifier).
        labels: the target classes y, an int or a (B,) tensor. When None they are read from
            ``cond`` at each call (a label tensor or ``cond["class"]``).

    ``cond`` is always passed on unchanged to the wrapped denoiser, so give an unconditional
    model its target classes through ``labels`` and leave ``cond`` None. The gradient is taken
    with autograd (also inside the samplers' ``no_grad``, but not under
    ``torch.inference_mode``) and the classifier runs in xt's dtype.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        classifier: Any,
        schedule: Schedule,
        *,
        scale: float,
        labels: Tensor | int | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.classifier = classifier
        self.schedule = schedule
        self.scale = float(scale)
        self.labels = None if labels is None else torch.as_tensor(labels)

    def _labels(self, cond: Any, batch: int) -> Tensor:
        y = self.labels if self.labels is not None else labels_from_cond(cond)
        if y is None:
            raise ValueError("classifier guidance needs target labels (labels=... or cond)")
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape[0] != batch:
            raise ValueError(f"labels must have {batch} entries (one per sample), got {y.shape[0]}")
        return y

    def log_likelihood(self, xt: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """log p(y | x_t) per sample, shape (B,), differentiable in xt."""
        if hasattr(self.classifier, "log_likelihood"):
            return self.classifier.log_likelihood(xt, t, y)
        logits = self.classifier(xt, t.to(xt.device, xt.dtype))
        y = y.to(logits.device).long()
        if logits.dtype not in (torch.float32, F64):
            logits = logits.float()  # half-precision logits: log-softmax in float32
        return F.log_softmax(logits, dim=-1).gather(1, y[:, None])[:, 0]

    def grad_log_likelihood(self, xt: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """grad_xt log p(y | x_t), shape of xt (the gradient of the sum over the batch)."""
        with torch.enable_grad():
            x = xt.detach().requires_grad_(True)
            logp = self.log_likelihood(x, t, y).sum()
            (grad,) = torch.autograd.grad(logp, x)
        return grad.to(xt.dtype)

    def __call__(self, xt: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        pred = self.denoiser(xt, t, cond)
        if self.scale == 0:
            return pred
        t = torch.as_tensor(t, dtype=F64).detach().cpu().expand(xt.shape[0])
        y = self._labels(cond, xt.shape[0])
        grad = self.grad_log_likelihood(xt, t, y)
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = broadcast_to(alpha, xt), broadcast_to(sigma, xt)
        eps = pred.eps - self.scale * sigma * grad  # Eq. (14) [Dhariwal & Nichol 2021]
        x0 = pred.x0 + self.scale * sigma**2 / alpha * grad  # = (xt - sigma eps) / alpha
        return Prediction(x0=x0, eps=eps, var_frac=pred.var_frac)
