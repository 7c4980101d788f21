"""Inception FID of real MNIST: the training images against the test images, at n per side.

The floor of FID at n: no model can be expected to score below real data of the same size.
Features are cached (difflab.fid.cached_features), so a second run at the same n is quick and a
larger --n reuses nothing but the weights. With --n 10000 the test side is the reference
statistics difflab eval --metric fid uses for MNIST runs (the 10,000 test images).

    python benchmarks/inception_fid.py --data-dir ../shared/data/mnist --n 200 \
        --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

from difflab import fid  # noqa: E402
from difflab.data.images import load_image_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=200, help="images per side (at most 10,000)")
    p.add_argument("--resize", choices=fid.RESIZE_MODES, default="clean")
    p.add_argument("--inception", help="weights file (default: difflab.fid.find_inception)")
    p.add_argument("--append", help="append the table to this markdown file")
    args = p.parse_args()
    if not 2 <= args.n <= 10_000:
        p.error(f"--n must be in [2, 10000], got {args.n}")
    extractor = fid.InceptionFeatures(fid.find_inception(args.inception))
    sides = {}
    start = time.perf_counter()
    for split, train in (("train", True), ("test", False)):
        images = load_image_dataset("mnist", data_dir=args.data_dir, train=train).images
        sides[split], _ = fid.cached_features(
            images[: args.n], extractor, name=f"mnist-{split}", mode=args.resize
        )
    seconds = time.perf_counter() - start
    value = fid.fid_from_features(sides["train"], sides["test"])
    table = (
        "| real set | reference | n per side | resize | FID | seconds (features, both sides) |\n"
        "|---|---|---:|---|---:|---:|\n"
        f"| MNIST train[:n] | MNIST test[:n] | {args.n} | {args.resize} | {value:.3f} | "
        f"{seconds:.0f} |\n"
    )
    print(table)
    if args.append:
        notes = (
            f"Weights: SHA-256 {extractor.sha256[:16]}... (docs/METRICS.md). Seconds include "
            "the resize and Inception on this CPU; a rerun reads the cached features."
        )
        record("Inception FID of real MNIST (train vs test)", table, path=args.append, notes=notes)


if __name__ == "__main__":
    main()
