"""``difflab distill TEACHER_RUN --method progressive|consistency|reflow --out RUN``: the config
of a distillation run (:mod:`difflab.app.distill`) made from its teacher's, trained by
:func:`difflab.app.training.train_run` like every run (progress, checkpoints, resume).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from difflab.app.config import DistillConfig, RunConfig, apply_overrides
from difflab.app.distill import DistillTask, teacher_dir
from difflab.app.frozen import frozen_config
from difflab.app.kinds import kind_of
from difflab.app.runs import import_diffusers_run, is_diffusers_folder, read_run_config
from difflab.app.training import train_run
from difflab.data.hf import resolve_data_dir

__all__ = ["distill_command", "distill_config", "STUDENT_STEPS"]

# the student's sampling steps unless --student-steps: the last round's (progressive), the
# run's default (consistency), one Euler step (reflow)
STUDENT_STEPS = {"progressive": 1, "consistency": 2, "reflow": 1}
# the student's sampler: DDIM on the rounds' grid, consistency sampling, Euler on the flow ODE
STUDENT_SAMPLERS = {"progressive": "ddim", "consistency": "consistency", "reflow": "flow-euler"}
# what --resume may change: the budget, device and data location (as `difflab train --resume`)
RESUME_FIELDS = {"train.max_minutes", "train.device", "train.steps", "data.data_dir"}


def distill_config(
    teacher: str | Path, *, method: str, consistency: str = "cd", student_steps: int | None = None
) -> RunConfig:
    """A new distillation run's config: the teacher's data, network and schedule, with
    ``model.kind=distill``, the ``distill`` section, and a fine-tuning budget (a quarter of the
    teacher's learning rate, at most 100 warm-up steps, 2000 steps, no time limit)."""
    path = teacher_dir(teacher)
    t = frozen_config(path, role="teacher")
    param = t.model.parameterization
    if method in ("progressive", "consistency") and param not in ("x0", "v"):
        # an eps student's x0 at t_max is its eps error times 1 / alpha(t_max) (157 for the
        # DDPM schedule), and a one-step student's samples are that x0: progressive
        # distillation's paper uses v, consistency models EDM's F (v is its sigma_data = 1)
        param = "v"
    steps = student_steps or STUDENT_STEPS.get(method, 1)
    cfg = replace(
        t,
        preset=f"{t.preset}-{method}",
        model=replace(t.model, kind="distill", parameterization=param, frozen=None),
        distill=DistillConfig(method=method, teacher=str(path.resolve()), consistency=consistency),
        train=replace(
            t.train, steps=2000, lr=t.train.lr / 4, warmup_steps=min(t.train.warmup_steps, 100),
            max_minutes=None, sample_every=0,
        ),
        sample=replace(
            t.sample, sampler=STUDENT_SAMPLERS[method], steps=steps, eta=None
        ),
    )  # fmt: skip
    kind = kind_of(cfg)
    if not isinstance(kind, DistillTask):  # a teacher whose data no distillation kind takes
        raise ValueError(f"{teacher} cannot be distilled (data {t.data.name!r})")
    kind.expect_teacher(cfg, t, where=str(teacher))
    return cfg


def distill_command(args: argparse.Namespace) -> int:
    """The body of ``difflab distill`` (a new run from a teacher, or ``--resume RUN``)."""
    for name in ("steps", "batch_size", "lr", "minutes", "student_steps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    flags = {
        "train.steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "train.max_minutes": args.minutes, "train.device": args.device, "train.seed": args.seed,
        "data.data_dir": args.data_dir,
    }  # fmt: skip
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.set
    if args.resume is not None:
        if args.teacher is not None or args.out is not None:
            raise ValueError("--resume RUN continues a distillation run: no TEACHER or --out")
        bad = [o for o in overrides if o.split("=", 1)[0] not in RESUME_FIELDS]
        if bad:
            raise ValueError(f"--resume keeps the run's config; cannot change {bad[0]}")
        cfg = read_run_config(args.resume)
        if not isinstance(kind_of(cfg), DistillTask):
            raise ValueError(f"{args.resume} is not a distillation run (difflab train --resume)")
        run_dir = args.resume
    else:
        if args.teacher is None:
            raise ValueError("name the teacher: difflab distill TEACHER_RUN --method "
                             "progressive|consistency|reflow --out RUN")  # fmt: skip
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = args.out or Path("runs") / f"{Path(args.teacher).name}-{args.method}-{stamp}"
        if is_diffusers_folder(teacher_dir(args.teacher)):
            return _distill_diffusers(args, run_dir, overrides)
        cfg = distill_config(args.teacher, method=args.method, consistency=args.consistency,
                             student_steps=args.student_steps)  # fmt: skip
    if args.preset is not None:
        raise ValueError("--preset is for a diffusers teacher (its data and recipe)")
    _train(args, cfg, run_dir, overrides)
    return 0


def _train(args: argparse.Namespace, cfg: RunConfig, run_dir: Path, overrides: list[str]) -> None:
    cfg = apply_overrides(cfg, overrides)
    if cfg.data.data_dir is not None:  # stored resolved: the run resumes from any folder
        cfg = replace(cfg, data=replace(cfg.data, data_dir=resolve_data_dir(cfg.data.data_dir)))
    extend = args.steps is not None or args.minutes is not None
    train_run(cfg, run_dir, resume=args.resume is not None, extend=extend,
              progress=not args.no_progress)  # fmt: skip


def _distill_diffusers(args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> int:
    """A diffusers teacher: imported into a temporary native run (as ``difflab import`` with
    ``--preset``, default cifar10, for its data and recipe), distilled from there; the student
    stores the teacher, so the temporary run is removed at the end."""
    folder = teacher_dir(args.teacher)
    data = [o for o in overrides if o.startswith("data.")]
    with tempfile.TemporaryDirectory(prefix=f"difflab-import-{folder.name}-") as tmp:
        teacher = Path(tmp) / "teacher"
        import_diffusers_run(folder, teacher, preset=args.preset or "cifar10", overrides=data)
        cfg = distill_config(teacher, method=args.method, consistency=args.consistency,
                             student_steps=args.student_steps)  # fmt: skip
        _train(args, cfg, run_dir, overrides)
    return 0
