"""Tests of the KL autoencoder (LDM first stage): the posterior, shapes, the loss and training."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.data.shapes import gaussian_blobs
from difflab.nn.autoencoder import (
    AUTOENCODER_PRESETS,
    DiagonalGaussian,
    autoencoder_loss,
    build_autoencoder,
    psnr,
)
from difflab.train import Trainer
from helpers import randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    return gaussian_blobs(n, size=8, generator=generator)


def _posterior(seed: int = 0, shape: tuple[int, ...] = (3, 2, 4, 4)) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64) - 1.0
    return DiagonalGaussian(mean, logvar)


# ---------------------------------------------------------------- the posterior


def test_kl_matches_closed_form() -> None:
    # KL(N(mu, s^2) || N(0, 1)) = 1/2 (mu^2 + s^2 - 1 - log s^2) per dimension, summed.
    # A missing 1/2, a flipped log-variance sign or std in place of variance fail.
    q = _posterior()
    var = q.logvar.exp()
    expected = 0.5 * (q.mean**2 + var - 1 - q.logvar).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), expected, rtol=1e-12, atol=1e-12)
    assert q.kl().shape == (3,)


def test_kl_matches_monte_carlo() -> None:
    # KL = E_q[log q(z) - log p(z)], with the log-densities from torch.distributions (an
    # independent oracle). Tolerance: 5 standard errors of the mean of n draws.
    q = _posterior(seed=1, shape=(1, 2, 2, 2))
    n = 100_000
    big = DiagonalGaussian(q.mean.expand(n, -1, -1, -1), q.logvar.expand(n, -1, -1, -1))
    z = big.sample(torch.Generator().manual_seed(2))
    log_q = torch.distributions.Normal(q.mean, q.std).log_prob(z).flatten(1).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    diff = log_q - log_p
    stderr = float(diff.std()) / math.sqrt(n)
    assert abs(float(diff.mean()) - float(q.kl()[0])) < 5 * stderr


def test_sample_moments_and_reparameterisation() -> None:
    # z = mean + exp(logvar / 2) eps: moments of many draws, and the gradients dz/dmean = 1,
    # dz/dlogvar = (z - mean) / 2 of the reparameterised sample (a detached sample has none).
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(0.25)]], dtype=torch.float64)
    n = 50_000
    z = DiagonalGaussian(mean.expand(n, -1), logvar.expand(n, -1)).sample(g)
    std = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert ((z.mean(0) - mean[0]).abs() < 5 * std / math.sqrt(n)).all()
    assert ((z.std(0) - std).abs() < 5 * std / math.sqrt(2 * n)).all()

    m = mean.clone().requires_grad_(True)
    lv = logvar.clone().requires_grad_(True)
    zz = DiagonalGaussian(m, lv).sample(torch.Generator().manual_seed(3))
    zz.sum().backward()
    torch.testing.assert_close(m.grad, torch.ones_like(mean))
    torch.testing.assert_close(lv.grad, (zz.detach() - mean) / 2)


def test_sample_is_reproducible_and_mode_is_mean() -> None:
    q = _posterior()
    a = q.sample(torch.Generator().manual_seed(5))
    b = q.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(6)))
    assert q.mode() is q.mean


def test_posterior_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- shapes and configs


@pytest.mark.parametrize(("channel_mult", "f"), [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)])
def test_encode_decode_shapes(channel_mult: tuple[int, ...], f: int) -> None:
    ae = build_autoencoder("tiny", channel_mult=channel_mult, latent_channels=3)
    assert ae.downsample_factor == f
    x = torch.randn(2, 1, 8, 8)
    post = ae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 3, 8 // f, 8 // f)
    assert ae.latent_shape() == (3, 8 // f, 8 // f)
    assert ae.latent_shape((1, 16, 24)) == (3, 16 // f, 24 // f)
    assert ae.decode(post.sample(torch.Generator().manual_seed(0))).shape == x.shape
    recon, posterior = ae(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.mean.shape == post.mean.shape


def test_mnist_presets_latent_shapes() -> None:
    assert AUTOENCODER_PRESETS["mnist-f2c4"].latent_shape == (4, 14, 14)
    assert AUTOENCODER_PRESETS["mnist-f4c4"].latent_shape == (4, 7, 7)
    ae = build_autoencoder("mnist-f2c4")
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 1, 28, 28)).mode()
        assert z.shape == (1, 4, 14, 14)
        assert ae.decode(z).shape == (1, 1, 28, 28)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": 6, "channel_mult": (1, 2, 2)}, "not divisible by the factor f = 4"),
        ({"norm_groups": 3}, "divisible by norm_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"channel_mult": ()}, "non-empty"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"colour": 3}, "unknown AutoencoderConfig fields"),
    ],
)
def test_invalid_configs_raise_one_line_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_autoencoder("tiny", **overrides)


def test_bad_inputs_raise_one_line_errors() -> None:
    ae = build_autoencoder("tiny")
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        build_autoencoder("mnist-f8")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        ae.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by the factor f = 2"):
        ae.encode(torch.zeros(2, 1, 7, 8))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 2, h, w\)"):
        ae.decode(torch.zeros(2, 4, 4, 4))
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="choose one of: l1, l2"):
        autoencoder_loss(ae, x, rec_loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_weight"):
        autoencoder_loss(ae, x, kl_weight=-1.0)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("rec_loss", ["l1", "l2"])
def test_loss_is_ldm_objective_per_pixel(rec_loss: str) -> None:
    # LDM: sum over pixels of |x - D(z)|^p + w KL, z the reparameterised sample; here / (C H W).
    # Decoding the mean instead of the sample, a KL summed over the batch or an unweighted KL
    # would change the value.
    ae = randomise(build_autoencoder("tiny"), std=0.1)
    x = blobs(4, torch.Generator().manual_seed(0))
    w = 0.3  # large, so the KL term is visible
    loss, logs = autoencoder_loss(
        ae, x, kl_weight=w, rec_loss=rec_loss, generator=torch.Generator().manual_seed(7)
    )
    post = ae.encode(x)
    z = post.mean + post.std * torch.randn(
        post.mean.shape, generator=torch.Generator().manual_seed(7)
    )
    err = ae.decode(z) - x
    rec = (err.abs() if rec_loss == "l1" else err**2).sum(dim=(1, 2, 3))
    kl = 0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar).sum(dim=(1, 2, 3))
    expected = ((rec + w * kl) / 64).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["kl"], kl.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["mse"], (err**2).mean().detach(), rtol=1e-5, atol=1e-6)
    assert all(not v.requires_grad for v in logs.values())


def test_psnr_closed_form() -> None:
    # A constant error of 0.1 on [-1, 1] images: 10 log10(2^2 / 0.01) = 26.02 dB.
    x = torch.zeros(2, 1, 4, 4)
    expected = torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64)
    torch.testing.assert_close(psnr(x, x + 0.1), expected)
    torch.testing.assert_close(psnr(x, x + 0.1, data_range=1.0), expected - 10 * math.log10(4))


# ---------------------------------------------------------------- training


def test_tiny_autoencoder_learns_to_reconstruct() -> None:
    # The trainer and EMA of the diffusion models train the autoencoder too. After 100 steps
    # the held-out reconstruction error of the posterior mean is far below the pixel variance
    # of the data (about 0.2): a broken decoder path, a KL weight that swamps the
    # reconstruction or a sign error in the loss stays at or above the variance.
    torch.manual_seed(0)
    ae = build_autoencoder("tiny")
    trainer = Trainer(
        ae,
        batch_fn=lambda step, g: blobs(32, g),
        loss_fn=lambda x, g: autoencoder_loss(ae, x, rec_loss="l2", generator=g),
        lr=5e-3,
        batch_size=32,
        warmup_steps=10,
    )
    for _ in range(100):
        logs = trainer.train_step()
    assert torch.isfinite(logs["loss"])
    x = blobs(256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        mse = float((ae.decode(ae.encode(x).mode()) - x).square().mean())
    assert mse < 0.05 * float(x.var())


def test_every_run_kind_reports_the_mean_of_per_image_psnrs() -> None:
    """One PSNR for every kind of run (docs/METRICS.md): per image, then averaged. Two images
    with MSE 0.01 and 0.04 give mean(10 log10(4 / mse_i)) = 23.01 dB; pooling the MSE first
    (10 log10(4 / 0.025) = 22.04 dB) is the other definition, which this rules out."""
    from difflab.app.report import _psnr

    ref = torch.zeros(2, 1, 4, 4)
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.2)])
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert _psnr(x, ref) == pytest.approx(expected, rel=1e-7)  # float32 pixels
    assert _psnr(x + 5.0, ref + 1.0) == pytest.approx(
        _psnr(torch.ones_like(x), ref + 1.0)
    )  # clamped
    assert math.isfinite(_psnr(ref, ref))  # a perfect image: MSE floored, no infinity
