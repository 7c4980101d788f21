"""What a network costs: parameters and forward FLOPs per image, for any `model(x, t, cond)`.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward pass of a batch
of one: 2 per multiply-add of every matrix product and convolution, attention included
(softmax(Q K^T / sqrt(d)) V counts its two products, 4 N^2 d per head). Normalisations,
activations and additions are not counted. Papers that quote "GFLOPs" of a network often count
multiply-adds, half these figures: DiT-S/2's 6.06 Gflops [Peebles & Xie 2023, Table 4] is
12.1 GFLOPs here (`tests/test_dit.py` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["NetworkCost", "network_cost"]


@dataclass(frozen=True)
class NetworkCost:
    """Parameters and forward FLOPs of one image (`flops / 1e9` = GFLOPs)."""

    parameters: int
    flops: int

    def describe(self) -> str:
        """One line such as "1.23M parameters, 0.456 GFLOPs per image (forward)"."""
        return (
            f"{self.parameters / 1e6:.2f}M parameters, "
            f"{self.flops / 1e9:.3f} GFLOPs per image (forward)"
        )


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
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    x = torch.zeros(1, *data_shape, device=device)
    t = torch.zeros(1, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(x, t, cond)
    finally:
        model.train(was_training)
    return NetworkCost(parameters=params, flops=int(counter.get_total_flops()))
