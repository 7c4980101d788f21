"""Few-step generation by training: progressive distillation and consistency models.

Every piece works on any :class:`~difflab.parameterization.Denoiser` and
:class:`~difflab.schedules.Schedule`:

* :mod:`~difflab.distill.progressive` - progressive distillation [Salimans & Ho 2022]: the
  target from two teacher DDIM steps, truncated-SNR weighting, rounds that halve the steps.
  The student samples with ``ddim`` on its round's grid.
* :mod:`~difflab.distill.consistency` - consistency models [Song 2023]: the boundary-
  conditioned wrapper, consistency distillation with a Heun step of the teacher, and easy
  consistency tuning [Geng 2024 (ECT)]. They sample with the ``consistency`` sampler.
* :mod:`~difflab.distill.reflow` - reflow [Liu 2023 (Rectified Flow)]: (noise, sample) pairs
  from a flow-matching model's ODE, the loss on that fixed coupling, and the straightness S.
"""

from difflab.distill.consistency import (
    ConsistencyDenoiser,
    consistency_distillation_loss,
    ect_gap,
    ect_loss,
    heun_step,
    karras_levels,
    pseudo_huber,
)
from difflab.distill.progressive import (
    DISTILL_WEIGHTINGS,
    DistillWeighting,
    ddim_step,
    distillation_target,
    progressive_distillation,
    progressive_grids,
    progressive_loss,
    progressive_round,
)
from difflab.distill.reflow import reflow_loss, reflow_pairs, straightness

__all__ = [
    "ConsistencyDenoiser",
    "DISTILL_WEIGHTINGS",
    "DistillWeighting",
    "consistency_distillation_loss",
    "ddim_step",
    "distillation_target",
    "ect_gap",
    "ect_loss",
    "heun_step",
    "karras_levels",
    "progressive_distillation",
    "progressive_grids",
    "progressive_loss",
    "progressive_round",
    "pseudo_huber",
    "reflow_loss",
    "reflow_pairs",
    "straightness",
]
