"""Training and sampling runs: the loops behind ``difflab train`` and ``difflab sample``.

A run directory holds ``config.json``, checkpoints (see :mod:`difflab.checkpoint`),
``metrics.csv``, TensorBoard event files, figures and ``finished.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab import checkpoint as ckpt
from difflab.app import Built, build, check_config, make_batch_fn
from difflab.config import RunConfig
from difflab.train import Trainer, TrainingDiverged

__all__ = ["train_run", "load_run", "read_run_config", "draw_samples", "TrainResult"]

METRIC_FIELDS = ["step", "loss", "grad_norm", "lr", "examples_per_s", "elapsed_s"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    finished: bool
    metrics: dict[str, float]


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
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (new, or ``resume=True`` to continue it).

    When resuming, ``cfg`` is the stored config, possibly with a new step count, time budget
    or device (the CLI allows only those); it replaces the stored one. Under ``torchrun`` the
    run is data-parallel (see :mod:`difflab.distributed`); only rank 0 writes files.
    """
    from tqdm import tqdm

    from difflab import distributed as ddp
    from difflab.app import resolve_device

    run_dir = Path(run_dir)
    check_config(cfg)  # before the run directory is made
    device = resolve_device(cfg.train.device)
    dist = ddp.init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    main = dist.is_main
    if not main:
        progress, log = False, _silent
    if main:
        if resume:
            ckpt.prepare_run_dir(run_dir, config=cfg.to_dict(), resume=True)
            if ckpt.is_finished(run_dir):
                raise ckpt.CheckpointError(
                    f"{run_dir} already holds a finished run; nothing to resume"
                )
            if cfg.to_dict() != ckpt.read_config(run_dir):  # new budget, device or steps
                ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
        else:
            ckpt.prepare_run_dir(run_dir, config=cfg.to_dict(), resume=False)
    ddp.barrier(dist)
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed only
    built = build(cfg, device=device)
    extra_state: dict[str, Any] = {}
    loss_fn = make_loss_fn(built, extra_state)
    batch_fn = make_batch_fn(built)
    if dist.enabled:
        if built.denoiser is None:
            raise ValueError("the Sohl-Dickstein model trains in a single process")
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        built.denoiser.model = DistributedDataParallel(built.model, device_ids=ids)
        global_batch = batch_fn

        def batch_fn(step: int, g: torch.Generator) -> Any:  # this rank's rows
            x, y = global_batch(step, g)
            sl = slice(dist.rank, None, dist.world_size)
            return x[sl], (None if y is None else y[sl])

    t = cfg.train
    trainer = Trainer(
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
    if resume and ckpt.latest_checkpoint(run_dir) is not None:
        c = ckpt.load_checkpoint(run_dir)
        trainer.load(c.tensors, c.state)
        log(f"resumed {run_dir} at step {trainer.step}")
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

    def save() -> None:
        if main:
            ckpt.save_checkpoint(
                run_dir, step=trainer.step, tensors=trainer.tensors(), state=trainer.state()
            )

    start = time.perf_counter()
    budget = None if t.max_minutes is None else t.max_minutes * 60.0
    window_t, window_n = time.perf_counter(), 0
    acc: dict[str, Tensor] = {}
    acc_n = 0
    last: dict[str, float] = {}
    bar = tqdm(total=t.steps, initial=trainer.step, disable=not progress, dynamic_ncols=True)
    stopped_early = False
    try:
        while trainer.step < t.steps:
            logs = trainer.train_step()
            for k, v in logs.items():
                acc[k] = acc[k] + v if k in acc else v.clone()
            acc_n += 1
            window_n += t.batch_size
            step = trainer.step
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                # one host sync per log interval; the mean over ranks keeps them in step
                means = {k: float(ddp.all_mean(v, dist)) / acc_n for k, v in acc.items()}
                acc, acc_n = {}, 0
                if not math.isfinite(means["loss"]):
                    raise TrainingDiverged(
                        f"loss became {means['loss']} at step {step}; stopped, the last good "
                        f"checkpoint in {run_dir} is kept (try a lower lr or --set train.grad_clip)"
                    )
                now = time.perf_counter()
                rate = window_n / (now - window_t)
                window_t, window_n = now, 0
                row = {
                    "step": step,
                    "loss": means["loss"],
                    "grad_norm": means["grad_norm"],
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "examples_per_s": rate,
                    "elapsed_s": now - start,
                }
                metrics.append(row)
                tb.scalars(step, {k: v for k, v in row.items() if k != "step"})
                last = row
                bar.set_postfix(loss=_fmt(means["loss"]), per_s=_fmt(rate))
            if step % t.ckpt_every == 0 and step < t.steps:
                save()
            if main and t.sample_every and step % t.sample_every == 0 and step < t.steps:
                _progress_samples(built, trainer, run_dir, step)
            if budget is not None:
                over = time.perf_counter() - start > budget
                if ddp.any_rank(over, dist, built.device):
                    stopped_early = True
                    log(f"time budget of {t.max_minutes} min reached at step {step}")
                    break
    except KeyboardInterrupt:
        bar.close()
        save()
        metrics.close()
        raise
    bar.close()
    save()
    metrics.close()
    tb.close()
    in_sync = ddp.ranks_in_sync(built.model, dist)
    info: dict[str, Any] = {}
    if main:
        from difflab.report import final_report

        if dist.enabled:
            built.denoiser.model = built.model  # type: ignore[union-attr]
        built.model.load_state_dict(trainer.ema.model.state_dict())  # report on the EMA
        built.model.eval()
        info = final_report(built, run_dir, log=log)
        info.update(
            {"step": trainer.step, "train_seconds": time.perf_counter() - start, "last": last}
        )
        if dist.enabled:
            info.update({"world_size": dist.world_size, "ranks_in_sync": in_sync})
        if stopped_early:
            info["stopped_early"] = "time budget"
        ckpt.mark_finished(run_dir, info)
    ddp.barrier(dist)
    ddp.shutdown(dist)
    return TrainResult(run_dir, trainer.step, True, info)


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
    group = "ema" if ema else "model"
    built.model.load_state_dict(c.tensors[group])
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
    return torch.cat(out)


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
