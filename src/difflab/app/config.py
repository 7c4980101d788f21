"""Run configurations for the app layer (CLI): frozen dataclasses, presets, JSON round trip.

The library itself takes keyword arguments; only ``difflab train`` and friends use these
objects, and every run directory stores the full configuration as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from difflab.data.datasets import DATASETS

__all__ = [
    "DataConfig",
    "ModelConfig",
    "DiffusionConfig",
    "TrainConfig",
    "SampleConfig",
    "DistillConfig",
    "RunConfig",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "check_limit",
]


@dataclass(frozen=True)
class DataConfig:
    name: str = "swissroll"  # a data set of difflab.data.datasets.DATASETS
    data_dir: str | None = None  # folder with the dataset files (images); hf: hf:NAME[:SPLIT]
    download: bool = False  # fetch the standard files (SHA-256 checked) when missing
    image_size: int | None = None  # resize/crop images to this size (folder datasets)
    channels: int | None = None  # 1 or 3 (folder datasets); None keeps the dataset's own
    hflip: bool | None = None  # random horizontal flips; None = the dataset's default
    limit: int | None = None  # use only the first N training images (quick experiments)
    image_column: str | None = None  # hf data: the image column (None: first Image feature)
    downsample: int = 1  # f > 1: f x f box average of every image (a cascade's low-res base)

    @property
    def is_toy(self) -> bool:
        """2-D points (:data:`difflab.data.datasets.DATASETS` says which sets are)."""
        return self.name in DATASETS and DATASETS[self.name].is_2d


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "diffusion"  # the task: diffusion | classifier | autoencoder | latent | sr
    net: str = "mlp"  # the network (difflab.nn.networks.NETWORKS): mlp | unet | sohl-dickstein
    preset: str = "mnist-cpu"  # the network's size preset (e.g. difflab.nn.unet.UNET_PRESETS)
    hidden: int = 128  # MLP width
    depth: int = 3  # MLP residual blocks
    dropout: float | None = None  # override the preset's dropout
    unet: str | None = None  # U-Net fields over the preset's, a JSON object (imported networks)
    num_classes: int = 0  # > 0: class-conditional (with a null class for guidance)
    label_dropout: float = 0.1  # probability of dropping the label (classifier-free guidance)
    parameterization: str = "eps"  # what the network predicts: eps | x0 | v | edm | flow
    learned_variance: bool = False  # Improved DDPM: also output the variance interpolation
    image_task: str = "none"  # Palette image-to-image: none | colorize | restore | inpaint
    ae_preset: str = "mnist-f2c4"  # autoencoder architecture (difflab.nn.autoencoder presets)
    kl_weight: float = 1e-6  # autoencoder runs: weight of the KL term [Rombach 2022]
    rec_loss: str = "l1"  # autoencoder runs: reconstruction loss, l1 | l2
    autoencoder: str | None = None  # latent runs: the trained autoencoder run directory
    latent_scale: float | None = None  # latent runs: 1 / std of the latents, set once from data
    base: str | None = None  # super-resolution runs: the low-resolution base run (optional)
    base_config: str | None = None  # SR runs of earlier versions: the base run's config (JSON)
    frozen: str | None = None  # the runs it depends on, stored (JSON: role -> path, config, sha256)
    sr_factor: int = 2  # SR runs: output side / input side
    aug_level_max: float = 0.0  # SR runs: training levels s ~ U[0, max] (fraction of t range)


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = (
        "linear"  # beta schedule (linear|cosine|quadratic|sigmoid|sohl-dickstein), edm or flow
    )
    T: int = 1000  # number of diffusion steps (discrete schedules)
    beta_start: float | None = None  # beta_1 of linear|quadratic|sigmoid; None = 1e-4 * 1000/T
    beta_end: float | None = None  # beta_T of linear|quadratic|sigmoid; None = 0.02 * 1000/T
    zero_terminal_snr: bool = False  # rescale betas so the last step has zero SNR [Lin 2024]
    sigma_min: float = 0.002  # EDM schedule only
    sigma_max: float = 80.0  # EDM schedule only
    sigma_data: float = 0.5  # EDM preconditioning
    loss_type: str = "mse"  # mse | l1 | huber
    weighting: str = "uniform"  # uniform | snr | min-snr | edm
    t_sampling: str = "uniform"  # uniform | lognormal | importance | logit-normal | mode
    offset_noise: float = 0.0  # offset-noise strength (0 = off)
    vlb_weight: float = 0.001  # lambda of the hybrid loss (learned variance only)
    shift: float | None = None  # flow schedule: SD3's time shift s (None = 1, no shift)
    logit_mean: float | None = None  # flow: mean of logit(t) of logit-normal times (None = 0)
    logit_std: float | None = None  # flow: std of logit(t) of logit-normal times (None = 1)
    mode_scale: float | None = None  # flow: scale of SD3's mode time sampling (None = 1.29)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000  # optimisation steps
    batch_size: int = 512  # examples per step
    lr: float = 1e-3  # AdamW learning rate (after warm-up)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear LR warm-up
    lr_decay: str = "none"  # after warm-up: none | cosine | linear (to 0 over the budget: the
    # steps or, with max_minutes, the minutes, whichever runs out first)
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    ema_half_life: float = 50_000.0  # EMA half-life in examples seen (EDM convention)
    ema_rampup: float | None = 0.05  # half-life <= this fraction of the examples seen (EDM)
    bf16: bool = False  # autocast to bfloat16 (on by default on CUDA via --bf16)
    seed: int = 0  # seed of the whole run
    max_minutes: float | None = None  # wall-clock budget; stops early (and checkpoints) when hit
    log_every: int = 100  # steps between metrics.csv rows
    ckpt_every: int = 2000  # steps between checkpoints
    sample_every: int = 0  # steps between sample grids during training (0 = only at the end)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the network
    compile_mode: str = "default"  # its torch.compile mode: default | reduce-overhead (CUDA
    # graphs of the compiled calls on a GPU) | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # NHWC weights and activations while training (CPU convolutions)
    adamw: str = "auto"  # AdamW kernel: auto (fused on CUDA, for-loop elsewhere) | for-loop |
    # foreach | fused
    posthoc_ema: str | None = None  # EMA lengths sigma_rel kept for `difflab ema`, e.g.
    # "0.05,0.10" (power-function profiles [Karras 2024, EDM2]); None: off
    posthoc_ema_every: int = 500  # steps between post-hoc EMA snapshots (the interval doubles
    # whenever more than posthoc_ema_keep would be kept)
    posthoc_ema_keep: int = 32  # post-hoc EMA snapshots kept at most (besides the newest)


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "ddpm"  # a name of difflab.samplers.SAMPLERS
    steps: int = 1000  # sampler steps
    n: int = 5000  # samples drawn for the end-of-training figures and metrics
    eta: float | None = None  # eta of ddim, dpm++2m-sde, euler-ancestral (None: its default)
    threshold: str | None = None  # x0 thresholding to [-1, 1]: None | clip | dynamic (images)
    aug_level: float = 0.0  # SR runs: augmentation level of the low-res input (fraction of t)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation runs (``model.kind=distill``, ``difflab distill``): a few-step student of
    a frozen teacher run; the student's own sampling steps are ``sample.steps``."""

    # progressive [Salimans & Ho 2022] | consistency [Song 2023] | reflow [Liu 2023]
    method: str = "progressive"
    teacher: str | None = None  # the teacher run directory (resolved; stored in model.frozen)
    teacher_steps: int = 64  # progressive: the teacher's DDIM steps; rounds halve them
    weighting: str = "truncated-snr"  # progressive: truncated-snr | snr+1
    consistency: str = "cd"  # consistency: cd (Heun step of the teacher) | ect (tuning)
    levels: int = 18  # cd: Karras levels N of the distillation grid
    stages: int = 4  # ect: stages of the gap schedule (the gap halves with each)
    huber_c: float = 0.0  # ect: pseudo-Huber constant c (0: the L2 norm)
    # consistency: EDM sigmas of the intermediate times of multistep sampling, per step count
    sigmas: str = '{"2": [0.821], "4": [2.5, 0.821, 0.25]}'
    reflow_pairs: int = 4096  # reflow: (noise, sample) pairs of the teacher's ODE, drawn once
    reflow_steps: int = 20  # reflow: flow-heun steps of the teacher's ODE for each pair


@dataclass(frozen=True)
class RunConfig:
    preset: str = "swissroll"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        """Check every field's type and range (:data:`LIMITS`); a one-line ``ValueError`` names
        the first bad field. Returns the config with JSON ints in float fields made floats,
        marked valid: validating it again returns it at once (a frozen config cannot change;
        ``replace`` makes a new, unmarked one)."""
        if self.__dict__.get("_valid"):
            return self
        if not isinstance(self.preset, str):
            raise ValueError(f"preset must be a string, got {self.preset!r}")
        checked = {}
        for name, section_cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, section_cls):
                raise ValueError(f"config section {name!r} must be a {section_cls.__name__}")
            hints = typing.get_type_hints(section_cls)
            values = {}
            for f in fields(section_cls):
                path = f"{name}.{f.name}"
                value = _check_type(path, getattr(section, f.name), hints[f.name])
                _check_limit(path, value)
                values[f.name] = value
            checked[name] = section_cls(**values)
        valid = replace(self, **checked)
        object.__setattr__(valid, "_valid", True)  # not a field: equality and JSON ignore it
        return valid

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The config stored in a run (``config.json``): complete (:data:`STORED_KEYS`), with
        no unknown key, validated."""
        sections = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
        _check_complete(d)
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name == "preset":
                kwargs[name] = value
                continue
            section_cls = _SECTIONS[name]
            if not isinstance(value, dict):
                raise ValueError(
                    f"config section {name!r} must be a JSON object, got {type(value).__name__}"
                )
            names = {f.name for f in fields(section_cls)}
            bad = set(value) - names
            if bad:
                raise ValueError(
                    f"unknown keys in config section {name!r}: {', '.join(sorted(bad))}"
                )
            kwargs[name] = section_cls(**(migrate_model(value) if name == "model" else value))
        return cls(**kwargs).validate()


# model.kind once named the network too; an old value is the pair (task, network) it meant
KIND_MIGRATION = {
    "mlp": ("diffusion", "mlp"),
    "unet": ("diffusion", "unet"),
    "sohl-dickstein": ("diffusion", "sohl-dickstein"),
    "classifier": ("classifier", "unet"),
    "autoencoder": ("autoencoder", "autoencoder"),
    "latent": ("latent", "unet"),
    "sr": ("sr", "unet"),
}


def migrate_model(model: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` section written before ``model.net`` existed, in today's terms: its
    ``model.kind`` (mlp, unet, sohl-dickstein, classifier, ...) names the task and network."""
    if "net" in model or model.get("kind", "mlp") not in KIND_MIGRATION:
        return model
    kind, net = KIND_MIGRATION[model.get("kind", "mlp")]
    return {**model, "kind": kind, "net": net}


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "distill": DistillConfig,
}

# The keys every run's config.json has held since the first run format. A stored config that
# lacks one is refused: a default would silently describe another model. Keys added since
# take their defaults, which reproduce what the versions before them did.
STORED_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("name", "data_dir", "download", "image_size", "channels", "hflip", "limit"),
    "model": ("kind", "preset", "hidden", "depth", "dropout", "num_classes", "label_dropout",
              "parameterization", "learned_variance"),
    "diffusion": ("schedule", "T", "zero_terminal_snr", "sigma_min", "sigma_max", "sigma_data",
                  "loss_type", "weighting", "t_sampling", "offset_noise", "vlb_weight"),
    "train": ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
              "ema_half_life", "bf16", "seed", "max_minutes", "log_every", "ckpt_every",
              "sample_every", "device", "compile"),
    "sample": ("sampler", "steps", "n", "eta"),
}  # fmt: skip


def _check_complete(d: dict[str, Any]) -> None:
    """A one-line ``ValueError`` naming the first key of :data:`STORED_KEYS` missing in ``d``."""
    if "preset" not in d:
        raise ValueError("the config has no 'preset'; a stored config must be complete")
    for section, keys in STORED_KEYS.items():
        if section not in d:
            raise ValueError(
                f"the config has no {section!r} section; a stored config must be complete"
            )
        if isinstance(d[section], dict):
            missing = [k for k in keys if k not in d[section]]
            if missing:
                raise ValueError(
                    f"the config has no {section}.{missing[0]}; a stored config must be complete"
                )


def _above(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > lo), f"> {lo:g}"


def _at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= lo), f">= {lo:g}"


def _between(lo: int, hi: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: lo <= v <= hi), f"in {lo}..{hi}"


# Upper ends of the sizes that set an allocation (the network's widths, the schedule's arrays,
# a batch, an image): far above any run that fits a machine, low enough to be refused in one
# line instead of ending in an allocator error. Seeds: the range every derived seed accepts.
MAX_SEED = 2**32 - 1


# The range of every numeric field (None, where a field allows it, is always accepted).
# Float fields must also be finite.
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": _between(1, 4096),
    "data.channels": ((lambda v: v in (1, 3)), "1 or 3"),
    "data.limit": _above(0),
    "data.downsample": _above(0),
    "model.hidden": _between(1, 4096),  # an MLP weight: hidden^2
    "model.depth": _between(1, 64),
    "model.dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "model.num_classes": _between(0, 100_000),
    "model.label_dropout": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "model.kl_weight": _at_least(0),
    "model.latent_scale": _above(0),
    "model.sr_factor": _above(0),
    "model.aug_level_max": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "diffusion.T": _between(1, 1_000_000),
    "diffusion.beta_start": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "diffusion.beta_end": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "diffusion.sigma_min": _above(0),
    "diffusion.sigma_max": _above(0),
    "diffusion.sigma_data": _above(0),
    "diffusion.offset_noise": _at_least(0),
    "diffusion.vlb_weight": _at_least(0),
    "diffusion.shift": _above(0),
    "diffusion.logit_std": _above(0),
    "train.steps": _above(0),
    "train.batch_size": _between(1, 2**20),
    "train.lr": _above(0),
    "train.weight_decay": _at_least(0),
    "train.warmup_steps": _at_least(0),
    "train.grad_clip": _at_least(0),
    "train.ema_half_life": _at_least(0),
    "train.ema_rampup": _above(0),
    "train.seed": _between(0, MAX_SEED),
    "train.max_minutes": _above(0),
    "train.log_every": _above(0),
    "train.ckpt_every": _above(0),
    "train.sample_every": _at_least(0),
    "train.posthoc_ema_every": _above(0),
    "train.posthoc_ema_keep": _between(1, 100_000),
    "sample.steps": _between(1, 1_000_000),
    "sample.n": _above(0),
    "sample.eta": _at_least(0),
    "sample.aug_level": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "distill.teacher_steps": _between(2, 1_000_000),
    "distill.levels": _between(2, 100_000),
    "distill.stages": _between(1, 64),
    "distill.huber_c": _at_least(0),
    "distill.reflow_pairs": _between(1, 10_000_000),
    "distill.reflow_steps": _between(1, 10_000),
}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """``value`` if its type is the field's (an int is a float, a bool is not an int)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and type(value) is int:
        return float(value)
    if type(value) in allowed:
        return value
    expected = " or ".join(_TYPE_NAMES.get(t, "null") for t in allowed)
    raise ValueError(f"{path} must be {expected}, got {value!r}")


def _check_limit(path: str, value: Any, name: str | None = None) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name or path} must be a finite number, got {value}")
    if path in LIMITS:
        ok, what = LIMITS[path]
        if not ok(value):
            raise ValueError(f"{name or path} must be {what}, got {value}")


def check_limit(path: str, value: Any, name: str) -> Any:
    """``value`` if it is in the range of the config field ``path`` (:data:`LIMITS`); a
    one-line ``ValueError`` naming it ``name`` otherwise. For command-line options that mean
    a config field (``--seed``, ``viz --T``), so a range lives in one place."""
    _check_limit(path, value, name)
    return value


def _toy(name: str) -> RunConfig:
    return RunConfig(preset=name, data=DataConfig(name=name))


def _derive(base: str, name: str, **sections: dict[str, Any] | Any) -> RunConfig:
    """Preset ``name``: preset ``base`` with, per section, the given fields changed
    (``model={"num_classes": 10}``) or the section given whole (``train=TrainConfig(...)``)."""
    cfg = PRESETS[base]
    changed = {
        key: replace(getattr(cfg, key), **value) if isinstance(value, dict) else value
        for key, value in sections.items()
    }
    return replace(cfg, preset=name, **changed)


PRESETS: dict[str, RunConfig] = {
    name: _toy(name) for name in ("swissroll", "moons", "8gaussians", "checkerboard", "gmm")
}
PRESETS["swissroll-sd2015"] = RunConfig(
    preset="swissroll-sd2015",
    data=DataConfig(name="swissroll"),
    model=ModelConfig(net="sohl-dickstein", hidden=128),
    diffusion=DiffusionConfig(schedule="sohl-dickstein", T=40),
    train=TrainConfig(steps=6000, batch_size=512, lr=1e-3, ema_half_life=50_000.0),
    sample=SampleConfig(sampler="ddpm", steps=40),
)
# the eps-DDPM recipe, tuned for quality after 10 CPU minutes before the recipe race; every
# derived MNIST preset keeps it (their benchmarks and fingerprints were made with it)
PRESETS["mnist-eps"] = RunConfig(
    preset="mnist-eps",
    data=DataConfig(name="mnist"),
    model=ModelConfig(net="unet", preset="mnist-cpu"),
    diffusion=DiffusionConfig(schedule="linear", T=1000),
    # tuned for quality after 10 CPU minutes (benchmarks/mnist_quality.py, BENCHMARKS.md)
    train=TrainConfig(
        steps=100_000,
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        ema_half_life=20_000.0,
        log_every=50,
        ckpt_every=500,
    ),
    # chosen by quality per second (benchmarks/default_sampler.py, BENCHMARKS.md): on the
    # 10-minute model SDE-DPM-Solver++(2M) with 10 steps has DDPM-50's FDD (1.01x) in 1/6 of
    # its time; stochastic samplers beat the ODE on briefly trained models
    sample=SampleConfig(sampler="dpm++2m-sde", steps=10, n=64, threshold="clip"),
)
# flow matching [Lipman 2023; Liu 2023 (rectified flow); Esser 2024 (SD3)]: x_t = (1 - t) x0 +
# t eps, the network predicts the velocity u = eps - x0 (called with 1000 t), sampled by the
# Euler steps of dx/dt = u on a trailing grid (exactly DDIM with eta = 0 on this schedule).
# The network and training recipe are mnist-eps's, so the two processes compare at equal cost.
# Training times are logit-normal(0, 1), SD3's default rf/lognorm(0.00, 1.00) [Esser 2024,
# Eq. 19 and Sec. 5.1]: it puts the training signal on the middle times, where the velocity is
# hardest to predict (near t = 0 it is about eps, near t = 1 about the data mean), and was the
# best of SD3's time laws at equal steps; on this schedule it is also EDM's log-normal sigma
# with (P_mean, P_std) = (0, 1). 2-D data uses Lipman's uniform times (no perceptual middle).
_FLOW = {"schedule": "flow", "t_sampling": "logit-normal"}
# The mnist preset is the winner of the recipe race (benchmarks/recipe_race.py; BENCHMARKS.md,
# "Recipe race at 1383 steps (MNIST)"): mnist-eps's network, optimiser, EMA and default
# sampler with the flow process. At 4,611 steps (10 CPU minutes) its FDD is 11.70 against
# eps's 21.75 (n = 10,000, the default sampler), and its Inception FID is lower too (29.9
# against 31.9, n = 1,000)
PRESETS["mnist"] = _derive(
    "mnist-eps", "mnist", model={"parameterization": "flow"}, diffusion=_FLOW
)
PRESETS["mnist-cond"] = _derive(
    "mnist-eps", "mnist-cond", model={"num_classes": 10, "label_dropout": 0.1}
)
# noise-aware classifier for classifier guidance [Dhariwal & Nichol 2021]: the U-Net's encoder
PRESETS["mnist-classifier"] = _derive(
    "mnist-eps",
    "mnist-classifier",
    model={"kind": "classifier", "num_classes": 10},
    train={"steps": 5000},
)
# Palette [Saharia 2022]: restore blurred, noisy digits (degraded on the fly, see image_to_image)
PRESETS["mnist-restore"] = _derive("mnist-eps", "mnist-restore", model={"image_task": "restore"})
# latent diffusion [Rombach 2022]: a KL autoencoder (28x28x1 -> 7x7x4, f = 4), then a diffusion
# model on its frozen encoder's latents (difflab train --preset mnist-latent
# --set model.autoencoder=AE_RUN) on LDM's schedule (sqrt(beta) linear from 0.00085 to 0.012:
# it ends less noisy than DDPM's, which matters because latents have no range to clip x0 to);
# recipe chosen at a 10-minute CPU budget (BENCHMARKS.md, latent recipes)
PRESETS["mnist-ae"] = _derive(
    "mnist-eps",
    "mnist-ae",
    model={"kind": "autoencoder", "net": "autoencoder", "ae_preset": "mnist-f4c4"},
    train={"lr": 1e-3, "ema_half_life": 10_000.0},
)
PRESETS["mnist-latent"] = _derive(
    "mnist-eps",
    "mnist-latent",
    model={"kind": "latent", "preset": "mnist-latent", "ae_preset": "mnist-f4c4"},
    diffusion={"schedule": "quadratic", "beta_start": 0.00085, "beta_end": 0.012},
    sample={"threshold": None},
)
PRESETS["mnist-latent-cond"] = _derive(
    "mnist-latent", "mnist-latent-cond", model={"num_classes": 10, "label_dropout": 0.1}
)
# cascaded diffusion [Ho 2021; Saharia 2021]: a base model of MNIST at 14 x 14 (2 x 2 box
# averages), then a super-resolution model 14 -> 28 conditioned on the upsampled low-res image,
# noised to a level s ~ U[0, 0.25 T] that it is told (Gaussian conditioning augmentation;
# difflab train --preset mnist-sr --set model.base=BASE_RUN); v-prediction with x0 clipping
PRESETS["mnist-14"] = _derive(
    "mnist-eps", "mnist-14", data={"downsample": 2}, model={"preset": "mnist-half"}
)
PRESETS["mnist-sr"] = _derive(
    "mnist-eps",
    "mnist-sr",
    model={"kind": "sr", "parameterization": "v", "aug_level_max": 0.25},
    sample={"aug_level": 0.05},
)
# diffusion transformers [Peebles & Xie 2023; Bao 2023]: the mnist and mnist-latent recipes
# with a DiT (adaLN-Zero) or U-ViT (DiT with long skips) of the U-Net's parameter count (0.72M
# and 0.76M against mnist-cpu's 0.71M; 0.40M against mnist-latent's 0.41M; difflab presets
# prints them with their FLOPs); same data, schedule, optimiser and sampler, so the backbone is
# the only difference (benchmarks/backbone_quality.py)
PRESETS["mnist-dit"] = _derive(
    "mnist-eps", "mnist-dit", model={"net": "dit", "preset": "mnist-dit"}
)
PRESETS["mnist-uvit"] = _derive(
    "mnist-eps", "mnist-uvit", model={"net": "dit", "preset": "mnist-uvit"}
)
# the same with 4x4 patches: equal parameters at half the U-Net's FLOPs (a time budget's pick)
for _name in ("mnist-dit-p4", "mnist-uvit-p4"):
    PRESETS[_name] = _derive("mnist-eps", _name, model={"net": "dit", "preset": _name})
PRESETS["mnist-latent-dit"] = _derive(
    "mnist-latent", "mnist-latent-dit", model={"net": "dit", "preset": "mnist-latent-dit"}
)
# few-step students of a trained run (difflab distill TEACHER_RUN, or difflab train --preset
# swissroll-distill --set distill.teacher=RUN): the network, data and schedule must be the
# teacher's. Progressive distillation 64 -> 1 DDIM steps in v-prediction [Salimans & Ho 2022];
# consistency distillation with a Heun step of the teacher, sampled in 2 steps [Song 2023], in
# v-prediction like difflab distill's consistency students of an eps teacher (an eps
# student's one-step x0 is its eps error times 1 / alpha(T) = 157)
PRESETS["swissroll-distill"] = _derive(
    "swissroll",
    "swissroll-distill",
    model={"kind": "distill", "parameterization": "v"},
    train={"steps": 2000, "lr": 2.5e-4, "warmup_steps": 100},
    sample={"sampler": "ddim", "steps": 1},
)
PRESETS["mnist-consistency"] = _derive(
    "mnist-eps",
    "mnist-consistency",
    model={"kind": "distill", "parameterization": "v"},
    train={"steps": 5000, "lr": 5e-4},
    sample={"sampler": "consistency", "steps": 2},
    distill={"method": "consistency"},
)
PRESETS["fashion-mnist"] = _derive("mnist-eps", "fashion-mnist", data={"name": "fashion-mnist"})
PRESETS["swissroll-fm"] = replace(
    _toy("swissroll"),
    preset="swissroll-fm",
    model=ModelConfig(parameterization="flow"),
    diffusion=DiffusionConfig(schedule="flow", t_sampling="uniform"),
    sample=SampleConfig(sampler="flow-heun", steps=50),
)
PRESETS["mnist-fm"] = _derive(
    "mnist-eps",
    "mnist-fm",
    model={"parameterization": "flow"},
    diffusion=_FLOW,
    sample={"sampler": "flow-euler", "steps": 20},
)
# the 4x4-patch DiT trained by flow matching (SD3's pairing of a transformer with rectified
# flow and logit-normal times [Esser 2024]); mnist-fm's recipe, so it compares with the U-Net's
PRESETS["mnist-dit-fm"] = _derive(
    "mnist-fm", "mnist-dit-fm", model={"net": "dit", "preset": "mnist-dit-p4"}
)
PRESETS["mnist-cond-fm"] = _derive(
    "mnist-fm", "mnist-cond-fm", model={"num_classes": 10, "label_dropout": 0.1}
)
# mnist-latent's autoencoder and latent U-Net (--set model.autoencoder=AE_RUN), flow matching
PRESETS["mnist-latent-fm"] = _derive(
    "mnist-latent",
    "mnist-latent-fm",
    model={"parameterization": "flow"},
    diffusion={**_FLOW, "beta_start": None, "beta_end": None},
    sample={"sampler": "flow-euler", "steps": 20},
)
# the MNIST preset at DDPM's CIFAR-10 scale
PRESETS["cifar10"] = _derive(
    "mnist-eps",
    "cifar10",
    data={"name": "cifar10"},
    model={"preset": "ddpm-cifar10"},
    # DDPM: Adam 2e-4, batch 128, 800k steps, warm-up 5000, EMA 0.9999 (= half-life 887k images)
    train={
        "steps": 800_000,
        "batch_size": 128,
        "lr": 2e-4,
        "warmup_steps": 5000,
        "ema_half_life": 887_000.0,
        "log_every": 100,
        "ckpt_every": 5000,
        "sample_every": 10_000,
    },
    sample={"sampler": "ddim", "steps": 100},
)
PRESETS["cifar10-colorize"] = _derive(
    "cifar10", "cifar10-colorize", model={"image_task": "colorize"}
)
PRESETS["folder"] = _derive(
    "cifar10", "folder", data={"name": "folder", "image_size": 32, "channels": 3}
)
# The Hugging Face diffusion course's first model (Unit 1, "Introduction to Diffusers",
# github.com/huggingface/diffusion-models-class): the 1000 Smithsonian butterflies at 32 x 32
# with random flips, the cosine schedule ("squaredcos_cap_v2"), T = 1000, the eps MSE loss,
# torch AdamW (lr 4e-4, its default weight decay 0.01), batch 64, 30 epochs = 480 steps, no
# warm-up, no clipping; sampled by DDPMPipeline (1000 ancestral steps, x0 clipped). Differences:
# the course squashes each image to 32 x 32 and trains a smaller UNet2DModel whose per-level
# attention head widths difflab's single num_heads cannot express; here images are resized and
# centre-cropped (as every difflab image source) and the network is DDPM's CIFAR-10 U-Net at
# the same resolution; difflab keeps an EMA copy for sampling. Needs internet for the data
# (pip install 'difflab[hf]'); a save_to_disk copy works offline with --data-dir DIR.
PRESETS["butterflies"] = _derive(
    "cifar10",
    "butterflies",
    data=DataConfig(
        name="hf",
        data_dir="hf:huggan/smithsonian_butterflies_subset",
        image_size=32,
        channels=3,
        hflip=True,
    ),
    diffusion={"schedule": "cosine"},
    train=TrainConfig(
        steps=480,
        batch_size=64,
        lr=4e-4,
        weight_decay=0.01,
        warmup_steps=0,
        grad_clip=0.0,
        log_every=16,
        ckpt_every=160,
    ),
    sample={"sampler": "ddpm", "steps": 1000},
)


def get_preset(name: str) -> RunConfig:
    """The named preset; a one-line error lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse_value(text: str, current: Any, key: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true or false, got {text!r}")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ValueError(f"{key} expects a number, got {text!r}") from None
    if current is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (e.g. ``train.lr=3e-4``). A ``model.kind`` of
    the old form (``model.kind=unet``) also sets ``model.net``, unless that is given too."""
    keys = [item.split("=", 1)[0] for item in overrides]
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in _SECTIONS:
            raise ValueError(
                f"unknown config section {section!r}; choose one of: {', '.join(_SECTIONS)}"
            )
        sec = getattr(cfg, section)
        if key not in {f.name for f in fields(sec)}:
            names = ", ".join(f.name for f in fields(sec))
            raise ValueError(f"unknown key {key!r} in section {section!r}; choose one of: {names}")
        value = _parse_value(text, getattr(sec, key), path)
        cfg = replace(cfg, **{section: replace(sec, **{key: value})})
    if "model.kind" in keys and "model.net" not in keys:
        model = migrate_model({"kind": cfg.model.kind})
        cfg = replace(cfg, model=replace(cfg.model, **model))
    return cfg.validate()
