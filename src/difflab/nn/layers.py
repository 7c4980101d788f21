"""Building blocks shared by the denoising networks.

- `sinusoidal_embedding`: the Transformer position encoding used for the DDPM timestep [Ho 2020,
  Appendix B; Vaswani 2017, Sec. 3.5].
- `GaussianFourierFeatures`: random Fourier features of the noise level [Song 2021, Sec. C.1;
  Tancik 2020].
- `TimeEmbedding`: one of the two feature maps followed by a two-layer MLP head.
- `ClassEmbedding`: a label table with an extra "null" row for classifier-free guidance
  [Ho & Salimans 2022].
- `AttentionBlock`: multi-head self-attention over the pixels of a feature map with GroupNorm
  and a residual connection [Ho 2020, Appendix B; Vaswani 2017].
- `split_cond`, `aug_level_from_cond`: read the `cond` argument of the network contract
  `model(x, t, cond=None)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TimeEmbeddingKind = Literal["sinusoidal", "fourier"]
_COND_KEYS = ("class", "image", "aug_level")


def sinusoidal_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 1
) -> Tensor:
    """Sinusoidal embedding of a (possibly fractional or negative) noise level.

    emb(t) = [sin(w_0 t), ..., sin(w_{h-1} t), cos(w_0 t), ..., cos(w_{h-1} t)] with h = dim // 2
    and frequencies w_i = max_period^(-i / (h - freq_shift)): with the default freq_shift = 1
    geometric from w_0 = 1 down to w_{h-1} = 1 / max_period, as in the DDPM reference code
    [Ho 2020, Appendix B; Vaswani 2017, Sec. 3.5]; freq_shift = 0 gives the Transformer's
    spacing (w_{h-1} slightly above 1 / max_period). An odd `dim` gets one zero column at the
    end. Every row has squared norm exactly h.

    Args:
        t: (B,) noise levels (timesteps, or any real number such as ln(sigma) / 4).
        dim: embedding width (>= 2).
        max_period: the longest period is 2 pi * max_period.
        freq_shift: 1 (DDPM) or 0 (Transformer) in the exponent's denominator h - freq_shift.

    Returns:
        (B, dim) float32 embedding.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / max(half - freq_shift, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)  # w_i = max_period^(-i / (h - shift))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class GaussianFourierFeatures(nn.Module):
    """Fixed random Fourier features of the noise level [Song 2021, Sec. C.1].

    emb(t) = [sin(2 pi W t), cos(2 pi W t)], W ~ N(0, scale^2) drawn once and stored as a buffer
    (saved with the weights, never trained). Song et al. use scale 16 on log(sigma).

    Shapes: t (B,) -> (B, dim), dim even.
    """

    def __init__(
        self, dim: int, scale: float = 16.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2 != 0:
            raise ValueError(f"Fourier feature dim must be even and >= 2, got {dim}")
        self.register_buffer("W", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
        angles = 2 * math.pi * t.float()[:, None] * self.W[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimeEmbedding(nn.Module):
    """Noise-level features followed by Linear -> SiLU -> Linear [Ho 2020, Appendix B].

    Args:
        dim: width of the sinusoidal / Fourier features.
        embed_dim: output width (DDPM uses 4 * base channels).
        kind: "sinusoidal" (`sinusoidal_embedding`) or "fourier" (`GaussianFourierFeatures`).
        fourier_scale: standard deviation of the Fourier frequencies.
        generator: random source for the Fourier frequencies.

    Shapes: t (B,) -> (B, embed_dim).
    """

    def __init__(
        self,
        dim: int,
        embed_dim: int,
        kind: TimeEmbeddingKind = "sinusoidal",
        fourier_scale: float = 16.0,
        generator: torch.Generator | None = None,
        freq_shift: int = 1,
    ) -> None:
        super().__init__()
        if kind not in get_args(TimeEmbeddingKind):
            raise ValueError(
                f"unknown time embedding {kind!r}; valid: {', '.join(get_args(TimeEmbeddingKind))}"
            )
        self.dim = dim
        self.kind = kind
        self.freq_shift = freq_shift
        self.fourier = (
            GaussianFourierFeatures(dim, fourier_scale, generator) if kind == "fourier" else None
        )
        self.mlp = nn.Sequential(
            nn.Linear(dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        if self.fourier is None:
            feats = sinusoidal_embedding(t, self.dim, freq_shift=self.freq_shift)
        else:
            feats = self.fourier(t)
        return self.mlp(feats)


class ClassEmbedding(nn.Module):
    """Class-label table with an extra null label for classifier-free guidance [Ho & Salimans 2022].

    Labels 0 .. num_classes - 1 are real classes; label `num_classes` (= `self.null_index`) is the
    "no label" token used for unconditional training and sampling.

    Shapes: labels (B,) int64 -> (B, dim).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.null_index = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def null_labels(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """(batch,) int64 tensor filled with the null index."""
        return torch.full((batch,), self.null_index, dtype=torch.long, device=device)

    def forward(self, labels: Tensor) -> Tensor:
        if labels.ndim != 1 or labels.dtype != torch.long:
            raise ValueError(
                f"class labels must be an int64 tensor of shape (B,), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        if labels.device.type == "cpu" and labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > self.null_index:
                raise ValueError(
                    f"class labels must lie in [0, {self.null_index}] "
                    f"({self.null_index} = null label), got range [{lo}, {hi}]"
                )
        return self.table(labels)


def add_class_embedding(
    emb: Tensor, class_embed: ClassEmbedding | None, labels: Tensor | None
) -> Tensor:
    """emb + the embedding of ``labels`` (the null label when None, i.e. unconditional).

    A model without classes (``class_embed`` None) returns emb and refuses labels in one line.
    Shapes: emb (B, dim), labels (B,) int64 -> (B, dim).
    """
    if class_embed is None:
        if labels is not None:
            raise ValueError("class labels given but the model has num_classes=0")
        return emb
    if labels is None:
        labels = class_embed.null_labels(emb.shape[0], device=emb.device)
    return emb + class_embed(labels)


def drop_class_labels(
    labels: Tensor, p: float, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by the null index `num_classes` with probability p (CFG training).

    [Ho & Salimans 2022, Algorithm 1]. Shapes: labels (B,) int64 -> (B,) int64.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must be in [0, 1], got {p}")
    u = torch.rand(labels.shape, generator=generator).to(labels.device)
    return torch.where(u < p, torch.full_like(labels, num_classes), labels)


def split_cond(cond: Tensor | dict[str, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    """Read the `cond` argument of `model(x, t, cond)` into (class_labels, image).

    `cond` is None, an int64 tensor of class labels (B,), or a dict with optional keys
    "class" (B,) int64, "image" (B, C_cond, H, W) float and "aug_level" (B,) float (read by
    `aug_level_from_cond`).
    """
    if cond is None:
        return None, None
    if isinstance(cond, Tensor):
        return cond, None
    if isinstance(cond, dict):
        unknown = set(cond) - set(_COND_KEYS)
        if unknown:
            raise ValueError(
                f"unknown cond keys {sorted(unknown)}; valid keys: {', '.join(_COND_KEYS)}"
            )
        return cond.get("class"), cond.get("image")
    raise ValueError(
        f"cond must be None, an int64 label tensor or a dict, got {type(cond).__name__}"
    )


def aug_level_from_cond(cond: Tensor | dict[str, Tensor] | None) -> Tensor | None:
    """The conditioning-augmentation level `cond["aug_level"]` (B,) of a cascade stage, or None.

    [Ho 2021 (Cascaded Diffusion Models), Sec. 3.2]: the noise level of the augmented
    low-resolution image, in the schedule's time units, given to the network like t.
    """
    split_cond(cond)  # validates the keys
    return cond.get("aug_level") if isinstance(cond, dict) else None


ConfigT = TypeVar("ConfigT")


def preset_config(
    preset: str | ConfigT, presets: dict[str, ConfigT], what: str, **overrides: Any
) -> ConfigT:
    """The config of a network: a preset name looked up in ``presets`` (or a config as it is),
    with ``overrides`` replacing its fields. Unknown names and fields are one-line errors;
    ``what`` names the network in them ("U-Net", "DiT", "autoencoder")."""
    if isinstance(preset, str):
        if preset not in presets:
            raise ValueError(f"unknown {what} preset {preset!r}; valid: {', '.join(presets)}")
        preset = presets[preset]
    fields = {f.name for f in dataclasses.fields(preset)}  # type: ignore[arg-type]
    unknown = set(overrides) - fields
    if unknown:
        kind = type(preset).__name__
        raise ValueError(f"unknown {kind} fields {sorted(unknown)}; valid: {sorted(fields)}")
    return dataclasses.replace(preset, **overrides)  # type: ignore[type-var]


def concat_cond_image(x: Tensor, image: Tensor | None, cond_channels: int) -> Tensor:
    """x with the conditioning image cond["image"] concatenated as extra input channels
    (image-to-image, super-resolution [Saharia 2021]); a model with ``cond_channels`` = 0
    refuses an image in one line. Shapes: x (B, C, H, W), image (B, cond_channels, H, W)
    -> (B, C + cond_channels, H, W)."""
    if not cond_channels:
        if image is not None:
            raise ValueError("cond['image'] given but the model has cond_channels=0")
        return x
    expected = (x.shape[0], cond_channels, *x.shape[2:])
    if image is None or tuple(image.shape) != expected:
        got = None if image is None else tuple(image.shape)
        raise ValueError(f"cond['image'] must have shape {expected}, got {got}")
    return torch.cat([x, image.to(x.dtype)], dim=1)


def add_aug_level_embedding(
    emb: Tensor, aug_embed: nn.Module | None, level: Tensor | None
) -> Tensor:
    """emb + aug_embed(level): the cascade's augmentation level embedded like t and added.

    A model without the embedding (``aug_embed`` None) returns emb and refuses a level in one
    line; a model with it needs one level per sample. Shapes: emb (B, dim), level (B,).
    """
    if aug_embed is None:
        if level is not None:
            raise ValueError("cond['aug_level'] given but the model has aug_level_embedding=False")
        return emb
    if level is None or tuple(level.shape) != (emb.shape[0],):
        got = None if level is None else tuple(level.shape)
        raise ValueError(f"cond['aug_level'] must have shape ({emb.shape[0]},), got {got}")
    return emb + aug_embed(level.to(emb.device))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    out = x + proj(softmax(Q K^T / sqrt(d)) V),  Q, K, V = 1x1 convs of GroupNorm(x)
    [Vaswani 2017, Eq. (1); Ho 2020, Appendix B]. The output projection starts at zero, so a fresh
    block is the identity (as in the DDPM and Improved DDPM code).

    Shapes: x (B, C, H, W) -> (B, C, H, W); C must be divisible by `num_heads` and `norm_groups`.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, norm_groups: int = 32, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        zero_(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d)) V
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


def check_image_batch(x: Tensor, channels: int, factor: int, *, factor_name: str = "") -> None:
    """A one-line ``ValueError`` unless ``x`` is (B, channels, H, W) with H and W divisible by
    ``factor`` (the sizes a network halves); ``factor_name`` says in the message what it is."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"image height and width must be divisible by {factor_name or factor}, "
            f"got {tuple(x.shape[2:])}"
        )


def upsample_nearest2x(h: Tensor) -> Tensor:
    """Nearest-neighbour upsampling by 2, (B, C, H, W) -> (B, C, 2H, 2W): each value repeated
    in a 2x2 block. Equal to ``F.interpolate(h, scale_factor=2, mode="nearest")`` to the bit,
    and about 4x faster on a CPU for contiguous (B, C, H, W) tensors (one strided copy)."""
    b, c, height, width = h.shape
    return (
        h[:, :, :, None, :, None]
        .expand(b, c, height, 2, width, 2)
        .reshape(b, c, 2 * height, 2 * width)
    )


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with a clear error when `channels` is not divisible by `groups`."""
    if channels % groups != 0:
        raise ValueError(f"channels ({channels}) must be divisible by norm_groups ({groups})")
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_(module: nn.Module) -> nn.Module:
    """Set all parameters of `module` to zero in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
