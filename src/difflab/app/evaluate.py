"""Evaluate a trained run: sample quality (``difflab eval``) and likelihood (``difflab nll``).

* 2-D runs: sliced Wasserstein distance and MMD of fresh samples to fresh data, next to the
  same distances between two fresh data sets (and the exact NLL for mixture data).
* Digit runs (MNIST, Fashion-MNIST): the Frechet digit distance of :mod:`difflab.evaluation`
  against the test split, next to the real-vs-real floor at the same sample size.
* ``--metric fid|kid|pr`` (image runs): Inception FID [Heusel 2017], KID [Binkowski 2018] or
  precision/recall [Kynkaanniemi 2019] of the samples against the data set's reference split
  (its ``reference_split`` in :data:`difflab.data.datasets.DATASETS`), with the reference
  features cached (:mod:`difflab.fid`).
* ``nll``: negative log-likelihood of held-out data by the full variational bound [Ho 2020,
  Eq. 5] and by the probability-flow ODE with Hutchinson's trace estimator [Song 2021,
  Sec. 4.3], each with its standard error; bits/dim for images, nats per point for 2-D data.

What a kind of run is scored by is its ``evaluate`` (:mod:`difflab.app.kinds`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from difflab.app.build import Built, build_data, cfg_data_shape
from difflab.app.sampling import ImageBar, draw_samples
from difflab.data.datasets import dataset
from difflab.evaluation import frechet_digit_distance, load_or_train_classifier
from difflab.fid import (
    InceptionFeatures,
    cached_features,
    fid_from_features,
    find_inception,
    inception_features,
)
from difflab.inference import inference_context
from difflab.likelihood import bits_per_dim, mean_and_stderr, vlb
from difflab.metrics import kernel_inception_distance, precision_recall
from difflab.ode_likelihood import pf_ode_nll
from difflab.schedules import DiscreteSchedule

__all__ = [
    "INCEPTION_METRICS",
    "digit_quality",
    "evaluate_nll",
    "evaluate_quality",
    "inception_quality",
]

INCEPTION_METRICS = ("fid", "kid", "pr")


def _held_out(built: Built, n: int, *, seed: int) -> torch.Tensor:
    cfg = built.cfg
    sample = dataset(cfg.data.name).sample
    if sample is not None:
        return sample(n, torch.Generator().manual_seed(50_000 + seed))
    ds = build_data(cfg, train=False)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    x, _ = ds.batch(idx)
    return x


def evaluate_quality(built: Built, *, n: int, seed: int = 0, **sampling: Any) -> dict[str, Any]:
    """Quality metrics of ``n`` samples (see the module docstring) drawn with ``sampling``, the
    options of :func:`~difflab.app.sampling.draw_samples` (``sampler`` and ``steps``, and e.g.
    ``batch_size``, ``progress``, ``compile``)."""
    out: dict[str, Any] = {"n": n, "sampler": sampling["sampler"], "steps": sampling["steps"]}
    out.update(built.kind.quality(built, n=n, seed=seed, **sampling))
    return out


def check_inception_scoring(built: Built, metric: str) -> None:
    """Raise a one-line ValueError unless the run draws images (before any work)."""
    if metric not in INCEPTION_METRICS:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of: {', '.join(INCEPTION_METRICS)}"
        )
    kind = built.kind
    if built.cfg.data.is_toy or not kind.has_denoiser or kind.conditions_on_images:
        raise ValueError(
            f"--metric {metric} scores image samples of a generative run, not {kind.name} runs"
        )


def reference_images(built: Built) -> tuple[torch.Tensor, str]:
    """uint8 images (N, C, H, W) of the run's reference split (all of it, ignoring
    ``data.limit``) and a name for it, e.g. ``mnist-test``."""
    cfg = built.cfg
    split = dataset(cfg.data.name).reference_split
    full = replace(cfg, data=replace(cfg.data, limit=None))
    ds = build_data(full, train=split == "train")
    return ds.images, f"{cfg.data.name}-{split}"


def inception_quality(
    built: Built,
    *,
    metric: str,
    n: int,
    sampler: str,
    steps: int,
    seed: int = 0,
    inception: str | Path | None = None,
    resize: str = "clean",
    batch_size: int = 500,
    feature_batch: int = 50,
    progress: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Inception FID, KID or precision/recall (k = 3) of n samples against the reference
    split; the weights are found (or refused) and the reference features cached before any
    sample is drawn. Reports n, the reference (name, n, cache file), resize mode and weights."""
    check_inception_scoring(built, metric)
    extractor = InceptionFeatures(find_inception(inception))
    ref_images, ref_name = reference_images(built)
    bar = ImageBar(len(ref_images), f"Inception {ref_name}", steps=0, enabled=progress)
    with bar:
        ref, cache = cached_features(ref_images, extractor, name=ref_name, mode=resize,  # type: ignore[arg-type]
                                     batch_size=feature_batch, progress=bar.update)  # fmt: skip
    x = draw_samples(built, n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                     progress=progress, compile=compile)  # fmt: skip
    bar = ImageBar(n, "Inception samples", steps=0, enabled=progress)
    with bar:
        feats = inception_features(x, extractor, mode=resize, batch_size=feature_batch,  # type: ignore[arg-type]
                                   progress=bar.update)  # fmt: skip
    out: dict[str, Any] = {
        "metric": metric, "n": n, "sampler": sampler, "steps": steps,
        "reference": {"data": ref_name, "n": len(ref), "features": str(cache)},
        "resize": resize, "weights_sha256": extractor.sha256,
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    if metric == "fid":
        out["fid"] = fid_from_features(feats, ref)
    elif metric == "kid":
        size = min(1000, n, len(ref))
        mean, std = kernel_inception_distance(feats, ref, subset_size=size, generator=g)
        out["kid"] = {"mean": mean, "std": std, "subset_size": size, "subsets": 100}
    else:
        sub = ref[torch.randperm(len(ref), generator=g)[: min(n, len(ref))]]
        precision, recall = precision_recall(sub, feats, k=3)
        out["precision"], out["recall"] = precision, recall
        out["reference"]["n_used"] = len(sub)
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
    if not dataset(cfg.data.name).digits:
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
