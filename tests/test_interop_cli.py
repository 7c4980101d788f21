"""The command line with diffusers: sample and score a diffusers folder, export a run, import it.

The library mapping is tested against diffusers in test_interop_diffusers.py; these tests check
that the commands use it: a diffusers folder works wherever a run directory does, an exported
run loads in diffusers with the run's EMA weights, and an imported folder fine-tunes as a run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from helpers import write_bar_images

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny DDPM pipeline folder saved by diffusers itself."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    out = tmp_path_factory.mktemp("hf") / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out)
    return out


def test_sample_a_diffusers_folder_like_a_run(pipeline_dir, tmp_path, capsys):
    from difflab.app.runs import load_run
    from difflab.samplers import sample

    out = tmp_path / "s.npz"
    code = main(["sample", str(pipeline_dir), "--sampler", "dpm++2m-sde", "--steps", "5",
                 "--n", "4", "--seed", "3", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with np.load(out) as data:
        got = data["samples"]
    assert got.shape == (4, 1, 16, 16) and got.dtype == np.uint8
    # the same draw through the library: the command used the folder's model and schedule
    built = load_run(pipeline_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = sample(built.denoiser, built.schedule, (4, 1, 16, 16), sampler="dpm++2m-sde",
                   steps=5, generator=g, threshold="clip")  # fmt: skip
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_nll_of_a_diffusers_folder_on_an_image_folder(pipeline_dir, tmp_path, capsys):
    write_bar_images(tmp_path / "imgs", n=8)
    code = main(["nll", str(pipeline_dir), "--data", "folder", "--data-dir",
                 str(tmp_path / "imgs"), "--n", "4", "--vlb-stride", "100",
                 "--ode-steps", "4"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["unit"] == "bits/dim" and res["n"] == 4
    assert np.isfinite(res["ode"]["mean"]) and np.isfinite(res["vlb"]["mean"])


def test_nll_of_a_diffusers_folder_without_data_is_one_line(pipeline_dir, capsys):
    assert main(["nll", str(pipeline_dir), "--n", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err


def test_a_flow_matching_scheduler_with_dynamic_shifting_is_refused_in_one_line(
    pipeline_dir, tmp_path, capsys
):
    """Its shift depends on the resolution at sampling time: read with a fixed shift it would
    sample silently wrong (exit 0)."""
    import shutil

    folder = tmp_path / "flow"
    shutil.copytree(pipeline_dir, folder)
    shutil.rmtree(folder / "scheduler")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.save_pretrained(folder / "scheduler")
    out = tmp_path / "s.npz"
    assert main(["sample", str(folder), "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "use_dynamic_shifting=True has no difflab equivalent" in err and "\n" not in err
    assert "scheduler_config.json" in err and not out.exists()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgrun")
    write_bar_images(root / "imgs", n=24)
    run = root / "run"
    sets = ["data.image_size=16", "data.channels=1", "model.preset=tiny-ddpm", "train.steps=4",
            "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2", "sample.steps=4",
            "sample.sampler=ddim", "train.warmup_steps=1",
            # LDM's schedule: diffusers' scaled_linear from 0.00085 to 0.012
            "diffusion.schedule=quadratic", "diffusion.beta_start=0.00085",
            "diffusion.beta_end=0.012"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    code = main(["train", "--preset", "folder", "--out", str(run), "--data-dir",
                 str(root / "imgs"), "--no-progress", *sets])  # fmt: skip
    assert code == 0
    return run


def test_export_loads_in_diffusers_with_the_ema_weights(image_run, tmp_path, capsys):
    from difflab.interop import state_dict_to_diffusers

    out = tmp_path / "export"
    assert main(["export", str(image_run), str(out)]) == 0, capsys.readouterr().err
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    ema = ckpt.load_checkpoint(image_run).tensors["ema"]
    from difflab.app.runs import load_run

    expected = state_dict_to_diffusers(ema, load_run(image_run).model.config)
    got = pipe.unet.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "folder" in card
    # the command that makes this run: its preset and every setting that differs from it
    assert "difflab train --preset folder" in card and "--set model.preset=tiny-ddpm" in card
    scheduler = diffusers.DDIMPipeline.from_pretrained(out).scheduler
    assert scheduler.config.num_train_timesteps == 1000
    # the run's beta range reaches diffusers: its alpha-bars are the run's
    assert scheduler.config.beta_schedule == "scaled_linear"
    alpha_bar = load_run(image_run).schedule.alpha_bar
    np.testing.assert_allclose(scheduler.alphas_cumprod.double(), alpha_bar[1:], rtol=1e-6)
    # an existing folder is kept unless --overwrite
    assert main(["export", str(image_run), str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_import_then_fine_tune(image_run, tmp_path, capsys):
    exported = tmp_path / "export"
    assert main(["export", str(image_run), str(exported)]) == 0
    run = tmp_path / "imported"
    sets = ["data.image_size=16", "data.channels=1", "train.batch_size=8", "train.steps=2",
            "train.log_every=1", "sample.steps=4", "sample.sampler=ddim"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    code = main(["import", str(exported), "--out", str(run), "--preset", "folder", "--data-dir",
                 str(image_run.parent / "imgs"), *sets])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    start = ckpt.load_checkpoint(run)
    assert start.step == 0
    ema = ckpt.load_checkpoint(image_run).tensors["ema"]
    # equal up to the float32 rounding of the first time layer, which export and import
    # rotate by the one-step timestep offset (t = k + 1) and back
    assert all(torch.allclose(start.tensors["model"][k], ema[k], rtol=0, atol=1e-6) for k in ema)
    # the imported run keeps the beta range (LDM's), not the preset's default range
    from difflab.app.runs import load_run

    np.testing.assert_allclose(
        load_run(run).schedule.betas, load_run(image_run).schedule.betas, rtol=1e-12
    )
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert ckpt.load_checkpoint(run).step == 2 and ckpt.is_finished(run)
    # its model card says where the weights came from, not "trained with difflab" only
    assert main(["export", str(run), str(tmp_path / "again")]) == 0
    card = (tmp_path / "again" / "README.md").read_text()
    assert f"fine-tuned with difflab from the diffusers model {exported}" in card
    assert "trained with difflab" not in card


def test_the_model_card_lists_the_runs_quality_figures(image_run, tmp_path, capsys):
    """The figures of the last `difflab eval` (kept in the run as quality.json) come first in
    the card's Metrics section, labelled with how they were measured, before the loss."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    quality = {"n": 1000, "sampler": "ddim", "steps": 50, "frechet_digit_distance": 3.25}
    (run / "quality.json").write_text(json.dumps(quality))
    assert main(["export", str(run), str(tmp_path / "e")]) == 0, capsys.readouterr().err
    card = (tmp_path / "e" / "README.md").read_text()
    metrics = card.split("## Metrics")[1].split("##")[0]
    rows = [r for r in metrics.splitlines() if r.startswith("| ") and "metric" not in r]
    assert rows[0] == "| frechet_digit_distance (1000 samples, ddim, 50 steps) | 3.25 |"
    assert any("loss" in r for r in rows[1:])


def test_eval_keeps_its_figures_in_the_run_and_a_2d_run_says_it_has_no_diffusers_form(
    tmp_path, capsys
):
    run = tmp_path / "moons"
    sets = ["train.steps=4", "train.batch_size=32", "train.log_every=2", "train.ckpt_every=2",
            "model.hidden=16", "model.depth=1", "sample.n=64", "sample.steps=2"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--preset", "moons", "--out", str(run), "--no-progress", *sets]) == 0
    # a run that cannot be exported says so when it starts
    assert "note: difflab export cannot write this run for diffusers" in capsys.readouterr().out
    args = ["eval", str(run), "--n", "64", "--steps", "2", "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((run / "quality.json").read_text()) == printed


def test_import_of_a_network_no_preset_describes_keeps_its_own_config(
    pipeline_dir, tmp_path, capsys
):
    """A UNet2DModel that matches no preset (16x16, channels (8, 16), 4 heads, diffusers'
    time features and norm eps) is imported with the closest preset and its own fields in
    model.unet. Oracle: the run's network computes what the diffusers folder's network
    computes (load_diffusers, itself checked against diffusers' forward), and the run
    fine-tunes. Bug caught: the import refusing every network that is not a preset."""
    from difflab.app.runs import load_run

    write_bar_images(tmp_path / "imgs", n=24)
    run = tmp_path / "r"
    sets = ["data.image_size=16", "data.channels=1", "train.batch_size=8", "train.steps=1",
            "train.log_every=1", "sample.steps=2", "sample.sampler=ddim"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    code = main(["import", str(pipeline_dir), "--out", str(run), "--preset", "folder",
                 "--data-dir", str(tmp_path / "imgs"), *sets])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["preset"] == "tiny-ddpm"  # the closest preset, and what differs:
    assert json.loads(cfg["model"]["unet"])["base_channels"] == 8
    ours = load_run(run)
    theirs = load_run(pipeline_dir)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.denoiser(x, t).x0, theirs.denoiser(x, t).x0)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert ckpt.load_checkpoint(run).step == 1


def test_a_bad_model_unet_is_one_line(tmp_path, capsys):
    for value, match in (("[1]", "JSON object"), ('{"depth": 2}', "depth"),
                         ('{"channel_mult": []}', "channel_mult")):  # fmt: skip
        code = main(["train", "--preset", "folder", "--out", str(tmp_path / "r"),
                     "--data-dir", str(tmp_path), "--set", f"model.unet={value}"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and "model.unet" in err and match in err and "\n" not in err, err
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("unet", "sample_size", "w"),
        ("unet", "layers_per_block", [1]),
        ("unet", "norm_eps", "small"),
        ("scheduler", "num_train_timesteps", "w"),
    ],
)
def test_a_bad_value_in_a_diffusers_config_names_the_file_and_key(
    pipeline_dir, tmp_path, capsys, where, key, value
):
    """It ended in "invalid literal for int() with base 10: 'w'", naming neither."""
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(pipeline_dir, folder)
    name = "config.json" if where == "unet" else "scheduler_config.json"
    path = folder / where / name
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    assert main(["sample", str(folder), "--n", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and f"{key}={value!r}" in err and "\n" not in err, err
