"""The network table: a new network is its module plus one ``register`` line, and every image
task (diffusion, latent diffusion, super-resolution, image-to-image) trains it with no other
edit; a network without a head a task needs is refused in one line before anything is built."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from difflab.app.config import PRESETS, RunConfig, apply_overrides, migrate_model
from difflab.app.kinds import kind_of
from difflab.app.runs import build
from difflab.nn.networks import NETWORKS, NetSpec, Network, build_network, image_denoiser


class ResCNN(nn.Module):
    """A plain residual CNN denoiser ``net(x, t, cond)``: x_t and any conditioning image are
    concatenated; t, the class and the augmentation level are added as per-channel biases."""

    def __init__(self, *, in_channels: int, image_size: int, out_channels: int, num_classes: int,
                 cond_channels: int = 0, aug_level_embedding: bool = False, width: int = 8,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.inp = nn.Conv2d(in_channels + cond_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.aug = nn.Linear(1, width) if aug_level_embedding else None
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        c = cond if isinstance(cond, dict) else {"class": cond}
        if c.get("image") is not None:
            x = torch.cat([x, c["image"]], dim=1)
        emb = self.time(t.float().reshape(-1, 1) / 1000)
        if self.label is not None and c.get("class") is not None:
            emb = emb + self.label(c["class"])
        if self.aug is not None and c.get("aug_level") is not None:
            emb = emb + self.aug(c["aug_level"].float().reshape(-1, 1))
        h = self.inp(x) + emb[:, :, None, None]
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


def build_rescnn(preset: str, **kwargs) -> nn.Module:
    return ResCNN(width={"small": 8}[preset], **kwargs)


@pytest.fixture
def rescnn():
    """The one line that adds a network (and its removal after the test)."""
    NETWORKS["rescnn"] = Network("rescnn", "image", {"small": None}, image_denoiser(build_rescnn))
    yield
    del NETWORKS["rescnn"]


TINY = ["data.image_size=16", "model.ae_preset=tiny", "model.net=rescnn", "model.preset=small",
        "train.batch_size=4"]  # fmt: skip
TASKS = {
    "diffusion": ("mnist-cond", []),
    "image-to-image": ("mnist-restore", []),
    "latent diffusion": ("mnist-latent", ["model.latent_scale=1.0"]),  # a trained latent run
    "super-resolution": ("mnist-sr", ["model.aug_level_max=0.25"]),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_a_new_network_trains_for_every_image_task(rescnn, task):
    preset, sets = TASKS[task]
    cfg = apply_overrides(PRESETS[preset], [*TINY, *sets, "train.device=cpu"])
    built = build(cfg, load_data=False)
    net = getattr(built.model, "unet", built.model)  # latent and SR models wrap theirs
    assert isinstance(net, ResCNN)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.arange(4) % 10
    loss, _ = built.kind.loss_fn(built, {})((x0, labels), g)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_a_network_without_the_head_a_task_needs_is_refused(rescnn):
    cfg = apply_overrides(PRESETS["mnist-classifier"], TINY)
    with pytest.raises(ValueError, match="network 'rescnn' .* has no classifier head"):
        build(cfg, load_data=False)
    with pytest.raises(ValueError, match="unknown model.preset 'big' for network 'rescnn'"):
        build(apply_overrides(PRESETS["mnist"], [*TINY, "model.preset=big"]), load_data=False)
    with pytest.raises(ValueError, match="network 'rescnn' .* takes image data, not 2-D"):
        build(apply_overrides(PRESETS["moons"], ["model.net=rescnn"]), load_data=False)
    with pytest.raises(ValueError, match="unknown model.net 'gan'; choose one of: mlp, "):
        build(apply_overrides(PRESETS["mnist"], ["model.net=gan"]), load_data=False)


def _old_config(kind: str) -> dict:
    """A complete stored config as earlier versions wrote it: no model.net."""
    d = PRESETS["moons"].to_dict()
    del d["model"]["net"]
    d["model"]["kind"] = kind
    return d


def test_old_model_kinds_name_the_task_and_network():
    """Configs of earlier versions (``model.kind=unet``) load as the same run."""
    for old, (kind, net) in {"mlp": ("diffusion", "mlp"), "unet": ("diffusion", "unet"),
                             "classifier": ("classifier", "unet"),
                             "autoencoder": ("autoencoder", "autoencoder"),
                             "sr": ("sr", "unet")}.items():  # fmt: skip
        assert migrate_model({"kind": old}) == {"kind": kind, "net": net}
        cfg = RunConfig.from_dict(_old_config(old))
        assert (cfg.model.kind, cfg.model.net) == (kind, net)
        cfg = apply_overrides(PRESETS["mnist"], [f"model.kind={old}"])
        assert (cfg.model.kind, cfg.model.net) == (kind, net)
    assert migrate_model({"kind": "diffusion", "net": "unet"}) == {
        "kind": "diffusion",
        "net": "unet",
    }
    assert kind_of(RunConfig.from_dict(_old_config("sohl-dickstein"))).name == "sohl-dickstein"


def test_the_table_builds_what_the_tasks_built_before():
    """The U-Net entry's denoiser and classifier heads are today's U-Net and classifier."""
    from difflab.classifier import NoisyClassifier
    from difflab.nn.unet import UNet

    spec = NetSpec((1, 16, 16), out_channels=2, num_classes=3, cond_channels=1)
    net = build_network("unet", "tiny", spec)
    assert isinstance(net, UNet) and net.out_channels == 2 and net.config.cond_channels == 1
    clf = build_network("unet", "tiny", NetSpec((1, 16, 16), head="classifier", num_classes=3))
    assert isinstance(clf, NoisyClassifier)
