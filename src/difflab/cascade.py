"""Cascaded diffusion: a low-resolution base model followed by super-resolution stages.

[Ho 2021 (Cascaded Diffusion Models), Sec. 3; Saharia 2021 (SR3)]. The base model samples
low-resolution images; each super-resolution (SR) stage is a Palette-style image-to-image model
(:mod:`difflab.image_to_image`) that samples x (B, C, f H, f W) given the low-resolution image y
(B, C, H, W), upsampled to the target size and concatenated to x_t (``cond["image"]``).

Gaussian conditioning augmentation [Ho 2021, Sec. 3.2 and 4.2]: the SR model is trained on
upsampled low-resolution images noised by the forward process of its own schedule,

    y_s = alpha_s up(y) + sigma_s eps,   s ~ U[0, s_max],

and told the level s (``cond["aug_level"]``, a U-Net with ``aug_level_embedding``). At sampling
a fixed level s is chosen (a small s makes the SR stage robust to the base model's artefacts).
Noise is added after upsampling, so y_s given up(y) is exactly the forward process q(x_s | x_0)
and the level means the same as the model's own noise level t. The low-resolution training image
is the f x f box average of the high-resolution one (``downsample_images``, the base model's
data); ``upsample_images`` is ``bilinear`` (default, half-pixel centres) or ``nearest``.

A cascade is described by `Stage` (base) and `SRStage` objects; `cascade_sample` runs
base -> upsample -> augment -> SR (-> SR ...) with one generator, so a seed reproduces every
stage; `super_resolve` runs one SR stage on given low-resolution images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab._util import F64, check_choice
from difflab.objectives import LossOutput, diffusion_loss
from difflab.parameterization import Denoiser, ModelDenoiser
from difflab.process import q_sample
from difflab.samplers import sample
from difflab.schedules import Schedule

__all__ = [
    "UpsampleMode",
    "UPSAMPLE_MODES",
    "downsample_images",
    "upsample_images",
    "sample_aug_levels",
    "augment_low_res",
    "sr_cond",
    "sr_loss",
    "sr_training_cond",
    "Stage",
    "SRStage",
    "StageCallback",
    "super_resolve",
    "cascade_sample",
]

UpsampleMode = Literal["bilinear", "nearest"]
UPSAMPLE_MODES: tuple[str, ...] = get_args(UpsampleMode)
StageCallback = Callable[[int, dict[str, Any]], None]  # (stage index, sampler callback dict)


def _check_factor(factor: int) -> int:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the resolution factor must be a positive integer, got {factor!r}")
    return factor


def downsample_images(x: Tensor, factor: int) -> Tensor:
    """f x f box average: (B, C, H, W) -> (B, C, H / f, W / f); H and W divisible by f."""
    _check_factor(factor)
    if x.ndim != 4 or x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"images must have shape (B, C, H, W) with H, W divisible by {factor}, "
            f"got {tuple(x.shape)}"
        )
    return F.avg_pool2d(x, factor) if factor > 1 else x


def upsample_images(y: Tensor, factor: int, mode: UpsampleMode = "bilinear") -> Tensor:
    """(B, C, H, W) -> (B, C, f H, f W) by ``bilinear`` (half-pixel centres) or ``nearest``."""
    _check_factor(factor)
    check_choice("upsampling mode", mode, UPSAMPLE_MODES)
    if y.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(y.shape)}")
    if factor == 1:
        return y
    if mode == "nearest":
        return F.interpolate(y, scale_factor=float(factor), mode="nearest")
    return F.interpolate(y, scale_factor=float(factor), mode="bilinear", align_corners=False)


def sample_aug_levels(
    batch: int, max_level: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Training levels s ~ U[0, max_level], (batch,) float64 [Ho 2021, Sec. 4.2]."""
    if not max_level >= 0:
        raise ValueError(f"the maximum augmentation level must be >= 0, got {max_level}")
    return torch.rand(batch, generator=generator, dtype=F64) * float(max_level)


def augment_low_res(
    y_low: Tensor,
    level: Tensor | float,
    *,
    schedule: Schedule,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian conditioning augmentation y_s = alpha_s y + sigma_s eps [Ho 2021, Sec. 3.2].

    The forward process q(y_s | y) of ``schedule`` (:func:`difflab.process.q_sample`) at level
    ``level`` (a scalar or (B,), schedule time units in [0, t_max]; 0 leaves y unchanged).
    Shapes: y_low (B, ...) -> (B, ...).
    """
    lv = torch.as_tensor(level, dtype=F64).cpu()
    if bool(((lv < 0) | (lv > schedule.t_max)).any()):
        raise ValueError(
            f"augmentation levels must lie in [0, {schedule.t_max}] (the schedule's t)"
        )
    return q_sample(y_low, lv, schedule, generator=generator)


def sr_cond(
    y_low: Tensor,
    level: Tensor | float,
    *,
    schedule: Schedule,
    factor: int = 2,
    upsample: UpsampleMode = "bilinear",
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The conditioning of an SR model: {"image": augmented up(y), "aug_level": s (B,)}.

    y_low (B, C, H, W) is upsampled by ``factor``, then noised to ``level`` (scalar or (B,));
    class ``labels`` (B,), if given, go under "class".
    """
    y_up = upsample_images(y_low, factor, upsample)
    lv = torch.as_tensor(level, dtype=F64).cpu().expand(y_low.shape[0])
    cond = {
        "image": augment_low_res(y_up, lv, schedule=schedule, generator=generator),
        "aug_level": lv.to(device=y_low.device, dtype=y_low.dtype),
    }
    if labels is not None:
        cond["class"] = labels
    return cond


def sr_training_cond(
    x0: Tensor,
    *,
    max_aug_level: float,
    factor: int = 2,
    generator: torch.Generator | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """The conditioning of an SR stage's training batch of high-resolution images x0 (B, C, H,
    W): y = downsample_images(x0, factor), s ~ U[0, max_aug_level], then :func:`sr_cond` of
    (y, s) with ``options`` (``schedule``, ``upsample``, ``labels``). Draws from
    ``generator``, in order: s, then the augmentation noise."""
    y_low = downsample_images(x0, factor)
    level = sample_aug_levels(x0.shape[0], max_aug_level, generator=generator)
    return sr_cond(y_low, level, factor=factor, generator=generator, **options)


def sr_loss(
    denoiser: ModelDenoiser,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> LossOutput:
    """The training loss of an SR stage on high-resolution images x0 (B, C, H, W): the
    diffusion loss of x0 with ``cond = sr_training_cond(x0, ...)`` on the denoiser's own
    schedule. ``options``: those of :func:`sr_training_cond` (``max_aug_level``, required;
    ``factor``, ``upsample``, ``labels``), the rest go to
    :func:`difflab.objectives.diffusion_loss`. Draws from ``generator``, in order: s, the
    augmentation noise, then the time and noise of the diffusion loss.
    """
    aug = {k: options.pop(k) for k in ("max_aug_level", "factor", "upsample", "labels")
           if k in options}  # fmt: skip
    cond = sr_training_cond(x0, schedule=denoiser.schedule, generator=generator, **aug)
    return diffusion_loss(denoiser, x0, cond=cond, generator=generator, **options)


@dataclass
class Stage:
    """One model of a cascade and how to sample it (the base stage)."""

    denoiser: Denoiser  # takes cond = class labels (B,) or None
    schedule: Schedule  # the schedule it was trained with
    sampler: str = "ddim"  # a name in difflab.samplers.SAMPLERS
    steps: int = 50
    options: dict[str, Any] = field(default_factory=dict)  # more samplers.sample keywords


@dataclass
class SRStage(Stage):
    """A super-resolution stage: its denoiser takes `sr_cond` conditioning."""

    aug_level: float = 0.0  # sampling-time augmentation level s (schedule time units)
    factor: int = 2  # output side / input side
    upsample: UpsampleMode = "bilinear"  # as in training


def _stage_callback(callback: StageCallback | None, index: int) -> Any:
    return None if callback is None else (lambda info: callback(index, info))


def _run_stage(stage: Stage, shape: tuple[int, ...], **kwargs: Any) -> Tensor:
    return sample(
        stage.denoiser, stage.schedule, shape, sampler=stage.sampler, steps=stage.steps,
        **kwargs, **stage.options,
    )  # fmt: skip


def super_resolve(
    stage: SRStage,
    low_res: Tensor,
    *,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Sample x ~ p(x | y) with an SR stage: y (B, C, H, W) in [-1, 1] -> (B, C, f H, f W).

    Draws from ``generator``: the augmentation noise of y at ``stage.aug_level``, then the
    sampler's noise. ``callback`` is the sampler's per-step callback.
    """
    b, c, h, w = low_res.shape
    cond = sr_cond(
        low_res, stage.aug_level, schedule=stage.schedule, factor=stage.factor,
        upsample=stage.upsample, labels=labels, generator=generator,
    )  # fmt: skip
    shape = (b, c, h * stage.factor, w * stage.factor)
    return _run_stage(
        stage, shape, generator=generator, cond=cond, callback=callback, dtype=low_res.dtype,
        device=low_res.device,
    )  # fmt: skip


def cascade_sample(
    base: Stage,
    sr_stages: SRStage | Sequence[SRStage],
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    callback: StageCallback | None = None,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """Run a cascade: base samples of ``shape`` (B, C, H, W), then each SR stage in turn.

    Every stage draws from the one ``generator`` in order (base prior and sampler noise, then per
    SR stage its augmentation and sampler noise), so a seed reproduces the whole chain. Each
    stage's output is clipped to [-1, 1] before it conditions the next. ``labels`` (B,) go to
    every stage (class-conditional cascades); ``callback(stage_index, info)`` sees every
    sampler step (stage 0 is the base). Returns the images of every stage, lowest first.
    """
    stages = [sr_stages] if isinstance(sr_stages, SRStage) else list(sr_stages)
    images = [
        _run_stage(
            base, tuple(shape), generator=generator, cond=labels,
            callback=_stage_callback(callback, 0), device=device,
        ).clamp(-1, 1)
    ]  # fmt: skip
    for i, stage in enumerate(stages, start=1):
        x = super_resolve(
            stage, images[-1], generator=generator, labels=labels,
            callback=_stage_callback(callback, i),
        )  # fmt: skip
        images.append(x.clamp(-1, 1))
    return images
