"""The data-set table: everything the rest of difflab asks about a data set (``data.name``).

Each entry comes from the data set's one source entry: a toy set is a sampler in
:data:`difflab.data.toy.TOY_SOURCES`, an image set a reader in
:data:`difflab.data.images.IMAGE_SOURCES` (with its image shape, flips and whether the digit
classifier scores it) and, if it downloads, its files and SHA-256 sums in
:data:`difflab.data.download.REMOTE_FILES`. Config, build and evaluation read only this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from difflab.data.download import REMOTE_FILES, RemoteFile
from difflab.data.images import IMAGE_SOURCES, ImageSource
from difflab.data.toy import TOY_SOURCES, sample_toy

__all__ = ["DATASETS", "DataSet", "dataset"]


@dataclass(frozen=True)
class DataSet:
    """An entry of :data:`DATASETS`.

    Attributes:
        name: its ``data.name``.
        data: ``"2-D"`` (points drawn afresh every batch) or ``"image"`` (a finite set).
        shape: the shape of one example, or None where ``data.image_size`` and
            ``data.channels`` set it (image folders, Hugging Face data).
        sample: 2-D sets: ``sample(n, generator)`` -> (n, 2) float32.
        source: image sets: the reader (:class:`difflab.data.images.ImageSource`).
        remote_files: the files ``--download`` fetches, SHA-256 checked.
        digits: the digit classifier of :mod:`difflab.evaluation` scores its samples (FDD).
        reference_split: image sets: the split that samples are compared with by FID, KID and
            precision/recall (``"train"`` or ``"test"``).
    """

    name: str
    data: str
    shape: tuple[int, ...] | None
    sample: Callable[[int, torch.Generator | None], Tensor] | None = None
    source: ImageSource | None = None
    remote_files: tuple[RemoteFile, ...] = ()
    digits: bool = False
    reference_split: str = "train"

    @property
    def is_2d(self) -> bool:
        return self.data == "2-D"


def _sample_toy(name: str, n: int, generator: torch.Generator | None) -> Tensor:
    return sample_toy(name, n, generator=generator)  # type: ignore[arg-type]


DATASETS: dict[str, DataSet] = {
    **{name: DataSet(name, "2-D", (2,), sample=partial(_sample_toy, name)) for name in TOY_SOURCES},
    **{
        name: DataSet(
            name,
            "image",
            src.shape,
            source=src,
            remote_files=REMOTE_FILES.get(name, ()),
            digits=src.digits,
            reference_split=src.reference_split,
        )  # fmt: skip
        for name, src in IMAGE_SOURCES.items()
    },
}


def dataset(name: str) -> DataSet:
    """The entry named ``name``; a one-line error lists the valid names."""
    if name not in DATASETS:
        raise ValueError(f"unknown data.name {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]
