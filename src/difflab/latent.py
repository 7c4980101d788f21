"""Latent diffusion: a diffusion model on the scaled latents of a frozen autoencoder.

[Rombach 2022, Sec. 3.2 and App. G] trains the first-stage autoencoder
(:mod:`difflab.nn.autoencoder`), freezes it, and trains an ordinary diffusion model on its latents
z = E(x). The latents are rescaled to unit variance by a scale factor computed once from data,

    scale = 1 / std(z)   (the standard deviation of all latent entries of a set of batches),

so that the diffusion model sees data of the variance its schedule assumes. Nothing else
changes: the denoiser, schedules, samplers and guidance of difflab run on z * scale as they run
on pixels, and samples are decoded with x = D(z / scale).

================================  ==========================================================
function                          role
================================  ==========================================================
:func:`frozen_autoencoder`        a trained autoencoder from its config and weights, frozen
:func:`latent_scale_factor`       1 / std of the latents of some batches (once per AE)
:func:`encode_to_latents`         x (B, C, H, W) -> scale * z (B, c, H/f, W/f), no gradient
:func:`decode_latents`            scale * z -> D(z) (B, C, H, W)
:func:`latent_diffusion_loss`     the diffusion loss of a batch of images, in latent space
:func:`latent_sample`             sample latents with any sampler and decode them
:func:`decoding_callback`         a sampler callback that sees decoded images (denoising GIFs)
================================  ==========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from difflab.checkpoint import check_fits
from difflab.nn.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder
from difflab.objectives import LossOutput, diffusion_loss
from difflab.parameterization import Denoiser, ModelDenoiser
from difflab.samplers import sample
from difflab.samplers.common import Callback
from difflab.schedules import Schedule

__all__ = [
    "frozen_autoencoder",
    "latent_scale_factor",
    "encode_to_latents",
    "decode_latents",
    "latent_diffusion_loss",
    "latent_sample",
    "decoding_callback",
]


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"the latent scale factor must be a positive finite number, got {scale}")
    return scale


def frozen_autoencoder(
    config: AutoencoderConfig | Mapping[str, Any],
    weights: Mapping[str, Tensor],
    *,
    source: str = "autoencoder weights",
) -> Autoencoder:
    """Build the autoencoder of ``config`` (a config or its ``dataclasses.asdict`` JSON form),
    load ``weights`` (a state dict, e.g. a checkpoint's ``ema`` group) and freeze it (eval mode,
    no gradients): the first stage of a latent diffusion run.

    Raises:
        ValueError: the config is invalid (names the bad field).
        CheckpointError: the weights do not fit the config (names ``source``).
    """
    if not isinstance(config, AutoencoderConfig):
        fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"{source}: unknown autoencoder config fields {sorted(unknown)}")
        config = AutoencoderConfig(**config)
    ae = build_autoencoder(config)
    check_fits(ae, weights, source)
    ae.load_state_dict(dict(weights))
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode_to_latents(
    ae: Autoencoder, x: Tensor, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """scale * z for images x (B, C, H, W) -> (B, c, H/f, W/f), without gradient.

    z is a posterior sample drawn with ``generator`` (LDM trains its diffusion model on such
    samples), or the posterior mean when ``generator`` is None (deterministic).
    """
    posterior = ae.encode(x)
    z = posterior.mode() if generator is None else posterior.sample(generator)
    return z * _check_scale(scale)


def decode_latents(ae: Autoencoder, z: Tensor, scale: float) -> Tensor:
    """D(z / scale): scaled latents (B, c, h, w) -> images (B, C, h f, w f)."""
    return ae.decode(z / _check_scale(scale))


@torch.no_grad()
def latent_scale_factor(
    ae: Autoencoder, batches: Iterable[Tensor], *, generator: torch.Generator | None = None
) -> float:
    """1 / std of the latent entries of ``batches`` (each (B, C, H, W)) [Rombach 2022, App. G].

    The standard deviation is that of all entries pooled (about their common mean), accumulated
    in float64 over the batches. Latents are posterior samples drawn with ``generator``, or the
    posterior means when it is None, as :func:`encode_to_latents` makes them.
    """
    n, total, total_sq = 0, 0.0, 0.0
    for x in batches:
        z = encode_to_latents(ae, x, 1.0, generator).double()
        n += z.numel()
        total += float(z.sum())
        total_sq += float(z.square().sum())
    if n < 2:
        raise ValueError("the latent scale factor needs at least one batch with two latent entries")
    mean = total / n
    var = (total_sq - n * mean**2) / (n - 1)
    if not var > 0:
        raise ValueError(
            "the latents have zero variance: the autoencoder encodes every image alike"
        )
    return var**-0.5


def latent_diffusion_loss(
    denoiser: ModelDenoiser,
    ae: Autoencoder,
    x0: Tensor,
    scale: float,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    **loss_options: Any,
) -> LossOutput:
    """The diffusion loss of images x0 (B, C, H, W) in the scaled latent space of a frozen ``ae``.

    Draws, in order from ``generator``: the posterior sample z of each image, then the diffusion
    time and noise of :func:`difflab.objectives.diffusion_loss` (which gets ``cond`` and
    ``**loss_options``) on scale * z.
    """
    z0 = encode_to_latents(ae, x0, scale, generator)
    return diffusion_loss(denoiser, z0, cond=cond, generator=generator, **loss_options)


def decoding_callback(callback: Callback, ae: Autoencoder, scale: float) -> Callback:
    """Wrap a sampler callback so that its ``x`` and ``x0_hat`` are decoded images, not latents."""

    @torch.no_grad()
    def decoded(info: dict[str, Any]) -> None:
        out = dict(info)
        for key in ("x", "x0_hat"):
            out[key] = decode_latents(ae, info[key], scale)
        callback(out)

    return decoded


@torch.no_grad()
def latent_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    ae: Autoencoder,
    scale: float,
    batch: int,
    *,
    latent_shape: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    device: torch.device | str = "cpu",
    **sample_options: Any,
) -> Tensor:
    """Sample ``batch`` images: scaled latents by :func:`difflab.samplers.sample`, then decode.

    ``latent_shape`` (c, h, w) defaults to the autoencoder's training size; ``callback`` sees
    decoded images (:func:`decoding_callback`); ``sample_options`` (``sampler``, ``steps``,
    ``threshold``, sampler options...) go to :func:`~difflab.samplers.sample`. Thresholding
    clips latents, not pixels, so it is rarely wanted here. Returns (batch, C, H, W) images.
    """
    shape = (batch, *(latent_shape or ae.latent_shape()))
    cb = None if callback is None else decoding_callback(callback, ae, scale)
    z = sample(
        denoiser, schedule, shape, generator=generator, cond=cond, callback=cb, device=device,
        **sample_options,
    )  # fmt: skip
    return decode_latents(ae, z, scale)
