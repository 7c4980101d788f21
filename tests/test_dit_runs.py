"""A tiny DiT learns every task through the command line: `difflab train --set model.net=dit`
for diffusion, classifier-free guidance, latent diffusion, super-resolution (a cascade of two
DiTs) and image-to-image, then `difflab sample`.

Oracle: adaLN-Zero starts every network at output 0, so the first epsilon-prediction loss is
E[eps^2] = 1 (v-prediction: E[v^2] = 1 too, for unit-variance data); on a few synthetic bar
images the tiny network must bring the logged loss well below that (half of the first logged
value). Caught: a task that hands the DiT inputs it cannot take (a crash, a wrong shape), a
DiT whose output never moves from zero (zero-initialised gates or output layer that get no
gradient, an optimiser that does not see its parameters: the loss stays at 1), a sampler path
that fails on it.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from difflab.app.cli import main
from test_guidance import write_synthetic_mnist

SMALL = ["model.net=dit", "model.preset=tiny", "data.limit=20", "train.batch_size=20",
         "train.log_every=5", "train.ckpt_every=1000", "train.warmup_steps=5", "train.lr=3e-3",
         "sample.steps=4", "sample.sampler=ddim", "sample.n=4"]  # fmt: skip
STEPS = 60


def _train(preset: str, out, data, *items: str, steps: int = STEPS) -> int:
    sets = [a for s in (*SMALL, *items) for a in ("--set", s)]
    return main(["train", "--preset", preset, "--out", str(out), "--data-dir", str(data),
                 "--no-progress", "--device", "cpu", "--steps", str(steps), *sets])  # fmt: skip


def _losses(run) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dit")
    data = write_synthetic_mnist(root / "mnist", n_train=20, n_test=20)
    r = {name: root / name for name in ("dit", "cfg", "ae", "latent", "base", "sr", "restore")}
    try:
        px = ("data.image_size=8",)
        assert _train("mnist-dit", r["dit"], data, *px) == 0
        assert _train("mnist-dit", r["cfg"], data, *px, "model.num_classes=10") == 0
        # the autoencoder is the network of its own run (model.ae_preset), the DiT denoises
        # its latents
        assert _train("mnist-ae", r["ae"], data, "data.image_size=16",
                      "model.net=autoencoder", "model.ae_preset=tiny", steps=10) == 0  # fmt: skip
        assert _train("mnist-latent-dit", r["latent"], data, "data.image_size=16",
                      "model.ae_preset=tiny", f"model.autoencoder={r['ae']}") == 0  # fmt: skip
        assert _train("mnist-14", r["base"], data, "data.image_size=16") == 0
        assert _train("mnist-sr", r["sr"], data, "data.image_size=16",
                      f"model.base={r['base']}") == 0  # fmt: skip
        assert _train("mnist-restore", r["restore"], data, *px) == 0
    finally:
        torch.set_num_threads(before)
    return r


@pytest.mark.parametrize("name", ["dit", "cfg", "latent", "base", "sr", "restore"])
def test_a_tiny_dit_learns_each_task(runs, name) -> None:
    losses = _losses(runs[name])
    assert abs(losses[0] - 1) < 0.3, losses  # adaLN-Zero: the network starts at output 0
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def _samples(path) -> np.ndarray:
    with np.load(path) as data:
        return data["samples"]


def test_the_dit_runs_sample(runs, tmp_path) -> None:
    cases = {
        "dit": ([], (3, 1, 8, 8)),
        "cfg": (["--class", "3", "--guidance", "2.0"], (3, 1, 8, 8)),
        "latent": (["--sampler", "dpm++2m-sde"], (3, 1, 16, 16)),
        "sr": ([], (3, 1, 16, 16)),  # the whole cascade: the base DiT, then the SR DiT
        "restore": ([], (3, 1, 8, 8)),
    }
    for name, (extra, shape) in cases.items():
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(runs[name]), "--n", "3", "--out", str(out), *extra]) == 0
        x = _samples(out)
        assert x.shape == shape and np.isfinite(x).all(), name


def test_a_dit_run_has_no_diffusers_form(runs, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert main(["export", str(runs["dit"]), str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no diffusers form" in err and "DiT" in err and "\n" not in err
    assert not (tmp_path / "e").exists()
