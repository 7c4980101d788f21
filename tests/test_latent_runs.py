"""Latent diffusion runs through the command line: an autoencoder run, then a latent run on it.

The library pieces (KL term, scale factor, latent sampling) are tested in test_autoencoder.py
and test_latent.py; here the run kinds use them: the latent scale stored in the run is LDM's
1 / std of the frozen encoder's latents of the training data (recomputed here as the oracle),
sampling decodes to image space with any sampler, guidance and the denoising GIF, and a latent
run samples from its own checkpoint without the autoencoder run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.nn.autoencoder import build_autoencoder
from test_guidance import write_synthetic_mnist

SMALL = ["data.image_size=16", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=5",
         "train.warmup_steps=1", "model.ae_preset=tiny"]  # fmt: skip


def _sets(*items: str) -> list[str]:
    return [a for s in (*SMALL, *items) for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    data = write_synthetic_mnist(root / "mnist")
    ae, lat = root / "ae", root / "latent"
    assert main(["train", "--preset", "mnist-ae", "--out", str(ae), "--data-dir", str(data),
                 "--no-progress", *_sets("train.steps=10")]) == 0  # fmt: skip
    sets = _sets("train.steps=6", "model.preset=tiny", f"model.autoencoder={ae}",
                 "sample.steps=4", "sample.sampler=ddim")  # fmt: skip
    assert main(["train", "--preset", "mnist-latent-cond", "--out", str(lat), "--data-dir",
                 str(data), "--no-progress", *sets]) == 0  # fmt: skip
    return {"ae": ae, "latent": lat, "data": data}


def test_autoencoder_run_reports_reconstruction_psnr(runs):
    info = json.loads((runs["ae"] / "finished.json").read_text())
    assert np.isfinite(info["psnr"])
    assert (runs["ae"] / "samples.png").stat().st_size > 0


def test_latent_scale_is_one_over_the_std_of_the_training_latents(runs):
    from difflab.data.images import load_image_dataset

    cfg = json.loads((runs["latent"] / "config.json").read_text())
    stored = cfg["model"]["latent_scale"]
    ae = build_autoencoder("tiny", in_channels=1, image_size=16)
    ae.load_state_dict(ckpt.load_checkpoint(runs["ae"]).tensors["ema"])
    ds = load_image_dataset("mnist", data_dir=runs["data"], image_size=16)
    x, _ = ds.batch(torch.arange(len(ds)))
    with torch.no_grad():
        z = ae.encode(x).mode().double()
    assert stored == pytest.approx(1 / z.std().item(), rel=1e-6)


def test_latent_samples_are_decoded_images_with_any_sampler_and_guidance(runs, tmp_path):
    out = tmp_path / "s.npz"
    code = main(["sample", str(runs["latent"]), "--n", "6", "--sampler", "dpm++2m-sde",
                 "--steps", "4", "--class", "3", "--guidance", "2", "--gif",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    with np.load(out) as data:
        assert data["samples"].shape == (6, 1, 16, 16)
    assert out.with_suffix(".gif").stat().st_size > 0


def test_latent_run_samples_without_its_autoencoder_run(runs, tmp_path):
    moved = tmp_path / "latent"
    shutil.copytree(runs["latent"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["model"]["autoencoder"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", str(runs["latent"]), "--n", "3", "--out", str(a)]) == 0
    assert main(["sample", str(moved), "--n", "3", "--out", str(b)]) == 0
    with np.load(a) as x, np.load(b) as y:
        assert np.array_equal(x["samples"], y["samples"])


def test_latent_runs_refuse_clipping_and_a_missing_autoencoder(runs, tmp_path, capsys):
    code = main(["train", "--preset", "mnist-latent", "--out", str(tmp_path / "r"),
                 "--data-dir", str(runs["data"]), *_sets("model.preset=tiny")])  # fmt: skip
    assert code == 2 and "model.autoencoder" in capsys.readouterr().err
    code = main(["train", "--preset", "mnist-latent", "--out", str(tmp_path / "r"),
                 *_sets("model.preset=tiny", f"model.autoencoder={runs['ae']}",
                        "sample.threshold=clip")])  # fmt: skip
    assert code == 2 and "latents" in capsys.readouterr().err
    code = main(["train", "--preset", "mnist-latent", "--out", str(tmp_path / "r"),
                 *_sets("model.preset=tiny", f"model.autoencoder={runs['latent']}")])  # fmt: skip
    assert code == 2 and "not an autoencoder run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["sample", str(runs["ae"])]) == 2
    assert "does not sample" in capsys.readouterr().err


def test_the_latent_run_stores_its_autoencoder_run(runs):
    """model.frozen: the autoencoder run's path, config and the hash of the EMA weights loaded."""
    from difflab.app.frozen import weights_sha256

    stored = json.loads(json.loads((runs["latent"] / "config.json").read_text())["model"]["frozen"])
    ae = stored["autoencoder"]
    assert ae["path"] == str(runs["ae"].resolve())
    assert ae["config"] == json.loads((runs["ae"] / "config.json").read_text())
    assert ae["sha256"] == weights_sha256(ckpt.load_checkpoint(runs["ae"]).tensors["ema"])
