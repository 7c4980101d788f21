"""difflab runs out to diffusers, diffusers models in as difflab runs.

:func:`export_to_diffusers` writes a folder that ``DDPMPipeline.from_pretrained`` and
``DDIMPipeline.from_pretrained`` load (``model_index.json``, ``unet/``, ``scheduler/``) with a
model card ``README.md`` the Hugging Face hub shows as it is. The folder is assembled under a
temporary name beside ``out_dir`` and renamed into place, so a crash leaves either no folder or
a complete one. A flow-matching run is written with diffusers' ``FlowMatchEulerDiscreteScheduler``
and a shipped pipeline (:data:`FLOW_PIPELINE`) that drives it the way difflab's ``flow-euler``
steps. :func:`import_to_run` converts a diffusers folder into what a native difflab
run directory holds (U-Net config, weights, schedule config).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from difflab.interop.diffusers import (
    FLOW_SCHEDULER,
    PATCH_SIZE_KEY,
    NullLabel,
    diffusers_config_from_unet,
    load_diffusers,
    scheduler_config_from_schedule,
    state_dict_to_diffusers,
)
from difflab.nn.unet import UNET_PRESETS, UNetConfig
from difflab.parameterization import Parameterization
from difflab.process_table import diffusion_settings
from difflab.safe_io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from difflab.schedules import FlowMatchSchedule, Schedule

__all__ = [
    "ImportedRun",
    "ModelCardInfo",
    "closest_preset",
    "export_to_diffusers",
    "import_to_run",
    "model_card",
]

# the DDIMPipeline call of the model card: difflab's ddim with eta 0 (the exported scheduler
# config has trailing spacing and set_alpha_to_one), the clipped x0's eps recomputed
USAGE_CALL = "batch_size=16, num_inference_steps=50, eta=0.0, use_clipped_model_output=True"
# The pipeline shipped in the folder of a U-Net with a p x p fold (patch_size > 1), whose
# UNet2DModel works on folded images: DDIM on the folded image, unfolded at the end. Loaded with
# DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) (model_index.json names it).
FOLDED_PIPELINE = '''"""DDIM sampling of a difflab U-Net on images folded p x p into channels.

The UNet2DModel in unet/ sees each image as its pixel_unshuffle by p (config key
_difflab_patch_size); the fold only permutes pixels, so the diffusion process and the noise
are the same as on the image itself. Written by difflab's export.
"""

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class FoldedDDIMPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))

    @torch.no_grad()
    def __call__(self, batch_size=1, generator=None, eta=0.0, num_inference_steps=50,
                 use_clipped_model_output=None, output_type="pil", return_dict=True,
                 class_labels=None):
        """class_labels: (batch_size,) labels of a class-conditional model; default: its
        null label (unconditional samples)."""
        cfg = self.unet.config
        p = cfg["_difflab_patch_size"]
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if cfg.num_class_embeds and class_labels is None:
            class_labels = torch.full((batch_size,), cfg.num_class_embeds - 1, device=self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        for k in self.progress_bar(self.scheduler.timesteps):
            out = self.unet(x, k, class_labels=class_labels).sample
            x = self.scheduler.step(out, k, x, eta=eta, generator=generator,
                                    use_clipped_model_output=use_clipped_model_output).prev_sample
        image = (F.pixel_shuffle(x, p) / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
'''
# The call of a flow model's card: difflab's flow-euler (trailing grid, x0 clipped to [-1, 1]).
FLOW_USAGE_CALL = "batch_size=16, num_inference_steps=20, clip_sample=True"
# The pipeline shipped in the folder of a flow-matching model: diffusers has no unconditional
# image pipeline for FlowMatchEulerDiscreteScheduler, and the grid must be given unshifted.
FLOW_PIPELINE = '''"""Flow-matching Euler sampling of a difflab velocity U-Net (u = eps - x0).

x_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is pure noise; the network is called with
timestep = num_train_timesteps * sigma. FlowMatchEulerDiscreteScheduler.set_timesteps shifts
whatever sigmas it is given, also a grid it computed already shifted from a step count (the
shift applied twice, diffusers issue 13243): this pipeline passes the unshifted grid
linspace(1, 1/N, N), which the scheduler shifts once into difflab's trailing grid. With
clip_sample the predicted clean image x0 = x - sigma u is clipped to [-1, 1] and the velocity
recomputed from it, (x - x0) / sigma (difflab's threshold "clip"). A U-Net whose config has
_difflab_patch_size p > 1 works on images folded p x p into channels; the result is unfolded.
Written by difflab's export.
"""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DifflabFlowPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size=1, generator=None, num_inference_steps=20, clip_sample=False,
                 output_type="pil", return_dict=True, class_labels=None):
        """class_labels: (batch_size,) labels of a class-conditional model; default: its
        null label (unconditional samples)."""
        cfg = self.unet.config
        p = cfg.get("_difflab_patch_size", 1)
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if cfg.num_class_embeds and class_labels is None:
            class_labels = torch.full((batch_size,), cfg.num_class_embeds - 1, device=self.device)
        n = num_inference_steps
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), device=self.device)
        sigmas = self.scheduler.sigmas
        for i, k in enumerate(self.progress_bar(self.scheduler.timesteps)):
            u = self.unet(x, k, class_labels=class_labels).sample
            if clip_sample:
                x0 = (x - sigmas[i] * u).clamp(-1, 1)
                u = (x - x0) / sigmas[i]
            x = self.scheduler.step(u, k, x).prev_sample
        if p > 1:
            x = F.pixel_shuffle(x, p)
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
'''
# fields the app layer sets from the data and ModelConfig (app.build_model), not from a preset
_APP_FIELDS = ("in_channels", "image_size", "out_channels", "num_classes", "dropout")


@dataclass
class ModelCardInfo:
    """What the generated ``README.md`` says about an exported model.

    Attributes:
        title: heading of the card.
        description: what was trained on what (a sentence or two).
        run_config: the run's config.json contents, shown as JSON.
        metrics: measured numbers (name -> value), e.g. {"FID (10k, ddim 50)": 4.2}; the
            sample-quality figures first, then training figures such as the final loss.
        origin: where the weights came from when difflab did not train them from scratch,
            e.g. "fine-tuned with difflab from the diffusers model google/ddpm-cifar10-32";
            None: trained with difflab.
        sample_grid: a PNG file copied next to the card as ``samples.png`` and shown.
        command: the command line that trained the run.
        license: the hub's license field (an SPDX-style id such as "mit").
        tags: extra hub tags.
        space_app: the Gradio script shipped beside the card (e.g. ``app.py``), named in the
            front matter (``sdk: gradio``, ``app_file``) so the folder also runs as a Space;
            None: no app.
    """

    title: str = "difflab diffusion model"
    description: str = ""
    run_config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    sample_grid: str | Path | None = None
    command: str | None = None
    origin: str | None = None
    license: str = "mit"
    tags: list[str] = field(default_factory=list)
    space_app: str | None = None


def _usage(unet: dict[str, Any], flow: bool = False) -> list[str]:
    """The card's usage snippet: DDIMPipeline, or the shipped pipeline of a folded U-Net or
    of a flow-matching model."""
    p = unet.get(PATCH_SIZE_KEY, 1)
    if flow:
        load = [
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO", trust_remote_code=True)',
        ]
        fold = f" on images folded {p} x {p} into channels, unfolded at the end" if p > 1 else ""
        note = [
            "diffusers has no unconditional image pipeline for `FlowMatchEulerDiscreteScheduler`"
            f"; `pipeline.py` (shipped here, hence `trust_remote_code=True`) samples{fold}. "
            "It passes `set_timesteps` the unshifted sigmas `linspace(1, 1/N, N)`: the "
            "scheduler shifts the sigmas it is given, so a grid shifted beforehand (or the one "
            "it computes itself from a step count) would be shifted twice (diffusers #13243).",
            "",
        ]
        return ["```python", *load, f"images = pipe({FLOW_USAGE_CALL}).images", "```", "", *note]
    if p == 1:
        load = ["from diffusers import DDIMPipeline", "",
                'pipe = DDIMPipeline.from_pretrained("PATH_OR_REPO")']  # fmt: skip
        note = []
    else:
        load = [
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO", trust_remote_code=True)',
        ]
        note = [
            f"The network works on images folded {p} x {p} into channels (difflab's "
            f"`patch_size={p}`), which `UNet2DModel` has no option for: `unet/` holds the "
            f"U-Net on the folded {unet['in_channels']} x {unet['sample_size']} x "
            f"{unet['sample_size']} images, and `pipeline.py` (shipped here, hence "
            "`trust_remote_code=True`) samples with DDIM and unfolds the result.",
            "",
        ]
    return ["```python", *load, f"images = pipe({USAGE_CALL}).images", "```", "", *note]


def model_card(info: ModelCardInfo, *, unet: dict[str, Any], scheduler: dict[str, Any]) -> str:
    """The model card text: YAML front matter (license, library, tags) and Markdown sections."""
    tags = ["diffusers", "difflab", "unconditional-image-generation", *info.tags]
    if unet.get("num_class_embeds"):
        tags[2] = "class-conditional-image-generation"
    lines = ["---", f"license: {info.license}", "library_name: diffusers", "tags:"]
    lines += [f"- {t}" for t in dict.fromkeys(tags)]
    if info.space_app is not None:  # a Hugging Face Space reads these two keys
        lines += ["sdk: gradio", f"app_file: {info.space_app}"]
    lines += ["---", "", f"# {info.title}", ""]
    if info.description:
        lines += [info.description, ""]
    size, ch = unet["sample_size"], unet["in_channels"]
    what = f"A `UNet2DModel` ({ch} x {size} x {size} images, block_out_channels " + (
        f"{unet['block_out_channels']}) {info.origin or 'trained with difflab'}, exported with "
        "its EMA weights and its "
    )
    flow = scheduler.get("_class_name") == FLOW_SCHEDULER
    if flow:
        lines += [
            what + f"flow-matching schedule (`{FLOW_SCHEDULER}`, shift {scheduler['shift']:g}): "
            "x = (1 - sigma) x0 + sigma noise, the network predicts the velocity noise - x0 "
            f"at timestep {scheduler['num_train_timesteps']} sigma.",
            "",
            "## Usage",
            "",
            *_usage(unet, flow=True),
            "This call reproduces difflab's `flow-euler` sampler (trailing time steps, x0 "
            "clipped to [-1, 1]) to float round-off; `clip_sample=False` is `--threshold none`.",
            "",
        ]
    else:
        betas = "trained_betas" if scheduler.get("trained_betas") else scheduler["beta_schedule"]
        lines += [
            what + f"noise schedule ({scheduler['num_train_timesteps']} steps, {betas}, "
            f"prediction_type {scheduler['prediction_type']}).",
            "",
            "## Usage",
            "",
            *_usage(unet),
            "This call reproduces difflab's `ddim` sampler (eta 0, trailing time steps) to "
            "float round-off. `use_clipped_model_output=True` matters: where the scheduler "
            "clips the predicted clean image to [-1, 1] (`clip_sample`), difflab recomputes "
            "the noise prediction from the clipped image so that the DDIM step stays on one "
            "consistent (x0, eps) pair; diffusers' default keeps the network's noise "
            "prediction beside the clipped image, which gives different (usually worse) "
            "images from the same noise.",
            "",
        ]
    if unet.get("num_class_embeds"):
        null = unet["num_class_embeds"] - 1
        lines += [
            f"Class-conditional: pass `class_labels` to the U-Net; label {null} is the null "
            "label used for classifier-free guidance (the pipelines above do not pass labels).",
            "",
        ]
    if info.sample_grid is not None:
        lines += ["## Samples", "", "![samples](samples.png)", ""]
    lines += ["## Metrics", ""]
    if info.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in info.metrics.items()]
    else:
        lines += ["No figures were measured for this model."]
    lines += [""]
    if info.command:
        lines += ["## Training command", "", "```", info.command, "```", ""]
    if info.run_config is not None:
        config = json.dumps(info.run_config, indent=2, sort_keys=True)
        lines += ["## difflab run config", "", "```json", config, "```", ""]
    return "\n".join(lines)


def export_to_diffusers(
    out_dir: str | os.PathLike,
    *,
    unet_config: UNetConfig,
    state_dict: dict[str, Tensor],
    schedule: Schedule,
    parameterization: Parameterization = "eps",
    clip_sample: bool = True,
    card: ModelCardInfo | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers pipeline folder for a difflab U-Net; returns ``out_dir``.

    Args:
        out_dir: the folder to create (its parent must exist).
        unet_config: the U-Net's config (``UNet.config``).
        state_dict: the U-Net weights (the run's EMA weights for sampling).
        schedule: the discrete (DDPM) or flow-matching schedule the model was trained with.
        parameterization: ``eps``, ``v`` or ``x0`` (``edm`` has no diffusers scheduler);
            ``flow`` on a flow-matching schedule (a network called with 1000 t).
        clip_sample: the scheduler clips x0 to [-1, 1] (difflab's ``threshold="clip"``); for
            a flow model the card's call passes it to the shipped pipeline.
        card: model card contents; None writes a minimal card.
        overwrite: replace an existing ``out_dir``; otherwise an existing non-empty folder is an
            error.

    Files: ``model_index.json`` (DDPMPipeline; a flow model's names the shipped
    ``pipeline.py``, DifflabFlowPipeline, and FlowMatchEulerDiscreteScheduler),
    ``unet/config.json``,
    ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``,
    ``README.md`` and ``samples.png`` when ``card.sample_grid`` is given.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or overwrite")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder")
    card = card or ModelCardInfo()
    if card.sample_grid is not None and not Path(card.sample_grid).is_file():
        raise ValueError(f"sample grid {card.sample_grid} not found")
    unet = diffusers_config_from_unet(unet_config)
    flow = isinstance(schedule, FlowMatchSchedule)  # network time 1000 t = 1000 sigma
    weights = state_dict_to_diffusers(
        dict(state_dict), unet_config, time_offset=0.0 if flow else 1.0
    )
    scheduler = scheduler_config_from_schedule(
        schedule, prediction_type=parameterization, clip_sample=clip_sample
    )
    if unet["out_channels"] != unet["in_channels"]:
        raise ValueError(
            f"U-Net out_channels={unet['out_channels']} (learned variance?) has no "
            "DDPMPipeline form; export a model with out_channels == in_channels"
        )

    tmp = out.parent / f".tmp-{out.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        pipeline: Any = "DDPMPipeline"
        if flow:  # no diffusers pipeline: ship one
            pipeline = ["pipeline", "DifflabFlowPipeline"]
            atomic_write_text(tmp / "pipeline.py", FLOW_PIPELINE)
        elif unet_config.patch_size > 1:  # a folded UNet2DModel: ship the pipeline that unfolds
            pipeline = ["pipeline", "FoldedDDIMPipeline"]
            atomic_write_text(tmp / "pipeline.py", FOLDED_PIPELINE)
        atomic_write_json(
            tmp / "model_index.json",
            {
                "_class_name": pipeline,
                "scheduler": ["diffusers", scheduler["_class_name"]],
                "unet": ["diffusers", "UNet2DModel"],
            },
        )
        atomic_write_json(tmp / "unet" / "config.json", unet)
        blob = safetensors_bytes(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            metadata={"format": "pt"},
        )
        atomic_write_bytes(tmp / "unet" / "diffusion_pytorch_model.safetensors", blob)
        atomic_write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        if card.sample_grid is not None:
            atomic_write_bytes(tmp / "samples.png", Path(card.sample_grid).read_bytes())
        atomic_write_text(tmp / "README.md", model_card(card, unet=unet, scheduler=scheduler))
        fsync_dir(tmp)
        if overwrite:
            _replace_dir(tmp, out)
        else:
            _rename_new_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _rename_new_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out`` unless ``out`` is a non-empty folder (or a file) by then: the
    rename itself refuses it, so of two exports to one folder only one can succeed."""
    try:
        os.rename(new, out)  # replaces only an empty folder, atomically
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise ValueError(
                f"{out} exists and is not empty; choose another folder or overwrite"
            ) from None
        raise
    fsync_dir(out.parent)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".old-{out.name}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class ImportedRun:
    """What a native difflab run needs from a diffusers folder (see :func:`import_to_run`).

    Attributes:
        unet_config: the difflab U-Net config.
        state_dict: its weights (difflab keys); use them for both the "model" and "ema" groups.
        schedule_config: ``Schedule.to_config()`` of the schedule.
        parameterization, learned_variance, num_classes, data_shape: as in the diffusers model.
        preset: the name in ``UNET_PRESETS`` whose network this is, or None.
        preset_overrides: UNetConfig fields (besides those the app sets from data and model
            config: in_channels, image_size, out_channels, num_classes, dropout) that differ
            from ``preset``; empty when the preset alone describes the network.
    """

    unet_config: UNetConfig
    state_dict: dict[str, Tensor]
    schedule_config: dict[str, Any]
    parameterization: Parameterization
    learned_variance: bool
    num_classes: int
    data_shape: tuple[int, int, int]
    preset: str | None
    preset_overrides: dict[str, Any]

    def run_config_sections(self) -> dict[str, dict[str, Any]]:
        """``model`` and ``diffusion`` fields of a difflab RunConfig for this network."""
        model = {
            "kind": "diffusion",
            "net": "unet",
            "preset": self.preset,
            "num_classes": self.num_classes,
            "parameterization": self.parameterization,
            "learned_variance": self.learned_variance,
            "dropout": self.unet_config.dropout,
        }
        # the settings of the process table that rebuild this schedule ("custom": none do)
        diffusion = diffusion_settings(self.schedule_config) or {"schedule": "custom"}
        return {"model": model, "diffusion": diffusion}


def closest_preset(cfg: UNetConfig) -> tuple[str | None, dict[str, Any]]:
    """(preset name, fields that differ) for the preset needing the fewest overrides."""
    best: tuple[str | None, dict[str, Any]] = (None, {})
    for name, preset in UNET_PRESETS.items():
        a, b = dataclasses.asdict(preset), dataclasses.asdict(cfg)
        diff = {k: b[k] for k in b if k not in _APP_FIELDS and a[k] != b[k]}
        if best[0] is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def import_to_run(folder: str | os.PathLike, *, null_label: NullLabel = "auto") -> ImportedRun:
    """Convert a diffusers folder into a difflab U-Net config, weights and schedule config.

    The U-Net is matched against ``UNET_PRESETS``: ``preset_overrides`` lists the fields a run
    config must add to the preset to build this exact network (empty for google/ddpm-cifar10-32
    and the ``ddpm-cifar10`` preset). The schedule config rebuilds the same schedule with
    :func:`difflab.schedules.schedule_from_config`.
    """
    loaded = load_diffusers(folder, null_label=null_label)
    preset, overrides = closest_preset(loaded.unet.config)
    return ImportedRun(
        unet_config=loaded.unet.config,
        state_dict={k: v.detach().cpu() for k, v in loaded.unet.state_dict().items()},
        schedule_config=loaded.schedule.to_config(),
        parameterization=loaded.parameterization,
        learned_variance=loaded.learned_variance,
        num_classes=loaded.num_classes,
        data_shape=loaded.data_shape,
        preset=preset,
        preset_overrides=overrides,
    )
