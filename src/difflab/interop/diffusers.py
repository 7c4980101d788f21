"""diffusers models in difflab: schedules, the U-Net weight mapping, loading a folder.

A diffusers ``UNet2DModel`` in the DDPM layout (``DownBlock2D`` / ``AttnDownBlock2D`` levels, a
``UNetMidBlock2D``, positional time embedding) is the same network as difflab's
:class:`~difflab.nn.unet.UNet`; this module translates the configs and the weights both ways
and turns a diffusers folder into a difflab :class:`~difflab.parameterization.Denoiser` and
:class:`~difflab.schedules.DiscreteSchedule` (or, for a ``FlowMatchEulerDiscreteScheduler``, a
:class:`~difflab.schedules.FlowMatchSchedule`). diffusers itself is needed only by
:func:`load_diffusers` callers that want to compare; everything here reads JSON and
safetensors files.

Two conventions differ and are mapped exactly:

* **time index**: diffusers' timestep ``k = 0..T-1`` is difflab's ``t = k + 1`` (``t = 0`` is
  data). The network embeds its time input with sin/cos features, and a shift of the input by
  1 rotates each (sin, cos) pair by the angle ``w_i`` (``sin(w(k+1)) = sin(wk) cos w +
  cos(wk) sin w``). The rotation (and diffusers' optional cos-first order, ``flip_sin_to_cos``)
  is folded into the first linear layer of the time MLP, so the converted difflab network
  called at ``t`` computes what the diffusers network computes at ``k = t - 1``.
* **flow matching**: diffusers' ``FlowMatchEulerDiscreteScheduler`` has difflab's direction of
  time (sigma = 1 is noise, x = (1 - sigma) x0 + sigma eps) and feeds the network
  ``num_train_timesteps * sigma``: difflab's velocity denoiser with ``time_scale =
  num_train_timesteps``; its ``shift`` is SD3's, difflab's ``FlowMatchSchedule(shift)``.
* **class labels**: difflab's label table has a null row (label ``num_classes``) for
  classifier-free guidance [Ho & Salimans 2022]. A diffusers table of ``num_class_embeds``
  rows is read either with its last row as the null label (``null_label="last"``, what
  :func:`~difflab.interop.export_to_diffusers` writes) or as ``num_class_embeds`` real classes
  with a zero null row (``null_label="none"``).

Attention: difflab's fused 1x1-conv ``qkv`` holds diffusers' ``to_q``, ``to_k``, ``to_v`` in that
order along the output channels, with heads as consecutive channel groups in both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from difflab.nn.unet import UNet, UNetConfig, validate_config
from difflab.parameterization import ModelDenoiser, Parameterization
from difflab.safe_io import read_json_object
from difflab.schedules import (
    DiscreteSchedule,
    FlowMatchSchedule,
    Schedule,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "DIFFUSERS_BETA_SCHEDULES",
    "FLOW_SCHEDULER",
    "PREDICTION_TYPES",
    "SCHEDULER_DEFAULTS",
    "DiffusersModel",
    "DiffusersTimeDenoiser",
    "diffusers_config_from_unet",
    "diffusers_timestep",
    "folded_unet_config",
    "load_diffusers",
    "schedule_from_diffusers",
    "scheduler_config_from_schedule",
    "scheduler_settings",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "unet_config_from_diffusers",
]

_F64 = torch.float64
# diffusers beta_schedule name -> difflab make_betas name
DIFFUSERS_BETA_SCHEDULES: dict[str, str] = {
    "linear": "linear",
    "scaled_linear": "quadratic",
    "squaredcos_cap_v2": "cosine",
    "sigmoid": "sigmoid",
}
# diffusers prediction_type -> difflab parameterization ("flow": the flow schedulers' velocity,
# which they take without a prediction_type)
PREDICTION_TYPES: dict[str, Parameterization] = {
    "epsilon": "eps",
    "v_prediction": "v",
    "sample": "x0",
    "flow_prediction": "flow",
}
NULL_LABEL_KEY = "_difflab_null_label"  # diffusers ignores config keys that start with "_"
PATCH_SIZE_KEY = "_difflab_patch_size"  # the 2x2 (p x p) fold around a folded UNet2DModel

# The diffusers schedulers of a discrete-time model trained on a beta schedule (DDPM's process),
# with the value diffusers gives each key that difflab reads when a saved config leaves it out:
# the defaults differ by class (Heun and KDPM2 default to LDM's betas 0.00085-0.012; only the
# DDPM/DDIM family clips x0 unless told not to). Any other scheduler (flow matching, EDM,
# consistency, VE score SDE, ...) belongs to another kind of model and is refused by name,
# except diffusers' flow-matching Euler scheduler (FLOW_SCHEDULER), difflab's flow process.
_BETA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "clip_sample": False,
    "variance_type": None,
}
_LDM_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {**_BETA_DEFAULTS, "clip_sample": True, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_BETA_DEFAULTS, "clip_sample": True},
    "PNDMScheduler": _BETA_DEFAULTS,
    "DPMSolverMultistepScheduler": _BETA_DEFAULTS,
    "DPMSolverSinglestepScheduler": _BETA_DEFAULTS,
    "DEISMultistepScheduler": _BETA_DEFAULTS,
    "UniPCMultistepScheduler": _BETA_DEFAULTS,
    "EulerDiscreteScheduler": _BETA_DEFAULTS,
    "EulerAncestralDiscreteScheduler": _BETA_DEFAULTS,
    "LMSDiscreteScheduler": _BETA_DEFAULTS,
    "HeunDiscreteScheduler": {**_BETA_DEFAULTS, **_LDM_BETAS},
    "KDPM2DiscreteScheduler": {**_BETA_DEFAULTS, **_LDM_BETAS},
    "KDPM2AncestralDiscreteScheduler": {**_BETA_DEFAULTS, **_LDM_BETAS},
}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# its defaults (diffusers 0.3x); the options after "shift" change its grid, which difflab's
# samplers choose themselves, or need a resolution at sampling time (use_dynamic_shifting):
# a model that sets one is refused by name, as a silently different schedule would be
_FLOW_GRID_OPTIONS: dict[str, Any] = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}
SCHEDULER_DEFAULTS[FLOW_SCHEDULER] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    **_FLOW_GRID_OPTIONS,
    "prediction_type": "flow_prediction",
    "clip_sample": False,
    "variance_type": None,
}


def scheduler_settings(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """A scheduler config completed with its class's diffusers defaults (``SCHEDULER_DEFAULTS``).

    A config without ``_class_name`` is read as a ``DDPMScheduler``'s. A scheduler class not in
    the table (e.g. ``FlowMatchEulerDiscreteScheduler``) is a one-line ValueError naming it.
    """
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_DEFAULTS:
        raise ValueError(
            f"scheduler {name!r} is not understood: difflab reads models trained on a beta "
            f"schedule or by flow matching, with one of {', '.join(SCHEDULER_DEFAULTS)}"
        )
    out = {**SCHEDULER_DEFAULTS[name], **scheduler_config}
    if name == FLOW_SCHEDULER:  # it has no prediction_type option: always the velocity
        out["prediction_type"] = "flow_prediction"
    return out


NullLabel = Literal["auto", "last", "none"]


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def schedule_from_diffusers(
    scheduler_config: dict[str, Any],
) -> DiscreteSchedule | FlowMatchSchedule:
    """The difflab schedule of a diffusers scheduler config (``scheduler_config.json``).

    ``FlowMatchEulerDiscreteScheduler``: ``FlowMatchSchedule(shift)`` (SD3's shift [Esser 2024,
    Eq. 23], applied the same way); its grid options (dynamic shifting, Karras sigmas, ...)
    are refused in one line.

    ``beta_schedule`` maps by ``DIFFUSERS_BETA_SCHEDULES`` (``scaled_linear`` is difflab's
    ``quadratic``, ``squaredcos_cap_v2`` its ``cosine`` [Nichol & Dhariwal 2021, Eq. 17]) with
    ``beta_start``/``beta_end``; ``trained_betas`` gives a custom schedule;
    ``rescale_betas_zero_snr`` is difflab's ``zero_terminal_snr`` [Lin 2024, Algorithm 1].
    diffusers' ``alphas_cumprod[k]`` is difflab's ``alpha_bar[k + 1]``. Keys the config leaves
    out take the defaults of its ``_class_name`` (:func:`scheduler_settings`).
    """
    cfg = scheduler_settings(scheduler_config)
    T = _number(cfg, "num_train_timesteps", None, int, "scheduler")
    if cfg.get("_class_name") == FLOW_SCHEDULER:
        for key, default in _FLOW_GRID_OPTIONS.items():
            if cfg.get(key, default) != default:
                raise ValueError(
                    f"scheduler option {key}={cfg[key]!r} has no difflab equivalent (difflab's "
                    "flow schedule has one fixed shift; use_dynamic_shifting's shift is "
                    f"exp(mu) for the sampled resolution); supported: {key}={default!r}"
                )
        shift = _number(cfg, "shift", None, float, "scheduler")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"scheduler option shift={shift!r} must be a positive number")
        return FlowMatchSchedule(shift=shift)
    zero_snr = bool(cfg["rescale_betas_zero_snr"])
    trained = cfg["trained_betas"]
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=_F64)
        if betas.numel() != T:
            raise ValueError(f"trained_betas has {betas.numel()} values, num_train_timesteps {T}")
        return DiscreteSchedule(rescale_zero_terminal_snr(betas) if zero_snr else betas)
    name = cfg["beta_schedule"]
    if name not in DIFFUSERS_BETA_SCHEDULES:
        raise ValueError(
            f"scheduler option beta_schedule={name!r} has no difflab equivalent; "
            f"supported: {', '.join(DIFFUSERS_BETA_SCHEDULES)}"
        )
    ours = DIFFUSERS_BETA_SCHEDULES[name]
    kwargs: dict[str, float] = {}
    if ours != "cosine":  # the cosine schedule has no beta range
        kwargs = {
            "beta_start": float(cfg["beta_start"]),
            "beta_end": float(cfg["beta_end"]),
        }
    return DiscreteSchedule.from_name(ours, T, zero_terminal_snr=zero_snr, **kwargs)  # type: ignore[arg-type]


def scheduler_config_from_schedule(
    schedule: Schedule, *, prediction_type: Parameterization = "eps", clip_sample: bool = True
) -> dict[str, Any]:
    """A diffusers ``DDPMScheduler`` config describing ``schedule`` (inverse of
    :func:`schedule_from_diffusers`); a schedule without a diffusers name is written as
    ``trained_betas``. ``set_alpha_to_one=True`` makes ``DDIMScheduler``'s last step go to
    alpha_bar = 1 (t = 0), as difflab's ``ddim`` does.

    A :class:`~difflab.schedules.FlowMatchSchedule` with the ``flow`` parameterisation is a
    ``FlowMatchEulerDiscreteScheduler`` config with its shift, for a network called with
    1000 t (difflab's flow process: ``num_train_timesteps = 1000``).
    """
    if isinstance(schedule, FlowMatchSchedule):
        if prediction_type != "flow":
            raise ValueError(
                f"{FLOW_SCHEDULER} takes a velocity (flow) network, not {prediction_type!r}"
            )
        return {
            "_class_name": FLOW_SCHEDULER,
            "num_train_timesteps": 1000,
            "shift": schedule.shift,
            **_FLOW_GRID_OPTIONS,
            "stochastic_sampling": False,
        }
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(
            "only discrete (DDPM) and flow-matching schedules have a diffusers scheduler config"
        )
    inverse_pred = {v: k for k, v in PREDICTION_TYPES.items() if v != "flow"}
    if prediction_type not in inverse_pred:
        raise ValueError(f"prediction type {prediction_type!r} has no diffusers equivalent")
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": schedule.T,
        "prediction_type": inverse_pred[prediction_type],
        "clip_sample": clip_sample,
        "clip_sample_range": 1.0,
        "variance_type": "fixed_small",
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
        "rescale_betas_zero_snr": False,
    }
    cfg = schedule.to_config()
    names = {v: k for k, v in DIFFUSERS_BETA_SCHEDULES.items()}
    if cfg.get("name") in names and cfg.get("cosine_s", 0.008) == 0.008:
        out["beta_schedule"] = names[cfg["name"]]
        default = make_betas(cfg["name"], schedule.T)  # the 1000/T-scaled default range
        out["beta_start"] = float(cfg.get("beta_start", default[0]))
        out["beta_end"] = float(cfg.get("beta_end", default[-1]))
        out["rescale_betas_zero_snr"] = bool(cfg.get("zero_terminal_snr", False))
    else:
        out["beta_schedule"] = "linear"
        out["beta_start"], out["beta_end"] = 0.0001, 0.02
        out["trained_betas"] = schedule.betas.tolist()
    return out


# --------------------------------------------------------------------------------------------
# U-Net configs
# --------------------------------------------------------------------------------------------

# option -> the only value difflab's U-Net implements
_FIXED_OPTIONS: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "class_embed_type": None,
}
_OTHER_OPTIONS = {
    "sample_size", "in_channels", "out_channels", "time_embedding_dim", "freq_shift",
    "flip_sin_to_cos", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "add_attention",
    "num_class_embeds", "num_train_timesteps",
}  # fmt: skip


def _number(config: dict[str, Any], key: str, default: Any, cast: type, what: str) -> Any:
    """``config[key]`` (or ``default``) as an int or float; a one-line ``ValueError`` naming
    the option and its value when it is not a number of that kind (``"w"``, ``[1]``, 1.5)."""
    value = config.get(key, default)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (cast is int and not whole)
    ):
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{what} option {key}={value!r} must be {kind}")
    return cast(value)


def _unet_int(config: dict[str, Any], key: str, default: Any = None) -> int:
    return _number(config, key, default, int, "UNet2DModel")


def _unsupported(option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"UNet2DModel option {option}={value!r} has no difflab equivalent: {why}")


def _attention_heads(config: dict[str, Any], channels: list[int]) -> int:
    """difflab's single num_heads from diffusers' per-block attention_head_dim."""
    head_dim = config.get("attention_head_dim", 8)
    if head_dim is None:
        return 1
    heads = {c // head_dim for c in channels if c % head_dim == 0}
    if len(heads) != 1 or any(c % head_dim for c in channels):
        raise _unsupported(
            "attention_head_dim",
            head_dim,
            f"it gives different head counts on the attention blocks (channels {channels}); "
            "difflab uses one num_heads",
        )
    return heads.pop()


def unet_config_from_diffusers(
    config: dict[str, Any], *, null_label: NullLabel = "auto"
) -> UNetConfig:
    """The difflab :class:`UNetConfig` of a diffusers ``UNet2DModel`` config (``config.json``).

    Raises a one-line ValueError naming the first option that has no difflab equivalent.
    ``null_label`` says how to read a class table (see the module docstring); ``"auto"`` is
    ``"last"`` for folders written by difflab and ``"none"`` otherwise.
    """
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"unet class {cls!r} is not supported; difflab maps UNet2DModel only")
    for key, value in config.items():
        if not key.startswith("_") and key not in _FIXED_OPTIONS and key not in _OTHER_OPTIONS:
            raise _unsupported(key, value, "difflab does not know this option")
    for key, wanted in _FIXED_OPTIONS.items():
        value = config.get(key, wanted)
        if value != wanted:
            raise _unsupported(key, value, f"difflab's U-Net implements only {wanted!r}")

    channels = config.get("block_out_channels", (224, 448, 672, 896))
    if not isinstance(channels, list | tuple) or not channels:
        raise ValueError(f"UNet2DModel option block_out_channels={channels!r} must be a list")
    channels = [_unet_int({"block_out_channels": c}, "block_out_channels") for c in channels]
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported("block_out_channels", channels, "they must be multiples of the first")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    up_kinds = {"UpBlock2D": False, "AttnUpBlock2D": True}
    for name in down:
        if name not in kinds:
            raise _unsupported(
                "down_block_types", name, "difflab maps DownBlock2D, AttnDownBlock2D"
            )
    for name in up:
        if name not in up_kinds:
            raise _unsupported("up_block_types", name, "difflab maps UpBlock2D, AttnUpBlock2D")
    if len(down) != len(channels) or len(up) != len(channels):
        raise _unsupported("down_block_types", down, "need one down and one up block per level")
    attn = [kinds[n] for n in down]
    if [up_kinds[n] for n in reversed(up)] != attn:
        raise _unsupported(
            "up_block_types", up, "attention must sit at the same levels on the way up and down"
        )
    size = config.get("sample_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise _unsupported("sample_size", size, "difflab's U-Net config is square")
        size = size[0]
    if size is None:
        raise _unsupported("sample_size", size, "difflab needs the image size")
    size = _unet_int({"sample_size": size}, "sample_size")
    groups = _unet_int(config, "norm_num_groups", 32)
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups is not None and attn_groups != groups:
        raise _unsupported("attn_norm_num_groups", attn_groups, "difflab uses norm_num_groups")
    ted = config.get("time_embedding_dim")
    if ted is not None and ted != 4 * base:
        raise _unsupported("time_embedding_dim", ted, f"difflab uses 4 * {base}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise _unsupported("resnet_time_scale_shift", shift, "use default or scale_shift")
    mid_attention = bool(config.get("add_attention", True))
    if mid_attention and shift == "scale_shift" and attn_groups is None:
        raise _unsupported(
            "attn_norm_num_groups",
            None,
            "with scale_shift the middle attention has no GroupNorm; difflab's always has one",
        )
    attn_channels = [c for c, a in zip(channels, attn) if a] + ([channels[-1]] * mid_attention)
    num_classes = config.get("num_class_embeds") or 0
    if num_classes:
        mode = _null_mode(config, null_label)
        num_classes = num_classes - 1 if mode == "last" else num_classes
    in_channels = _unet_int(config, "in_channels", 3)
    out_channels = _unet_int(config, "out_channels", 3)
    cfg = UNetConfig(
        image_size=size,
        in_channels=in_channels,
        out_channels=out_channels if out_channels != in_channels else None,
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=_unet_int(config, "layers_per_block", 2),
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
        mid_attention=mid_attention,
        num_heads=_attention_heads(config, attn_channels) if attn_channels else 1,
        dropout=_number(config, "dropout", 0.0, float, "UNet2DModel"),
        num_classes=int(num_classes),
        use_scale_shift_norm=shift == "scale_shift",
        norm_groups=groups,
        norm_eps=_number(config, "norm_eps", 1e-5, float, "UNet2DModel"),
        downsample_padding=_unet_int(config, "downsample_padding", 1),
        time_freq_shift=_unet_int(config, "freq_shift", 0),
    )
    try:
        validate_config(cfg)
    except ValueError as err:
        raise ValueError(f"UNet2DModel config gives an invalid difflab U-Net: {err}") from None
    patch = config.get(PATCH_SIZE_KEY, 1)
    if not isinstance(patch, int) or patch < 1:
        raise _unsupported(PATCH_SIZE_KEY, patch, "it must be a positive integer")
    return _unfolded(cfg, patch)


def _null_mode(config: dict[str, Any], null_label: NullLabel) -> str:
    if null_label not in ("auto", "last", "none"):
        raise ValueError(f"null_label must be one of: auto, last, none; got {null_label!r}")
    if null_label == "auto":
        return "last" if config.get(NULL_LABEL_KEY) is not None else "none"
    return null_label


def folded_unet_config(cfg: UNetConfig) -> UNetConfig:
    """The U-Net inside a ``patch_size`` p > 1 U-Net: it works on images folded p x p into
    channels (``pixel_unshuffle``), so it is the U-Net with patch_size 1, image_size / p and
    p^2 times the input and output channels, with the very same weights (the fold is a fixed
    permutation of pixels, and the Gaussian noise of the process is invariant under it)."""
    p = cfg.patch_size
    if p == 1:
        return cfg
    out = (cfg.out_channels or cfg.in_channels) * p * p
    return dataclasses.replace(
        cfg, patch_size=1, image_size=cfg.image_size // p, in_channels=cfg.in_channels * p * p,
        out_channels=out,
    )  # fmt: skip


def _unfolded(cfg: UNetConfig, p: int) -> UNetConfig:
    """Inverse of :func:`folded_unet_config` for a fold p read from a diffusers config."""
    if p == 1:
        return cfg
    out = cfg.out_channels or cfg.in_channels
    if cfg.in_channels % (p * p) or out % (p * p):
        raise _unsupported(PATCH_SIZE_KEY, p, "the channels must be multiples of its square")
    in_ch, out_ch = cfg.in_channels // (p * p), out // (p * p)
    return dataclasses.replace(
        cfg, patch_size=p, image_size=cfg.image_size * p, in_channels=in_ch,
        out_channels=out_ch if out_ch != in_ch else None,
    )  # fmt: skip


def diffusers_config_from_unet(cfg: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config of a difflab U-Net (inverse of
    :func:`unet_config_from_diffusers` with ``null_label="last"``); a one-line ValueError names
    a difflab option diffusers' ``UNet2DModel`` does not have. A ``patch_size`` p > 1 U-Net is
    written as its folded U-Net (:func:`folded_unet_config`) with the fold under
    ``_difflab_patch_size``: the exported pipeline unfolds its samples."""
    if cfg.patch_size > 1:
        return {
            **diffusers_config_from_unet(folded_unet_config(cfg)),
            PATCH_SIZE_KEY: cfg.patch_size,
        }
    if cfg.cond_channels != 0:
        raise ValueError(f"U-Net option cond_channels={cfg.cond_channels} has no UNet2DModel form")
    if cfg.time_embedding != "sinusoidal":
        raise ValueError(
            f"U-Net option time_embedding={cfg.time_embedding!r} has no diffusers form"
        )
    if cfg.time_features not in (None, cfg.base_channels):
        raise ValueError(f"U-Net option time_features={cfg.time_features} has no diffusers form")
    levels = len(cfg.channel_mult)
    attn = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(levels)]
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    attn_channels = [c for c, a in zip(channels, attn) if a] + [channels[-1]] * cfg.mid_attention
    heads = cfg.num_heads
    if any(c % heads for c in attn_channels) or len({c // heads for c in attn_channels}) > 1:
        raise ValueError(
            f"U-Net option num_heads={heads} gives different head widths on channels "
            f"{attn_channels}; UNet2DModel has one attention_head_dim"
        )
    out: dict[str, Any] = {
        "_class_name": "UNet2DModel",
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels or cfg.in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": cfg.time_freq_shift,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": cfg.downsample_padding,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": attn_channels[0] // heads if attn_channels else None,
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": cfg.mid_attention,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
    }
    if cfg.num_classes:
        out[NULL_LABEL_KEY] = cfg.num_classes
    return out


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

_RES = (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"),
        ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut"))  # fmt: skip


def _module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(difflab module, diffusers module, kind) for every module of the network, in order.

    kind: "plain" (same tensors), "time" (first time-MLP layer), "class" (label table),
    "qkv" (fused 1x1 conv <-> to_q/to_k/to_v), "proj" (1x1 conv <-> linear), "skip" (optional).
    """
    pairs = [
        ("conv_in", "conv_in", "plain"),
        ("time_embed.mlp.0", "time_embedding.linear_1", "time"),
        ("time_embed.mlp.2", "time_embedding.linear_2", "plain"),
    ]
    if cfg.num_classes:
        pairs.append(("class_embed.table", "class_embedding", "class"))

    def res_attn(ours: str, theirs: str, j: int, attn: bool) -> None:
        for a, b in _RES:
            kind = "skip" if a == "skip" else "plain"
            pairs.append((f"{ours}.res.{a}", f"{theirs}.resnets.{j}.{b}", kind))
        if attn:
            pairs.append((f"{ours}.attn.norm", f"{theirs}.attentions.{j}.group_norm", "plain"))
            pairs.append((f"{ours}.attn.qkv", f"{theirs}.attentions.{j}", "qkv"))
            pairs.append((f"{ours}.attn.proj", f"{theirs}.attentions.{j}.to_out.0", "proj"))

    levels = len(cfg.channel_mult)
    has_attn = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(levels)]
    n = 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            res_attn(f"down.{n}", f"down_blocks.{level}", j, has_attn[level])
            n += 1
        if level != levels - 1:
            pairs.append((f"down.{n}.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            n += 1
    res_attn("mid.0", "mid_block", 0, cfg.mid_attention)
    for a, b in _RES[:-1]:
        pairs.append((f"mid.1.res.{a}", f"mid_block.resnets.1.{b}", "plain"))
    n = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            res_attn(f"up.{n}", f"up_blocks.{i}", j, has_attn[level])
            n += 1
        if level != 0:
            pairs.append((f"up.{n}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            n += 1
    pairs += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return pairs


def _time_rotation(cfg: UNetConfig, flip_sin_to_cos: bool, offset: float = 1.0) -> Tensor:
    """A (F, F) float64 with difflab_features(k + offset) = A @ diffusers_features(k).

    sin(w (k+1)) = sin(wk) cos w + cos(wk) sin w,  cos(w (k+1)) = cos(wk) cos w - sin(wk) sin w.
    ``offset`` 1: a discrete model (difflab t = k + 1); 0: a flow model (both call the
    network with 1000 t), where only the sin/cos order is mapped.
    """
    dim = cfg.time_features or cfg.base_channels
    half = dim // 2
    i = torch.arange(half, dtype=_F64)
    w = torch.exp(-math.log(10000.0) * i / max(half - cfg.time_freq_shift, 1))
    c, s = torch.cos(w * offset), torch.sin(w * offset)
    src_sin = i.long() + (half if flip_sin_to_cos else 0)  # where diffusers puts sin(w_i k)
    src_cos = i.long() + (0 if flip_sin_to_cos else half)
    rows = i.long()
    a = torch.zeros(dim, dim, dtype=_F64)
    a[rows, src_sin], a[rows, src_cos] = c, s
    a[rows + half, src_sin], a[rows + half, src_cos] = -s, c
    if dim % 2:
        a[-1, -1] = 1.0  # the zero padding column
    return a


def _unet_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(**dataclasses.asdict(cfg)).state_dict().items()}


def _take(sd: dict[str, Tensor], key: str, used: set[str]) -> Tensor:
    if key not in sd:
        raise ValueError(f"weights have no tensor {key!r}: the config does not match them")
    used.add(key)
    return sd[key]


def state_dict_from_diffusers(
    sd: dict[str, Tensor],
    cfg: UNetConfig,
    *,
    flip_sin_to_cos: bool = False,
    null_label: Literal["last", "none"] = "last",
    time_offset: float = 1.0,
) -> dict[str, Tensor]:
    """difflab U-Net weights from a diffusers ``UNet2DModel`` state dict.

    Args:
        sd: the diffusers weights (``diffusion_pytorch_model.safetensors``).
        cfg: the difflab config, from :func:`unet_config_from_diffusers`.
        flip_sin_to_cos: the diffusers config's ``flip_sin_to_cos``.
        null_label: ``"last"`` if the diffusers table's last row is the null label, ``"none"``
            to append a zero null row.
        time_offset: difflab's network time minus diffusers' timestep: 1 for a discrete
            model (t = k + 1), 0 for a flow model (1000 t = 1000 sigma).

    Every diffusers tensor is used exactly once; a missing or extra tensor, or a shape that
    does not fit, is a one-line ValueError.
    """
    cfg = folded_unet_config(cfg)  # the same weights
    out = _convert(
        sd, cfg, to_diffusers=False, flip_sin_to_cos=flip_sin_to_cos, time_offset=time_offset
    )
    if null_label == "none" and cfg.num_classes:
        table = out["class_embed.table.weight"]
        out["class_embed.table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    _check_shapes(out, _unet_shapes(cfg))
    return out


def state_dict_to_diffusers(
    sd: dict[str, Tensor], cfg: UNetConfig, *, time_offset: float = 1.0
) -> dict[str, Tensor]:
    """diffusers ``UNet2DModel`` weights (for :func:`diffusers_config_from_unet`'s config) from a
    difflab U-Net state dict; inverse of :func:`state_dict_from_diffusers` with
    ``null_label="last"`` and the same ``time_offset``. Every difflab tensor is used exactly
    once."""
    cfg = folded_unet_config(cfg)  # the same weights
    _check_shapes(sd, _unet_shapes(cfg))
    return _convert(sd, cfg, to_diffusers=True, time_offset=time_offset)


def _check_shapes(sd: dict[str, Tensor], shapes: dict[str, torch.Size]) -> None:
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise ValueError(f"converted weights lack {missing[0]!r}: the config does not match them")
    for key, shape in shapes.items():
        if sd[key].shape != shape:
            raise ValueError(
                f"weight {key!r} has shape {tuple(sd[key].shape)}, the config needs {tuple(shape)}"
            )


def _convert(
    sd: dict[str, Tensor],
    cfg: UNetConfig,
    *,
    to_diffusers: bool,
    flip_sin_to_cos: bool = False,
    time_offset: float = 1.0,
) -> dict[str, Tensor]:
    """Weights one way or the other, module pair by module pair (:func:`_module_pairs`); every
    input tensor is used exactly once. The two directions differ only in how a kind's tensors
    are reshaped: fused qkv <-> to_q/to_k/to_v, 1x1 conv <-> linear, and the time rotation."""
    rotation = _time_rotation(cfg, flip_sin_to_cos, time_offset)
    rotation = rotation if to_diffusers else torch.linalg.inv(rotation)
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for ours, theirs, kind in _module_pairs(cfg):
        src, dst = (ours, theirs) if to_diffusers else (theirs, ours)
        if kind == "skip" and f"{src}.weight" not in sd:
            continue  # a residual block without a 1x1 shortcut
        for p in ("weight", "bias"):
            if kind == "class" and p == "bias":
                continue  # an embedding table has no bias
            if kind == "qkv" and to_diffusers:
                fused = _take(sd, f"{src}.{p}", used)
                fused = fused[:, :, 0, 0] if p == "weight" else fused
                for n, part in zip("qkv", fused.chunk(3, 0)):
                    out[f"{dst}.to_{n}.{p}"] = part.contiguous()
                continue
            if kind == "qkv":
                w = torch.cat([_take(sd, f"{src}.to_{n}.{p}", used) for n in "qkv"], 0)
            else:
                w = _take(sd, f"{src}.{p}", used)
            if p == "weight" and kind in ("qkv", "proj"):
                w = w[:, :, 0, 0].contiguous() if to_diffusers else w[..., None, None]
            if p == "weight" and kind == "time":
                w = (w.to(_F64) @ rotation).to(w.dtype)
            out[f"{dst}.{p}"] = w
    extra = sorted(set(sd) - used)
    if extra:
        source, target = ("difflab", "diffusers") if to_diffusers else ("diffusers", "difflab")
        raise ValueError(f"{source} weights have tensors {target} does not map: {extra[0]!r}")
    return out


# --------------------------------------------------------------------------------------------
# Loading a diffusers folder
# --------------------------------------------------------------------------------------------


def diffusers_timestep(schedule: DiscreteSchedule, t: Tensor, *, rounding: bool = False) -> Tensor:
    """difflab time t -> the time diffusers' sigma-based schedulers feed the network, plus 1.

    diffusers' Euler/Heun/DPM-Solver schedulers map a noise level sigma = sigma_t / alpha_t to
    a timestep by interpolating linearly in log sigma between the integer steps k (sigma_k =
    difflab's ``edm_sigma(k + 1)``); DPM-Solver rounds it. difflab interpolates log alpha-bar
    linearly in t instead. Both agree at integer t. Returns float64 t' = k + 1, same shape.
    """
    t = torch.as_tensor(t, dtype=_F64).cpu()
    log_sig = torch.log(schedule.edm_sigma(torch.arange(1, schedule.T + 1, dtype=_F64)))
    target = torch.log(schedule.edm_sigma(t.clamp(min=1.0)))
    hi = torch.searchsorted(log_sig, target.contiguous()).clamp(1, schedule.T - 1)
    lo = hi - 1
    w = ((target - log_sig[lo]) / (log_sig[hi] - log_sig[lo])).clamp(0, 1)
    k = lo.to(_F64) + w
    if rounding:
        k = k.round()
    return torch.where(t >= 1.0, k + 1.0, t)


class DiffusersTimeDenoiser(ModelDenoiser):
    """A :class:`ModelDenoiser` that feeds the network the time diffusers' sigma-based
    schedulers feed it (:func:`diffusers_timestep`), so that difflab's samplers reproduce those
    schedulers number for number on a Karras grid. alpha and sigma still come from ``t``.

    ``time_input``: ``"log_sigma"`` (Euler, Heun) or ``"log_sigma_rounded"`` (DPM-Solver).
    """

    def __init__(self, *args: Any, time_input: str = "log_sigma", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if time_input not in ("log_sigma", "log_sigma_rounded"):
            raise ValueError(f"time_input must be log_sigma or log_sigma_rounded: {time_input!r}")
        if not isinstance(self.schedule, DiscreteSchedule) or self.parameterization == "edm":
            raise ValueError("DiffusersTimeDenoiser needs a discrete schedule, eps/x0/v")
        self.rounding = time_input == "log_sigma_rounded"

    def network_output(self, xt: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = torch.as_tensor(t, dtype=_F64).expand(xt.shape[0])
        t_net = diffusers_timestep(self.schedule, t, rounding=self.rounding)  # type: ignore[arg-type]
        return self.model(xt, t_net.to(xt.device, xt.dtype), cond)


@dataclass
class DiffusersModel:
    """What :func:`load_diffusers` reads from a diffusers folder.

    Attributes:
        denoiser: the converted difflab U-Net wrapped as a Denoiser (eval mode).
        unet: the difflab U-Net itself (its ``config`` is the :class:`UNetConfig`).
        schedule: the difflab schedule of the scheduler config.
        parameterization: ``eps``, ``v`` or ``x0`` (diffusers' prediction_type), or ``flow``
            (a flow-matching scheduler).
        learned_variance: the scheduler's variance_type is ``learned_range``.
        data_shape: (C, H, W) of a sample.
        num_classes: real classes (0: unconditional); label ``num_classes`` is the null label.
        clip_sample: the scheduler clips x0 to [-1, 1] (difflab ``threshold="clip"``).
        unet_config, scheduler_config: the raw diffusers configs.
    """

    denoiser: ModelDenoiser
    unet: UNet
    schedule: DiscreteSchedule | FlowMatchSchedule
    parameterization: Parameterization
    learned_variance: bool
    data_shape: tuple[int, int, int]
    num_classes: int
    clip_sample: bool
    unet_config: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(
        path, missing="not found", invalid="not readable JSON", error=ValueError
    )


def _diffusers_paths(folder: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler config file) of a pipeline folder or a lone UNet2DModel folder."""
    if (folder / "model_index.json").is_file():
        unet_dir, sched = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").is_file():
        unet_dir = folder
        candidates = [folder / "scheduler_config.json", folder.parent / "scheduler_config.json"]
        candidates.append(folder.parent / "scheduler" / "scheduler_config.json")
        sched = next((c for c in candidates if c.is_file()), candidates[0])
    else:
        raise ValueError(
            f"{folder} is not a diffusers folder: no model_index.json (pipeline) or "
            "config.json (UNet2DModel)"
        )
    if not sched.is_file():
        raise ValueError(f"{folder}: no scheduler config (looked for {sched})")
    return unet_dir, sched


def _read_weights(unet_dir: Path) -> dict[str, Tensor]:
    path = unet_dir / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        bin_path = unet_dir / "diffusion_pytorch_model.bin"
        if not bin_path.is_file():
            raise ValueError(f"{unet_dir} has no diffusion_pytorch_model.safetensors")
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is one message
            raise ValueError(f"{bin_path} is not readable: {err}") from None
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def load_diffusers(
    folder: str | Path,
    *,
    null_label: NullLabel = "auto",
    device: torch.device | str = "cpu",
) -> DiffusersModel:
    """Read a diffusers folder into a difflab denoiser and schedule (no diffusers import).

    ``folder`` is a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a
    lone ``UNet2DModel`` folder (``config.json`` + weights) with ``scheduler_config.json``
    inside it or beside it. Every problem is a one-line ValueError naming the file or option.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    unet_dir, sched_path = _diffusers_paths(folder)
    unet_cfg = _read_json(unet_dir / "config.json")
    try:
        sched_cfg = scheduler_settings(_read_json(sched_path))
    except ValueError as err:
        raise ValueError(f"{sched_path}: {err}") from None
    try:
        cfg = unet_config_from_diffusers(unet_cfg, null_label=null_label)
    except ValueError as err:
        raise ValueError(f"{unet_dir / 'config.json'}: {err}") from None
    mode = _null_mode(unet_cfg, null_label) if cfg.num_classes else "last"
    flip = bool(unet_cfg.get("flip_sin_to_cos", True))
    flow = sched_cfg.get("_class_name") == FLOW_SCHEDULER
    sd = state_dict_from_diffusers(
        _read_weights(unet_dir),
        cfg,
        flip_sin_to_cos=flip,
        null_label=mode,  # type: ignore[arg-type]
        time_offset=0.0 if flow else 1.0,  # a flow model's time is 1000 sigma in both
    )
    unet = UNet(**dataclasses.asdict(cfg))
    unet.load_state_dict(sd)
    unet.to(device).eval()

    try:
        schedule = schedule_from_diffusers(sched_cfg)
    except ValueError as err:
        raise ValueError(f"{sched_path}: {err}") from None
    pred = sched_cfg["prediction_type"]
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"{sched_path}: prediction_type={pred!r} has no difflab equivalent; "
            f"supported: {', '.join(PREDICTION_TYPES)}"
        )
    learned = sched_cfg.get("variance_type") in ("learned", "learned_range")
    if sched_cfg.get("variance_type") == "learned":
        raise ValueError(f"{sched_path}: variance_type='learned' has no difflab equivalent")
    out_ch = cfg.out_channels or cfg.in_channels
    if out_ch != cfg.in_channels * (2 if learned else 1):
        raise ValueError(
            f"{unet_dir / 'config.json'}: out_channels={out_ch} does not fit in_channels="
            f"{cfg.in_channels} with variance_type={sched_cfg.get('variance_type')!r}"
        )
    parameterization = PREDICTION_TYPES[pred]
    if flow != (parameterization == "flow"):
        raise ValueError(f"{sched_path}: prediction_type={pred!r} needs a flow-matching scheduler")
    denoiser = ModelDenoiser(
        unet,
        schedule,
        parameterization=parameterization,
        learned_variance=learned,
        # the flow scheduler's network time is num_train_timesteps * sigma
        time_scale=float(sched_cfg["num_train_timesteps"]) if flow else 1.0,
    )
    return DiffusersModel(
        denoiser=denoiser,
        unet=unet,
        schedule=schedule,
        parameterization=parameterization,
        learned_variance=learned,
        data_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        num_classes=cfg.num_classes,
        clip_sample=bool(sched_cfg["clip_sample"]),
        unet_config=unet_cfg,
        scheduler_config=sched_cfg,
    )
