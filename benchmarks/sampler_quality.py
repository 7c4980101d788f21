"""Sample quality against the number of network evaluations, for every sampler, on one MNIST run.

For a trained unconditional MNIST run (e.g. the run of ``benchmarks/mnist_quality.py``) this
draws ``--n`` samples per (sampler, budget) with the same seed and reports the Frechet digit
distance (FDD, :mod:`difflab.evaluation`) to the 10,000 MNIST test images. A budget of B
evaluations gives each sampler the most steps whose cost ``difflab.samplers.nfe`` is <= B
(Heun and DPM-Solver++(2S) spend 2 per step, minus 1 at the last); the table shows the NFE
actually spent. Steps follow each sampler's default spacing (``DEFAULT_SPACING``: trailing for
DDPM and DDIM, Karras' rho = 7 grid for the others) and default options (``dpm++2m-sde`` and
``euler-ancestral`` with eta = 1).

Budgets above ``--max-nfe-all`` (default 100) run only for the samplers in ``--long``
(default ``ddpm``): 1,000 evaluations of every sampler cost ~8x the rest of the table on a CPU.
``--max-nfe-all 1000`` gives the full grid. The target: at 10 evaluations the best sampler is
within 1.5x of the FDD of 1,000-step DDPM. It writes a plot with ``--plot PATH``.

    .venv/bin/python benchmarks/sampler_quality.py runs/bench-mnist-quality \\
        --data-dir ../shared/data/mnist --n 500 --plot docs/images/sampler_quality.png \\
        --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _mnist import mnist_yardstick

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import SAMPLERS, nfe


def steps_for_budget(sampler: str, budget: int) -> int:
    """The most steps whose network-evaluation count is <= budget (at least 1)."""
    steps = 1
    while nfe(sampler, steps + 1) <= budget:
        steps += 1
    return steps


def plot(results: dict, floor: float, ref: float | None, path: Path) -> None:
    """FDD against NFE spent, one line per sampler (results[sampler][budget] = (nfe, fdd))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for name, row in results.items():
        points = sorted(set(row.values()))
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", ms=3, label=name)
    ax.axhline(floor, color="k", ls=":", lw=1, label="real vs real")
    if ref is not None:
        ax.axhline(1.5 * ref, color="gray", ls="--", lw=1, label="1.5 x DDPM-1000")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="FDD")
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an unconditional MNIST run directory")
    ap.add_argument("--data-dir", help="MNIST files (default: the run's data.data_dir)")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--budgets", default="5,10,20,50,100,1000", help="NFE budgets")
    ap.add_argument("--max-nfe-all", type=int, default=100)
    ap.add_argument("--long", default="ddpm", help="samplers also run above --max-nfe-all")
    ap.add_argument("--n", type=int, default=500, help="samples per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--plot", type=Path, help="write the FDD-vs-NFE plot here")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    built = load_run(args.run_dir)
    if tuple(built.data_shape) != (1, 28, 28) or built.cfg.model.num_classes:
        raise SystemExit(f"{args.run_dir} is not an unconditional MNIST run")
    data_dir = args.data_dir or built.cfg.data.data_dir or "data/mnist"
    samplers = args.samplers.split(",")
    for s in samplers:
        if s not in SAMPLERS:
            raise SystemExit(f"unknown sampler {s!r}; valid: {', '.join(SAMPLERS)}")
    budgets = sorted(int(b) for b in args.budgets.split(","))
    long = set(args.long.split(","))

    yard = mnist_yardstick(data_dir, cache_dir=args.cache_dir)
    net, reference = yard.net, yard.reference
    floor = frechet_digit_distance(yard.train.images[: args.n], reference, net=net)
    print(f"real vs real at n={args.n}: FDD {floor:.2f}", flush=True)

    # results[sampler][budget] = (NFE spent, FDD); equal step counts are sampled once
    results: dict[str, dict[int, tuple[int, float]]] = {s: {} for s in samplers}
    seconds = 0.0
    for sampler in samplers:
        by_steps: dict[int, float] = {}
        for budget in budgets:
            if budget > args.max_nfe_all and sampler not in long:
                continue
            steps = steps_for_budget(sampler, budget)
            if steps not in by_steps:
                t0 = time.perf_counter()
                x = draw_samples(built, args.n, sampler=sampler, steps=steps, seed=args.seed,
                                 batch_size=args.batch_size)  # fmt: skip
                seconds += time.perf_counter() - t0
                by_steps[steps] = frechet_digit_distance(x, reference, net=net)
            results[sampler][budget] = (nfe(sampler, steps), by_steps[steps])
            print(f"{sampler} {steps} steps ({nfe(sampler, steps)} NFE): "
                  f"FDD {by_steps[steps]:.2f}", flush=True)  # fmt: skip

    ref = results.get("ddpm", {}).get(1000, (0, None))[1]
    lines = [
        "| sampler | " + " | ".join(f"<= {b} NFE" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for sampler, row in results.items():
        cells = [f"{row[b][1]:.2f} ({row[b][0]})" if b in row else "-" for b in budgets]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    lines.append(f"| real vs real (floor) | {floor:.2f} |" + " |" * (len(budgets) - 1))
    table = "\n".join(lines)
    best10 = min((row[10][1] for row in results.values() if 10 in row), default=None)
    verdict = ""
    if ref is not None and best10 is not None:
        verdict = (
            f"Best at <= 10 NFE: FDD {best10:.2f} = {best10 / ref:.2f} x DDPM-1000 "
            f"({ref:.2f}); target <= 1.5x: {'met' if best10 <= 1.5 * ref else 'not met'}."
        )
    print(table)
    print(verdict)
    if args.plot is not None:
        plot(results, floor, ref, args.plot)
    if args.append:
        from _record import record

        notes = (
            f"FDD of {args.n} samples per cell to the 10,000 MNIST test images (lower is "
            f"better); in brackets the NFE spent. Run `{built.cfg.preset}` from "
            f"{args.run_dir.name}, EMA weights, seed {args.seed} for every cell; "
            f"{seconds:.0f} s of sampling in all. Budgets above {args.max_nfe_all} NFE only "
            f"for {', '.join(sorted(long))}. {verdict}"
        )
        if args.plot is not None:
            notes += f"\n\n![FDD against NFE]({args.plot.as_posix()})"
        record("Sampler quality against network evaluations (MNIST)", table,
               path=args.append, notes=notes)  # fmt: skip


if __name__ == "__main__":
    main()
