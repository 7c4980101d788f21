"""The parts every run is built from: device, schedule, data, batches, and :class:`Built`.

What differs between kinds of run (the model, its loss, sampling, reports) is in
:mod:`difflab.app.kinds`; :func:`difflab.app.runs.build` puts the parts together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from difflab.app.config import RunConfig
from difflab.cascade import downsample_images
from difflab.data.datasets import dataset
from difflab.data.images import load_image_dataset
from difflab.parameterization import ModelDenoiser
from difflab.process_table import process_for
from difflab.schedules import Schedule

__all__ = [
    "Built",
    "ImageBatches",
    "build_data",
    "build_schedule",
    "cfg_data_shape",
    "make_batch_fn",
    "resolve_device",
    "with_model",
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
    """The schedule of the run's process (:func:`difflab.process_table.process_for`)."""
    d = asdict(cfg.diffusion)
    return process_for(cfg.diffusion.schedule).make_schedule(d)


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
    d = cfg.data
    if d.is_toy:
        return None
    data_dir = d.data_dir or f"data/{d.name}"
    kwargs: dict[str, Any] = {}
    if d.image_size is not None:
        kwargs["image_size"] = d.image_size
    if d.channels is not None:
        kwargs["channels"] = d.channels
    if d.image_column is not None:
        kwargs["image_column"] = d.image_column
    ds = load_image_dataset(d.name, data_dir=data_dir, train=train, download=d.download, **kwargs)
    if d.hflip is not None:
        ds.hflip = d.hflip
    if d.limit is not None:
        ds.images = ds.images[: d.limit]
        ds.labels = ds.labels[: d.limit]
    if d.downsample > 1:
        ds.images = downsample_uint8(ds.images, d.downsample)
    return ds


def downsample_uint8(images: Tensor, factor: int) -> Tensor:
    """f x f box averages of uint8 images (N, C, H, W) -> (N, C, H / f, W / f), rounded to
    uint8 (:func:`difflab.cascade.downsample_images`, a cascade's low-resolution data)."""
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"data.downsample={factor} needs image sides divisible by it, got {h} x {w}"
        )
    out = []
    for chunk in images.split(4096):
        low = downsample_images(chunk.float(), factor)
        out.append(low.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


@dataclass
class Built:
    """Everything a run needs, built from a config."""

    cfg: RunConfig
    kind: Any  # its entry of difflab.app.kinds.KINDS: what to do with it
    schedule: Schedule
    model: nn.Module
    denoiser: ModelDenoiser | None  # for kinds whose network is a diffusion denoiser
    data_shape: tuple[int, ...]  # shape of one example
    dataset: Any
    device: torch.device


def diffusion_denoiser(cfg: RunConfig, model: nn.Module, schedule: Schedule) -> ModelDenoiser:
    """The network behind the run's parameterisation wrapper."""
    return ModelDenoiser(
        model,
        schedule,
        parameterization=cfg.model.parameterization,  # type: ignore[arg-type]
        learned_variance=cfg.model.learned_variance,
        sigma_data=cfg.diffusion.sigma_data,
        time_scale=process_for(cfg.diffusion.schedule).time_scale,
    )


def with_model(built: Built, model: nn.Module) -> Built:
    """The same run with another network (e.g. the EMA copy) behind a fresh denoiser."""
    denoiser = built.kind.denoiser(built.cfg, model, built.schedule)
    return replace(built, model=model, denoiser=denoiser)


def cfg_data_shape(cfg: RunConfig) -> tuple[int, ...]:
    """Shape of one example without loading the data (2-D points, or images)."""
    if cfg.data.is_toy:
        return (2,)
    d = cfg.data
    shape = dataset(d.name).shape
    if shape is not None:  # a fixed size, unless resized or converted
        c, h, _ = shape
        channels, size = d.channels or c, d.image_size or h
    elif d.image_size is None or d.channels is None:
        raise ValueError("image folder runs need data.image_size and data.channels")
    else:
        channels, size = d.channels, d.image_size
    if size % d.downsample:
        raise ValueError(
            f"data.downsample={d.downsample} must divide the image size {size} "
            "(set data.image_size)"
        )
    return (channels, size // d.downsample, size // d.downsample)


def make_batch_fn(built: Built) -> Callable[[int, torch.Generator], Any]:
    """batch_fn(step, generator) -> (x0, labels or None) on the run's device."""
    cfg = built.cfg
    sample = dataset(cfg.data.name).sample
    if sample is not None:  # 2-D points, drawn afresh

        def toy_batch(step: int, g: torch.Generator) -> tuple[Tensor, None]:
            x = sample(cfg.train.batch_size, g)
            return x.to(built.device), None

        return toy_batch
    return ImageBatches(
        built.dataset, cfg.train.batch_size, seed=cfg.train.seed, device=built.device
    )
