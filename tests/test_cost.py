"""The cost of a run's network (parameters, forward FLOPs per image) as ``difflab presets`` and
``difflab train`` show it, against independent counts: the parameters of the network a run
really builds, the FLOPs of a network built on the CPU (not the meta device), and a hand count
of the matrix products of a small MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.app.cli import main
from difflab.app.config import PRESETS, apply_overrides, get_preset
from difflab.app.cost import cost_column, run_cost
from difflab.app.runs import build
from difflab.nn.cost import example_inputs, network_cost, spec_cost
from difflab.nn.networks import NetSpec, build_network


def _trained_network(cfg):
    """The network a run of ``cfg`` trains, as ``build`` makes it (on the CPU)."""
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    model = built.model
    return getattr(model, "unet", None) or getattr(model, "student", None) or model


@pytest.mark.parametrize(
    "preset",
    ["moons", "mnist", "mnist-cond", "mnist-classifier", "mnist-ae", "mnist-restore",
     "mnist-sr", "mnist-dit", "mnist-uvit", "mnist-consistency"],
)  # fmt: skip
def test_run_cost_counts_the_parameters_of_the_network_the_run_trains(preset) -> None:
    """Catches a network built for other data (channels, size, classes, conditioning) than
    the run's: its parameter count differs."""
    cfg = get_preset(preset)
    net = _trained_network(cfg)
    assert run_cost(cfg).parameters == sum(p.numel() for p in net.parameters())


def test_latent_runs_count_the_denoiser_not_the_frozen_autoencoder(tmp_path) -> None:
    cfg = apply_overrides(get_preset("mnist-latent-dit"), ["model.latent_scale=1.0"])
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    cost = run_cost(cfg)
    assert cost.parameters == sum(p.numel() for p in built.model.unet.parameters())
    # on the 7 x 7 x 4 latents: the FLOPs of the DiT counted on the CPU at that shape
    assert cost.flops == network_cost(built.model.unet, (4, 7, 7)).flops


@pytest.mark.parametrize("preset", ["mnist", "mnist-sr", "mnist-restore", "mnist-dit"])
def test_meta_device_flops_equal_a_cpu_forward(preset) -> None:
    """The meta-device count equals FlopCounterMode on a real CPU forward with the same inputs
    (conditioning image and augmentation level included: leaving them out of the cost inputs
    fails the SR and restore networks, or counts a narrower first layer)."""
    cfg = get_preset(preset)
    net = _trained_network(cfg).eval()
    kind = build(cfg, device=torch.device("cpu"), load_data=False).kind
    from difflab.app.build import build_schedule, cfg_data_shape

    spec = kind.net_spec(cfg, cfg_data_shape(cfg), build_schedule(cfg))
    assert run_cost(cfg) == spec_cost(net, spec)
    assert spec_cost(net, spec).flops > 0


def test_mlp_flops_equal_a_hand_count() -> None:
    """2 FLOPs per multiply-add of every Linear layer, each applied once to one example: the
    hand count from the layer shapes of a small MLP denoiser (time and class embeddings
    included). Catches a counter that drops the batch-1 matrix-vector products or counts one
    layer twice."""
    spec = NetSpec((2,), num_classes=3, hidden=16, depth=2)
    net = build_network("mlp", "", spec)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    hand = sum(2 * m.in_features * m.out_features for m in linears)
    assert spec_cost(net, spec).flops == hand


def test_example_inputs_follow_the_spec() -> None:
    x, t, cond = example_inputs(
        NetSpec((3, 8, 8), num_classes=10, cond_channels=1, aug_level_embedding=True)
    )
    assert x.shape == (1, 3, 8, 8) and t.shape == (1,)
    assert cond["image"].shape == (1, 1, 8, 8) and cond["class"].tolist() == [0]
    assert cond["aug_level"].shape == (1,)
    assert example_inputs(NetSpec((1, 8, 8)))[2] is None
    assert len(example_inputs(NetSpec((1, 8, 8), head="classifier"))) == 2
    assert example_inputs(NetSpec((2,), head="own")) is None


def test_presets_show_every_network_cost(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(PRESETS)
    for line, (name, cfg) in zip(out, PRESETS.items(), strict=True):
        assert line.startswith(name) and line.endswith(cost_column(cfg))
    dit = next(line for line in out if line.startswith("mnist-dit "))
    assert "params=0.723M gflops/img=0.233" in dit
    assert "gflops/img=-" in next(line for line in out if line.startswith("swissroll-sd2015"))


def test_train_names_the_cost_on_its_first_line(capsys, tmp_path) -> None:
    args = ["train", "--preset", "moons", "--out", str(tmp_path / "r"), "--steps", "2",
            "--no-progress", "--device", "cpu", "--set", "model.hidden=16",
            "--set", "sample.n=4", "--set", "sample.steps=2",
            "--set", "sample.sampler=ddim"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    cfg = apply_overrides(get_preset("moons"), ["model.hidden=16"])
    assert first.startswith(f"moons: {run_cost(cfg).describe()} on cpu, run dir")
    assert "parameters" in first and "GFLOPs per image" in first
