"""Figures: image grids, denoising GIFs, forward-process strips, 2-D scatters, loss and schedules.

Every function takes tensors or arrays, never other difflab objects. Figures are drawn on
matplotlib's Agg canvas directly (no pyplot: no windows, no global backend switch, safe in
notebooks and headless jobs); PNG and GIF files are written with Pillow or ``Figure.savefig``.
Plot functions return the ``Figure`` (shown inline by Jupyter) and save it when given a path.

Images are float arrays in [-1, 1] of shape (B, C, H, W) with C = 1 or 3; 2-D points are (n, 2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difflab._util import F64
from difflab.safe_io import atomic_output

ArrayLike = torch.Tensor | np.ndarray
Lim = float | tuple[float, float] | None


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", F64).numpy()
    return np.asarray(x, dtype=np.float64)


def _prepare_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def to_uint8(x: ArrayLike) -> np.ndarray:
    """Map [-1, 1] to {0, ..., 255}: round((x + 1) / 2 * 255), clipped; NaN becomes 0."""
    x = np.nan_to_num(_numpy(x), nan=-1.0)
    return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- image grids
def make_grid(
    images: ArrayLike, *, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """Tile images (B, C, H, W) in [-1, 1] into one uint8 image (H', W', C), C = 1 or 3.

    ``nrow`` images per row (default ceil(sqrt(B))), ``padding`` pixels of ``pad_value`` (in the
    same [-1, 1] scale; 1.0 is white) around and between the tiles, filled row by row.
    """
    x = _numpy(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must have shape (B, C, H, W), B >= 1, C in (1, 3); got {x.shape}")
    b, c, h, w = x.shape
    nrow = math.ceil(math.sqrt(b)) if nrow is None else nrow
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    ncols, nrows = min(nrow, b), math.ceil(b / min(nrow, b))
    grid = np.full(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
        to_uint8(np.float64(pad_value)),
        dtype=np.uint8,
    )
    tiles = to_uint8(x).transpose(0, 2, 3, 1)  # (B, H, W, C)
    for i in range(b):
        r, col = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    if type(scale) is not int or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image


def _pil(image: np.ndarray) -> Image.Image:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(image))  # (H, W) -> "L", (H, W, 3) -> "RGB"


def save_image_grid(
    images: ArrayLike,
    path: str | os.PathLike,
    *,
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 2,
) -> Path:
    """Save :func:`make_grid` of ``images`` as a PNG, upsampled ``scale`` times (nearest)."""
    grid = _upscale(make_grid(images, nrow=nrow, padding=padding), scale)
    path = _prepare_path(path)
    with atomic_output(path) as tmp:
        _pil(grid).save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------- GIFs
def save_gif(
    frames: Sequence[np.ndarray],
    path: str | os.PathLike,
    *,
    duration_ms: int = 80,
    final_hold_ms: int = 1000,
) -> Path:
    """Save uint8 frames, all (H, W) or all (H, W, 3), as a looping GIF.

    Each frame shows for ``duration_ms``, the last one for ``final_hold_ms``. Consecutive
    identical frames are merged by the encoder (their durations add up).
    """
    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame")
    arrays = [np.asarray(f) for f in frames]
    shape = arrays[0].shape
    for i, f in enumerate(arrays):
        if f.dtype != np.uint8 or f.shape != shape:
            raise ValueError(
                f"frame {i} has dtype {f.dtype} and shape {f.shape}; "
                f"all frames must be uint8 with the shape of frame 0, {shape}"
            )
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))):
        raise ValueError(f"frames must be (H, W) or (H, W, 3), got {shape}")
    if duration_ms <= 0 or final_hold_ms <= 0:
        raise ValueError("duration_ms and final_hold_ms must be positive")
    images = [_pil(f) for f in arrays]
    path = _prepare_path(path)
    with atomic_output(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=[duration_ms] * (len(images) - 1) + [final_hold_ms],
            loop=0,
        )
    return path


def _subsample(n: int, max_frames: int | None) -> list[int]:
    """At most ``max_frames`` evenly spaced indices of range(n), always the first and the last."""
    if max_frames is None or n <= max_frames:
        return list(range(n))
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def image_trajectory_gif(
    xs: Sequence[ArrayLike],
    path: str | os.PathLike,
    *,
    nrow: int | None = None,
    scale: int = 1,
    duration_ms: int = 80,
    final_hold_ms: int = 1000,
    max_frames: int | None = 100,
) -> Path:
    """Denoising animation: one image grid per trajectory state x_t (B, C, H, W), noise to data.

    Long trajectories are thinned to ``max_frames`` evenly spaced states (first and last kept).
    """
    if len(xs) == 0:
        raise ValueError("image_trajectory_gif needs at least one state")
    frames = [_upscale(make_grid(xs[i], nrow=nrow), scale) for i in _subsample(len(xs), max_frames)]
    return save_gif(frames, path, duration_ms=duration_ms, final_hold_ms=final_hold_ms)


# ----------------------------------------------------------------------------- matplotlib figures
def _figure(nrows: int, ncols: int, figsize: tuple[float, float], *, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig: Any, path: str | os.PathLike | None, dpi: int = 100) -> None:
    """Write a matplotlib figure to ``path`` (format from the suffix) by an atomic rename."""
    if path is not None:
        path = _prepare_path(path)
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")


def _points(x: ArrayLike) -> np.ndarray:
    pts = _numpy(x)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {pts.shape}")
    return pts


def _auto_lim(point_sets: Sequence[np.ndarray]) -> float:
    finite = [np.abs(p[np.isfinite(p)]) for p in point_sets]
    top = max((float(f.max()) for f in finite if f.size), default=1.0)
    return 1.05 * top if top > 0 else 1.0


def _style(ax: Any, lim: Lim, title: str | None) -> None:
    if lim is not None:
        lo, hi = (-lim, lim) if np.isscalar(lim) else lim
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    if title is not None:
        ax.set_title(title, fontsize=10)


def scatter(
    x: ArrayLike,
    path: str | os.PathLike | None = None,
    *,
    ax: Any = None,
    title: str | None = None,
    lim: Lim = None,
    s: float = 2.0,
    color: str | None = None,
) -> Any:
    """Scatter plot of 2-D points (n, 2) into ``ax`` (or a new figure); saved when ``path``.

    ``lim``: half-width of a square window (or ``(lo, hi)``). Returns the Axes.
    """
    pts = _points(x)
    if ax is None:
        _, axes = _figure(1, 1, (4, 4), layout="constrained")
        ax = axes[0, 0]
    ax.scatter(pts[:, 0], pts[:, 1], s=s, alpha=0.6, linewidths=0, color=color)
    _style(ax, lim, title)
    save_figure(ax.figure, path)
    return ax


def scatter_grid(
    rows: Sequence[Sequence[ArrayLike]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    lim: Lim = None,
    s: float = 2.0,
) -> Any:
    """A grid of scatter plots, e.g. forward (top) and reverse (bottom) trajectories at
    t = 0, T/2, T as in Fig. 1 of [Sohl-Dickstein 2015]. All panels share ``lim`` (default: fit
    all points). Returns the Figure."""
    if len(rows) != len(row_labels) or any(len(r) != len(col_labels) for r in rows):
        raise ValueError(
            f"rows must be {len(row_labels)} (row_labels) lists of {len(col_labels)} (col_labels) "
            f"point sets, got {[len(r) for r in rows]}"
        )
    pts = [[_points(x) for x in row] for row in rows]
    lim = _auto_lim([p for row in pts for p in row]) if lim is None else lim
    figsize = (3 * len(col_labels), 3 * len(rows))
    fig, axes = _figure(len(rows), len(col_labels), figsize, layout="constrained")
    for i, row in enumerate(pts):
        for j, p in enumerate(row):
            scatter(p, ax=axes[i, j], lim=lim, s=s, title=col_labels[j] if i == 0 else None)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=10)
    save_figure(fig, path)
    return fig


def _canvas_rgb(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


def scatter_trajectory_gif(
    xs: Sequence[ArrayLike],
    path: str | os.PathLike,
    *,
    lim: Lim = None,
    titles: Sequence[str] | None = None,
    s: float = 2.0,
    duration_ms: int = 80,
    final_hold_ms: int = 1000,
    max_frames: int | None = 100,
) -> Path:
    """Animate 2-D points along a trajectory (list of (n, 2)), one frame per state, fixed axes."""
    if len(xs) == 0:
        raise ValueError("scatter_trajectory_gif needs at least one state")
    if titles is not None and len(titles) != len(xs):
        raise ValueError(f"got {len(titles)} titles for {len(xs)} states")
    keep = _subsample(len(xs), max_frames)
    pts = [_points(xs[i]) for i in keep]
    lim = _auto_lim(pts) if lim is None else lim
    fig, axes = _figure(1, 1, (4, 4))
    fig.subplots_adjust(left=0.1, right=0.95, bottom=0.08, top=0.9)  # fixed: no jitter
    ax = axes[0, 0]
    dots = ax.scatter(pts[0][:, 0], pts[0][:, 1], s=s, alpha=0.6, linewidths=0)
    _style(ax, lim, None)
    frames = []
    for k, p in zip(keep, pts):
        dots.set_offsets(p)
        if titles is not None:
            ax.set_title(titles[k], fontsize=10)
        frames.append(_canvas_rgb(fig))
    return save_gif(frames, path, duration_ms=duration_ms, final_hold_ms=final_hold_ms)


def _infinite_note(t: np.ndarray, y: np.ndarray) -> str:
    """Legend note for infinite values, which are not drawn: e.g. ' (+inf at t=0)'."""
    notes = []
    for sign, mask in (("+", np.isposinf(y)), ("-", np.isneginf(y))):
        if mask.any():
            where = ", ".join(f"{v:g}" for v in t[mask][:2]) + (", ..." if mask.sum() > 2 else "")
            notes.append(f"{sign}inf at t={where}")
    return f" ({'; '.join(notes)})" if notes else ""


def plot_schedules(
    curves: Mapping[str, Mapping[str, ArrayLike]], path: str | os.PathLike | None = None
) -> Any:
    """Compare noise schedules: beta_t, alpha-bar_t and log-SNR lambda_t against t.

    ``curves[name]`` holds "t" and any of "beta", "alpha_bar", "logsnr" (1-D, same length).
    Infinite log-SNR values (lambda = +inf at t = 0 for some schedules) are left out of the
    line and named in the legend. beta_t is drawn on a log axis. Returns the Figure.
    """
    panels = (
        ("beta", r"$\beta_t$", "log"),
        ("alpha_bar", r"$\bar\alpha_t$", "linear"),
        ("logsnr", r"log-SNR $\lambda_t = \log(\bar\alpha_t / (1 - \bar\alpha_t))$", "linear"),
    )
    fig, axes = _figure(1, 3, (13, 3.8), layout="constrained")
    for i, (name, curve) in enumerate(curves.items()):
        if "t" not in curve:
            raise ValueError(f"curves[{name!r}] needs a 't' entry, got keys {sorted(curve)}")
        t = _numpy(curve["t"]).reshape(-1)
        for ax, (key, label, yscale) in zip(axes[0], panels):
            if key not in curve:
                continue
            y = _numpy(curve[key]).reshape(-1)
            if y.shape != t.shape:
                raise ValueError(f"curves[{name!r}][{key!r}] has {y.size} values, 't' has {t.size}")
            note = _infinite_note(t, y)
            y = np.where(np.isfinite(y), y, np.nan)
            if yscale == "log":
                y = np.where(y > 0, y, np.nan)
            ax.plot(t, y, color=f"C{i}", lw=1.5, label=name + note)
            ax.set_yscale(yscale)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("t")
    for ax in axes[0]:
        if ax.lines:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    save_figure(fig, path)
    return fig


def ema_smooth(values: ArrayLike, smooth: float) -> np.ndarray:
    """Bias-corrected exponential moving average: m_k / (1 - smooth^k) with
    m_k = smooth * m_{k-1} + (1 - smooth) * v_k; non-finite values are skipped (NaN out until
    the first finite value)."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    v = _numpy(values).reshape(-1)
    out = np.full_like(v, np.nan)
    m = weight = 0.0
    for k, value in enumerate(v):
        if np.isfinite(value):
            m = smooth * m + (1.0 - smooth) * value
            weight = smooth * weight + (1.0 - smooth)
        if weight > 0:
            out[k] = m / weight
    return out


def plot_loss_curve(
    steps: ArrayLike,
    losses: ArrayLike,
    path: str | os.PathLike | None = None,
    *,
    smooth: float = 0.98,
    logy: bool = True,
) -> Any:
    """Training loss against step: raw values (faint) and their :func:`ema_smooth`.

    The y axis is logarithmic when ``logy`` and all finite losses are positive. Returns the Figure.
    """
    x, y = _numpy(steps).reshape(-1), _numpy(losses).reshape(-1)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"steps and losses must be non-empty and equally long: {x.size}, {y.size}")
    fig, axes = _figure(1, 1, (6, 3.6), layout="constrained")
    ax = axes[0, 0]
    ax.plot(x, y, lw=0.8, alpha=0.35, color="C0", label="loss")
    ax.plot(x, ema_smooth(y, smooth), lw=1.6, color="C1", label=f"EMA (smooth={smooth:g})")
    finite = y[np.isfinite(y)]
    if logy and finite.size and (finite > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return fig


def forward_strip(
    images: Sequence[ArrayLike], labels: Sequence[str], path: str | os.PathLike | None = None
) -> Any:
    """A row of images (C, H, W) in [-1, 1] with a caption each, e.g. x_t of the forward process
    q(x_t | x_0) at increasing t. Returns the Figure."""
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"need one label per image, got {len(images)} images, {len(labels)} labels"
        )
    fig, axes = _figure(1, len(images), (1.7 * len(images), 2.0), layout="constrained")
    for ax, image, label in zip(axes[0], images, labels):
        x = _numpy(image)
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"each image must be (C, H, W) with C in (1, 3), got {x.shape}")
        pixels = to_uint8(x).transpose(1, 2, 0)
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    save_figure(fig, path, dpi=120)
    return fig
