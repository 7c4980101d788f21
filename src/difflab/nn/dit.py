"""Diffusion transformers: DiT with adaLN-Zero [Peebles & Xie 2023] and U-ViT's long skips
[Bao et al. 2023].

Layout [Peebles & Xie 2023, Sec. 3.2, Fig. 3]: the image (with any conditioning image
concatenated along the channels) is cut into p x p patches, each patch a token of C p^2 values
(`patchify`), linearly embedded to width D, plus fixed 2-D sine-cosine position embeddings
(`pos_embed_2d`); `depth` transformer blocks; a final adaptive LayerNorm and a linear map back
to p^2 output values per channel (`unpatchify`). With N = (image_size / p)^2 tokens a block costs
about 24 N D^2 + 4 N^2 D FLOPs.

Conditioning [Sec. 3.2, "adaLN-Zero block"]: the noise level t goes through a sinusoidal
embedding and an MLP (`TimeEmbedding`), the class label through a table with a null row for
classifier-free guidance [Ho & Salimans 2022], a cascade's augmentation level
(`cond["aug_level"]` [Ho 2021 (Cascaded Diffusion Models), Sec. 3.2]) through a second
time-like embedding; their sum c (B, D) sets, per block, six vectors
(shift, scale, gate) for the attention and for the MLP:

    x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

The linear map c -> (shift, scale, gate) starts at zero, so every gate is 0 and every block is
the identity at initialisation; the output layer starts at zero too, so a fresh network outputs
0 ("adaLN-Zero"; the paper's best variant, Fig. 5).

U-ViT long skips (`long_skips=True`) [Bao et al. 2023, Sec. 3, Fig. 1]: the first depth // 2
blocks ("in-blocks") keep their outputs; each of the last depth // 2 blocks ("out-blocks") first
maps concat(h, skip) (B, N, 2D) -> (B, N, D) with a linear layer, pairing the i-th out-block with
the mirror in-block (the last in-block with the first out-block). An odd depth leaves one middle
block. Unlike U-ViT, the noise level enters through adaLN-Zero, not as a token, and there is no
3x3 conv after `unpatchify`.

Learned variance: `out_channels = 2 * in_channels`; the second half of the channels is the
Improved-DDPM interpolation value [Nichol & Dhariwal 2021, Eq. 15], as for the U-Net.

The network keeps the U-Net's contract `model(x, t, cond=None)`, so every task, process and
sampler that drives a U-Net drives it unchanged. Weights map to and from diffusers'
`DiTTransformer2DModel` (`difflab.interop.diffusers_dit`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nn.layers import (
    ClassEmbedding,
    TimeEmbedding,
    add_aug_level_embedding,
    add_class_embedding,
    aug_level_from_cond,
    check_image_batch,
    concat_cond_image,
    preset_config,
    split_cond,
    zero_,
)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a `DiT`; `dataclasses.asdict(config)` gives its keyword arguments."""

    image_size: int = 32  # square training resolution; the position embeddings are fixed for it
    in_channels: int = 4  # channels of x (not counting cond_channels)
    out_channels: int | None = None  # None = in_channels; 2 * in_channels for learned variance
    patch_size: int = 2  # p: each p x p patch is one token (image_size divisible by p)
    hidden_size: int = 384  # token width D (DiT-S: 384); divisible by 4 and by num_heads
    depth: int = 12  # transformer blocks (DiT-S: 12)
    num_heads: int = 6  # attention heads (DiT-S: 6, head width 64)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * hidden_size
    dropout: float = 0.0  # dropout on the attention output and in the MLP (DiT: none)
    num_classes: int = 0  # class conditioning if > 0; label num_classes is the null label
    cond_channels: int = 0  # channels of cond["image"], concatenated to x before patchify
    aug_level_embedding: bool = False  # cascades: embed cond["aug_level"] (B,) like t, add to c
    long_skips: bool = False  # U-ViT long skip connections between mirror blocks
    time_features: int = 256  # width of the sin/cos features of t (DiT: 256)
    time_freq_shift: int = 1  # sinusoid frequencies 10000^(-i/(h - shift)); 1 as diffusers' DiT
    norm_eps: float = 1e-6  # epsilon of the LayerNorms before attention and before the output
    mlp_norm_eps: float = 1e-6  # epsilon of the LayerNorm before the MLP (diffusers: norm_eps)


DIT_PRESETS: dict[str, DiTConfig] = {
    # A few ten thousand parameters, for tests: 8x8 grayscale, 16 tokens.
    "tiny": DiTConfig(
        image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2,
        time_features=32,
    ),
    # 28x28 MNIST, 2x2 patches: 196 tokens of width 96, 4 blocks. 0.72M parameters, 0.233
    # forward GFLOPs per image: the U-Net mnist-cpu's parameters (0.71M) at 2.5x its FLOPs
    # (0.095), so the two backbones compare at equal size.
    "mnist-dit": DiTConfig(
        image_size=28, in_channels=1, patch_size=2, hidden_size=96, depth=4, num_heads=4,
    ),
    # the 7x7x4 latents of the f = 4 MNIST autoencoder, one token per latent pixel: 49 tokens
    # of width 64, 5 blocks. 0.40M parameters, 0.028 GFLOPs per image (the U-Net mnist-latent:
    # 0.41M, 0.027).
    "mnist-latent-dit": DiTConfig(
        image_size=7, in_channels=4, patch_size=1, hidden_size=64, depth=5, num_heads=4,
    ),
    # DiT-S/2 [Peebles & Xie 2023, Table 4] on 32x32 RGB: 256 tokens of width 384, 12 blocks;
    # 32.5M parameters, 12.1 GFLOPs per image.
    "dit-s2-32": DiTConfig(image_size=32, in_channels=3, patch_size=2),
}  # fmt: skip
# The MNIST presets keep DiT's 256 time features, so they export to diffusers unchanged.
# mnist-dit with U-ViT's long skips (2 in-blocks, 2 out-blocks): 0.76M parameters.
DIT_PRESETS["mnist-uvit"] = dataclasses.replace(DIT_PRESETS["mnist-dit"], long_skips=True)
# mnist-dit with 4x4 patches (DiT's "/4" models): 49 tokens, the same 0.73M parameters at a
# fifth of the FLOPs (0.048 GFLOPs, half the U-Net's), so it takes about five times the steps
# in a time budget; and with U-ViT's long skips.
DIT_PRESETS["mnist-dit-p4"] = dataclasses.replace(DIT_PRESETS["mnist-dit"], patch_size=4)
DIT_PRESETS["mnist-uvit-p4"] = dataclasses.replace(DIT_PRESETS["mnist-dit-p4"], long_skips=True)


def patchify(x: Tensor, p: int) -> Tensor:
    """Cut images into p x p patches, one token per patch [Dosovitskiy 2021, Sec. 3.1].

    Tokens run over the grid of patches row by row (token i * W/p + j is the patch in grid row
    i, column j); a token's values are ordered (channel, row in patch, column in patch).

    Shapes: x (B, C, H, W), H and W divisible by p -> (B, H W / p^2, C p^2).
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, p: int, height: int, width: int) -> Tensor:
    """The inverse of `patchify`: (B, H W / p^2, C p^2) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    c = d // (p * p)
    h, w = height // p, width // p
    x = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings [Peebles & Xie 2023, Sec. 3.2; He 2022 (MAE)].

    Token (i, j) (grid row i, column j, index i * grid_w + j) gets
    [sin(j w_k), cos(j w_k), sin(i w_k), cos(i w_k)] for k = 0 .. dim/4 - 1, each group
    of dim/4 values, with w_k = 10000^(-k / (dim/4)): the 1-D Transformer encoding
    [Vaswani 2017, Sec. 3.5] of the column in the first half, of the row in the second.
    Computed in float64.

    Returns:
        (grid_h * grid_w, dim) float32.
    """
    if dim % 4:
        raise ValueError(f"the 2-D position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # w_k
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    col_angles = cols.reshape(-1, 1) * omega  # (N, dim/4): j w_k
    row_angles = rows.reshape(-1, 1) * omega
    emb = [col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()]
    return torch.cat(emb, dim=1).float()


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens [Vaswani 2017, Eq. (1)].

    out = proj(concat_heads(softmax(Q K^T / sqrt(d)) V)), (Q, K, V) = qkv(x) split into heads of
    width d = D / num_heads, computed by `F.scaled_dot_product_attention` (flash or
    memory-efficient kernels on a GPU).

    Shapes: x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: all of Q, then K, then V; heads consecutive
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, dim)))


class MLP(nn.Module):
    """Linear -> GELU (tanh approximation) -> Dropout -> Linear, as in ViT and DiT.

    Shapes: x (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive LayerNorm's affine step x * (1 + scale) + shift [Peebles & Xie 2023, Sec. 3.2].

    Shapes: x (B, N, D), shift and scale (B, D) -> (B, N, D).
    """
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning [Peebles & Xie 2023, Sec. 3.2, Fig. 3].

    (shift, scale, gate) x 2 = modulation(SiLU(c)); x += gate_msa * Attn(modulate(LN(x)));
    x += gate_mlp * MLP(modulate(LN(x))). `modulation` starts at zero, so a fresh block is the
    identity. With `skip_in`, a U-ViT out-block: x = skip_proj(concat(x, skip)) first
    [Bao et al. 2023, Sec. 3].

    Shapes: x (B, N, D), c (B, D), skip None or (B, N, D) -> (B, N, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        mlp_norm_eps: float = 1e-6,
        skip_in: bool = False,
    ) -> None:
        super().__init__()
        self.skip_proj = nn.Linear(2 * dim, dim) if skip_in else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout)
        self.modulation = zero_(nn.Linear(dim, 6 * dim))  # adaLN-Zero

    def forward(self, x: Tensor, c: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_proj is not None:
            if skip is None:
                raise ValueError("a U-ViT out-block needs the skip activation of its in-block")
            x = self.skip_proj(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(
            F.silu(c)
        ).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """out = linear(modulate(LN(x), shift, scale)), (shift, scale) = modulation(SiLU(c)); both
    linear maps start at zero [Peebles & Xie 2023, Sec. 3.2].

    Shapes: x (B, N, D), c (B, D) -> (B, N, out_dim).
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.modulation = zero_(nn.Linear(dim, 2 * dim))
        self.linear = zero_(nn.Linear(dim, out_dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT / U-ViT denoiser, `model(x, t, cond=None)`; arguments as in `DiTConfig`.

    Shapes: x (B, in_channels, image_size, image_size); t (B,); cond None | (B,) int64 labels |
    {"class": (B,) int64, "image": (B, cond_channels, H, W), "aug_level": (B,) float}
    -> (B, out_channels, H, W). Without labels a class-conditional model uses the null label;
    "aug_level" is required exactly when `aug_level_embedding` is set.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        cfg = DiTConfig(**kwargs)
        validate_dit_config(cfg)
        self.config = cfg
        self.out_channels = cfg.out_channels or cfg.in_channels
        dim, p = cfg.hidden_size, cfg.patch_size
        grid = cfg.image_size // p
        self.patch_embed = nn.Linear((cfg.in_channels + cfg.cond_channels) * p * p, dim)
        self.register_buffer("pos_embed", pos_embed_2d(dim, grid, grid), persistent=False)
        self.time_embed = TimeEmbedding(cfg.time_features, dim, freq_shift=cfg.time_freq_shift)
        self.class_embed = ClassEmbedding(cfg.num_classes, dim) if cfg.num_classes else None
        self.aug_embed = (
            TimeEmbedding(cfg.time_features, dim, freq_shift=cfg.time_freq_shift)
            if cfg.aug_level_embedding
            else None
        )
        self.num_skips = cfg.depth // 2 if cfg.long_skips else 0
        self.blocks = nn.ModuleList(
            DiTBlock(
                dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.norm_eps, cfg.mlp_norm_eps,
                skip_in=i >= cfg.depth - self.num_skips,
            )
            for i in range(cfg.depth)
        )  # fmt: skip
        self.final = FinalLayer(dim, self.out_channels * p * p, cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation [Peebles & Xie 2023, Sec. 3.2; its reference code]: Xavier-uniform
        linear layers with zero biases, N(0, 0.02^2) time MLP and label table, then the
        adaLN-Zero maps and the output layer at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embed in (self.time_embed, self.aug_embed):
            if embed is not None:
                nn.init.normal_(embed.mlp[0].weight, std=0.02)
                nn.init.normal_(embed.mlp[2].weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        for block in self.blocks:
            zero_(block.modulation)
        zero_(self.final.modulation)
        zero_(self.final.linear)

    def conditioning(self, t: Tensor, cond: Tensor | dict[str, Tensor] | None) -> Tensor:
        """c = embed(t) + embed(label) (+ embed(aug_level)): (B, hidden_size)."""
        labels, _ = split_cond(cond)
        c = add_class_embedding(self.time_embed(t), self.class_embed, labels)
        return add_aug_level_embedding(c, self.aug_embed, aug_level_from_cond(cond))

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | dict[str, Tensor] | None = None
    ) -> Tensor:
        cfg = self.config
        check_image_batch(x, cfg.in_channels, cfg.patch_size)
        size = cfg.image_size
        if tuple(x.shape[2:]) != (size, size):
            raise ValueError(
                f"x must be {size}x{size} (the DiT's position embeddings are fixed for "
                f"image_size), got {tuple(x.shape[2:])}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        c = self.conditioning(t, cond)
        _, image = split_cond(cond)
        x = concat_cond_image(x, image, cfg.cond_channels)

        h = self.patch_embed(patchify(x, cfg.patch_size)) + self.pos_embed
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            is_out_block = i >= cfg.depth - self.num_skips
            h = block(h, c, skips.pop() if is_out_block else None)
            if i < self.num_skips:
                skips.append(h)
        out = self.final(h, c)
        return unpatchify(out, cfg.patch_size, size, size)


def validate_dit_config(cfg: DiTConfig) -> None:
    """Raise ValueError with a one-line reason if ``cfg`` describes no valid network."""
    if cfg.patch_size < 1 or cfg.image_size < 1 or cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"image_size {cfg.image_size} must be a positive multiple of patch_size "
            f"{cfg.patch_size}; change the patch size or pad the images"
        )
    if cfg.hidden_size < 4 or cfg.hidden_size % 4:
        raise ValueError(f"hidden_size must be a positive multiple of 4, got {cfg.hidden_size}")
    if cfg.num_heads < 1 or cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"hidden_size ({cfg.hidden_size}) must be divisible by num_heads ({cfg.num_heads})"
        )
    if cfg.depth < (2 if cfg.long_skips else 1) or cfg.mlp_ratio < 1:
        raise ValueError(
            f"depth must be >= 1 (>= 2 with long_skips) and mlp_ratio >= 1, got depth "
            f"{cfg.depth}, mlp_ratio {cfg.mlp_ratio}"
        )
    if cfg.in_channels < 1 or (cfg.out_channels is not None and cfg.out_channels < 1):
        raise ValueError("in_channels and out_channels must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.num_classes < 0 or cfg.cond_channels < 0:
        raise ValueError("num_classes and cond_channels must be >= 0")
    if cfg.time_features < 2:
        raise ValueError(f"time_features must be >= 2, got {cfg.time_features}")
    if cfg.time_freq_shift not in (0, 1):
        raise ValueError(f"time_freq_shift must be 0 or 1, got {cfg.time_freq_shift}")
    if not (cfg.norm_eps > 0 and cfg.mlp_norm_eps > 0):
        raise ValueError("norm_eps and mlp_norm_eps must be positive")


def build_dit(preset: str | DiTConfig, **overrides: Any) -> DiT:
    """Build a `DiT` from a preset name in `DIT_PRESETS` or a `DiTConfig`, with field overrides.

    Example: `build_dit("mnist-dit", num_classes=10, out_channels=2)`.
    """
    return DiT(**dataclasses.asdict(preset_config(preset, DIT_PRESETS, "DiT", **overrides)))
