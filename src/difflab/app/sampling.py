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
from dataclasses import dataclass
from pathlib import Path
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
    "SampleRequest",
    "check_memory",
    "check_sampler_applies",
    "draw_samples",
    "finite_samples",
    "guided_denoiser",
    "sample_with_denoiser",
]


@dataclass(frozen=True)
class SampleRequest:
    """What to draw from a run: the options of ``difflab sample`` and of
    :meth:`difflab.app.api.Run.sample`. Each task (:meth:`difflab.app.kinds.RunKind.prepare`)
    checks the options it reads and refuses the others.

    Attributes:
        n: number of samples (image-to-image and super-resolution ``inputs``: one per image).
        sampler, steps: default the run's ``sample.sampler`` and ``sample.steps``.
        seed: the seed of every random draw; the same seed gives the same samples.
        batch_size: samples per batch.
        label: a class label for every sample (class-conditional runs, classifier guidance).
        guidance: classifier-free guidance scale s (0 unconditional, 1 conditional).
        guidance_sweep: scales of a sweep: every class at every scale, the same noise for all
            (with ``classifier``, the classifier scale is swept).
        classifier: a classifier run (its directory, or a loaded run) for classifier guidance
            at ``classifier_scale`` towards ``label``.
        inputs: conditioning images: the degraded images of an image-to-image run ((N, C, H,
            W), or an .npz with a ``degraded`` array), or the low-resolution images a
            super-resolution run super-resolves (a tensor, an image file, a folder of them or
            an .npz ``images`` array).
        base_sampler, base_steps: a cascade's base stage (default: the base run's).
        aug_level: a cascade's augmentation level of the low-resolution input, a fraction of
            the schedule's t range in [0, 1] (default: the run's ``sample.aug_level``).
        eta, threshold: the sampler's eta and x0 thresholding (``"none"``, ``"clip"``,
            ``"dynamic"``); default the run's ``sample.eta`` and ``sample.threshold``.
        gif: keep the denoising trajectory (for a GIF).
        progress, compile, bf16, cuda_graph: as in :func:`draw_samples`.
    """

    n: int = 16
    sampler: str | None = None
    steps: int | None = None
    seed: int = 0
    batch_size: int = 500
    label: int | None = None
    guidance: float | None = None
    guidance_sweep: tuple[float, ...] | None = None
    classifier: Any = None
    classifier_scale: float = 1.0
    inputs: Tensor | Path | None = None
    base_sampler: str | None = None
    base_steps: int | None = None
    aug_level: float | None = None
    eta: float | None = None
    threshold: str | None = None
    gif: bool = False
    progress: bool = False
    compile: bool = False
    bf16: bool = False
    cuda_graph: bool = False

    def check(self, name: Callable[[str], str] = str) -> SampleRequest:
        """Refuse (one-line ``ValueError``) values no run can use, naming an option as
        ``name(field)`` (the CLI names them as its flags); returns the request."""
        from difflab.app.config import check_limit  # the ranges of the config fields

        limits = {"n": "sample.n", "steps": "sample.steps", "batch_size": "train.batch_size",
                  "seed": "train.seed", "base_steps": "sample.steps"}  # fmt: skip
        for key, path in limits.items():
            if getattr(self, key) is not None:
                check_limit(path, getattr(self, key), name(key))
        for key in ("guidance", "classifier_scale", "eta", "aug_level"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name(key)} must be a finite number, got {value}")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"{name('eta')} must be >= 0, got {self.eta}")
        if self.aug_level is not None and not 0 <= self.aug_level <= 1:
            raise ValueError(
                f"{name('aug_level')} must be in [0, 1] (a fraction of t), got {self.aug_level}"
            )
        if self.guidance_sweep is not None and not self.guidance_sweep:
            raise ValueError(f"{name('guidance_sweep')} needs at least one scale")
        return self

    def draw_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`draw_samples` that the request sets."""
        options: dict[str, Any] = {"sampler": self.sampler, "steps": self.steps,
                                   "seed": self.seed, "batch_size": self.batch_size}  # fmt: skip
        if self.eta is not None:
            options["eta"] = self.eta
        if self.threshold is not None:
            options["threshold"] = None if self.threshold == "none" else self.threshold
        speed = ("progress", "compile", "bf16", "cuda_graph")
        return options | {key: getattr(self, key) for key in speed}


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
