"""Time-conditioned residual MLP denoiser for 2-D (or any low-dimensional) toy data.

The network follows the DDPM recipe at vector scale [Ho 2020, Appendix B]: a sinusoidal (or
Gaussian Fourier [Song 2021]) noise-level embedding passed through an MLP head, added inside
every residual block, with optional class conditioning through an embedding table that has a null
label for classifier-free guidance [Ho & Salimans 2022]. With `out_dim = 2 * dim` it can also
output a mean and a log-variance per coordinate, like the reverse kernel of
[Sohl-Dickstein 2015, Sec. 2.2].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.nn.layers import (
    ClassEmbedding,
    TimeEmbedding,
    TimeEmbeddingKind,
    add_class_embedding,
    aug_level_from_cond,
    split_cond,
    zero_,
)


class _ResidualMLPBlock(nn.Module):
    """h + W2 SiLU(W1 SiLU(LN(h)) + P SiLU(emb)); W2 starts at zero, so a fresh block is identity.

    Shapes: h (B, hidden), emb (B, embed_dim) -> (B, hidden).
    """

    def __init__(self, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(embed_dim, hidden)
        self.fc2 = zero_(nn.Linear(hidden, hidden))
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        a = self.fc1(self.act(self.norm(h))) + self.emb_proj(self.act(emb))
        return h + self.fc2(self.act(a))


class TimeMLP(nn.Module):
    """Residual MLP `model(x, t, cond=None)` for toy data.

    Args:
        dim: data dimension (2 for 2-D toys).
        hidden: width of the residual stream.
        depth: number of residual blocks.
        out_dim: output width; defaults to `dim` (use 2 * dim for a learned variance).
        num_classes: number of classes for class conditioning; 0 disables it. Label
            `num_classes` is the null label, also used when `cond` is None.
        time_embed_dim: width of the sinusoidal / Fourier features of t.
        time_embedding: "sinusoidal" (for timesteps in [0, T]) or "fourier".
        fourier_scale: frequency scale of the Fourier features.
        generator: random source for the Fourier frequencies.

    Shapes: x (B, dim), t (B,), cond None | (B,) int64 | {"class": (B,)} -> (B, out_dim).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        out_dim: int | None = None,
        num_classes: int = 0,
        time_embed_dim: int = 64,
        time_embedding: TimeEmbeddingKind = "sinusoidal",
        fourier_scale: float = 16.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(
                f"dim, hidden and depth must be >= 1, got dim={dim}, hidden={hidden}, depth={depth}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.dim = dim
        self.out_dim = dim if out_dim is None else out_dim
        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(
            time_embed_dim, hidden, time_embedding, fourier_scale, generator
        )
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, self.out_dim))

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | dict[str, Tensor] | None = None
    ) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        labels, image = split_cond(cond)
        if image is not None:
            raise ValueError("TimeMLP does not take image conditioning (cond['image'])")
        if aug_level_from_cond(cond) is not None:
            raise ValueError("TimeMLP does not take an augmentation level (cond['aug_level'])")
        emb = add_class_embedding(self.time_embed(t), self.class_embed, labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
