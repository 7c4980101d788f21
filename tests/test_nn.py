"""Tests of the denoising networks: embeddings, attention, residual blocks, U-Net, MLP."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from difflab.nn.layers import (
    AttentionBlock,
    ClassEmbedding,
    GaussianFourierFeatures,
    TimeEmbedding,
    drop_class_labels,
    sinusoidal_embedding,
    split_cond,
    upsample_nearest2x,
)
from difflab.nn.mlp import TimeMLP
from difflab.nn.unet import UNET_PRESETS, BasicUNet, ResBlock, UNetConfig, build_unet
from helpers import randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- sinusoidal time embedding


def test_sinusoidal_frequencies_are_geometric_from_1_to_1_over_max_period() -> None:
    # For small t, sin(w t) = w t up to O(t^3): read the frequencies off the embedding.
    dim, max_period, t = 64, 10000.0, 1e-4
    emb = sinusoidal_embedding(torch.tensor([t], dtype=torch.float64), dim, max_period)[0]
    w = emb[: dim // 2].double() / t
    expected = max_period ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2 - 1))
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(emb[dim // 2 :].double(), torch.ones(dim // 2, dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(
    t=st.floats(-1000, 1000, allow_nan=False),
    s=st.floats(-3, 3, allow_nan=False),
    dim=st.integers(2, 64),
)
def test_sinusoidal_shift_is_a_rotation(t: float, s: float, dim: int) -> None:
    # Angle addition: (sin w(t+s), cos w(t+s)) = R(w s) (sin w t, cos w t); also ||emb||^2 = h.
    half = dim // 2
    e_t, e_ts = sinusoidal_embedding(torch.tensor([t, t + s], dtype=torch.float64), dim)
    w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    sin_t, cos_t = e_t[:half].double(), e_t[half : 2 * half].double()
    rot_sin = sin_t * torch.cos(w * s) + cos_t * torch.sin(w * s)
    rot_cos = cos_t * torch.cos(w * s) - sin_t * torch.sin(w * s)
    atol = 1e-3 * (1 + abs(t) * 1e-3)  # float32 angles: error grows with |t|
    torch.testing.assert_close(e_ts[:half].double(), rot_sin, atol=atol, rtol=0)
    torch.testing.assert_close(e_ts[half : 2 * half].double(), rot_cos, atol=atol, rtol=0)
    assert abs(float(e_t.double().square().sum()) - half) < 1e-4
    if dim % 2:
        assert e_t[-1] == 0


def test_sinusoidal_distinct_times_give_distinct_embeddings() -> None:
    for t in (torch.arange(0, 1001, dtype=torch.float32), torch.linspace(-2.0, 1.2, 321)):
        emb = sinusoidal_embedding(t, 128)
        dist = torch.cdist(emb, emb) + 1e9 * torch.eye(len(t))
        step = float(t[1] - t[0])
        # Adjacent rows differ at least through the fastest pair: 2 |sin(w0 step / 2)|, w0 = 1.
        assert dist.min() > 0.9 * 2 * math.sin(step / 2)


def test_sinusoidal_fractional_t_interpolates_smoothly() -> None:
    t = torch.arange(0, 1000, dtype=torch.float64)
    dim = 128
    emb0, emb_half, emb1 = (sinusoidal_embedding(t + d, dim).double() for d in (0.0, 0.5, 1.0))
    w = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2 - 1))
    # Lipschitz: each (sin, cos) pair moves at speed w, so ||e(t + 1/2) - e(t)|| <= ||w|| / 2.
    lip = float(w.norm()) / 2
    assert (emb_half - emb0).norm(dim=1).max() <= lip + 1e-3
    # Midpoint vs linear interpolation: |f(m) - (f(a) + f(b)) / 2| <= max|f''| h^2 / 8 = w^2 / 8.
    bound = torch.cat([w, w]).square() / 8
    assert ((emb_half - (emb0 + emb1) / 2).abs() <= bound + 1e-5).all()


def test_sinusoidal_negative_t_is_odd_sin_even_cos() -> None:
    t = torch.linspace(0.1, 3.0, 7)
    e_pos, e_neg = sinusoidal_embedding(t, 16), sinusoidal_embedding(-t, 16)
    torch.testing.assert_close(e_neg[:, :8], -e_pos[:, :8])
    torch.testing.assert_close(e_neg[:, 8:], e_pos[:, 8:])


def test_sinusoidal_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        sinusoidal_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(torch.zeros(2), 1)


# ---------------------------------------------------------------- Fourier features, heads


def test_fourier_features_norm_scale_and_seed() -> None:
    scale = 16.0
    ff = GaussianFourierFeatures(4096, scale, generator=torch.Generator().manual_seed(0))
    # W ~ N(0, scale^2): sample std of 2048 draws within ~3 standard errors (se = 1.6%).
    assert abs(float(ff.W.std()) / scale - 1) < 0.05
    emb = ff(torch.tensor([-1.3, 0.0, 0.7]))
    torch.testing.assert_close(emb.square().sum(dim=1), torch.full((3,), 2048.0))
    ff2 = GaussianFourierFeatures(4096, scale, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ff.W, ff2.W)
    assert "W" in ff.state_dict() and not any(True for _ in ff.parameters())


def test_time_embedding_kinds_and_validation() -> None:
    t = torch.tensor([0.0, 10.5, 999.0])
    for kind in ("sinusoidal", "fourier"):
        assert TimeEmbedding(16, 32, kind=kind)(t).shape == (3, 32)
    with pytest.raises(ValueError, match="sinusoidal, fourier"):
        TimeEmbedding(16, 32, kind="learned")  # type: ignore[arg-type]


# ---------------------------------------------------------------- class embedding, cond


def test_class_embedding_null_index() -> None:
    emb = ClassEmbedding(10, 8)
    assert emb.null_index == 10
    null = emb.null_labels(3)
    assert null.dtype == torch.long and null.tolist() == [10, 10, 10]
    torch.testing.assert_close(emb(null), emb.table.weight[10].expand(3, 8))
    assert emb(torch.arange(11)).shape == (11, 8)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        emb(torch.tensor([11]))
    with pytest.raises(ValueError, match="int64"):
        emb(torch.tensor([1.0]))


def test_drop_class_labels() -> None:
    labels = torch.arange(10).repeat(2000)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(drop_class_labels(labels, 0.0, 10, generator=gen), labels)
    assert (drop_class_labels(labels, 1.0, 10, generator=gen) == 10).all()
    dropped = drop_class_labels(labels, 0.3, 10, generator=gen)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    frac, se = float((~kept).float().mean()), math.sqrt(0.3 * 0.7 / len(labels))
    assert abs(frac - 0.3) < 4 * se
    with pytest.raises(ValueError, match="probability"):
        drop_class_labels(labels, 1.5, 10)


def test_split_cond() -> None:
    y, img = torch.tensor([1, 2]), torch.zeros(2, 1, 4, 4)
    assert split_cond(None) == (None, None)
    assert split_cond(y)[0] is y
    assert split_cond({"class": y, "image": img}) == (y, img)
    with pytest.raises(ValueError, match="class, image"):
        split_cond({"label": y})


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_matches_naive_softmax(num_heads: int) -> None:
    torch.manual_seed(0)
    c, h, w = 16, 5, 3
    block = randomise(AttentionBlock(c, num_heads=num_heads, norm_groups=4), seed=num_heads)
    x = torch.randn(2, c, h, w)
    qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, HW)
    q, k, v = qkv.chunk(3, dim=1)
    d = c // num_heads
    q, k, v = (z.reshape(2, num_heads, d, h * w) for z in (q, k, v))
    weights = torch.softmax(torch.einsum("bndi,bndj->bnij", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bnij,bndj->bndi", weights, v).reshape(2, c, h, w)
    torch.testing.assert_close(block(x), x + block.proj(out), atol=1e-5, rtol=1e-5)


def test_fresh_attention_is_identity_and_checks_heads() -> None:
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(AttentionBlock(8, num_heads=2, norm_groups=4)(x), x)
    with pytest.raises(ValueError, match="num_heads"):
        AttentionBlock(8, num_heads=3, norm_groups=4)
    with pytest.raises(ValueError, match="norm_groups"):
        AttentionBlock(8, num_heads=1, norm_groups=3)


# ---------------------------------------------------------------- residual blocks


@pytest.mark.parametrize("scale_shift", [True, False])
def test_fresh_resblock_is_identity(scale_shift: bool) -> None:
    x, emb = torch.randn(3, 8, 6, 6), torch.randn(3, 32)
    block = ResBlock(8, 8, 32, dropout=0.0, use_scale_shift_norm=scale_shift, norm_groups=4)
    torch.testing.assert_close(block(x, emb), x)
    wide = ResBlock(8, 16, 32, use_scale_shift_norm=scale_shift, norm_groups=4)
    torch.testing.assert_close(wide(x, emb), wide.skip(x))
    randomise(block)  # a trained block is not the identity and depends on emb
    assert not torch.allclose(block(x, emb), x, atol=1e-3)
    assert not torch.allclose(block(x, emb), block(x, emb + 1), atol=1e-3)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_with_random_weights_follows_its_formula(scale_shift: bool) -> None:
    """[Ho 2020, App. B; Nichol & Dhariwal 2021, use_scale_shift_norm], written here with
    functional ops: h = conv1(SiLU(GN1(x))); scale-shift: GN2(h) * (1 + scale) + shift with
    (scale, shift) = W SiLU(emb); additive: GN2(h + W SiLU(emb)); out = skip(x) +
    conv2(SiLU(.)). A fresh block hides the `1 +` (conv2 is zero), so every weight, the
    GroupNorm affines included, is random here. Tolerance: float64, same operations."""
    gen = torch.Generator().manual_seed(4)
    x, emb = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 16, generator=gen)
    x, emb = x.double(), emb.double()
    block = randomise(ResBlock(4, 6, 16, use_scale_shift_norm=scale_shift, norm_groups=2), 1, 0.5)
    block = block.double()
    p = dict(block.named_parameters())
    h = F.conv2d(
        F.silu(F.group_norm(x, 2, p["norm1.weight"], p["norm1.bias"], eps=1e-6)),
        p["conv1.weight"],
        p["conv1.bias"],
        padding=1,
    )
    e = F.linear(F.silu(emb), p["emb_proj.weight"], p["emb_proj.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e[:, :6], e[:, 6:]
        gn = F.group_norm(h, 2, p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = gn * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 2, p["norm2.weight"], p["norm2.bias"], eps=1e-6)
    h = F.conv2d(F.silu(h), p["conv2.weight"], p["conv2.bias"], padding=1)
    expected = F.conv2d(x, p["skip.weight"], p["skip.bias"]) + h
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-12, atol=1e-12)


def test_fresh_networks_output_zero() -> None:
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])
    assert build_unet("tiny")(x, t).abs().max() == 0
    h = torch.randn(4, 32)
    mlp = TimeMLP(dim=2, hidden=32, depth=2)
    emb = mlp.time_embed(torch.zeros(4))
    for block in mlp.blocks:  # residual MLP blocks start as the identity too
        torch.testing.assert_close(block(h, emb), h)


# ---------------------------------------------------------------- U-Net


def test_ddpm_cifar10_parameter_count_matches_paper() -> None:
    with torch.device("meta"):
        model = build_unet("ddpm-cifar10")
    assert model.config.image_size == 32 and model.config.in_channels == 3
    assert abs(_n_params(model) - 35.7e6) < 0.2e6  # [Ho 2020, Sec. 4]: 35.7M parameters


def _tiny(**overrides) -> nn.Module:
    model = randomise(build_unet("tiny", **overrides), std=0.1)
    return model.eval()


def test_unet_output_shapes_all_conditioning_modes() -> None:
    b, t = 3, torch.tensor([0.0, 12.5, 999.9])
    x = torch.randn(b, 1, 16, 16)
    labels, image = torch.tensor([0, 4, 9]), torch.randn(b, 2, 16, 16)
    assert _tiny()(x, t).shape == (b, 1, 16, 16)
    assert _tiny(out_channels=2)(x, t).shape == (b, 2, 16, 16)
    assert _tiny(in_channels=3)(torch.randn(b, 3, 8, 8), t).shape == (b, 3, 8, 8)
    assert _tiny(num_classes=10)(x, t, labels).shape == (b, 1, 16, 16)
    assert _tiny(num_classes=10)(x, t, {"class": labels}).shape == (b, 1, 16, 16)
    assert _tiny(cond_channels=2)(x, t, {"image": image}).shape == (b, 1, 16, 16)
    both = _tiny(num_classes=10, cond_channels=2, out_channels=2)
    assert both(x, t, {"class": labels, "image": image}).shape == (b, 2, 16, 16)
    edm_t = torch.tensor([-2.0, 0.1, 1.2])  # c_noise = ln(sigma) / 4
    assert _tiny(time_embedding="fourier")(x, edm_t).shape == (b, 1, 16, 16)
    # 28 = 7 * 2^2 works with three levels (28 -> 14 -> 7).
    mnist = build_unet("mnist-cpu", num_classes=10)
    assert mnist(torch.randn(2, 1, 28, 28), t[:2], labels[:2]).shape == (2, 1, 28, 28)


def test_unet_conditioning_is_used_and_null_class_is_default() -> None:
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 500.0])
    model = _tiny(num_classes=3, cond_channels=1)
    img = torch.randn(2, 1, 16, 16)
    out = model(x, t, {"class": torch.tensor([0, 1]), "image": img})
    assert not torch.allclose(out, model(x, t, {"class": torch.tensor([2, 2]), "image": img}))
    assert not torch.allclose(out, model(x, t, {"class": torch.tensor([0, 1]), "image": -img}))
    assert not torch.allclose(out, model(x, t + 100, {"class": torch.tensor([0, 1]), "image": img}))
    cls_only = _tiny(num_classes=3)
    null = torch.full((2,), 3)
    torch.testing.assert_close(cls_only(x, t), cls_only(x, t, null))


def test_unet_errors() -> None:
    x, t = torch.randn(2, 1, 16, 16), torch.zeros(2)
    with pytest.raises(ValueError, match="divisible"):
        build_unet("mnist-cpu", image_size=30)
    with pytest.raises(ValueError, match="divisible"):
        build_unet("tiny")(torch.randn(2, 1, 15, 15), t)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        build_unet("nope")
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        build_unet("tiny", channels=3)
    with pytest.raises(ValueError, match="match no level"):
        build_unet("tiny", attention_resolutions=(5,))
    with pytest.raises(ValueError, match="num_classes=0"):
        build_unet("tiny")(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cond_channels=0"):
        build_unet("tiny")(x, t, {"image": x})
    with pytest.raises(ValueError, match=r"cond\['image'\]"):
        build_unet("tiny", cond_channels=1)(x, t)
    with pytest.raises(ValueError, match="t must have shape"):
        build_unet("tiny")(x, torch.zeros(3))
    with pytest.raises(ValueError, match="x must have shape"):
        build_unet("tiny")(torch.randn(2, 3, 16, 16), t)


def test_patch_size_is_a_fold_around_the_same_network() -> None:
    """patch_size=p equals the p=1 network on the p x p-folded image with the same weights."""
    torch.manual_seed(0)
    cfg = dict(image_size=16, base_channels=8, channel_mult=(1, 2), norm_groups=4, dropout=0.0)
    folded = build_unet("tiny", in_channels=1, patch_size=2, **cfg)
    inner = build_unet(
        "tiny", in_channels=4, image_size=8, **{k: v for k, v in cfg.items() if k != "image_size"}
    )
    for p in folded.parameters():  # the output conv starts at zero: make it non-trivial
        nn.init.normal_(p, std=0.2)
    inner.load_state_dict(folded.state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 10.0, 500.0])
    expected = F.pixel_shuffle(inner(F.pixel_unshuffle(x, 2), t), 2)
    torch.testing.assert_close(folded(x, t), expected)
    assert folded(x, t).shape == x.shape
    # attention resolutions refer to the folded feature maps (16 / 2 = 8 at level 0)
    build_unet("tiny", patch_size=2, image_size=16, attention_resolutions=(8, 4))
    with pytest.raises(ValueError, match="divisible"):
        build_unet("tiny", patch_size=3, image_size=16)
    with pytest.raises(ValueError, match="divisible"):
        folded(torch.randn(1, 1, 14, 14), torch.zeros(1))
    with pytest.raises(ValueError, match="patch_size"):
        build_unet("tiny", patch_size=0)


def test_presets_are_configs_and_tiny_is_small() -> None:
    assert set(UNET_PRESETS) >= {"ddpm-cifar10", "mnist-cpu", "tiny"}
    assert all(isinstance(c, UNetConfig) for c in UNET_PRESETS.values())
    assert _n_params(build_unet("tiny")) < 20_000
    assert build_unet(UNET_PRESETS["tiny"], dropout=0.1).config.dropout == 0.1
    for cfg in UNET_PRESETS.values():  # JSON round trip (lists back to tuples)
        assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def _fit(model: nn.Module, make_batch, steps: int, lr: float) -> tuple[float, float]:
    """Adam on a regression target; returns (initial loss, final loss) on a fixed test batch."""
    gen = torch.Generator().manual_seed(1)
    x_test, t_test, y_test = make_batch(gen)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float((model(x_test, t_test) - y_test).square().mean())

    before = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, t, y = make_batch(gen)
        loss = (model(x, t) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, held_out_loss()


def test_tiny_unet_learns_a_time_dependent_regression() -> None:
    torch.manual_seed(0)

    def batch(gen: torch.Generator):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        t = torch.rand(16, generator=gen) * 1000
        y = x * torch.cos(t / 1000 * math.pi)[:, None, None, None]
        return x, t, y

    before, after = _fit(build_unet("tiny"), batch, steps=80, lr=1e-2)
    # E[cos(pi t / 1000)] = 0, so the best predictor that ignores t is 0, with loss E[y^2] = 1/2
    # (= before, as a fresh U-Net outputs 0): going well below it requires using x and t.
    assert after < 0.6 * before


def test_time_mlp_learns_a_time_dependent_regression() -> None:
    torch.manual_seed(0)

    def batch(gen: torch.Generator):
        x = torch.randn(256, 2, generator=gen)
        t = torch.rand(256, generator=gen) * 1000
        y = torch.sin(2 * x) * torch.cos(t / 1000 * math.pi)[:, None]
        return x, t, y

    before, after = _fit(TimeMLP(dim=2, hidden=64, depth=2), batch, steps=150, lr=3e-3)
    # The best predictor that ignores t is 0, with loss E[y^2] = E[sin^2 2x] E[cos^2] =
    # (1 - E[cos 4x]) / 4 = (1 - exp(-8)) / 4 for x ~ N(0, 1).
    blind = (1 - math.exp(-8)) / 4
    assert before > 0.8 * blind and after < 0.2 * blind


# ---------------------------------------------------------------- TimeMLP


def test_time_mlp_shapes_conditioning_and_size() -> None:
    x, t = torch.randn(5, 2), torch.rand(5) * 1000
    assert TimeMLP()(x, t).shape == (5, 2)
    assert TimeMLP(out_dim=4)(x, t).shape == (5, 4)
    assert TimeMLP(dim=3)(torch.randn(5, 3), t).shape == (5, 3)
    assert TimeMLP(time_embedding="fourier")(x, t / 1000).shape == (5, 2)
    model = randomise(TimeMLP(num_classes=4), std=0.1)
    y = torch.tensor([0, 1, 2, 3, 0])
    assert model(x, t, y).shape == (5, 2) and model(x, t, {"class": y}).shape == (5, 2)
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((5,), 4)))
    assert not torch.allclose(model(x, t, y), model(x, t))
    assert _n_params(TimeMLP()) < 300_000  # default size: fast on CPU
    with pytest.raises(ValueError, match="num_classes=0"):
        TimeMLP()(x, t, y)
    with pytest.raises(ValueError, match="image"):
        TimeMLP()(x, t, {"image": torch.zeros(5, 1, 2, 2)})
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        TimeMLP()(torch.randn(5, 3), t)


# ---------------------------------------------------------------- BasicUNet


def test_basic_unet_ignores_t() -> None:
    model = BasicUNet(in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.zeros(2))
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(model(x, torch.full((2,), 999.0)), out)
    rgb = BasicUNet(in_channels=3, out_channels=6)
    assert rgb(torch.randn(1, 3, 8, 8), torch.zeros(1)).shape == (1, 6, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.zeros(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 30, 30), torch.zeros(1))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 5),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels_last=st.booleans(),
)
def test_upsample_nearest2x_equals_interpolate(b, c, h, w, channels_last) -> None:
    # oracle: torch's nearest interpolation; a transposed H/W or a 2x1 block would differ
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(upsample_nearest2x(x), expected)
