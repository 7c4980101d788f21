"""The KL-regularised autoencoder of latent diffusion's first stage [Rombach 2022, App. G].

An encoder E maps an image x (B, C, H, W) to a diagonal Gaussian posterior q(z | x) =
N(mu(x), diag(sigma(x)^2)) over latents z (B, c, H/f, W/f); a decoder D maps z back to an image.
The downsampling factor is f = 2^(L - 1) for L = len(channel_mult) levels (f = 1, 2, 4, ...).
Layout, as the LDM first stage: a 3x3 input conv; per level ``num_res_blocks`` residual blocks
(GroupNorm, SiLU, conv) and a strided-conv downsample (none after the last level); a middle of
residual block, optional self-attention, residual block; GroupNorm, SiLU and a 3x3 conv to the
2c channels of (mu, log sigma^2). The decoder mirrors it with ``num_res_blocks + 1`` blocks per
level and nearest-neighbour + conv upsampling. The blocks are those of difflab's U-Net without
the noise-level input (``nn.unet`` Downsample/Upsample, ``nn.layers`` GroupNorm and attention).

Training minimises, per image [Rombach 2022, Sec. 3.1; Kingma & Welling 2014, Eq. 10]:

    L = (||x - D(z)||_p^p + w_KL KL(q(z | x) || N(0, I))) / D,   z = mu + sigma * eps

with the reparameterised sample z, p = 1 (``l1``, LDM's choice) or 2 (``l2``), a small KL weight
(w_KL = 1e-6 in LDM's KL models) and D = C H W: LDM's loss (summed over pixels and latents) divided
by the number of pixels, which keeps LDM's relative weighting and gives per-pixel magnitudes that
suit gradient clipping. The perceptual and adversarial terms of LDM are not implemented: they need
pretrained networks that are not available offline.

Shapes: ``encode`` (B, C, H, W) -> posterior over (B, c, H/f, W/f); ``decode`` the reverse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab._util import check_choice
from difflab.likelihood import normal_kl
from difflab.nn.layers import (
    AttentionBlock,
    check_image_batch,
    group_norm,
    preset_config,
    zero_,
)
from difflab.nn.unet import Downsample, Upsample

__all__ = [
    "AutoencoderConfig",
    "AUTOENCODER_PRESETS",
    "RecLoss",
    "REC_LOSSES",
    "DiagonalGaussian",
    "Encoder",
    "Decoder",
    "Autoencoder",
    "build_autoencoder",
    "autoencoder_loss",
    "psnr",
]

RecLoss = Literal["l1", "l2"]
REC_LOSSES: tuple[str, ...] = get_args(RecLoss)
_LOGVAR_RANGE = (-30.0, 20.0)  # the LDM first stage clamps log sigma^2 to this range


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of an `Autoencoder`; `dataclasses.asdict(config)` gives its keywords."""

    image_size: int = 28  # side of the square training images; divisible by the factor f
    in_channels: int = 1  # image channels C
    latent_channels: int = 4  # latent channels c
    base_channels: int = 32  # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2)  # channels per level = base * mult; f = 2^(levels - 1)
    num_res_blocks: int = 1  # residual blocks per level (encoder; +1 in the decoder)
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    num_heads: int = 1  # attention heads
    norm_groups: int = 8  # GroupNorm groups; every channel count must be divisible by it
    dropout: float = 0.0  # dropout before the second conv of each residual block

    def __post_init__(self) -> None:  # JSON gives lists: keep tuples so configs compare equal
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))

    @property
    def downsample_factor(self) -> int:
        """f = 2^(levels - 1): the latent side is image_size / f."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, H / f, W / f) of the latents of a training-size image."""
        side = self.image_size // self.downsample_factor
        return (self.latent_channels, side, side)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # MNIST 28x28x1 -> 14x14x4 (LDM's "KL-f2" shape with c = 4). 16 base channels: the 28x28
    # level is the cost of an autoencoder; at 32 its decoder costs ~3 mnist-cpu U-Net passes.
    "mnist-f2c4": AutoencoderConfig(base_channels=16),
    # MNIST 28x28x1 -> 7x7x4: 4x fewer latent dimensions than pixels.
    "mnist-f4c4": AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 2)),
    # 8x8x1 -> 4x4x2 with about 10k parameters, for tests.
    "tiny": AutoencoderConfig(
        image_size=8,
        latent_channels=2,
        base_channels=4,
        channel_mult=(1, 2),
        mid_attention=False,
        norm_groups=2,
    ),
}


class DiagonalGaussian:
    """A diagonal Gaussian N(mean, diag(exp(logvar))) over latents: the posterior q(z | x).

    ``logvar`` is clamped to [-30, 20] as in the LDM first stage. Shapes: mean, logvar (B, ...).
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(
                f"mean and logvar must have one shape, got {tuple(mean.shape)} and "
                f"{tuple(logvar.shape)}"
            )
        self.mean = mean
        self.logvar = logvar.clamp(*_LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split (B, 2c, ...) encoder output into mean (first c channels) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn on the CPU from ``generator``: the
        reparameterised sample, differentiable in mean and logvar [Kingma & Welling 2014, Eq. 10].
        """
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The posterior mean (its mode): a deterministic encoding."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over the latent dimensions, (B,) nats, in closed form:
        1/2 sum(mean^2 + var - 1 - logvar) [Kingma & Welling 2014, App. B]."""
        zero = torch.zeros((), dtype=self.mean.dtype, device=self.mean.device)
        return normal_kl(self.mean, self.logvar, zero, zero).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """Residual block without a noise-level input (the autoencoder's block).

    h = conv2(Dropout(SiLU(GN(conv1(SiLU(GN(x))))))); out = skip(x) + h, skip = 1x1 conv when
    the channel count changes; conv2 starts at zero. Shapes: (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, norm_groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _middle(ch: int, cfg: AutoencoderConfig) -> nn.Sequential:
    """Residual block, optional self-attention, residual block (LDM's "mid")."""
    attn = AttentionBlock(ch, cfg.num_heads, cfg.norm_groups) if cfg.mid_attention else None
    return nn.Sequential(
        ResnetBlock(ch, ch, cfg.norm_groups, cfg.dropout),
        attn if attn is not None else nn.Identity(),
        ResnetBlock(ch, ch, cfg.norm_groups, cfg.dropout),
    )


class Encoder(nn.Module):
    """x (B, C, H, W) -> moments (B, 2c, H/f, W/f): the mean and log-variance of q(z | x)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = cfg.base_channels, cfg.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch, 3, padding=1)]
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(cur, ch * mult, groups, cfg.dropout))
                cur = ch * mult
            if level != len(cfg.channel_mult) - 1:
                layers.append(Downsample(cur))
        layers += [_middle(cur, cfg), group_norm(cur, groups), nn.SiLU()]
        layers.append(nn.Conv2d(cur, 2 * cfg.latent_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z (B, c, H/f, W/f) -> x (B, C, H, W)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, groups = cfg.base_channels, cfg.norm_groups
        cur = ch * cfg.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cur, 3, padding=1)]
        layers.append(_middle(cur, cfg))
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(cur, ch * mult, groups, cfg.dropout))
                cur = ch * mult
            if level != 0:
                layers.append(Upsample(cur))
        layers += [
            group_norm(cur, groups),
            nn.SiLU(),
            nn.Conv2d(cur, cfg.in_channels, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """KL autoencoder (LDM first stage); keyword arguments as in `AutoencoderConfig`.

    ``encode(x)`` -> `DiagonalGaussian` over (B, c, H/f, W/f); ``decode(z)`` -> (B, C, H, W);
    ``forward(x, generator)`` -> (reconstruction of a posterior sample, posterior).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        cfg = AutoencoderConfig(**kwargs)
        validate_config(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_shape: tuple[int, ...] | None = None) -> tuple[int, int, int]:
        """(c, H / f, W / f) for images of shape (C, H, W) (default: the training size)."""
        if image_shape is None:
            return self.config.latent_shape
        f = self.downsample_factor
        return (self.config.latent_channels, image_shape[-2] // f, image_shape[-1] // f)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        f = self.downsample_factor
        check_image_batch(x, self.config.in_channels, f, factor_name=f"the factor f = {f}")
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"latents must have shape (B, {c}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def validate_config(cfg: AutoencoderConfig) -> None:
    """Raise ValueError with a one-line reason if ``cfg`` describes no valid autoencoder."""
    if not cfg.channel_mult or cfg.num_res_blocks < 1 or cfg.base_channels < 1:
        raise ValueError("channel_mult must be non-empty; num_res_blocks, base_channels >= 1")
    if cfg.latent_channels < 1 or cfg.in_channels < 1:
        raise ValueError("latent_channels and in_channels must be >= 1")
    f = cfg.downsample_factor
    if cfg.image_size % f:
        raise ValueError(
            f"image_size {cfg.image_size} is not divisible by the factor f = {f} of channel_mult "
            f"{cfg.channel_mult}; use fewer levels"
        )
    for mult in cfg.channel_mult:
        if (cfg.base_channels * mult) % cfg.norm_groups:
            raise ValueError(
                f"channels {cfg.base_channels * mult} must be divisible by norm_groups "
                f"({cfg.norm_groups})"
            )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")


def build_autoencoder(preset: str | AutoencoderConfig, **overrides: Any) -> Autoencoder:
    """Build an `Autoencoder` from a name in `AUTOENCODER_PRESETS` or a config, with overrides.

    Example: ``build_autoencoder("mnist-f2c4", latent_channels=3)``.
    """
    config = preset_config(preset, AUTOENCODER_PRESETS, "autoencoder", **overrides)
    return Autoencoder(**dataclasses.asdict(config))


def autoencoder_loss(
    ae: Autoencoder,
    x: Tensor,
    *,
    kl_weight: float = 1e-6,
    rec_loss: RecLoss = "l1",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL-autoencoder loss of a batch x (B, C, H, W) (module docstring; [Rombach 2022]).

    The reconstruction is decoded from the reparameterised posterior sample drawn with
    ``generator``. Returns (scalar loss, logs): ``rec`` (the reconstruction term per pixel),
    ``kl`` (KL per image, nats), ``mse`` (per pixel) and ``posterior_std`` (mean sigma), all
    detached scalars (no host sync).
    """
    check_choice("reconstruction loss", rec_loss, REC_LOSSES)
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    x_rec, posterior = ae(x, generator)
    err = x_rec - x
    rec = (err.abs() if rec_loss == "l1" else err.square()).flatten(1).sum(1)  # (B,)
    kl = posterior.kl()  # (B,)
    dims = x[0].numel()
    loss = ((rec + kl_weight * kl) / dims).mean()
    logs = {
        "rec": (rec / dims).mean().detach(),
        "kl": kl.mean().detach(),
        "mse": err.square().mean().detach(),
        "posterior_std": posterior.std.mean().detach(),
    }
    return loss, logs


def psnr(x: Tensor, x_rec: Tensor, *, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE), (B,) dB, the MSE of
    each image floored at 1e-12. difflab reports its mean over images for every kind of run
    (docs/METRICS.md).

    ``data_range`` is the width of the pixel range: 2 for images in [-1, 1].
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(x_rec.shape)}")
    mse = (x - x_rec).double().square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)
