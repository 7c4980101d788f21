"""Generation in one to four steps: distil a trained MNIST run with each method and compare the
students' FDD with the teacher's best samplers.

From a teacher run (the 10-minute ``mnist`` run) this distils one student per method with
``difflab distill`` for ``--minutes`` each on this machine (progressive distillation 64 -> 1
DDIM steps in v-prediction; consistency distillation with the teacher's Heun step; easy
consistency tuning; the consistency students of an eps teacher predict v too). A progressive
run's rounds and an ECT run's stages divide its step count, so each run first times 20 steps
and is given the steps that fit its budget. Then it draws
``--n`` samples (default 10,000) from the teacher with DDPM-50 and 10-step SDE-DPM-Solver++(2M)
and from each student in 1, 2 and 4 steps, timing each call, and scores them by the Frechet
digit distance (FDD) to the MNIST test images (``--fid-n`` adds Inception FID at that n).

Goals (issue "Generation in one to four steps"): 2 steps within 1.2x of the teacher's best
FDD, 1 step within 1.5x, and 10,000 samples in under 5 s.

    .venv/bin/python benchmarks/few_step.py runs/mnist-10min --data-dir ../shared/data/mnist \\
        --minutes 10 --out-dir runs/few-step --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _mnist import mnist_yardstick

from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.checkpoint import read_metrics
from difflab.evaluation import frechet_digit_distance
from difflab.samplers import nfe

METHODS = {  # name: difflab distill options
    "progressive": ["--method", "progressive"],
    "consistency-cd": ["--method", "consistency", "--consistency", "cd"],
    "consistency-ect": ["--method", "consistency", "--consistency", "ect"],
}
TEACHER_SAMPLERS = [("ddpm", 50), ("dpm++2m-sde", 10)]
STUDENT_STEPS = [1, 2, 4]


def distill(teacher: Path, out: Path, options: list[str], *, data_dir: str, minutes: float,
            sets: list[str]) -> Path:  # fmt: skip
    """Time 20 steps, then distil for the steps that fit ``minutes`` (also a time budget)."""
    base = [sys.executable, "-m", "difflab", "distill", str(teacher), *options, "--data-dir",
            data_dir, "--no-progress", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    probe = out.with_name(out.name + "-timing")
    subprocess.run([*base, "--out", str(probe), "--steps", "20", "--set", "train.log_every=5"],
                   check=True)  # fmt: skip
    elapsed = read_metrics(probe / "metrics.csv")["elapsed_s"]
    per_step = (elapsed[-1] - elapsed[0]) / 15
    steps = max(20, int(0.95 * minutes * 60 / per_step))
    print(f"{out.name}: {per_step:.3f} s per step -> {steps} steps", flush=True)
    subprocess.run([*base, "--out", str(out), "--steps", str(steps), "--minutes", str(minutes)],
                   check=True)  # fmt: skip
    return out


def score(built, sampler: str, steps: int, *, n: int, batch: int, yard, fid_ref) -> dict:
    t0 = time.perf_counter()
    x = draw_samples(built, n, sampler=sampler, steps=steps, seed=0, batch_size=batch)
    seconds = time.perf_counter() - t0
    row = {"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps), "seconds": seconds,
           "fdd": frechet_digit_distance(x, yard.reference, net=yard.net)}  # fmt: skip
    if fid_ref is not None:
        from difflab import fid

        extractor, ref_features = fid_ref
        feats = fid.inception_features(x[: len(ref_features)], extractor)
        row["fid"] = fid.fid_from_features(feats, ref_features)
    print(f"  {sampler} {steps} steps: {seconds:.2f} s, FDD {row['fdd']:.2f}", flush=True)
    return row


def figure(path: Path, teacher, students: dict) -> None:
    """One row of 16 samples each: the teacher's 10-step SDE-DPM-Solver++(2M), then every
    student in 1 and 2 steps; the same seed for every row."""
    from difflab import viz

    rows = [draw_samples(teacher, 16, sampler="dpm++2m-sde", steps=10, seed=0)]
    for built in students.values():
        rows += [draw_samples(built, 16, sampler=built.cfg.sample.sampler, steps=k, seed=0)
                 for k in (1, 2)]  # fmt: skip
    viz.save_image_grid(torch.cat(rows), path, nrow=16, scale=2)
    print(f"figure: {path} (rows: teacher, then {', '.join(students)} in 1 and 2 steps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", type=Path, help="a trained unconditional MNIST run")
    ap.add_argument("--data-dir", required=True, help="the four MNIST *-ubyte.gz files")
    ap.add_argument("--minutes", type=float, default=10.0, help="distillation budget per method")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out-dir", type=Path, default=Path("runs/few-step"))
    ap.add_argument("--n", type=int, default=10_000, help="samples per row")
    ap.add_argument("--batch-size", type=int, default=1000, help="samples per network call")
    ap.add_argument("--fid-n", type=int, default=0, help="also Inception FID at this n (0: off)")
    ap.add_argument("--set", action="append", default=[], help="difflab distill --set options")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument(
        "--figure",
        type=Path,
        help="PNG: a row of 16 samples per model and steps "
        "(the teacher's, then each student's in 1 and 2 steps), seed 0",
    )
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")

    yard = mnist_yardstick(args.data_dir)
    fid_ref = None
    if args.fid_n:
        from difflab import fid
        from difflab.data.images import load_image_dataset

        extractor = fid.InceptionFeatures(fid.find_inception(None))
        test = load_image_dataset("mnist", data_dir=args.data_dir, train=False).images
        fid_ref = (extractor, fid.cached_features(test[: args.fid_n], extractor,
                                                  name="mnist-test")[0])  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for m in methods:
        out = args.out_dir / m
        if not (out / "finished.json").is_file():
            distill(args.teacher, out, METHODS[m], data_dir=args.data_dir,
                    minutes=args.minutes, sets=args.set)  # fmt: skip
        runs[m] = out

    kw = {"n": args.n, "batch": args.batch_size, "yard": yard, "fid_ref": fid_ref}
    print("teacher", args.teacher, flush=True)
    teacher = load_run(args.teacher)
    rows = [("teacher", score(teacher, s, k, **kw)) for s, k in TEACHER_SAMPLERS]
    best = min(r["fdd"] for _, r in rows)
    verdicts, rounds = [], {}
    for m, run in runs.items():
        print(m, run, flush=True)
        built = load_run(run)
        own = [(m, score(built, built.cfg.sample.sampler, k, **kw)) for k in STUDENT_STEPS]
        rows += own
        fdd = {r["steps"]: r["fdd"] for _, r in own}
        secs = {r["steps"]: r["seconds"] for _, r in own}
        info = json.loads((run / "finished.json").read_text())
        rounds[m] = (info.get("step"), info.get("rounds"))
        one, two = fdd[1] / best, fdd[2] / best
        per_10k = secs[1] * 10_000 / args.n
        verdicts.append(
            f"{m} ({info.get('step')} steps): 2 steps {two:.2f}x the teacher's best FDD "
            f"({'met' if two <= 1.2 else 'not met'}, goal 1.2x); 1 step {one:.2f}x "
            f"({'met' if one <= 1.5 else 'not met'}, goal 1.5x); 10,000 samples in 1 step "
            f"{per_10k:.1f} s ({'met' if per_10k < 5 else 'not met'}, goal < 5 s)"
        )
    head = "| model | sampler | steps | NFE | seconds | FDD | FDD / teacher's best |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if fid_ref is not None:
        head, sep = head + f" FID (n={args.fid_n}) |", sep + "---:|"
    lines = [head, sep]
    for name, r in rows:
        line = (f"| {name} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['seconds']:.2f} "
                f"| {r['fdd']:.2f} | {r['fdd'] / best:.2f} |")  # fmt: skip
        if fid_ref is not None:
            line += f" {r['fid']:.2f} |"
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    for v in verdicts:
        print(v)
    if args.append:
        from _record import record

        notes = (
            f"Teacher {args.teacher} (EMA weights); each student distilled for "
            f"{args.minutes:g} min on this machine ({args.out_dir}); {args.n} samples per row "
            f"(seed 0, batch {args.batch_size}), FDD to the MNIST test images. Goals: "
            + "; ".join(verdicts)
            + ". Progressive rounds (student steps, mean loss, RMS to the teacher's 64-step "
            f"samples): {json.dumps(rounds.get('progressive', (None, None))[1])}."
        )
        record("Few-step generation: distilled students (MNIST)", table, path=args.append,
               notes=notes)  # fmt: skip

    if args.figure is not None:  # last: the table is kept whatever happens here
        figure(args.figure, teacher, {m: load_run(r) for m, r in runs.items()})


if __name__ == "__main__":
    main()
