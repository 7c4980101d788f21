"""Tests of latent diffusion: the latent scale factor, the latent helpers, and a trained model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from difflab.data.shapes import bar_images, gaussian_blobs, nearest_distance, sample_bars
from difflab.latent import (
    decode_latents,
    encode_to_latents,
    frozen_autoencoder,
    latent_diffusion_loss,
    latent_sample,
    latent_scale_factor,
)
from difflab.nn.autoencoder import (
    AUTOENCODER_PRESETS,
    DiagonalGaussian,
    autoencoder_loss,
    build_autoencoder,
)
from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser
from difflab.safe_io import CheckpointError
from difflab.schedules import DiscreteSchedule
from difflab.train import Trainer
from helpers import randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    return randomise(module, seed, std)


def blobs(n: int, generator: torch.Generator) -> Tensor:
    return gaussian_blobs(n, size=8, generator=generator)


class AffineEncoder(nn.Module):
    """A stand-in autoencoder whose latent is exactly a * x + b (posterior variance ~ 0)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.a * x + self.b, torch.full_like(x, -30.0))


# ---------------------------------------------------------------- the scale factor


def test_scale_factor_is_one_over_pooled_std() -> None:
    # Latents 3 x + 1 over three batches of unequal size: the scale is 1 / std of all latent
    # entries pooled, exactly. Averaging per-batch stds, forgetting to subtract the mean
    # (sqrt(9 + 1) instead of 3) or taking std per channel would differ.
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 2, 4, 4, generator=g) for n in (5, 17, 3)]
    pooled = torch.cat(batches).double()
    scale = latent_scale_factor(AffineEncoder(3.0, 1.0), batches)  # type: ignore[arg-type]
    assert scale == pytest.approx(1 / float((3 * pooled + 1).std()), rel=1e-9)


def test_scale_factor_gives_unit_variance_latents_on_held_out_data() -> None:
    # Computed on 256 blob images, the scale makes the latents of 512 other images unit
    # variance. The std of n roughly independent images' latents has a relative standard
    # error of about 1 / sqrt(2 n) = 0.03 for n = 512 (less with 32 entries per image), so
    # 0.15 is 5 standard errors.
    ae = _randomise(build_autoencoder("tiny"))
    fit = [blobs(128, torch.Generator().manual_seed(i)) for i in range(2)]
    scale = latent_scale_factor(ae, fit)
    z = encode_to_latents(ae, blobs(512, torch.Generator().manual_seed(9)), scale)
    assert abs(float(z.std()) - 1) < 0.15
    assert abs(scale - 1) > 0.2  # the test is not trivial: the raw latents are not unit variance


def test_scale_factor_rejects_empty_or_constant_latents() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        latent_scale_factor(build_autoencoder("tiny"), [])
    with pytest.raises(ValueError, match="zero variance"):
        latent_scale_factor(AffineEncoder(0.0, 1.0), [torch.randn(4, 1, 4, 4)])  # type: ignore[arg-type]


# ---------------------------------------------------------------- loading a trained autoencoder


def test_frozen_autoencoder_round_trips_config_json_and_weights() -> None:
    ae = _randomise(build_autoencoder("tiny", latent_channels=3))
    config = json.loads(json.dumps(dataclasses.asdict(ae.config)))  # as stored in config.json
    frozen = frozen_autoencoder(config, ae.state_dict(), source="runs/ae")
    assert frozen.config == ae.config and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    x = blobs(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(frozen.encode(x).mean, ae.encode(x).mean.detach())


def test_frozen_autoencoder_errors_name_the_source() -> None:
    weights = build_autoencoder("tiny").state_dict()
    with pytest.raises(CheckpointError, match=r"runs/ae: .*has shape"):
        wider = dataclasses.asdict(AUTOENCODER_PRESETS["tiny"]) | {"latent_channels": 3}
        frozen_autoencoder(wider, weights, source="runs/ae")
    with pytest.raises(CheckpointError, match=r"runs/ae: .*missing"):
        frozen_autoencoder(AUTOENCODER_PRESETS["tiny"], {}, source="runs/ae")
    with pytest.raises(ValueError, match="runs/ae: unknown autoencoder config fields"):
        frozen_autoencoder({"depth": 3}, weights, source="runs/ae")


# ---------------------------------------------------------------- encode / decode helpers


def test_encode_decode_latents_scale_and_unscale() -> None:
    # encode multiplies the posterior mean by the scale, decode divides it back out: a scale
    # applied twice or not undone changes the decoded image.
    ae = _randomise(build_autoencoder("tiny"))
    x = blobs(4, torch.Generator().manual_seed(0))
    scale = 0.37
    z = encode_to_latents(ae, x, scale)
    torch.testing.assert_close(z, scale * ae.encode(x).mean.detach())
    assert not z.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(ae, z, scale), ae.decode(ae.encode(x).mean))
    a = encode_to_latents(ae, x, scale, torch.Generator().manual_seed(1))
    b = encode_to_latents(ae, x, scale, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, z)  # a posterior sample, reproducible
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale factor must be a positive finite"):
            encode_to_latents(ae, x, bad)


def test_latent_diffusion_loss_is_diffusion_loss_on_scaled_latents() -> None:
    # Same generator order: the posterior sample, then the time and noise of diffusion_loss.
    ae = _randomise(build_autoencoder("tiny"))
    net = _randomise(build_unet("tiny", in_channels=2, image_size=4, attention_resolutions=()))
    schedule = DiscreteSchedule.from_name("linear", T=100)
    den = ModelDenoiser(net, schedule)
    x = blobs(6, torch.Generator().manual_seed(0))
    out = latent_diffusion_loss(den, ae, x, 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    z0 = encode_to_latents(ae, x, 0.5, g)
    ref = diffusion_loss(den, z0, generator=g)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.t, ref.t)


def test_latent_sample_decodes_and_callback_sees_images() -> None:
    ae = _randomise(build_autoencoder("tiny"))
    net = _randomise(build_unet("tiny", in_channels=2, image_size=4, attention_resolutions=()))
    schedule = DiscreteSchedule.from_name("linear", T=100)
    den = ModelDenoiser(net, schedule)
    shapes = []
    out = latent_sample(
        den, schedule, ae, 0.5, 3, generator=torch.Generator().manual_seed(0), steps=4,
        callback=lambda info: shapes.append((tuple(info["x"].shape), tuple(info["x0_hat"].shape))),
    )  # fmt: skip
    assert out.shape == (3, 1, 8, 8)
    assert shapes == [((3, 1, 8, 8), (3, 1, 8, 8))] * 4
    again = latent_sample(
        den, schedule, ae, 0.5, 3, generator=torch.Generator().manual_seed(0), steps=4
    )
    assert torch.equal(out, again)


def test_latent_presets_fit_each_other() -> None:
    # the mnist-latent run's U-Net takes the latents of the mnist-ae run's autoencoder, at full
    # latent resolution (no fold), and the half-resolution U-Net takes a cascade's 14x14 base
    from difflab.app.config import get_preset

    ae_cfg, latent_cfg = get_preset("mnist-ae").model, get_preset("mnist-latent").model
    assert ae_cfg.ae_preset == latent_cfg.ae_preset
    c, h, w = build_autoencoder(ae_cfg.ae_preset).latent_shape()
    net = build_unet(latent_cfg.preset)
    assert (net.config.in_channels, net.config.image_size, net.config.patch_size) == (c, h, 1)
    with torch.no_grad():
        assert net(torch.zeros(2, c, h, w), torch.zeros(2)).shape == (2, c, h, w)
        half = build_unet("mnist-half", in_channels=1)
        assert half(torch.zeros(2, 1, 14, 14), torch.zeros(2)).shape == (2, 1, 14, 14)


# ---------------------------------------------------------------- end to end


def test_tiny_latent_diffusion_model_beats_decoded_noise() -> None:
    # Autoencoder (8x8x1 -> 4x4x2) on the 8 bar images, then a diffusion model on its scaled
    # latents. Decoded samples must lie much closer to the data set (RMS distance to the
    # nearest bar image) than decoded N(0, I) latents: a wrong scale (decoding z * scale
    # instead of z / scale), latents not fed to the model, or a broken sampler path fail.
    bars = bar_images()

    def batch(n: int) -> Callable[[int, torch.Generator], Tensor]:
        return lambda step, g: sample_bars(n, generator=g)

    torch.manual_seed(0)
    ae = build_autoencoder("tiny")
    ae_trainer = Trainer(
        ae, batch_fn=batch(32), lr=5e-3, batch_size=32, warmup_steps=10,
        loss_fn=lambda x, g: autoencoder_loss(ae, x, generator=g),
    )  # fmt: skip
    for _ in range(80):
        ae_trainer.train_step()
    ae.eval().requires_grad_(False)
    scale = latent_scale_factor(ae, [bars])

    schedule = DiscreteSchedule.from_name("linear", T=1000)
    net = build_unet(
        "tiny", in_channels=2, image_size=4, channel_mult=(1,), attention_resolutions=(),
        base_channels=16, norm_groups=4,
    )  # fmt: skip
    den = ModelDenoiser(net, schedule)

    def loss_fn(x: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return latent_diffusion_loss(den, ae, x, scale, generator=g).loss, {}

    trainer = Trainer(net, batch_fn=batch(64), loss_fn=loss_fn, lr=5e-3, batch_size=64)
    for _ in range(200):
        trainer.train_step()

    g = torch.Generator().manual_seed(1)
    samples = latent_sample(den, schedule, ae, scale, 256, generator=g, sampler="ddim", steps=20)
    with torch.no_grad():
        noise = decode_latents(ae, torch.randn(256, 2, 4, 4, generator=g), scale)
    assert samples.shape == (256, 1, 8, 8)
    assert nearest_distance(samples, bars).mean() < 0.6 * nearest_distance(noise, bars).mean()
