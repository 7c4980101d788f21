"""Where sampling writes: the output path, checked before any work, and the one writer of a
draw's files.

A draw of any task (:meth:`difflab.app.kinds.RunKind.sample_set`) is a :class:`SampleSet`;
:func:`write_samples` writes it as ``OUT.npz`` (the samples and the arrays the task adds),
``OUT.png`` (the task's figure), ``OUT.gif`` (the denoising trajectory, if kept) and
``OUT.json`` (the settings and timing), each atomically (:mod:`difflab.safe_io`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab import viz
from difflab.app.build import Built
from difflab.app.report import grid_scale, guidance_sweep_figure
from difflab.app.sampling import SampleRequest, check_memory
from difflab.checkpoint import check_output
from difflab.data.images import to_uint8
from difflab.safe_io import atomic_output, atomic_write_json, check_free_space, check_writable
from difflab.samplers import nfe

__all__ = [
    "OUTPUT_SUFFIXES",
    "SampleSet",
    "check_room",
    "data_dirs",
    "draw_info",
    "image_set",
    "output_path",
    "points_set",
    "sweep_set",
    "write_samples",
]

OUTPUT_SUFFIXES = (".npz", ".png", ".json", ".gif")  # what a draw writes beside its .npz


@dataclass
class SampleSet:
    """One draw of a run, as its task made it.

    Attributes:
        samples: the samples, floats (n, *data_shape) (a guidance sweep: (S, K, m, C, H, W)).
        arrays: what ``OUT.npz`` holds: ``samples`` (uint8 images or float32 points) and the
            arrays the task adds (e.g. ``degraded``, ``low_res``, ``scales``).
        figure: ``figure(path)`` writes the task's figure of the draw.
        gif: ``gif(path)`` writes the denoising trajectory; None when it was not kept.
        info: the settings of the draw for ``OUT.json`` (sampler, steps, nfe, n, ...).
        notes: lines to say after writing (e.g. the PSNR of restored images).
        seconds: the time the draw took.
    """

    samples: Tensor
    arrays: dict[str, np.ndarray]
    figure: Callable[[Path], None]
    gif: Callable[[Path], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        """How many samples the draw made."""
        return int(self.info.get("n", self.samples.shape[0]))


def draw_info(req: SampleRequest, n: int) -> dict[str, Any]:
    """The settings of a draw of ``n`` samples for its timing file."""
    assert req.sampler is not None and req.steps is not None  # resolved by Run.prepare
    return {"sampler": req.sampler, "steps": req.steps, "nfe": nfe(req.sampler, req.steps),
            "n": n}  # fmt: skip


def image_set(
    x: Tensor, info: dict[str, Any], frames: list[Tensor] | None = None, **arrays: Any
) -> SampleSet:
    """Images (n, C, H, W) in [-1, 1]: uint8 in the .npz (with ``arrays``), a grid of the
    first 256, and the trajectory ``frames`` (x_t of the first batch) as a GIF."""
    gif = None
    if frames:
        shown = [f[:64] for f in [*frames, x[: frames[0].shape[0]]]]
        gif = partial(viz.image_trajectory_gif, shown, scale=grid_scale(x))
    return SampleSet(
        x, {"samples": to_uint8(x).numpy(), **arrays},
        partial(viz.save_image_grid, x[:256], scale=grid_scale(x)), gif, info,
    )  # fmt: skip


def points_set(x: Tensor, info: dict[str, Any], frames: list[Tensor] | None = None) -> SampleSet:
    """2-D points (n, 2): float32 in the .npz, a scatter plot, the trajectory as a GIF."""
    gif = None
    if frames:
        gif = partial(viz.scatter_trajectory_gif, [*frames, x[: frames[0].shape[0]]])
    title = f"{info['sampler']}, {info['steps']} steps"
    return SampleSet(x, {"samples": x.numpy()}, partial(viz.scatter, x, title=title), gif, info)


def sweep_set(
    samples: Tensor, scales: tuple[float, ...], info: dict[str, Any], *, label: str
) -> SampleSet:
    """A guidance sweep (S, K, m, C, H, W): the samples, scales and labels in the .npz, a
    panel per scale (rows: classes) in the figure."""
    k, m = samples.shape[1:3]
    arrays = {"samples": to_uint8(samples).numpy(), "scales": np.array(scales),
              "labels": np.repeat(np.arange(k), m)}  # fmt: skip
    figure = partial(guidance_sweep_figure, samples, list(scales), label=label)
    return SampleSet(samples, arrays, figure, None, {**info, "scales": list(scales)})


def data_dirs(built: Built) -> tuple[str, ...]:
    """The folders a run reads its data from (outputs may not go there)."""
    d = built.cfg.data
    folder = d.data_dir or (None if d.is_toy else f"data/{d.name}")
    return () if folder is None or folder.startswith("hf:") else (folder,)


def output_path(
    out: Path | None, run_dir: Path, stem: str = "samples", data_dirs: tuple = ()
) -> Path:
    """The .npz to write (``out``, or a new file in the folder ``out`` or ``run_dir``),
    checked before any sampling starts: writable, and neither it nor the files written beside
    it (:data:`OUTPUT_SUFFIXES`) a file of a run directory or in ``data_dirs``."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out if out is not None else run_dir
    if path.is_dir():  # a default name never replaces an earlier output
        name, n = base, 1
        while any((path / f"{name}{s}").exists() for s in OUTPUT_SUFFIXES):
            n += 1
            name = f"{base}-{n}"
        path = path / f"{name}.npz"
    for suffix in OUTPUT_SUFFIXES:
        check_output(path.with_suffix(suffix), data_dirs=data_dirs)
    return check_writable(path)


def check_room(built: Built, n: int, out: Path) -> None:
    """Refuse, before sampling, ``n`` samples that cannot be held in memory or whose .npz
    (uint8 images, float32 points, before compression) cannot fit on the disk of ``out``."""
    check_memory(n, built.data_shape)
    per_sample = math.prod(built.data_shape) * (4 if built.cfg.data.is_toy else 1)
    check_free_space(out, n * per_sample)


def write_samples(out: Path, s: SampleSet, **settings: Any) -> list[Path]:
    """Write a draw (see the module docstring) and return the paths written: the .npz, the
    .png, the .gif if kept, then the .json of ``s.info``, ``settings`` and the timing."""
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **s.arrays)
    paths = [out, out.with_suffix(".png")]
    s.figure(paths[1])
    if s.gif is not None:
        paths.append(out.with_suffix(".gif"))
        s.gif(paths[-1])
    timing = {
        **settings,
        **s.info,
        "seconds": round(s.seconds, 6),
        "images_per_s": round(s.n / s.seconds, 3) if s.seconds > 0 else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    paths.append(out.with_suffix(".json"))
    atomic_write_json(paths[-1], timing)
    return paths
