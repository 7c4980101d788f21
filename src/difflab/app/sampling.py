"""Drawing samples from a built run: batches, seeds, conditioning and guidance.

:func:`draw_samples` is what ``difflab sample``, ``eval`` and the end-of-run report call; how
one batch is drawn is the run kind's (``built.kind.draw``): a diffusion sampler for denoisers,
the model's own sampler for the Sohl-Dickstein model. The network runs under
:func:`difflab.inference.inference_context` (``inference_mode`` unless classifier guidance
needs gradients), optionally compiled; a progress bar counts images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from difflab.app.build import Built, with_model
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, labels_from_cond
from difflab.inference import GraphedNetwork, channels_last, compile_network, inference_context
from difflab.safe_io import gigabytes, progress_bar
from difflab.sampler_table import SAMPLER_TABLE
from difflab.samplers import sample

__all__ = [
    "ImageBar",
    "check_memory",
    "check_sampler_applies",
    "draw_samples",
    "finite_samples",
    "guided_denoiser",
    "sample_with_denoiser",
]


def draw_samples(
    built: Built,
    n: int,
    *,
    sampler: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 500,
    cond: Tensor | dict[str, Tensor] | None = None,
    guidance: float | None = None,
    classifier: torch.nn.Module | None = None,
    classifier_scale: float = 1.0,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    compile: bool = False,
    bf16: bool = False,
    cuda_graph: bool = False,
    **options: Any,
) -> Tensor:
    """n samples (n, *data_shape) on the CPU, drawn in batches; a seed reproduces them.

    ``cond``: (n,) class labels or a dict of (n, ...) tensors ({"class", "image"}), sliced per
    batch. ``guidance``: classifier-free guidance scale (class-conditional runs). ``classifier``:
    a noise-aware classifier for classifier guidance at ``classifier_scale`` towards the labels
    of ``cond``; the labels reach the diffusion model only when it is class-conditional.
    ``threshold`` and ``eta`` (in ``options``) default to the run's ``sample.threshold`` and
    ``sample.eta`` (if set and ``sampler`` is the run's ``sample.sampler``).

    On a CPU the network runs in channels-last memory format
    (:func:`difflab.inference.channels_last`).

    ``progress``: a bar on stderr counting images (rate and ETA), advanced per batch, with the
    sampler step inside the batch. ``compile``: ``torch.compile`` the run's network in place
    first (:func:`difflab.inference.compile_network`). ``bf16``: bfloat16 autocast.
    ``cuda_graph``: replay one captured CUDA graph of the network per batch shape
    (:class:`difflab.inference.GraphedNetwork`; CUDA devices only).
    """
    # kept apart until tests/test_speed.py::test_graphed_compiled_network_matches_eager_on_cuda
    # has passed on a GPU (BENCHMARKS.md, sampling speed on the GPU)
    if cuda_graph and compile:
        raise ValueError("--cuda-graph and --compile cannot be combined; choose one")
    if cuda_graph and built.device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device; this run samples on {built.device}")
    check_sampler_applies(built, sampler)
    options.setdefault("threshold", built.cfg.sample.threshold)
    if built.cfg.sample.eta is not None and sampler == built.cfg.sample.sampler:
        options.setdefault("eta", built.cfg.sample.eta)  # the eta of the run's own sampler
    if compile:
        compile_network(built.model, built.device)  # traced at the first call, in channels_last
    if cuda_graph:
        built = with_model(built, GraphedNetwork(built.model))
    check_memory(n, built.data_shape)
    g = torch.Generator().manual_seed(seed)
    guide = {"guidance": guidance, "classifier": classifier, "classifier_scale": classifier_scale}
    out = []
    done = 0
    bar = ImageBar(n, f"{sampler}, {steps} steps", steps=steps, enabled=progress)
    # classifier guidance takes gradients of the classifier: no inference_mode for it
    grad_off = inference_context(built.device, needs_grad=classifier is not None, bf16=bf16)
    with channels_last(built.model, built.device), bar, grad_off:  # NHWC on a CPU
        while done < n:
            b = min(batch_size, n - done)
            x = built.kind.draw(
                built, b, generator=g, cond=_cond_slice(cond, done, done + b, built.device),
                callback=bar.counting_steps(callback if done == 0 else None),
                sampler=sampler, steps=steps, **guide, **options,
            )  # fmt: skip
            out.append(x.float().cpu())
            done += b
            bar.update(b)
    return finite_samples(torch.cat(out), f"{sampler} with {steps} steps")


def check_sampler_applies(built: Built, sampler: str) -> None:
    """Refuse (one-line ``ValueError``) the consistency sampler for a denoiser of E[x0 | x_t],
    and every other sampler for a consistency model (whose x0 is the ODE's end point)."""
    spec = SAMPLER_TABLE.get(sampler)
    if spec is None:  # an unknown name: refused by the sampler table, with the list
        return
    if built.kind.is_consistency_model(built.cfg) and not spec.consistency:
        raise ValueError(
            f"{built.cfg.preset} is a consistency model: it samples with the consistency "
            f"sampler only (--sampler consistency), not {sampler!r}"
        )
    if spec.consistency and not built.kind.is_consistency_model(built.cfg):
        raise ValueError(
            f"the {sampler} sampler needs a consistency model (difflab distill RUN --method "
            f"consistency); {built.cfg.preset} is a {built.kind.name} run"
        )


def check_memory(n: int, data_shape: tuple[int, ...]) -> None:
    """Refuse (one-line ``ValueError``), before any work, ``n`` samples whose float32 copy
    (every batch is kept on the CPU until all are drawn) is larger than this machine's memory."""
    nbytes = 4 * n * math.prod(data_shape)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: nothing to compare with
        return
    if nbytes > memory:
        raise ValueError(
            f"{n} samples of shape {tuple(data_shape)} take {gigabytes(nbytes)} of memory, "
            f"this machine has {gigabytes(memory)}; draw fewer samples per command"
        )


class ImageBar:
    """A progress bar on stderr over ``n`` images (rate and ETA), advanced per batch, with the
    sampler step of the current batch beside it. It appears at the first sampler step or
    batch, so that an option refused before any work fails with one line and no bar."""

    def __init__(self, n: int, desc: str, *, steps: int, enabled: bool, unit: str = "img"):
        self.n, self.desc, self.steps, self.enabled, self.unit = n, desc, steps, enabled, unit
        self.bar: tqdm | None = None

    def _shown(self) -> tqdm:
        if self.bar is None:
            self.bar = progress_bar(total=self.n, desc=self.desc, unit=self.unit)
        return self.bar

    def update(self, k: int) -> None:
        """``k`` more images are done."""
        if self.enabled:
            self._shown().update(k)

    def counting_steps(self, callback: Callable[[dict], None] | None) -> Any:
        """A sampler callback that shows the step, then calls ``callback``."""
        if not self.enabled:
            return callback

        def count(info: dict) -> None:
            bar = self._shown()
            bar.set_postfix_str(f"step {int(info['i']) + 1}/{self.steps}", refresh=False)
            bar.update(0)  # redraws at most every bar.mininterval seconds
            if callback is not None:
                callback(info)

        return count

    def __enter__(self) -> ImageBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def sample_with_denoiser(
    built: Built,
    b: int,
    *,
    generator: torch.Generator,
    cond: Any,
    callback: Callable[[dict], None] | None,
    sampler: str,
    steps: int,
    guidance: float | None,
    classifier: torch.nn.Module | None,
    classifier_scale: float,
    **options: Any,
) -> Tensor:
    """One batch from the run's denoiser, wrapped in the requested guidance."""
    den, cond = guided_denoiser(built, cond, guidance, classifier, classifier_scale)
    return sample(
        den, built.schedule, (b, *built.data_shape), sampler=sampler, steps=steps,
        generator=generator, cond=cond, callback=callback, device=built.device, **options,
    )  # fmt: skip


def guided_denoiser(
    built: Built,
    cond: Any,
    guidance: float | None,
    classifier: torch.nn.Module | None,
    classifier_scale: float,
) -> tuple[Any, Any]:
    """The run's denoiser wrapped in classifier-free and/or classifier guidance, and the cond
    the wrapped denoiser takes."""
    den: Any = built.denoiser
    if guidance is not None:
        den = ClassifierFreeGuidance(den, scale=guidance, null_label=built.cfg.model.num_classes)
    if classifier is None:
        return den, cond
    labels = labels_from_cond(cond)
    if labels is None:
        raise ValueError("classifier guidance needs class labels (--class)")
    guided = ClassifierGuidance(
        den, classifier, built.schedule, scale=classifier_scale, labels=labels
    )
    if built.cfg.model.num_classes == 0:  # an unconditional model must not see the labels
        rest = {k: v for k, v in cond.items() if k != "class"} if isinstance(cond, dict) else {}
        cond = rest or None
    return guided, cond


def finite_samples(x: Tensor, what: str) -> Tensor:
    """``x`` if every value is finite; otherwise a one-line ``ValueError``: non-finite samples
    are never useful, and a figure or metric of them fails later with an obscure message."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} gave NaN or infinite samples: the model's outputs overflow "
            "(did the run diverge?)"
        )
    return x


def _cond_slice(cond: Any, lo: int, hi: int, device: torch.device) -> Any:
    """Rows lo:hi of a label tensor or of every tensor in a cond dict, on ``device``."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[lo:hi].to(device) for k, v in cond.items()}
    return cond[lo:hi].to(device)
