"""Guidance on MNIST: class accuracy and Frechet digit distance against the guidance scale.

For a class-conditional MNIST run (``difflab train --preset mnist-cond``) this draws ``--n``
samples per guidance scale, the requested labels balanced over the 10 classes (the same seed,
hence the same initial noise, for every scale), and reports

* accuracy: the fraction of samples that the MNIST classifier of ``difflab.evaluation``
  (``load_or_train_classifier``, trained once and cached) assigns to the requested class;
* FDD: the Frechet digit distance of the samples to the 10,000 MNIST test images.

Scales are classifier-free guidance scales s (0 = unconditional, 1 = conditional; the paper's
w is s - 1). With ``--classifier CLF_RUN`` (``difflab train --preset mnist-classifier``) the
classifier-guidance scale is swept instead, on a conditional or an unconditional run. A first
row measures real training images the same way (the classifier's accuracy and the FDD floor
at this n).

    .venv/bin/python benchmarks/guidance_mnist.py runs/mnist-cond-XXXX --data-dir data/mnist \\
        --n 1000 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _mnist import mnist_yardstick

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.evaluation import (
    classify,
    frechet_digit_distance,
)


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... (n,): every class requested n / K times."""
    return torch.arange(n) % num_classes


def measure(images: torch.Tensor, labels: torch.Tensor, net, reference) -> dict[str, float]:
    """Accuracy of ``net`` at the requested labels and FDD of images (n, 1, 28, 28) in [-1, 1]."""
    accuracy = float((classify(net, images) == labels).double().mean())
    return {"accuracy": accuracy, "fdd": frechet_digit_distance(images, reference, net=net)}


def sweep(
    built,
    scales: list[float],
    *,
    n: int,
    net,
    reference,
    sampler: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 500,
    classifier=None,
    guidance: float | None = None,
) -> list[dict[str, float]]:
    """One row {scale, accuracy, fdd, seconds} per scale (see the module docstring)."""
    labels = balanced_labels(n)
    rows = []
    for s in scales:
        kw: dict = {"guidance": s}
        if classifier is not None:
            kw = {"guidance": guidance, "classifier": classifier, "classifier_scale": s}
        t0 = time.perf_counter()
        x = draw_samples(built, n, sampler=sampler, steps=steps, seed=seed,
                         batch_size=batch_size, cond=labels, **kw)  # fmt: skip
        seconds = time.perf_counter() - t0
        rows.append({"scale": s, **measure(x, labels, net, reference), "seconds": seconds})
        print(
            f"scale {s:g}: accuracy {rows[-1]['accuracy']:.3f}, FDD {rows[-1]['fdd']:.2f} "
            f"({seconds:.0f} s)",
            flush=True,
        )
    return rows


def markdown(rows: list[dict[str, float]], *, floor: dict[str, float], what: str) -> str:
    lines = [
        f"| {what} | class accuracy | FDD | sampling s |",
        "|---|---|---|---|",
        f"| real training images | {floor['accuracy']:.3f} | {floor['fdd']:.2f} | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']:g} | {r['accuracy']:.3f} | {r['fdd']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a class-conditional MNIST run directory")
    ap.add_argument("--data-dir", help="MNIST files (default: the run's data.data_dir)")
    ap.add_argument("--scales", default="0,0.5,1,2,4", help="comma-separated guidance scales")
    ap.add_argument("--n", type=int, default=1000, help="samples per scale")
    ap.add_argument("--sampler", help="default: the run's")
    ap.add_argument("--steps", type=int, help="default: the run's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--classifier", type=Path, help="sweep classifier guidance with this run")
    ap.add_argument("--guidance", type=float, help="fixed CFG scale when sweeping --classifier")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    device = torch.device(args.device)
    built = load_run(args.run_dir, device=device)
    cfg = built.cfg
    if tuple(built.data_shape) != (1, 28, 28):
        raise SystemExit(f"{args.run_dir} makes images of shape {built.data_shape}, not MNIST's")
    classifier = None
    if args.classifier is not None:
        clf_run = load_run(args.classifier, device=device)
        if clf_run.cfg.model.kind != "classifier":
            raise SystemExit(f"{args.classifier} is not a classifier run")
        classifier = clf_run.model
    elif cfg.model.num_classes != 10:
        raise SystemExit(f"{args.run_dir} is not a 10-class conditional run; use --classifier")
    data_dir = args.data_dir or cfg.data.data_dir or "data/mnist"
    scales = [float(v) for v in args.scales.split(",")]
    sampler = args.sampler or cfg.sample.sampler
    steps = args.steps or cfg.sample.steps

    yard = mnist_yardstick(data_dir, cache_dir=args.cache_dir, device=device)
    net, reference, train = yard.net, yard.reference, yard.train
    real = train.images[: args.n]
    floor = measure(real, train.labels[: args.n], net, reference)
    rows = sweep(
        built, scales, n=args.n, net=net, reference=reference, sampler=sampler, steps=steps,
        seed=args.seed, batch_size=args.batch_size, classifier=classifier,
        guidance=args.guidance,
    )  # fmt: skip
    what = "classifier scale" if classifier is not None else "CFG scale s"
    table = markdown(rows, floor=floor, what=what)
    print(table)
    if args.append:
        from _record import record

        if classifier is not None:
            kind = "classifier guidance"
            scale_note = (
                f"Classifier {args.classifier.name} (step {_step(args.classifier)}); CFG scale "
                f"{args.guidance if args.guidance is not None else 'none (conditional)'}."
            )
            if cfg.model.num_classes == 0:
                scale_note = f"Classifier {args.classifier.name} (step {_step(args.classifier)})."
        else:
            kind = "classifier-free guidance"
            scale_note = "CFG scale s: 0 = unconditional, 1 = conditional (paper's w = s - 1)."
        record(
            f"MNIST {kind}: class accuracy and FDD (n = {args.n} per scale)",
            table,
            path=args.append,
            notes=(
                f"Run {args.run_dir.name} (step {_step(args.run_dir)}), {sampler} with {steps} "
                f"steps; FDD against the {yard.n_test:,} test images with the digit classifier "
                f"{(net.cache_info or {}).get('name', '?')}. {scale_note}"
            ),
        )


def _step(run_dir: Path) -> str:
    from difflab.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return "?" if latest is None else latest.name.split("-")[-1].lstrip("0") or "0"


if __name__ == "__main__":
    main()
