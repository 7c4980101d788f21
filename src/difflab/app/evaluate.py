"""Evaluate a trained run: sample quality (``difflab eval``) and likelihood (``difflab nll``).

* 2-D runs: sliced Wasserstein distance and MMD of fresh samples to fresh data, next to the
  same distances between two fresh data sets (and the exact NLL for mixture data).
* Digit runs (MNIST, Fashion-MNIST): the Frechet digit distance of :mod:`difflab.evaluation`
  against the test split, next to the real-vs-real floor at the same sample size.
* ``nll``: negative log-likelihood of held-out data by the full variational bound [Ho 2020,
  Eq. 5] and by the probability-flow ODE with Hutchinson's trace estimator [Song 2021,
  Sec. 4.3], each with its standard error; bits/dim for images, nats per point for 2-D data.

What a kind of run is scored by is its ``evaluate`` (:mod:`difflab.app.kinds`).
"""

from __future__ import annotations

from typing import Any

import torch

from difflab.app.build import Built, build_data, cfg_data_shape
from difflab.app.sampling import ImageBar
from difflab.data.toy import sample_toy
from difflab.evaluation import DIGIT_DATASETS, frechet_digit_distance, load_or_train_classifier
from difflab.inference import inference_context
from difflab.likelihood import bits_per_dim, mean_and_stderr, vlb
from difflab.ode_likelihood import pf_ode_nll
from difflab.schedules import DiscreteSchedule

__all__ = ["digit_quality", "evaluate_nll", "evaluate_quality"]


def _held_out(built: Built, n: int, *, seed: int) -> torch.Tensor:
    cfg = built.cfg
    if cfg.data.is_toy:
        g = torch.Generator().manual_seed(50_000 + seed)
        return sample_toy(cfg.data.name, n, generator=g)  # type: ignore[arg-type]
    ds = build_data(cfg, train=False)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    x, _ = ds.batch(idx)
    return x


def evaluate_quality(
    built: Built,
    *,
    n: int,
    sampler: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Quality metrics of ``n`` samples (see the module docstring); ``progress`` and
    ``compile`` as in :func:`~difflab.app.sampling.draw_samples`."""
    out: dict[str, Any] = {"n": n, "sampler": sampler, "steps": steps}
    sampling = {"sampler": sampler, "steps": steps, "batch_size": batch_size,
                "progress": progress, "compile": compile}  # fmt: skip
    out.update(built.kind.quality(built, n=n, seed=seed, **sampling))
    return out


def check_digit_scoring(built: Built) -> None:
    """Raise a one-line ValueError unless the run makes 28x28 digits that the digit
    classifier can score and its evaluation data (both splits) opens and reads whole (called
    before any sample is drawn: a truncated test file is named before minutes of sampling)."""
    _check_digit_shape(built)
    for train in (False, True):  # what digit_quality reads: the test split, then the train split
        build_data(built.cfg, train=train)


def _check_digit_shape(built: Built) -> None:
    cfg = built.cfg
    if cfg.data.name not in DIGIT_DATASETS:
        raise ValueError(
            f"difflab eval knows digit datasets and 2-D data; {cfg.data.name!r} needs a "
            "feature extractor (use difflab.metrics.frechet_distance with your own)"
        )
    shape = cfg_data_shape(cfg)  # the images of the data set (a latent run decodes to them)
    if shape != (1, 28, 28):
        raise ValueError(
            f"difflab eval scores 28x28 digits; this run makes {shape} images "
            "(evaluate the cascade's super-resolution run instead)"
        )


def digit_quality(built: Built, x: torch.Tensor) -> dict[str, Any]:
    """The Frechet digit distance of samples ``x`` to the test split, and the real-vs-real
    floor at the same size (digit datasets only)."""
    _check_digit_shape(built)
    cfg = built.cfg
    data_dir = cfg.data.data_dir or f"data/{cfg.data.name}"
    net = load_or_train_classifier(data_dir=data_dir, dataset=cfg.data.name)  # type: ignore
    test = build_data(cfg, train=False)
    train = build_data(cfg, train=True)
    m = min(x.shape[0], len(test))
    ref = test.images[:m]
    real = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:m]]
    return {
        "frechet_digit_distance": frechet_digit_distance(x, ref, net=net),
        "frechet_digit_distance_real_vs_real": frechet_digit_distance(real, ref, net=net),
        "classifier": getattr(net, "cache_info", {}).get("name", ""),
    }


def evaluate_nll(
    built: Built,
    *,
    n: int,
    seed: int = 0,
    vlb_stride: int = 1,
    ode_steps: int = 32,
    n_probes: int = 1,
    batch_size: int = 250,
    progress: bool = False,
) -> dict[str, Any]:
    """NLL of ``n`` held-out examples by the variational bound and the PF-ODE; ``progress``:
    a bar on stderr counting examples (rate and ETA), advanced per batch."""
    if not built.kind.has_likelihood or built.denoiser is None:  # the bounds need a denoiser
        raise ValueError(
            f"difflab nll scores diffusion models of the data, not {built.kind.name} runs"
        )
    x = _held_out(built, n, seed=seed)
    images = x.ndim == 4
    dims = int(x[0].numel())
    g = torch.Generator().manual_seed(seed)
    variance = "learned" if built.cfg.model.learned_variance else "small"
    vlb_vals, ode_vals = [], []
    den = built.denoiser
    dtype = torch.float32
    bar = ImageBar(x.shape[0], "likelihood", steps=ode_steps, enabled=progress, unit="ex")
    with bar:
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(built.device, dtype)
            if isinstance(built.schedule, DiscreteSchedule):
                with inference_context(built.device):
                    v = vlb(
                        den,
                        xb,
                        built.schedule,
                        variance=variance,  # type: ignore[arg-type]
                        decoder="discretized" if images else "gaussian",
                        generator=g,
                        stride=vlb_stride,
                    )
                vlb_vals.append(v["total"].double().cpu())
            ode_vals.append(
                pf_ode_nll(den, xb, built.schedule, steps=ode_steps, n_probes=n_probes, generator=g)
                .double()
                .cpu()
            )  # no inference_mode: the trace estimator takes gradients of the network
            bar.update(xb.shape[0])
    out: dict[str, Any] = {"n": n, "dims": dims, "unit": "bits/dim" if images else "nats"}

    def summarise(vals: list[torch.Tensor], key: str) -> None:
        v = torch.cat(vals)
        if images:
            v = bits_per_dim(v, dims, bins=256) if key == "ode" else bits_per_dim(v, dims)
        mean, se = mean_and_stderr(v)
        out[key] = {"mean": mean, "stderr": se}

    if vlb_vals:
        summarise(vlb_vals, "vlb")
    summarise(ode_vals, "ode")
    return out
