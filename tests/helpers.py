"""Helpers shared by the tests (imported as ``from helpers import ...``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


def randomise(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Overwrite all parameters with random values (undoes zero-initialisation, so a block is
    not the identity and a network's output depends on every weight)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def torch_fidelity_module(name: str):
    """A torch-fidelity submodule imported without the package's __init__ (which needs
    torchvision); skips when torch-fidelity is absent. The package is stood in for once, by a
    bare module on its folder, and reused by every later call (its ``__spec__`` is None, so
    ``find_spec`` must not be asked again)."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("torch-fidelity is not installed")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations or [])
        sys.modules["torch_fidelity"] = pkg
    return importlib.import_module(f"torch_fidelity.{name}")


def write_bar_images(folder, n: int, size: int = 16) -> None:
    """A small grey-scale image folder: ``n`` PNGs of a vertical bar at random positions."""
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((size, size), np.uint8)
        c = g.integers(2, size - 2)
        a[:, c - 1 : c + 2] = 255
        Image.fromarray(a).save(folder / f"{i}.png")
