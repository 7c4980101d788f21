"""Synthetic image data sets made on the fly: tiny, exact, and with no download.

For tests and fast tutorials of image models (autoencoders, latent and cascaded diffusion):

* :func:`bar_images` -- a finite set: one bar of ``width`` pixels at +1 on a -1 background,
  horizontal or vertical, at positions 0, width, 2 width, ... (2 size / width images). With an
  even width its f x f box-downsampled versions (f dividing the width) are again bar images.
* :func:`gaussian_blobs` -- a continuous family: one Gaussian bump of random centre and width.

Images are (N, 1, size, size) float32 in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bar_images", "sample_bars", "gaussian_blobs", "nearest_distance"]


def bar_images(size: int = 8, width: int = 2) -> Tensor:
    """All bar images, (2 size / width, 1, size, size); ``width`` must divide ``size``."""
    if size < 1 or width < 1 or size % width:
        raise ValueError(f"the bar width {width} must divide the image size {size}")
    images = []
    for pos in range(0, size, width):
        im = -torch.ones(size, size)
        im[pos : pos + width] = 1
        images += [im.clone(), im.T.clone()]
    return torch.stack(images)[:, None]


def sample_bars(
    n: int, *, size: int = 8, width: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """n bar images drawn uniformly with replacement, (n, 1, size, size)."""
    bars = bar_images(size, width)
    return bars[torch.randint(len(bars), (n,), generator=generator)]


def gaussian_blobs(n: int, *, size: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """n images 2 exp(-|p - c|^2 / (2 w^2)) - 1 over pixel positions p, (n, 1, size, size).

    Centre c ~ U[1.5, size - 1.5]^2 and width w ~ U[0.8, 1.6] pixels, per image.
    """
    centre = 1.5 + (size - 3) * torch.rand(n, 2, generator=generator)
    width = 0.8 + 0.8 * torch.rand(n, 1, 1, generator=generator)
    i = torch.arange(size, dtype=torch.float32)
    d2 = (i[None, :, None] - centre[:, 0, None, None]) ** 2
    d2 = d2 + (i[None, None, :] - centre[:, 1, None, None]) ** 2
    return (2 * torch.exp(-d2 / (2 * width**2)) - 1)[:, None]


def nearest_distance(x: Tensor, data: Tensor) -> Tensor:
    """RMS pixel distance of each image of x (B, ...) to its nearest image in data (N, ...), (B,).

    A toy sample-quality metric for finite data sets such as :func:`bar_images`.
    """
    d2 = (x[:, None] - data[None].to(x)).square().flatten(2).mean(2)
    return d2.min(1).values.sqrt()
