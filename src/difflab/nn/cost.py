"""What a network costs: parameters and forward FLOPs per image, for any `model(x, t, cond)`,
and for any network of the table from what its task asks of it (`spec_cost`, a `NetSpec`).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a batch
of one: 2 per multiply-add of every matrix product and convolution, attention included
(softmax(Q K^T / sqrt(d)) V counts its two products, 4 N^2 d per head). Normalisations,
activations and additions are not counted. Papers that quote "GFLOPs" of a network often count
multiply-adds, half these figures: DiT-S/2's 6.06 Gflops [Peebles & Xie 2023, Table 4] is
12.1 GFLOPs here (`tests/test_dit.py` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

if TYPE_CHECKING:
    from difflab.nn.networks import NetSpec

__all__ = ["NetworkCost", "example_inputs", "network_cost", "spec_cost"]


@dataclass(frozen=True)
class NetworkCost:
    """Parameters and forward FLOPs of one image (`flops / 1e9` = GFLOPs)."""

    parameters: int
    flops: int | None  # None: a network without one forward pass (Sohl-Dickstein 2015)

    def describe(self) -> str:
        """One line such as "1.23M parameters, 0.456 GFLOPs per image (forward)"."""
        params = f"{self.parameters / 1e6:.3g}M parameters"
        if self.flops is None:
            return params
        return f"{params}, {self.gflops()} GFLOPs per image (forward)"

    def gflops(self) -> str:
        """The forward GFLOPs per image, 3 significant digits ("-" when not counted)."""
        return "-" if self.flops is None else f"{self.flops / 1e9:.3g}"


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kw: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the GPU attention kernels; the CPU one is added here.
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def network_cost(
    model: nn.Module, data_shape: tuple[int, ...], cond: Tensor | dict[str, Tensor] | None = None
) -> NetworkCost:
    """Parameters of ``model`` and the FLOPs of one forward pass on one input of ``data_shape``
    (C, H, W) at t = 0 with ``cond`` (for a batch of one; None = unconditional / null label).
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, *data_shape, device=device)
    return _count(model, (x, torch.zeros(1, device=device), cond))


def _count(model: nn.Module, args: tuple[Any, ...]) -> NetworkCost:
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(*args)
    finally:
        model.train(was_training)
    return NetworkCost(parameters=params, flops=int(counter.get_total_flops()))


def example_inputs(spec: NetSpec, device: torch.device | str = "cpu") -> tuple[Any, ...] | None:
    """The arguments of one forward pass, for one example, of a network built for ``spec``
    (:class:`difflab.nn.networks.NetSpec`): ``(x, t, cond)`` of a denoiser (x zeros of
    ``spec.data_shape`` with a leading 1, t = 0, cond with class 0, a zero conditioning image
    and augmentation level 0 where the spec has them, else None), ``(x, t)`` of a classifier,
    ``(x,)`` of an autoencoder; None for a network with its own loss (no single forward)."""
    x = torch.zeros(1, *spec.data_shape, device=device)
    t = torch.zeros(1, device=device)
    if spec.head == "classifier":
        return (x, t)
    if spec.head == "autoencoder":
        return (x,)
    if spec.head != "denoiser":
        return None
    cond: dict[str, Tensor] = {}
    if spec.num_classes:
        cond["class"] = torch.zeros(1, dtype=torch.long, device=device)
    if spec.cond_channels:
        cond["image"] = torch.zeros(1, spec.cond_channels, *spec.data_shape[1:], device=device)
    if spec.aug_level_embedding:
        cond["aug_level"] = torch.zeros(1, device=device)
    return (x, t, cond or None)


def spec_cost(model: nn.Module, spec: NetSpec) -> NetworkCost:
    """Parameters of ``model`` and the FLOPs of its forward pass on one example of what
    ``spec`` asks (:func:`example_inputs`); works on the meta device (no arithmetic done)."""
    args = example_inputs(spec, next(model.parameters()).device)
    if args is None:
        return NetworkCost(parameters=sum(p.numel() for p in model.parameters()), flops=None)
    return _count(model, args)
