"""Small internal helpers shared by the library modules (not public API).

* :data:`F64`: float64, the dtype of every schedule coefficient (computed in float64, cast at
  use; docs/DESIGN.md, "Conventions").
* :func:`check_choice`: validate a ``Literal`` string choice once, with an error that lists the
  valid options.
* :func:`broadcast_to`: reshape a per-sample coefficient (B,) to broadcast against (B, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["F64", "check_choice", "broadcast_to"]

F64 = torch.float64


def check_choice(name: str, value: str, options: tuple[str, ...]) -> str:
    """Validate a string choice once, with an error that lists the valid options."""
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")
    return value


def broadcast_to(coef: Tensor | float, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) or a scalar to broadcast against x (B, ...),
    on x's device and in x's dtype."""
    c = torch.as_tensor(coef, device=x.device).to(x.dtype)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (x.ndim - 1)))
