"""Quality per second on one MNIST run: which sampler and step count a preset should default to.

For a trained unconditional MNIST run this draws ``--n`` samples (default 10,000, the size
users evaluate at) with each candidate ``SAMPLER:STEPS`` (the first is the reference, default
DDPM with 50 steps), timing each call alone, and scores them by the Frechet digit distance
(FDD) to the 10,000 MNIST test images. The table gives seconds, images/s, FDD and FDD relative
to the reference; a candidate *qualifies* when its FDD is within ``--ratio`` (1.2) of the
reference's and it took under ``--seconds`` (120); the fastest that qualifies is the
recommended default (the preset's ``sample.sampler`` / ``sample.steps``).

    .venv/bin/python benchmarks/default_sampler.py runs/bench-plc/pixel-mnist \\
        --data-dir ../shared/data/mnist --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _mnist import mnist_yardstick

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import nfe


def parse_candidates(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        out.append((name, int(steps)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an unconditional MNIST run directory")
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--candidates", default="ddpm:50,dpm++2m-sde:10,dpm++2m-sde:15,dpm++2m-sde:20")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=1.2)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    yard = mnist_yardstick(args.data_dir)
    floor = frechet_digit_distance(yard.train.images[: args.n], yard.reference, net=yard.net)
    built = load_run(args.run_dir)
    results = []
    for sampler, steps in parse_candidates(args.candidates):
        t0 = time.perf_counter()
        x = draw_samples(built, args.n, sampler=sampler, steps=steps, seed=0,
                         batch_size=args.batch_size)  # fmt: skip
        seconds = time.perf_counter() - t0
        fdd = frechet_digit_distance(x, yard.reference, net=yard.net)
        results.append((sampler, steps, seconds, fdd))
        print(f"{sampler} {steps} steps: {seconds:.0f} s, FDD {fdd:.2f}", flush=True)

    ref = results[0][3]
    ok = [r for r in results[1:] if r[3] <= args.ratio * ref and r[2] < args.seconds]
    best = min(ok, key=lambda r: r[2]) if ok else None
    rows = [
        "| sampler | steps | NFE | seconds | img/s | FDD | FDD / reference | qualifies |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, (sampler, steps, seconds, fdd) in enumerate(results):
        mark = "reference" if i == 0 else ("**yes**" if results[i] in ok else "no")
        rows.append(
            f"| {sampler} | {steps} | {nfe(sampler, steps)} | {seconds:.0f} "
            f"| {args.n / seconds:.0f} | {fdd:.2f} | {fdd / ref:.2f} | {mark} |"
        )
    rows.append(f"| real training images (floor) | - | - | - | - | {floor:.2f} | - | - |")
    table = "\n".join(rows)
    print(table)
    verdict = (
        f"Recommended default: {best[0]} with {best[1]} steps ({best[2]:.0f} s, FDD "
        f"{best[3] / ref:.2f}x the reference)."
        if best
        else f"No candidate is within {args.ratio:g}x of the reference in {args.seconds:.0f} s."
    )
    print(verdict)
    if args.append:
        from _record import record

        notes = (
            f"Run {args.run_dir}, EMA weights, {args.n} samples per row (seed 0, batch "
            f"{args.batch_size}); qualifies: FDD within {args.ratio:g}x of the reference and "
            f"under {args.seconds:.0f} s. {verdict}"
        )
        record("Default sampler: quality per second (MNIST)", table, path=args.append,
               notes=notes)  # fmt: skip


if __name__ == "__main__":
    main()
