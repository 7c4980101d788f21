"""The network table: a name (``model.net``) maps to its presets and to ``build(preset, spec)``.

A task (what a run learns: diffusion, a classifier, an autoencoder, latent diffusion,
super-resolution, image-to-image) never builds a network class itself: it says what it needs in a
:class:`NetSpec` (the shape of one example, output channels, classes, conditioning channels, the
augmentation-level embedding, dropout, which head) and asks :func:`build_network`.

=================  =======  ==========================  ========================================
name               data     heads                       presets
=================  =======  ==========================  ========================================
``mlp``            2-D      denoiser                    none: sized by model.hidden / model.depth
``sohl-dickstein`` 2-D      own (its own loss, sampler) none: model.hidden
``unet``           image    denoiser, classifier        :data:`difflab.nn.unet.UNET_PRESETS`
``autoencoder``    image    autoencoder                 :data:`difflab.nn.autoencoder.\
AUTOENCODER_PRESETS`
``dit``            image    denoiser                    :data:`difflab.nn.dit.DIT_PRESETS`
=================  =======  ==========================  ========================================

Adding a network is its module plus one line here: the transformer, whose builder takes the
U-Net's keyword arguments, is ``register(Network("dit", "image", DIT_PRESETS,
image_denoiser(build_dit)))``; every image task can then train it (``tests/test_networks.py``
shows it with a small residual CNN). An image denoiser is called as ``net(x, t, cond)`` with
``x`` (B, C, H, W), ``t`` (B,) and ``cond`` None, class labels (B,) or a dict of ``"class"``,
``"image"`` (B, cond_channels, H, W) and ``"aug_level"`` (B,).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from difflab._util import check_choice
from difflab.nn.autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from difflab.nn.dit import DIT_PRESETS, build_dit
from difflab.nn.mlp import TimeMLP
from difflab.nn.sohl_dickstein import SohlDicksteinModel
from difflab.nn.unet import UNET_PRESETS, UNetConfig, build_unet, validate_config

__all__ = ["NETWORKS", "NetSpec", "Network", "build_network", "image_denoiser", "register"]

HEADS = ("denoiser", "classifier", "autoencoder", "own")


@dataclass(frozen=True)
class NetSpec:
    """What a task needs from its network.

    Attributes:
        data_shape: shape of one example, (D,) for points or (C, H, W) for images.
        head: ``"denoiser"`` (``net(x, t, cond)`` -> out_channels per example), ``"classifier"``
            (``net(x, t)`` -> (B, num_classes) logits), ``"autoencoder"`` (encode / decode) or
            ``"own"`` (a model with its own loss and sampler, e.g. Sohl-Dickstein 2015).
        out_channels: channels (or dimensions) of the output; 0 = those of the data.
        num_classes: > 0: class labels (a denoiser also gets a null class for guidance).
        cond_channels: channels of a conditioning image concatenated to x (image-to-image, SR).
        aug_level_embedding: embed a conditioning-augmentation level (cascaded SR).
        dropout: the preset's dropout when None.
        hidden, depth: the width and depth of the 2-D networks (``model.hidden``/``depth``).
        steps: the number of diffusion steps T of a network with one set of weights per step.
        fields: the network's own fields that replace its preset's (checked by
            :attr:`Network.fields`).
    """

    data_shape: tuple[int, ...]
    head: str = "denoiser"
    out_channels: int = 0
    num_classes: int = 0
    cond_channels: int = 0
    aug_level_embedding: bool = False
    dropout: float | None = None
    hidden: int = 128
    depth: int = 3
    steps: int = 0
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Network:
    """An entry of :data:`NETWORKS`.

    Attributes:
        name: its ``model.net``.
        data: ``"2-D"`` or ``"image"``, the data it takes.
        presets: its named sizes (empty: it has none and ignores ``model.preset``).
        build: ``build(preset, spec) -> nn.Module``.
        heads: the :class:`NetSpec` heads it can build.
        fields: ``fields(text, preset, data_shape) -> dict``: the fields of a JSON object that
            replace its preset's, checked (one-line ``ValueError``); None: it has none.
        no_diffusers_form: why ``difflab export`` cannot write a run of this network as a
            diffusers pipeline; empty if the run's task decides alone.
    """

    name: str
    data: str
    presets: Mapping[str, Any]
    build: Callable[[str, NetSpec], nn.Module]
    heads: tuple[str, ...] = ("denoiser",)
    fields: Callable[[str, str, tuple[int, ...]], dict[str, Any]] | None = None
    no_diffusers_form: str = ""

    def check(self, preset: str, head: str, data: str, *, preset_key: str = "model.preset") -> None:
        """One-line ``ValueError`` unless this network builds ``head`` on ``data`` at ``preset``."""
        if data != self.data:
            raise ValueError(
                f"network {self.name!r} (model.net) takes {self.data} data, not {data}"
            )
        if head not in self.heads:
            raise ValueError(
                f"network {self.name!r} (model.net) has no {head} head; it builds: "
                + ", ".join(self.heads)
            )
        if self.presets and preset not in self.presets:
            raise ValueError(
                f"unknown {preset_key} {preset!r} for network {self.name!r}; choose one of: "
                + ", ".join(self.presets)
            )


NETWORKS: dict[str, Network] = {}


def register(network: Network) -> Network:
    """Add a network to :data:`NETWORKS` (its name must be new)."""
    if network.name in NETWORKS:
        raise ValueError(f"network {network.name!r} is already registered")
    unknown = set(network.heads) - set(HEADS)
    if unknown:
        raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")
    NETWORKS[network.name] = network
    return network


def network(name: str) -> Network:
    """The entry named ``name``; a one-line error lists the valid names."""
    if name not in NETWORKS:
        raise ValueError(f"unknown model.net {name!r}; choose one of: {', '.join(NETWORKS)}")
    return NETWORKS[name]


def build_network(name: str, preset: str, spec: NetSpec) -> nn.Module:
    """Build network ``name`` at ``preset`` for what ``spec`` asks."""
    net = network(name)
    data = "2-D" if len(spec.data_shape) == 1 else "image"
    net.check(preset, spec.head, data)
    return net.build(preset, spec)


def image_denoiser(builder: Callable[..., nn.Module]) -> Callable[[str, NetSpec], nn.Module]:
    """``build(preset, spec)`` of an image denoiser whose ``builder(preset, **kwargs)`` takes the
    U-Net's keyword arguments (in_channels, image_size, out_channels, num_classes,
    cond_channels, aug_level_embedding, dropout)."""

    def build(preset: str, spec: NetSpec) -> nn.Module:
        c, h, _ = spec.data_shape
        kwargs: dict[str, Any] = dict(
            in_channels=c, image_size=h, out_channels=spec.out_channels or c,
            num_classes=spec.num_classes,
        )  # fmt: skip
        if spec.cond_channels:
            kwargs["cond_channels"] = spec.cond_channels
        if spec.aug_level_embedding:
            kwargs["aug_level_embedding"] = True
        if spec.dropout is not None:
            kwargs["dropout"] = spec.dropout
        return builder(preset, **{**spec.fields, **kwargs})

    return build


def _unet(preset: str, spec: NetSpec) -> nn.Module:
    if spec.head == "classifier":  # the U-Net's encoder [Dhariwal & Nichol 2021]
        from difflab.classifier import build_classifier

        c, h, _ = spec.data_shape
        extra = {} if spec.dropout is None else {"dropout": spec.dropout}
        return build_classifier(
            preset, num_classes=spec.num_classes, in_channels=c, image_size=h, **extra
        )
    return image_denoiser(build_unet)(preset, spec)


def _mlp(preset: str, spec: NetSpec) -> nn.Module:
    (dim,) = spec.data_shape
    return TimeMLP(
        dim=dim, hidden=spec.hidden, depth=spec.depth, out_dim=spec.out_channels or dim,
        num_classes=spec.num_classes,
    )  # fmt: skip


def _sohl_dickstein(preset: str, spec: NetSpec) -> nn.Module:
    (dim,) = spec.data_shape
    return SohlDicksteinModel(dim=dim, T=spec.steps, hidden=spec.hidden)


def _autoencoder(preset: str, spec: NetSpec) -> nn.Module:
    c, h, _ = spec.data_shape
    return build_autoencoder(preset, in_channels=c, image_size=h)


# U-Net fields a run sets from its data and model config, never from model.unet
_UNET_APP_FIELDS = ("image_size", "in_channels", "out_channels", "num_classes", "cond_channels")


def unet_fields(text: str, preset: str, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """The ``UNetConfig`` fields of the JSON object ``text`` (``model.unet``) that replace the
    preset's; a one-line ValueError names a value that is not such an object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise ValueError(f"model.unet must be a JSON object of U-Net fields, got {text!r}")
    allowed = [f.name for f in dataclasses.fields(UNetConfig) if f.name not in _UNET_APP_FIELDS]
    for key in obj:
        check_choice("model.unet field", key, tuple(allowed))
    c, h = data_shape[:2]
    try:
        validate_config(
            dataclasses.replace(UNET_PRESETS[preset], in_channels=c, image_size=h, **obj)
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.unet: {str(e).splitlines()[0]}") from None
    return obj


register(Network("mlp", "2-D", {}, _mlp))
register(Network("sohl-dickstein", "2-D", {}, _sohl_dickstein, heads=("own",)))
register(Network("unet", "image", UNET_PRESETS, _unet, ("denoiser", "classifier"), unet_fields))
register(Network("autoencoder", "image", AUTOENCODER_PRESETS, _autoencoder, ("autoencoder",)))
# diffusers' DiTPipeline samples class-conditional latents of its own VAE; the weights alone map
# to DiTTransformer2DModel (difflab.interop.diffusers_dit)
_DIT_EXPORT = "diffusers' pipelines sample a DiT only on their own VAE's latents"
register(
    Network("dit", "image", DIT_PRESETS, image_denoiser(build_dit), no_diffusers_form=_DIT_EXPORT)
)
