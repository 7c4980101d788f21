"""The run-kind table: every kind of run is one entry that says how to check, build, train,
sample, report and evaluate it.

``model.kind`` names the task (what the run learns) and ``model.net`` the network that the task
builds through the network table (:mod:`difflab.nn.networks`); the data set decides between the
2-D and image kinds of a task.

==================  ======================  ========================================================
kind                selected by             what it is
==================  ======================  ========================================================
``diffusion-2d``    kind=diffusion, 2-D     a denoiser on 2-D points (swiss roll, moons, mixtures)
``sohl-dickstein``  kind=diffusion,         the 2015 model: Gaussian reverse kernels of its own
                    net=sohl-dickstein      [Sohl-Dickstein 2015]
``diffusion-image`` kind=diffusion, images  an image denoiser, optionally class-conditional
``image-to-image``  kind=diffusion, images, Palette: restore, colourise or inpaint an image given
                    image_task set          as conditioning [Saharia 2022]
``classifier``      kind=classifier         a noise-aware classifier of x_t, for classifier
                                            guidance [Dhariwal & Nichol 2021]
``autoencoder``     kind=autoencoder        a KL autoencoder, the first stage of latent diffusion
                                            [Rombach 2022]
``latent-           kind=latent             a denoiser on the latents of a frozen autoencoder run;
diffusion``                                 samples are decoded [Rombach 2022]
``super-            kind=sr                 a cascade's super-resolution stage, conditioned on the
resolution``                                augmented low-res image; with a frozen base run it
                                            samples the whole cascade [Ho 2021; Saharia 2021]
``distill-2d``,     kind=distill            a few-step student of a frozen diffusion run:
``distill-image``                           progressive or consistency distillation
                                            (:mod:`difflab.app.distill`) [Salimans & Ho 2022;
                                            Song 2023; Geng 2024]
==================  ======================  ========================================================

Configs written before ``model.net`` existed name the network in ``model.kind`` (``mlp``,
``unet``, ``sohl-dickstein``); :func:`difflab.app.config.migrate_model` reads them.

Adding a kind of run is one class here and one entry in :data:`KINDS` (plus its tests); the
rest of the app layer asks ``built.kind`` and never branches on kind names
(``tests/test_structure.py`` keeps it so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.app.report as report
from difflab.app.build import Built, build_schedule, cfg_data_shape, diffusion_denoiser
from difflab.app.config import RunConfig
from difflab.app.distill import DistillTask
from difflab.app.evaluate import check_digit_scoring, digit_quality
from difflab.app.frozen import frozen_config, load_frozen_run, stored_frozen, with_frozen
from difflab.app.outputs import SampleSet, draw_info, image_set, points_set, sweep_set
from difflab.app.sampling import (
    SampleRequest,
    draw_samples,
    finite_samples,
    guided_denoiser,
    sample_with_denoiser,
)
from difflab.cascade import SRStage, Stage, cascade_sample, sr_training_cond, super_resolve
from difflab.classifier import classifier_loss
from difflab.data.datasets import dataset
from difflab.data.images import read_images, read_npz, to_uint8, to_unit_range
from difflab.image_to_image import cond_channels, degrade
from difflab.latent import encode_to_latents, latent_sample, latent_scale_factor
from difflab.nn.autoencoder import REC_LOSSES, autoencoder_loss
from difflab.nn.networks import NetSpec, build_network, network
from difflab.objectives import ImportanceTimeSampler
from difflab.process_table import process_for
from difflab.sampler_table import SAMPLER_NAMES
from difflab.schedules import DiscreteSchedule, Schedule, check_choice

__all__ = ["KINDS", "RunKind", "kind_of"]

LossFn = Callable[[Any, torch.Generator], tuple[Tensor, dict[str, Tensor]]]


class RunKind:
    """A kind of run. The defaults are those of a diffusion model; kinds override what differs.

    Attributes:
        name: the kind's name in the table.
        model_kind: the ``model.kind`` (the task) of its configs (kinds that share one
            override :meth:`selects`).
        data: the data it models, ``"2-D"`` or ``"image"``.
        head: what it asks of its network (:class:`difflab.nn.networks.NetSpec`), which
            ``model.net`` names (:data:`difflab.nn.networks.NETWORKS`).
        has_denoiser: its network is a diffusion denoiser (samplers, guidance, likelihoods).
        data_parallel: it trains under ``torchrun``.
        guides_sampling: it is a classifier that guides another run's sampling.
        conditions_on_images: ``difflab sample`` restores conditioning images (``--input``).
        has_likelihood: ``difflab nll`` can score it (a denoiser of the data itself).
        super_resolves: a cascade's SR stage: ``difflab sample`` runs its base run first, or
            super-resolves the low-resolution images of ``--input``.
        no_diffusers_form: why ``difflab export`` cannot write it as a diffusers pipeline
            (said at train time); empty for the kinds it exports.
    """

    name = ""
    model_kind = ""
    data = "image"
    head = "denoiser"
    has_denoiser = True
    data_parallel = True
    guides_sampling = False
    conditions_on_images = False
    has_likelihood = True
    super_resolves = False
    no_diffusers_form = "diffusers' image pipelines sample image diffusion models (a U-Net)"

    def is_consistency_model(self, cfg: RunConfig) -> bool:
        """Its denoiser is a consistency function f(x_t, t), which only the consistency
        sampler takes (``SamplerSpec.consistency``); the others' is E[x0 | x_t]."""
        return False

    def selects(self, cfg: RunConfig) -> bool:
        """Whether a config is a run of this kind (by default: its ``model.kind``)."""
        return cfg.model.kind == self.model_kind

    def check(self, cfg: RunConfig) -> None:
        """Kind-specific checks of a config (one-line ``ValueError``)."""
        if (self.data == "2-D") != cfg.data.is_toy:
            raise ValueError(
                f"a {self.name} run (model.kind={cfg.model.kind}) models {self.data} data, "
                f"not {cfg.data.name!r}"
            )
        if cfg.model.image_task != "none" and not self.conditions_on_images:
            raise ValueError(
                "image-to-image tasks (model.image_task) are diffusion runs on images "
                "(model.kind=diffusion)"
            )
        self.check_network(cfg)

    def why_no_diffusers_form(self, cfg: RunConfig) -> str:
        """Why ``difflab export`` cannot write a run of ``cfg`` for diffusers (its task's
        reason, else its network's); empty if it can."""
        return self.no_diffusers_form or network(cfg.model.net).no_diffusers_form

    def net_preset(self, cfg: RunConfig) -> tuple[str, str]:
        """The config key of the network's preset, and its value."""
        return "model.preset", cfg.model.preset

    def check_network(self, cfg: RunConfig) -> None:
        """The network (``model.net``) builds this kind's head on its data, at its preset."""
        key, preset = self.net_preset(cfg)
        network(cfg.model.net).check(preset, self.head, self.data, preset_key=key)
        self.net_fields(cfg)

    def net_fields(self, cfg: RunConfig) -> dict[str, Any]:
        """The network's own fields over its preset's (``model.unet``, a JSON object: how a
        run holds a network no preset describes, e.g. an imported one); {} when unset."""
        if cfg.model.unet is None:
            return {}
        net = network(cfg.model.net)
        if net.fields is None:
            raise ValueError(f"model.unet sets U-Net fields; model.net is {net.name!r}")
        return net.fields(cfg.model.unet, cfg.model.preset, cfg_data_shape(cfg))

    def net_spec(self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule) -> NetSpec:
        """What this kind needs of its network (by default: a denoiser of the data)."""
        m = cfg.model
        return NetSpec(
            data_shape, out_channels=data_shape[0] * (2 if m.learned_variance else 1),
            num_classes=m.num_classes, dropout=m.dropout, hidden=m.hidden, depth=m.depth,
            fields=self.net_fields(cfg),
        )  # fmt: skip

    def build_model(
        self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule
    ) -> nn.Module:
        """The run's network, from the network table (:mod:`difflab.nn.networks`)."""
        spec = self.net_spec(cfg, data_shape, sched)
        return build_network(cfg.model.net, self.net_preset(cfg)[1], spec)

    def data_parallel_built(self, built: Built, wrap: Callable[[nn.Module], nn.Module]) -> Built:
        """The run as its loss sees it under ``torchrun``: the module the loss calls (the
        denoiser's network, or the model itself for kinds without a denoiser) wrapped by
        ``wrap`` (DistributedDataParallel), so that every gradient is all-reduced."""
        if built.denoiser is None:
            return replace(built, model=wrap(built.model))
        denoiser = built.kind.denoiser(built.cfg, built.model, built.schedule)
        denoiser.model = wrap(denoiser.model)
        return replace(built, denoiser=denoiser)

    def denoiser(self, cfg: RunConfig, model: nn.Module, schedule: Schedule) -> Any:
        """The denoiser the samplers see (None for kinds without one)."""
        return diffusion_denoiser(cfg, model, schedule) if self.has_denoiser else None

    def loss_fn(self, built: Built, extra_state: dict[str, Any]) -> LossFn:
        """loss_fn(batch, generator) -> (loss, logs): the diffusion objective of the config.
        Objects in ``extra_state`` are saved with every checkpoint."""
        cfg, d = built.cfg, built.cfg.diffusion
        time_sampler = None
        if d.t_sampling == "importance":  # Improved DDPM, Eq. (17)-(18)
            time_sampler = ImportanceTimeSampler(built.schedule.T)  # type: ignore[attr-defined]
            extra_state["time_sampler"] = time_sampler
        num_classes, p_drop = cfg.model.num_classes, cfg.model.label_dropout
        # the loss options of the process's own settings (e.g. the flow-matching time law)
        own = process_for(d.schedule).loss_options(asdict(d))

        def loss_fn(batch: tuple[Tensor, Tensor | None], g: torch.Generator):
            x0, labels = batch
            cond: Any = None
            if num_classes > 0 and labels is not None:  # null label with prob. p_drop (CFG)
                drop = torch.rand(labels.shape, generator=g) < p_drop
                cond = torch.where(
                    drop.to(labels.device), torch.full_like(labels, num_classes), labels
                )
            out = self.objective(
                built, x0, cond=cond, loss_type=d.loss_type, weighting=d.weighting,
                t_sampling="uniform" if d.t_sampling == "importance" else d.t_sampling,
                time_sampler=time_sampler, vlb_weight=d.vlb_weight, offset_noise=d.offset_noise,
                generator=g, **own,
            )  # fmt: skip
            return out.loss, {}

        return loss_fn

    def objective(
        self, built: Built, x0: Tensor, *, cond: Any, generator: torch.Generator, **options: Any
    ) -> Any:
        """The loss of the run's process (:mod:`difflab.process_table`) on a batch of data x0
        with conditioning ``cond``, as :meth:`training_input` gives them to it."""
        x, cond = self.training_input(built, x0, cond, generator)
        loss = process_for(built.cfg.diffusion.schedule).loss
        return loss(built.denoiser, x, cond=cond, generator=generator, **options)

    def on_data(self, built: Built) -> Built:
        """Finish building once the training data is open (e.g. statistics of the data)."""
        return built

    def training_input(
        self, built: Built, x0: Tensor, cond: Any, g: torch.Generator
    ) -> tuple[Tensor, Any]:
        """What the process's loss is given for a training batch: the data it diffuses and
        the conditioning (by default x0 itself and the class labels or None)."""
        return x0, cond

    def draw(self, built: Built, b: int, **kw: Any) -> Tensor:
        """One batch of b samples (see :func:`difflab.app.sampling.draw_samples`)."""
        return sample_with_denoiser(built, b, **kw)

    def prepare(self, built: Built, req: SampleRequest) -> SampleRequest:
        """Check a sampling request before any work (one-line ``ValueError``) and return it
        as :meth:`sample_set` reads it. By default: samples from noise, optionally of a class
        (``label``), with classifier-free or classifier guidance, or a guidance sweep."""
        num_classes = built.cfg.model.num_classes
        if req.guidance is not None and num_classes == 0:
            raise ValueError("--guidance needs a class-conditional run (model.num_classes)")
        k = num_classes if req.classifier is None else int(req.classifier.num_classes)
        if req.guidance_sweep is not None:
            if k == 0 or self.data != "image" or self.conditions_on_images:
                raise ValueError(
                    "--guidance-sweep needs a class-conditional image run, or --classifier CLF_RUN"
                )
            return req
        if any(v is not None for v in (req.base_sampler, req.base_steps, req.aug_level)):
            raise ValueError("--base-sampler, --base-steps and --aug-level are for "
                             "super-resolution runs (model.kind=sr)")  # fmt: skip
        req = self.read_inputs(built, req)
        if req.label is not None or req.guidance is not None or req.classifier is not None:
            if k == 0:
                raise ValueError(
                    "--class/--guidance need a class-conditional run (model.num_classes)"
                )
            if req.label is None or not 0 <= req.label < k:
                raise ValueError(f"--class must be in 0..{k - 1}")
        return req

    def read_inputs(self, built: Built, req: SampleRequest) -> SampleRequest:
        """The request with its conditioning images (``inputs``) read and checked; a run
        that samples from noise alone refuses them."""
        if req.inputs is not None:
            raise ValueError(
                "--input is for image-to-image and super-resolution runs; this "
                f"{built.cfg.preset} run is a {self.name} run"
            )
        return req

    def sample_set(self, built: Built, req: SampleRequest) -> SampleSet:
        """Draw a prepared request (:meth:`prepare`): the samples and their files."""
        if req.guidance_sweep is not None:
            return self.guidance_sweep(built, req)
        cond = None if req.label is None else torch.full((req.n,), req.label, dtype=torch.long)
        frames: list[Tensor] = []
        x = draw_samples(
            built, req.n, cond=cond, guidance=req.guidance, classifier=req.classifier,
            classifier_scale=req.classifier_scale,
            callback=(lambda info: frames.append(info["x"].float().cpu())) if req.gif else None,
            **req.draw_options(),
        )  # fmt: skip
        return self.samples_files(x, draw_info(req, x.shape[0]), frames)

    def samples_files(self, x: Tensor, info: dict[str, Any], frames: list[Tensor]) -> SampleSet:
        """Samples and trajectory frames as the files of a draw (by default: images)."""
        return image_set(x, info, frames)

    def guidance_sweep(self, built: Built, req: SampleRequest) -> SampleSet:
        """Every class at every scale of ``req.guidance_sweep``, the same noise for each."""
        clf = req.classifier
        k = built.cfg.model.num_classes if clf is None else int(clf.num_classes)
        opts = req.draw_options()
        samples = report.guidance_sweep_samples(
            built, list(req.guidance_sweep or ()), per_class=max(1, req.n // k),
            seed=opts.pop("seed"), classifier=clf, guidance=req.guidance, **opts,
        )  # fmt: skip
        what = "classifier scale" if clf is not None else "guidance scale"
        info = draw_info(req, math.prod(samples.shape[:3]))
        return sweep_set(samples, tuple(req.guidance_sweep or ()), info, label=what)

    def trajectory(self, built: Built, n: int, *, seed: int):
        """Samples and snapshots of the reverse process, for figures and GIFs."""
        return report.trajectory(built, n, seed=seed)

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        """End-of-run figures in ``run_dir``; returns metrics for ``finished.json``."""
        raise NotImplementedError

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        """A figure of the model during training (``train.sample_every``)."""
        report.grid_figure(built, path, seed=seed)

    def quality(self, built: Built, *, n: int, seed: int, **sampling: Any) -> dict[str, Any]:
        """``difflab eval``: quality metrics of n samples drawn with ``sampling`` options."""
        self.check_score(built)
        return self.score(built, draw_samples(built, n, seed=seed, **sampling), seed=seed)

    def check_score(self, built: Built) -> None:
        """Refuse, before any sample is drawn, a run that ``score`` cannot score."""

    def score(self, built: Built, x: Tensor, *, seed: int) -> dict[str, Any]:
        """Quality metrics of the samples ``x``."""
        raise ValueError(f"difflab eval does not score {self.name} runs")


class Diffusion2D(RunKind):
    name = "diffusion-2d"
    model_kind = "diffusion"
    data = "2-D"

    def selects(self, cfg: RunConfig) -> bool:
        return super().selects(cfg) and cfg.data.is_toy

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        traj = self.trajectory(built, built.cfg.sample.n, seed=built.cfg.train.seed)
        return report.points_report(built, run_dir, traj, log=log)

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        report.scatter_figure(built, path, n=built.cfg.sample.n, seed=seed)

    def samples_files(self, x: Tensor, info: dict[str, Any], frames: list[Tensor]) -> SampleSet:
        return points_set(x, info, frames)

    def score(self, built: Built, x: Tensor, *, seed: int) -> dict[str, Any]:
        return report.toy_quality(built, x, seed=seed)


class SohlDickstein(Diffusion2D):
    """The 2015 model samples with its own reverse kernels, so it has no denoiser."""

    name = "sohl-dickstein"
    head = "own"
    has_denoiser = False
    data_parallel = False

    def selects(self, cfg: RunConfig) -> bool:
        """A diffusion run whose network brings its own loss and sampler."""
        return super().selects(cfg) and self.head in network(cfg.model.net).heads

    def net_spec(self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule) -> NetSpec:
        if not isinstance(sched, DiscreteSchedule):
            raise ValueError("the Sohl-Dickstein model needs a discrete schedule")
        return NetSpec(data_shape, head="own", hidden=cfg.model.hidden, steps=sched.T)

    def loss_fn(self, built: Built, extra_state: dict[str, Any]) -> LossFn:
        def sd_loss(batch: tuple[Tensor, Any], g: torch.Generator):
            return built.model.loss(batch[0], generator=g), {}  # type: ignore[operator]

        return sd_loss

    def draw(self, built: Built, b: int, *, generator: torch.Generator, **kw: Any) -> Tensor:
        return built.model.sample(b, generator=generator)  # type: ignore[operator]

    def trajectory(self, built: Built, n: int, *, seed: int):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x, traj = built.model.sample(n, generator=g, return_trajectory=True)  # type: ignore
        finite_samples(x, "the Sohl-Dickstein model")
        T = traj.shape[0] - 1  # traj[t] = x_t; frames run from x_T down to x_0
        xs = [traj[t].float().cpu() for t in range(T, -1, -1)]
        return x.float().cpu(), *report.thin_frames(xs, [float(t) for t in range(T, -1, -1)], 40)


class DiffusionImage(RunKind):
    name = "diffusion-image"
    no_diffusers_form = ""
    model_kind = "diffusion"

    def selects(self, cfg: RunConfig) -> bool:
        return super().selects(cfg) and not cfg.data.is_toy

    def net_spec(self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule) -> NetSpec:
        spec = super().net_spec(cfg, data_shape, sched)
        return replace(spec, **self.conditioning(cfg, data_shape[0]))

    def conditioning(self, cfg: RunConfig, channels: int) -> dict[str, Any]:
        """What the network is given besides x_t, t and labels (:class:`NetSpec` fields)."""
        return {}

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        return report.images_report(built, run_dir, log=log)

    def check_score(self, built: Built) -> None:
        check_digit_scoring(built)

    def score(self, built: Built, x: Tensor, *, seed: int) -> dict[str, Any]:
        return digit_quality(built, x)


class ImageToImage(DiffusionImage):
    """Palette [Saharia 2022]: the degraded image is concatenated to x_t."""

    name = "image-to-image"
    no_diffusers_form = (
        "its U-Net also reads the degraded image, which no diffusers pipeline gives it"
    )
    conditions_on_images = True

    def selects(self, cfg: RunConfig) -> bool:
        return super().selects(cfg) and cfg.model.image_task != "none"

    def conditioning(self, cfg: RunConfig, channels: int) -> dict[str, Any]:
        return {"cond_channels": cond_channels(cfg.model.image_task, channels)}  # type: ignore

    def training_input(
        self, built: Built, x0: Tensor, cond: Any, g: torch.Generator
    ) -> tuple[Tensor, Any]:
        image = degrade(x0, built.cfg.model.image_task, generator=g)  # type: ignore[arg-type]
        return x0, {"image": image} if cond is None else {"class": cond, "image": image}

    def read_inputs(self, built: Built, req: SampleRequest) -> SampleRequest:
        """Degraded images to restore: a tensor, or an .npz whose ``degraded`` array holds
        them (uint8 or floats in [-1, 1]); default: degraded evaluation images."""
        y = req.inputs
        if isinstance(y, (str, Path)):
            y = torch.from_numpy(read_npz(y, [("degraded",)], "'degraded' array")["degraded"])
        if y is None:
            return req
        y = to_unit_range(y) if y.dtype == torch.uint8 else y.float()
        c = cond_channels(built.cfg.model.image_task, built.data_shape[0])  # type: ignore
        expected = (c, *built.data_shape[1:])
        if y.ndim != 4 or tuple(y.shape[1:]) != expected:
            raise ValueError(
                f"'degraded' must have shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(y.shape)}"
            )
        return replace(req, inputs=y)

    def sample_set(self, built: Built, req: SampleRequest) -> SampleSet:
        """Restore the degraded images of ``req.inputs``, or degraded evaluation images."""
        res = report.restore(built, n=req.n, y=req.inputs, **req.draw_options())  # type: ignore
        x, x0 = res["samples"], res["originals"]
        arrays = {"samples": to_uint8(x).numpy(), "degraded": res["degraded"].numpy()}
        notes = []
        if x0 is not None:
            arrays["originals"] = to_uint8(x0).numpy()
            notes.append(f"PSNR restored {res['psnr']:.2f} dB, degraded "
                         f"{res['psnr_degraded']:.2f} dB")  # fmt: skip
        figure = partial(report.restoration_grid, built, res)
        return SampleSet(x, arrays, figure, None, draw_info(req, x.shape[0]), notes)

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        out = report.restoration_figure(built, run_dir / "samples.png", seed=built.cfg.train.seed)
        log(f"PSNR restored {out['psnr']:.2f} dB, degraded {out['psnr_degraded']:.2f} dB")
        return {"psnr": out["psnr"], "psnr_degraded": out["psnr_degraded"]}

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        report.restoration_figure(built, path, seed=seed)

    def score(self, built: Built, x: Tensor, *, seed: int) -> dict[str, Any]:
        raise ValueError("image-to-image runs are scored by difflab sample (PSNR), not eval")


class Classifier(RunKind):
    """A noise-aware classifier: the U-Net's encoder [Dhariwal & Nichol 2021]."""

    name = "classifier"
    model_kind = "classifier"
    head = "classifier"
    has_denoiser = False
    guides_sampling = True

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.num_classes < 2:
            raise ValueError("a classifier run needs model.num_classes >= 2")

    def net_spec(self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule) -> NetSpec:
        m = cfg.model
        return NetSpec(data_shape, head="classifier", num_classes=m.num_classes, dropout=m.dropout)

    def loss_fn(self, built: Built, extra_state: dict[str, Any]) -> LossFn:
        if built.dataset is not None and bool((built.dataset.labels < 0).any()):
            raise ValueError("training a classifier needs a labelled dataset")

        def clf_loss(batch: tuple[Tensor, Tensor], g: torch.Generator):
            loss, _ = classifier_loss(built.model, batch[0], batch[1], built.schedule, generator=g)
            return loss, {}

        return clf_loss

    def draw(self, built: Built, b: int, **kw: Any) -> Tensor:
        raise ValueError(
            f"{built.cfg.preset} is a classifier run; pass it to a diffusion run with --classifier"
        )

    def prepare(self, built: Built, req: SampleRequest) -> SampleRequest:
        self.draw(built, req.n)  # refuses
        return req

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        return {"noisy_accuracy": report.classifier_accuracy(built, log=log)}

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        pass


class AutoencoderRun(RunKind):
    """The LDM first stage: a KL-regularised autoencoder [Rombach 2022]. It does not sample;
    its report and ``difflab eval`` give the reconstruction PSNR (and, for digits, the FDD of
    reconstructions: the best any latent model on it can reach)."""

    name = "autoencoder"
    model_kind = "autoencoder"
    head = "autoencoder"
    has_denoiser = False
    has_likelihood = False

    def net_preset(self, cfg: RunConfig) -> tuple[str, str]:
        return "model.ae_preset", cfg.model.ae_preset

    def check_network(self, cfg: RunConfig) -> None:
        super().check_network(cfg)
        check_choice("model.rec_loss", cfg.model.rec_loss, REC_LOSSES)

    def net_spec(self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule) -> NetSpec:
        return NetSpec(data_shape, head="autoencoder")

    def loss_fn(self, built: Built, extra_state: dict[str, Any]) -> LossFn:
        m = built.cfg.model

        def ae_loss(batch: tuple[Tensor, Any], g: torch.Generator):
            return autoencoder_loss(
                built.model, batch[0], kl_weight=m.kl_weight, rec_loss=m.rec_loss,  # type: ignore
                generator=g,
            )  # fmt: skip

        return ae_loss

    def draw(self, built: Built, b: int, **kw: Any) -> Tensor:
        raise ValueError(
            "an autoencoder run does not sample; train a latent run on it: difflab train "
            "--preset mnist-latent --set model.autoencoder=AE_RUN"
        )

    def prepare(self, built: Built, req: SampleRequest) -> SampleRequest:
        self.draw(built, req.n)  # refuses
        return req

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        out = report.reconstruction_figure(built, run_dir / "samples.png")
        log(f"reconstruction PSNR {out['psnr']:.2f} dB")
        return {"psnr": out["psnr"]}

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        report.reconstruction_figure(built, path)

    def quality(self, built: Built, *, n: int, seed: int, **sampling: Any) -> dict[str, Any]:
        out = report.reconstruction_figure(built, None, n=n)
        metrics: dict[str, Any] = {"psnr": out["psnr"]}
        if dataset(built.cfg.data.name).digits:
            metrics.update(digit_quality(built, out["reconstructions"]))
        return metrics


class LatentModel(nn.Module):
    """A denoising network on the scaled latents of a frozen autoencoder [Rombach 2022]: the
    run's checkpoints hold both, so a latent run samples without its autoencoder run."""

    def __init__(self, unet: nn.Module, ae: nn.Module, scale: float) -> None:
        super().__init__()
        self.unet = unet
        self.ae = ae.eval().requires_grad_(False)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))


class LatentDiffusion(DiffusionImage):
    """Diffusion on the latents of a trained autoencoder run (``model.autoencoder``), scaled
    to unit variance by LDM's factor, computed once from the data and kept in the config."""

    name = "latent-diffusion"
    no_diffusers_form = (
        "it samples latents that its autoencoder decodes; diffusers' DDPM pipelines have no decoder"
    )
    model_kind = "latent"
    ae_net = "autoencoder"  # the network of the autoencoder runs it works on
    has_likelihood = False  # a likelihood of latents is not one of the images

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        network(self.ae_net).check(cfg.model.ae_preset, "autoencoder", "image", preset_key=(
            "model.ae_preset"))  # fmt: skip
        if cfg.sample.threshold is not None:
            raise ValueError("sample.threshold clips to [-1, 1], latents are not: set it to none")
        if cfg.model.latent_scale is not None:
            return  # a trained run: its checkpoints hold the autoencoder
        if cfg.model.autoencoder is None:
            raise ValueError("a latent run needs model.autoencoder=AE_RUN, a trained autoencoder")
        self.expect_autoencoder(cfg, frozen_config(cfg.model.autoencoder, role="model.autoencoder"))

    @staticmethod
    def expect_autoencoder(cfg: RunConfig, ae_cfg: RunConfig) -> None:
        """The run of ``model.autoencoder`` is an autoencoder of this run's preset."""
        if ae_cfg.model.kind != "autoencoder":
            raise ValueError(f"{cfg.model.autoencoder} is not an autoencoder run")
        if ae_cfg.model.ae_preset != cfg.model.ae_preset:
            raise ValueError(
                f"model.ae_preset is {cfg.model.ae_preset!r} but {cfg.model.autoencoder} is a "
                f"{ae_cfg.model.ae_preset!r} autoencoder; set model.ae_preset to it"
            )

    def build_model(
        self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule
    ) -> nn.Module:
        ae = build_network(
            self.ae_net, cfg.model.ae_preset, NetSpec(data_shape, head="autoencoder")
        )
        unet = super().build_model(cfg, ae.latent_shape(), sched)
        return LatentModel(unet, ae, cfg.model.latent_scale or 1.0)

    def denoiser(self, cfg: RunConfig, model: nn.Module, schedule: Schedule) -> Any:
        return diffusion_denoiser(cfg, model.unet, schedule)  # type: ignore[arg-type]

    def on_data(self, built: Built) -> Built:
        """A new run: load the autoencoder run's EMA weights and set the latent scale."""
        cfg = built.cfg
        if cfg.model.latent_scale is not None:
            return built
        model: Any = built.model
        ae_run = load_frozen_run(
            cfg.model.autoencoder, model.ae, role="model.autoencoder",  # type: ignore[arg-type]
            expect=lambda ae_cfg: self.expect_autoencoder(cfg, ae_cfg),
        )  # fmt: skip
        images = built.dataset.images[:2048]
        g = torch.Generator().manual_seed(0)
        batches = (built.dataset.batch(torch.arange(i, min(i + 256, len(images))), g)[0]
                   for i in range(0, len(images), 256))  # fmt: skip
        ae = model.ae.to(built.device)
        scale = latent_scale_factor(ae, (x.to(built.device) for x in batches))
        model.scale.fill_(scale)
        frozen = with_frozen(cfg.model.frozen, "autoencoder", ae_run)
        return replace(
            built, cfg=replace(cfg, model=replace(cfg.model, latent_scale=scale, frozen=frozen))
        )

    def training_input(
        self, built: Built, x0: Tensor, cond: Any, g: torch.Generator
    ) -> tuple[Tensor, Any]:
        """The scaled latents of x0: a posterior sample of the frozen encoder (drawn first)."""
        m: Any = built.model
        return encode_to_latents(m.ae, x0, float(m.scale), g), cond

    def draw(
        self, built: Built, b: int, *, generator: torch.Generator, cond: Any,
        callback: Any, guidance: float | None, classifier: nn.Module | None,
        classifier_scale: float, **options: Any,
    ) -> Tensor:  # fmt: skip
        den, cond = guided_denoiser(built, cond, guidance, classifier, classifier_scale)
        m: Any = built.model
        return latent_sample(
            den, built.schedule, m.ae, float(m.scale), b, generator=generator, cond=cond,
            callback=callback, device=built.device, **options,
        )  # fmt: skip


class SRModel(nn.Module):
    """A super-resolution network and, if the run has one, its base run's frozen network
    (EMA weights): the run's checkpoints hold both, so the cascade samples on its own."""

    def __init__(self, unet: nn.Module, base: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.base = None if base is None else base.eval().requires_grad_(False)


class SuperResolution(DiffusionImage):
    """A cascade's super-resolution stage [Ho 2021; Saharia 2021]: a U-Net given the f x f box
    average of x0, upsampled, noised to a level s ~ U[0, model.aug_level_max * t_max] that the
    network is told (Gaussian conditioning augmentation, :func:`difflab.cascade.sr_loss`).
    ``model.base`` names the base run, a diffusion-image run at the low resolution; its config
    is stored in ``model.base_config`` and its EMA network in this run's checkpoints."""

    name = "super-resolution"
    no_diffusers_form = (
        "its U-Net also reads the low-resolution image, which no diffusers pipeline gives it"
    )
    model_kind = "sr"
    has_likelihood = False  # the likelihood is of x given the low-res image
    super_resolves = True

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        c, h, w = cfg_data_shape(cfg)
        f = cfg.model.sr_factor
        if h % f or w % f:
            raise ValueError(f"model.sr_factor={f} must divide the image size {h} x {w}")
        base_cfg = self.base_config(cfg)
        if base_cfg is None:
            return
        where = cfg.model.base or "model.base_config"
        if type(kind_of(base_cfg)) is not DiffusionImage:
            raise ValueError(f"{where} is not an image diffusion run (model.kind=diffusion)")
        if tuple(cfg_data_shape(base_cfg)) != (c, h // f, w // f):
            raise ValueError(
                f"{where} makes images of shape {tuple(cfg_data_shape(base_cfg))}; this run "
                f"super-resolves {(c, h // f, w // f)} to {(c, h, w)} (model.sr_factor={f})"
            )
        if base_cfg.model.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"{where} has model.num_classes={base_cfg.model.num_classes}, this run "
                f"{cfg.model.num_classes}; a cascade's stages take the same labels"
            )

    @staticmethod
    def base_config(cfg: RunConfig) -> RunConfig | None:
        """The base run's config: stored in the run (``model.frozen``, or ``model.base_config``
        in runs of earlier versions), or read from ``model.base`` (a new run)."""
        stored = stored_frozen(cfg.model.frozen, "base")
        if stored is not None:
            return stored
        if cfg.model.base_config is not None:
            try:
                return RunConfig.from_dict(json.loads(cfg.model.base_config))
            except (ValueError, TypeError) as e:
                raise ValueError(f"model.base_config is not a run config: {e}") from None
        if cfg.model.base is None:
            return None
        return frozen_config(cfg.model.base, role="model.base")

    def conditioning(self, cfg: RunConfig, channels: int) -> dict[str, Any]:
        return {"cond_channels": channels, "aug_level_embedding": True}

    def build_model(
        self, cfg: RunConfig, data_shape: tuple[int, ...], sched: Schedule
    ) -> nn.Module:
        unet = super().build_model(cfg, data_shape, sched)
        base_cfg = self.base_config(cfg)
        base = None
        if base_cfg is not None:
            base = kind_of(base_cfg).build_model(
                base_cfg, cfg_data_shape(base_cfg), build_schedule(base_cfg)
            )
        return SRModel(unet, base)

    def denoiser(self, cfg: RunConfig, model: nn.Module, schedule: Schedule) -> Any:
        return diffusion_denoiser(cfg, model.unet, schedule)  # type: ignore[arg-type]

    def on_data(self, built: Built) -> Built:
        """A new run on a base run: load its EMA weights and store it (``model.frozen``)."""
        cfg = built.cfg
        if cfg.model.base is None or self.has_stored_base(cfg):
            return built
        base = load_frozen_run(cfg.model.base, built.model.base, role="model.base")  # type: ignore
        frozen = with_frozen(cfg.model.frozen, "base", base)
        model = replace(cfg.model, base=base.path, frozen=frozen)
        return replace(built, cfg=replace(cfg, model=model))

    @staticmethod
    def has_stored_base(cfg: RunConfig) -> bool:
        """A trained run: its checkpoints hold the base network, its config the base config."""
        return (
            cfg.model.base_config is not None or stored_frozen(cfg.model.frozen, "base") is not None
        )

    def training_input(
        self, built: Built, x0: Tensor, cond: Any, g: torch.Generator
    ) -> tuple[Tensor, Any]:
        """x0 and its augmented low-resolution image (:func:`difflab.cascade.sr_training_cond`,
        drawn before the process's time and noise), with the labels."""
        m = built.cfg.model
        return x0, sr_training_cond(
            x0, schedule=built.schedule, max_aug_level=m.aug_level_max * built.schedule.t_max,
            factor=m.sr_factor, labels=cond, generator=g,
        )  # fmt: skip

    def base_stage(
        self, built: Built, sampler: str | None = None, steps: int | None = None
    ) -> Stage:
        """The base run as a cascade stage, sampled with its own sampler and steps unless
        given (and its own x0 thresholding and eta)."""
        base_cfg = self.base_config(built.cfg)
        net = built.model.base
        if base_cfg is None or net is None:
            raise ValueError(
                f"this {built.cfg.preset} run has no base run (model.base): pass low-resolution "
                "images with --input, or train one with --set model.base=BASE_RUN"
            )
        s = base_cfg.sample
        sampler = sampler or s.sampler
        options: dict[str, Any] = {"threshold": s.threshold}
        if s.eta is not None and sampler == s.sampler:
            options["eta"] = s.eta
        schedule = build_schedule(base_cfg)
        return Stage(
            diffusion_denoiser(base_cfg, net, schedule), schedule, sampler, steps or s.steps,
            options,
        )  # fmt: skip

    def prepare(self, built: Built, req: SampleRequest) -> SampleRequest:
        """The whole cascade (base, then SR), or the SR stage alone on ``req.inputs``."""
        if req.guidance is not None or req.classifier is not None or req.guidance_sweep:
            raise ValueError(
                "super-resolution runs sample without guidance (--guidance, --classifier)"
            )
        if req.base_sampler is not None:
            check_choice("--base-sampler", req.base_sampler, SAMPLER_NAMES)
        if req.inputs is not None and (req.base_sampler or req.base_steps):
            raise ValueError("--input super-resolves given images: no base stage to set")
        req = self.read_inputs(built, req)
        if req.inputs is None:
            self.base_stage(built, req.base_sampler, req.base_steps)  # refuses a missing base
        k = built.cfg.model.num_classes
        if req.label is not None and (k == 0 or not 0 <= req.label < k):
            raise ValueError(f"--class needs a class-conditional run, in 0..{k - 1}")
        return req

    def read_inputs(self, built: Built, req: SampleRequest) -> SampleRequest:
        """Low-resolution images (N, C, H / f, W / f): a tensor in [-1, 1], an image file, a
        folder of them, or an .npz ``images`` array."""
        low = req.inputs
        if low is None:
            return req
        c, h, w = built.data_shape
        f = built.cfg.model.sr_factor
        if not isinstance(low, Tensor):
            low = read_images(low, channels=c)
        if tuple(low.shape[1:]) != (c, h // f, w // f):
            raise ValueError(
                f"{req.inputs if not isinstance(req.inputs, Tensor) else 'inputs'}: images of "
                f"shape {tuple(low.shape[1:])}, this run super-resolves {(c, h // f, w // f)} "
                f"to {(c, h, w)}"
            )
        return replace(req, inputs=low)

    def sample_set(self, built: Built, req: SampleRequest) -> SampleSet:
        low = req.inputs
        n = req.n if low is None else low.shape[0]
        labels = None if req.label is None else torch.full((n,), req.label, dtype=torch.long)
        cond = {k: v for k, v in (("image", low), ("class", labels)) if v is not None} or None
        infos: list[dict[str, Tensor]] = []

        def keep(info: dict) -> None:  # every step of every stage, for the GIF
            infos.append({key: info[key].float().cpu() for key in ("x", "x0_hat")})

        x = draw_samples(
            built, n, cond=cond, callback=keep if req.gif else None,
            base_sampler=req.base_sampler, base_steps=req.base_steps, aug_level=req.aug_level,
            **req.draw_options(),
        )  # fmt: skip
        info = draw_info(req, n)
        info["aug_level"] = built.cfg.sample.aug_level if req.aug_level is None else req.aug_level
        if low is None:
            base = self.base_stage(built, req.base_sampler, req.base_steps)
            info.update(base_sampler=base.sampler, base_steps=base.steps)
        arrays = {} if low is None else {"low_res": to_uint8(low).numpy()}
        out = image_set(x, info, **arrays)
        if req.gif:
            out.gif = partial(report.cascade_gif, infos, x, low_res=low)
        return out

    def draw(
        self, built: Built, b: int, *, generator: torch.Generator, cond: Any,
        callback: Any, guidance: float | None, classifier: nn.Module | None,
        classifier_scale: float, sampler: str, steps: int, base_sampler: str | None = None,
        base_steps: int | None = None, aug_level: float | None = None, **options: Any,
    ) -> Tensor:  # fmt: skip
        """The whole cascade, or only the SR stage when ``cond`` holds low-res "image"s.
        ``aug_level``: the sampling-time level as a fraction of t_max (default the run's)."""
        if guidance is not None or classifier is not None:
            raise ValueError("super-resolution runs sample without guidance")
        cfg = built.cfg
        level = cfg.sample.aug_level if aug_level is None else aug_level
        low, labels = (cond.get("image"), cond.get("class")) if isinstance(cond, dict) else (
            None, cond)  # fmt: skip
        sr = SRStage(
            built.denoiser, built.schedule, sampler, steps, options,  # type: ignore[arg-type]
            aug_level=level * built.schedule.t_max, factor=cfg.model.sr_factor,
        )  # fmt: skip
        if low is not None:
            return super_resolve(sr, low, generator=generator, labels=labels, callback=callback)
        base = self.base_stage(built, base_sampler, base_steps)
        c, h, w = built.data_shape
        f = cfg.model.sr_factor
        stage_callback = None if callback is None else (lambda i, info: callback(info))
        return cascade_sample(
            base, sr, (b, c, h // f, w // f), generator=generator, labels=labels,
            callback=stage_callback, device=built.device,
        )[-1]  # fmt: skip

    def report(self, built: Built, run_dir: Path, *, log: Callable[[str], None]) -> dict:
        seed = built.cfg.train.seed
        out = report.super_resolution_figure(built, run_dir / "super_resolution.png", seed=seed)
        log(f"PSNR super-resolved {out['psnr']:.2f} dB, upsampled {out['psnr_upsampled']:.2f} dB")
        if built.model.base is not None:  # the whole cascade
            report.grid_figure(built, run_dir / "samples.png", seed=seed)
        return {"psnr": out["psnr"], "psnr_upsampled": out["psnr_upsampled"]}

    def progress_figure(self, built: Built, path: Path, *, seed: int) -> None:
        report.super_resolution_figure(built, path, seed=seed)


class DistillRun(DistillTask):
    """A distillation run's teacher: a plain diffusion run (2-D or images)."""

    def distillable(self, teacher: RunConfig) -> str | None:
        kind = kind_of(teacher)
        return None if type(kind) in (Diffusion2D, DiffusionImage) else kind.name


class Distill2D(DistillRun, Diffusion2D):
    name = "distill-2d"


class DistillImage(DistillRun, DiffusionImage):
    name = "distill-image"


KINDS: dict[str, RunKind] = {
    k.name: k
    for k in (
        SohlDickstein(),  # before diffusion-2d, which then takes the other 2-D runs
        Diffusion2D(),
        ImageToImage(),  # before diffusion-image, which then takes the other U-Net runs
        DiffusionImage(),
        Classifier(),
        AutoencoderRun(),
        LatentDiffusion(),
        SuperResolution(),
        Distill2D(),
        DistillImage(),
    )
}


def kind_of(cfg: RunConfig) -> RunKind:
    """The entry of :data:`KINDS` that a config selects."""
    for kind in KINDS.values():
        if kind.selects(cfg):
            return kind
    choices = ", ".join(dict.fromkeys(kind.model_kind for kind in KINDS.values()))
    raise ValueError(f"unknown model.kind {cfg.model.kind!r}; choose one of: {choices}")
