"""Distillation runs: a few-step student of a frozen teacher run, trained by the training loop
of every run (``difflab distill TEACHER_RUN --method progressive|consistency|reflow --out
RUN``).

A distillation run's config is its teacher's (data, network, schedule) with
``model.kind=distill`` and a ``distill`` section; the teacher is a frozen dependency
(:mod:`difflab.app.frozen`): its config and EMA weights are stored in the run, which keeps
sampling after the teacher's directory is moved or deleted. The student starts as a copy of
the teacher.

=================  ===========================================================================
method             what the student learns, and how it samples
=================  ===========================================================================
``progressive``    rounds that halve the DDIM steps from ``distill.teacher_steps`` to
                   ``sample.steps``; the target is two DDIM steps of the previous round's model
                   (the teacher in round 0), x0 or v parameterisation, truncated-SNR weighting
                   [Salimans & Ho 2022, Algorithm 2]; samples with ``ddim`` on the trailing grid
``consistency``    a consistency model f(x, t) with f(x, t_min) = x exactly [Song 2023, App. C]:
                   ``distill.consistency=cd`` distils it with a Heun step of the teacher's
                   PF-ODE [Song 2023, Algorithm 2]; ``ect`` tunes it with ECT's shrinking gap
                   and pseudo-Huber loss [Geng 2024]; samples with ``consistency`` in 1 step or
                   at the intermediate EDM sigmas of ``distill.sigmas``
``reflow``         a flow-matching teacher only: ``distill.reflow_pairs`` (noise, sample) pairs
                   of the teacher's ODE (``distill.reflow_steps`` Heun steps) are drawn once
                   and kept in the run; the student fits the straight line between each pair
                   [Liu 2023, Algorithm 1], so its flow is straighter (the report gives the
                   straightness S of both); samples with the flow samplers in few steps
=================  ===========================================================================

The round (progressive), the step that sets ECT's stage and the reflow pairs are kept in the
model's buffers, so they are in every checkpoint and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab import viz
from difflab.app.build import Built, build_schedule, cfg_data_shape, diffusion_denoiser
from difflab.app.config import RunConfig
from difflab.app.frozen import (
    FrozenRun,
    frozen_config,
    load_frozen_run,
    stored_frozen,
    with_frozen,
)
from difflab.app.report import grid_scale, points_report, trajectory
from difflab.app.sampling import sample_with_denoiser
from difflab.distill.consistency import (
    ConsistencyDenoiser,
    consistency_distillation_loss,
    ect_loss,
    karras_levels,
)
from difflab.distill.progressive import DISTILL_WEIGHTINGS, progressive_grids, progressive_loss
from difflab.distill.reflow import reflow_loss, reflow_pairs, straightness
from difflab.safe_io import say
from difflab.sampler_table import SAMPLER_TABLE
from difflab.samplers import SAMPLERS
from difflab.samplers.common import ThresholdedDenoiser, prior_noise
from difflab.schedules import Schedule, check_choice, sampling_timesteps

__all__ = [
    "DISTILL_METHODS",
    "DistillModel",
    "DistillTask",
    "consistency_times",
    "rounds_of",
    "teacher_dir",
]

DISTILL_METHODS = ("progressive", "consistency", "reflow")
CONSISTENCY_MODES = ("cd", "ect")
STUDENT_PARAMETERIZATIONS = ("x0", "v")  # progressive: the paper's (eps fails at high noise)
TEACHER = "teacher"  # its role in model.frozen
REF_SAMPLES = {"2-D": 512, "image": 32}  # progressive: the fixed noise the rounds are scored on
PAIR_CHUNK = 1000  # reflow: pairs drawn per call of the teacher's ODE


class DistillModel(nn.Module):
    """The student, the frozen teacher (EMA weights) and, for progressive distillation, the
    previous round's model; buffers hold the round state and the per-round record.

    Buffers: ``steps_done`` (the optimisation steps taken: rounds and ECT stages follow it),
    ``round``, ``round_loss`` / ``round_count`` (the summed loss and steps of each round),
    ``round_rms`` (each round's RMS distance to the teacher's samples from ``ref_noise``,
    ``ref_teacher``: the teacher's ``distill.teacher_steps``-step DDIM samples from that noise);
    for reflow (``pair_shape`` given), ``pair_noise`` and ``pair_x0`` (P, ...) hold the
    teacher's ODE pairs; the other methods have no such buffers, so their state dicts are those
    of runs saved before reflow existed.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, *, rounds: int, ref_shape: tuple,
        pair_shape: tuple | None = None,
    ):  # fmt: skip
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.round_teacher = copy.deepcopy(self.teacher) if rounds > 0 else None  # progressive only
        r = max(rounds, 1)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self.register_buffer("round", torch.zeros((), dtype=torch.int64))
        self.register_buffer("round_loss", torch.zeros(r, dtype=torch.float64))
        self.register_buffer("round_count", torch.zeros(r, dtype=torch.int64))
        self.register_buffer("round_rms", torch.zeros(r, dtype=torch.float64))
        self.register_buffer("ref_noise", torch.zeros(ref_shape))
        self.register_buffer("ref_teacher", torch.zeros(ref_shape))
        if pair_shape is not None:
            self.register_buffer("pair_noise", torch.zeros(pair_shape))
            self.register_buffer("pair_x0", torch.zeros(pair_shape))

    def train(self, mode: bool = True) -> DistillModel:
        """Train the student; the teachers stay in eval mode (no dropout in the targets)."""
        super().train(mode)
        self.teacher.eval()
        if self.round_teacher is not None:
            self.round_teacher.eval()
        return self


def rounds_of(cfg: RunConfig) -> int:
    """Progressive distillation: the rounds from ``distill.teacher_steps`` to ``sample.steps``
    (0 for consistency runs)."""
    d = cfg.distill
    if d.method != "progressive":
        return 0
    ratio = d.teacher_steps // cfg.sample.steps
    if d.teacher_steps % cfg.sample.steps or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(
            f"distill.teacher_steps ({d.teacher_steps}) must be sample.steps "
            f"({cfg.sample.steps}) times a power of 2 (rounds halve the steps)"
        )
    return ratio.bit_length() - 1


def consistency_times(cfg: RunConfig, schedule: Schedule, steps: int) -> Tensor:
    """The decreasing grid t_max > t_1 > ... > 0 of ``steps``-step consistency sampling
    [Song 2023, Algorithm 1]: the intermediate times are the EDM sigmas stored for that step
    count in ``distill.sigmas`` (a JSON object, e.g. ``{"2": [0.821]}``, the paper's CIFAR-10
    2-step level)."""
    table = _sigma_table(cfg.distill.sigmas)
    if steps != 1 and str(steps) not in table:
        counts = ", ".join(["1", *table])
        raise ValueError(
            f"this consistency run samples in {counts} steps (distill.sigmas); got --steps {steps}"
        )
    sigmas = table.get(str(steps), [])
    bad = [s for s in sigmas if not schedule.sigma_min < s < schedule.sigma_max]
    if len(sigmas) != steps - 1 or bad or sigmas != sorted(sigmas, reverse=True):
        raise ValueError(
            f"distill.sigmas[{steps!r}] must be {steps - 1} decreasing EDM sigmas inside "
            f"({schedule.sigma_min:.4g}, {schedule.sigma_max:.4g}), got {sigmas}"
        )
    mid = schedule.t_from_edm_sigma(torch.tensor(sigmas, dtype=torch.float64)).tolist()
    return torch.tensor([schedule.t_max, *mid, 0.0], dtype=torch.float64)


def _sigma_table(text: str) -> dict[str, list[float]]:
    try:
        table = json.loads(text)
        if not isinstance(table, dict):
            raise TypeError("not an object")
        return {str(k): [float(s) for s in v] for k, v in table.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(
            f'distill.sigmas must be a JSON object like {{"2": [0.821]}}, got {text!r} ({e})'
        ) from None


class DistillTask:
    """The distillation task, mixed into the 2-D and the image diffusion kind
    (:data:`difflab.app.kinds.KINDS`: ``distill-2d``, ``distill-image``), which give it
    :meth:`distillable`."""

    model_kind = "distill"
    data_parallel = False
    has_likelihood = False
    no_diffusers_form = "a distilled student samples with its own few-step sampler"

    def is_consistency_model(self, cfg: RunConfig) -> bool:
        return cfg.distill.method == "consistency"

    @staticmethod
    def is_reflow(cfg: RunConfig) -> bool:
        return cfg.distill.method == "reflow"

    def distillable(self, teacher: RunConfig) -> str | None:
        """None if a run of config ``teacher`` can be distilled, else the name of its kind."""
        raise NotImplementedError

    # --------------------------------------------------------------------- config and teacher
    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)  # type: ignore[misc]
        d = cfg.distill
        check_choice("distill.method", d.method, DISTILL_METHODS)
        check_choice("distill.weighting", d.weighting, DISTILL_WEIGHTINGS)
        check_choice("distill.consistency", d.consistency, CONSISTENCY_MODES)
        spec = SAMPLER_TABLE.get(cfg.sample.sampler)
        consistent = spec is not None and spec.consistency
        if consistent != self.is_consistency_model(cfg):
            what = "the consistency sampler" if consistent else f"{cfg.sample.sampler!r}"
            raise ValueError(
                f"a {d.method} run cannot sample with {what} (sample.sampler); use "
                f"{'consistency' if self.is_consistency_model(cfg) else 'ddim'}"
            )
        if self.is_consistency_model(cfg):
            schedule = build_schedule(cfg)
            if not math.isfinite(schedule.sigma_max):
                # Karras levels, c_skip and c_out need a finite largest level (Song 2023: 80)
                raise ValueError(
                    "a consistency model needs a schedule whose noisiest level is finite; "
                    f"diffusion.schedule={cfg.diffusion.schedule!r} ends in pure noise (EDM "
                    "sigma = inf at t = 1): distil a flow-matching teacher with --method "
                    "reflow or progressive"
                )
            for steps in (cfg.sample.steps, *_sigma_table(d.sigmas)):
                if not str(steps).isdigit():
                    raise ValueError(f"distill.sigmas: {steps!r} is not a step count")
                consistency_times(cfg, schedule, int(steps))
        elif self.is_reflow(cfg):
            if cfg.diffusion.schedule != "flow":
                raise ValueError(
                    "reflow straightens a flow-matching model: its teacher must be a run with "
                    f"diffusion.schedule=flow, not {cfg.diffusion.schedule!r} (train the "
                    "teacher with e.g. --preset mnist-fm)"
                )
            if cfg.model.num_classes > 0:
                raise ValueError("reflow distils an unconditional teacher (model.num_classes=0)")
        else:
            rounds_of(cfg)
            sampling_timesteps(build_schedule(cfg), d.teacher_steps)  # the first round's grid
            check_choice(
                "model.parameterization (a progressive student's)",
                cfg.model.parameterization, STUDENT_PARAMETERIZATIONS,
            )  # fmt: skip
        teacher = self.teacher_config(cfg)
        if teacher is not None:
            self.expect_teacher(cfg, teacher, where=d.teacher or "the stored teacher")

    @staticmethod
    def teacher_config(cfg: RunConfig) -> RunConfig | None:
        """The teacher's config: stored in the run (``model.frozen``), or read from
        ``distill.teacher`` (a new run); None when neither is set."""
        stored = stored_frozen(cfg.model.frozen, TEACHER)
        if stored is not None:
            return stored
        if cfg.distill.teacher is None:
            return None
        return frozen_config(teacher_dir(cfg.distill.teacher), role="distill.teacher")

    def expect_teacher(self, cfg: RunConfig, teacher: RunConfig, *, where: str) -> None:
        """The teacher is a plain diffusion run of this run's data shape, network and schedule."""
        other = self.distillable(teacher)
        if other is not None:
            raise ValueError(
                f"{where} is a {other} run; distillation needs a diffusion run "
                "(model.kind=diffusion, without an image task)"
            )
        if tuple(cfg_data_shape(teacher)) != tuple(cfg_data_shape(cfg)):
            raise ValueError(
                f"{where} models data of shape {tuple(cfg_data_shape(teacher))}, this run "
                f"{tuple(cfg_data_shape(cfg))} (data.*): a student learns its teacher's data"
            )
        for field in ("net", "preset", "hidden", "depth", "unet", "num_classes",
                      "learned_variance"):  # fmt: skip
            if getattr(teacher.model, field) != getattr(cfg.model, field):
                raise ValueError(
                    f"model.{field} is {getattr(cfg.model, field)!r} but {where} has "
                    f"{getattr(teacher.model, field)!r}: the student is a copy of the teacher"
                )
        if teacher.diffusion != cfg.diffusion:
            raise ValueError(f"the diffusion section must be that of {where} (its schedule)")

    # ----------------------------------------------------------------------------- building
    def build_model(
        self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule
    ) -> nn.Module:
        student = super().build_model(cfg, data_shape, sched)  # type: ignore[misc]
        teacher = copy.deepcopy(student)
        n = REF_SAMPLES[self.data]  # type: ignore[attr-defined]
        pairs = (cfg.distill.reflow_pairs, *data_shape) if self.is_reflow(cfg) else None
        return DistillModel(student, teacher, rounds=rounds_of(cfg), ref_shape=(n, *data_shape),
                            pair_shape=pairs)  # fmt: skip

    def denoiser(self, cfg: RunConfig, model: nn.Module, schedule: Schedule) -> Any:
        den = diffusion_denoiser(cfg, model.student, schedule)  # type: ignore[arg-type]
        if not self.is_consistency_model(cfg):
            return den
        return ConsistencyDenoiser(den, schedule, sigma_data=cfg.diffusion.sigma_data)

    def teacher_denoiser(self, built: Built) -> Any:
        """The frozen teacher as a denoiser, in the teacher's own parameterisation."""
        teacher_cfg = self.teacher_config(built.cfg) or built.cfg
        return diffusion_denoiser(teacher_cfg, built.model.teacher, built.schedule)  # type: ignore

    def on_data(self, built: Built) -> Built:
        """A new run: load the teacher's EMA weights, copy them into the student, draw the
        teacher's reference samples, and store the teacher (``model.frozen``)."""
        cfg = built.cfg
        stored = stored_frozen(cfg.model.frozen, TEACHER)
        if stored is not None:  # a trained run: its checkpoints hold the teacher
            return built
        if cfg.distill.teacher is None:
            raise ValueError(
                "a distillation run needs its teacher: difflab distill TEACHER_RUN --method "
                "progressive|consistency|reflow --out RUN (or --set distill.teacher=RUN)"
            )
        m: Any = built.model
        teacher = self.load_teacher(cfg, m.teacher)
        m.student.load_state_dict(m.teacher.state_dict())
        if m.round_teacher is not None:
            m.round_teacher.load_state_dict(m.teacher.state_dict())
            self.reference_samples(built)
        if self.is_reflow(cfg):
            self.draw_pairs(built)
        frozen = with_frozen(cfg.model.frozen, TEACHER, teacher)
        new = replace(cfg, model=replace(cfg.model, frozen=frozen),
                      distill=replace(cfg.distill, teacher=teacher.path))  # fmt: skip
        return replace(built, cfg=new)

    def load_teacher(self, cfg: RunConfig, into: nn.Module) -> FrozenRun:
        """Load the EMA weights of ``distill.teacher`` into ``into``, checked against the run."""
        path = teacher_dir(cfg.distill.teacher)  # type: ignore[arg-type]
        return load_frozen_run(
            path, into, role="distill.teacher",
            expect=lambda t: self.expect_teacher(cfg, t, where=str(path)),
        )  # fmt: skip

    # ----------------------------------------------------------------------------- training
    def loss_fn(self, built: Built, extra_state: dict[str, Any]) -> Any:
        cfg, m = built.cfg, built.model
        if self.is_consistency_model(cfg):
            step_loss = self.consistency_loss(built)
        elif self.is_reflow(cfg):
            step_loss = self.reflow_step_loss(built)
        else:
            step_loss = self.progressive_step_loss(built)
        num_classes = cfg.model.num_classes

        def loss_fn(batch: tuple[Tensor, Tensor | None], g: torch.Generator):
            x0, labels = batch
            cond = labels if num_classes > 0 else None
            step = int(m.steps_done)
            loss = step_loss(x0, cond, step, g)
            with torch.no_grad():
                m.steps_done += 1
            return loss, {}

        return loss_fn

    def consistency_loss(self, built: Built) -> Any:
        cfg, d = built.cfg, built.cfg.distill
        student, schedule = built.denoiser, built.schedule
        if d.consistency == "cd":
            teacher = self.teacher_denoiser(built)
            ts = karras_levels(schedule, d.levels)
            return lambda x0, cond, step, g: consistency_distillation_loss(
                student, student, teacher, x0, schedule=schedule, ts=ts, generator=g, cond=cond
            )  # the target is the student itself without gradient (as iCT and ECT)
        total = cfg.train.steps

        def ect(x0: Tensor, cond: Any, step: int, g: torch.Generator) -> Tensor:
            stage = min(step * d.stages // total, d.stages - 1)
            return ect_loss(student, x0, schedule=schedule, stage=stage, c=d.huber_c,
                            generator=g, cond=cond)  # fmt: skip

        return ect

    def reflow_step_loss(self, built: Built) -> Any:
        """Reflow: a batch of the stored pairs (drawn with replacement), the rectified-flow loss
        on them; the data batch only sets the batch size."""
        m: Any = built.model

        def loss(x0: Tensor, cond: Any, step: int, g: torch.Generator) -> Tensor:
            idx = torch.randint(m.pair_x0.shape[0], (x0.shape[0],), generator=g).to(x0.device)
            return reflow_loss(built.denoiser, m.pair_x0[idx], m.pair_noise[idx],
                               schedule=built.schedule, generator=g)  # fmt: skip

        return loss

    @torch.no_grad()
    def draw_pairs(self, built: Built) -> None:
        """Reflow's coupling [Liu 2023, Algorithm 1]: noise seeded by ``train.seed`` and the
        teacher's ODE solution from it (flow-heun, ``distill.reflow_steps`` steps)."""
        m: Any = built.model
        g = torch.Generator().manual_seed(built.cfg.train.seed + 1)
        teacher = self.teacher_denoiser(built)
        noise = prior_noise(built.schedule, tuple(m.pair_noise.shape), generator=g)
        n, steps = noise.shape[0], built.cfg.distill.reflow_steps
        say(f"reflow: drawing {n:,} pairs from the teacher's ODE ({steps} flow-heun steps each)")
        start = time.perf_counter()
        for i in range(0, n, PAIR_CHUNK):
            z = noise[i : i + PAIR_CHUNK].to(built.device)
            _, x0 = reflow_pairs(teacher, built.schedule, z, steps=steps)
            m.pair_noise[i : i + PAIR_CHUNK] = z
            m.pair_x0[i : i + PAIR_CHUNK] = x0
            if n > PAIR_CHUNK:  # a line per chunk: minutes for an image teacher on a CPU
                done = min(i + PAIR_CHUNK, n)
                say(f"reflow: {done:,} of {n:,} pairs, {time.perf_counter() - start:.0f} s")

    def progressive_step_loss(self, built: Built) -> Any:
        """Round r of R covers steps [r S, (r + 1) S), S = ceil(train.steps / R): its student
        takes N = teacher_steps / 2^(r + 1) steps; at its start the previous round's student
        becomes the teacher (its score is recorded first)."""
        cfg, m = built.cfg, built.model
        rounds = rounds_of(cfg)
        per_round = math.ceil(cfg.train.steps / rounds)
        first_teacher = self.teacher_denoiser(built)
        later_teacher = diffusion_denoiser(cfg, m.round_teacher, built.schedule)  # type: ignore

        def loss(x0: Tensor, cond: Any, step: int, g: torch.Generator) -> Tensor:
            r = min(step // per_round, rounds - 1)
            if r > int(m.round):
                self.next_round(built, r)
            n = cfg.distill.teacher_steps >> (r + 1)
            ts_teacher, _ = progressive_grids(built.schedule, n)
            value = progressive_loss(
                built.denoiser, first_teacher if r == 0 else later_teacher, x0,
                schedule=built.schedule, ts_teacher=ts_teacher, weighting=cfg.distill.weighting,
                generator=g, cond=cond,
            )  # fmt: skip
            with torch.no_grad():
                m.round_loss[r] += value.detach().double().cpu()
                m.round_count[r] += 1
            return value

        return loss

    @torch.no_grad()
    def next_round(self, built: Built, r: int) -> None:
        """Score the finished round's student, then make it round r's teacher
        [Salimans & Ho 2022, Algorithm 2: teacher <- student]."""
        m: Any = built.model
        done = int(m.round)
        m.round_rms[done] = self.round_rms(built, done)
        m.round_teacher.load_state_dict(m.student.state_dict())
        m.round.fill_(r)

    def student_steps(self, cfg: RunConfig, r: int) -> int:
        return cfg.distill.teacher_steps >> (r + 1)

    @torch.no_grad()
    def round_rms(self, built: Built, r: int) -> float:
        """RMS distance between round r's student, sampled with DDIM in its N steps, and the
        teacher's reference samples from the same noise."""
        m: Any = built.model
        was_training = m.student.training
        m.student.eval()
        x = self.ddim_from(built, built.denoiser, m.ref_noise, self.student_steps(built.cfg, r))
        m.student.train(was_training)
        return float((x - m.ref_teacher).pow(2).mean().sqrt())

    @torch.no_grad()
    def reference_samples(self, built: Built) -> None:
        m: Any = built.model
        g = torch.Generator().manual_seed(built.cfg.train.seed)
        noise = prior_noise(built.schedule, tuple(m.ref_noise.shape), generator=g)
        m.ref_noise.copy_(noise)
        teacher = self.teacher_denoiser(built)
        m.ref_teacher.copy_(
            self.ddim_from(built, teacher, m.ref_noise, built.cfg.distill.teacher_steps)
        )

    @staticmethod
    def ddim_from(built: Built, den: Any, x: Tensor, steps: int) -> Tensor:
        """Deterministic DDIM from x at t_max on the trailing grid (progressive's grid)."""
        ts = sampling_timesteps(built.schedule, steps, spacing="trailing")
        return SAMPLERS["ddim"](den, x.to(built.device), ts, schedule=built.schedule, eta=0.0)

    # ----------------------------------------------------------------------------- sampling
    def draw(
        self, built: Built, b: int, *, generator: torch.Generator, cond: Any, callback: Any,
        sampler: str, steps: int, guidance: float | None, classifier: nn.Module | None,
        classifier_scale: float, **options: Any,
    ) -> Tensor:  # fmt: skip
        if guidance is not None or classifier is not None:
            raise ValueError("a distilled student samples without guidance")
        if not self.is_consistency_model(built.cfg):
            if built.cfg.distill.method == "progressive":  # DDIM on the rounds' trailing grid
                options.setdefault("spacing", "trailing")
            return sample_with_denoiser(
                built, b, generator=generator, cond=cond, callback=callback, sampler=sampler,
                steps=steps, guidance=None, classifier=None, classifier_scale=1.0, **options,
            )  # fmt: skip
        threshold = options.pop("threshold", None)
        if options:
            raise ValueError(f"the consistency sampler has no option {next(iter(options))!r}")
        ts = consistency_times(built.cfg, built.schedule, steps)
        den: Any = built.denoiser
        if threshold is not None:
            den = ThresholdedDenoiser(den, built.schedule, mode=threshold)
        x = prior_noise(built.schedule, (b, *built.data_shape), generator=generator,
                        t=float(ts[0]), device=built.device)  # fmt: skip
        return SAMPLERS[sampler](den, x, ts, schedule=built.schedule, cond=cond,
                                 generator=generator, callback=callback)  # fmt: skip

    # ----------------------------------------------------------------------------- reporting
    def report(self, built: Built, run_dir: Path, *, log: Any) -> dict:
        """The progressive rounds' record, then the samples' figures (and, 2-D, quality)."""
        out: dict[str, Any] = {"rounds": self.rounds_record(built, log=log)}
        if self.is_reflow(built.cfg):
            out["straightness"] = self.straightness_record(built, log=log)
        seed = built.cfg.train.seed
        if self.data == "2-D":  # type: ignore[attr-defined]
            traj = trajectory(built, built.cfg.sample.n, seed=seed)
            out.update(points_report(built, run_dir, traj, log=log))
            return out
        x, frames, _ = trajectory(built, 64, seed=seed)
        viz.save_image_grid(x, run_dir / "samples.png", scale=grid_scale(x))
        viz.image_trajectory_gif(frames, run_dir / "denoising.gif")
        return out

    @torch.no_grad()
    def straightness_record(self, built: Built, *, log: Any) -> dict[str, float]:
        """Reflow: the straightness S [Liu 2023, Eq. 8] of the teacher's and the student's flow
        from the same noise (the reference-sample count), 20 Heun steps; called by the report,
        on the EMA weights in eval mode."""
        n = REF_SAMPLES[self.data]  # type: ignore[attr-defined]
        g = torch.Generator().manual_seed(built.cfg.train.seed + 2)
        noise = prior_noise(built.schedule, (n, *built.data_shape), generator=g).to(built.device)
        out = {
            "teacher": float(straightness(self.teacher_denoiser(built), built.schedule, noise,
                                          steps=20)),
            "student": float(straightness(built.denoiser, built.schedule, noise, steps=20)),
        }  # fmt: skip
        log(f"straightness S (Liu 2023, Eq. 8; 0 = straight): teacher {out['teacher']:.4g}, "
            f"student {out['student']:.4g}")  # fmt: skip
        return out

    def rounds_record(self, built: Built, *, log: Any) -> list[dict[str, Any]]:
        """Progressive: each round's student steps, mean loss and RMS distance to the
        teacher's samples (the last round is scored now, on the final weights)."""
        m: Any = built.model
        rounds = rounds_of(built.cfg)
        if rounds == 0:
            return []
        last = int(m.round)
        m.round_rms[last] = self.round_rms(built, last)
        out = []
        for r in range(last + 1):
            count = int(m.round_count[r])
            row = {"steps": self.student_steps(built.cfg, r),
                   "loss": float(m.round_loss[r]) / max(count, 1), "train_steps": count,
                   "rms_to_teacher": float(m.round_rms[r])}  # fmt: skip
            log(f"round {r + 1}/{rounds}: {row['steps']} steps, loss {row['loss']:.4g}, "
                f"RMS to the teacher's {built.cfg.distill.teacher_steps}-step samples "
                f"{row['rms_to_teacher']:.4g}")  # fmt: skip
            out.append(row)
        return out


def teacher_dir(path: str | Path) -> Path:
    """The teacher's directory, which must exist (one-line error)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"teacher {path}: no such run directory")
    return p
