"""Drawing samples from a built run: batches, seeds, conditioning and guidance.

:func:`draw_samples` is what ``difflab sample``, ``eval`` and the end-of-run report call; how
one batch is drawn is the run kind's (``built.kind.draw``): a diffusion sampler for denoisers,
the model's own sampler for the Sohl-Dickstein model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.app.build import Built
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance, labels_from_cond
from difflab.samplers import sample

__all__ = ["draw_samples", "finite_samples", "guided_denoiser", "sample_with_denoiser"]


def draw_samples(
    built: Built,
    n: int,
    *,
    sampler: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 1000,
    cond: Tensor | dict[str, Tensor] | None = None,
    guidance: float | None = None,
    classifier: torch.nn.Module | None = None,
    classifier_scale: float = 1.0,
    callback: Callable[[dict], None] | None = None,
    **options: Any,
) -> Tensor:
    """n samples (n, *data_shape) on the CPU, drawn in batches; a seed reproduces them.

    ``cond``: (n,) class labels or a dict of (n, ...) tensors ({"class", "image"}), sliced per
    batch. ``guidance``: classifier-free guidance scale (class-conditional runs). ``classifier``:
    a noise-aware classifier for classifier guidance at ``classifier_scale`` towards the labels
    of ``cond``; the labels reach the diffusion model only when it is class-conditional.
    ``threshold`` and ``eta`` (in ``options``) default to the run's ``sample.threshold`` and
    ``sample.eta`` (if set and ``sampler`` is the run's ``sample.sampler``).
    """
    options.setdefault("threshold", built.cfg.sample.threshold)
    if built.cfg.sample.eta is not None and sampler == built.cfg.sample.sampler:
        options.setdefault("eta", built.cfg.sample.eta)  # the eta of the run's own sampler
    g = torch.Generator().manual_seed(seed)
    guide = {"guidance": guidance, "classifier": classifier, "classifier_scale": classifier_scale}
    out = []
    done = 0
    with torch.no_grad():
        while done < n:
            b = min(batch_size, n - done)
            x = built.kind.draw(
                built, b, generator=g, cond=_cond_slice(cond, done, done + b, built.device),
                callback=callback if done == 0 else None, sampler=sampler, steps=steps,
                **guide, **options,
            )  # fmt: skip
            out.append(x.float().cpu())
            done += b
    return finite_samples(torch.cat(out), f"{sampler} with {steps} steps")


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
