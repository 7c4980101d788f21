"""The recipe race: which MNIST training recipe gives the best samples at a fixed CPU budget.

Every recipe is the ``mnist-eps`` preset (the eps-DDPM recipe that ``mnist`` was before the
race; ``mnist`` is now its winner, the ``flow`` recipe) with a list of ``--set`` overrides
(:data:`RECIPES`: the process, eps / v / EDM preconditioning / flow matching; min-SNR-gamma
weighting; the learning rate and its decay; batch size; width and depth; attention and dropout;
the EMA half-life; and the throughput levers channels-last, the AdamW kernel and compile).
Each is trained with the same seed (same initial weights and data order) for ``--minutes`` of
wall-clock time, then scored by

* FDD: the Frechet digit distance of ``--n`` samples to the 10,000 MNIST test images in the
  features of difflab's cached digit classifier (:mod:`difflab.evaluation`), with the run's
  default sampler and with ``--ref-sampler`` at ``--ref-steps`` (DDPM, 50 steps);
* optionally the Inception FID of ``--fid-n`` default-sampler samples against the test images
  (:mod:`difflab.fid`; a second feature space, so that a recipe is not chosen by the metric it
  was tuned on).

The ``--top`` best by FDD are trained again for ``--confirm-minutes`` and scored the same way;
the table (recipe, steps, images/s, FDD at both samplers, FID) is printed and, with
``--append``, appended to BENCHMARKS.md. Runs go to ``--run-root/<stage>-<recipe>``; a finished
run there is scored without training again, and an interrupted step-budget run continues from
its newest checkpoint, so an interrupted race continues.

A time budget needs the machine to itself. ``--steps`` / ``--confirm-steps`` give the budgets
as step counts instead: the preset's rate measured alone (``--minutes 3`` of ``mnist`` is
1,383 steps and 10 minutes 4,611 on the 2-core CPU of BENCHMARKS.md) applies to every recipe
of the same cost per step (the process, the loss weighting, the learning rate, the EMA), and
such runs may share the machine; a recipe that changes the cost of a step (batch, width,
depth, the throughput levers) races on a time budget alone.

    python benchmarks/recipe_race.py --data-dir ../shared/data/mnist --append BENCHMARKS.md
    # a few seconds, to check that it runs:
    python benchmarks/recipe_race.py --data-dir ../shared/data/mnist --minutes 0.05 \\
        --confirm-minutes 0.05 --n 100 --top 1 --recipes baseline,v,edm --run-root runs/race \\
        --set sample.n=16 --set 'model.unet={"base_channels": 8}'
    # where one training step of the mnist preset spends its time (torch.profiler):
    python benchmarks/recipe_race.py --data-dir ../shared/data/mnist --profile
    # the recipes of the preset's cost per step, on step budgets (may share the machine):
    python benchmarks/recipe_race.py --data-dir ../shared/data/mnist --steps 1383 \
        --confirm-steps 4611 --recipes baseline,flow,v,min-snr,edm,lr-4e-3,ema-5k --ref-n 1000
    # paired timing of the throughput levers (100 steps each, interleaved, 3 repeats; threads-1
    # is one intra-op thread against torch's default of one per core):
    python benchmarks/recipe_race.py --data-dir ../shared/data/mnist --time-levers  # --levers a,b
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _mnist import mnist_yardstick

from difflab import checkpoint as ckpt
from difflab.app.config import apply_overrides, get_preset
from difflab.app.runs import check_config, load_run
from difflab.app.sampling import draw_samples
from difflab.app.training import train_run
from difflab.evaluation import frechet_digit_distance
from difflab.safe_io import atomic_write_json

# the recipes' base: the eps-DDPM recipe the race started from (the mnist preset is its winner)
BASE = "mnist-eps"
# name -> --set overrides of BASE; a lever per line, and a few combinations
RECIPES: dict[str, list[str]] = {
    "baseline": [],
    "v": ["model.parameterization=v"],
    "min-snr": ["diffusion.weighting=min-snr"],
    "v+min-snr": ["model.parameterization=v", "diffusion.weighting=min-snr"],
    "edm": [
        "diffusion.schedule=edm",
        "model.parameterization=edm",
        "diffusion.weighting=edm",
        "diffusion.t_sampling=lognormal",
    ],  # fmt: skip
    # flow matching (the mnist-fm preset's process), sampled as eps is by default
    "flow": [
        "model.parameterization=flow",
        "diffusion.schedule=flow",
        "diffusion.t_sampling=logit-normal",
    ],  # fmt: skip
    "lr-1e-3": ["train.lr=1e-3"],
    "lr-4e-3": ["train.lr=4e-3"],
    "lr-cosine": ["train.lr_decay=cosine"],  # cosine to 0 over the budget (steps or minutes)
    "lr-4e-3-cosine": ["train.lr=4e-3", "train.lr_decay=cosine"],
    "batch-32": ["train.batch_size=32"],
    "batch-128": ["train.batch_size=128"],
    "width-24": ['model.unet={"base_channels": 24}'],
    "width-48": ['model.unet={"base_channels": 48}'],
    "depth-2": ['model.unet={"num_res_blocks": 2}'],
    "attn-7": ['model.unet={"attention_resolutions": [7]}'],  # self-attention at the 7x7 level
    "no-mid-attn": ['model.unet={"mid_attention": false}'],  # no attention anywhere
    "dropout-0.1": ['model.unet={"dropout": 0.1}'],  # DDPM's CIFAR-10 rate
    "ema-5k": ["train.ema_half_life=5000"],
    "ema-50k": ["train.ema_half_life=50000"],
    "channels-last": ["train.channels_last=true"],
    "adamw-foreach": ["train.adamw=foreach"],
    "adamw-fused": ["train.adamw=fused"],
    "compile": ["train.compile=true"],  # torch.compile of the network (inductor, C++ on a CPU)
}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE;KEY=VALUE`` (an extra recipe from the command line)."""
    name, _, sets = text.partition("=")
    if not name or not sets:
        raise SystemExit(f"--recipe must look like NAME=section.key=value;..., got {text!r}")
    return name, [s for s in sets.split(";") if s]


def train_recipe(
    sets: list[str], minutes: float, run_dir: Path, args: argparse.Namespace,
    steps: int | None = None,
):  # fmt: skip
    """Train the recipe for ``minutes`` into ``run_dir`` (or reuse it if finished there), or
    for ``steps`` (no time limit: the budget converted at the preset's measured rate);
    returns (steps, images per second of the budget, None for a step budget)."""
    cfg = apply_overrides(get_preset(BASE), [*args.set, *sets])
    cfg = replace(
        cfg,
        data=replace(cfg.data, data_dir=str(Path(args.data_dir).resolve())),
        train=replace(
            cfg.train,
            max_minutes=None if steps is not None else minutes,
            steps=10**9 if steps is None else steps,
            device=args.device,
            seed=args.seed,
        ),  # fmt: skip
    )
    if not ckpt.is_finished(run_dir):
        # an interrupted step budget continues from its newest checkpoint (bit-exact); a
        # time budget cannot be split, so its unfinished run must go first
        resume = (run_dir / "checkpoints" / "latest").exists()
        if resume and steps is None:
            raise SystemExit(f"{run_dir} holds an unfinished time-budget run: delete it first")
        train_run(cfg, run_dir, resume=resume, progress=False,
                  log=lambda m: print(m, flush=True))  # fmt: skip
    done = int(_json(run_dir / "finished.json")["step"])
    if steps is not None:  # a step budget has no seconds of its own
        return done, None
    # images per second of the budget (finished.json's time has the report)
    return done, done * cfg.train.batch_size / (minutes * 60.0)


def score(
    run_dir: Path, step: int, yard: Any, fid: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """FDD with the run's sampler and with the reference sampler; FID if asked for. Kept
    beside the run (``RUN.score.json``, with what was asked and the run's ``step``), so that
    a race continued or split over several processes scores each finished run once."""
    asked = {"n": args.n, "ref": [args.ref_sampler, args.ref_steps, args.ref_n or args.n],
             "fid_n": args.fid_n, "seed": args.seed, "step": step}  # fmt: skip
    kept = run_dir.with_name(run_dir.name + ".score.json")
    if kept.is_file():
        old = _json(kept)
        if old.get("asked") == asked:
            return old["scores"]
    out = _score(run_dir, yard, fid, args)
    atomic_write_json(kept, {"asked": asked, "scores": out})
    return out


def _json(path: Path) -> dict[str, Any]:
    return ckpt.read_json_object(path, missing="missing", invalid="invalid")


def _score(run_dir: Path, yard: Any, fid: Any, args: argparse.Namespace) -> dict[str, Any]:
    built = load_run(run_dir, device=torch.device(args.device))
    s = built.cfg.sample
    out: dict[str, Any] = {"sampler": f"{s.sampler} {s.steps}"}
    draws = {"default": (s.sampler, s.steps, args.n),
             "ref": (args.ref_sampler, args.ref_steps, args.ref_n or args.n)}  # fmt: skip
    for key, (sampler, steps, n) in draws.items():
        t0 = time.perf_counter()
        x = draw_samples(built, n, sampler=sampler, steps=steps, seed=args.seed,
                         batch_size=args.sample_batch)  # fmt: skip
        out[f"{key}_s"] = time.perf_counter() - t0
        out[f"fdd_{key}"] = frechet_digit_distance(x, yard.reference, net=yard.net)
        if key == "default" and fid is not None:
            from difflab.fid import fid_from_features, inception_features

            extractor, ref = fid
            feats = inception_features(x[: args.fid_n], extractor, mode="clean")
            out["fid"] = fid_from_features(feats, ref)
    return out


def _inception(args: argparse.Namespace) -> Any:
    """(extractor, reference features of the test images), or None without --fid-n."""
    if not args.fid_n:
        return None
    from difflab.data.images import load_image_dataset
    from difflab.fid import InceptionFeatures, cached_features, find_inception

    extractor = InceptionFeatures(find_inception(args.inception))
    test = load_image_dataset("mnist", data_dir=args.data_dir, train=False).images
    ref, _ = cached_features(test, extractor, name="mnist-test", mode="clean")
    return extractor, ref


def race(args: argparse.Namespace) -> list[dict[str, Any]]:
    recipes = dict(RECIPES)
    recipes.update(parse_recipe(r) for r in args.recipe)
    names = args.recipes.split(",") if args.recipes else list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]!r}; choose from: {', '.join(recipes)}")
    # the scorers first: training the digit classifier must not eat into a budget
    yard = mnist_yardstick(args.data_dir, cache_dir=args.cache_dir, device=args.device)
    fid = _inception(args)
    rows: list[dict[str, Any]] = []
    stages = [("race", args.minutes, args.steps, names)]
    for stage, minutes, budget_steps, chosen in stages:
        for name in chosen:
            try:
                check_config(apply_overrides(get_preset(BASE), [*args.set, *recipes[name]]))
            except ValueError as e:  # a lever this version lacks: say so, race the rest
                print(f"skipping {name}: {e}", flush=True)
                continue
            run_dir = args.run_root / f"{stage}-{name}"
            steps, img_s = train_recipe(recipes[name], minutes, run_dir, args, budget_steps)
            label = f"{minutes:g} min" + (f" ({budget_steps} steps)" if budget_steps else "")
            scores = score(run_dir, steps, yard, fid, args)
            row = {"stage": label, "recipe": name, "sets": recipes[name],
                   "steps": steps, "img_s": img_s, **scores}  # fmt: skip
            print(_row(row), flush=True)
            rows.append(row)
        if stage == "race" and args.top > 0 and args.confirm_minutes:
            ranked = sorted((r for r in rows if math.isfinite(r["fdd_default"])),
                            key=lambda r: r["fdd_default"])  # fmt: skip
            best = [r["recipe"] for r in ranked[: args.top]]
            stages.append(("confirm", args.confirm_minutes, args.confirm_steps, best))
    return rows


def _row(r: dict[str, Any]) -> str:
    sets = " ".join(f"`{s}`" for s in r["sets"]) or "(preset)"
    fid = f"{r['fid']:.2f}" if "fid" in r else "-"
    img_s = "-" if r["img_s"] is None else f"{r['img_s']:.0f}"
    return (f"| {r['stage']} | {r['recipe']} | {sets} | {r['steps']} | {img_s} | "
            f"{r['fdd_default']:.2f} ({r['sampler']}, {r['default_s']:.0f} s) | "
            f"{r['fdd_ref']:.2f} | {fid} |")  # fmt: skip


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"| budget | recipe | overrides of `{BASE}` | steps | images/s | FDD, default sampler "
            f"(time) | FDD, {args.ref_sampler} {args.ref_steps} (n = {args.ref_n or args.n}) | "
            f"FID (n = {args.fid_n}) |\n"
            "|---|---|---|---:|---:|---:|---:|---:|\n")  # fmt: skip
    return head + "\n".join(_row(r) for r in rows) + "\n"


def profile_step(args: argparse.Namespace) -> None:
    """torch.profiler over ``--profile-steps`` training steps of the BASE preset (after
    three warm-up steps): the time of each phase of a step, then the top operators."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer, cfg = _mnist_trainer([], args)

    def labelled(label: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            with record_function(label):
                return fn(*a, **k)

        return call

    trainer.batch_fn = labelled("phase: data (batch)", trainer.batch_fn)
    trainer.loss_fn = labelled("phase: forward + loss", trainer.loss_fn)
    trainer.ema.update = labelled("phase: EMA update", trainer.ema.update)  # type: ignore[method-assign]
    for _ in range(3):
        trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            with record_function("phase: whole step"):
                trainer.train_step()
    events = {e.key: e.cpu_time_total / 1e3 / args.profile_steps for e in prof.key_averages()}
    step_ms = events["phase: whole step"]
    phases = {
        k: v for k, v in events.items() if k.startswith("phase: ") and k != "phase: whole step"
    }
    optimizer = sum(v for k, v in events.items() if k.startswith("Optimizer.step"))
    phases["phase: optimizer step (AdamW)"] = optimizer
    phases["phase: backward (the rest)"] = step_ms - sum(phases.values())
    print(f"{BASE} preset, batch {cfg.train.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.device}: {step_ms:.1f} ms per step ({cfg.train.batch_size / step_ms * 1e3:.0f} "
          f"images/s under the profiler)")  # fmt: skip
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {k[7:]:<28} {v:7.1f} ms  {100 * v / step_ms:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


LEVERS = ["channels-last", "adamw-foreach", "adamw-fused", "compile", "threads-1"]
# levers that are a thread count, not a config: intra-op threads while that lever's steps run
# (the others run with torch's default, one per core)
LEVER_THREADS = {"threads-1": 1}


def _mnist_trainer(sets: list[str], args: argparse.Namespace) -> Any:
    """The BASE preset's trainer with ``sets``, as ``difflab train`` builds it."""
    from difflab import distributed as ddp
    from difflab.app.runs import build
    from difflab.app.training import _make_trainer  # the run's own trainer

    cfg = apply_overrides(get_preset(BASE), [*args.set, *sets])
    cfg = replace(cfg, data=replace(cfg.data, data_dir=args.data_dir),
                  train=replace(cfg.train, device=args.device, seed=args.seed))  # fmt: skip
    torch.manual_seed(args.seed)
    built = build(cfg, device=torch.device(args.device))
    return _make_trainer(built, ddp.init_from_env(built.device.type)), cfg


def time_levers(args: argparse.Namespace) -> None:
    """Paired timing of the throughput levers against the preset: ``--lever-steps`` steps of
    each in turn (the order rotated every repeat), ``--lever-repeats`` times; prints ms per
    step and each lever's time over the preset's in the same repeat."""
    levers = args.levers.split(",") if args.levers else LEVERS
    unknown = [n for n in levers if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever {unknown[0]!r}; choose from: {', '.join(LEVERS)}")
    names = ["baseline", *levers]
    trainers = {n: _mnist_trainer(RECIPES.get(n, []), args)[0] for n in names}
    default_threads = torch.get_num_threads()

    def threads(n: str) -> None:
        torch.set_num_threads(LEVER_THREADS.get(n, default_threads))

    for n, tr in trainers.items():  # warm-up: allocator, oneDNN primitives, optimizer state,
        # and compilation (the first step of a compiled network compiles it)
        threads(n)
        for _ in range(5):
            tr.train_step()
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.lever_repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            threads(n)
            t0 = time.perf_counter()
            for _ in range(args.lever_steps):
                trainers[n].train_step()
            ms[n].append((time.perf_counter() - t0) * 1e3 / args.lever_steps)
    threads("baseline")
    print("| lever | ms per step (repeats) | time / preset's, per repeat |\n|---|---|---|")
    for n in names:
        ratios = [a / b for a, b in zip(ms[n], ms["baseline"])]
        print(f"| {n} | {', '.join(f'{v:.1f}' for v in ms[n])} | "
              f"{', '.join(f'{q:.3f}' for q in ratios)} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget of the race")
    ap.add_argument("--steps", type=int, default=None,
                    help="the race's budget as a step count (the --minutes budget converted "
                    "at the preset's measured rate, for recipes of its cost per step); the "
                    "runs then take no time limit, so several can share a machine")  # fmt: skip
    ap.add_argument("--confirm-steps", type=int, default=None,
                    help="the confirmation runs' budget as a step count (as --steps)")  # fmt: skip
    ap.add_argument("--confirm-minutes", type=float, default=10.0,
                    help="budget of the confirmation runs (0: none)")  # fmt: skip
    ap.add_argument("--top", type=int, default=3, help="recipes confirmed at the longer budget")
    ap.add_argument("--recipes", help="comma-separated names of RECIPES (default: all)")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=K=V;K=V",
                    help="an extra recipe, e.g. 'flow=diffusion.schedule=...'")  # fmt: skip
    ap.add_argument("--n", type=int, default=10_000, help="samples per FDD")
    ap.add_argument("--ref-sampler", default="ddpm")
    ap.add_argument("--ref-steps", type=int, default=50)
    ap.add_argument("--ref-n", type=int, default=0,
                    help="samples per FDD of the reference sampler (0: --n)")  # fmt: skip
    ap.add_argument("--fid-n", type=int, default=0, help="also the Inception FID of n samples")
    ap.add_argument("--inception", help="Inception weights (default: difflab.fid.find_inception)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run and of sampling")
    ap.add_argument("--sample-batch", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--run-root", type=Path, default=Path("runs/recipe-race"))
    ap.add_argument("--cache-dir", help="where the MNIST classifier is cached")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument("--profile", action="store_true", help="profile one training step instead")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--set", action="append", default=[],
                    help=f"overrides of {BASE} under every recipe")  # fmt: skip
    ap.add_argument("--time-levers", action="store_true",
                    help="paired timing of the throughput levers instead")  # fmt: skip
    ap.add_argument("--lever-steps", type=int, default=100)
    ap.add_argument("--levers", help="comma-separated levers to time (default: all of LEVERS)")
    ap.add_argument("--lever-repeats", type=int, default=3)
    args = ap.parse_args()
    for flag in ("steps", "confirm_steps", "ref_n"):
        value = getattr(args, flag)
        least = 0 if flag == "ref_n" else 1  # --ref-n 0: as --n
        if value is not None and value < least:
            ap.error(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if args.fid_n > args.n:
        ap.error(f"--fid-n ({args.fid_n}) must be at most --n ({args.n})")
    if args.profile:
        profile_step(args)
        return
    if args.time_levers:
        time_levers(args)
        return
    rows = race(args)
    text = table(rows, args)
    print(text)
    if args.append:
        from _record import record

        common = " ".join(f"`{s}`" for s in args.set) or "no overrides"
        notes = (f"Every recipe is the `{BASE}` preset with {common} and the overrides shown, "
                 f"seed {args.seed}, "
                 f"trained for the budget on {args.device}; FDD of {args.n} EMA samples to the "
                 "MNIST test images (lower is better), the default sampler being the "
                 "run's `sample.sampler`/`sample.steps`. The best "
                 f"{args.top} by FDD at the race budget are confirmed at the longer "
                 "one.")  # fmt: skip
        budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
        record(f"Recipe race at {budget} (MNIST)", text, path=args.append, notes=notes)


if __name__ == "__main__":
    main()
