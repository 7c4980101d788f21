"""The training loop: AdamW, LR warm-up, gradient clipping, EMA, bf16 autocast, exact resume.

Reproducibility is by construction: every source of randomness of step ``k`` (the batch, the
diffusion times and noise, dropout) is drawn from generators seeded with ``(seed, k)``, so a run
resumed from a checkpoint at step ``k`` takes exactly the same next steps as the uninterrupted
run (bit for bit on CPU). The checkpoint holds the model, its EMA, the optimizer state and any
extra state (e.g. the importance sampler of Improved DDPM).

EMA follows EDM [Karras 2022, App. C / training code]: its decay is given as a half-life in
*images seen*, so it does not change with the batch size: ``beta = 0.5 ** (batch / half_life)``.
With a ramp-up ratio r the half-life is ``min(half_life, r * images_seen)`` (EDM's
``ema_rampup_ratio``, 0.05 there), so that a short run is not averaged over its random start.
Beside it the trainer can keep power-function EMA profiles (:class:`difflab.posthoc_ema.PowerEMA`)
from which any EMA length is reconstructed after the run [Karras 2024, EDM2].

Two throughput levers are options that change only the order of floating-point sums: the
AdamW kernel (``adamw``: torch's per-parameter loop, its multi-tensor ``foreach`` or ``fused``
kernel) and channels-last (NHWC) weights while training, which the CPU's oneDNN convolutions
run faster; the EMA copies stay in the contiguous format.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab._util import check_choice
from difflab.inference import COMPILE_MODES, compile_network
from difflab.posthoc_ema import PowerEMA

__all__ = [
    "ADAMW_KERNELS",
    "EMA",
    "Trainer",
    "StepGenerators",
    "TrainingDiverged",
    "step_generators",
]

# torch.optim.AdamW's keyword arguments for each kernel ("auto": fused on CUDA, see Trainer)
ADAMW_KERNELS: dict[str, dict[str, bool]] = {
    "auto": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class EMA:
    """Exponential moving average of a model's parameters, decay set by a half-life in images."""

    def __init__(
        self, model: nn.Module, *, half_life_images: float, rampup_ratio: float | None = None
    ) -> None:
        if half_life_images < 0:
            raise ValueError("the EMA half-life must be >= 0 images")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"the EMA ramp-up ratio must be > 0 or None, got {rampup_ratio}")
        self.half_life_images = float(half_life_images)
        self.rampup_ratio = rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def half_life(self, images_seen: float | None = None) -> float:
        """The half-life in images after ``images_seen`` images (ramped up if a ratio is set)."""
        if self.rampup_ratio is None or images_seen is None:
            return self.half_life_images
        return min(self.half_life_images, self.rampup_ratio * images_seen)

    def decay(self, batch_size: int, images_seen: float | None = None) -> float:
        """beta = 0.5 ** (batch_size / half_life); 0 (a copy) when the half-life is 0.

        ``images_seen`` counts the images trained on, this batch included.
        """
        half_life = self.half_life(images_seen)
        if half_life == 0:
            return 0.0
        return 0.5 ** (batch_size / half_life)

    @torch.no_grad()
    def update(
        self, model: nn.Module, *, batch_size: int, images_seen: float | None = None
    ) -> None:
        beta = self.decay(batch_size, images_seen)
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


@dataclass
class StepGenerators:
    """Independent CPU generators for one training step."""

    data: torch.Generator
    diffusion: torch.Generator


def step_generators(seed: int, step: int, rank: int = 0) -> StepGenerators:
    """Generators for step ``step`` of a run with seed ``seed`` (deterministic in both).

    The data generator is shared by all ranks of a distributed run (they draw the same global
    batch); the diffusion generator differs per rank (independent noise per example).
    """
    base = (int(seed) * 1_000_003 + int(step) * 7919) % (2**62)
    return StepGenerators(
        data=torch.Generator().manual_seed(base + 1),
        diffusion=torch.Generator().manual_seed(base + 2 + 104_729 * int(rank)),
    )


# decay factor of the learning rate after warm-up, by the fraction p in [0, 1] of the run's
# budget (steps or minutes) spent: none (DDPM's constant rate), cosine to zero [Loshchilov &
# Hutter 2017, SGDR, eq. 5 with one period and eta_min = 0] or linear to zero
LR_DECAYS: dict[str, Callable[[float], float]] = {
    "none": lambda p: 1.0,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
}


def lr_at(
    step: int, *, lr: float, warmup_steps: int, decay: str = "none", progress: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` (DDPM's recipe), times the
    ``decay`` factor of :data:`LR_DECAYS` at ``progress``, the fraction of the run's budget
    spent before this step (clamped to [0, 1])."""
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    return lr * warm * LR_DECAYS[decay](min(max(float(progress), 0.0), 1.0))


class Trainer:
    """Optimise ``loss_fn`` over batches from ``batch_fn``.

    Args:
        model: the network being trained (the EMA copy tracks it).
        batch_fn: ``batch_fn(step, generator) -> batch`` (any object ``loss_fn`` accepts).
        loss_fn: ``loss_fn(batch, generator) -> (loss scalar tensor, logs dict of tensors)``.
        lr, weight_decay, warmup_steps, grad_clip: optimiser settings (AdamW).
        lr_decay: a key of :data:`LR_DECAYS`; its factor is taken at ``self.progress``, the
            fraction of the budget spent, which the training loop sets before each step.
        ema_half_life_images: EMA half-life in images.
        ema_rampup_ratio: if set, the half-life is at most this fraction of the images seen.
        batch_size: images (or points) per step, for the EMA decay and throughput.
        bf16: autocast the forward pass to bfloat16 (CUDA, or CPU where supported).
        seed: the run's seed.
        device: where the model lives.
        extra_state: objects with ``state_dict()/load_state_dict()`` saved with checkpoints.
        fused_adam: use the fused AdamW kernel when ``adamw`` is "auto" (on CUDA).
        adamw: the AdamW kernel, a key of :data:`ADAMW_KERNELS`.
        channels_last: train with the network's 4-D weights in channels-last (NHWC) format.
        posthoc_ema: relative standard deviations of power-function EMA profiles to keep
            (:class:`difflab.posthoc_ema.PowerEMA`, saved as tensor groups); empty: none.
        rank: this process's rank in a distributed run (0 otherwise).
        compile: ``torch.compile`` the model in place (:func:`difflab.inference.compile_network`)
            after its EMA copy is made, so the EMA and the state dicts stay plain modules.
        compile_mode: its mode, one of :data:`difflab.inference.COMPILE_MODES`
            ("reduce-overhead": CUDA graphs of the compiled calls on a GPU).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_fn: Callable[[int, torch.Generator], Any],
        loss_fn: Callable[[Any, torch.Generator], tuple[Tensor, dict[str, Tensor]]],
        lr: float,
        batch_size: int,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: str = "none",
        grad_clip: float | None = 1.0,
        ema_half_life_images: float = 0.0,
        ema_rampup_ratio: float | None = None,
        bf16: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        extra_state: dict[str, Any] | None = None,
        fused_adam: bool = False,
        rank: int = 0,
        compile: bool = False,
        compile_mode: str = "default",
        adamw: str = "auto",
        channels_last: bool = False,
        posthoc_ema: tuple[float, ...] = (),
    ) -> None:
        self.model = model
        self.batch_fn = batch_fn
        self.loss_fn = loss_fn
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.warmup_steps = int(warmup_steps)
        self.lr_decay = check_choice("lr_decay", lr_decay, tuple(LR_DECAYS))
        self.progress = 0.0  # fraction of the run's budget spent (set by the training loop)
        self.grad_clip = grad_clip
        self.bf16 = bool(bf16)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.extra_state = extra_state or {}
        self.rank = int(rank)
        check_choice("compile mode", compile_mode, COMPILE_MODES)  # even when compile is off
        check_choice("AdamW kernel", adamw, tuple(ADAMW_KERNELS))
        kwargs = {"fused": True} if adamw == "auto" and fused_adam else ADAMW_KERNELS[adamw]
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.lr, weight_decay=weight_decay, **kwargs
        )
        self.ema = EMA(model, half_life_images=ema_half_life_images, rampup_ratio=ema_rampup_ratio)
        self.posthoc = PowerEMA(model, posthoc_ema) if posthoc_ema else None
        if channels_last:  # after the EMA copies, which stay contiguous
            model.to(memory_format=torch.channels_last)
        if compile:
            compile_network(model, self.device, mode=compile_mode)
        self.step = 0

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, Tensor]:
        """Run step ``self.step`` and advance; returns detached logs (tensors, no host sync)."""
        gens = step_generators(self.seed, self.step, self.rank)
        torch.manual_seed(gens.diffusion.initial_seed() + 3)  # dropout and other global draws
        batch = self.batch_fn(self.step, gens.data)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, lr=self.lr, warmup_steps=self.warmup_steps,
                                decay=self.lr_decay, progress=self.progress)  # fmt: skip
        self.model.train()
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, logs = self.loss_fn(batch, gens.diffusion)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None and self.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        else:
            grad_norm = torch.zeros((), device=loss.device)
        self.optimizer.step()
        seen = (self.step + 1) * self.batch_size
        self.ema.update(self.model, batch_size=self.batch_size, images_seen=seen)
        if self.posthoc is not None:
            self.posthoc.update(self.model, step=self.step + 1)
        self.step += 1
        out = {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
        out.update({k: v.detach() for k, v in logs.items()})
        return out

    # ---- state ------------------------------------------------------------------------------

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        """Named tensor groups for safetensors: the model, its EMA (and post-hoc profiles)."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.model.state_dict().items()},
            **(self.posthoc.tensors() if self.posthoc is not None else {}),
        }

    def state(self) -> dict[str, Any]:
        """Everything else needed to resume exactly (loadable with weights_only=True)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
        }

    def load(self, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> None:
        """Restore from :meth:`tensors` and :meth:`state`."""
        self.model.load_state_dict(tensors["model"])
        self.ema.model.load_state_dict(tensors["ema"])
        if self.posthoc is not None:
            self.posthoc.load(tensors)
        self.optimizer.load_state_dict(state["optimizer"])
        for k, v in self.extra_state.items():
            v.load_state_dict(state["extra"][k])
        self.step = int(state["step"])
