"""Real image datasets without torchvision: MNIST, Fashion-MNIST, CIFAR-10, image folders and
Hugging Face data sets.

Every dataset is held in memory as uint8 images (N, C, H, W) in an ``ImageDataset``, which hands
out float images in [-1, 1] (x = u / 127.5 - 1, the scaling of [Ho 2020, Sec. 3.3]).

File layout under ``data_dir`` (files may also sit directly in ``data_dir``; downloads go to
``data_dir/<name>/``, or to ``data_dir`` itself when its last component is already ``<name>``):
    mnist/          train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-... (or unzipped)
    fashion-mnist/  the same four IDX file names
    cifar10/        cifar-10-python.tar.gz or its extracted folder cifar-10-batches-py/
For ``"folder"``, ``data_dir`` is the image folder itself, searched recursively. For ``"hf"``,
``data_dir`` is ``hf:NAME[:SPLIT]`` (the Hugging Face hub) or a ``save_to_disk`` folder
(``DIR[:SPLIT]``), see :mod:`difflab.data.hf`. Folders and Hugging Face images pass one by one
through the same conversion, resize and centre crop. ``IMAGE_SOURCES`` is the table of data sets.

Files found on disk are checked for structure, not hashed (re-compressed copies are fine);
``download=True`` fetches missing files (``difflab.data.download.REMOTE_FILES``) and checks
their SHA-256.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .download import fetch
from .hf import open_hf_split

__all__ = [
    "IMAGE_DATASETS",
    "IMAGE_EXTENSIONS",
    "IMAGE_SOURCES",
    "ImageDataset",
    "ImageSource",
    "LoadRequest",
    "ImageDatasetName",
    "load_image_dataset",
    "read_cifar_batch",
    "read_idx",
    "to_uint8",
    "to_unit_range",
    "read_images",
    "read_npz",
]

# the names of IMAGE_SOURCES, for type checkers (tests/test_images_data.py keeps the two equal)
ImageDatasetName = Literal["mnist", "fashion-mnist", "cifar10", "folder", "hf"]
OnError = Literal["skip", "raise"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------- scaling
def to_unit_range(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1]: x = u / 127.5 - 1. Any shape."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_unit_range expects uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to [0, 255]. Any shape."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- IDX files
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the file starts with the gzip magic."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (raw or gzipped), the format of MNIST and Fashion-MNIST.

    Layout: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per
    dimension, then the data in row-major order. Returns a tensor of those dims.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}, expected "
            "00 00 <type code 08/09/0b/0c/0d/0e> <ndim >= 1>)"
        )
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = math.prod(dims)
    expected, found = count * dtype.itemsize, len(raw) - header
    if found < expected:
        raise ValueError(
            f"{path}: truncated IDX file, shape {dims} needs {expected} data bytes "
            f"but only {found} are present"
        )
    if found > expected:
        raise ValueError(
            f"{path}: {found - expected} unexpected bytes after IDX data of shape {dims}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return torch.from_numpy(data.astype(dtype.newbyteorder("=")))


# ----------------------------------------------------------------------------- CIFAR-10
def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch pickle may reference (numpy array reconstruction)."""
    reconstruct = np.empty(0).__reduce__()[0]
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x / 2.x spellings
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype/scalar constructors, nothing else."""

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            ) from None


def read_cifar_batch(data: bytes, origin: str = "<bytes>") -> tuple[Tensor, Tensor]:
    """Parse one CIFAR-10 python batch (a pickled dict) with a numpy-only unpickler.

    The dict holds ``data`` uint8 (n, 3072) (1024 red, 1024 green, 1024 blue values, each a
    row-major 32 x 32 plane) and ``labels`` (n ints in [0, 9]). Returns images uint8
    (n, 3, 32, 32) and labels int64 (n,). ``origin`` names the source in error messages.
    """
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{origin}: {err}") from None
    except Exception as err:  # any other failure means a malformed pickle
        raise ValueError(f"{origin}: not a readable CIFAR-10 batch ({err!r})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{origin}: expected a pickled dict, got {type(obj).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{origin}: CIFAR-10 batch without 'data' and 'labels' entries")
    pixels, labels = batch["data"], np.asarray(batch["labels"])
    n = len(labels)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != (n, 3072):
        raise ValueError(
            f"{origin}: 'data' must be uint8 of shape ({n}, 3072) for {n} labels, got "
            f"{getattr(pixels, 'dtype', type(pixels))} {getattr(pixels, 'shape', '')}"
        )
    images = torch.from_numpy(pixels.reshape(n, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64).reshape(n))


_CIFAR_DIR, _CIFAR_TAR = "cifar-10-batches-py", "cifar-10-python.tar.gz"


def _tar_member(tar: tarfile.TarFile, name: str) -> bytes | None:
    try:
        member = tar.extractfile(name)
    except KeyError:
        return None
    return None if member is None else member.read()


def _read_cifar(source: Path, train: bool) -> tuple[Tensor, Tensor]:
    """Read the train (data_batch_1..5) or test (test_batch) batches from a folder or tar.gz."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if source.is_dir():
        blobs = [(source / n).read_bytes() if (source / n).is_file() else None for n in names]
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                blobs = [_tar_member(tar, f"{_CIFAR_DIR}/{n}") for n in names]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{source}: corrupt or truncated CIFAR-10 archive ({err})") from err
    missing = [n for n, b in zip(names, blobs) if b is None]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {', '.join(missing)} missing in {source}")
    parts = [read_cifar_batch(b, f"{source}:{n}") for b, n in zip(blobs, names)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------- image folders
def _resize_center_crop_pil(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then crop the central size x size."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode_images(
    files: Iterable[tuple[str, str | Path | IO[bytes]]],
    *,
    channels: int,
    image_size: int | None,
    on_error: OnError,
    where: str,
) -> tuple[Tensor, list[int]]:
    """Decode (name, file) pairs one at a time: to L or RGB, then the shorter side resized to
    ``image_size`` and centre-cropped. Returns uint8 (N, C, H, W) and the positions of the
    images kept (unreadable ones are warned about and skipped, or raise with on_error="raise");
    ``where`` completes the message when nothing is readable."""
    arrays, kept, first, n_bad = [], [], None, 0
    for i, (name, file) in enumerate(files):
        try:
            with Image.open(file) as im:
                image = im.convert("L" if channels == 1 else "RGB")  # decodes all pixels
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if on_error == "raise":
                raise OSError(f"cannot read image {name}: {err}") from err
            # stacklevel 4: the caller of load_image_dataset (through a reader)
            warnings.warn(f"skipping unreadable image {name}: {err}", stacklevel=4)
            n_bad += 1
            continue
        if image_size is not None:
            image = _resize_center_crop_pil(image, image_size)
        array = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, channels)
        if first is None:
            first = (name, array.shape)
        elif array.shape != first[1]:
            raise ValueError(
                f"images differ in size ({first[1][:2]} for {first[0]}, "
                f"{array.shape[:2]} for {name}); pass image_size to resize them"
            )
        arrays.append(array)
        kept.append(i)
    if not arrays:
        skipped = f" ({n_bad} unreadable files skipped)" if n_bad else ""
        raise ValueError(f"no readable images {where}{skipped}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), kept


# ----------------------------------------------------------------------------- dataset
class ImageDataset(Dataset):
    """In-memory image dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), -1 if none.

    ``dataset[i]`` is (float image (C, H, W) in [-1, 1], int label); ``batch(indices)`` gathers
    a whole batch at once (the tensors may be moved to a GPU first). With ``hflip`` each image is
    mirrored left-right with probability 1/2, drawn from ``generator`` in ``batch`` and from the
    global torch RNG in ``dataset[i]`` (which DataLoader workers seed).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        num_classes: int | None = None,
        hflip: bool = False,
        class_names: tuple[str, ...] = (),
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        n = images.shape[0]
        labels = torch.full((n,), -1, dtype=torch.long) if labels is None else labels.long()
        if labels.shape != (n,) or bool((labels < -1).any()):
            raise ValueError(
                f"labels must be int64 of shape ({n},) with values >= -1, got "
                f"shape {tuple(labels.shape)}"
            )
        top = int(labels.max()) + 1 if n else 0
        num_classes = top if num_classes is None else num_classes
        if num_classes < top or (class_names and len(class_names) != num_classes):
            raise ValueError(
                f"num_classes={num_classes} and {len(class_names)} class_names do "
                f"not fit labels up to {top - 1}"
            )
        self.images, self.labels = images, labels
        self.num_classes, self.hflip, self.class_names = num_classes, hflip, tuple(class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, hflip={self.hflip})"
        )

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = to_unit_range(self.images[index])
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, int(self.labels[index])

    def batch(
        self, indices: Tensor | list[int], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) float32 in [-1, 1] and labels (B,) int64 for ``indices`` (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = to_unit_range(self.images[idx])
        if self.hflip:
            flip = (torch.rand(idx.shape[0], generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

    def random_batch(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``batch`` of ``batch_size`` indices drawn uniformly with replacement."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.batch(idx, generator)


def _convert(images: Tensor, channels: int | None, image_size: int | None) -> Tensor:
    """Change channel count (luma 0.299 R + 0.587 G + 0.114 B, or repetition) and resize the
    shorter side to ``image_size`` (antialiased bicubic) followed by a centre crop."""
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)
    h, w = images.shape[-2:]
    if image_size is None or (h == w == image_size):
        return images
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    out = []
    for chunk in images.split(2048):
        y = F.interpolate(chunk.float(), size=(nh, nw), mode="bicubic", antialias=True)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    return torch.cat(out)[..., top : top + image_size, left : left + image_size].contiguous()


# ----------------------------------------------------------------------------- sources
_CLASS_NAMES = {
    "mnist": tuple("0123456789"),
    "fashion-mnist": tuple(
        "T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag|Ankle boot".split("|")
    ),
    "cifar10": tuple("airplane automobile bird cat deer dog frog horse ship truck".split()),
}


def _missing_error(name: str, data_dir: Path, expected: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} files not found in {data_dir / name} or {data_dir}: expected "
        f"{', '.join(expected)}; point data_dir (--data-dir) at them or pass download=True "
        "(--download) to fetch them"
    )


def _download_dir(name: str, data_dir: Path) -> Path:
    """Where downloads go: data_dir/<name>, or data_dir itself when it is already named so."""
    return data_dir if data_dir.name == name else data_dir / name


def _load_idx_dataset(name: str, data_dir: Path, train: bool, download: bool):
    prefix = "train" if train else "t10k"
    wanted = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    found = []
    for fname in wanted:
        candidates = [d / f for d in (data_dir / name, data_dir) for f in (fname, fname[:-3])]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None and download:
            path = fetch(name, fname, _download_dir(name, data_dir))
        if path is None:
            raise _missing_error(name, data_dir, wanted)
        found.append(path)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.dtype != torch.uint8 or images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{found[0]}, {found[1]}: expected uint8 images (N, H, W) and labels "
            f"(N,), got {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{found[0]} has {images.shape[0]} images but {found[1]} has {labels.shape[0]} labels"
        )
    return images.unsqueeze(1), labels.long()


def _load_cifar(data_dir: Path, train: bool, download: bool):
    dirs = (data_dir / "cifar10", data_dir)
    batch_dirs = [d / _CIFAR_DIR for d in dirs] + [data_dir]
    source = next((d for d in batch_dirs if (d / "test_batch").is_file()), None)
    if source is None:
        source = next((d / _CIFAR_TAR for d in dirs if (d / _CIFAR_TAR).is_file()), None)
    if source is None and download:
        source = fetch("cifar10", _CIFAR_TAR, _download_dir("cifar10", data_dir))
    if source is None:
        raise _missing_error("cifar10", data_dir, [_CIFAR_TAR, f"or {_CIFAR_DIR}/"])
    return _read_cifar(source, train)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_image_dataset` was asked for, as handed to a source's reader."""

    data_dir: str  # a folder, or a source spec such as hf:NAME[:SPLIT]
    train: bool
    download: bool
    channels: int | None
    image_size: int | None
    on_error: OnError
    image_column: str | None


class SourceImages(NamedTuple):
    """What a reader returns: uint8 images (N, C, H, W), labels int64 (N,) or None (unlabelled),
    and the class names (empty when unnamed)."""

    images: Tensor
    labels: Tensor | None
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ImageSource:
    """One data set of the table: how it is read and what it defaults to."""

    read: Callable[[LoadRequest], SourceImages]
    hflip: bool  # random horizontal flips by default
    image_column: bool = False  # reads columns: the image_column option applies
    shape: tuple[int, int, int] | None = None  # (C, H, W) of its images; None: data.image_size
    digits: bool = False  # the digit classifier (difflab.evaluation) scores samples of it
    # the split samples are compared with (FID, KID, precision/recall), as in the literature
    reference_split: str = "train"


def _read_digits(name: str, req: LoadRequest) -> SourceImages:
    images, labels = _load_idx_dataset(name, Path(req.data_dir), req.train, req.download)
    return SourceImages(images, labels, _CLASS_NAMES[name])


def _read_cifar10(req: LoadRequest) -> SourceImages:
    images, labels = _load_cifar(Path(req.data_dir), req.train, req.download)
    return SourceImages(images, labels, _CLASS_NAMES["cifar10"])


def _read_image_folder(req: LoadRequest) -> SourceImages:
    root = Path(req.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (set data_dir / --data-dir)")
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    images, _ = _decode_images(
        ((str(p), p) for p in paths),
        channels=req.channels or 3,
        image_size=req.image_size,
        on_error=req.on_error,
        where=f"({', '.join(IMAGE_EXTENSIONS)}) under {root}",
    )
    return SourceImages(images, None, ())


def _read_hf(req: LoadRequest) -> SourceImages:
    split = open_hf_split(req.data_dir, train=req.train, image_column=req.image_column)
    images, kept = _decode_images(
        split.encoded_images(),
        channels=req.channels or 3,
        image_size=req.image_size,
        on_error=req.on_error,
        where=f"in column {split.image_column!r} of {split.origin}",
    )
    labels = split.labels()
    return SourceImages(images, None if labels is None else labels[kept], split.class_names)


IMAGE_SOURCES: dict[str, ImageSource] = {
    # the digit sets: scored on their 10k test images; CIFAR-10 on its 50k training images
    **{
        name: ImageSource(
            partial(_read_digits, name),
            hflip=False,
            shape=(1, 28, 28),
            digits=True,
            reference_split="test",
        )  # fmt: skip
        for name in ("mnist", "fashion-mnist")
    },
    "cifar10": ImageSource(_read_cifar10, hflip=True, shape=(3, 32, 32)),
    "folder": ImageSource(_read_image_folder, hflip=True),
    "hf": ImageSource(_read_hf, hflip=True, image_column=True),
}
IMAGE_DATASETS: tuple[str, ...] = tuple(IMAGE_SOURCES)


def read_npz(path: str | Path, choices: list[tuple[str, ...]], what: str) -> dict[str, np.ndarray]:
    """The arrays of the first key tuple of ``choices`` that the .npz ``path`` holds whole; a
    one-line ``ValueError`` for an unreadable file or one without them (``what`` names them)."""
    try:
        with np.load(path) as data:
            for keys in choices:
                if all(k in data for k in keys):
                    return {k: data[k] for k in keys}
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    raise ValueError(f"{path} has no {what}")


def read_images(path: str | Path, *, channels: int) -> Tensor:
    """Images given by a user, as float (N, C, H, W) in [-1, 1]: one image file, a folder of
    image files (sorted by path, read as an image folder data set, all of one size), or an
    .npz whose ``images`` (or ``samples``, as ``difflab sample`` writes) array holds uint8 in
    [0, 255] or floats in [-1, 1], shaped (N, C, H, W) or (N, H, W)."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        ((key, array),) = read_npz(
            path, [("images",), ("samples",)], "'images' or 'samples' array"
        ).items()
        x = torch.from_numpy(array[:, None] if array.ndim == 3 else array)
        if x.ndim != 4:
            raise ValueError(f"{path}: '{key}' must be (N, C, H, W), got {tuple(array.shape)}")
        x = to_unit_range(x) if x.dtype == torch.uint8 else x.float()
        if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 1.0 + 1e-6:
            raise ValueError(f"{path}: float images must be finite and in [-1, 1]")
        return x
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        files = [path]
    else:
        raise ValueError(
            f"{path} is not an image file ({', '.join(IMAGE_EXTENSIONS)}), a folder of them, "
            "or an .npz"
        )
    images, _ = _decode_images(
        ((str(p), p) for p in files), channels=channels, image_size=None, on_error="raise",
        where=f"({', '.join(IMAGE_EXTENSIONS)}) under {path}",
    )  # fmt: skip
    return to_unit_range(images)


def load_image_dataset(
    name: ImageDatasetName,
    *,
    data_dir: str | Path,
    train: bool = True,
    download: bool = False,
    image_size: int | None = None,
    channels: Literal[1, 3] | None = None,
    on_error: OnError = "skip",
    hflip: bool | None = None,
    image_column: str | None = None,
) -> ImageDataset:
    """Load a dataset into memory as an ``ImageDataset`` with images in [-1, 1].

    name: "mnist" / "fashion-mnist" (1 x 28 x 28, 10 classes, no flips by default), "cifar10"
    (3 x 32 x 32, 10 classes, flips), "folder" (every .png/.jpg/.jpeg/.bmp/.webp under data_dir,
    unlabelled, flips, RGB unless channels=1; unreadable files are warned about and skipped, or
    abort with on_error="raise"), "hf" (a Hugging Face data set: data_dir is hf:NAME[:SPLIT] or
    a save_to_disk folder; images as for folders, labels from its first ClassLabel column; see
    :mod:`difflab.data.hf`). ``train`` picks the split (ignored for folders).
    image_size: resize the shorter side and centre-crop; channels: convert to 1 or 3 channels;
    hflip: override the random horizontal flip default; image_column: the image column of an
    "hf" data set (default: its first Image feature).
    """
    if name not in IMAGE_SOURCES:
        raise ValueError(
            f"unknown image dataset {name!r}; valid options: {', '.join(IMAGE_DATASETS)}"
        )
    if on_error not in get_args(OnError):
        raise ValueError(f"unknown on_error {on_error!r}; valid options: skip, raise")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    source = IMAGE_SOURCES[name]
    if image_column is not None and not source.image_column:
        readers = ", ".join(k for k, v in IMAGE_SOURCES.items() if v.image_column)
        raise ValueError(f"image_column={image_column!r} applies to {readers} data, not {name!r}")
    req = LoadRequest(str(data_dir), train, download, channels, image_size, on_error, image_column)
    images, labels, names = source.read(req)
    images = _convert(images, channels, image_size)
    return ImageDataset(
        images,
        labels,
        num_classes=len(names) or None,
        hflip=source.hflip if hflip is None else hflip,
        class_names=names,
    )
