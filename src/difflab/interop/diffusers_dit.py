"""diffusers' ``DiTTransformer2DModel`` in and out: configs, weights, folders.

diffusers' DiT [Peebles & Xie 2023] is the same network as difflab's
:class:`~difflab.nn.dit.DiT` without U-ViT skips: patch embedding, fixed 2-D sin-cos
positions, adaLN-Zero blocks (``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``),
the adaptive output layer. Configs and weights map both ways, exactly; what differs is mapped
so:

* **time index**: diffusers' timestep ``k = 0..T-1`` is difflab's ``t = k + 1``, and diffusers'
  DiT puts the cosines first (``flip_sin_to_cos``); both are folded into the first layer of the
  time MLP, as for the U-Net (:mod:`difflab.interop.diffusers`). The converted network called
  at ``t`` computes what the diffusers network computes at ``k = t - 1``.
* **one conditioning embedding**: diffusers keeps a copy of the timestep and class embedders
  in every block (``transformer_blocks.i.norm1.emb``; the output layer uses block 0's). difflab
  has one. Exporting writes the same tensors into every block; importing takes them from block
  0 and refuses weights whose blocks hold different ones.
* **class table**: diffusers' ``num_embeds_ada_norm`` classes plus a last "dropped" row, which
  is difflab's null label (``num_classes``) for classifier-free guidance. A difflab model
  without classes is written with ``num_embeds_ada_norm=1`` and an all-zero table (any label
  gives the unconditional network) and the key ``_difflab_unconditional``, read back as
  ``num_classes=0``.
* **layouts**: the patch embedding is a ``Conv2d`` (D, C, p, p) there and a ``Linear``
  (D, C p^2) here; the output rows run over (row, column, channel) there and over (channel,
  row, column) here; ``to_q``, ``to_k``, ``to_v`` are difflab's fused ``qkv`` in that order.
* **norm epsilons**: diffusers' ``norm_eps`` is the epsilon of the LayerNorm before the MLP
  (difflab's ``mlp_norm_eps``); the LayerNorms before attention and before the output use
  1e-6 in both.

What does not map (a one-line ValueError names it): U-ViT long skips (``long_skips``), the
augmentation-level embedding of cascades, time features other than 256 sinusoids with frequency
shift 1, ``mlp_ratio`` other than 4, ``norm_eps`` other than 1e-6; and, from diffusers,
``activation_fn`` other than ``gelu-approximate``, ``norm_type`` other than ``ada_norm_zero``,
``norm_elementwise_affine=True`` and non-square ``sample_size``. A conditioning image
(``cond_channels``) maps as extra input channels: the diffusers model sees ``in_channels +
cond_channels`` and its caller concatenates; read back, those are plain input channels.
``attention_bias=False`` is read as zero biases. ``upcast_attention`` only sets the precision
diffusers computes attention in and is read as any other model. Pipelines (``DiTPipeline`` with
its VAE and scheduler) are not converted: this module maps the transformer folder.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from difflab.interop.diffusers import _read_json, _read_weights, _time_rotation
from difflab.interop.diffusers_export import _replace_dir
from difflab.nn.dit import DiT, DiTConfig, validate_dit_config
from difflab.nn.unet import UNetConfig
from difflab.safe_io import atomic_write_bytes, atomic_write_json, fsync_dir

__all__ = [
    "diffusers_config_from_dit",
    "dit_config_from_diffusers",
    "dit_state_dict_from_diffusers",
    "dit_state_dict_to_diffusers",
    "load_diffusers_dit",
    "save_diffusers_dit",
]

CLASS_NAME = "DiTTransformer2DModel"
UNCONDITIONAL_KEY = "_difflab_unconditional"  # diffusers ignores config keys that start with "_"
WEIGHTS = "diffusion_pytorch_model.safetensors"
_F64 = torch.float64
# diffusers option -> the only value difflab's DiT implements
_FIXED: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
_OTHER = {
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
    "dropout", "norm_num_groups", "attention_bias", "sample_size", "patch_size",
    "num_embeds_ada_norm", "upcast_attention", "norm_eps",
}  # fmt: skip
_EMB = "norm1.emb"  # where each diffusers block keeps its copy of the conditioning embedders


def _unsupported(option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{CLASS_NAME} option {option}={value!r} has no difflab equivalent: {why}")


def dit_config_from_diffusers(config: dict[str, Any]) -> DiTConfig:
    """The difflab :class:`DiTConfig` of a diffusers ``DiTTransformer2DModel`` config.

    Raises a one-line ValueError naming the first option with no difflab equivalent.
    """
    cls = config.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise ValueError(f"model class {cls!r} is not supported; difflab maps {CLASS_NAME}")
    for key, value in config.items():
        if not key.startswith("_") and key not in _FIXED and key not in _OTHER:
            raise _unsupported(key, value, "difflab does not know this option")
    for key, wanted in _FIXED.items():
        if config.get(key, wanted) != wanted:
            raise _unsupported(key, config[key], f"difflab's DiT implements only {wanted!r}")
    size = config.get("sample_size", 32)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise _unsupported("sample_size", size, "difflab's DiT is square")
        size = size[0]
    heads = int(config.get("num_attention_heads", 16))
    in_channels = int(config.get("in_channels", 4))
    out_channels = config.get("out_channels")
    out_channels = in_channels if out_channels is None else int(out_channels)
    classes = config.get("num_embeds_ada_norm", 1000)
    if classes is None:
        raise _unsupported("num_embeds_ada_norm", None, "ada_norm_zero needs a class count")
    cfg = DiTConfig(
        image_size=int(size),
        in_channels=in_channels,
        out_channels=out_channels if out_channels != in_channels else None,
        patch_size=int(config.get("patch_size", 2)),
        hidden_size=heads * int(config.get("attention_head_dim", 72)),
        depth=int(config.get("num_layers", 28)),
        num_heads=heads,
        dropout=float(config.get("dropout", 0.0)),
        num_classes=0 if config.get(UNCONDITIONAL_KEY) else int(classes),
        mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
    )
    try:
        validate_dit_config(cfg)
    except ValueError as err:
        raise ValueError(f"{CLASS_NAME} config gives an invalid difflab DiT: {err}") from None
    return cfg


def diffusers_config_from_dit(cfg: DiTConfig) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` config of a difflab DiT (inverse of
    :func:`dit_config_from_diffusers`); a one-line ValueError names an option it lacks."""
    fixed = {
        "long_skips": False,
        "aug_level_embedding": False,
        "time_features": 256,
        "time_freq_shift": 1,
        "mlp_ratio": 4,
        "norm_eps": 1e-6,
    }
    for name, wanted in fixed.items():
        if getattr(cfg, name) != wanted:
            raise ValueError(
                f"DiT option {name}={getattr(cfg, name)!r} has no {CLASS_NAME} form "
                f"(it needs {wanted!r})"
            )
    out: dict[str, Any] = {
        "_class_name": CLASS_NAME,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels + cfg.cond_channels,
        "out_channels": cfg.out_channels or cfg.in_channels,
        "num_layers": cfg.depth,
        "dropout": cfg.dropout,
        "attention_bias": True,
        "sample_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": cfg.num_classes or 1,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": cfg.mlp_norm_eps,
    }
    if not cfg.num_classes:
        out[UNCONDITIONAL_KEY] = True
    return out


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _time_matrix(cfg: DiTConfig) -> Tensor:
    """(F, F) float64 A with difflab_features(k + 1) = A @ diffusers_features(k), diffusers'
    features cos-first; the U-Net mapping's rotation, for the DiT's time features."""
    features = UNetConfig(time_features=cfg.time_features, time_freq_shift=cfg.time_freq_shift)
    return _time_rotation(features, flip_sin_to_cos=True)


def _block_pairs(i: int) -> list[tuple[str, str]]:
    """(difflab, diffusers) names of the plain linear layers of block i."""
    ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
    return [
        (f"{ours}.modulation", f"{theirs}.norm1.linear"),
        (f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0"),
        (f"{ours}.mlp.fc1", f"{theirs}.ff.net.0.proj"),
        (f"{ours}.mlp.fc2", f"{theirs}.ff.net.2"),
    ]


def _out_rows(w: Tensor, p: int, channels: int, *, to_diffusers: bool) -> Tensor:
    """Output-layer rows (channel, row, col) <-> (row, col, channel); w (p^2 C, ...)."""
    rest = w.shape[1:]
    if to_diffusers:
        return w.reshape(channels, p, p, *rest).movedim(0, 2).reshape(w.shape).contiguous()
    return w.reshape(p, p, channels, *rest).movedim(2, 0).reshape(w.shape).contiguous()


def dit_state_dict_to_diffusers(sd: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """``DiTTransformer2DModel`` weights (for :func:`diffusers_config_from_dit`'s config) from a
    difflab DiT state dict. Every difflab tensor is used exactly once."""
    diffusers_config_from_dit(cfg)  # refuses what has no diffusers form
    _check_keys(sd, cfg)
    dim, p = cfg.hidden_size, cfg.patch_size
    c_in, c_out = cfg.in_channels + cfg.cond_channels, cfg.out_channels or cfg.in_channels
    out: dict[str, Tensor] = {
        "pos_embed.proj.weight": sd["patch_embed.weight"].reshape(dim, c_in, p, p).contiguous(),
        "pos_embed.proj.bias": sd["patch_embed.bias"],
        "proj_out_1.weight": sd["final.modulation.weight"],
        "proj_out_1.bias": sd["final.modulation.bias"],
        "proj_out_2.weight": _out_rows(sd["final.linear.weight"], p, c_out, to_diffusers=True),
        "proj_out_2.bias": _out_rows(sd["final.linear.bias"], p, c_out, to_diffusers=True),
    }
    time_w = sd["time_embed.mlp.0.weight"]
    shared = {
        "timestep_embedder.linear_1.weight": (time_w.to(_F64) @ _time_matrix(cfg)).to(time_w),
        "timestep_embedder.linear_1.bias": sd["time_embed.mlp.0.bias"],
        "timestep_embedder.linear_2.weight": sd["time_embed.mlp.2.weight"],
        "timestep_embedder.linear_2.bias": sd["time_embed.mlp.2.bias"],
        "class_embedder.embedding_table.weight": (
            sd["class_embed.table.weight"] if cfg.num_classes else time_w.new_zeros(2, dim)
        ),
    }
    for i in range(cfg.depth):
        for name, value in shared.items():
            out[f"transformer_blocks.{i}.{_EMB}.{name}"] = value.clone()
        for ours, theirs in _block_pairs(i):
            for param in ("weight", "bias"):
                out[f"{theirs}.{param}"] = sd[f"{ours}.{param}"]
        for param in ("weight", "bias"):
            fused = sd[f"blocks.{i}.attn.qkv.{param}"]
            for name, part in zip("qkv", fused.chunk(3, 0)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{param}"] = part.contiguous()
    return out


def dit_state_dict_from_diffusers(sd: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """difflab DiT weights from a ``DiTTransformer2DModel`` state dict, for the config
    :func:`dit_config_from_diffusers` gives. Every diffusers tensor is used exactly once; a
    missing or extra tensor, a shape that does not fit, or blocks with different conditioning
    embedders is a one-line ValueError."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise ValueError(
                f"{CLASS_NAME} weights have no tensor {key!r}: the config does not match"
            )
        used.add(key)
        return sd[key]

    dim, p = cfg.hidden_size, cfg.patch_size
    c_out = cfg.out_channels or cfg.in_channels
    out: dict[str, Tensor] = {
        "patch_embed.weight": take("pos_embed.proj.weight").reshape(dim, -1),
        "patch_embed.bias": take("pos_embed.proj.bias"),
        "final.modulation.weight": take("proj_out_1.weight"),
        "final.modulation.bias": take("proj_out_1.bias"),
        "final.linear.weight": _out_rows(take("proj_out_2.weight"), p, c_out, to_diffusers=False),
        "final.linear.bias": _out_rows(take("proj_out_2.bias"), p, c_out, to_diffusers=False),
    }
    shared: dict[str, Tensor] = {}
    for i in range(cfg.depth):
        prefix = f"transformer_blocks.{i}.{_EMB}."
        for key in [k for k in sd if k.startswith(prefix)]:
            name, value = key[len(prefix) :], take(key)
            if name not in shared:
                shared[name] = value
            elif value.shape != shared[name].shape or not torch.equal(value, shared[name]):
                raise ValueError(
                    f"{key} differs from block 0's: difflab's DiT has one conditioning "
                    "embedding for all blocks"
                )
        for ours, theirs in _block_pairs(i):
            for param in ("weight", "bias"):
                out[f"{ours}.{param}"] = take(f"{theirs}.{param}")
        attn = f"transformer_blocks.{i}.attn1"
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [take(f"{attn}.to_{n}.weight") for n in "qkv"]
        )
        biases = [f"{attn}.to_{n}.bias" for n in "qkv"]
        if any(b in sd for b in biases):  # attention_bias=False: zero biases
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(b) for b in biases])
        else:
            out[f"blocks.{i}.attn.qkv.bias"] = out[f"blocks.{i}.attn.qkv.weight"].new_zeros(3 * dim)
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{CLASS_NAME} weights have tensors difflab does not map: {extra[0]!r}")

    def shared_tensor(name: str) -> Tensor:
        if name not in shared:
            raise ValueError(f"{CLASS_NAME} weights have no block 0 tensor {_EMB}.{name!r}")
        return shared[name]

    time_w = shared_tensor("timestep_embedder.linear_1.weight")
    out["time_embed.mlp.0.weight"] = (time_w.to(_F64) @ torch.linalg.inv(_time_matrix(cfg))).to(
        time_w
    )
    out["time_embed.mlp.0.bias"] = shared_tensor("timestep_embedder.linear_1.bias")
    out["time_embed.mlp.2.weight"] = shared_tensor("timestep_embedder.linear_2.weight")
    out["time_embed.mlp.2.bias"] = shared_tensor("timestep_embedder.linear_2.bias")
    table = shared_tensor("class_embedder.embedding_table.weight")
    if cfg.num_classes:
        out["class_embed.table.weight"] = table
    elif table.abs().max() > 0:
        raise ValueError(
            f"the config says {UNCONDITIONAL_KEY} but the class table is not zero: the "
            "weights belong to a class-conditional model"
        )
    _check_keys(out, cfg)
    return out


def _check_keys(sd: dict[str, Tensor], cfg: DiTConfig) -> None:
    """A one-line ValueError unless ``sd`` has exactly the tensors and shapes of ``cfg``'s DiT."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(**dataclasses.asdict(cfg)).state_dict().items()}
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or extra:
        what = f"lack {missing[0]!r}" if missing else f"have an unknown tensor {extra[0]!r}"
        raise ValueError(f"DiT weights {what}: the config does not match them")
    for key, shape in shapes.items():
        if sd[key].shape != shape:
            raise ValueError(
                f"weight {key!r} has shape {tuple(sd[key].shape)}, the config needs {tuple(shape)}"
            )


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def load_diffusers_dit(folder: str | Path, *, device: torch.device | str = "cpu") -> DiT:
    """A difflab :class:`DiT` (eval mode) from a ``DiTTransformer2DModel`` folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a pipeline folder holding
    one in ``transformer/``. No diffusers import; every problem is one line naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a {CLASS_NAME} folder")
    config = _read_json(folder / "config.json")
    try:
        cfg = dit_config_from_diffusers(config)
        sd = dit_state_dict_from_diffusers(_read_weights(folder), cfg)
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    model = DiT(**dataclasses.asdict(cfg))
    model.load_state_dict(sd)
    return model.to(device).eval()


def save_diffusers_dit(model: DiT, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a ``DiTTransformer2DModel`` folder that
    ``DiTTransformer2DModel.from_pretrained`` loads. The folder is assembled under a temporary
    name beside ``out_dir`` and renamed into place, so a crash leaves the old folder or the new
    one; an existing non-empty folder is refused unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or overwrite")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder")
    config = diffusers_config_from_dit(model.config)
    weights = dit_state_dict_to_diffusers(model.state_dict(), model.config)
    blob = safetensors_bytes(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()}, metadata={"format": "pt"}
    )
    tmp = out.parent / f".tmp-{out.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        atomic_write_json(tmp / "config.json", config)
        atomic_write_bytes(tmp / WEIGHTS, blob)
        fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
