"""Image-to-image diffusion by channel concatenation: Palette [Saharia 2022a].

A conditional denoiser D(x_t, t, y) receives the degraded image y concatenated to x_t along the
channels (``cond={"image": y}``, see :class:`~difflab.nn.unet.UNet` ``cond_channels``) and is
trained with the ordinary diffusion loss on pairs (x0, y = degrade(x0)) [Saharia 2022a, Eq. 1-2];
sampling starts from noise and keeps y fixed at every step. The degradations are drawn on the
fly from the training step's generator, so a seed reproduces them exactly:

===============  ============================================  ==================  ==============
task             conditioning y                                cond channels       target
===============  ============================================  ==================  ==============
``colorize``     luma 0.299 R + 0.587 G + 0.114 B (ITU-R 601)  1                   RGB (C = 3)
``restore``      Gaussian blur (sigma ~ U[blur]) then          C                   the clean image
                 additive noise (std ~ U[noise]), per image
``inpaint``      image with a random rectangle set to 0,       C + 1               the full image
                 and the mask (+1 known, -1 missing)
===============  ============================================  ==================  ==============

Images are in [-1, 1] (B, C, H, W). Palette's own inpainting fills the hole with noise; a
constant fill and an explicit mask channel carry the same information.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab._util import F64, check_choice
from difflab.parameterization import Denoiser
from difflab.schedules import Schedule

__all__ = [
    "Task",
    "TASKS",
    "cond_channels",
    "degrade",
    "gaussian_blur",
    "grayscale",
    "inpaint_mask",
    "preview",
    "image_to_image",
]

Task = Literal["colorize", "restore", "inpaint"]
TASKS: tuple[str, ...] = get_args(Task)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def cond_channels(task: Task, channels: int) -> int:
    """Channels of the conditioning image y for a target with ``channels`` channels."""
    check_choice("image-to-image task", task, TASKS)
    if task == "colorize":
        if channels != 3:
            raise ValueError(f"colorize needs RGB (3-channel) images, got {channels} channel(s)")
        return 1
    return channels + 1 if task == "inpaint" else channels


def grayscale(x: Tensor) -> Tensor:
    """Luma of RGB images: (B, 3, H, W) -> (B, 1, H, W), linear, so [-1, 1] maps to [-1, 1]."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"grayscale expects (B, 3, H, W) images, got {tuple(x.shape)}")
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    return (x * w[None, :, None, None]).sum(1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) images with per-image ``sigma`` (B,) in pixels.

    The kernel spans +-ceil(3 max sigma) pixels and is normalised to sum 1; borders replicate
    the edge pixels, so a constant image is unchanged. sigma = 0 leaves an image unchanged.
    """
    b, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=F64).cpu().expand(b)
    if bool((sigma < 0).any()):
        raise ValueError("blur sigma must be >= 0")
    radius = int(math.ceil(3 * float(sigma.max())))
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=F64)
    logits = -(offsets[None, :] ** 2) / (2 * sigma[:, None].clamp(min=1e-12) ** 2)
    kernel = torch.softmax(logits, dim=1)  # exp(-d^2 / 2 sigma^2), normalised; (B, K)
    kernel = kernel.to(x.dtype).to(x.device).repeat_interleave(c, dim=0)  # (B*C, K)
    k = 2 * radius + 1
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
                    kernel.reshape(b * c, 1, 1, k), groups=b * c)  # fmt: skip
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"),
                    kernel.reshape(b * c, 1, k, 1), groups=b * c)  # fmt: skip
    return flat.reshape(b, c, h, w)


def inpaint_mask(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    size: tuple[float, float] = (0.25, 0.5),
) -> Tensor:
    """Random rectangular holes: a bool mask (B, 1, H, W), True on known pixels.

    Each side of the hole is a fraction U[size] of the image side (at least one pixel), placed
    uniformly inside the image. Draws from ``generator``: sides, then corners.
    """
    b, _, h, w = shape
    lo, hi = size
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"hole size fractions must satisfy 0 < lo <= hi <= 1, got {size}")
    frac = lo + (hi - lo) * torch.rand(b, 2, generator=generator, dtype=F64)
    sides = (frac * torch.tensor([h, w], dtype=F64)).round().long().clamp(min=1)
    corner = (torch.rand(b, 2, generator=generator, dtype=F64) *
              (torch.tensor([h, w]) - sides + 1)).floor().long()  # fmt: skip
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_r = (rows >= corner[:, :1]) & (rows < corner[:, :1] + sides[:, :1])  # (B, H)
    in_c = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + sides[:, 1:])  # (B, W)
    hole = in_r[:, :, None] & in_c[:, None, :]
    return ~hole[:, None]


def degrade(
    x0: Tensor,
    task: Task,
    *,
    generator: torch.Generator | None = None,
    blur: tuple[float, float] = (0.5, 1.5),
    noise: tuple[float, float] = (0.05, 0.3),
    hole: tuple[float, float] = (0.25, 0.5),
) -> Tensor:
    """The conditioning image y (B, cond_channels, H, W) of clean images x0 (B, C, H, W).

    See the module table. ``blur`` and ``noise`` are the ranges of the blur sigma (pixels) and
    of the noise standard deviation (in [-1, 1] units) for ``restore``; ``hole`` the range of
    hole side fractions for ``inpaint``. All randomness comes from ``generator`` (CPU), so the
    result is a deterministic function of x0 and the generator state.
    """
    cond_channels(task, x0.shape[1])  # validates the task and the channel count
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (B, C, H, W), got {tuple(x0.shape)}")
    b = x0.shape[0]
    if task == "colorize":
        return grayscale(x0)
    if task == "restore":
        u = torch.rand(b, 2, generator=generator, dtype=F64)
        sigma_blur = blur[0] + (blur[1] - blur[0]) * u[:, 0]
        std = (noise[0] + (noise[1] - noise[0]) * u[:, 1]).to(x0.dtype).to(x0.device)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return gaussian_blur(x0, sigma_blur) + std[:, None, None, None] * z
    known = inpaint_mask(tuple(x0.shape), generator=generator, size=hole).to(x0.device)
    masked = torch.where(known, x0, torch.zeros_like(x0))
    return torch.cat([masked, known.to(x0.dtype) * 2 - 1], dim=1)


def preview(y: Tensor, task: Task, channels: int) -> Tensor:
    """The conditioning image as a picture with ``channels`` channels, for figures."""
    check_choice("image-to-image task", task, TASKS)
    if task == "colorize":
        return y.expand(-1, channels, -1, -1)
    return y[:, :channels].clamp(-1, 1)


def image_to_image(
    denoiser: Denoiser,
    schedule: Schedule,
    y: Tensor,
    *,
    channels: int,
    sampler: str = "ddim",
    steps: int = 50,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    """Sample x0 ~ p(x0 | y) from a Palette-style model: y (B, C_y, H, W) -> (B, channels, H, W).

    The conditioning image enters every denoiser call as ``cond={"image": y}``; ``sampler``,
    ``steps``, ``generator`` and ``**options`` go to :func:`difflab.samplers.sample`.
    """
    from difflab.samplers import sample

    shape = (y.shape[0], channels, *y.shape[2:])
    return sample(
        denoiser, schedule, shape, sampler=sampler, steps=steps, generator=generator,
        cond={"image": y}, dtype=y.dtype, device=y.device, **options,
    )  # fmt: skip
