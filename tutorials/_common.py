"""Small helpers shared by the tutorials: fast mode, output folder, figures, data folder.

* ``DIFFLAB_FAST=1``           small sizes, so that every tutorial runs in a few seconds;
* ``DIFFLAB_TUTORIAL_OUT=DIR`` where figures are written (default ``tutorials/_out/``);
* ``DIFFLAB_ANSWERS=1``        also run the answers to the exercises at the end of each tutorial;
* ``DIFFLAB_DATA_DIR=DIR`` or ``--data-dir DIR`` on the command line: a folder with real data
  (e.g. ``DIR/mnist``), used in full mode only. ``../shared/data`` next to the repository is
  looked at too.

Everything is read at call time, so a process may run several tutorials with different settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def is_fast() -> bool:
    """True when ``DIFFLAB_FAST`` is set to something other than "", "0" or "false"."""
    return os.environ.get("DIFFLAB_FAST", "").strip().lower() not in ("", "0", "false", "no")


def pick(fast: Any, full: Any) -> Any:
    """``fast`` in fast mode, ``full`` otherwise."""
    return fast if is_fast() else full


def out_dir() -> Path:
    """The folder figures go to (created if missing)."""
    path = Path(os.environ.get("DIFFLAB_TUTORIAL_OUT") or _HERE / "_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def out_path(name: str) -> Path:
    """``out_dir() / name``."""
    return out_dir() / name


def data_dir() -> Path | None:
    """A real-data folder from ``--data-dir``, ``DIFFLAB_DATA_DIR`` or ``../shared/data``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-dir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    for candidate in (args.data_dir, os.environ.get("DIFFLAB_DATA_DIR")):
        if candidate:
            return Path(candidate)
    shared = _HERE.parent.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (5.0, 4.0)):
    """A matplotlib Figure on the Agg canvas (no pyplot, no window) and its 2-D axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def grid_panels(panels: list, name: str, figsize: tuple[float, float], *, nrow: int = 8) -> None:
    """One row of image grids, one per ``(images (B, 1, H, W) in [-1, 1], title)``, saved
    as ``name`` (see :func:`save`)."""
    from difflab.viz import make_grid

    fig, axes = new_figure(1, len(panels), figsize)
    for ax, (images, title) in zip(axes[0], panels):
        ax.imshow(make_grid(images, nrow=nrow)[:, :, 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    save(fig, name)


def save(fig: Any, name: str, dpi: int = 110) -> None:
    """Save a Figure as ``out_dir() / name``, print where it went and, in a notebook, show it.

    In a notebook the saved PNG itself is displayed (``IPython.display.Image``), so the figure
    appears inline without a matplotlib backend; nothing is returned, so a ``save(...)`` at the
    end of a cell leaves no ``Out:`` line.
    """
    path = out_path(name)
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
    if _in_ipython():
        from IPython.display import Image, display

        display(Image(filename=str(path)))


def answers_wanted() -> bool:
    """True when ``DIFFLAB_ANSWERS`` is set (not "", "0", "false" or "no"): run the answer cells
    of the "Try this" exercises (the test suite sets it)."""
    return os.environ.get("DIFFLAB_ANSWERS", "").strip().lower() not in ("", "0", "false", "no")


def gauss_hermite(dim: int, k: int = 3):
    """Nodes (k**dim, dim) and weights (k**dim,), float64, with E f(z) = sum_i w_i f(z_i) for
    z ~ N(0, I_dim), exact when f is a polynomial of degree <= 2k - 1 in each coordinate
    (probabilists' Gauss-Hermite rule, tensor product over the coordinates)."""
    import numpy as np
    import torch

    nodes_1d, weights_1d = np.polynomial.hermite_e.hermegauss(k)
    nodes = torch.cartesian_prod(*[torch.tensor(nodes_1d, dtype=torch.float64)] * dim)
    w = torch.tensor(weights_1d / np.sqrt(2 * np.pi), dtype=torch.float64)
    weights = torch.cartesian_prod(*[w] * dim)
    return nodes.reshape(-1, dim), weights.reshape(-1, dim).prod(1)


def all_combinations(ts, a, b):
    """Every (t, a_j, b_k): ts (n_t,), a (n_a, D), b (n_b, D) -> rows (n_t * n_a * n_b,),
    (n_t * n_a * n_b, D) twice, ordered with t slowest and b fastest."""
    n_t, (n_a, dim), n_b = ts.shape[0], a.shape, b.shape[0]
    t_rows = ts[:, None, None].expand(n_t, n_a, n_b).reshape(-1)
    a_rows = a[None, :, None, :].expand(n_t, n_a, n_b, dim).reshape(-1, dim)
    b_rows = b[None, None, :, :].expand(n_t, n_a, n_b, dim).reshape(-1, dim)
    return t_rows, a_rows, b_rows


def use_threads(n: int) -> int:
    """Set torch's intra-op threads to ``n`` and return the previous number (to restore it).

    The 2-D tutorials multiply tiny matrices, which run fastest on one thread: several threads
    only wait for each other, and slow down badly when the cores are busy.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


# seven-segment layout: segment -> end points in a unit box (x right, y down)
_SEGMENTS = {
    "a": ((0.0, 0.0), (1.0, 0.0)),
    "b": ((1.0, 0.0), (1.0, 0.5)),
    "c": ((1.0, 0.5), (1.0, 1.0)),
    "d": ((0.0, 1.0), (1.0, 1.0)),
    "e": ((0.0, 0.5), (0.0, 1.0)),
    "f": ((0.0, 0.0), (0.0, 0.5)),
    "g": ((0.0, 0.5), (1.0, 0.5)),
}
_DIGITS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


def digit_like_images(n: int, size: int = 16, *, generator=None):
    """n seven-segment digits with random size, slant, offset and stroke width, as images.

    Returns (images (n, 1, size, size) float32 in [-1, 1], labels (n,) int64): a stand-in for
    MNIST that needs no download. Strokes are soft (a sigmoid of the distance to the segment),
    so the images are smooth like scanned digits.
    """
    import torch

    labels = torch.randint(0, 10, (n,), generator=generator)
    u = torch.rand(n, 6, generator=generator)
    width, height = 0.30 + 0.15 * u[:, 0], 0.55 + 0.15 * u[:, 1]  # box, in units of the image
    cx, cy = 0.5 + 0.08 * (u[:, 2] - 0.5), 0.5 + 0.08 * (u[:, 3] - 0.5)
    slant, stroke = 0.35 * (u[:, 4] - 0.5), 0.05 + 0.04 * u[:, 5]
    ends = torch.tensor([_SEGMENTS[k] for k in "abcdefg"])  # (7, 2 ends, 2 coordinates)
    on = torch.tensor([[k in _DIGITS[d] for k in "abcdefg"] for d in range(10)])[labels]
    # segment end points in image coordinates, (n, 7, 2, 2)
    y = cy[:, None, None] + (ends[None, :, :, 1] - 0.5) * height[:, None, None]
    x = cx[:, None, None] + (ends[None, :, :, 0] - 0.5) * width[:, None, None]
    x = x - slant[:, None, None] * (y - cy[:, None, None])
    p0, p1 = torch.stack([x[..., 0], y[..., 0]], -1), torch.stack([x[..., 1], y[..., 1]], -1)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    pix = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)  # (P, 2)
    seg = (p1 - p0)[:, :, None, :]  # (n, 7, 1, 2)
    rel = pix[None, None] - p0[:, :, None, :]  # (n, 7, P, 2)
    along = ((rel * seg).sum(-1) / (seg**2).sum(-1)).clamp(0, 1)
    dist = (rel - along[..., None] * seg).norm(dim=-1)  # distance to each segment
    dist = torch.where(on[:, :, None], dist, torch.full_like(dist, 10.0)).amin(1)  # (n, P)
    ink = torch.sigmoid((stroke[:, None] - dist) * (4.0 * size))
    return (2 * ink - 1).reshape(n, 1, size, size), labels


def load_digits(n_val: int, *, generator=None):
    """Training and held-out digit images (N, 1, H, W) in [-1, 1], and where they came from.

    Full mode: MNIST (28 x 28) when :func:`data_dir` finds it: all training images in a random
    order and ``n_val`` test images drawn at random (``generator``). MNIST's files are not in a
    random order: the test set's first 5,000 images come from NIST's training set and are
    cleaner than its last 5,000. On :func:`pca_frechet` fitted on the first 1,024 test images
    the last 1,000 test images score 16.2 and the first 1,000 training images 11.8, against
    5.1 for 1,000 training images drawn at random: ``data[:n]`` and the first test images
    would be no fair sample or reference. Fast mode, or no MNIST: seven-segment digits
    (:func:`digit_like_images`) of 16 x 16 (fast) or 28 x 28 pixels.
    """
    import torch

    from difflab.data.images import load_image_dataset

    folder = None if is_fast() else data_dir()
    if folder is not None:
        try:
            train = load_image_dataset("mnist", data_dir=folder, train=True)
            test = load_image_dataset("mnist", data_dir=folder, train=False)
            order = torch.randperm(len(train), generator=generator)
            held_out = torch.randperm(len(test), generator=generator)[:n_val]
            return train.batch(order)[0], test.batch(held_out)[0], "MNIST"
        except (FileNotFoundError, ValueError):
            pass
    size = pick(16, 28)
    images = digit_like_images(pick(2000, 20_000) + n_val, size, generator=generator)[0]
    return images[n_val:], images[:n_val], "seven-segment digits"


def _in_ipython() -> bool:
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def pca_frechet(reference, k: int = 16):
    """A Frechet distance in the top-``k`` principal components of ``reference`` images.

    Returns ``distance(images) -> float``: the squared Frechet distance [Heusel 2017] between
    Gaussians fitted to the ``k`` PCA coordinates of ``images`` (N, C, H, W) and of
    ``reference``, the components fitted on ``reference`` itself. A cheap stand-in for FID / FDD
    on small grey images, for comparing models on the same reference (its value has no meaning
    across references or ``k``); N should be several times ``k``.
    """
    import torch

    from difflab.metrics import feature_statistics, frechet_distance

    flat = reference.flatten(1).double()
    centre = flat.mean(0)
    basis = torch.linalg.svd(flat - centre, full_matrices=False)[2][:k].T  # (D, k)
    ref_stats = feature_statistics((flat - centre) @ basis)

    def distance(images) -> float:
        feats = (images.flatten(1).double() - centre) @ basis
        return frechet_distance(*feature_statistics(feats), *ref_stats)

    return distance
