"""The application layer: build a schedule, data, model and loss from a :class:`RunConfig`.

``difflab train`` and ``difflab sample`` are thin shells around :func:`build` plus the loops in
:mod:`difflab.runner`. Nothing below the app layer reads a config object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import RunConfig
from difflab.parameterization import ModelDenoiser
from difflab.samplers import SAMPLER_OPTIONS, SAMPLERS
from difflab.samplers.common import THRESHOLD_MODES
from difflab.schedules import DiscreteSchedule, EDMSchedule, Schedule, check_choice

__all__ = [
    "Built",
    "build",
    "build_schedule",
    "check_config",
    "build_data",
    "resolve_device",
    "ImageBatches",
]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def build_schedule(cfg: RunConfig) -> Schedule:
    d = cfg.diffusion
    if d.schedule == "edm":
        return EDMSchedule(d.sigma_min, d.sigma_max)
    return DiscreteSchedule.from_name(d.schedule, d.T, zero_terminal_snr=d.zero_terminal_snr)


class ImageBatches:
    """Epoch-wise shuffled batches whose order depends only on (seed, step): resumable."""

    def __init__(self, dataset: Any, batch_size: int, *, seed: int, device: torch.device) -> None:
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> Tensor:
        start = step * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epochs = pos // self.n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask] = self._permutation(e)[pos[mask] % self.n]
        return out

    def __call__(self, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.dataset.batch(self.indices(step), generator=generator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_data(cfg: RunConfig, *, train: bool = True) -> Any:
    """The image dataset of a config (toy data needs no object)."""
    from difflab.data.images import load_image_dataset

    d = cfg.data
    if d.is_toy:
        return None
    data_dir = d.data_dir or f"data/{d.name}"
    kwargs: dict[str, Any] = {}
    if d.image_size is not None:
        kwargs["image_size"] = d.image_size
    if d.channels is not None:
        kwargs["channels"] = d.channels
    ds = load_image_dataset(d.name, data_dir=data_dir, train=train, download=d.download, **kwargs)
    if d.hflip is not None:
        ds.hflip = d.hflip
    if d.limit is not None:
        ds.images = ds.images[: d.limit]
        ds.labels = ds.labels[: d.limit]
    return ds


@dataclass
class Built:
    """Everything a run needs, built from a config."""

    cfg: RunConfig
    schedule: Schedule
    model: nn.Module
    denoiser: ModelDenoiser | None  # None for the Sohl-Dickstein model and classifiers
    data_shape: tuple[int, ...]  # shape of one example
    dataset: Any
    device: torch.device


MODEL_KINDS = ("mlp", "unet", "sohl-dickstein", "classifier")


def build_model(cfg: RunConfig, data_shape: tuple[int, ...], schedule: Schedule) -> nn.Module:
    m = cfg.model
    out_mult = 2 if m.learned_variance else 1
    if m.kind == "mlp":
        from difflab.nn.mlp import TimeMLP

        return TimeMLP(
            dim=data_shape[0],
            hidden=m.hidden,
            depth=m.depth,
            out_dim=data_shape[0] * out_mult,
            num_classes=m.num_classes,
        )
    if m.kind == "unet":
        from difflab.nn.unet import build_unet

        c, h, _ = data_shape
        overrides: dict[str, Any] = dict(
            in_channels=c, image_size=h, out_channels=c * out_mult, num_classes=m.num_classes
        )
        if m.dropout is not None:
            overrides["dropout"] = m.dropout
        if m.image_task != "none":  # Palette: the degraded image is concatenated to x_t
            from difflab.image_to_image import cond_channels

            overrides["cond_channels"] = cond_channels(m.image_task, c)  # type: ignore[arg-type]
        return build_unet(m.preset, **overrides)
    if m.kind == "classifier":
        from difflab.classifier import build_classifier

        if len(data_shape) != 3:
            raise ValueError("model.kind=classifier needs image data (C, H, W)")
        extra = {} if m.dropout is None else {"dropout": m.dropout}
        c, h, _ = data_shape
        return build_classifier(
            m.preset, num_classes=m.num_classes, in_channels=c, image_size=h, **extra
        )
    if m.kind == "sohl-dickstein":
        from difflab.nn.sohl_dickstein import SohlDicksteinModel

        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("the Sohl-Dickstein model needs a discrete schedule")
        return SohlDicksteinModel(dim=data_shape[0], T=schedule.T, hidden=m.hidden)
    raise ValueError(
        f"unknown model kind {m.kind!r}; choose one of: mlp, unet, sohl-dickstein, classifier"
    )


def check_config(cfg: RunConfig) -> None:
    """Reject settings that no run can use (one-line ``ValueError``) before anything is loaded
    or written: types and ranges (:meth:`RunConfig.validate`), every name, and combinations."""
    from difflab.data.images import IMAGE_DATASETS
    from difflab.data.toy import TOY_DATASETS
    from difflab.image_to_image import TASKS
    from difflab.nn.unet import UNET_PRESETS
    from difflab.objectives import LOSS_TYPES, TIME_SAMPLINGS, WEIGHTINGS
    from difflab.parameterization import PARAMETERIZATIONS
    from difflab.schedules import BETA_SCHEDULES

    cfg.validate()
    check_choice("data.name", cfg.data.name, TOY_DATASETS + IMAGE_DATASETS)
    check_choice("model.kind", cfg.model.kind, MODEL_KINDS)
    if cfg.model.kind in ("unet", "classifier"):
        check_choice("model.preset", cfg.model.preset, tuple(UNET_PRESETS))
    if cfg.data.is_toy != (cfg.model.kind in ("mlp", "sohl-dickstein")):
        what = "2-D" if cfg.data.is_toy else "image"
        raise ValueError(
            f"model.kind={cfg.model.kind} cannot model the {what} data {cfg.data.name!r}"
        )
    check_choice("model.parameterization", cfg.model.parameterization, PARAMETERIZATIONS)
    check_choice("model.image_task", cfg.model.image_task, ("none", *TASKS))
    check_choice("diffusion.schedule", cfg.diffusion.schedule, (*BETA_SCHEDULES, "edm"))
    check_choice("diffusion.loss_type", cfg.diffusion.loss_type, LOSS_TYPES)
    check_choice("diffusion.weighting", cfg.diffusion.weighting, WEIGHTINGS)
    check_choice("diffusion.t_sampling", cfg.diffusion.t_sampling, TIME_SAMPLINGS)
    if cfg.diffusion.sigma_min >= cfg.diffusion.sigma_max:
        raise ValueError("diffusion.sigma_min must be below diffusion.sigma_max")
    resolve_device(cfg.train.device)
    if not cfg.data.is_toy and cfg.data.name == "folder":
        cfg_data_shape(cfg)
    if cfg.model.kind == "sohl-dickstein" and not cfg.data.is_toy:
        raise ValueError("the Sohl-Dickstein model is implemented for 2-D data only")
    if cfg.model.image_task != "none" and cfg.model.kind != "unet":
        raise ValueError("image-to-image tasks (model.image_task) need model.kind=unet")
    if cfg.sample.threshold is not None:
        check_choice("sample.threshold", cfg.sample.threshold, THRESHOLD_MODES)
    check_choice("sample.sampler", cfg.sample.sampler, tuple(SAMPLERS))
    if cfg.sample.eta is not None and "eta" not in SAMPLER_OPTIONS[cfg.sample.sampler]:
        raise ValueError(f"sample.eta is set but sampler {cfg.sample.sampler!r} has no eta")


def build(cfg: RunConfig, *, device: torch.device | None = None, load_data: bool = True) -> Built:
    """Schedule, data, model and denoiser for ``cfg`` (the model is on ``device``)."""
    check_config(cfg)
    device = device or resolve_device(cfg.train.device)
    schedule = build_schedule(cfg)
    if cfg.data.is_toy:
        data_shape: tuple[int, ...] = (2,)
        dataset = None
    else:
        dataset = build_data(cfg) if load_data else None
        if dataset is not None:
            data_shape = tuple(dataset.images.shape[1:])
        else:
            data_shape = tuple(cfg_data_shape(cfg))
    model = build_model(cfg, data_shape, schedule).to(device)
    denoiser = None
    if cfg.model.kind not in ("sohl-dickstein", "classifier"):
        denoiser = ModelDenoiser(
            model,
            schedule,
            parameterization=cfg.model.parameterization,  # type: ignore[arg-type]
            learned_variance=cfg.model.learned_variance,
            sigma_data=cfg.diffusion.sigma_data,
        )
    return Built(cfg, schedule, model, denoiser, data_shape, dataset, device)


def with_model(built: Built, model: nn.Module) -> Built:
    """The same run with another network (e.g. the EMA copy) behind a fresh denoiser."""
    denoiser = None
    if built.denoiser is not None:
        d = built.denoiser
        denoiser = ModelDenoiser(
            model,
            d.schedule,
            parameterization=d.parameterization,  # type: ignore[arg-type]
            learned_variance=d.learned_variance,
            sigma_data=d.sigma_data,
        )
    return replace(built, model=model, denoiser=denoiser)


def cfg_data_shape(cfg: RunConfig) -> list[int]:
    """Shape of one example without loading the data (stored in config.json by a run)."""
    known = {"mnist": [1, 28, 28], "fashion-mnist": [1, 28, 28], "cifar10": [3, 32, 32]}
    if cfg.data.name in known and cfg.data.image_size is None:
        return known[cfg.data.name]
    if cfg.data.image_size is None or cfg.data.channels is None:
        raise ValueError("image folder runs need data.image_size and data.channels")
    return [cfg.data.channels, cfg.data.image_size, cfg.data.image_size]


def make_batch_fn(built: Built) -> Callable[[int, torch.Generator], Any]:
    """batch_fn(step, generator) -> (x0, labels or None) on the run's device."""
    cfg = built.cfg
    if cfg.data.is_toy:
        from difflab.data.toy import sample_toy

        def toy_batch(step: int, g: torch.Generator) -> tuple[Tensor, None]:
            x = sample_toy(cfg.data.name, cfg.train.batch_size, generator=g)  # type: ignore
            return x.to(built.device), None

        return toy_batch
    return ImageBatches(
        built.dataset, cfg.train.batch_size, seed=cfg.train.seed, device=built.device
    )
