"""The data-set table: config, build and evaluation read one entry per data set, so a new 2-D
set is one entry and trains, samples and reports like the built-in ones."""

from __future__ import annotations

import json
import math

import torch

from difflab.app.cli import main
from difflab.data.datasets import DATASETS, DataSet, dataset
from difflab.data.images import IMAGE_DATASETS
from difflab.data.toy import TOY_DATASETS
from difflab.evaluation import DIGIT_DATASETS


def _ring(n: int, g: torch.Generator | None) -> torch.Tensor:
    """Points on the unit circle with a little noise."""
    angle = torch.rand(n, generator=g) * 2 * math.pi
    r = 1 + 0.05 * torch.randn(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], dim=1)


def test_a_new_2d_data_set_is_one_entry(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(DATASETS, "ring", DataSet("ring", "2-D", (2,), sample=_ring))
    run = tmp_path / "ring"
    assert main(["train", "--preset", "moons", "--set", "data.name=ring", "--out", str(run),
                 "--steps", "3", "--no-progress", "--device", "cpu", "--set", "model.hidden=8",
                 "--set", "sample.n=16", "--set", "sample.steps=3", "--set",
                 "sample.sampler=ddim"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["name"] == "ring"
    assert "sliced_wasserstein" in json.loads((run / "finished.json").read_text())["quality"]
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip


def test_the_table_holds_every_data_set_with_its_shape_and_scorer():
    assert list(DATASETS) == [*TOY_DATASETS, *IMAGE_DATASETS]
    assert [n for n, d in DATASETS.items() if d.is_2d] == list(TOY_DATASETS)
    assert dataset("mnist").shape == (1, 28, 28) and dataset("cifar10").shape == (3, 32, 32)
    assert dataset("folder").shape is None and dataset("hf").shape is None
    assert tuple(n for n, d in DATASETS.items() if d.digits) == DIGIT_DATASETS
    assert {f.filename for f in dataset("cifar10").remote_files} == {"cifar-10-python.tar.gz"}
    g = torch.Generator().manual_seed(0)
    assert dataset("moons").sample(5, g).shape == (5, 2)


def test_an_unknown_data_set_is_named_with_the_choices(tmp_path, capsys):
    assert main(["train", "--set", "data.name=rings", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown data.name 'rings'; choose one of: swissroll" in err and "\n" not in err.strip()
