"""Noise-aware classifiers p(y | x_t) for classifier guidance [Dhariwal & Nichol 2021, Sec. 4].

Classifier guidance needs the gradient of log p(y | x_t) at every noise level, so the classifier
is trained on noised images x_t = alpha_t x0 + sigma_t eps [Ho 2020, Eq. 4] with the times of the
diffusion model, and receives t as an input. Following the paper (Sec. 4, "the downsampling
trunk of the UNet model"), :class:`NoisyClassifier` is the encoder half of the difflab U-Net:

    conv 3x3 -> per level: ResBlocks (+ attention) and a strided-conv downsample
    -> middle ResBlock (+ attention) -> GroupNorm, SiLU -> global average pool -> linear -> logits

with the noise level entering every residual block through the sinusoidal time embedding
(``t`` is the schedule time, as for the U-Net). The paper pools with attention at 8x8; the
average pool is the simpler variant. The loss is the cross-entropy of the true label at a
uniformly drawn time (:func:`classifier_loss`); :func:`train_noisy_classifier` runs it with the
library's :class:`~difflab.train.Trainer` (AdamW, warm-up, clipping, step-seeded randomness).
Weights are stored as safetensors with the architecture in the file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab._util import F64
from difflab.data.images import to_unit_range
from difflab.nn.layers import AttentionBlock, TimeEmbedding, group_norm, zero_
from difflab.nn.unet import UNET_PRESETS, Downsample, ResBlock, UNetConfig, validate_config
from difflab.objectives import sample_training_times
from difflab.process import q_sample
from difflab.schedules import Schedule

__all__ = [
    "NoisyClassifier",
    "build_classifier",
    "classifier_loss",
    "train_noisy_classifier",
    "noisy_accuracy",
    "save_classifier",
    "load_classifier",
]

# U-Net fields that do not describe the encoder (output, class/image conditioning, up path)
_UNUSED_FIELDS = ("out_channels", "num_classes", "cond_channels")


class NoisyClassifier(nn.Module):
    """The U-Net's downsampling trunk as a classifier of noisy images, ``clf(xt, t) -> logits``.

    Args:
        num_classes: number of classes K.
        **unet_kwargs: :class:`~difflab.nn.unet.UNetConfig` fields describing the trunk
            (``image_size``, ``in_channels``, ``base_channels``, ``channel_mult``,
            ``num_res_blocks``, ``attention_resolutions``, ``mid_attention``, ``num_heads``,
            ``dropout``, ``norm_groups``, ``use_scale_shift_norm``, time-embedding fields).

    Shapes: xt (B, in_channels, H, W) with H, W divisible by patch_size * 2^(levels - 1),
    t (B,) schedule times -> logits (B, K). The output layer starts at zero (uniform predictions).
    """

    def __init__(self, *, num_classes: int, **unet_kwargs: Any) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        cfg = UNetConfig(**unet_kwargs)
        validate_config(cfg)  # the trunk's rules are the U-Net's
        self.config = cfg
        self.num_classes = num_classes
        ch, groups = cfg.base_channels, cfg.norm_groups
        embed_dim = 4 * ch
        self.time_embed = TimeEmbedding(
            cfg.time_features or ch, embed_dim, cfg.time_embedding, cfg.fourier_scale
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, cfg.dropout, cfg.use_scale_shift_norm, groups)

        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()  # one per block; Identity where there is none
        cur, last = ch, len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            use_attn = cfg.image_size // cfg.patch_size // 2**level in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(res(cur, ch * mult))
                cur = ch * mult
                self.attn.append(
                    AttentionBlock(cur, cfg.num_heads, groups) if use_attn else nn.Identity()
                )
            if level != last:
                self.blocks.append(Downsample(cur))
                self.attn.append(nn.Identity())
        self.blocks.append(res(cur, cur))
        self.attn.append(
            AttentionBlock(cur, cfg.num_heads, groups) if cfg.mid_attention else nn.Identity()
        )
        self.norm_out = group_norm(cur, groups)
        self.head = zero_(nn.Linear(cur, num_classes))

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        cfg = self.config
        if xt.ndim != 4 or xt.shape[1] != cfg.in_channels:
            raise ValueError(
                f"xt must have shape (B, {cfg.in_channels}, H, W), got {tuple(xt.shape)}"
            )
        t = torch.as_tensor(t, device=xt.device).expand(xt.shape[0])
        emb = self.time_embed(t.to(xt.dtype))
        if cfg.patch_size > 1:
            xt = F.pixel_unshuffle(xt, cfg.patch_size)
        h = self.conv_in(xt)
        for block, attn in zip(self.blocks, self.attn):
            h = attn(block(h, emb))
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool
        return self.head(h)

    def architecture(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this network."""
        kwargs = dataclasses.asdict(self.config)
        for k in _UNUSED_FIELDS:
            kwargs.pop(k)
        return {"num_classes": self.num_classes, **kwargs}


def build_classifier(
    preset: str | UNetConfig, *, num_classes: int, **overrides: Any
) -> NoisyClassifier:
    """A :class:`NoisyClassifier` with the trunk of a U-Net preset (``UNET_PRESETS``).

    Example: ``build_classifier("mnist-cpu", num_classes=10, image_size=28, in_channels=1)``.
    """
    if isinstance(preset, str):
        if preset not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {preset!r}; valid: {', '.join(UNET_PRESETS)}")
        preset = UNET_PRESETS[preset]
    kwargs = dataclasses.asdict(preset)
    for k in _UNUSED_FIELDS:
        kwargs.pop(k)
    unknown = set(overrides) - set(kwargs)
    if unknown:
        raise ValueError(f"unknown classifier fields {sorted(unknown)}; valid: {sorted(kwargs)}")
    kwargs.update(overrides)
    return NoisyClassifier(num_classes=num_classes, **kwargs)


def classifier_loss(
    classifier: nn.Module,
    x0: Tensor,
    labels: Tensor,
    schedule: Schedule,
    *,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of a noise-aware classifier on x_t ~ q(x_t | x0) [Dhariwal & Nichol 2021].

    t is drawn uniformly (integer steps 1..T, or U[t_min, t_max]) unless given, then
    x_t = alpha_t x0 + sigma_t eps [Ho 2020, Eq. 4]; the draws use ``generator`` in the order
    t, eps. Shapes: x0 (B, C, H, W), labels (B,) int -> (mean loss (), correct (B,) bool).
    """
    batch = x0.shape[0]
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if t is None:
        t = sample_training_times(schedule, batch, method="uniform", generator=generator)
    t = torch.as_tensor(t, dtype=F64).cpu().expand(batch)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    xt = q_sample(x0, t, schedule, eps=eps)
    logits = classifier(xt, t.to(x0.device, x0.dtype))
    labels = labels.to(logits.device).long()
    loss = F.cross_entropy(logits.float(), labels)
    return loss, logits.detach().argmax(1) == labels


def _unit_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    return to_unit_range(images) if images.dtype == torch.uint8 else images.float()


def train_noisy_classifier(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``classifier`` in place with :func:`classifier_loss`; returns it in eval mode.

    images: (N, C, H, W) uint8 or float in [-1, 1]; labels (N,) int. Each step draws a batch
    uniformly with replacement and its times and noise from generators seeded by (seed, step)
    (see :class:`~difflab.train.Trainer`), so a seed reproduces the weights on CPU; the global
    RNG state is restored afterwards.
    """
    from difflab.train import Trainer

    x_all = _unit_images(images)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (x_all.shape[0],) or x_all.shape[0] == 0:
        raise ValueError(
            f"need N >= 1 images and labels of shape (N,), got {tuple(x_all.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not isinstance(steps, int) or steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    device = torch.device(device)

    def batch_fn(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
        return x_all[idx].to(device), labels[idx].to(device)

    def loss_fn(batch: tuple[Tensor, Tensor], g: torch.Generator):
        loss, correct = classifier_loss(classifier, batch[0], batch[1], schedule, generator=g)
        return loss, {"accuracy": correct.float().mean()}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier.to(device)
        trainer = Trainer(
            classifier, batch_fn=batch_fn, loss_fn=loss_fn, lr=lr, batch_size=batch_size,
            weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip,
            seed=seed, device=device,
        )  # fmt: skip
        for _ in range(steps):
            trainer.train_step()
    return classifier.eval()


@torch.no_grad()
def noisy_accuracy(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    schedule: Schedule,
    *,
    ts: list[float],
    seed: int = 0,
    batch_size: int = 500,
) -> dict[float, float]:
    """Accuracy of the classifier on x_t ~ q(x_t | x0) at each time in ``ts``.

    images (N, C, H, W) uint8 or float in [-1, 1], labels (N,). The noise comes from a
    generator seeded with ``seed``; returns {t: fraction classified correctly}.
    """
    x_all, labels = _unit_images(images), torch.as_tensor(labels).long()
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    out: dict[float, float] = {}
    g = torch.Generator().manual_seed(seed)
    for t in ts:
        correct = 0
        for x0, y in zip(x_all.split(batch_size), labels.split(batch_size)):
            t_b = torch.full((x0.shape[0],), float(t), dtype=F64)
            _, ok = classifier_loss(classifier, x0.to(device), y, schedule, generator=g, t=t_b)
            correct += int(ok.sum())
        out[float(t)] = correct / x_all.shape[0]
    classifier.train(was_training)
    return out


def save_classifier(classifier: NoisyClassifier, path: str | Path) -> Path:
    """Write the weights as safetensors, with the architecture as JSON in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(path), metadata={"architecture": json.dumps(classifier.architecture())})
    return path


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> NoisyClassifier:
    """Rebuild a classifier written by :func:`save_classifier` (eval mode, on ``device``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        arch = json.loads(meta["architecture"])
        net = NoisyClassifier(**arch)
        net.load_state_dict(load_file(str(path)))
    except Exception as err:  # header, metadata or shape problems
        raise ValueError(f"{path} is not a valid classifier file ({err})") from err
    return net.to(device).eval()
