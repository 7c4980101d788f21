"""Training runs: the loop behind ``difflab train``.

A run directory holds ``config.json``, checkpoints (see :mod:`difflab.checkpoint`),
``metrics.csv``, TensorBoard event files, figures and ``finished.json``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab import checkpoint as ckpt
from difflab import distributed as ddp
from difflab.app.build import Built, make_batch_fn, resolve_device, with_model
from difflab.app.config import RunConfig
from difflab.app.cost import run_cost
from difflab.app.progress import training_bar
from difflab.app.report import final_report
from difflab.app.runs import CheckedConfig, build, check_config
from difflab.posthoc_ema import SnapshotStore, parse_sigma_rels
from difflab.safe_io import say
from difflab.tensorboard import EventWriter
from difflab.train import Trainer, TrainingDiverged

__all__ = ["train_run", "TrainResult"]

POSTHOC_DIR = "posthoc-ema"  # the post-hoc EMA snapshots in a run directory (difflab ema)
METRIC_FIELDS = ["step", "loss", "grad_norm", "lr", "examples_per_s", "elapsed_s"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]


def make_loss_fn(built: Built, extra_state: dict[str, Any]) -> Callable:
    """loss_fn(batch, generator) -> (loss, logs): the run kind's objective."""
    return built.kind.loss_fn(built, extra_state)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def train_run(
    cfg: RunConfig | CheckedConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    extend: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = say,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (new, or ``resume=True`` to continue it).

    When resuming, ``cfg`` is the stored config, possibly with a new step count, time budget,
    device or data location (the CLI allows only those); it replaces the stored one.
    ``extend=True`` also continues a finished run that stopped at its step count or time
    budget, when ``cfg`` gives it more. Under ``torchrun`` the run is data-parallel (see
    :mod:`difflab.distributed`); only rank 0 writes files. Everything is built, and the data
    opened, before the run directory is made or locked; SIGTERM saves and stops like Ctrl-C.
    """
    run_dir = Path(run_dir)
    checked = check_config(cfg)  # once, before the run directory is made
    device = resolve_device(checked.cfg.train.device)
    dist = ddp.init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:
        progress, log = False, _silent
    torch.manual_seed(checked.cfg.train.seed)  # the initial weights depend on the seed only
    built = build(checked, device=device)
    trainer = _make_trainer(built, dist)
    lock = _open_run(  # built.cfg: the kind may have set values from the data
        built.cfg, run_dir, trainer, resume=resume, extend=extend, log=log, main=dist.is_main
    )
    try:
        with _stop_signals() as stop:
            info = _train_loop(
                built, trainer, run_dir, dist, stop, resume=resume, progress=progress, log=log
            )
    finally:
        if lock is not None:
            lock.release()
        ddp.shutdown(dist)
    return TrainResult(run_dir, trainer.step, info)


def _make_trainer(built: Built, dist: ddp.DistInfo) -> Trainer:
    """The Trainer of a run: its loss and batches, data-parallel under torchrun."""
    extra_state: dict[str, Any] = {}
    loss_built = built
    batch_fn = make_batch_fn(built)
    if dist.enabled:
        if not built.kind.data_parallel:
            raise ValueError(f"a {built.kind.name} run trains in a single process")
        from torch.nn.parallel import DistributedDataParallel

        ids = [built.device.index] if built.device.type == "cuda" else None
        # the loss calls the wrapper (its backward all-reduces the gradients); the Trainer
        # keeps the module itself (optimizer, EMA and checkpoints see its own names)
        loss_built = built.kind.data_parallel_built(
            built, lambda m: DistributedDataParallel(m, device_ids=ids)
        )
        global_batch = batch_fn

        def batch_fn(step: int, g: torch.Generator) -> Any:  # this rank's rows
            x, y = global_batch(step, g)
            sl = slice(dist.rank, None, dist.world_size)
            return x[sl], (None if y is None else y[sl])

    loss_fn = make_loss_fn(loss_built, extra_state)
    t = built.cfg.train
    return Trainer(
        built.model,
        batch_fn=batch_fn,
        loss_fn=loss_fn,
        lr=t.lr,
        batch_size=t.batch_size,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_decay=t.lr_decay,
        grad_clip=t.grad_clip or None,
        ema_half_life_images=t.ema_half_life,
        ema_rampup_ratio=t.ema_rampup,
        bf16=t.bf16,
        seed=t.seed,
        device=built.device,
        extra_state=extra_state,
        fused_adam=built.device.type == "cuda",
        rank=dist.rank,
        compile=t.compile,
        compile_mode=t.compile_mode,
        adamw=t.adamw,
        channels_last=t.channels_last,
        posthoc_ema=parse_sigma_rels(t.posthoc_ema) if t.posthoc_ema is not None else (),
    )


def _open_run(
    cfg: RunConfig,
    run_dir: Path,
    trainer: Trainer,
    *,
    resume: bool,
    extend: bool,
    log: Callable[[str], None],
    main: bool,
) -> ckpt.RunLock | None:
    """Lock the run directory (rank 0), create it or load its newest valid checkpoint into
    ``trainer``; a finished run is reopened only when ``extend`` gives it more to do."""
    finished = resume and ckpt.is_finished(run_dir)
    if finished and not extend:  # checked before the lock: a refused run is not touched
        raise ckpt.CheckpointError(
            f"{run_dir} already holds a finished run; extend it with --steps N or "
            "--minutes M, or train a new run"
        )
    lock = ckpt.open_run_dir(run_dir, config=cfg.to_dict(), resume=resume) if main else None
    try:
        if resume:
            if ckpt.has_checkpoints(run_dir):  # all corrupt: refused, never a silent step 0
                c = _load_for_resume(run_dir)
                if c.fallback_note():
                    log(f"warning: {c.fallback_note()}")
                c.check_finite("model")
                trainer.load(c.tensors, c.state)
                log(f"resumed {run_dir} at step {trainer.step}")
            else:
                log(f"{run_dir} holds no checkpoint yet; training starts at step 0")
            # an unfinished run at its step count was stopped between its last checkpoint
            # and finished.json: it resumes to write its report; anything else needs more steps
            if trainer.step > cfg.train.steps or (finished and trainer.step == cfg.train.steps):
                raise ValueError(
                    f"{run_dir} is at step {trainer.step}; --steps must be larger to extend it"
                )
            if main and cfg.to_dict() != ckpt.read_config(run_dir):  # new budget, device, data
                ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
            if main and finished:
                (run_dir / "finished.json").unlink()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _load_for_resume(run_dir: Path) -> ckpt.Checkpoint:
    try:
        return ckpt.load_checkpoint(run_dir)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(
            f"cannot resume: {e}; nothing was changed (restore a checkpoint or train a new run)"
        ) from None


class _Window:
    """The metrics of the steps since the last log row: summed on the device, one host sync
    per row; also answers whether any loss since then was NaN or infinite."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.sums: dict[str, Tensor] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, logs: dict[str, Tensor]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def loss_finite(self) -> bool:
        return "loss" not in self.sums or bool(torch.isfinite(self.sums["loss"]))

    def row(self, step: int, trainer: Trainer, dist: ddp.DistInfo, elapsed: float) -> dict:
        means = {k: float(ddp.all_mean(v, dist)) / self.n for k, v in self.sums.items()}
        now = time.perf_counter()
        rate = self.n * self.batch_size / (now - self.t0)
        self.sums, self.n, self.t0 = {}, 0, now
        return {
            "step": step,
            "loss": means["loss"],
            "grad_norm": means["grad_norm"],
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "examples_per_s": rate,
            "elapsed_s": elapsed,
        }


def _diverged(run_dir: Path, step: int, what: str) -> TrainingDiverged:
    """The error of a diverged run, naming the checkpoint that is really kept."""
    kept = ckpt.latest_checkpoint(run_dir)
    if kept is None:
        where = "no checkpoint had been written, so there is nothing to resume"
    else:
        where = f"the last finite checkpoint, {kept.name}, is kept in {run_dir / 'checkpoints'}"
    return TrainingDiverged(
        f"training diverged: {what} at step {step}; {where} (try a lower --lr or "
        "--set train.grad_clip)"
    )


def _train_loop(
    built: Built,
    trainer: Trainer,
    run_dir: Path,
    dist: ddp.DistInfo,
    stop: _StopRequest,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train to ``train.steps`` or the time budget, with logs and checkpoints; then report.
    SIGTERM or Ctrl-C stops it at the next step boundary, with a checkpoint of that step."""
    cfg, t, main = built.cfg, built.cfg.train, dist.is_main
    metrics: Any = _NoLog()
    tb: Any = _NoLog()
    if main:
        metrics = ckpt.MetricsLog(
            run_dir / "metrics.csv", METRIC_FIELDS, resume_step=trainer.step if resume else None
        )
        tb = _tensorboard(run_dir)
    where = f"{dist.world_size} processes" if dist.enabled else str(built.device)
    log(f"{cfg.preset}: {run_cost(cfg).describe()} on {where}, run dir {run_dir}")
    why = built.kind.why_no_diffusers_form(cfg)
    if why and not resume:
        log(f"note: difflab export cannot write this run for diffusers: {why}")
    window = _Window(t.batch_size)
    snapshots = None  # the post-hoc EMA snapshots (rank 0)
    if main and trainer.posthoc is not None:
        snapshots = SnapshotStore(
            run_dir / POSTHOC_DIR, every=t.posthoc_ema_every, keep=t.posthoc_ema_keep
        )

    saved = {"step": trainer.step if resume else -1}  # a resumed step is already on disk

    def save() -> None:
        """A checkpoint of the current step, never of a non-finite state."""
        if saved["step"] == trainer.step:
            return
        if not window.loss_finite():
            raise _diverged(run_dir, trainer.step, "the loss became NaN or infinite")
        tensors, state = trainer.tensors(), trainer.state()  # weights, EMA, optimizer moments
        bad = ckpt.first_non_finite(tensors, "tensors") or ckpt.first_non_finite(state, "state")
        if bad is not None:
            raise _diverged(run_dir, trainer.step, f"{bad} became NaN or infinite")
        if main:
            ckpt.save_checkpoint(run_dir, step=trainer.step, tensors=tensors, state=state)
        saved["step"] = trainer.step

    start = time.perf_counter()
    budget = None if t.max_minutes is None else t.max_minutes * 60.0
    last: dict[str, float] = {}
    stopped_early = False
    bar = training_bar(
        steps=t.steps, initial=trainer.step, budget_s=budget, start=start, disable=not progress
    )
    used = 0.0  # fraction of the time budget spent, as of the last step (the same on every rank)
    try:
        stop.deferring = True  # from here a signal is taken at the next step boundary
        while trainer.step < t.steps:
            # the learning-rate decay's clock: steps or time, whichever is further
            trainer.progress = max(trainer.step / t.steps, used)
            window.add(trainer.train_step())
            step = trainer.step
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                if not window.loss_finite():
                    raise _diverged(run_dir, step, "the loss became NaN or infinite")
                last = window.row(step, trainer, dist, time.perf_counter() - start)
                metrics.append(last)
                tb.scalars(step, {k: v for k, v in last.items() if k != "step"})
                bar.set_postfix(loss=_fmt(last["loss"]), per_s=_fmt(last["examples_per_s"]))
            if step % t.ckpt_every == 0 and step < t.steps:
                save()
            if snapshots is not None and snapshots.due(step):
                _posthoc_snapshot(snapshots, trainer, run_dir)
            if main and t.sample_every and step % t.sample_every == 0 and step < t.steps:
                _progress_samples(built, trainer, run_dir, step)
            if stop.signum is not None:
                break
            if budget is not None:
                used = ddp.all_max((time.perf_counter() - start) / budget, dist, built.device)
                if used > 1.0:
                    stopped_early = True
                    log(f"time budget of {t.max_minutes} min reached at step {step}")
                    break
        save()  # the model, EMA, optimizer and step of one step boundary
        if snapshots is not None:
            _posthoc_snapshot(snapshots, trainer, run_dir)
    finally:
        stop.deferring = False  # a second signal, or one during the report, stops at once
        bar.close()
        metrics.close()
        tb.close()
    if stop.signum is not None:
        raise KeyboardInterrupt(f"signal {stop.signum}")
    info = _finish(built, trainer, run_dir, dist, log=log)
    info.update({"step": trainer.step, "train_seconds": time.perf_counter() - start, "last": last})
    if stopped_early:
        info["stopped_early"] = "time budget"
    if main:
        ckpt.mark_finished(run_dir, info)
    ddp.barrier(dist)
    return info


def _finish(
    built: Built, trainer: Trainer, run_dir: Path, dist: ddp.DistInfo, *, log: Callable
) -> dict[str, Any]:
    """The final report on the EMA weights (rank 0), written into the run directory."""
    in_sync = ddp.ranks_in_sync(built.model, dist)
    if not dist.is_main:
        return {}
    built.model.load_state_dict(trainer.ema.model.state_dict())  # report on the EMA
    built.model.eval()
    info = final_report(built, run_dir, log=log)
    if dist.enabled:
        info.update({"world_size": dist.world_size, "ranks_in_sync": in_sync})
    return info


class _StopRequest:
    """SIGTERM (what cluster schedulers send before preemption) and Ctrl-C while training.

    While ``deferring`` (the training loop), the handler only records the first signal: the
    loop stops at the next step boundary and saves it, so the weights, the EMA, the optimizer,
    the step count (and with it the data order and the random state) are all of one step. A
    signal raised in the middle of a step once saved an optimizer step without its step count.
    A second signal, or one outside the loop, raises ``KeyboardInterrupt`` at once (the last
    checkpoint is kept as it is).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.deferring and self.signum is None:
            self.signum = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopRequest]:
    """Route SIGTERM and SIGINT to a :class:`_StopRequest` (main thread only)."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _silent(msg: str) -> None:
    pass


class _NoLog:
    def append(self, row: dict) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _posthoc_snapshot(snapshots: SnapshotStore, trainer: Trainer, run_dir: Path) -> None:
    """Store the post-hoc EMA profiles of this step (never non-finite ones)."""
    assert trainer.posthoc is not None
    bad = ckpt.first_non_finite(trainer.posthoc.tensors(), "posthoc_ema")
    if bad is not None:
        raise _diverged(run_dir, trainer.step, f"{bad} became NaN or infinite")
    snapshots.write(trainer.step, trainer.posthoc)


def _progress_samples(built: Built, trainer: Trainer, run_dir: Path, step: int) -> None:
    ema = with_model(built, trainer.ema.model)
    built.kind.progress_figure(ema, run_dir / "progress" / f"{step:08d}.png", seed=0)


def _tensorboard(run_dir: Path) -> EventWriter:
    return EventWriter(run_dir / "tb")
