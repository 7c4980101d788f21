"""End-of-run figures and metrics written into a run directory.

2-D runs: ``samples.png`` (scatter), ``forward_reverse.png`` (the forward process of the data
and the model's reverse process at t = 0, T/2, T, as in Sohl-Dickstein 2015, Fig. 1),
``denoising.gif``, ``loss.png`` and, in ``finished.json``, the sliced Wasserstein distance and
MMD of ``sample.n`` samples to fresh data next to the same distances between two fresh data sets.

Image runs: ``samples.png`` (grid), ``denoising.gif`` and ``loss.png``; class-conditional runs
also ``guidance.png`` (a row per class, a block per classifier-free guidance scale).
Image-to-image runs (``model.image_task``): ``samples.png`` with rows degraded / restored /
original and the PSNRs in ``finished.json``. Super-resolution runs: ``super_resolution.png``
(rows low-res / super-resolved / original, PSNRs in ``finished.json``) and, with a base run,
``samples.png`` of the whole cascade. Classifier runs: ``loss.png`` and the accuracy on
noisy test images x_t in ``finished.json``. Each kind of run (:mod:`difflab.app.kinds`) says
which of these pieces its report is made of.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from difflab import viz
from difflab.app.build import Built, build_data
from difflab.app.sampling import draw_samples
from difflab.cascade import downsample_images, upsample_images
from difflab.checkpoint import read_metrics
from difflab.classifier import noisy_accuracy
from difflab.data.datasets import dataset
from difflab.data.toy import toy_density
from difflab.image_to_image import degrade, preview
from difflab.metrics import exact_nll, mmd, sliced_wasserstein
from difflab.nn.autoencoder import psnr
from difflab.process import q_sample

__all__ = [
    "final_report",
    "guidance_sweep_figure",
    "guidance_sweep_samples",
    "grid_figure",
    "images_report",
    "points_report",
    "reconstruction_figure",
    "restoration_figure",
    "restoration_grid",
    "restore",
    "scatter_figure",
    "super_resolution_figure",
    "cascade_gif",
    "toy_quality",
    "trajectory",
]


def trajectory(
    built: Built, n: int, *, seed: int, frames: int = 40
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Samples and up to ``frames`` snapshots (x at decreasing t) of the reverse process."""
    cfg = built.cfg
    xs: list[Tensor] = []
    ts: list[float] = []

    def keep(info: dict) -> None:
        xs.append(info["x"].detach().float().cpu())
        ts.append(float(info["t"]))

    x = draw_samples(
        built, n, sampler=cfg.sample.sampler, steps=cfg.sample.steps, seed=seed, batch_size=n,
        callback=keep,
    )  # fmt: skip
    xs.append(x)
    ts.append(0.0)
    return x, *thin_frames(xs, ts, frames)


def thin_frames(xs: list[Tensor], ts: list[float], frames: int) -> tuple[list[Tensor], list[float]]:
    """At most about ``frames`` evenly spaced snapshots, always with the last one."""
    stride = max(1, len(xs) // frames)
    idx = list(range(0, len(xs), stride))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ts[i] for i in idx]


def toy_quality(built: Built, samples: Tensor, *, seed: int, repeats: int = 5) -> dict[str, float]:
    """Distances of samples to fresh data, with the data-vs-data reference at the same size.

    Sliced Wasserstein (1,024 directions) is averaged over ``repeats`` fresh data sets, and the
    reference over ``repeats`` independent pairs of fresh data sets.
    """
    name = built.cfg.data.name
    n = samples.shape[0]
    g = torch.Generator().manual_seed(10_000 + seed)
    # both distances fluctuate a lot between draws: average over `repeats` fresh data sets
    sample = dataset(name).sample
    fresh = [sample(n, g) for _ in range(2 * repeats)]  # type: ignore[misc]
    sw = lambda a, b: sliced_wasserstein(  # noqa: E731
        a, b, n_projections=1024, generator=torch.Generator().manual_seed(7)
    )
    fresh_a = fresh[0]
    out = {
        "n": float(n),
        "sliced_wasserstein": mean(sw(samples, fresh[i]) for i in range(repeats)),
        "sliced_wasserstein_data_vs_data": mean(
            sw(fresh[2 * i], fresh[2 * i + 1]) for i in range(repeats)
        ),
        "mmd": mmd(samples, fresh_a),
        "mmd_data_vs_data": mmd(fresh[1], fresh_a),
        "repeats": float(repeats),
    }
    if name in ("gmm", "8gaussians"):
        density = toy_density(name)  # type: ignore[arg-type]
        out["nll"] = exact_nll(samples, density)
        out["nll_data"] = exact_nll(fresh_a, density)
    return out


def scatter_figure(built: Built, path: Path, *, n: int, seed: int = 0) -> Tensor:
    """Draw n samples with the run's sampler and save a scatter plot (2-D runs)."""
    cfg = built.cfg
    x = draw_samples(built, n, sampler=cfg.sample.sampler, steps=cfg.sample.steps, seed=seed)
    viz.scatter(x, path, title=f"{cfg.preset}: {n} samples", lim=_lim(x))
    return x


def grid_figure(built: Built, path: Path, *, n: int = 64, seed: int = 0) -> Tensor:
    """Draw n samples with the run's sampler and save an image grid (image runs)."""
    cfg = built.cfg
    x = draw_samples(built, n, sampler=cfg.sample.sampler, steps=cfg.sample.steps, seed=seed)
    viz.save_image_grid(x, path, scale=grid_scale(x))
    return x


def grid_scale(x: Tensor) -> int:
    """Upsampling of image grids: 2 for small images (<= 32 pixels wide), else 1."""
    return 2 if x.shape[-1] <= 32 else 1


def _lim(*xs: Tensor) -> float:
    return float(max(torch.quantile(x.abs().flatten().float(), 0.995) for x in xs)) * 1.15


def forward_reverse_figure(
    built: Built, reverse: list[Tensor], ts: list[float], path: Path
) -> None:
    """2 x 3 grid: data noised to t = 0, T/2, T (top) and the reverse process there (bottom)."""
    sched = built.schedule
    n = reverse[0].shape[0]
    g = torch.Generator().manual_seed(123)
    x0 = dataset(built.cfg.data.name).sample(n, g).double()  # type: ignore[misc]
    T = sched.t_max
    marks = [0.0, T / 2, T]
    forward = [x0.float() if m == 0 else q_sample(x0, m, sched, generator=g).float() for m in marks]
    # reverse snapshots closest to each mark
    rev = [reverse[min(range(len(ts)), key=lambda i: abs(ts[i] - m))] for m in marks]
    lim = _lim(forward[0], rev[0]) * 1.5
    labels = [f"t = {m:g}" for m in marks]
    viz.scatter_grid([forward, rev], ["forward q(x_t)", "reverse p(x_t)"], labels, path, lim=lim)


def final_report(
    built: Built, run_dir: Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write the end-of-run figures (the loss curve, then the run kind's) and return the
    metrics for ``finished.json``."""
    m = read_metrics(run_dir / "metrics.csv")
    if m.get("step"):
        viz.plot_loss_curve(m["step"], m["loss"], run_dir / "loss.png")
    info = built.kind.report(built, run_dir, log=log)
    log(f"figures written to {run_dir}")
    return info


def points_report(
    built: Built,
    run_dir: Path,
    traj: tuple[Tensor, list[Tensor], list[float]],
    *,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """2-D runs: samples, forward/reverse figure, denoising GIF and the sample quality."""
    x, frames, ts = traj
    lim = _lim(x) * 1.5
    viz.scatter(x, run_dir / "samples.png", title=f"{built.cfg.preset}: samples", lim=lim)
    forward_reverse_figure(built, frames, ts, run_dir / "forward_reverse.png")
    viz.scatter_trajectory_gif(
        [f[:2000] for f in frames],
        run_dir / "denoising.gif",
        lim=lim,
        titles=[f"t = {t:.0f}" for t in ts],
    )
    q = toy_quality(built, x, seed=built.cfg.train.seed)
    log(
        f"sliced Wasserstein to fresh data: {q['sliced_wasserstein']:.4f} "
        f"(data vs data: {q['sliced_wasserstein_data_vs_data']:.4f}, n = {int(q['n'])})"
    )
    return {"quality": q}


def images_report(built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict[str, Any]:
    """Image runs: a sample grid, the denoising GIF and, class-conditional, a guidance sweep."""
    seed = built.cfg.train.seed
    x, frames, _ = trajectory(built, 64, seed=seed)
    viz.save_image_grid(x, run_dir / "samples.png", scale=grid_scale(x))
    viz.image_trajectory_gif(frames, run_dir / "denoising.gif")
    if built.cfg.model.num_classes > 0:  # class-conditional: classifier-free guidance sweep
        scales = [0.0, 1.0, 3.0]
        sweep = guidance_sweep_samples(built, scales, per_class=4, seed=seed)
        guidance_sweep_figure(sweep, scales, run_dir / "guidance.png")
    return {}


def evaluation_images(built: Built, n: int) -> tuple[Tensor, Tensor]:
    """The first n test images (float in [-1, 1]) and labels; the training split if none."""
    try:
        ds = build_data(built.cfg, train=False)
    except (FileNotFoundError, ValueError):
        ds = built.dataset if built.dataset is not None else build_data(built.cfg)
    idx = torch.arange(min(n, len(ds)))
    return ds.batch(idx, generator=torch.Generator().manual_seed(0))


def _psnr(x: Tensor, ref: Tensor) -> float:
    """The PSNR of every kind of run (docs/METRICS.md): per image, of x clamped to [-1, 1],
    averaged over the images (:func:`difflab.nn.autoencoder.psnr`)."""
    return float(psnr(x.clamp(-1, 1), ref).mean())


def restoration_figure(built: Built, path: Path, **options: Any) -> dict[str, Any]:
    """:func:`restore` evaluation images (``options`` as there) and save the grid of the
    first 16 with rows degraded / restored / original (:func:`restoration_grid`)."""
    res = restore(built, **options)
    restoration_grid(built, res, path)
    return res


def restore(
    built: Built,
    *,
    n: int = 16,
    seed: int = 0,
    y: Tensor | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Restore n degraded evaluation images (or the given conditioning images ``y``).

    The degradation uses a generator seeded with ``seed``; sampling uses the run's sampler and
    steps unless given (``**options`` go to :func:`~difflab.app.sampling.draw_samples`).
    Returns {"samples", "degraded", "originals", "psnr", "psnr_degraded"} (originals None and
    PSNRs NaN for given ``y``).
    """
    cfg = built.cfg
    x0 = None
    if y is None:
        x0, _ = evaluation_images(built, n)
        y = degrade(x0, cfg.model.image_task, generator=torch.Generator().manual_seed(seed))  # type: ignore
    x = draw_samples(
        built, y.shape[0], sampler=sampler or cfg.sample.sampler, steps=steps or cfg.sample.steps,
        seed=seed, cond={"image": y}, **options,
    )  # fmt: skip
    nan = float("nan")
    return {
        "samples": x,
        "degraded": y,
        "originals": x0,
        "psnr": nan if x0 is None else _psnr(x, x0),
        "psnr_degraded": nan if x0 is None else _psnr(_preview(built, y), x0),
    }


def _preview(built: Built, y: Tensor) -> Tensor:
    """Degraded images ``y`` as images of the data's channels (a colourisation's grey)."""
    return preview(y, built.cfg.model.image_task, built.data_shape[0])  # type: ignore[arg-type]


def restoration_grid(built: Built, res: dict[str, Any], path: Path) -> None:
    """A grid of the first 16 of :func:`restore`'s result: rows degraded / restored /
    original (no original row for given images)."""
    x0 = res["originals"]
    rows = [_preview(built, res["degraded"])[:16], res["samples"][:16]]
    rows += [] if x0 is None else [x0[:16]]
    viz.save_image_grid(torch.cat(rows), path, nrow=rows[0].shape[0], scale=2)


def reconstruction_figure(built: Built, path: Path | None, *, n: int = 16) -> dict[str, Any]:
    """Autoencoder runs: n evaluation images and their reconstructions D(mean of q(z|x)), a
    grid of the first 16 (rows original / reconstruction) at ``path``; returns
    {"reconstructions", "originals", "psnr"} (mean PSNR in dB over the n images)."""
    x0, _ = evaluation_images(built, n)
    ae: Any = built.model
    recs = []
    with torch.no_grad():
        for i in range(0, x0.shape[0], 256):
            xb = x0[i : i + 256].to(built.device)
            recs.append(ae.decode(ae.encode(xb).mode()).float().cpu())
    rec = torch.cat(recs)
    if path is not None:
        viz.save_image_grid(
            torch.cat([x0[:16], rec[:16].clamp(-1, 1)]), path, nrow=min(16, n), scale=2
        )
    return {
        "reconstructions": rec.clamp(-1, 1),
        "originals": x0,
        "psnr": _psnr(rec, x0),
    }


def classifier_accuracy(
    built: Built, *, n: int = 2000, seed: int = 0, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Accuracy of a noise-aware classifier run on n evaluation images noised to several t."""
    x0, labels = evaluation_images(built, n)
    t_max = built.schedule.t_max
    ts = [built.schedule.t_min] + [round(f * t_max, 6) for f in (0.25, 0.5, 0.75)]
    acc = noisy_accuracy(built.model, x0, labels, built.schedule, ts=ts, seed=seed)
    log("accuracy on noisy images: " + ", ".join(f"t={t:g}: {a:.3f}" for t, a in acc.items()))
    return {f"t={t:g}": a for t, a in acc.items()}


def guidance_sweep_samples(
    built: Built,
    scales: list[float],
    *,
    per_class: int,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    classifier: torch.nn.Module | None = None,
    guidance: float | None = None,
    **options: Any,
) -> Tensor:
    """Samples (S, K, per_class, *data_shape) of every class at every guidance scale.

    Without ``classifier`` the scales are classifier-free guidance scales; with one they are
    classifier-guidance scales (and ``guidance`` an optional fixed CFG scale). Every scale
    uses the same seed, hence the same initial noise.
    """
    cfg = built.cfg
    k = cfg.model.num_classes if classifier is None else int(classifier.num_classes)
    labels = torch.arange(k).repeat_interleave(per_class)
    blocks = []
    for s in scales:
        kw: dict[str, Any] = {"guidance": s}
        if classifier is not None:
            kw = {"guidance": guidance, "classifier": classifier, "classifier_scale": s}
        x = draw_samples(
            built, labels.numel(), sampler=sampler or cfg.sample.sampler,
            steps=steps or cfg.sample.steps, seed=seed, cond=labels, **kw, **options,
        )  # fmt: skip
        blocks.append(x.reshape(k, per_class, *built.data_shape))
    return torch.stack(blocks)


def guidance_sweep_figure(
    samples: Tensor, scales: list[float], path: Path, *, label: str = "guidance scale"
) -> None:
    """One panel per scale: rows are classes, columns samples, (S, K, m, C, H, W) in [-1, 1]."""
    s, k, m = samples.shape[:3]
    fig = Figure(figsize=(1.0 + 0.45 * m * s, 0.5 + 0.45 * k))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, s, squeeze=False)
    for ax, block, scale in zip(axes[0], samples, scales):
        grid = viz.make_grid(block.reshape(k * m, *block.shape[2:]), nrow=m)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{label} {scale:g}", fontsize=9)
        ax.set_xticks([])
        step = grid.shape[0] / k
        ax.set_yticks([step * (i + 0.5) for i in range(k)], [str(i) for i in range(k)])
        ax.tick_params(length=0, labelsize=7)
    axes[0][0].set_ylabel("class")
    fig.tight_layout()
    viz.save_figure(fig, path)


def super_resolution_figure(
    built: Built,
    path: Path,
    *,
    n: int = 16,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Super-resolve the box-downsampled first n evaluation images with an SR run.

    Saves a grid with rows low-res (nearest-neighbour upsampled) / super-resolved / original;
    returns {"samples", "psnr" (of the SR output), "psnr_upsampled" (of the bilinear
    upsampling, the baseline)} against the originals.
    """
    cfg = built.cfg
    f = cfg.model.sr_factor
    x0, _ = evaluation_images(built, n)
    y = downsample_images(x0, f)
    x = draw_samples(
        built, y.shape[0], sampler=sampler or cfg.sample.sampler, steps=steps or cfg.sample.steps,
        seed=seed, cond={"image": y}, **options,
    )  # fmt: skip
    rows = [upsample_images(y[:16], f, "nearest"), x[:16], x0[:16]]
    viz.save_image_grid(torch.cat(rows), path, nrow=rows[0].shape[0], scale=2)
    return {"samples": x, "psnr": _psnr(x, x0), "psnr_upsampled": _psnr(upsample_images(y, f), x0)}


def cascade_gif(
    infos: list[dict[str, Tensor]], x: Tensor, path: Path, *, low_res: Tensor | None = None
) -> None:
    """The denoising GIF of a cascade, each frame a low-res panel beside a full-size one.

    ``infos``: the sampler callback dicts of every stage in order ({"x", "x0_hat"}); states
    smaller than the samples ``x`` (B, C, H, W) are the base stage's. Base frames show its
    state (nearest-neighbour upsampled) beside a blank panel; SR frames show the base's final
    estimate (or the given ``low_res`` images) beside the SR state; the last frame shows x.
    """
    k, size = min(64, x.shape[0]), x.shape[-1]

    def up(t: Tensor) -> Tensor:
        return upsample_images(t[:k].float().clamp(-1, 1), size // t.shape[-1], "nearest")

    blank = torch.full_like(x[:k], -1.0)
    left = None if low_res is None else up(low_res)
    frames = []
    for info in infos:
        if info["x"].shape[-1] < size:  # the base stage
            frames.append(torch.cat([up(info["x"]), blank], dim=-1))
            left = up(info["x0_hat"])
        else:
            shown = blank if left is None else left
            frames.append(torch.cat([shown, info["x"][:k].float().clamp(-1, 1)], dim=-1))
    frames.append(torch.cat([blank if left is None else left, x[:k]], dim=-1))
    viz.image_trajectory_gif(frames, path, scale=grid_scale(x))
