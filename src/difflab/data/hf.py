"""Hugging Face ``datasets`` as an image source: a data set on the hub or a ``save_to_disk`` folder.

The source is the ``data_dir`` of data set ``"hf"`` (``--data-dir`` on the command line):

    hf:NAME[:SPLIT]   ``datasets.load_dataset(NAME)`` from the Hugging Face hub (needs internet;
                      datasets keeps its own cache), e.g. hf:huggan/smithsonian_butterflies_subset
    DIR[:SPLIT]       a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
                      (``datasets.load_from_disk``; works offline)

Without SPLIT a ``DatasetDict`` gives "train" for training and, for held-out data
(``train=False``), "test", else "validation", else "train"; a dict with one split gives that one.

The image column is the first ``datasets.Image`` feature, or the one named by ``image_column``
(``data.image_column``); the labels are the first ``datasets.ClassLabel`` column, with its class
names, when there is one (else the data set is unlabelled). Images flip left-right at random by
default, as folders (``data.hflip=false`` for digits or text). The images are handed out undecoded
(encoded bytes or a file path per row) so that :mod:`difflab.data.images` decodes, converts,
resizes and crops them exactly like the files of an image folder.

``datasets`` is an optional dependency (``pip install 'difflab[hf]'``), imported only when a
source is opened.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HF_PREFIX",
    "HFSource",
    "HFSplit",
    "open_hf_split",
    "parse_hf_source",
    "resolve_data_dir",
]

HF_PREFIX = "hf:"
_BATCH = 256  # rows read from the Arrow table at a time


class HFSource(NamedTuple):
    """A parsed source: a hub name or a local folder, and the split asked for (or None)."""

    hub: bool
    location: str
    split: str | None

    def __str__(self) -> str:
        where = f"{HF_PREFIX}{self.location}" if self.hub else self.location
        return where if self.split is None else f"{where}:{self.split}"


def parse_hf_source(source: str) -> HFSource:
    """``hf:NAME[:SPLIT]`` or ``DIR[:SPLIT]`` (an existing folder) as an :class:`HFSource`.

    A folder that exists is taken whole, so a folder name may contain a colon.
    """
    if source.startswith(HF_PREFIX):
        parts = source[len(HF_PREFIX) :].split(":")
        if len(parts) > 2 or not all(parts):
            raise ValueError(
                f"Hugging Face source {source!r} must look like hf:NAME or hf:NAME:SPLIT"
            )
        return HFSource(True, parts[0], parts[1] if len(parts) == 2 else None)
    if Path(source).is_dir():
        return HFSource(False, source, None)
    head, _, split = source.rpartition(":")
    if head and split and Path(head).is_dir():
        return HFSource(False, head, split)
    raise FileNotFoundError(
        f"Hugging Face data set folder {source} does not exist; give a folder written by "
        "save_to_disk (optionally DIR:SPLIT) or hf:NAME[:SPLIT] for the hub (--data-dir)"
    )


def resolve_data_dir(data_dir: str) -> str:
    """A data location as a run stores it: a hub source (hf:NAME[:SPLIT]) unchanged, a folder
    made absolute so that the run resumes from any working directory."""
    return data_dir if data_dir.startswith(HF_PREFIX) else str(Path(data_dir).resolve())


def _import_datasets() -> Any:
    try:
        import datasets  # optional dependency: imported only when an hf source is opened
    except ImportError:
        raise ValueError(
            "the hf data source needs the datasets package: pip install 'difflab[hf]'"
        ) from None
    return datasets


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _load(src: HFSource, datasets: Any) -> Any:
    """The ``Dataset`` or ``DatasetDict`` of a source, errors in one line."""
    if src.hub:
        try:
            return datasets.load_dataset(src.location, split=src.split)
        except Exception as err:  # the hub client raises many types (network, auth, not found)
            raise ValueError(
                f"cannot load Hugging Face data set {src}: {_first_line(err)}"
            ) from err
    try:
        return datasets.load_from_disk(src.location)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{src.location}: not a data set written by save_to_disk ({_first_line(err)})"
        ) from err


def _choose_split(data: Any, src: HFSource, train: bool, datasets: Any) -> tuple[Any, str]:
    """The split's ``Dataset`` and a name for it in messages."""
    if not isinstance(data, datasets.DatasetDict):
        if src.split is not None and not src.hub:
            raise ValueError(
                f"{src.location} holds one data set without splits; drop ':{src.split}'"
            )
        return data, str(src)
    splits = list(data)
    if src.split is not None:
        if src.split not in splits:
            raise ValueError(f"{src} names no split of the data set; splits: {', '.join(splits)}")
        return data[src.split], str(src)
    preferred = ("train",) if train else ("test", "validation", "train")
    name = next((s for s in preferred if s in splits), splits[0] if len(splits) == 1 else None)
    if name is None:
        raise ValueError(
            f"{src} has splits {', '.join(splits)} and none named {preferred[0]!r}; "
            f"choose one as {src}:SPLIT"
        )
    return data[name], f"{src}:{name}"


def _columns(features: Any) -> str:
    return ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items()) or "none"


def _image_column(features: Any, named: str | None, origin: str, datasets: Any) -> str:
    if named is None:
        found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        if not found:
            raise ValueError(
                f"{origin} has no image column (a datasets.Image feature); its columns: "
                f"{_columns(features)}"
            )
        return found[0]
    if named not in features:
        raise ValueError(
            f"{origin} has no column {named!r} (data.image_column); its columns: "
            f"{_columns(features)}"
        )
    if not isinstance(features[named], datasets.Image):
        raise ValueError(
            f"column {named!r} of {origin} is a {type(features[named]).__name__}, "
            "not a datasets.Image feature"
        )
    return named


@dataclass
class HFSplit:
    """One split of a Hugging Face data set: its image column read undecoded, and its labels."""

    origin: str  # names the split in messages: hf:NAME:SPLIT or DIR:SPLIT
    image_column: str
    label_column: str | None  # the first ClassLabel column, if any
    class_names: tuple[str, ...]  # that column's names
    dataset: Any  # the datasets.Dataset, image column cast to Image(decode=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def encoded_images(self) -> Iterator[tuple[str, IO[bytes] | str]]:
        """(name of the row, its encoded image as a file object or a path) for every row."""
        i = 0
        for batch in self.dataset.iter(batch_size=_BATCH):
            for value in batch[self.image_column]:
                data = (value or {}).get("bytes")
                path = (value or {}).get("path")
                name = f"{self.origin} row {i}"
                # a row with neither is unreadable: empty bytes fail to decode like a bad file
                yield name, io.BytesIO(data) if data is not None or not path else path
                i += 1

    def labels(self) -> Tensor | None:
        """int64 (N,) class indices (-1 where missing), or None for an unlabelled data set."""
        if self.label_column is None:
            return None
        values = [-1 if v is None else int(v) for v in self.dataset[self.label_column]]
        return torch.tensor(values, dtype=torch.long).reshape(len(values))


def open_hf_split(source: str, *, train: bool = True, image_column: str | None = None) -> HFSplit:
    """Open one split of a Hugging Face data set (see the module docstring for ``source``)."""
    src = parse_hf_source(source)
    datasets = _import_datasets()
    ds, origin = _choose_split(_load(src, datasets), src, train, datasets)
    features = ds.features
    column = _image_column(features, image_column, origin, datasets)
    label = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    names = tuple(features[label].names) if label is not None else ()
    keep = [column] if label is None else [column, label]
    undecoded = ds.select_columns(keep).cast_column(column, datasets.Image(decode=False))
    return HFSplit(origin, column, label, names, undecoded)
