"""MNIST quality at a fixed wall-clock training budget: Frechet digit distance of 10,000 samples.

Trains a preset (default ``mnist``) with ``train.max_minutes`` set to ``--minutes`` into
``--run-dir``, then draws ``--n`` samples from its EMA weights and reports

* FDD: the Frechet digit distance [Heusel 2017, Eq. (6)] of the samples to the 10,000 MNIST
  test images, in the 128-d penultimate features of the digit classifier that
  :mod:`difflab.evaluation` trains once on MNIST and caches (``load_or_train_classifier``);
* the floor: the same distance for ``--n`` real training images (real vs real at equal n);
* the class histogram of the samples (min and max class fraction; 0.1 each for balanced data)
  and the training steps and images/s reached within the budget.

It also writes a 10x10 sample grid next to the run (``samples_grid.png``) and, with
``--grid PATH``, a copy of it (the README's sample figure). ``--run-dir`` that already holds a
finished run skips training (``--no-train``).

    .venv/bin/python benchmarks/mnist_quality.py --data-dir ../shared/data/mnist --minutes 10 \\
        --append BENCHMARKS.md
    # on a GPU, the 150-second budget:
    python benchmarks/mnist_quality.py --data-dir DIR --minutes 2.5 --device cuda \\
        --run-dir runs/bench-mnist-gpu --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from _mnist import mnist_yardstick

from difflab.app.config import apply_overrides, get_preset
from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.app.training import train_run
from difflab.evaluation import (
    class_histogram,
    frechet_digit_distance,
)
from difflab.viz import save_image_grid


def train_for(
    preset: str, minutes: float, run_dir: Path, data_dir: str, overrides: list[str], device: str
):
    """Train ``preset`` for ``minutes`` of wall-clock time; returns (steps, images/s, seconds)."""
    cfg = apply_overrides(get_preset(preset), overrides)
    cfg = replace(
        cfg,
        data=replace(cfg.data, data_dir=data_dir),
        train=replace(cfg.train, max_minutes=minutes, steps=10**9, device=device),
    )
    t0 = time.perf_counter()
    result = train_run(cfg, run_dir, progress=False, log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - t0
    return result.step, result.step * cfg.train.batch_size / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. --set train.lr=2e-3")  # fmt: skip
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-mnist-quality"))
    ap.add_argument("--no-train", action="store_true", help="evaluate the run in --run-dir")
    ap.add_argument("--n", type=int, default=10_000, help="samples (and real images) compared")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (training and sampling)")
    ap.add_argument("--grid", type=Path, help="also write the sample grid here")
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    # the evaluation network first: its one-time training must not eat into the budget
    yard = mnist_yardstick(args.data_dir, cache_dir=args.cache_dir, device=args.device)
    net, reference = yard.net, yard.reference
    floor = frechet_digit_distance(yard.train.images[: args.n], reference, net=net)
    print(f"real vs real at n={args.n}: FDD {floor:.2f}", flush=True)

    steps = img_s = seconds = None
    if not args.no_train:
        steps, img_s, seconds = train_for(
            args.preset, args.minutes, args.run_dir, args.data_dir, args.set, args.device
        )
        print(f"trained {steps} steps in {seconds:.0f} s ({img_s:.0f} img/s)", flush=True)

    built = load_run(args.run_dir, device=torch.device(args.device))
    t0 = time.perf_counter()
    x = draw_samples(built, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                     batch_size=args.batch_size)  # fmt: skip
    sample_seconds = time.perf_counter() - t0
    fdd = frechet_digit_distance(x, reference, net=net)
    hist = class_histogram(net, x)
    params = sum(p.numel() for p in built.model.parameters())
    save_image_grid(x[:100], args.run_dir / "samples_grid.png", nrow=10, scale=2)
    if args.grid is not None:
        save_image_grid(x[:100], args.grid, nrow=10, scale=2)

    cfg = built.cfg
    trained = "-" if steps is None else f"{steps} steps, {seconds:.0f} s, {img_s:.0f} img/s"
    table = "\n".join(
        [
            "| images | training | params | sampler | FDD | class fraction min / max |",
            "|---|---|---:|---|---:|---|",
            f"| {args.n} real training images (floor) | - | - | - | {floor:.2f} | - |",
            f"| {args.n} samples, preset `{cfg.preset}` (U-Net `{cfg.model.preset}`) "
            f"| {trained} | {params / 1e6:.2f}M | {args.sampler}, {args.steps} steps "
            f"({sample_seconds:.0f} s) | {fdd:.2f} "
            f"| {float(hist.min()):.3f} / {float(hist.max()):.3f} |",
        ]
    )
    print(table)
    if args.append:
        from _record import record

        notes = (
            "FDD: Frechet distance to the 10,000 MNIST test images in the features of "
            "difflab's cached digit classifier (lower is better; the floor row is real "
            f"training images at the same n). Training and sampling on {args.device} with the "
            f"preset's recipe {' '.join(args.set) or '(no overrides)'}; EMA weights sampled."
        )
        title = (
            f"MNIST quality of the run {args.run_dir}"
            if args.no_train
            else f"MNIST quality after {args.minutes:g} min of training"
        )
        record(title, table, path=args.append, notes=notes)


if __name__ == "__main__":
    main()
