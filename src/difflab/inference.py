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
channels-last       NHWC activations and weights for the convolutions             on for
                    (:func:`channels_last`)                                       sampling on a
                                                                                  CPU, off on
                                                                                  CUDA
bf16 autocast       the network in bfloat16 where autocast allows it              off
CUDA graph          one captured graph per input shape, replayed each step        off (opt-in:
                    (:class:`GraphedNetwork`): no per-kernel launch cost          ``--cuda-graph``)
==================  ===========================================================  ==============

The defaults are what measured fastest (BENCHMARKS.md, "Sampling speed"): levers that did not
help stay off, and can be asked for where they do (a GPU with bf16 units). Channels-last made
every MNIST network of the presets 1.1x to 1.35x faster on a CPU and was slower on an H200; it
moves samples by ~3e-5 (another order of the convolutions' sums).

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab._util import check_choice

__all__ = [
    "COMPILE_MODES",
    "GraphedNetwork",
    "channels_last",
    "compile_network",
    "compile_unavailable",
    "inference_context",
    "is_compiled",
]


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


@contextlib.contextmanager
def channels_last(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Run the block with ``model``'s 4-D weights in channels-last (NHWC) memory format when
    ``device`` is a CPU and the model has any (convolutions), then put them back in the
    contiguous format, so that checkpoints, optimizers and later training see what they saw
    before. The convolutions then compute in NHWC, which oneDNN runs faster on a CPU."""
    convs = torch.device(device).type == "cpu" and any(p.dim() == 4 for p in model.parameters())
    if not convs:
        yield
        return
    with torch.inference_mode(False):  # weights that training may update in place later
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        with torch.inference_mode(False):
            model.to(memory_format=torch.contiguous_format)


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


# torch.compile's modes: "reduce-overhead" also records the compiled network's calls in CUDA
# graphs on a GPU (one launch per call instead of one per kernel, what a small network needs
# to keep a GPU busy); "max-autotune" searches kernel configurations at compile time.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_network(
    model: nn.Module, device: torch.device | str, mode: str = "default"
) -> nn.Module:
    """``torch.compile`` the network in place (with ``mode``, one of :data:`COMPILE_MODES`)
    and return it.

    In place (``nn.Module.compile``), so the parameter names, the state dict and every
    reference to the module (an optimizer, a denoiser wrapper) stay the same; compiling an
    already compiled module does nothing. The first call of each input shape, training mode
    and grad mode compiles (seconds to minutes); later calls run the compiled kernels. A
    ``ValueError`` says why when compilation is unavailable (:func:`compile_unavailable`).
    """
    check_choice("compile mode", mode, COMPILE_MODES)
    why = compile_unavailable(device)
    if why is not None:
        raise ValueError(f"cannot compile the network: {why}")
    if not is_compiled(model):
        model.compile(mode=mode)
    return model


# --- CUDA graphs --------------------------------------------------------------------------
# A sampling loop calls the same network on inputs of one shape tens of times; on a GPU a small
# network's time is then mostly kernel launches. A CUDA graph records every kernel of one call
# once and replays them with a single launch. The inputs of the recorded call live in fixed
# ("static") buffers: each call copies its inputs into them, replays, and clones the output
# (the next replay overwrites it, and multistep samplers keep old outputs).

_Signature = tuple[Any, ...]


def flatten_call(x: Tensor, t: Tensor, cond: Any) -> tuple[list[Tensor], _Signature] | None:
    """The tensors of a network call ``model(x, t, cond)`` in a fixed order, and its signature
    (structure, shapes, dtypes, devices); None when ``cond`` is not None, a tensor or a dict of
    tensors (such a call is not graphed)."""
    if cond is None or isinstance(cond, Tensor):
        keys: tuple[str, ...] | None = None if cond is None else ()
        tensors = [x, t] + ([] if cond is None else [cond])
    elif isinstance(cond, dict) and all(isinstance(v, Tensor) for v in cond.values()):
        keys = tuple(sorted(cond))
        tensors = [x, t, *(cond[k] for k in keys)]
    else:
        return None
    meta = tuple((tuple(v.shape), v.dtype, v.device) for v in tensors)
    return tensors, (keys, meta, torch.is_inference_mode_enabled())


def unflatten_call(tensors: list[Tensor], signature: _Signature) -> tuple[Tensor, Tensor, Any]:
    """Inverse of :func:`flatten_call`: ``(x, t, cond)`` from the tensors and the signature."""
    keys = signature[0]
    x, t, rest = tensors[0], tensors[1], tensors[2:]
    if keys is None:
        return x, t, None
    return x, t, (rest[0] if keys == () else dict(zip(keys, rest)))


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[Tensor]
    output: Tensor


class GraphedNetwork(nn.Module):
    """``model`` whose gradient-free CUDA calls replay a captured CUDA graph.

    The first call of each signature (shapes, dtypes, cond structure) warms the network up on a
    side stream and captures one call into a graph; every later call of that signature copies
    its inputs into the graph's static buffers, replays it, and returns a clone of its output.
    Calls on a CPU, with gradients enabled, or with a ``cond`` other than None / a tensor / a
    dict of tensors run ``model`` as it is. The wrapped network must not change between calls
    (the graph holds its weights' addresses, not their values at capture): wrap for sampling,
    not for training.
    """

    def __init__(self, model: nn.Module, warmup: int = 2) -> None:
        super().__init__()
        self.model = model
        self.warmup = warmup
        self._graphs: dict[_Signature, _Graph] = {}

    def __getattr__(self, name: str) -> Any:  # the wrapped network's own attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        flat = flatten_call(x, t, cond)
        if flat is None or not x.is_cuda or torch.is_grad_enabled():
            return self.model(x, t, cond)
        tensors, signature = flat
        entry = self._graphs.get(signature)
        if entry is None:
            entry = self._graphs[signature] = self._capture(tensors, signature)
        for static, value in zip(entry.inputs, tensors):
            static.copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, tensors: list[Tensor], signature: _Signature) -> _Graph:
        inputs = [v.clone() for v in tensors]
        args = unflatten_call(inputs, signature)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN picks its algorithms outside capture
            for _ in range(self.warmup):
                self.model(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.model(*args)
        return _Graph(graph, inputs, output)
