"""Fast network evaluation for sampling, likelihoods and training: the levers that
``benchmarks/sampling_speed.py`` measures, and which of them difflab uses by default.

==================  ===========================================================  ==============
lever               what it changes                                              default
==================  ===========================================================  ==============
inference mode      ``torch.inference_mode`` instead of ``torch.no_grad``: no     on, unless a
                    version counters or view tracking on the tensors it makes     gradient is
                                                                                  needed
compile             ``torch.compile`` of the network (TorchInductor): fused       off (opt-in:
                    kernels, paid for by a compilation on the first call          ``--compile``)
channels-last       NHWC activations and weights for the convolutions             off
bf16 autocast       the network in bfloat16 where autocast allows it              off
==================  ===========================================================  ==============

The defaults are what measured fastest on a CPU (BENCHMARKS.md, "Sampling speed"): levers that
did not help there stay off, and can be asked for where they do (a GPU with bf16 units).

A gradient is needed by classifier guidance (the gradient of log p(y | x_t) [Dhariwal & Nichol
2021, Eq. 14]) and by the probability-flow ODE likelihood (Hutchinson's trace estimator
[Song 2021, Sec. 4.3]); a tensor made under ``inference_mode`` can never enter autograd, so
those keep ``no_grad`` (which ``torch.enable_grad`` inside them can lift).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["compile_network", "compile_unavailable", "inference_context", "is_compiled"]


@contextlib.contextmanager
def inference_context(
    device: torch.device | str, *, needs_grad: bool = False, bf16: bool = False
) -> Iterator[None]:
    """Evaluate networks without autograd: ``inference_mode``, or ``no_grad`` when the code
    inside takes gradients of its own (``needs_grad``); with ``bf16``, under bfloat16
    autocast on ``device``'s type."""
    grad_off = torch.no_grad() if needs_grad else torch.inference_mode()
    device_type = torch.device(device).type
    with grad_off, torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        yield


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can. On a CPU
    TorchInductor writes C++ and needs a compiler (``$CXX``, ``g++``, ``c++`` or
    ``clang++``)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if torch.device(device).type == "cpu":
        names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(name and shutil.which(name) for name in names):
            return "torch.compile on a CPU needs a C++ compiler (install g++ or set CXX)"
    return None


def is_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_network` (``nn.Module.compile``) was applied to ``model``."""
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_network(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``torch.compile`` the network in place and return it.

    In place (``nn.Module.compile``), so the parameter names, the state dict and every
    reference to the module (an optimizer, a denoiser wrapper) stay the same; compiling an
    already compiled module does nothing. The first call of each input shape, training mode
    and grad mode compiles (seconds to minutes); later calls run the compiled kernels. A
    ``ValueError`` says why when compilation is unavailable (:func:`compile_unavailable`).
    """
    why = compile_unavailable(device)
    if why is not None:
        raise ValueError(f"cannot compile the network: {why}")
    if not is_compiled(model):
        model.compile()
    return model
