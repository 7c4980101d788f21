"""Backbones at equal CPU time: the U-Net, DiT and U-ViT trained on MNIST for the same minutes.

Each preset (default `mnist`, `mnist-dit`, `mnist-uvit`: one recipe, networks of about equal
parameters) is a run of `difflab train`. Wall-clock budgets are unfair on a shared machine
(whoever trains while the machine is busy gets fewer steps), so the budget is converted into
steps instead:

1. every network's training images/s is measured in this process, in interleaved rounds of
   short steps (`_timing.TrainStep`: forward, backward and AdamW at the preset's batch size;
   a latent preset's denoiser on its latent shape, without the frozen encoder);
2. a budget of `--minutes` becomes `minutes * 60 * images/s / batch_size` steps for each;
3. each preset trains that many steps (or `--runs NAME=DIR` gives a trained run);
4. `--n` samples of each run (EMA weights) with the preset's default sampler (DPM-Solver++(2M)
   SDE, 10 network evaluations), timed (sampling images/s), and their FDD: the Frechet
   distance to the MNIST test set in the features of difflab's cached digit classifier
   (`_mnist.py`; lower is better), next to the floor of real training images at equal n.

The table (parameters and forward FLOPs per image from `difflab.app.cost.run_cost`) and a plain
verdict line go to `--append`.

    .venv/bin/python benchmarks/backbone_quality.py --data-dir ../shared/data/mnist \\
        --minutes 10 --append BENCHMARKS.md
    .venv/bin/python benchmarks/backbone_quality.py --data-dir ../shared/data/mnist \\
        --runs mnist=runs/a --runs mnist-dit=runs/b --runs mnist-uvit=runs/c  # trained runs
    # latents (train mnist-ae first): --presets mnist-latent,mnist-latent-dit
    #     --set model.autoencoder=AE_RUN
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from _mnist import mnist_yardstick
from _timing import TrainStep, time_interleaved

from difflab.app.config import apply_overrides, get_preset
from difflab.app.cost import run_cost
from difflab.app.kinds import LatentModel
from difflab.app.runs import build, load_run
from difflab.app.sampling import draw_samples
from difflab.app.training import train_run
from difflab.evaluation import frechet_digit_distance


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--runs expects NAME=RUN_DIR, got {item!r}")
        runs[name] = Path(path)
    return runs


def measure_throughput(cfgs: dict, rounds: int, steps: int, device: str) -> dict[str, float]:
    """Median training images/s of each preset's network, timed in interleaved rounds."""
    benches = {}
    for name, cfg in cfgs.items():
        built = build(cfg, device=torch.device("cpu"), load_data=False)
        net, shape = built.model, built.data_shape
        if isinstance(net, LatentModel):  # the denoiser on the latents; the encoder is frozen
            net, shape = net.unet, net.ae.latent_shape()
        benches[name] = TrainStep(net, shape, cfg.train.batch_size, device, bf16=False)
    time_interleaved(benches, rounds, steps, log=say)
    return {name: bench.images_per_second()[1] for name, bench in benches.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--presets", default="mnist,mnist-dit,mnist-uvit",
                    help="comma-separated training presets (default: %(default)s)")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every preset")  # fmt: skip
    ap.add_argument("--minutes", type=float, default=10.0, help="the CPU budget of each")
    ap.add_argument("--runs", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a trained run of preset NAME: evaluated, not trained")  # fmt: skip
    ap.add_argument("--run-root", type=Path, default=Path("runs/bench-backbones"))
    ap.add_argument("--rounds", type=int, default=4, help="interleaved throughput rounds")
    ap.add_argument("--timing-steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--n", type=int, default=10_000, help="samples (and real images) compared")
    ap.add_argument("--sampler", help="default: each preset's (dpm++2m-sde)")
    ap.add_argument("--steps", type=int, help="sampler steps (default: each preset's, 10)")
    ap.add_argument("--batch-size", type=int, default=1000, help="sampling batch")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.n < 2 or args.rounds < 1 or args.timing_steps < 1:
        ap.error("--minutes must be > 0, --n >= 2, --rounds and --timing-steps >= 1")
    torch.set_num_threads(args.threads)
    given = parse_runs(args.runs)
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = set(given) - set(names)
    if unknown:
        ap.error(f"--runs names presets not in --presets: {', '.join(sorted(unknown))}")
    cfgs = {}
    for name in names:
        cfg = apply_overrides(get_preset(name), args.set)
        cfgs[name] = replace(cfg, data=replace(cfg.data, data_dir=args.data_dir))

    # the evaluation network first: its one-time training must not eat into any budget
    yard = mnist_yardstick(args.data_dir, cache_dir=args.cache_dir, device=args.device)
    floor = frechet_digit_distance(yard.train.images[: args.n], yard.reference, net=yard.net)
    say(f"real vs real at n={args.n}: FDD {floor:.2f}")

    img_s = measure_throughput(cfgs, args.rounds, args.timing_steps, args.device)
    rows = []
    for name, cfg in cfgs.items():
        budget = max(1, round(args.minutes * 60 * img_s[name] / cfg.train.batch_size))
        run_dir, trained = given.get(name), "given run"
        if run_dir is None:
            run_dir = args.run_root / name
            train_cfg = replace(cfg, train=replace(cfg.train, steps=budget, max_minutes=None,
                                                   device=args.device))  # fmt: skip
            say(f"{name}: {img_s[name]:.0f} img/s -> {budget} steps for {args.minutes:g} min")
            t0 = time.perf_counter()
            train_run(train_cfg, run_dir, progress=False, log=say)
            trained = f"{budget} steps in {time.perf_counter() - t0:.0f} s"
        built = load_run(run_dir, device=torch.device(args.device))
        sampler = args.sampler or built.cfg.sample.sampler
        steps = args.steps or built.cfg.sample.steps
        t0 = time.perf_counter()
        x = draw_samples(built, args.n, sampler=sampler, steps=steps, seed=0,
                         batch_size=args.batch_size)  # fmt: skip
        sample_img_s = args.n / (time.perf_counter() - t0)
        fdd = frechet_digit_distance(x, yard.reference, net=yard.net)
        cost = run_cost(built.cfg)
        say(f"{name}: FDD {fdd:.2f}, sampling {sample_img_s:.1f} img/s")
        rows.append((name, built.cfg, cost, img_s[name], budget, trained, sampler, steps,
                     sample_img_s, fdd))  # fmt: skip

    lines = [
        "| preset | network | params | fwd GFLOPs/img | train img/s | steps in budget "
        "| trained | sampler | sample img/s | FDD |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
        f"| {args.n} real training images (floor) | - | - | - | - | - | - | - | - | {floor:.2f} |",
    ]
    for name, cfg, cost, tr, budget, trained, sampler, steps, smp, fdd in rows:
        lines.append(
            f"| {name} | {cfg.model.net} {cfg.model.preset} | {cost.parameters / 1e6:.3f}M "
            f"| {cost.gflops()} | {tr:.0f} | {budget} | {trained} | {sampler}, {steps} steps "
            f"| {smp:.1f} | {fdd:.2f} |"
        )
    ranked = sorted(rows, key=lambda r: r[-1])
    verdict = (
        f"Verdict: at {args.minutes:g} CPU minutes each, ranked by FDD (best first): "
        + ", ".join(f"{r[0]} {r[-1]:.2f}" for r in ranked)
        + f"; {ranked[0][0]} gives the best samples for the same training time."
    )
    table = "\n".join(lines)
    say(table)
    say(verdict)
    if args.append:
        from _record import record

        notes = (
            f"{args.threads} CPU threads. Train img/s: median of {args.rounds} x "
            f"{args.timing_steps} interleaved timed steps per network (forward, backward, AdamW "
            "at the preset's batch size on random data), measured in one process; the budget "
            f"of {args.minutes:g} minutes is that rate times 60 s x minutes, in steps, so the "
            "machine's load while training does not change who gets how many steps (trained: "
            "wall seconds, with the end-of-run report). "
            f"Overrides: {' '.join(args.set) or 'none'}. FDD: Frechet distance of {args.n} "
            "samples (EMA weights) to the 10,000 MNIST test images in the digit classifier's "
            "features (lower is better).\n\n" + verdict
        )
        record(f"Backbones at equal CPU time ({args.minutes:g} min): U-Net, DiT, U-ViT",
               "\n".join(lines), path=args.append, notes=notes)  # fmt: skip


if __name__ == "__main__":
    main()
