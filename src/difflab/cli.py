"""``difflab``: train, sample, evaluate and plot diffusion models from the command line.

    difflab train                          # the default preset (swiss roll, about a minute on CPU)
    difflab train --preset mnist --minutes 10 --data-dir data/mnist
    difflab train --resume runs/mnist-...  # continue a run exactly where it stopped
    difflab sample RUN_DIR --sampler ddim --steps 50 --n 10000 --out samples.npz
    difflab presets                        # list the presets

Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sampler", help="ddpm | ddim | dpm++2m | ... (default: the run's)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, help="output .npz (default RUN_DIR/samples-<time>.npz)")
    p.add_argument("--gif", action="store_true", help="also write the denoising trajectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="label", type=int, help="class label (conditional models)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--device", default="auto")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    sub.add_parser("presets", help="list the presets")
    p = sub.add_parser("viz", help="plots that need no trained model")
    p.add_argument("what", choices=["schedules"])
    p.add_argument("--out", type=Path, default=Path("schedules.png"))
    p.add_argument("--T", type=int, default=1000)
    return parser


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.config import apply_overrides, get_preset
    from difflab.runner import train_run

    for name in ("steps", "batch_size", "lr", "minutes"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.resume is not None:
        if args.out is not None:
            raise ValueError("use either --resume RUN_DIR or --out DIR, not both")
        from difflab.checkpoint import read_config
        from difflab.config import RunConfig

        cfg = RunConfig.from_dict(read_config(args.resume))
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
    overrides += args.set
    if args.resume is not None and overrides:
        # resuming must continue the same run; only the budget and device may change
        allowed = {"train.max_minutes", "train.device", "train.steps"}
        bad = [o for o in overrides if o.split("=", 1)[0] not in allowed]
        if bad:
            raise ValueError(f"--resume keeps the run's config; cannot change {bad[0]}")
    cfg = apply_overrides(cfg, overrides)
    train_run(cfg, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difflab import viz
    from difflab.app import resolve_device
    from difflab.data.images import to_uint8
    from difflab.runner import draw_samples, load_run

    _positive("--n", args.n)
    _positive("--steps", args.steps)
    built = load_run(args.run_dir, ema=not args.no_ema, device=resolve_device(args.device))
    cfg = built.cfg
    sampler = args.sampler or cfg.sample.sampler
    steps = args.steps or cfg.sample.steps
    cond = None
    if args.label is not None or args.guidance is not None:
        k = cfg.model.num_classes
        if k == 0:
            raise ValueError("--class/--guidance need a class-conditional run (model.num_classes)")
        if args.label is None or not 0 <= args.label < k:
            raise ValueError(f"--class must be in 0..{k - 1}")
        cond = torch.full((args.n,), args.label, dtype=torch.long)
    options = {} if args.eta is None else {"eta": args.eta}
    frames: list = []
    callback = (lambda info: frames.append(info["x"].float().cpu())) if args.gif else None
    x = draw_samples(
        built,
        args.n,
        sampler=sampler,
        steps=steps,
        seed=args.seed,
        batch_size=args.batch_size,
        cond=cond,
        guidance=args.guidance,
        callback=callback,
        **options,
    )
    out = args.out or args.run_dir / f"samples-{time.strftime('%Y%m%d-%H%M%S')}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if cfg.data.is_toy:
        np.savez_compressed(out, samples=x.numpy())
        viz.scatter(x, png, title=f"{sampler}, {steps} steps")
    else:
        np.savez_compressed(out, samples=to_uint8(x).numpy())
        viz.save_image_grid(x[:256], png, scale=2 if x.shape[-1] <= 32 else 1)
    if args.gif and frames:
        frames.append(x[: frames[0].shape[0]])
        gif = out.with_suffix(".gif")
        if cfg.data.is_toy:
            viz.scatter_trajectory_gif(frames, gif)
        else:
            viz.image_trajectory_gif([f[:64] for f in frames], gif)
    print(f"wrote {out} and {png}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from difflab.config import PRESETS

    for name, cfg in PRESETS.items():
        what = cfg.data.name
        print(f"{name:18s} data={what:14s} model={cfg.model.kind:15s} steps={cfg.train.steps}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import numpy as np

    from difflab import viz
    from difflab.schedules import DiscreteSchedule

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
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "presets": cmd_presets, "viz": cmd_viz}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from difflab.checkpoint import CheckpointError
    from difflab.train import TrainingDiverged

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "difflab: interrupted; the last checkpoint is kept (resume with --resume)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"difflab: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
