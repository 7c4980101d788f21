"""Flow matching against eps-DDPM and EDM on MNIST at equal training cost: FDD at 10 and 50 NFE.

Give it MNIST runs of the same network trained for the same number of steps (the presets share
the U-Net and recipe of ``mnist-eps``, so equal steps are equal CPU minutes), e.g.::

    difflab train --preset mnist-eps --out runs/cmp-eps --steps 6000 \\
        --data-dir ../shared/data/mnist
    difflab train --preset mnist-fm --out runs/cmp-flow --steps 6000 --data-dir ../shared/data/mnist
    # EDM has no MNIST preset: the mnist-eps preset on EDM's process, preconditioning and loss
    difflab train --preset mnist-eps --out runs/cmp-edm --steps 6000 \\
        --data-dir ../shared/data/mnist \\
        --set diffusion.schedule=edm --set model.parameterization=edm \\
        --set diffusion.weighting=edm --set diffusion.t_sampling=lognormal

    .venv/bin/python benchmarks/flow_vs_diffusion.py runs/cmp-eps runs/cmp-edm runs/cmp-flow \\
        --data-dir ../shared/data/mnist --n 1000 --append BENCHMARKS.md

For every run and every sampler of ``--samplers`` (default: ``ddim``, which is flow-matching
Euler on the flow run, DPM-Solver++(2M), EDM's Heun, and the run's own default sampler) it
draws ``--n`` samples with the same seed at each budget of ``--budgets`` network evaluations
(the most steps whose ``difflab.samplers.nfe`` fits, as benchmarks/sampler_quality.py counts
them; each sampler on its default grid for the run's schedule) and reports the Frechet digit
distance (FDD, :mod:`difflab.evaluation`) to the 10,000 MNIST test images, and with
``--fid-n N`` also the Inception FID of N samples to N test images (:mod:`difflab.fid`). The
goal of the flow-matching issue: the flow run's best FDD at 10 NFE is no worse than the eps
run's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _mnist import mnist_yardstick
from sampler_quality import steps_for_budget

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import SAMPLERS, nfe


def _process(built) -> str:
    """A short name of the run's process and output (e.g. ``flow/flow``, ``linear/eps``)."""
    return f"{built.cfg.diffusion.schedule}/{built.cfg.model.parameterization}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", help="unconditional MNIST run directories")
    ap.add_argument("--data-dir", help="MNIST files (default: the first run's data.data_dir)")
    ap.add_argument("--samplers", default="ddim,dpm++2m,heun", help="comma-separated")
    ap.add_argument("--no-own", action="store_true", help="skip each run's own sampler")
    ap.add_argument("--budgets", default="10,50", help="NFE budgets")
    ap.add_argument("--n", type=int, default=1000, help="samples per cell (FDD)")
    ap.add_argument("--fid-n", type=int, default=0, help="> 0: also Inception FID at this n")
    ap.add_argument("--inception", help="Inception weights (default: difflab.fid.find_inception)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    budgets = sorted(int(b) for b in args.budgets.split(","))
    base = args.samplers.split(",")
    for s in base:
        if s not in SAMPLERS:
            raise SystemExit(f"unknown sampler {s!r}; valid: {', '.join(SAMPLERS)}")
    runs = []
    for run_dir in args.run_dirs:
        built = load_run(run_dir)
        if tuple(built.data_shape) != (1, 28, 28) or built.cfg.model.num_classes:
            raise SystemExit(f"{run_dir} is not an unconditional MNIST run")
        runs.append((run_dir, built))
    steps_trained = {run_dir.name: _trained_steps(run_dir) for run_dir, _ in runs}
    data_dir = args.data_dir or runs[0][1].cfg.data.data_dir or "data/mnist"
    yard = mnist_yardstick(data_dir, cache_dir=args.cache_dir)
    floor = frechet_digit_distance(yard.train.images[: args.n], yard.reference, net=yard.net)
    print(f"real vs real at n={args.n}: FDD {floor:.2f}", flush=True)

    fid_ref = extractor = None
    if args.fid_n > 0:
        from difflab import fid
        from difflab.data.images import load_image_dataset

        extractor = fid.InceptionFeatures(fid.find_inception(args.inception))
        test = load_image_dataset("mnist", data_dir=data_dir, train=False).images
        fid_ref, _ = fid.cached_features(test[: args.fid_n], extractor, name="mnist-test")

    rows = []  # (run, process, sampler, budget, nfe, fdd, fid)
    seconds = 0.0
    for run_dir, built in runs:
        own = built.cfg.sample.sampler
        samplers = base + ([own] if own not in base and not args.no_own else [])
        for sampler in samplers:
            for budget in budgets:
                steps = steps_for_budget(sampler, budget)
                t0 = time.perf_counter()
                x = draw_samples(built, max(args.n, args.fid_n), sampler=sampler, steps=steps,
                                 seed=args.seed, batch_size=args.batch_size)  # fmt: skip
                seconds += time.perf_counter() - t0
                fdd = frechet_digit_distance(x[: args.n], yard.reference, net=yard.net)
                score = None
                if extractor is not None:
                    from difflab import fid

                    feats = fid.inception_features(fid.uint8_images(x[: args.fid_n]), extractor)
                    score = fid.fid_from_features(feats, fid_ref)
                rows.append((run_dir.name, _process(built), sampler, budget,
                             nfe(sampler, steps), fdd, score))  # fmt: skip
                extra = "" if score is None else f", FID {score:.2f}"
                print(f"{run_dir.name} {sampler} {steps} steps ({nfe(sampler, steps)} NFE): "
                      f"FDD {fdd:.2f}{extra}", flush=True)  # fmt: skip

    fid_col = args.fid_n > 0
    head = "| run (process) | steps trained | sampler | " + " | ".join(
        f"FDD <= {b} NFE" + (f" | FID-{args.fid_n} <= {b} NFE" if fid_col else "") for b in budgets
    )
    ncols = len(budgets) * (2 if fid_col else 1)
    lines = [head + " |", "|---|---:|---|" + "---:|" * ncols]
    for run_dir, built in runs:
        name = run_dir.name
        for sampler in dict.fromkeys(r[2] for r in rows if r[0] == name):
            cells = []
            for b in budgets:
                (r,) = [r for r in rows if r[0] == name and r[2] == sampler and r[3] == b]
                cells.append(f"{r[5]:.2f} ({r[4]})")
                if fid_col:
                    cells.append(f"{r[6]:.2f}")
            lines.append(f"| {name} ({_process(built)}) | {steps_trained[name]} | {sampler} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    lines.append(f"| real vs real (floor) | | | {floor:.2f} |" + " |" * (ncols - 1))
    table = "\n".join(lines)

    verdict = ""
    low = budgets[0]
    best = {}
    for run_dir, built in runs:
        scores = [r[5] for r in rows if r[0] == run_dir.name and r[3] == low]
        best[_process(built)] = (run_dir.name, min(scores))
    flow = [v for k, v in best.items() if k.startswith("flow/")]
    eps = [v for k, v in best.items() if k.endswith("/eps")]
    if flow and eps:
        (fname, f), (ename, e) = flow[0], eps[0]
        verdict = (
            f"Best FDD at <= {low} NFE: flow {f:.2f} ({fname}) vs eps {e:.2f} ({ename}); goal "
            f"(flow no worse than eps at equal training): {'met' if f <= e else 'not met'}."
        )
    print(table)
    print(verdict)
    if args.append:
        from _record import record

        notes = (
            f"FDD of {args.n} samples per cell to the 10,000 MNIST test images (lower is "
            f"better); in brackets the NFE spent (ddim on the flow run is flow-matching Euler). "
            f"EMA weights, seed {args.seed} for every cell, each sampler on its default grid; "
            f"{seconds:.0f} s of sampling in all. {verdict}"
        )
        if fid_col:
            notes += f" FID: {args.fid_n} samples against {args.fid_n} MNIST test images."
        record("Flow matching vs eps-DDPM vs EDM on MNIST at equal training", table,
               path=args.append, notes=notes)  # fmt: skip


def _trained_steps(run_dir: Path) -> int | str:
    """The step of the run's newest checkpoint (what was sampled)."""
    from difflab import checkpoint as ckpt

    try:
        return int(ckpt.load_checkpoint(run_dir).state["step"])
    except (KeyError, TypeError, ValueError):
        return "?"


if __name__ == "__main__":
    main()
