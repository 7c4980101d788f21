"""Helpers shared by the network tests (imported as ``from helpers import ...``)."""

from __future__ import annotations

import torch
from torch import nn


def randomise(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Overwrite all parameters with random values (undoes zero-initialisation, so a block is
    not the identity and a network's output depends on every weight)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
