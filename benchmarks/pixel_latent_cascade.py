"""Pixel, latent and cascaded diffusion on MNIST at one total training budget, side by side.

Three ways to spend ``--minutes`` of wall-clock training on MNIST, each through ``difflab
train``'s code path (``difflab.app.training.train_run``) with the presets' recipes:

* pixel: the ``mnist-eps`` preset (eps-DDPM, as the latent and cascade stages) for the whole budget;
* latent [Rombach 2022]: the ``mnist-ae`` autoencoder for ``--ae-share`` of the budget, then
  ``mnist-latent`` on its frozen encoder's latents for the rest;
* cascade [Ho 2021]: the ``mnist-14`` base (14x14) for ``--base-share`` of the budget, then the
  ``mnist-sr`` super-resolution stage (14 -> 28, Gaussian conditioning augmentation) on it.

Then ``--n`` samples of each (EMA weights, one sampler and step count for every diffusion stage,
so the cascade spends twice the NFE of the others, half of them at 14x14) are scored by the
Frechet digit distance (FDD) to the 10,000 MNIST test images in the features of difflab's cached
digit classifier, beside two reference rows: real training images (the floor at this n) and the
autoencoder's reconstructions of ``--n`` test images (the ceiling any latent model on it can
reach). Sampling images/s is timed per model with the same batch size.

    .venv/bin/python benchmarks/pixel_latent_cascade.py --data-dir ../shared/data/mnist \\
        --minutes 10 --append BENCHMARKS.md
    # sample and score the runs of an earlier call again (sampling speed with today's code):
    .venv/bin/python benchmarks/pixel_latent_cascade.py --data-dir ../shared/data/mnist \\
        --rows pixel,latent --out-dir runs/bench-plc2 --no-train --append BENCHMARKS.md
    # a smoke test of the script (seconds of training, small n):
    .venv/bin/python benchmarks/pixel_latent_cascade.py --data-dir ../shared/data/mnist \\
        --minutes 0.2 --n 200 --out-dir runs/plc-smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _mnist import mnist_yardstick
from mnist_quality import train_for

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import nfe
from difflab.viz import save_image_grid

# row -> (diffusion stages sampled per image, [(preset, share, overrides naming the stage before)])
RECIPES = {
    "pixel": (1, [("mnist-eps", 1.0, [])]),
    "latent": (1, [("mnist-ae", "ae", []), ("mnist-latent", "rest", ["model.autoencoder={prev}"])]),
    "cascade": (2, [("mnist-14", "base", []), ("mnist-sr", "rest", ["model.base={prev}"])]),
}


def train_recipe(name: str, args: argparse.Namespace) -> tuple[Path, str]:
    """Train every stage of one recipe; returns the last run and a training summary."""
    shares = {"ae": args.ae_share, "base": args.base_share}
    prev, parts, used = None, [], 0.0
    for preset, share, overrides in RECIPES[name][1]:
        frac = share if isinstance(share, float) else shares.get(share, 1.0 - used)
        used += frac
        run = args.out_dir / f"{name}-{preset}"
        sets = [o.format(prev=prev) for o in overrides]
        steps, _, _ = train_for(preset, frac * args.minutes, run, args.data_dir, sets, args.device)
        parts.append(f"`{preset}` {frac * args.minutes:g} min, {steps} steps")
        prev = run
    assert prev is not None
    return prev, ", ".join(parts)


def last_run(name: str, args: argparse.Namespace) -> Path:
    """The run directory of a recipe's last stage (the one that is sampled)."""
    return args.out_dir / f"{name}-{RECIPES[name][1][-1][0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--minutes", type=float, default=10.0, help="total training budget per row")
    ap.add_argument("--ae-share", type=float, default=0.3, help="autoencoder's share")
    ap.add_argument("--base-share", type=float, default=0.5, help="cascade base's share")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/bench-plc"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sampler", default="dpm++2m-sde")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="pixel,latent,cascade")
    ap.add_argument("--grid", type=Path, help="write a grid of each row's samples here")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument("--no-train", action="store_true",
                    help="sample and score the runs already in --out-dir")  # fmt: skip
    args = ap.parse_args()
    recipes = args.rows.split(",")
    for name in recipes:
        if name not in RECIPES:
            ap.error(f"--rows: unknown row {name!r}; choose from {', '.join(RECIPES)}")
        if args.no_train and not (last_run(name, args) / "config.json").is_file():
            ap.error(f"--no-train: {last_run(name, args)} is not a run directory")

    yard = mnist_yardstick(args.data_dir, device=args.device)
    net, ref = yard.net, yard.reference
    floor = frechet_digit_distance(yard.train.images[: args.n], ref, net=net)
    print(f"real vs real at n={args.n}: FDD {floor:.2f}", flush=True)

    rows = [f"| real training images (floor) | - | - | - | - | {floor:.2f} |"]
    pixel_rate = None
    for name in recipes:
        if args.no_train:
            run = last_run(name, args)
            trained = f"the earlier run `{run}`"
        else:
            run, trained = train_recipe(name, args)
        built = load_run(run, device=torch.device(args.device))
        per_stage = nfe(args.sampler, args.steps)
        stages = RECIPES[name][0]
        options = {"base_sampler": args.sampler, "base_steps": args.steps} if stages == 2 else {}
        t0 = time.perf_counter()
        x = draw_samples(built, args.n, sampler=args.sampler, steps=args.steps, seed=0,
                         batch_size=args.batch_size, **options)  # fmt: skip
        seconds = time.perf_counter() - t0
        fdd = frechet_digit_distance(x, ref, net=net)
        rate = args.n / seconds
        pixel_rate = rate if name == "pixel" else pixel_rate
        speed = f"{rate:.0f}" + (f" ({rate / pixel_rate:.2f}x)" if pixel_rate else "")
        rows.append(f"| {name} | {trained} | {per_stage * stages} | {speed} | - | {fdd:.2f} |")
        print(rows[-1], flush=True)
        if args.grid is not None:
            save_image_grid(x[:64], args.grid.with_name(f"{args.grid.stem}-{name}.png"), nrow=8)
        if name == "latent":  # the autoencoder's ceiling: reconstructions of test images
            ae = load_run(args.out_dir / "latent-mnist-ae", device=torch.device(args.device))
            q = ae.kind.quality(ae, n=args.n, seed=0)
            rows.insert(1, f"| autoencoder reconstructions (ceiling) | - | - | - "
                        f"| {q['psnr']:.2f} | {q['frechet_digit_distance']:.2f} |")  # fmt: skip

    table = "\n".join(
        [
            "| model | training (total budget "
            f"{args.minutes:g} min) | NFE | sampling img/s | PSNR dB | FDD |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if args.append:
        from _record import record

        notes = (
            f"{args.n} samples per row, {args.sampler} with {args.steps} steps per diffusion "
            f"stage, batch {args.batch_size}, EMA weights, seed 0, on {args.device}; FDD to "
            "the 10,000 MNIST test images in the digit classifier's features (lower is "
            "better). Budget shares: autoencoder "
            f"{args.ae_share:g}, cascade base {args.base_share:g}."
        )
        record("Pixel, latent and cascaded diffusion on MNIST", table, path=args.append,
               notes=notes)  # fmt: skip


if __name__ == "__main__":
    main()
