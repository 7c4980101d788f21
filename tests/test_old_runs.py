"""Run directories written by earlier versions keep working: resume training, sample, export.

``tests/data/runs-2026-12`` holds tiny runs in the format of December 2026 (``model.kind``
naming the network or the run, the dependency runs stored inside the latent and SR runs'
checkpoints, their own directories since moved away): an MNIST model in the exportable
``tiny-ddpm`` layout (``image``), a base model at half resolution (``base``),
a latent model on a tiny autoencoder (``latent``) and a super-resolution stage on ``base``
(``sr``). They were trained 4 steps on the synthetic digits of ``test_fingerprints``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from difflab.app.cli import main
from test_fingerprints import _write_mnist

FIXTURES = Path(__file__).resolve().parent / "data" / "runs-2026-12"


@pytest.fixture
def old_runs(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "runs")
    _write_mnist(tmp_path / "mnist")
    return tmp_path


@pytest.mark.parametrize("run", ["image", "base", "latent", "sr"])
def test_old_runs_resume_and_sample(old_runs, run):
    run_dir = old_runs / "runs" / run
    out = old_runs / f"{run}.npz"
    assert main(["sample", str(run_dir), "--n", "2", "--steps", "2", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    x = np.load(out)["samples"]
    assert x.shape[0] == 2 and np.isfinite(x).all()
    assert main(["train", "--resume", str(run_dir), "--steps", "6", "--no-progress",
                 "--data-dir", str(old_runs / "mnist"), "--device", "cpu"]) == 0  # fmt: skip
    assert (run_dir / "checkpoints" / "step-00000006").is_dir()


def test_old_image_run_exports_to_diffusers(old_runs):
    pytest.importorskip("diffusers")
    out = old_runs / "exported"
    assert main(["export", str(old_runs / "runs" / "image"), str(out)]) == 0
    assert (out / "model_index.json").is_file()
