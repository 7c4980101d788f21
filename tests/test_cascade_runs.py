"""Cascaded diffusion through the command line: a low-resolution base run, then a
super-resolution (SR) run on it [Ho 2021; Saharia 2021].

The library pieces (box downsampling, conditioning augmentation, sr_loss, cascade_sample) are
tested in test_cascade.py; here the run kinds use them: the base trains on the f x f box
averages of the data (recomputed with numpy as the oracle), the SR run's training conditioning
is up(down(x0)) noised to levels s ~ U[0, aug_level_max * t_max] that the network is told
(moments checked against that law), the SR run keeps its base frozen in its checkpoints and
samples the whole chain reproducibly without the base run, --input super-resolves given
images, and every bad input is one line before any work.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.app.frozen import weights_sha256
from test_guidance import write_synthetic_mnist

SMALL = ["data.image_size=16", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=5",
         "train.warmup_steps=1", "model.preset=tiny", "sample.steps=4",
         "sample.sampler=ddim"]  # fmt: skip


def _sets(*items: str) -> list[str]:
    return [a for s in (*SMALL, *items) for a in ("--set", s)]


def _train(preset: str, out, data, *items: str) -> int:
    return main(["train", "--preset", preset, "--out", str(out), "--data-dir", str(data),
                 "--no-progress", *_sets(*items)])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    data = write_synthetic_mnist(root / "mnist")
    base, sr, alone = root / "base", root / "sr", root / "sr-alone"
    assert _train("mnist-14", base, data, "train.steps=6") == 0
    assert _train("mnist-sr", sr, data, "train.steps=6", f"model.base={base}") == 0
    assert _train("mnist-sr", alone, data, "train.steps=3") == 0
    return {"base": base, "sr": sr, "alone": alone, "data": data, "root": root}


def _samples(path) -> np.ndarray:
    with np.load(path) as data:
        return data["samples"]


def test_the_base_trains_on_box_averages_of_the_data(runs):
    from difflab.app.build import build_data
    from difflab.app.runs import read_run_config
    from difflab.data.images import load_image_dataset

    cfg = read_run_config(runs["base"])
    assert cfg.data.downsample == 2
    full = load_image_dataset("mnist", data_dir=runs["data"], image_size=16).images.numpy()
    oracle = full.reshape(-1, 1, 8, 2, 8, 2).astype(np.float64).mean(axis=(3, 5))
    low = build_data(cfg).images.numpy()
    assert low.shape == (len(full), 1, 8, 8)
    assert np.abs(low - oracle).max() <= 0.5  # rounded to the nearest uint8


def test_the_sr_run_keeps_its_base_frozen_and_resolved(runs):
    cfg = json.loads((runs["sr"] / "config.json").read_text())["model"]
    assert cfg["base"] == str(runs["base"].resolve())
    stored = json.loads(cfg["frozen"])["base"]  # the one way dependencies are stored
    assert stored["config"] == json.loads((runs["base"] / "config.json").read_text())
    assert stored["path"] == cfg["base"] and cfg["base_config"] is None
    base_ema = ckpt.load_checkpoint(runs["base"]).tensors["ema"]
    assert stored["sha256"] == weights_sha256(base_ema)
    sr = ckpt.load_checkpoint(runs["sr"]).tensors
    for group in ("model", "ema"):
        for k, v in base_ema.items():
            assert torch.equal(sr[group][f"base.{k}"], v), (group, k)


def test_the_cascade_samples_reproducibly_without_its_base_run(runs, tmp_path):
    moved = tmp_path / "sr"
    shutil.copytree(runs["sr"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["model"]["base"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    assert main(["sample", str(runs["sr"]), "--n", "5", "--out", str(a)]) == 0
    assert main(["sample", str(moved), "--n", "5", "--out", str(b)]) == 0
    assert main(["sample", str(moved), "--n", "5", "--seed", "1", "--out", str(c)]) == 0
    assert _samples(a).shape == (5, 1, 16, 16)
    assert np.array_equal(_samples(a), _samples(b))
    assert not np.array_equal(_samples(a), _samples(c))


def test_each_stage_has_its_own_sampler_and_the_level_is_used(runs, tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    sr = str(runs["sr"])
    assert main(["sample", sr, "--n", "4", "--out", str(a), "--base-sampler", "ddpm",
                 "--base-steps", "3", "--aug-level", "0.1"]) == 0  # fmt: skip
    timing = json.loads(a.with_suffix(".json").read_text())
    assert (timing["base_sampler"], timing["base_steps"], timing["aug_level"]) == ("ddpm", 3, 0.1)
    assert timing["sampler"] == "ddim" and timing["steps"] == 4
    assert main(["sample", sr, "--n", "4", "--out", str(b), "--base-steps", "3"]) == 0
    assert main(["sample", sr, "--n", "4", "--out", str(c), "--base-steps", "3",
                 "--aug-level", "0.5"]) == 0  # fmt: skip
    assert not np.array_equal(_samples(b), _samples(c))  # the level reaches the SR stage


def test_the_gif_shows_the_base_then_the_sr_stage(runs, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs["sr"]), "--n", "1", "--out", str(out), "--gif",
                 "--base-steps", "5", "--steps", "3"]) == 0  # fmt: skip
    with Image.open(out.with_suffix(".gif")) as gif:
        # 5 base frames, 3 SR frames and the samples; each frame a low-res and an SR panel
        assert gif.n_frames == 5 + 3 + 1
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L"), dtype=np.int16))
    w = frames[0].shape[1]
    left, right = slice(0, w // 2), slice(w // 2, w)
    # base frames change the left panel only; SR frames change the right panel only
    assert np.abs(frames[1][:, left] - frames[0][:, left]).max() > 0
    assert np.array_equal(frames[1][:, right], frames[0][:, right])
    assert np.array_equal(frames[6][:, left], frames[7][:, left])
    assert np.abs(frames[7][:, right] - frames[6][:, right]).max() > 0


def _write_pngs(folder, n: int, size: int) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, size, size), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / f"{i:02d}.png")
    return pixels


def test_input_super_resolves_given_images_without_a_base(runs, tmp_path):
    pixels = _write_pngs(tmp_path / "low", 3, 8)
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs["alone"]), "--input", str(tmp_path / "low"),
                 "--out", str(out), "--gif"]) == 0  # fmt: skip
    with np.load(out) as data:
        assert data["samples"].shape == (3, 1, 16, 16)
        assert np.array_equal(data["low_res"][:, 0], pixels)
    one, npz = tmp_path / "one.npz", tmp_path / "in.npz"
    assert main(["sample", str(runs["sr"]), "--input", str(tmp_path / "low" / "01.png"),
                 "--out", str(one)]) == 0  # fmt: skip
    assert _samples(one).shape == (1, 1, 16, 16)
    np.savez(npz, images=pixels[:, None])
    assert main(["sample", str(runs["sr"]), "--input", str(npz), "--out", str(out)]) == 0
    assert _samples(out).shape == (3, 1, 16, 16)


def test_bad_sampling_input_is_one_line_before_any_work(runs, tmp_path, capsys):
    _write_pngs(tmp_path / "big", 2, 16)
    out = tmp_path / "s.npz"
    cases = [
        (["sample", str(runs["alone"]), "--out", str(out)], "no base run"),
        (["sample", str(runs["sr"]), "--input", str(tmp_path / "big"), "--out", str(out)],
         "super-resolves (1, 8, 8)"),
        (["sample", str(runs["sr"]), "--input", str(tmp_path / "nothing"), "--out", str(out)],
         "nothing"),
        (["sample", str(runs["sr"]), "--aug-level", "2", "--out", str(out)], "--aug-level"),
        (["sample", str(runs["sr"]), "--base-sampler", "nope", "--out", str(out)], "nope"),
        (["sample", str(runs["sr"]), "--base-steps", "0", "--out", str(out)], "--base-steps"),
        (["sample", str(runs["base"]), "--aug-level", "0.1", "--out", str(out)],
         "super-resolution runs"),
    ]  # fmt: skip
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()


def test_bad_base_runs_are_refused_before_the_run_directory_exists(runs, tmp_path, capsys):
    r = tmp_path / "r"
    assert _train("mnist-sr", r, runs["data"], f"model.base={runs['alone']}") == 2
    assert "not an image diffusion run" in capsys.readouterr().err
    assert _train("mnist-sr", r, runs["data"], f"model.base={runs['base']}",
                  "data.image_size=24") == 2  # fmt: skip
    assert "makes images of shape (1, 8, 8)" in capsys.readouterr().err
    assert _train("mnist-sr", r, runs["data"], f"model.base={tmp_path / 'none'}") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _train("mnist-14", r, runs["data"], "data.image_size=15") == 2
    assert "data.downsample=2 must divide the image size 15" in capsys.readouterr().err
    assert not r.exists()


def test_training_conditioning_is_augmented_at_the_stated_levels():
    """cond = {"image": alpha_s up(down(x0)) + sigma_s eps, "aug_level": s}, s ~ U[0, s_max]
    with s_max = aug_level_max * t_max. Oracles: U[0, s_max] has mean s_max / 2 and sd
    s_max / sqrt(12), so the mean of n levels is within 4 sd / sqrt(n) of s_max / 2; the
    residual (image - alpha_s up(y)) / sigma_s is N(0, 1) per pixel, so its mean square over
    n * 256 pixels is within 4 sqrt(2 / (n * 256)) of 1. A level not scaled to t_max, noise
    added before upsampling, or another level than the one the network is told fails."""
    from difflab.app.config import apply_overrides, get_preset
    from difflab.app.runs import build
    from difflab.cascade import downsample_images, upsample_images

    cfg = apply_overrides(get_preset("mnist-sr"), SMALL + ["model.aug_level_max=0.3"])
    built = build(cfg, load_data=False)
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t, cond):
            seen.update(cond)
            return torch.zeros_like(x)

    built.denoiser.model = Recorder()
    n = 2048
    x0 = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    built.kind.objective(built, x0, cond=None, generator=torch.Generator().manual_seed(1))
    s = seen["aug_level"].double()
    s_max = 0.3 * built.schedule.t_max
    assert 0 <= float(s.min()) and float(s.max()) <= s_max
    assert abs(float(s.mean()) - s_max / 2) < 4 * s_max / math.sqrt(12 * n)
    alpha, sigma = built.schedule.alpha(s), built.schedule.sigma(s)
    up = upsample_images(downsample_images(x0, 2), 2).double()
    mask = sigma > 1e-3  # levels near 0 leave the image (almost) unchanged
    resid = (seen["image"].double() - alpha.view(-1, 1, 1, 1) * up) / sigma.view(-1, 1, 1, 1)
    ms = float((resid[mask] ** 2).mean())
    assert abs(ms - 1) < 4 * math.sqrt(2 / (int(mask.sum()) * 256))


def test_a_resumed_sr_run_matches_an_uninterrupted_one(runs, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    base = f"model.base={runs['base']}"
    assert _train("mnist-sr", whole, runs["data"], "train.steps=10", base) == 0
    assert _train("mnist-sr", parts, runs["data"], "train.steps=5", base) == 0
    assert main(["train", "--resume", str(parts), "--steps", "10", "--no-progress"]) == 0
    a, b = ckpt.load_checkpoint(whole), ckpt.load_checkpoint(parts)
    assert a.state["step"] == b.state["step"] == 10
    for k, v in a.tensors["model"].items():
        assert torch.equal(v, b.tensors["model"][k]), k


def test_eval_scores_samples_of_the_whole_cascade(runs, tmp_path, monkeypatch):
    import difflab.app.kinds as kinds

    scored = []
    monkeypatch.setattr(kinds, "digit_quality", lambda built, x: scored.append(x) or {"fdd": 0.0})
    monkeypatch.setattr(kinds, "check_digit_scoring", lambda built: None)  # synthetic data
    assert main(["eval", str(runs["sr"]), "--n", "4", "--no-progress"]) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs["sr"]), "--n", "4", "--out", str(out)]) == 0
    from difflab.data.images import to_uint8

    assert np.array_equal(to_uint8(scored[0]).numpy(), _samples(out))
    assert main(["eval", str(runs["alone"]), "--n", "4", "--no-progress"]) == 2


def test_eval_refuses_a_14x14_base_before_drawing_a_sample(runs, monkeypatch, capsys):
    """The digit classifier scores 28x28 digits: a base run at 14x14 is refused in one line
    before any sampling time is spent."""
    import difflab.app.kinds as kinds

    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(kinds, "draw_samples", must_not_sample)
    capsys.readouterr()
    assert main(["eval", str(runs["base"]), "--n", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "difflab: error:" in err, err


def test_nll_and_export_refuse_an_sr_run_in_one_line(runs, tmp_path, capsys):
    assert main(["export", str(runs["sr"]), str(tmp_path / "out")]) == 2
    assert main(["nll", str(runs["sr"]), "--n", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("difflab: error:") == 2, err
