"""Inception FID beside FDD for trained MNIST runs: one table row per (run, sampler, steps).

Each row draws ``--n`` samples of a run (EMA weights, seed 0) once and scores the same samples
in two feature spaces: FDD, the Frechet distance to the 10,000 MNIST test images in the
features of difflab's digit classifier (``_mnist.py``), and Inception FID against the first
``--ref-n`` test images (default all 10,000; ``difflab.fid``: clean-fid's resize, the
TorchScript Inception weights; the reference features are computed once and cached, and at
10,000 are the ones ``difflab eval --metric fid`` uses). The first row is the floor: the first
``--n`` training images scored the same way. FID is biased upwards at small n, so compare rows
of one table (one n and one reference) only.

    python benchmarks/fid_table.py --data-dir ../shared/data/mnist --n 2000 \\
        --row "eps, 10 min=runs/mnist-eps" --row "flow, 10 min=runs/mnist-fm:dpm++2m-sde:10" \\
        --title "Flow matching and eps at 10 minutes" --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _mnist import mnist_yardstick

from difflab import fid
from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.data.images import load_image_dataset
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import nfe


def parse_row(text: str) -> tuple[str, Path, str | None, int | None]:
    """``LABEL=RUN[:SAMPLER:STEPS]`` -> (label, run, sampler or None, steps or None)."""
    label, sep, rest = text.partition("=")
    parts = rest.split(":")
    if not sep or not label or len(parts) not in (1, 3) or not parts[0]:
        raise SystemExit(f"--row must look like LABEL=RUN or LABEL=RUN:SAMPLER:STEPS, got {text!r}")
    if len(parts) == 1:
        return label, Path(parts[0]), None, None
    if not parts[2].isdigit():
        raise SystemExit(f"--row {text!r}: STEPS must be a positive integer")
    return label, Path(parts[0]), parts[1], int(parts[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=RUN[:SAMPLER:STEPS]")
    ap.add_argument("--n", type=int, default=2000, help="samples per row")
    ap.add_argument("--ref-n", type=int, default=10_000, help="the first ref-n test images")
    ap.add_argument("--batch-size", type=int, default=1000, help="samples per network call")
    ap.add_argument("--title", default="Inception FID and FDD of MNIST runs")
    ap.add_argument("--note", default="", help="a sentence for below the table")
    ap.add_argument("--inception", help="weights file (default: difflab.fid.find_inception)")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument("--no-floor", action="store_true",
                    help="no floor row (a table of the same n and reference has one)")  # fmt: skip
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.row]
    missing = [str(run) for _, run, _, _ in rows if not (run / "config.json").is_file()]
    if missing:
        ap.error(f"not a run directory: {missing[0]}")
    if not 2 <= args.n <= 60_000 or not 2 <= args.ref_n <= 10_000:
        ap.error(f"--n must be in [2, 60000] and --ref-n in [2, 10000], got {args.n}, {args.ref_n}")

    extractor = fid.InceptionFeatures(fid.find_inception(args.inception))
    yard = mnist_yardstick(args.data_dir)
    t0 = time.perf_counter()
    test = load_image_dataset("mnist", data_dir=args.data_dir, train=False).images
    ref, _ = fid.cached_features(test[: args.ref_n], extractor, name="mnist-test")
    print(f"reference: {len(ref)} test images, {time.perf_counter() - t0:.0f} s", flush=True)

    def scores(x: torch.Tensor) -> tuple[float, float, float]:
        t = time.perf_counter()
        fdd = frechet_digit_distance(x, yard.reference, net=yard.net)
        value = fid.fid_from_features(fid.inception_features(x, extractor), ref)
        return fdd, value, time.perf_counter() - t

    lines = [
        f"| row | run | sampler | steps | NFE | FDD (n={args.n}) "
        f"| Inception FID (n={args.n}, reference {len(ref)}) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    if not args.no_floor:
        fdd, value, secs = scores(yard.train.images[: args.n])
        print(f"floor: FDD {fdd:.2f}, FID {value:.2f} ({secs:.0f} s)", flush=True)
        lines.append(f"| {args.n} real training images (floor) | - | - | - | - | {fdd:.2f} "
                     f"| {value:.2f} |")  # fmt: skip
    for label, run, sampler, steps in rows:
        built = load_run(run)
        sampler = sampler or built.cfg.sample.sampler
        steps = steps or built.cfg.sample.steps
        x = draw_samples(built, args.n, sampler=sampler, steps=steps, seed=0,
                         batch_size=args.batch_size)  # fmt: skip
        fdd, value, secs = scores(x)
        print(f"{label}: {sampler} {steps}: FDD {fdd:.2f}, FID {value:.2f} ({secs:.0f} s)",
              flush=True)  # fmt: skip
        lines.append(f"| {label} | `{run}` | {sampler} | {steps} | {nfe(sampler, steps)} "
                     f"| {fdd:.2f} | {value:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.append:
        from _record import record

        notes = (
            f"Both metrics on the same {args.n} samples per row (EMA weights, seed 0). FDD: "
            "Frechet distance to the 10,000 MNIST test images in the digit classifier's "
            f"features. Inception FID: against the first {len(ref)} test images (clean resize to "
            f"299, weights SHA-256 {extractor.sha256[:16]}..., docs/METRICS.md); at n = "
            f"{args.n} it is biased upwards, so it compares rows of this table only. " + args.note
        )
        record(args.title, table, path=args.append, notes=notes.strip())


if __name__ == "__main__":
    main()
