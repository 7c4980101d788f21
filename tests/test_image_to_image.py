"""Palette-style image-to-image models [Saharia 2022]: degradations, conditioning, training.

Oracles: a gray RGB image has luma equal to its gray value; a constant image is unchanged by
the blur, whose impulse response is the normalised discrete Gaussian; the inpainting input
equals the image outside the hole; the degradation is a function of the generator state; the
model sees the conditioning image at every sampler step; a tiny model's loss drops.
"""

import math

import numpy as np
import pytest
import torch

from difflab.app.build import Built, ImageBatches, build_schedule
from difflab.app.config import apply_overrides, get_preset
from difflab.app.kinds import kind_of
from difflab.app.training import make_loss_fn
from difflab.data.images import ImageDataset
from difflab.image_to_image import (
    TASKS,
    cond_channels,
    degrade,
    gaussian_blur,
    grayscale,
    image_to_image,
    inpaint_mask,
    preview,
)
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer
from test_guidance import write_synthetic_mnist


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(b=4, c=3, h=12, seed=0):
    return torch.rand(b, c, h, h, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- degradations
def test_cond_channels_and_task_errors():
    assert cond_channels("colorize", 3) == 1
    assert cond_channels("restore", 1) == 1 and cond_channels("restore", 3) == 3
    assert cond_channels("inpaint", 1) == 2
    with pytest.raises(ValueError, match="RGB"):
        cond_channels("colorize", 1)
    with pytest.raises(ValueError, match="colorize, restore, inpaint"):
        degrade(_images(), "sharpen", generator=torch.Generator())


@pytest.mark.parametrize("task", TASKS)
def test_degradation_shapes_and_determinism(task):
    x0 = _images()
    a = degrade(x0, task, generator=torch.Generator().manual_seed(1))
    b = degrade(x0, task, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, cond_channels(task, 3), 12, 12)
    assert torch.equal(a, b)
    if task != "colorize":  # colorize draws nothing
        c = degrade(x0, task, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(a, c)
    assert preview(a, task, 3).shape == x0.shape


def test_grayscale_of_a_gray_image_is_its_value():
    v = _images(c=1)
    torch.testing.assert_close(grayscale(v.expand(-1, 3, -1, -1)), v)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    torch.testing.assert_close(grayscale(red), torch.full((1, 1, 2, 2), 0.299))


def test_blur_keeps_constants_and_has_the_gaussian_impulse_response():
    const = torch.full((2, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.7, 1.9])), const)
    sigma = 1.3
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    out = gaussian_blur(impulse, sigma)[0, 0]
    r = math.ceil(3 * sigma)
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(d**2) / (2 * sigma**2))
    k = k / k.sum()
    expected = torch.zeros(31, 31, dtype=torch.float64)
    expected[15 - r : 16 + r, 15 - r : 16 + r] = torch.outer(k, k)
    torch.testing.assert_close(out.double(), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(gaussian_blur(impulse, 0.0), impulse)


def test_restore_noise_level_lies_in_the_configured_range():
    x0 = torch.full((64, 1, 32, 32), -0.2)  # constant: the blur does nothing
    y = degrade(x0, "restore", generator=torch.Generator().manual_seed(3), noise=(0.1, 0.2))
    std = (y - x0).reshape(64, -1).std(1)
    se = 0.2 / math.sqrt(2 * 1024)
    assert float(std.min()) > 0.1 - 4 * se and float(std.max()) < 0.2 + 4 * se
    assert float(std.max() - std.min()) > 0.05  # one level per image


def test_inpaint_input_is_the_image_outside_the_hole():
    x0 = _images(b=32, c=1, h=16)
    y = degrade(x0, "inpaint", generator=torch.Generator().manual_seed(4), hole=(0.25, 0.5))
    known = y[:, 1:] > 0
    assert set(y[:, 1:].unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y[:, :1][known], x0[known])
    assert bool((y[:, :1][~known] == 0).all())
    hole_frac = (~known).float().mean((1, 2, 3))
    # rectangle sides are 4..8 pixels of 16
    assert float(hole_frac.min()) >= (4 * 4) / 256 and float(hole_frac.max()) <= (8 * 8) / 256
    m = inpaint_mask((1, 1, 5, 5), generator=torch.Generator().manual_seed(0), size=(1.0, 1.0))
    assert not m.any()  # a hole covering the whole image


# ----------------------------------------------------------------------------- the model
def test_image_to_image_gives_the_conditioning_image_to_every_call():
    y = _images(b=2, c=2, h=8)
    seen = []

    def den(xt, t, cond):
        seen.append(cond["image"])
        return Prediction(x0=torch.zeros_like(xt), eps=xt)

    sched = DiscreteSchedule.from_name("linear", 100)
    x = image_to_image(den, sched, y, channels=3, sampler="ddim", steps=4,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert x.shape == (2, 3, 8, 8) and len(seen) == 4
    assert all(torch.equal(s, y) for s in seen)


def _palette_run(task: str, channels: int):
    """A tiny Palette model and the runner's loss on a small synthetic dataset."""
    overrides = ["data.image_size=8", f"data.channels={channels}", "model.preset=tiny",
                 f"model.image_task={task}", "train.batch_size=16"]  # fmt: skip
    cfg = apply_overrides(get_preset("mnist-restore"), overrides)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, channels, 1, 1), generator=g, dtype=torch.uint8)
    ds = ImageDataset(images.expand(-1, -1, 8, 8).contiguous(), torch.zeros(32).long())
    sched = build_schedule(cfg)
    torch.manual_seed(0)
    kind = kind_of(cfg)
    model = kind.build_model(cfg, (channels, 8, 8), sched)
    built = Built(cfg, kind, sched, model, ModelDenoiser(model, sched), (channels, 8, 8), ds,
                  torch.device("cpu"))  # fmt: skip
    return built, make_loss_fn(built, {}), ImageBatches(ds, 16, seed=0, device=built.device)


@pytest.mark.parametrize("task,channels", [("restore", 1), ("inpaint", 1), ("colorize", 3)])
def test_palette_model_takes_the_degraded_image_and_its_loss_drops(task, channels):
    built, loss_fn, batches = _palette_run(task, channels)
    assert built.model.config.cond_channels == cond_channels(task, channels)
    batch = batches(0, torch.Generator().manual_seed(0))

    def fixed_loss():
        with torch.no_grad():
            return float(loss_fn(batch, torch.Generator().manual_seed(5))[0])

    assert fixed_loss() == fixed_loss()  # degradation and noise come from the generator
    before = fixed_loss()
    trainer = Trainer(built.model, batch_fn=batches, loss_fn=loss_fn, lr=5e-3, batch_size=16)
    for _ in range(15):
        trainer.train_step()
    assert fixed_loss() < 0.85 * before


# ----------------------------------------------------------------------------- CLI
def test_cli_restore_run_samples_test_images_and_given_inputs(tmp_path, capsys):
    from difflab.app.cli import main

    data = write_synthetic_mnist(tmp_path / "mnist", n_train=40, n_test=20)
    run = tmp_path / "run"
    fast = ["--no-progress", "--steps", "3", "--set", "data.image_size=8", "--set",
            "data.channels=1", "--set", "model.preset=tiny", "--set", "train.batch_size=8",
            "--set", "sample.steps=3", "--set", "sample.sampler=ddim"]  # fmt: skip
    assert main(["train", "--preset", "mnist-restore", "--data-dir", str(data), "--out",
                 str(run), *fast]) == 0  # fmt: skip
    assert (run / "samples.png").stat().st_size > 0
    out = tmp_path / "r.npz"
    assert main(["sample", str(run), "--n", "5", "--out", str(out)]) == 0
    res = np.load(out)
    assert res["samples"].shape == res["originals"].shape == (5, 1, 8, 8)
    assert res["degraded"].shape == (5, 1, 8, 8) and res["degraded"].dtype == np.float32
    again = tmp_path / "again.npz"
    assert main(["sample", str(run), "--input", str(out), "--out", str(again)]) == 0
    assert np.load(again)["samples"].shape == (5, 1, 8, 8)
    np.savez(tmp_path / "bad.npz", degraded=np.zeros((2, 3, 8, 8), np.float32))
    capsys.readouterr()
    assert main(["sample", str(run), "--input", str(tmp_path / "bad.npz")]) == 2
    assert "(N, 1, 8, 8)" in capsys.readouterr().err
