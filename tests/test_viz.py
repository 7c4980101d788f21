"""Figures: grid layout and pixel values, GIF frames, PNG sizes, plots with awkward inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.viz import (
    ema_smooth,
    forward_strip,
    image_trajectory_gif,
    make_grid,
    plot_loss_curve,
    plot_schedules,
    save_gif,
    save_image_grid,
    scatter,
    scatter_grid,
    scatter_trajectory_gif,
    to_uint8,
)


def gif_frames(path) -> tuple[list[np.ndarray], list[int], tuple[int, int]]:
    with Image.open(path) as im:
        assert im.format == "GIF"
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.array(im.convert("RGB")))
            durations.append(im.info["duration"])
        return frames, durations, im.size


# ----------------------------------------------------------------------------- grids
def test_to_uint8_known_values():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.5, 2.0, -3.0, float("nan")])
    # (x + 1) / 2 * 255 rounded: 127.5 -> 128, 191.25 -> 191, 63.75 -> 64; clipped outside [-1, 1]
    assert to_uint8(x).tolist() == [0, 255, 128, 191, 64, 255, 0, 0]
    assert to_uint8(x).dtype == np.uint8


def test_make_grid_places_each_image():
    values = [-1.0, 1.0, 0.0, 0.5, -0.5]
    expected = [0, 255, 128, 191, 64]
    images = torch.stack([torch.full((1, 2, 3), v) for v in values])  # (5, 1, 2, 3)
    grid = make_grid(images, nrow=3, padding=1)
    # 2 rows x 3 columns of 2x3 tiles, 1 pixel of padding around and between
    assert grid.shape == (2 * (2 + 1) + 1, 3 * (3 + 1) + 1, 1) and grid.dtype == np.uint8
    mask = np.zeros(grid.shape[:2], dtype=bool)
    for i, value in enumerate(expected):
        r, c = divmod(i, 3)
        top, left = 1 + 3 * r, 1 + 4 * c
        assert (grid[top : top + 2, left : left + 3, 0] == value).all(), i
        mask[top : top + 2, left : left + 3] = True
    assert (grid[~mask] == 255).all()  # padding and the empty sixth slot are white
    black_pad = make_grid(images, nrow=3, padding=1, pad_value=-1.0)
    assert (black_pad[~mask] == 0).all()


def test_make_grid_rgb_channels_and_default_layout():
    image = torch.stack([torch.full((4, 5), 1.0), torch.full((4, 5), -1.0), torch.zeros(4, 5)])
    grid = make_grid(np.stack([image.numpy()] * 10), padding=0)  # numpy input
    # default nrow = ceil(sqrt(10)) = 4 -> 3 rows
    assert grid.shape == (3 * 4, 4 * 5, 3)
    assert grid[0, 0].tolist() == [255, 0, 128]  # channel order kept: R, G, B
    assert grid[8:, 10:].tolist() == np.full((4, 10, 3), 255).tolist()  # slots 11 and 12 empty
    single = make_grid(torch.zeros(1, 3, 4, 5), padding=2)
    assert single.shape == (4 + 4, 5 + 4, 3)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 2, 8, 8), (0, 1, 4, 4)])
def test_make_grid_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="B, C, H, W"):
        make_grid(torch.zeros(shape))


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (1, "L")])
def test_save_image_grid_png_size_and_pixels(tmp_path, channels, mode):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, channels, 8, 8, generator=g) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=2, scale=3)
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == mode
        assert im.size == (3 * (2 * (8 + 2) + 2),) * 2
        pixels = np.array(im)
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    # nearest upsampling: every 3x3 block repeats one pixel of the grid
    assert (pixels[::3, ::3] == make_grid(images, nrow=2)).all()
    assert (pixels[2::3, 1::3] == pixels[::3, ::3]).all()
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(images, tmp_path / "x.png", scale=0)


# ----------------------------------------------------------------------------- GIFs
@pytest.mark.parametrize("rgb", [False, True])
def test_save_gif_frames_size_and_durations(tmp_path, rgb):
    h, w = 10, 12
    frames = []
    for k in range(5):
        f = np.zeros((h, w, 3) if rgb else (h, w), dtype=np.uint8)
        f[k, :] = 200  # a moving bar: every frame differs
        f[:, -1] = 40 * k
        frames.append(f)
    path = save_gif(frames, tmp_path / "a.gif", duration_ms=60, final_hold_ms=900)
    read, durations, size = gif_frames(path)
    assert len(read) == 5 and size == (w, h)
    assert durations == [60, 60, 60, 60, 900]
    for f, r in zip(frames, read):  # few colours: the palette keeps them exactly
        expected = f if rgb else np.repeat(f[:, :, None], 3, axis=2)
        assert (r == expected).all()


def test_save_gif_rejects_mismatched_frames(tmp_path):
    with pytest.raises(ValueError, match="frame 1"):
        save_gif([np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="frame 0"):
        save_gif([np.zeros((4, 4), np.float32)], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="at least one"):
        save_gif([], tmp_path / "a.gif")


def test_image_trajectory_gif_frames_and_thinning(tmp_path):
    xs = [torch.full((4, 1, 3, 3), -1.0 + 2.0 * k / 6) for k in range(7)]
    path = image_trajectory_gif(xs, tmp_path / "traj.gif", nrow=2, scale=2)
    frames, _, size = gif_frames(path)
    side = 2 * (2 * (3 + 2) + 2)
    assert len(frames) == 7 and size == (side, side)
    thin, durations, _ = gif_frames(image_trajectory_gif(xs, tmp_path / "t3.gif", max_frames=3))
    assert len(thin) == 3 and durations[-1] == 1000
    tile = (slice(2, 5), slice(2, 5))  # the first tile of a default grid (padding 2)
    assert (thin[0][tile] == 0).all() and (thin[-1][tile] == 255).all()  # first and last kept
    assert (thin[1][tile] == to_uint8(torch.tensor(0.0))).all()  # the middle state x_3


# ----------------------------------------------------------------------------- scatter plots
def png_size(path) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_scatter_to_file_and_into_axes(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    ax = scatter(x, tmp_path / "s.png", title="data", lim=3)
    assert png_size(tmp_path / "s.png") == (400, 400)
    assert ax.get_xlim() == (-3, 3) and ax.get_title() == "data"
    fig = scatter_grid([[x, x]], ["q"], ["a", "b"])  # reuse a figure's axes
    target = fig.axes[1]
    scatter(x[:10], ax=target, lim=(0, 1))
    assert len(target.collections) == 2 and target.get_ylim() == (0, 1)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        scatter(torch.zeros(5, 3))


def test_scatter_grid_forward_reverse_figure(tmp_path):
    g = torch.Generator().manual_seed(1)
    rows = [[torch.randn(100, 2, generator=g) * (k + 1) for k in range(3)] for _ in range(2)]
    fig = scatter_grid(rows, ["forward", "reverse"], ["t=0", "t=T/2", "t=T"], tmp_path / "g.png")
    assert png_size(tmp_path / "g.png") == (900, 600)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["t=0", "t=T/2", "t=T"]
    assert fig.axes[3].get_ylabel() == "reverse"
    lim = max(float(p.abs().max()) for row in rows for p in row)
    assert all(ax.get_xlim()[1] >= lim for ax in fig.axes)  # shared window fits every point
    with pytest.raises(ValueError, match="col_labels"):
        scatter_grid(rows, ["forward", "reverse"], ["t=0", "t=T"], tmp_path / "bad.png", lim=3)


def test_scatter_trajectory_gif(tmp_path):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 2, generator=g) * (1 - k / 5) for k in range(5)]
    path = scatter_trajectory_gif(
        xs, tmp_path / "st.gif", lim=3, titles=[f"t={k}" for k in range(5)]
    )
    frames, durations, size = gif_frames(path)
    assert len(frames) == 5 and size == (400, 400) and durations[-1] == 1000
    assert not (frames[0] == frames[-1]).all()
    with pytest.raises(ValueError, match="titles"):
        scatter_trajectory_gif(xs, tmp_path / "x.gif", lim=3, titles=["a"])


# ----------------------------------------------------------------------------- line plots
def test_plot_schedules_handles_infinite_logsnr(tmp_path):
    t = np.linspace(0, 1, 11)
    alpha_bar = np.cos(t * np.pi / 2) ** 2
    with np.errstate(divide="ignore"):
        logsnr = np.log(alpha_bar) - np.log1p(-alpha_bar)  # +inf at t=0, about -inf at t=1
    logsnr[-1] = -np.inf
    beta = np.concatenate([[0.0], 1 - alpha_bar[1:] / alpha_bar[:-1]])
    curves = {
        "cosine": {"t": t, "beta": beta, "alpha_bar": alpha_bar, "logsnr": logsnr},
        "linear": {"t": torch.tensor(t), "alpha_bar": torch.tensor(1 - t)},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_schedules(curves, tmp_path / "schedules.png")
    assert png_size(tmp_path / "schedules.png") == (1300, 380)
    beta_ax, alpha_ax, logsnr_ax = fig.axes
    (line,) = logsnr_ax.lines
    y = np.asarray(line.get_ydata(), dtype=float)
    assert not np.isinf(y).any() and np.isnan(y[[0, -1]]).all()
    assert np.allclose(y[1:-1], logsnr[1:-1])
    assert "+inf at t=0" in line.get_label() and "-inf at t=1" in line.get_label()
    assert np.isfinite(logsnr_ax.get_ylim()).all()
    assert beta_ax.get_yscale() == "log" and len(alpha_ax.lines) == 2
    with pytest.raises(ValueError, match="'t'"):
        plot_schedules({"bad": {"beta": beta}})
    with pytest.raises(ValueError, match="values"):
        plot_schedules({"bad": {"t": t, "beta": beta[:5]}})


def test_ema_smooth_matches_weighted_average():
    g = np.random.default_rng(0)
    v = g.normal(size=50)
    smooth = 0.9
    for k in (0, 1, 10, 49):
        w = smooth ** np.arange(k, -1, -1)  # weight smooth^(k-j) on v_j
        assert ema_smooth(v, smooth)[k] == pytest.approx((w * v[: k + 1]).sum() / w.sum())
    assert np.allclose(ema_smooth(np.full(20, 3.0), 0.99), 3.0)  # debiased from the start
    assert np.array_equal(ema_smooth(v, 0.0), v)
    with_nan = np.array([np.nan, 1.0, np.inf, 3.0])
    out = ema_smooth(with_nan, 0.5)
    assert np.isnan(out[0]) and out[1] == out[2] == 1.0
    assert out[3] == pytest.approx((0.5 * 1 + 3) / 1.5)
    with pytest.raises(ValueError, match="smooth"):
        ema_smooth(v, 1.0)


def test_plot_loss_curve(tmp_path):
    steps = np.arange(1, 301)
    losses = 1.0 / np.sqrt(steps) + 0.01 * np.random.default_rng(0).random(300)
    fig = plot_loss_curve(steps, torch.tensor(losses), tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (600, 360)
    assert fig.axes[0].get_yscale() == "log"
    fig = plot_loss_curve(steps, losses - 0.5, tmp_path / "loss2.png")  # negative: linear axis
    assert fig.axes[0].get_yscale() == "linear"
    with pytest.raises(ValueError, match="equally long"):
        plot_loss_curve(steps, losses[:3])


def test_forward_strip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 8, 8, generator=g) * 2 - 1
    images = [x0, 0.7 * x0 + 0.7 * torch.randn(3, 8, 8, generator=g), torch.zeros(1, 8, 8)]
    labels = ["t=0", "t=250", "t=1000"]
    fig = forward_strip(images, labels, tmp_path / "strip.png")
    assert png_size(tmp_path / "strip.png") == (round(1.7 * 3 * 120), 240)
    assert [ax.get_title() for ax in fig.axes] == labels
    assert np.array_equal(fig.axes[0].images[0].get_array(), to_uint8(x0).transpose(1, 2, 0))
    with pytest.raises(ValueError, match="label"):
        forward_strip(images, labels[:2], tmp_path / "bad.png")
