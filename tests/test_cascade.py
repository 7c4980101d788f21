"""Tests of cascaded diffusion: resampling, conditioning augmentation, the augmentation-level
embedding of the U-Net, the cascade sampler, and a tiny cascade trained end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from difflab.cascade import (
    SRStage,
    Stage,
    augment_low_res,
    cascade_sample,
    downsample_images,
    sample_aug_levels,
    sr_cond,
    sr_loss,
    super_resolve,
    upsample_images,
)
from difflab.data.shapes import bar_images, nearest_distance, sample_bars
from difflab.guidance import ClassifierFreeGuidance
from difflab.nn.mlp import TimeMLP
from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer
from helpers import randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    return randomise(module, seed, std)


SCHEDULE = DiscreteSchedule.from_name("linear", T=1000)
SMALL = dict(channel_mult=(1,), attention_resolutions=(), base_channels=8, norm_groups=4)


def _sr_net(size: int = 8, **kw: object) -> nn.Module:
    return build_unet(
        "tiny", image_size=size, cond_channels=1, aug_level_embedding=True, **SMALL | kw
    )


def _alpha_sigma(t: int) -> tuple[float, float]:
    """alpha_t = sqrt(prod_{i <= t} (1 - beta_i)), sigma_t^2 = 1 - alpha_t^2 [Ho 2020, Eq. 4]."""
    alpha_bar = float(torch.prod(1 - SCHEDULE.betas[:t]))
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


# ---------------------------------------------------------------- resampling


def test_downsample_is_box_average_and_inverts_nearest_upsampling() -> None:
    y = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    blocks = x.reshape(2, 3, 4, 2, 6, 2).mean(dim=(3, 5))
    torch.testing.assert_close(downsample_images(x, 2), blocks)
    up = upsample_images(y, 2, "nearest")
    assert up.shape == (2, 3, 8, 12)
    assert torch.equal(up[:, :, ::2, ::2], y) and torch.equal(up[:, :, 1::2, 1::2], y)
    torch.testing.assert_close(downsample_images(up, 2), y)


def test_bilinear_upsampling_reproduces_a_linear_ramp_inside() -> None:
    # Half-pixel centres: output pixel j of a factor-2 upsampling sits at input coordinate
    # (j + 0.5) / 2 - 0.5; a linear ramp a u + b is reproduced exactly away from the edges.
    a, b = 0.3, -0.2
    u = torch.arange(6, dtype=torch.float32)
    y = (a * u + b).expand(1, 1, 6, 6)
    up = upsample_images(y, 2, "bilinear")
    j = torch.arange(12, dtype=torch.float32)
    expected = a * ((j + 0.5) / 2 - 0.5) + b
    torch.testing.assert_close(up[0, 0, 0, 1:-1], expected[1:-1])
    torch.testing.assert_close(
        upsample_images(torch.full((1, 1, 3, 3), 0.7), 4), torch.full((1, 1, 12, 12), 0.7)
    )


def test_resampling_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible by 2"):
        downsample_images(torch.zeros(1, 1, 5, 4), 2)
    with pytest.raises(ValueError, match="positive integer"):
        upsample_images(torch.zeros(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="choose one of: bilinear, nearest"):
        upsample_images(torch.zeros(1, 1, 4, 4), 2, "bicubic")  # type: ignore[arg-type]


def test_bar_images_downsample_to_bar_images() -> None:
    bars = bar_images(8, 2)
    assert bars.shape == (8, 1, 8, 8) and set(bars.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(downsample_images(bars, 2), bar_images(4, 1))
    with pytest.raises(ValueError, match="must divide"):
        bar_images(8, 3)


# ---------------------------------------------------------------- conditioning augmentation


@pytest.mark.parametrize("level", [1, 50, 300, 900])
def test_augmentation_matches_forward_process_moments(level: int) -> None:
    # y_s ~ N(alpha_s y, sigma_s^2 I) with alpha from the betas (independent of the schedule's
    # own alpha). n draws per pixel: the mean's standard error is sigma / sqrt(n), the
    # variance's sigma^2 sqrt(2 / (n - 1)); tolerances are 5 standard errors. alpha_bar in place
    # of alpha, level t - 1 for t (sigma = 0 at t = 1) or a missing sqrt fail.
    n = 20_000
    y = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ys = augment_low_res(
        y.expand(n, -1, -1, -1), float(level), schedule=SCHEDULE,
        generator=torch.Generator().manual_seed(level),
    )  # fmt: skip
    alpha, sigma = _alpha_sigma(level)
    assert ((ys.mean(0) - alpha * y[0]).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((ys.var(0) - sigma**2).abs() < 5 * sigma**2 * math.sqrt(2 / (n - 1))).all()


def test_augmentation_levels_per_image_and_level_zero() -> None:
    # A (B,) level noises each image to its own level; level 0 leaves the image unchanged.
    n = 20_000
    y = torch.full((n, 1, 1, 1), 0.5, dtype=torch.float64)
    levels = torch.tensor([0.0, 600.0], dtype=torch.float64).repeat(n // 2)
    ys = augment_low_res(y, levels, schedule=SCHEDULE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ys[0::2], y[0::2])
    alpha, sigma = _alpha_sigma(600)
    noisy = ys[1::2].flatten()
    assert abs(float(noisy.mean()) - 0.5 * alpha) < 5 * sigma / math.sqrt(n / 2)
    assert abs(float(noisy.std()) - sigma) < 5 * sigma / math.sqrt(n)
    with pytest.raises(ValueError, match=r"augmentation levels must lie in \[0, 1000"):
        augment_low_res(y[:2], 1001.0, schedule=SCHEDULE)


def test_training_levels_are_uniform_up_to_the_maximum() -> None:
    # U[0, m]: mean m / 2 (standard error m / sqrt(12 n)), variance m^2 / 12 (standard error
    # sqrt((mu_4 - sigma^4) / n) = m^2 / sqrt(180 n), with mu_4 = m^4 / 80).
    n, m = 40_000, 250.0
    s = sample_aug_levels(n, m, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float64 and float(s.min()) >= 0 and float(s.max()) <= m
    assert abs(float(s.mean()) - m / 2) < 5 * m / math.sqrt(12 * n)
    assert abs(float(s.var()) - m**2 / 12) < 5 * m**2 / math.sqrt(180 * n)
    with pytest.raises(ValueError, match="maximum augmentation level"):
        sample_aug_levels(3, -1.0)


def test_sr_cond_upsamples_then_noises() -> None:
    y = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    clean = sr_cond(y, 0.0, schedule=SCHEDULE, factor=2, upsample="nearest", labels=labels)
    assert torch.equal(clean["image"], upsample_images(y, 2, "nearest"))
    assert torch.equal(clean["aug_level"], torch.zeros(3)) and clean["class"] is labels
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    noisy = sr_cond(y, 300.0, schedule=SCHEDULE, generator=g1)
    expected = augment_low_res(upsample_images(y, 2), 300.0, schedule=SCHEDULE, generator=g2)
    torch.testing.assert_close(noisy["image"], expected)
    assert set(noisy) == {"image", "aug_level"}


def test_sr_loss_is_diffusion_loss_with_augmented_condition() -> None:
    # Generator order: levels, augmentation noise, then the diffusion time and noise.
    den = ModelDenoiser(_randomise(_sr_net()), SCHEDULE)
    x0 = sample_bars(6, generator=torch.Generator().manual_seed(0))
    out = sr_loss(den, x0, max_aug_level=200.0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    s = sample_aug_levels(6, 200.0, generator=g)
    cond = sr_cond(downsample_images(x0, 2), s, schedule=SCHEDULE, generator=g)
    ref = diffusion_loss(den, x0, cond=cond, generator=g)
    torch.testing.assert_close(out.loss, ref.loss)
    assert float(s.std()) > 0  # the levels differ per image


# ---------------------------------------------------------------- the U-Net's level embedding


def test_aug_level_embedding_is_opt_in_and_changes_the_output() -> None:
    plain = build_unet("tiny")
    assert plain.aug_embed is None
    assert not any(k.startswith("aug_embed") for k in plain.state_dict())
    net = _randomise(_sr_net())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 100.0])
    image = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = net(x, t, {"image": image, "aug_level": torch.tensor([0.0, 0.0])})
        b = net(x, t, {"image": image, "aug_level": torch.tensor([0.0, 500.0])})
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_aug_level_errors_are_one_line() -> None:
    net = _sr_net()
    x, t, image = torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"cond\['aug_level'\] must have shape \(2,\), got None"):
        net(x, t, {"image": image})
    with pytest.raises(ValueError, match=r"must have shape \(2,\), got \(3,\)"):
        net(x, t, {"image": image, "aug_level": torch.zeros(3)})
    with pytest.raises(ValueError, match="aug_level_embedding=False"):
        build_unet("tiny")(torch.zeros(2, 1, 16, 16), t, {"aug_level": torch.zeros(2)})
    with pytest.raises(ValueError, match="TimeMLP does not take an augmentation level"):
        TimeMLP(dim=2)(torch.zeros(2, 2), t, {"aug_level": torch.zeros(2)})
    with pytest.raises(ValueError, match="unknown cond keys"):
        net(x, t, {"image": image, "level": torch.zeros(2)})


def test_classifier_free_guidance_passes_the_level_to_both_branches() -> None:
    # Guidance scale 1 is the conditional model; the level must reach both halves of the batch.
    net = _randomise(_sr_net(num_classes=3))
    den = ModelDenoiser(net, SCHEDULE)
    xt = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 300.0], dtype=torch.float64)
    y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = sr_cond(y, 50.0, schedule=SCHEDULE, labels=torch.tensor([0, 2]), generator=None)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(den, scale=1.0, null_label=3)(xt, t, cond)
        plain = den(xt, t, cond)
    torch.testing.assert_close(guided.x0, plain.x0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the cascade sampler


def _cascade() -> tuple[Stage, list[SRStage]]:
    """Untrained random stages 4 -> 8 -> 16 (x0-predicting, so their samples stay in range)."""

    def den(net: nn.Module, seed: int) -> ModelDenoiser:
        return ModelDenoiser(_randomise(net, seed, std=0.05), SCHEDULE, parameterization="x0")

    base = Stage(den(build_unet("tiny", image_size=4, **SMALL), 0), SCHEDULE, steps=5)
    sr1 = SRStage(den(_sr_net(8), 1), SCHEDULE, steps=4, aug_level=100.0)
    sr2 = SRStage(
        den(_sr_net(16), 2), SCHEDULE, sampler="ddpm", steps=3, aug_level=0.0, upsample="nearest"
    )
    return base, [sr1, sr2]


def test_cascade_composes_shapes_and_reports_every_stage() -> None:
    base, srs = _cascade()
    seen: list[tuple[int, tuple[int, ...]]] = []
    images = cascade_sample(
        base, srs, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0),
        callback=lambda stage, info: seen.append((stage, tuple(info["x"].shape))),
    )  # fmt: skip
    assert [tuple(im.shape) for im in images] == [(3, 1, 4, 4), (3, 1, 8, 8), (3, 1, 16, 16)]
    assert seen == [(0, (3, 1, 4, 4))] * 5 + [(1, (3, 1, 8, 8))] * 4 + [(2, (3, 1, 16, 16))] * 3
    assert all(float(im.abs().max()) <= 1 for im in images)


def test_cascade_is_seed_reproducible_and_stage_settings_matter() -> None:
    base, srs = _cascade()

    def run(seed: int) -> list[Tensor]:
        return cascade_sample(
            base, srs[:1], (2, 1, 4, 4), generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    srs[0].aug_level = 0.0  # another augmentation level changes the SR stage only
    d = run(0)
    assert torch.equal(d[0], a[0]) and not torch.equal(d[1], a[1])
    srs[0].sampler = "ddpm"  # each stage's sampler is its own
    assert not torch.equal(run(0)[1], d[1])


def test_super_resolve_user_images() -> None:
    _, srs = _cascade()
    low = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = super_resolve(srs[0], low, generator=torch.Generator().manual_seed(0))
    again = super_resolve(srs[0], low, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, again)


# ---------------------------------------------------------------- end to end


def test_tiny_cascade_trained_end_to_end() -> None:
    # Base model on the 8 bar images at 4x4, SR model 4 -> 8 with conditioning augmentation.
    # (1) The SR stage sharpens real low-resolution bars far beyond bilinear upsampling, so it
    # reads the conditioning image; (2) the full cascade's samples lie much closer to the
    # 8x8 bar images than its upsampled base samples (RMS distance to the nearest bar).
    bars = bar_images(8, 2)
    low = downsample_images(bars, 2)
    small = SMALL | {"base_channels": 16}
    torch.manual_seed(0)
    base_net = build_unet("tiny", image_size=4, **small)
    sr_net = _sr_net(8, **small)
    base = ModelDenoiser(base_net, SCHEDULE)
    sr = ModelDenoiser(sr_net, SCHEDULE, parameterization="v")

    def trainer(net: nn.Module, loss, data: Tensor) -> Trainer:  # noqa: ANN001
        return Trainer(
            net, lr=5e-3, batch_size=64, warmup_steps=10,
            batch_fn=lambda step, g: data[torch.randint(len(data), (64,), generator=g)],
            loss_fn=lambda x, g: (loss(x, g).loss, {}),
        )  # fmt: skip

    tb = trainer(base_net, lambda x, g: diffusion_loss(base, x, generator=g), low)
    ts = trainer(sr_net, lambda x, g: sr_loss(sr, x, max_aug_level=200.0, generator=g), bars)
    for _ in range(120):
        tb.train_step()
        ts.train_step()

    clip = {"threshold": "clip"}
    sr_stage = SRStage(sr, SCHEDULE, steps=20, aug_level=20.0, options=clip)
    g = torch.Generator().manual_seed(1)
    y, x = low.repeat(4, 1, 1, 1), bars.repeat(4, 1, 1, 1)
    sr_mse = float((super_resolve(sr_stage, y, generator=g) - x).square().mean())
    assert sr_mse < 0.3 * float((upsample_images(y, 2) - x).square().mean())

    images = cascade_sample(
        Stage(base, SCHEDULE, steps=20, options=clip), sr_stage, (128, 1, 4, 4), generator=g
    )
    final = nearest_distance(images[1], bars).mean()
    upsampled = nearest_distance(upsample_images(images[0], 2), bars).mean()
    assert final < 0.7 * upsampled
