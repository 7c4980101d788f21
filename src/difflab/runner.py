"""Training and sampling runs: the loops behind ``difflab train`` and ``difflab sample``.

A run directory holds ``config.json``, checkpoints (see :mod:`difflab.checkpoint`),
``metrics.csv``, TensorBoard event files, figures and ``finished.json``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from difflab import checkpoint as ckpt
from difflab import distributed as ddp
from difflab.app import Built, build, check_config, make_batch_fn, resolve_device
from difflab.config import RunConfig
from difflab.safe_io import say
from difflab.train import Trainer, TrainingDiverged

__all__ = ["train_run", "load_run", "read_run_config", "draw_samples", "TrainResult"]

METRIC_FIELDS = ["step", "loss", "grad_norm", "lr", "examples_per_s", "elapsed_s"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]


def make_loss_fn(built: Built, extra_state: dict[str, Any]) -> Callable:
    """loss_fn(batch, generator) -> (loss, logs) for the configured objective."""
    cfg = built.cfg
    if cfg.model.kind == "sohl-dickstein":

        def sd_loss(batch: tuple[Tensor, Any], g: torch.Generator):
            x0, _ = batch
            return built.model.loss(x0, generator=g), {}

        return sd_loss
    if cfg.model.kind == "classifier":  # noise-aware classifier [Dhariwal & Nichol 2021]
        from difflab.classifier import classifier_loss

        if built.dataset is not None and bool((built.dataset.labels < 0).any()):
            raise ValueError("training a classifier needs a labelled dataset")

        def clf_loss(batch: tuple[Tensor, Tensor], g: torch.Generator):
            loss, _ = classifier_loss(built.model, batch[0], batch[1], built.schedule, generator=g)
            return loss, {}

        return clf_loss

    from difflab.objectives import ImportanceTimeSampler, diffusion_loss

    d = cfg.diffusion
    time_sampler = None
    if d.t_sampling == "importance":
        time_sampler = ImportanceTimeSampler(built.schedule.T)  # type: ignore[attr-defined]
        extra_state["time_sampler"] = time_sampler
    num_classes = cfg.model.num_classes
    p_drop = cfg.model.label_dropout
    task = cfg.model.image_task

    def loss_fn(batch: tuple[Tensor, Tensor | None], g: torch.Generator):
        x0, labels = batch
        cond: Any = None
        if num_classes > 0 and labels is not None:
            drop = torch.rand(labels.shape, generator=g) < p_drop
            cond = torch.where(drop.to(labels.device), torch.full_like(labels, num_classes), labels)
        if task != "none":  # Palette: degrade on the fly with the step's generator
            from difflab.image_to_image import degrade

            image = degrade(x0, task, generator=g)
            cond = {"image": image} if cond is None else {"class": cond, "image": image}
        out = diffusion_loss(
            built.denoiser,
            x0,
            cond=cond,
            loss_type=d.loss_type,
            weighting=d.weighting,
            t_sampling="uniform" if d.t_sampling == "importance" else d.t_sampling,
            time_sampler=time_sampler,
            vlb_weight=d.vlb_weight,
            offset_noise=d.offset_noise,
            generator=g,
        )
        return out.loss, {}

    return loss_fn


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def train_run(
    cfg: RunConfig,
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
    check_config(cfg)  # before the run directory is made
    device = resolve_device(cfg.train.device)
    dist = ddp.init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:
        progress, log = False, _silent
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed only
    built = build(cfg, device=device)
    trainer = _make_trainer(built, dist)
    lock = _open_run(
        cfg, run_dir, trainer, resume=resume, extend=extend, log=log, main=dist.is_main
    )
    try:
        with _sigterm_as_interrupt():
            info = _train_loop(
                built, trainer, run_dir, dist, resume=resume, progress=progress, log=log
            )
    finally:
        if lock is not None:
            lock.release()
        ddp.shutdown(dist)
    return TrainResult(run_dir, trainer.step, info)


def _make_trainer(built: Built, dist: ddp.DistInfo) -> Trainer:
    """The Trainer of a run: its loss and batches, data-parallel under torchrun."""
    extra_state: dict[str, Any] = {}
    loss_fn = make_loss_fn(built, extra_state)
    batch_fn = make_batch_fn(built)
    if dist.enabled:
        if built.denoiser is None:
            raise ValueError("the Sohl-Dickstein model trains in a single process")
        from torch.nn.parallel import DistributedDataParallel

        ids = [built.device.index] if built.device.type == "cuda" else None
        built.denoiser.model = DistributedDataParallel(built.model, device_ids=ids)
        global_batch = batch_fn

        def batch_fn(step: int, g: torch.Generator) -> Any:  # this rank's rows
            x, y = global_batch(step, g)
            sl = slice(dist.rank, None, dist.world_size)
            return x[sl], (None if y is None else y[sl])

    t = built.cfg.train
    return Trainer(
        built.model,
        batch_fn=batch_fn,
        loss_fn=loss_fn,
        lr=t.lr,
        batch_size=t.batch_size,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        grad_clip=t.grad_clip or None,
        ema_half_life_images=t.ema_half_life,
        ema_rampup_ratio=t.ema_rampup,
        bf16=t.bf16,
        seed=t.seed,
        device=built.device,
        extra_state=extra_state,
        fused_adam=built.device.type == "cuda",
        rank=dist.rank,
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
            if ckpt.latest_checkpoint(run_dir) is not None:
                c = ckpt.load_checkpoint(run_dir)
                if c.fallback_note():
                    log(f"warning: {c.fallback_note()}")
                c.check_finite("model")
                trainer.load(c.tensors, c.state)
                log(f"resumed {run_dir} at step {trainer.step}")
            if trainer.step >= cfg.train.steps:
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


def _weights_finite(trainer: Trainer) -> bool:
    tensors = [*trainer.model.parameters(), *trainer.ema.model.parameters()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _train_loop(
    built: Built,
    trainer: Trainer,
    run_dir: Path,
    dist: ddp.DistInfo,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train to ``train.steps`` or the time budget, with logs and checkpoints; then report."""
    cfg, t, main = built.cfg, built.cfg.train, dist.is_main
    metrics: Any = _NoLog()
    tb: Any = _NoLog()
    if main:
        metrics = ckpt.MetricsLog(
            run_dir / "metrics.csv", METRIC_FIELDS, resume_step=trainer.step if resume else None
        )
        tb = _tensorboard(run_dir)
    n_params = sum(p.numel() for p in built.model.parameters())
    where = f"{dist.world_size} processes" if dist.enabled else str(built.device)
    log(f"{cfg.preset}: {n_params / 1e6:.3g}M parameters on {where}, run dir {run_dir}")
    window = _Window(t.batch_size)

    def save() -> None:
        """A checkpoint of the current step, never of a non-finite state."""
        if not window.loss_finite():
            raise _diverged(run_dir, trainer.step, "the loss became NaN or infinite")
        if not _weights_finite(trainer):
            raise _diverged(run_dir, trainer.step, "the weights became NaN or infinite")
        if main:
            ckpt.save_checkpoint(
                run_dir, step=trainer.step, tensors=trainer.tensors(), state=trainer.state()
            )

    start = time.perf_counter()
    budget = None if t.max_minutes is None else t.max_minutes * 60.0
    last: dict[str, float] = {}
    stopped_early = False
    bar = tqdm(total=t.steps, initial=trainer.step, disable=not progress, dynamic_ncols=True)
    try:
        while trainer.step < t.steps:
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
            if main and t.sample_every and step % t.sample_every == 0 and step < t.steps:
                _progress_samples(built, trainer, run_dir, step)
            over = budget is not None and time.perf_counter() - start > budget
            if budget is not None and ddp.any_rank(over, dist, built.device):
                stopped_early = True
                log(f"time budget of {t.max_minutes} min reached at step {step}")
                break
        save()
    except KeyboardInterrupt:
        bar.close()
        save()
        raise
    finally:
        bar.close()
        metrics.close()
        tb.close()
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
    from difflab.report import final_report

    if dist.enabled:
        built.denoiser.model = built.model  # type: ignore[union-attr]
    built.model.load_state_dict(trainer.ema.model.state_dict())  # report on the EMA
    built.model.eval()
    info = final_report(built, run_dir, log=log)
    if dist.enabled:
        info.update({"world_size": dist.world_size, "ranks_in_sync": in_sync})
    return info


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what cluster schedulers send before preemption) saves and stops like Ctrl-C."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silent(msg: str) -> None:
    pass


class _NoLog:
    def append(self, row: dict) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_samples(built: Built, trainer: Trainer, run_dir: Path, step: int) -> None:
    from difflab.app import with_model
    from difflab.report import sample_figure

    sample_figure(with_model(built, trainer.ema.model), run_dir / "progress" / f"{step:08d}.png")


def _tensorboard(run_dir: Path) -> Any:
    try:
        from difflab.tensorboard import EventWriter
    except ImportError:  # pragma: no cover
        return _NoLog()
    return EventWriter(run_dir / "tb")


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` of a run directory, also of runs written by older versions: they
    stored ``sample.eta = 0.0`` (then DDIM's eta, unused) whatever the sampler, which for a
    sampler without an eta means "not set"."""
    from difflab.samplers import SAMPLER_OPTIONS

    cfg = RunConfig.from_dict(ckpt.read_config(Path(run_dir)))
    if cfg.sample.eta is not None and "eta" not in SAMPLER_OPTIONS.get(cfg.sample.sampler, ()):
        return replace(cfg, sample=replace(cfg.sample, eta=None))
    return cfg


def load_run(run_dir: str | Path, *, ema: bool = True, device: torch.device | None = None) -> Built:
    """Rebuild a run's model from its config.json and latest checkpoint (EMA weights)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    built = build(cfg, device=device or torch.device("cpu"), load_data=False)
    c = ckpt.load_checkpoint(run_dir)
    if c.fallback_note():
        say(f"warning: {c.fallback_note()}", err=True)
    group = "ema" if ema else "model"
    c.check_finite(group)
    try:
        built.model.load_state_dict(c.tensors[group])
    except (RuntimeError, KeyError) as e:
        raise ckpt.CheckpointError(
            f"{c.path}: the weights do not fit the model of {run_dir / 'config.json'} "
            f"(was the config edited?): {ckpt.one_line(e)}"
        ) from None
    built.model.eval()
    return built


def draw_samples(
    built: Built,
    n: int,
    *,
    sampler: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 1000,
    cond: Tensor | dict[str, Tensor] | None = None,
    guidance: float | None = None,
    classifier: torch.nn.Module | None = None,
    classifier_scale: float = 1.0,
    callback: Callable[[dict], None] | None = None,
    **options: Any,
) -> Tensor:
    """n samples (n, *data_shape) on the CPU, drawn in batches; a seed reproduces them.

    ``cond``: (n,) class labels or a dict of (n, ...) tensors ({"class", "image"}), sliced per
    batch. ``guidance``: classifier-free guidance scale (class-conditional runs). ``classifier``:
    a noise-aware classifier for classifier guidance at ``classifier_scale`` towards the labels
    of ``cond``; the labels reach the diffusion model only when it is class-conditional.
    ``threshold`` and ``eta`` (in ``options``) default to the run's ``sample.threshold`` and
    ``sample.eta`` (if set and ``sampler`` is the run's ``sample.sampler``).
    """
    from difflab.samplers import sample

    options.setdefault("threshold", built.cfg.sample.threshold)
    if built.cfg.sample.eta is not None and sampler == built.cfg.sample.sampler:
        options.setdefault("eta", built.cfg.sample.eta)  # the eta of the run's own sampler
    g = torch.Generator().manual_seed(seed)
    out = []
    done = 0
    model = built.model
    with torch.no_grad():
        while done < n:
            b = min(batch_size, n - done)
            if built.denoiser is None:
                x = model.sample(b, generator=g)  # type: ignore[operator]
            else:
                den: Any = built.denoiser
                c = _cond_slice(cond, done, done + b, built.device)
                if guidance is not None:
                    from difflab.guidance import ClassifierFreeGuidance

                    den = ClassifierFreeGuidance(
                        built.denoiser, scale=guidance, null_label=built.cfg.model.num_classes
                    )
                if classifier is not None:
                    den, c = _classifier_guided(built, den, c, classifier, classifier_scale)
                x = sample(
                    den,
                    built.schedule,
                    (b, *built.data_shape),
                    sampler=sampler,
                    steps=steps,
                    generator=g,
                    cond=c,
                    callback=callback if done == 0 else None,
                    device=built.device,
                    **options,
                )
            out.append(x.float().cpu())
            done += b
    return finite_samples(torch.cat(out), f"{sampler} with {steps} steps")


def finite_samples(x: Tensor, what: str) -> Tensor:
    """``x`` if every value is finite; otherwise a one-line ``ValueError``: non-finite samples
    are never useful, and a figure or metric of them fails later with an obscure message."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} gave NaN or infinite samples: the model's outputs overflow "
            "(did the run diverge?)"
        )
    return x


def _cond_slice(cond: Any, lo: int, hi: int, device: torch.device) -> Any:
    """Rows lo:hi of a label tensor or of every tensor in a cond dict, on ``device``."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[lo:hi].to(device) for k, v in cond.items()}
    return cond[lo:hi].to(device)


def _classifier_guided(
    built: Built, den: Any, c: Any, classifier: torch.nn.Module, scale: float
) -> tuple[Any, Any]:
    """Wrap ``den`` in classifier guidance towards the labels of ``c``; the cond it keeps."""
    from difflab.guidance import ClassifierGuidance, labels_from_cond

    labels = labels_from_cond(c)
    if labels is None:
        raise ValueError("classifier guidance needs class labels (--class)")
    guided = ClassifierGuidance(den, classifier, built.schedule, scale=scale, labels=labels)
    if built.cfg.model.num_classes == 0:  # an unconditional model must not see the labels
        rest = {k: v for k, v in c.items() if k != "class"} if isinstance(c, dict) else {}
        c = rest or None
    return guided, c
