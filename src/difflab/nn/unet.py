"""The image U-Net of DDPM and Improved DDPM, plus a plain encoder-decoder baseline.

Layout [Ho 2020, Appendix B; Nichol & Dhariwal 2021, Sec. 3-4]: a 3x3 input conv, then per
resolution level `num_res_blocks` residual blocks (optionally followed by self-attention) and a
strided-conv downsample; a middle of residual block, attention, residual block; a mirrored up path
with `num_res_blocks + 1` blocks per level that concatenate the skip activations, with
nearest-neighbour + conv upsampling; GroupNorm, SiLU and a 3x3 output conv. The noise level enters
every residual block through a sinusoidal embedding and an MLP, either added to the features
(DDPM) or as a GroupNorm scale and shift (Improved DDPM "use_scale_shift_norm"). Class labels add
a learned embedding (with a null label for classifier-free guidance [Ho & Salimans 2022]) to the
time embedding; image conditioning is concatenated to the input channels. With
`aug_level_embedding` the conditioning-augmentation level of a cascade's super-resolution stage
(`cond["aug_level"]`, in the schedule's time units) gets its own sinusoidal embedding and MLP,
added to the time embedding [Ho 2021 (Cascaded Diffusion Models), Sec. 3.2]. With `patch_size`
p > 1 the image is folded into p*p times more channels at 1/p the resolution (space-to-depth)
before the input conv and unfolded after the output conv, the cheap patching stem of "simple
diffusion" [Hoogeboom, Heek & Salimans 2023]: it cuts the cost of the full-resolution level by
about p^2.

The last conv of every residual block, the attention output projection and the output conv start
at zero, so a fresh network outputs 0 and each fresh block is the identity on its skip path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.layers import (
    AttentionBlock,
    ClassEmbedding,
    TimeEmbedding,
    TimeEmbeddingKind,
    add_aug_level_embedding,
    add_class_embedding,
    aug_level_from_cond,
    check_image_batch,
    concat_cond_image,
    group_norm,
    preset_config,
    split_cond,
    upsample_nearest2x,
    zero_,
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet`; `dataclasses.asdict(config)` gives its keyword arguments."""

    image_size: int = 32  # training resolution; attention_resolutions refer to it
    in_channels: int = 3  # channels of x (not counting cond_channels)
    out_channels: int | None = None  # None = in_channels; 2 * in_channels for learned variance
    base_channels: int = 128  # channels at the first level (DDPM "ch")
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # channels per level = base * mult; one per level
    num_res_blocks: int = 2  # residual blocks per level on the down path (+1 on the up path)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    num_heads: int = 1  # attention heads (channels must be divisible by it)
    dropout: float = 0.1  # dropout before the second conv of each residual block
    num_classes: int = 0  # class conditioning if > 0; label num_classes is the null label
    cond_channels: int = 0  # channels of cond["image"], concatenated to x
    use_scale_shift_norm: bool = True  # Improved DDPM time injection; False = DDPM's addition
    norm_groups: int = 32  # GroupNorm groups; every channel count must be divisible by it
    time_embedding: TimeEmbeddingKind = "sinusoidal"  # "fourier" for Song 2021 features
    time_features: int | None = None  # width of the sin/cos features of t; None = base_channels
    fourier_scale: float = 16.0  # std of the Fourier frequencies (time_embedding="fourier")
    patch_size: int = 1  # p > 1: space-to-depth by p at the input, depth-to-space at the output
    aug_level_embedding: bool = False  # cascades: embed cond["aug_level"] (B,) like t, add it
    norm_eps: float = 1e-6  # epsilon of every GroupNorm
    downsample_padding: int = 1  # 1: pad 1 on every side; 0: right/bottom only (TF "SAME")
    time_freq_shift: int = 1  # sinusoidal frequencies max_period^(-i/(h - shift)); 1 = DDPM

    def __post_init__(self) -> None:  # JSON gives lists: keep tuples so configs compare equal
        for name in ("channel_mult", "attention_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


UNET_PRESETS: dict[str, UNetConfig] = {
    # DDPM CIFAR-10 model [Ho 2020, Appendix B]: 35.7M parameters. Downsampling pads as the
    # reference code's stride-2 "SAME" conv, so the released weights (google/ddpm-cifar10-32
    # in diffusers' layout) load into it unchanged (difflab.interop.diffusers).
    "ddpm-cifar10": UNetConfig(use_scale_shift_norm=False, downsample_padding=0),
    # 28x28 grayscale, chosen for training speed on a 2-core CPU (benchmarks/unet_speed.py).
    "mnist-cpu": UNetConfig(
        image_size=28,
        in_channels=1,
        patch_size=2,  # 2x2 fold: levels at 14x14 and 7x7, ~4x cheaper than a 28x28 level
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        mid_attention=True,
        num_heads=1,
        dropout=0.0,
        norm_groups=8,
    ),
}
# 14x14 inputs: MNIST at half resolution (a cascade's base). One 7x7 level after a 2x2 fold;
# about 3x cheaper per pass than mnist-cpu.
UNET_PRESETS["mnist-half"] = dataclasses.replace(
    UNET_PRESETS["mnist-cpu"], image_size=14, in_channels=4, base_channels=48, channel_mult=(1,)
)
# 7x7x4 latents of the f = 4 MNIST autoencoder (mnist-f4c4): one 7x7 level, no fold (a 2x2 fold
# of f = 2 latents lost their local structure: BENCHMARKS.md, latent recipes); ~4x cheaper per
# pass than mnist-cpu.
UNET_PRESETS["mnist-latent"] = dataclasses.replace(
    UNET_PRESETS["mnist-half"], image_size=7, patch_size=1
)
# A few thousand parameters, for tests.
UNET_PRESETS["tiny"] = UNetConfig(
    image_size=16,
    in_channels=1,
    base_channels=4,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    mid_attention=False,
    num_heads=2,
    dropout=0.0,
    norm_groups=2,
    time_features=32,  # 4 sin/cos features cannot resolve t in [0, 1000]
)
# tiny's levels (16x16x1) in the DDPM layout of ddpm-cifar10 (additive time embedding, "SAME"
# downsampling), 0.1M parameters: every option has a diffusers form, so it exports to and
# imports from a UNet2DModel
UNET_PRESETS["tiny-ddpm"] = dataclasses.replace(
    UNET_PRESETS["tiny"],
    base_channels=16,
    mid_attention=True,
    num_heads=1,
    norm_groups=4,
    time_features=None,
    use_scale_shift_norm=False,
    downsample_padding=0,
)


class ResBlock(nn.Module):
    """Residual block with time embedding [Ho 2020, Appendix B; Nichol & Dhariwal 2021].

    h = conv1(SiLU(GN(x)))
    additive:    h = conv2(Dropout(SiLU(GN(h + W emb))))
    scale-shift: h = conv2(Dropout(SiLU(GN(h) * (1 + scale) + shift))), (scale, shift) = W emb
    out = skip(x) + h, skip = 1x1 conv when the channel count changes. conv2 starts at zero.

    Shapes: x (B, in_ch, H, W), emb (B, embed_dim) -> (B, out_ch, H, W).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        embed_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_ch, norm_groups, norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = group_norm(out_ch, norm_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _ResAttn(nn.Module):
    """A ResBlock optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2: (B, C, H, W) -> (B, C, H/2, W/2).

    ``padding=1`` pads one pixel on every side; ``padding=0`` pads one pixel on the right and
    bottom only, which is TensorFlow's "SAME" padding of a stride-2 conv on even sizes (the
    DDPM reference code [Ho 2020]).
    """

    def __init__(self, ch: int, padding: int = 1) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.padding == 0:
            h = F.pad(h, (0, 1, 0, 1))
        return self.conv(h)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(upsample_nearest2x(h))


class UNet(nn.Module):
    """DDPM / Improved DDPM U-Net, `model(x, t, cond=None)`; arguments as in `UNetConfig`.

    Shapes: x (B, in_channels, H, W) with H, W divisible by 2^(len(channel_mult) - 1); t (B,);
    cond None | (B,) int64 labels | {"class": (B,) int64, "image": (B, cond_channels, H, W),
    "aug_level": (B,) float} -> (B, out_channels, H, W). Without labels a class-conditional model
    uses the null label; "aug_level" is required exactly when `aug_level_embedding` is set.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        cfg = UNetConfig(**kwargs)
        validate_config(cfg)
        self.config = cfg
        self.out_channels = cfg.out_channels or cfg.in_channels
        ch, groups = cfg.base_channels, cfg.norm_groups
        embed_dim = 4 * ch
        self.time_embed = TimeEmbedding(
            cfg.time_features or ch,
            embed_dim,
            cfg.time_embedding,
            cfg.fourier_scale,
            freq_shift=cfg.time_freq_shift,
        )
        self.class_embed = ClassEmbedding(cfg.num_classes, embed_dim) if cfg.num_classes else None
        self.aug_embed = (  # no random draws when off: existing models initialise as before
            TimeEmbedding(cfg.time_features or ch, embed_dim, cfg.time_embedding, cfg.fourier_scale)
            if cfg.aug_level_embedding
            else None
        )

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(
                cin, cout, embed_dim, cfg.dropout, cfg.use_scale_shift_norm, groups, cfg.norm_eps
            )

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, cfg.num_heads, groups, cfg.norm_eps)

        def res_attn(cin: int, cout: int, level: int) -> _ResAttn:
            use_attn = cfg.image_size // cfg.patch_size // 2**level in cfg.attention_resolutions
            return _ResAttn(res_block(cin, cout), attention(cout) if use_attn else None)

        p2 = cfg.patch_size**2
        self.conv_in = nn.Conv2d((cfg.in_channels + cfg.cond_channels) * p2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, cur = [ch], ch
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(res_attn(cur, ch * mult, level))
                cur = ch * mult
                skip_chs.append(cur)
            if level != last:
                self.down.append(Downsample(cur, cfg.downsample_padding))
                skip_chs.append(cur)

        mid_attn = attention(cur) if cfg.mid_attention else None
        self.mid = nn.ModuleList(
            [_ResAttn(res_block(cur, cur), mid_attn), _ResAttn(res_block(cur, cur), None)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(res_attn(cur + skip_chs.pop(), ch * mult, level))
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))

        self.norm_out = group_norm(cur, groups, cfg.norm_eps)
        self.conv_out = zero_(nn.Conv2d(cur, self.out_channels * p2, 3, padding=1))

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | dict[str, Tensor] | None = None
    ) -> Tensor:
        cfg = self.config
        levels = len(cfg.channel_mult)
        factor = cfg.patch_size * 2 ** (levels - 1)
        why = f"{factor} (patch_size * 2^(levels-1) for {levels} levels)"
        check_image_batch(x, cfg.in_channels, factor, factor_name=why)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        labels, image = split_cond(cond)

        emb = add_class_embedding(self.time_embed(t), self.class_embed, labels)
        emb = add_aug_level_embedding(emb, self.aug_embed, aug_level_from_cond(cond))
        x = concat_cond_image(x, image, cfg.cond_channels)

        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, _ResAttn):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, cfg.patch_size) if cfg.patch_size > 1 else out


def validate_config(cfg: UNetConfig) -> None:
    """Raise ValueError with a one-line reason if ``cfg`` describes no valid network."""
    levels = len(cfg.channel_mult)
    if levels < 1 or cfg.num_res_blocks < 1 or cfg.base_channels < 1:
        raise ValueError("channel_mult must be non-empty; num_res_blocks, base_channels >= 1")
    if cfg.patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {cfg.patch_size}")
    factor = cfg.patch_size * 2 ** (levels - 1)
    if cfg.image_size % factor:
        raise ValueError(
            f"image_size {cfg.image_size} is not divisible by patch_size * 2^(levels-1) = {factor} "
            f"for channel_mult {cfg.channel_mult}; use fewer levels or pad the images"
        )
    sizes = [cfg.image_size // cfg.patch_size // 2**i for i in range(levels)]
    bad = [r for r in cfg.attention_resolutions if r not in sizes]
    if bad:
        raise ValueError(f"attention_resolutions {bad} match no level; level sizes are {sizes}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.num_classes < 0 or cfg.cond_channels < 0:
        raise ValueError("num_classes and cond_channels must be >= 0")
    if cfg.downsample_padding not in (0, 1):
        raise ValueError(f"downsample_padding must be 0 or 1, got {cfg.downsample_padding}")
    if cfg.time_freq_shift not in (0, 1):
        raise ValueError(f"time_freq_shift must be 0 or 1, got {cfg.time_freq_shift}")
    if not cfg.norm_eps > 0:
        raise ValueError(f"norm_eps must be positive, got {cfg.norm_eps}")


def build_unet(preset: str | UNetConfig, **overrides: Any) -> UNet:
    """Build a `UNet` from a preset name in `UNET_PRESETS` or a `UNetConfig`, with field overrides.

    Example: `build_unet("mnist-cpu", num_classes=10)`.
    """
    return UNet(**dataclasses.asdict(preset_config(preset, UNET_PRESETS, "U-Net", **overrides)))


class BasicUNet(nn.Module):
    """A plain convolutional encoder-decoder with additive skips and no noise-level input.

    Convs of width `channels` with max-pool downsampling, mirrored with nearest upsampling; the
    skip activations are added on the way up. It ignores `t`, so it must infer the noise level
    from the image alone: the baseline that shows why diffusion networks take t as input.

    Shapes: x (B, in_channels, H, W), H and W divisible by 2^(len(channels) - 1), t (B,) ignored,
    cond must be None -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: tuple[int, ...] = (32, 64, 64),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or kernel_size % 2 == 0:
            raise ValueError("BasicUNet needs >= 2 channel levels and an odd kernel_size")
        out_channels = out_channels or in_channels
        self.in_channels, self.levels = in_channels, len(channels)
        pad = kernel_size // 2
        ins = (in_channels, *channels[:-1])
        self.down = nn.ModuleList(
            nn.Conv2d(i, o, kernel_size, padding=pad) for i, o in zip(ins, channels)
        )
        outs = (*reversed(channels[:-1]), out_channels)
        self.up = nn.ModuleList(
            nn.Conv2d(i, o, kernel_size, padding=pad) for i, o in zip(reversed(channels), outs)
        )

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | dict[str, Tensor] | None = None
    ) -> Tensor:
        check_image_batch(x, self.in_channels, 2 ** (self.levels - 1))
        if cond is not None:
            raise ValueError("BasicUNet is unconditional; cond must be None")
        h, skips = x, []
        for i, conv in enumerate(self.down):
            h = F.silu(conv(h))
            if i < self.levels - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for i, conv in enumerate(self.up):
            if i > 0:
                h = upsample_nearest2x(h) + skips.pop()
            h = conv(h)
            if i < self.levels - 1:
                h = F.silu(h)
        return h
