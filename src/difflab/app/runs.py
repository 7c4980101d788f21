"""Runs from configs and run directories: check a config, build a run, load a trained one.

A run flows one way: CLI -> config (:mod:`difflab.app.config`, validated here) -> run kind
(:mod:`difflab.app.kinds`) -> build -> train (:mod:`difflab.app.training`) or sample
(:mod:`difflab.app.sampling`) -> report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from difflab import checkpoint as ckpt
from difflab.app.build import Built, build_data, build_schedule, cfg_data_shape, resolve_device
from difflab.app.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig
from difflab.app.kinds import KINDS, RunKind, kind_of
from difflab.data.datasets import dataset
from difflab.image_to_image import TASKS
from difflab.inference import COMPILE_MODES
from difflab.objectives import LOSS_TYPES, TIME_SAMPLINGS, WEIGHTINGS
from difflab.parameterization import PARAMETERIZATIONS
from difflab.posthoc_ema import parse_sigma_rels
from difflab.process_table import diffusion_settings, process_for
from difflab.safe_io import atomic_write_json, say
from difflab.samplers import SAMPLER_OPTIONS, SAMPLERS
from difflab.samplers.common import THRESHOLD_MODES
from difflab.schedules import Schedule, check_choice
from difflab.train import ADAMW_KERNELS, LR_DECAYS

__all__ = [
    "CheckedConfig",
    "build",
    "check_config",
    "import_diffusers_run",
    "is_diffusers_folder",
    "load_run",
    "read_run_config",
]


IMPORTED_FILE = "imported.json"  # a run made by `difflab import`: the folder it read
# Settings that only one model.kind reads: set for another, they would be silently ignored.
KIND_ONLY_FIELDS = {
    "autoencoder": "latent",
    "latent_scale": "latent",
    "base": "sr",
    "base_config": "sr",
}


@dataclass(frozen=True)
class CheckedConfig:
    """A config checked once (:func:`check_config`), with what the check found: the run kind
    that it selects and its process's schedule. The layers below take it as it is."""

    cfg: RunConfig
    kind: RunKind
    schedule: Schedule


def check_config(cfg: RunConfig | CheckedConfig) -> CheckedConfig:
    """Reject settings that no run can use (one-line ``ValueError``) before anything is loaded
    or written: types and ranges (:meth:`RunConfig.validate`, once per config), every name, the
    run kind's own checks, the process's settings and the device. A checked config is returned
    as it is."""
    if isinstance(cfg, CheckedConfig):
        return cfg
    cfg = cfg.validate()
    dataset(cfg.data.name)  # a name of the data-set table
    run_kind = kind_of(cfg)
    run_kind.check(cfg)
    for name, kind in KIND_ONLY_FIELDS.items():
        if getattr(cfg.model, name) is not None and run_kind.model_kind != kind:
            raise ValueError(
                f"model.{name} is read by model.kind={kind} runs only; this run is "
                f"model.kind={cfg.model.kind} (set --set model.kind={kind} or drop it)"
            )
    check_choice("model.parameterization", cfg.model.parameterization, PARAMETERIZATIONS)
    check_choice("model.image_task", cfg.model.image_task, ("none", *TASKS))
    check_choice("diffusion.loss_type", cfg.diffusion.loss_type, LOSS_TYPES)
    check_choice("diffusion.weighting", cfg.diffusion.weighting, WEIGHTINGS)
    check_choice("diffusion.t_sampling", cfg.diffusion.t_sampling, TIME_SAMPLINGS)
    if cfg.diffusion.sigma_min >= cfg.diffusion.sigma_max:
        raise ValueError("diffusion.sigma_min must be below diffusion.sigma_max")
    process = process_for(cfg.diffusion.schedule)
    process.check(asdict(cfg.diffusion))
    process.check_model(cfg.model.parameterization, cfg.model.learned_variance)
    schedule = build_schedule(cfg)
    resolve_device(cfg.train.device)
    check_choice("train.adamw", cfg.train.adamw, tuple(ADAMW_KERNELS))
    check_choice("train.lr_decay", cfg.train.lr_decay, tuple(LR_DECAYS))
    check_choice("train.compile_mode", cfg.train.compile_mode, COMPILE_MODES)
    if cfg.train.posthoc_ema is not None:
        parse_sigma_rels(cfg.train.posthoc_ema)
    if cfg.data.is_toy and cfg.data.downsample != 1:
        raise ValueError("data.downsample applies to images, not to 2-D data")
    cfg_data_shape(cfg)
    if cfg.sample.threshold is not None:
        check_choice("sample.threshold", cfg.sample.threshold, THRESHOLD_MODES)
    check_choice("sample.sampler", cfg.sample.sampler, tuple(SAMPLERS))
    if cfg.sample.eta is not None and "eta" not in SAMPLER_OPTIONS[cfg.sample.sampler]:
        raise ValueError(f"sample.eta is set but sampler {cfg.sample.sampler!r} has no eta")
    return CheckedConfig(cfg, run_kind, schedule)


def build(
    cfg: RunConfig | CheckedConfig, *, device: torch.device | None = None, load_data: bool = True
) -> Built:
    """Schedule, data, model and denoiser for ``cfg`` (the model is on ``device``); a config
    not yet checked is checked first (:func:`check_config`)."""
    checked = check_config(cfg)
    cfg, kind, schedule = checked.cfg, checked.kind, checked.schedule
    device = device or resolve_device(cfg.train.device)
    dataset = build_data(cfg) if load_data and not cfg.data.is_toy else None
    data_shape = cfg_data_shape(cfg) if dataset is None else tuple(dataset.images.shape[1:])
    model = kind.build_model(cfg, data_shape, schedule).to(device)
    denoiser = kind.denoiser(cfg, model, schedule)
    built = Built(cfg, kind, schedule, model, denoiser, data_shape, dataset, device)
    return kind.on_data(built) if load_data else built


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` of a run directory, also of runs written by older versions: they
    stored ``sample.eta = 0.0`` (then DDIM's eta, unused) whatever the sampler, which for a
    sampler without an eta means "not set"."""
    path = Path(run_dir) / "config.json"
    try:
        cfg = RunConfig.from_dict(ckpt.read_config(Path(run_dir)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if cfg.sample.eta is not None and "eta" not in SAMPLER_OPTIONS.get(cfg.sample.sampler, ()):
        return replace(cfg, sample=replace(cfg.sample, eta=None))
    return cfg


def load_run(run_dir: str | Path, *, ema: bool = True, device: torch.device | None = None) -> Built:
    """Rebuild a run's model from its config.json and newest valid checkpoint (EMA weights);
    a skipped newer checkpoint is named on stderr, non-finite weights are refused. A diffusers
    folder (:func:`is_diffusers_folder`) loads as an image diffusion run."""
    run_dir = Path(run_dir)
    if is_diffusers_folder(run_dir):
        return _load_diffusers(run_dir, device or torch.device("cpu"))
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


# ----------------------------------------------------------------------------- diffusers
def is_diffusers_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (``model_index.json``) or a lone ``UNet2DModel`` folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "UNet2DModel"


def _load_diffusers(folder: Path, device: torch.device) -> Built:
    """A diffusers model as an image diffusion run: its network converted to difflab's U-Net
    (:mod:`difflab.interop.diffusers`), its schedule, and a config describing both."""
    from difflab.interop import closest_preset, load_diffusers

    m = load_diffusers(folder, device=device)
    c, h, _ = m.data_shape
    # the process whose settings rebuild the schedule; a custom beta schedule is shown as
    # linear (the Built below holds the real one)
    settings = diffusion_settings(m.schedule.to_config()) or {
        "schedule": "linear",
        "T": m.schedule.T,  # type: ignore[union-attr]
    }
    sampler, steps = process_for(settings["schedule"]).sampler
    cfg = RunConfig(
        preset=f"diffusers:{folder.name}",
        data=DataConfig(name="folder", image_size=h, channels=c),
        model=ModelConfig(
            kind="diffusion", net="unet", preset=closest_preset(m.unet.config)[0] or "ddpm-cifar10",
            num_classes=m.num_classes, parameterization=m.parameterization,
            learned_variance=m.learned_variance,
        ),
        diffusion=DiffusionConfig(**settings),
        sample=SampleConfig(
            sampler=sampler, steps=steps, n=64, threshold="clip" if m.clip_sample else None
        ),
    )  # fmt: skip
    model = m.unet.to(device).eval()
    kind = KINDS["diffusion-image"]
    return Built(cfg, kind, m.schedule, model, m.denoiser, m.data_shape, None, device)


def import_diffusers_run(
    folder: str | Path, run_dir: str | Path, *, preset: str, overrides: list[str] | None = None
) -> Path:
    """Convert a diffusers ``UNet2DModel`` into a native run directory (step 0), so that
    ``difflab train --resume RUN`` fine-tunes it with the data and recipe of ``preset`` (with
    ``section.key=value`` ``overrides``).

    Any ``UNet2DModel`` that difflab's U-Net expresses is imported: the run's ``model.preset``
    is the closest U-Net preset (google/ddpm-cifar10-32 is ``ddpm-cifar10`` exactly) and
    ``model.unet`` holds the fields in which the network differs from it. An option without a
    difflab equivalent is a one-line ``ValueError`` naming it.
    """
    from difflab.app.config import apply_overrides, get_preset
    from difflab.interop import import_to_run

    folder, run_dir = Path(folder), Path(run_dir)
    imp = import_to_run(folder)
    if diffusion_settings(imp.schedule_config) is None:
        raise ValueError(
            f"{folder}: its beta schedule has no difflab name, which a run config cannot "
            f"express; sample it directly with difflab sample {folder}"
        )
    base = apply_overrides(get_preset(preset), overrides or [])
    sections = imp.run_config_sections()
    if imp.preset_overrides:  # the network's own config: the closest preset and what differs
        sections["model"]["unet"] = json.dumps(imp.preset_overrides)
    cfg = replace(
        base,
        model=replace(base.model, **sections["model"]),
        diffusion=replace(base.diffusion, **sections["diffusion"]),
    )
    checked = check_config(cfg)
    if tuple(cfg_data_shape(cfg)) != tuple(imp.data_shape):
        raise ValueError(
            f"{folder} makes images of shape {tuple(imp.data_shape)}, the data of preset "
            f"{preset!r} has shape {tuple(cfg_data_shape(cfg))}; choose another --preset"
        )
    built = build(checked, device=torch.device("cpu"), load_data=False)
    built.model.load_state_dict(imp.state_dict)  # the shapes are the preset's
    state = {"step": 0, "optimizer": torch.optim.AdamW(built.model.parameters()).state_dict(),
             "extra": {}}  # fmt: skip
    weights = {k: v.detach().cpu() for k, v in built.model.state_dict().items()}
    with ckpt.open_run_dir(run_dir, config=cfg.to_dict(), resume=False):
        ckpt.save_checkpoint(
            run_dir, step=0, tensors={"model": weights, "ema": weights}, state=state
        )
        # where the weights came from, for the model card of a later export
        atomic_write_json(run_dir / IMPORTED_FILE, {"source": str(folder)})
    return run_dir
