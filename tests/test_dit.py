"""Tests of the diffusion transformer (DiT, U-ViT) and of network cost counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.guidance import ClassifierFreeGuidance
from difflab.nn.cost import network_cost
from difflab.nn.dit import (
    DIT_PRESETS,
    DiT,
    DiTBlock,
    DiTConfig,
    SelfAttention,
    build_dit,
    patchify,
    pos_embed_2d,
    unpatchify,
)
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule, EDMSchedule
from helpers import randomise

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_COND = dict(num_classes=3, cond_channels=2, aug_level_embedding=True, out_channels=2)


def _cond(b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "class": torch.randint(0, 4, (b,), generator=gen),  # 3 = the null label
        "image": torch.randn(b, 2, 8, 8, generator=gen),
        "aug_level": torch.rand(b, generator=gen) * 100,
    }


def _random_tiny(seed: int = 0, **overrides) -> DiT:
    return randomise(build_dit("tiny", **overrides), seed=seed, std=0.1).eval()


# ---------------------------------------------------------------- adaLN-Zero


@pytest.mark.parametrize("long_skips", [False, True])
def test_fresh_blocks_are_the_identity_and_the_network_outputs_zero(long_skips: bool) -> None:
    """adaLN-Zero [Peebles & Xie 2023, Sec. 3.2]: zero gates make each block the identity for
    any tokens and any conditioning, and the zero output layer makes the output 0. Catches a
    modulation (or output layer) left with its random initialisation, e.g. re-initialised by
    the Xavier pass after being zeroed."""
    gen = torch.Generator().manual_seed(0)
    model = build_dit("tiny", depth=3, long_skips=long_skips, **ALL_COND)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0.0, 1.0, 500.0, 999.0])
    assert torch.equal(model(x, t, _cond(4, gen)), torch.zeros(4, 2, 8, 8))
    h, c = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 32, generator=gen)
    plain = [b for b in model.blocks if b.skip_proj is None]
    assert len(plain) == (2 if long_skips else 3)
    for block in plain:
        assert torch.equal(block(h, c), h)
    # a trained block is no identity and depends on c
    block = randomise(DiTBlock(32, 2), std=0.1)
    assert not torch.allclose(block(h, c), h, atol=1e-3)
    assert not torch.allclose(block(h, c), block(h, c + 1), atol=1e-3)


@pytest.mark.parametrize("skip_in", [False, True])
def test_block_with_random_weights_follows_the_adaln_zero_formula(skip_in: bool) -> None:
    """The block written here with functional ops [Peebles & Xie 2023, Fig. 3]:
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = W SiLU(c) + b;
    x += gate_msa * Attn(LN(x) (1 + scale_msa) + shift_msa), then the same with the MLP.
    Catches swapped shift/scale or gate chunks, a missing `1 +`, a gate on the wrong branch,
    and a U-ViT skip concatenated in the other order. float64, same operations."""
    gen = torch.Generator().manual_seed(3)
    dim, heads = 16, 2
    block = randomise(DiTBlock(dim, heads, mlp_ratio=2, skip_in=skip_in), 1, 0.3).double()
    p = dict(block.named_parameters())
    x = torch.randn(2, 5, dim, generator=gen, dtype=torch.float64)
    c = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    skip = torch.randn(2, 5, dim, generator=gen, dtype=torch.float64) if skip_in else None
    h = x
    if skip_in:
        h = F.linear(torch.cat([x, skip], -1), p["skip_proj.weight"], p["skip_proj.bias"])
    m = F.linear(F.silu(c), p["modulation.weight"], p["modulation.bias"])
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        m[:, None, k * dim : (k + 1) * dim] for k in range(6)
    )
    ln = F.layer_norm(h, (dim,), eps=1e-6) * (1 + scale1) + shift1
    q, k, v = F.linear(ln, p["attn.qkv.weight"], p["attn.qkv.bias"]).chunk(3, -1)
    split = [z.reshape(2, 5, heads, dim // heads).transpose(1, 2) for z in (q, k, v)]
    w = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(dim // heads), -1)
    attn = (w @ split[2]).transpose(1, 2).reshape(2, 5, dim)
    h = h + gate1 * F.linear(attn, p["attn.proj.weight"], p["attn.proj.bias"])
    ln = F.layer_norm(h, (dim,), eps=1e-6) * (1 + scale2) + shift2
    hidden = F.gelu(F.linear(ln, p["mlp.fc1.weight"], p["mlp.fc1.bias"]), approximate="tanh")
    h = h + gate2 * F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    torch.testing.assert_close(block(x, c, skip), h, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- patches and positions


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    p=st.integers(1, 4),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
)
def test_patchify_then_unpatchify_is_the_identity(b, c, p, gh, gw) -> None:
    gen = torch.Generator().manual_seed(b * 1000 + c * 100 + p * 10 + gh)
    x = torch.randn(b, c, gh * p, gw * p, generator=gen)
    tokens = patchify(x, p)
    assert tokens.shape == (b, gh * gw, c * p * p)
    assert torch.equal(unpatchify(tokens, p, gh * p, gw * p), x)
    assert torch.equal(patchify(unpatchify(tokens, p, gh * p, gw * p), p), tokens)
    # the layout the position embeddings and the diffusers mapping rely on: token i * gw + j is
    # the patch in grid row i, column j; its values run over (channel, row, column)
    i, j = gh - 1, gw // 2
    torch.testing.assert_close(
        tokens[:, i * gw + j], x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(b, -1)
    )


@pytest.mark.parametrize(("dim", "gh", "gw"), [(8, 3, 5), (16, 4, 4), (12, 2, 1)])
def test_pos_embed_equals_its_closed_form(dim: int, gh: int, gw: int) -> None:
    """[Peebles & Xie 2023, Sec. 3.2; MAE]: token (i, j) -> [sin(j w_k), cos(j w_k),
    sin(i w_k), cos(i w_k)], w_k = 10000^(-k / (dim/4)), written entry by entry. Catches a
    swapped row/column, sin/cos order, or the exponent's denominator dim/2 instead of dim/4."""
    emb = pos_embed_2d(dim, gh, gw)
    q = dim // 4
    expected = torch.zeros(gh * gw, dim)
    for i in range(gh):
        for j in range(gw):
            for k in range(q):
                w = 10000.0 ** (-k / q)
                expected[i * gw + j, k] = math.sin(j * w)
                expected[i * gw + j, q + k] = math.cos(j * w)
                expected[i * gw + j, 2 * q + k] = math.sin(i * w)
                expected[i * gw + j, 3 * q + k] = math.cos(i * w)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        pos_embed_2d(10, 2, 2)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_equals_hand_written_softmax(num_heads: int) -> None:
    """softmax(Q K^T / sqrt(d)) V per head [Vaswani 2017, Eq. (1)] with explicit loops over the
    batch and the heads. Catches a scale of 1/d or 1/sqrt(D), heads split across the wrong axis,
    or the softmax over the query axis."""
    gen = torch.Generator().manual_seed(num_heads)
    dim, n = 16, 7
    attn = randomise(SelfAttention(dim, num_heads), seed=num_heads, std=0.3)
    x = torch.randn(2, n, dim, generator=gen)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    d = dim // num_heads
    out = torch.zeros(2, n, dim)
    for b in range(2):
        for h in range(num_heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d)  # (n, n)
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
    torch.testing.assert_close(attn(x), attn.proj(out), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttention(16, 3)


# ---------------------------------------------------------------- conditioning


def test_output_shapes_and_conditioning_modes() -> None:
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0.0, 12.5, 999.9])
    labels = torch.tensor([0, 2, 1])
    assert _random_tiny()(x, t).shape == (3, 1, 8, 8)
    assert _random_tiny(out_channels=2)(x, t).shape == (3, 2, 8, 8)  # learned variance
    model = _random_tiny(num_classes=3)
    torch.testing.assert_close(model(x, t, labels), model(x, t, {"class": labels}))
    full = _random_tiny(**ALL_COND)
    assert full(x, t, _cond(3, gen)).shape == (3, 2, 8, 8)
    edm_t = torch.tensor([-2.0, 0.1, 1.2])  # c_noise = ln(sigma) / 4
    assert _random_tiny()(x, edm_t).shape == (3, 1, 8, 8)
    latent = build_dit("mnist-latent-dit", num_classes=10)
    assert latent(torch.randn(2, 4, 7, 7), t[:2], labels[:2]).shape == (2, 4, 7, 7)


def test_every_input_is_used_and_the_null_label_is_the_default() -> None:
    """Classifier-free guidance [Ho & Salimans 2022]: no label = label num_classes; each of
    the label, the conditioning image, the augmentation level and t changes the output."""
    gen = torch.Generator().manual_seed(1)
    model = _random_tiny(**ALL_COND)
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([5.0, 500.0])
    cond = _cond(2, gen)
    cond["class"] = torch.tensor([0, 1])
    out = model(x, t, cond)
    for key, other in (
        ("class", torch.tensor([2, 2])),
        ("image", -cond["image"]),
        ("aug_level", cond["aug_level"] + 50),
    ):
        assert not torch.allclose(out, model(x, t, {**cond, key: other}), atol=1e-4), key
    assert not torch.allclose(out, model(x, t + 100, cond), atol=1e-4)
    no_label = {k: v for k, v in cond.items() if k != "class"}
    torch.testing.assert_close(
        model(x, t, no_label), model(x, t, {**cond, "class": torch.full((2,), 3)})
    )
    plain = _random_tiny(num_classes=3)
    torch.testing.assert_close(plain(x, t), plain(x, t, torch.full((2,), 3)))


def test_errors_are_one_line_value_errors() -> None:
    model = build_dit("tiny")
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    cases = [
        (lambda: model(torch.randn(2, 1, 16, 16), t), "8x8"),
        (lambda: model(torch.randn(2, 3, 8, 8), t), r"\(B, 1, H, W\)"),
        (lambda: model(x, torch.zeros(3)), "t must have shape"),
        (lambda: model(x, t, torch.tensor([0, 1])), "num_classes=0"),
        (lambda: model(x, t, {"image": x}), "cond_channels=0"),
        (lambda: model(x, t, {"aug_level": t}), "aug_level_embedding=False"),
        (lambda: build_dit("tiny", cond_channels=1)(x, t), r"cond\['image'\]"),
        (lambda: build_dit("tiny", aug_level_embedding=True)(x, t), r"cond\['aug_level'\]"),
        (lambda: build_dit("nope"), "unknown DiT preset"),
        (lambda: build_dit("tiny", width=3), "unknown DiTConfig fields"),
        (lambda: build_dit("tiny", num_heads=3), "divisible by num_heads"),
        (lambda: build_dit("tiny", patch_size=3), "multiple of patch_size"),
        (lambda: build_dit("tiny", hidden_size=30, num_heads=1), "multiple of 4"),
        (lambda: build_dit("tiny", depth=1, long_skips=True), "depth"),
        (lambda: build_dit("tiny", dropout=1.0), "dropout"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- U-ViT


@pytest.mark.parametrize("depth", [4, 5])
def test_uvit_long_skips_pair_mirror_blocks(depth: int) -> None:
    """[Bao et al. 2023, Fig. 1]: out-block k (k = 0 first) receives concat(h, the output of
    in-block n-1-k), n = depth // 2, h the output of the block before it; an odd depth has one
    middle block without a skip. Catches skips taken first-in-first-out, from the wrong block,
    or concatenated in the other order."""
    gen = torch.Generator().manual_seed(2)
    model = _random_tiny(depth=depth, long_skips=True)
    n = depth // 2
    outputs: list[torch.Tensor] = []
    skip_inputs: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: outputs.append(out))
        if block.skip_proj is not None:
            block.skip_proj.register_forward_hook(
                lambda mod, args, out: skip_inputs.append(args[0])
            )
    assert [b.skip_proj is not None for b in model.blocks] == [False] * (depth - n) + [True] * n
    model(torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3.0, 300.0]))
    assert len(skip_inputs) == n
    for k, got in enumerate(skip_inputs):
        before = outputs[depth - n + k - 1]
        mirror = outputs[n - 1 - k]
        assert torch.equal(got, torch.cat([before, mirror], dim=-1))
    # the plain DiT has no skip layers
    assert all(b.skip_proj is None for b in build_dit("tiny", depth=depth).blocks)


# ---------------------------------------------------------------- training through the library


def test_tiny_dit_overfits_four_images_through_the_diffusion_loss() -> None:
    """The eps-prediction loss of difflab's objective on four 8x8 images falls from its
    initial value to under a third of it in 150 steps. Oracles: a fresh network outputs 0, so
    the initial loss is exactly the mean of eps^2 on the fixed evaluation draws; no network can
    beat the Bayes-optimal denoiser of the four-image data set (posterior weights over the
    images), so the trained loss must stay above that floor."""
    gen = torch.Generator().manual_seed(0)
    data = torch.sign(torch.randn(4, 1, 8, 8, generator=gen))
    schedule = DiscreteSchedule.from_name("linear", 100)
    net = build_dit("tiny")
    denoiser = ModelDenoiser(net, schedule, parameterization="eps")
    idx = torch.randint(0, 4, (256,), generator=gen)
    t_eval = torch.randint(1, 101, (256,), generator=gen).double()
    eps = torch.randn(256, 1, 8, 8, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(denoiser, data[idx], t=t_eval, noise=eps).loss.item()

    before = eval_loss()
    assert before == pytest.approx(eps.square().mean().item(), rel=1e-6)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(150):
        g = torch.Generator().manual_seed(100 + step)
        loss = diffusion_loss(denoiser, data[torch.randint(0, 4, (32,), generator=g)], generator=g)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
    after = eval_loss()

    alpha, sigma = (v.float()[:, None, None, None] for v in schedule.alpha_sigma(t_eval))
    xt = alpha * data[idx] + sigma * eps
    dist2 = (xt[:, None] - alpha[:, None] * data[None]).square().flatten(2).sum(-1)  # (256, 4)
    weights = torch.softmax(-dist2 / (2 * sigma.flatten()[:, None] ** 2), dim=1)
    x0_bayes = torch.einsum("bk,kchw->bchw", weights, data)
    floor = ((xt - alpha * x0_bayes) / sigma - eps).square().mean().item()
    assert floor < after < before / 3, (floor, after, before)


@pytest.mark.parametrize(
    ("parameterization", "learned_variance", "cond"),
    [("eps", True, "class"), ("v", False, "image"), ("x0", False, "aug"), ("edm", False, None)],
)
def test_one_training_step_for_each_process_and_conditioning(
    parameterization: str, learned_variance: bool, cond: str | None
) -> None:
    """The DiT takes the U-Net's place in every process: the loss is finite, every parameter
    that the inputs reach gets a gradient, and one AdamW step lowers nothing to NaN."""
    gen = torch.Generator().manual_seed(5)
    b = 6
    overrides = {
        "class": dict(num_classes=3),
        "image": dict(cond_channels=1),
        "aug": dict(aug_level_embedding=True),
        None: {},
    }[cond]
    net = build_dit("tiny", out_channels=2 if learned_variance else None, **overrides)
    schedule = (
        EDMSchedule() if parameterization == "edm" else DiscreteSchedule.from_name("cosine", 50)
    )
    denoiser = ModelDenoiser(
        net, schedule, parameterization=parameterization, learned_variance=learned_variance
    )
    c = {
        "class": torch.randint(0, 4, (b,), generator=gen),
        "image": {"image": torch.randn(b, 1, 8, 8, generator=gen)},
        "aug": {"aug_level": torch.rand(b, generator=gen) * 50},
        None: None,
    }[cond]
    x0 = torch.randn(b, 1, 8, 8, generator=gen).clamp(-1, 1)
    method = "lognormal" if parameterization == "edm" else "uniform"
    loss = diffusion_loss(denoiser, x0, cond=c, t_sampling=method, generator=gen).loss
    assert torch.isfinite(loss)
    loss.backward()
    # at init the zero output layer blocks the gradient of everything before it; the output
    # layer itself must get one
    assert net.final.linear.weight.grad.abs().sum() > 0
    torch.optim.AdamW(net.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_guided_sampling_drives_a_conditional_dit() -> None:
    """Classifier-free guidance [Ho & Salimans 2021, Eq. 6] around a DiT with every kind of
    conditioning: scale 0 is the null-label prediction, scale 1 the conditional one (the
    wrapper's batched 2B call splits the dict's image and augmentation level right), and a
    sampler runs end to end."""
    gen = torch.Generator().manual_seed(9)
    net = _random_tiny(seed=4, num_classes=3, cond_channels=2, aug_level_embedding=True)
    schedule = DiscreteSchedule.from_name("linear", 100)
    denoiser = ModelDenoiser(net, schedule, parameterization="eps")
    cond = _cond(2, gen)
    cond["class"] = torch.tensor([0, 2])
    xt, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([30.0, 30.0])
    null_cond = {**cond, "class": torch.full((2,), 3)}
    with torch.no_grad():
        for scale, want in ((0.0, null_cond), (1.0, cond)):
            guided = ClassifierFreeGuidance(denoiser, scale=scale, null_label=3)(xt, t, cond)
            torch.testing.assert_close(guided.eps, denoiser(xt, t, want).eps, rtol=1e-5, atol=1e-6)
        guided = ClassifierFreeGuidance(denoiser, scale=2.0, null_label=3)
        x = sample(guided, schedule, (2, 1, 8, 8), steps=4, cond=cond, generator=gen)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


# ---------------------------------------------------------------- speed paths


def test_bf16_autocast_matches_float32() -> None:
    """bf16 autocast keeps 8 mantissa bits: the output stays within a few percent of float32."""
    gen = torch.Generator().manual_seed(7)
    model = _random_tiny(seed=2, num_classes=3)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([1.0, 10.0, 100.0, 900.0])
    ref = model(x, t, torch.tensor([0, 1, 2, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 0.05, err


def test_torch_compile_captures_the_whole_forward_in_one_graph() -> None:
    """torch.compile's graph capture (the "eager" backend: no C++ compiler needed) takes the
    whole forward pass without a graph break (fullgraph=True) and gives the eager output.
    (A class-conditional model breaks the graph once, at the label range check that every
    difflab network shares.)"""
    gen = torch.Generator().manual_seed(8)
    model = _random_tiny(
        seed=3, long_skips=True, depth=3, cond_channels=1, aug_level_embedding=True
    )
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([4.0, 400.0])
    cond = {"image": torch.randn(2, 1, 8, 8, generator=gen), "aug_level": torch.rand(2)}
    torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- presets and cost


def _dit_flops(cfg: DiTConfig) -> int:
    """Forward FLOPs (2 per multiply-add) from the layer shapes: per block N (4 + 2 r) D^2 for
    qkv, projection and MLP, 2 N^2 D for Q K^T and the weighted sum of V, 6 D^2 for the
    modulation; U-ViT skip layers 2 N D^2 each; patch embedding, output layer, time MLP."""
    n, d, p2 = (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size, cfg.patch_size**2
    block = n * (4 + 2 * cfg.mlp_ratio) * d * d + 2 * n * n * d + 6 * d * d
    skips = (cfg.depth // 2 if cfg.long_skips else 0) * n * 2 * d * d
    embed = n * (cfg.in_channels + cfg.cond_channels) * p2 * d
    final = n * d * (cfg.out_channels or cfg.in_channels) * p2 + 2 * d * d
    time = cfg.time_features * d + d * d
    return 2 * (cfg.depth * block + skips + embed + final + time)


@pytest.mark.parametrize("name", ["tiny", "mnist-dit", "mnist-uvit", "mnist-latent-dit"])
def test_network_cost_counts_every_matrix_product(name: str) -> None:
    """The FLOP counter against the count from the layer shapes; catches attention left out
    (its CPU kernel is unknown to FlopCounterMode) and parameters missed."""
    cfg = DIT_PRESETS[name]
    model = build_dit(cfg)
    cost = network_cost(model, (cfg.in_channels, cfg.image_size, cfg.image_size))
    assert cost.flops == _dit_flops(cfg)
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    assert "parameters" in cost.describe() and model.training


def test_dit_s2_matches_the_papers_size_and_gflops() -> None:
    """DiT-S/2 on 32x32x4 latents, 1000 classes, learned sigma [Peebles & Xie 2023, Table 4]:
    33.0M parameters and 6.06 Gflops, which the paper counts as multiply-adds. Its reference
    code stores the fixed position table (256 x 384) as a frozen parameter, difflab as a
    buffer."""
    with torch.device("meta"):
        model = build_dit("dit-s2-32", in_channels=4, out_channels=8, num_classes=1000)
        cost = network_cost(model, (4, 32, 32))
    assert abs(cost.parameters + 256 * 384 - 33.0e6) < 0.05e6, cost.parameters
    assert abs(cost.flops / 2 - 6.06e9) < 0.03e9, cost.flops
