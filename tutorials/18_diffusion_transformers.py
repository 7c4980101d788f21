# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 18. Diffusion transformers: the DiT block and adaLN-Zero
#
# Since DiT [Peebles & Xie 2023] the large image and video diffusion models (Stable Diffusion
# 3, Flux, PixArt, Sora-style models) use a transformer where DDPM used a U-Net. The network
# still answers the same question, "what noise is in $x_t$ at level $t$?", with the same
# contract `model(x, t, cond)`, so every sampler, process and task of difflab drives it
# unchanged (`difflab train --preset mnist-dit`, or `--set model.net=dit`). What changes is
# inside:
#
# 1. **Patches as tokens.** The image $(C, H, W)$ is cut into $p \times p$ patches; each patch
#    is a token of $C p^2$ numbers, linearly embedded to width $D$: $N = HW / p^2$ tokens.
# 2. **Fixed 2-D sine-cosine positions** tell the tokens where they are.
# 3. **Transformer blocks** (self-attention, then an MLP), each conditioned on the noise level
#    (and class label) by **adaLN-Zero**: the conditioning vector $c$ sets a shift, a scale
#    and a *gate* per block, and the gates start at zero, so every block starts as the
#    identity and the network starts at output 0.
# 4. A final layer maps each token back to a patch (*unpatchify*).
#
# This tutorial takes each piece apart and checks it against its closed form, then trains a
# tiny DiT and a tiny U-Net on the same small task.

# %%
import math
import time

import torch
import torch.nn.functional as F
from _common import (
    answers_wanted,
    digit_like_images,
    is_fast,
    new_figure,
    out_path,
    pick,
    save,
    use_threads,
)

from difflab.nn.cost import network_cost
from difflab.nn.dit import DiTBlock, SelfAttention, build_dit, patchify, pos_embed_2d, unpatchify
from difflab.nn.unet import build_unet
from difflab.objectives import diffusion_loss
from difflab.parameterization import ModelDenoiser
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule

THREADS = use_threads(1)  # small matrix products: one thread is fastest; restored at the end
RESULTS: dict[str, float] = {}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# %% [markdown]
# ## 1. Patchify and unpatchify
#
# `patchify(x, p)` reshapes $(B, C, H, W)$ into $(B, HW/p^2, C p^2)$: token $i \cdot W/p + j$
# holds the patch in grid row $i$, column $j$, its values ordered (channel, row, column).
# `unpatchify` is its inverse. Both are pure reshapes, so the round trip is exact, and a
# token is literally a slice of the image.

# %%
x = torch.randn(2, 3, 8, 12, generator=seeded(0))
p = 2
tokens = patchify(x, p)
print(f"image {tuple(x.shape)} -> tokens {tuple(tokens.shape)} (N = 8 * 12 / 2^2 = 24)")
assert tokens.shape == (2, 24, 3 * p * p)
RESULTS["patchify_roundtrip_max_abs"] = float((unpatchify(tokens, p, 8, 12) - x).abs().max())
i, j = 2, 5  # grid row 2, column 5: token 2 * (12 / 2) + 5
patch = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(2, -1)
RESULTS["patch_token_max_abs"] = float((tokens[:, i * 6 + j] - patch).abs().max())
print(f"round trip error {RESULTS['patchify_roundtrip_max_abs']}; token 17 = patch (2, 5): "
      f"error {RESULTS['patch_token_max_abs']}")  # fmt: skip
assert RESULTS["patchify_roundtrip_max_abs"] == 0 and RESULTS["patch_token_max_abs"] == 0

# %% [markdown]
# ## 2. The 2-D sine-cosine position embedding
#
# Attention treats its tokens as a set; the position is added to each token. DiT uses the
# fixed 2-D form of MAE [He 2022]: with $k = 0 \dots D/4 - 1$ and
# $\omega_k = 10000^{-k / (D/4)}$, token $(i, j)$ gets
#
# $$\big[\sin(j\omega_k),\ \cos(j\omega_k),\ \sin(i\omega_k),\ \cos(i\omega_k)\big],$$
#
# the 1-D Transformer encoding [Vaswani 2017] of the column in the first half and of the row in
# the second. Because $\sin a \sin b + \cos a \cos b = \cos(a - b)$, the dot product of two
# position vectors depends only on their offset:
#
# $$\langle e_{ij}, e_{i'j'} \rangle = \sum_k \cos\big((j - j')\omega_k\big)
#   + \cos\big((i - i')\omega_k\big).$$

# %%
dim, gh, gw = 16, 5, 7
pe = pos_embed_2d(dim, gh, gw).double()  # (35, 16)
q = dim // 4
omega = [10000.0 ** (-k / q) for k in range(q)]
by_hand = torch.tensor(
    [
        [math.sin(c * w) for w in omega]
        + [math.cos(c * w) for w in omega]
        + [math.sin(r * w) for w in omega]
        + [math.cos(r * w) for w in omega]
        for r in range(gh)
        for c in range(gw)
    ],
    dtype=torch.float64,
)
RESULTS["pos_embed_closed_form_max_abs"] = float((pe - by_hand).abs().max())
rows = torch.arange(gh).repeat_interleave(gw).double()
cols = torch.arange(gw).repeat(gh).double()
w = torch.tensor(omega, dtype=torch.float64)
offset_form = (torch.cos((cols[:, None, None] - cols[None, :, None]) * w).sum(-1)
               + torch.cos((rows[:, None, None] - rows[None, :, None]) * w).sum(-1))  # fmt: skip
RESULTS["pos_embed_offset_identity_max_abs"] = float((pe @ pe.T - offset_form).abs().max())
print(f"closed form: {RESULTS['pos_embed_closed_form_max_abs']:.1e} (float32 rounding); "
      f"offset identity: {RESULTS['pos_embed_offset_identity_max_abs']:.1e}")  # fmt: skip
assert RESULTS["pos_embed_closed_form_max_abs"] < 1e-6
assert RESULTS["pos_embed_offset_identity_max_abs"] < 1e-5

fig, axes = new_figure(1, 2, (8.0, 3.2))
centre = 2 * gw + 3  # token (2, 3)
axes[0, 0].imshow(pe.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
axes[0, 0].set_title("position vectors (rows: features, columns: tokens)", fontsize=9)
axes[0, 0].set_xlabel("token i * 7 + j")
axes[0, 1].imshow((pe @ pe[centre]).reshape(gh, gw).numpy(), cmap="viridis")
axes[0, 1].set_title("similarity to token (2, 3)", fontsize=9)
save(fig, "18_position_embedding.png")

# %% [markdown]
# ## 3. Self-attention is softmax(Q K^T / sqrt(d)) V
#
# Each head projects the tokens to queries, keys and values of width $d = D / h$ and mixes the
# values with weights $\mathrm{softmax}(Q K^\top / \sqrt d)$ [Vaswani 2017, Eq. 1]. difflab
# calls `F.scaled_dot_product_attention`, which picks flash or memory-efficient kernels on a
# GPU; written out by hand, with the module's own weights, it is the same function.

# %%
torch.manual_seed(1)
attn = SelfAttention(dim=12, num_heads=3).double()
tok = torch.randn(2, 5, 12, dtype=torch.float64, generator=seeded(1))
with torch.no_grad():
    qkv = attn.qkv(tok).reshape(2, 5, 3, 3, 4)  # (B, N, {q, k, v}, heads, d)
    q_, k_, v_ = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # (B, heads, N, d)
    weights = torch.softmax(q_ @ k_.transpose(-1, -2) / math.sqrt(4), dim=-1)
    by_hand = attn.proj((weights @ v_).transpose(1, 2).reshape(2, 5, 12))
    RESULTS["attention_vs_hand_max_abs"] = float((attn(tok) - by_hand).abs().max())
print(f"attention vs the hand-written softmax: {RESULTS['attention_vs_hand_max_abs']:.1e}")
assert RESULTS["attention_vs_hand_max_abs"] < 1e-12

# %% [markdown]
# ## 4. The adaLN-Zero block starts as the identity
#
# A DiT block with conditioning $c$ (the sum of the time embedding and the label embedding)
# computes six vectors $(\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) =
# W\,\mathrm{SiLU}(c) + b$ and
#
# $$x \leftarrow x + \alpha_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + \gamma_1) +
#   \beta_1\big), \qquad
#   x \leftarrow x + \alpha_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + \gamma_2) +
#   \beta_2\big).$$
#
# The LayerNorms have no weights of their own: the noise level decides their scale and shift
# ("adaptive LayerNorm"). "Zero": $W = 0$, $b = 0$ at initialisation, so every gate $\alpha$ is
# 0 and the block returns $x$ exactly; the final layer is zero too, so the whole network
# outputs 0 (the paper's best variant, its Fig. 5). A deep stack then starts as a short path
# from input to output, and learning opens the gates. Yet the gradient is not zero: the
# modulation weights get one at once, while the attention and MLP weights, behind closed
# gates, get theirs only after the gates have moved.

# %%
torch.manual_seed(2)
block = DiTBlock(dim=16, num_heads=4)
h = torch.randn(3, 10, 16, generator=seeded(2))
c = torch.randn(3, 16, generator=seeded(3))
net = build_dit("tiny", num_classes=10)
x8 = torch.randn(4, 1, 8, 8, generator=seeded(4))
t8 = torch.tensor([1.0, 10.0, 100.0, 999.0])
with torch.no_grad():
    RESULTS["block_identity_max_abs"] = float((block(h, c) - h).abs().max())
    RESULTS["dit_output_at_init_max_abs"] = float(net(x8, t8, torch.arange(4)).abs().max())
print(f"a fresh block changes x by {RESULTS['block_identity_max_abs']}; "
      f"a fresh DiT outputs {RESULTS['dit_output_at_init_max_abs']}")  # fmt: skip
assert RESULTS["block_identity_max_abs"] == 0 and RESULTS["dit_output_at_init_max_abs"] == 0

(block(h, c) * torch.randn(3, 10, 16, generator=seeded(5))).sum().backward()
RESULTS["grad_modulation_norm"] = float(block.modulation.weight.grad.norm())
RESULTS["grad_attention_norm"] = float(block.attn.qkv.weight.grad.norm())
print(f"gradient norms at init: modulation {RESULTS['grad_modulation_norm']:.3f}, "
      f"attention {RESULTS['grad_attention_norm']}")  # fmt: skip
assert RESULTS["grad_modulation_norm"] > 0 and RESULTS["grad_attention_norm"] == 0

# a gate of one, shift and scale zero: the block is x + Attn(LN(x)) + MLP(LN(.)), by hand
with torch.no_grad():
    block.modulation.bias.zero_()
    block.modulation.bias[2 * 16 : 3 * 16] = 1.0  # alpha_1
    block.modulation.bias[5 * 16 :] = 1.0  # alpha_2
    mid = h + block.attn(F.layer_norm(h, (16,), eps=1e-6))
    expected = mid + block.mlp(F.layer_norm(mid, (16,), eps=1e-6))
    RESULTS["open_gates_vs_hand_max_abs"] = float((block(h, c) - expected).abs().max())
print(f"gates open: block vs x + Attn(LN x) + MLP(LN .): "
      f"{RESULTS['open_gates_vs_hand_max_abs']:.1e}")  # fmt: skip
assert RESULTS["open_gates_vs_hand_max_abs"] < 1e-6

# %% [markdown]
# ## 5. A tiny DiT next to a tiny U-Net
#
# Both networks denoise 16 x 16 seven-segment digits with the same DDPM schedule, loss,
# optimiser and number of steps. The transformer on 2 x 2 patches sees 64 tokens; the U-Net
# convolves the pixels. Their cost per image is counted by `difflab.nn.cost.network_cost`
# (2 FLOPs per multiply-add, attention included): `difflab presets` and `difflab train`
# show the same numbers for every network. The held-out loss is the epsilon-MSE on digits the
# networks never saw, at the same noise and timesteps for both.

# %%
size = 16
train_x, _ = digit_like_images(pick(256, 4096), size, generator=seeded(6))
test_x, _ = digit_like_images(256, size, generator=seeded(7))
schedule = DiscreteSchedule.from_name("linear", 1000)
steps, batch = pick(80, 3000), pick(16, 64)


def held_out_loss(den: ModelDenoiser) -> float:
    with torch.no_grad():
        return float(diffusion_loss(den, test_x, generator=seeded(8)).loss)


def train(net: torch.nn.Module, seed: int) -> dict:
    torch.manual_seed(seed)
    den = ModelDenoiser(net, schedule)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g, losses, start = seeded(seed), [], time.perf_counter()
    before = held_out_loss(den)
    for _ in range(steps):
        x0 = train_x[torch.randint(len(train_x), (batch,), generator=g)]
        loss = diffusion_loss(den, x0, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    cost = network_cost(net, (1, size, size))
    return {"den": den, "losses": losses, "seconds": seconds, "cost": cost,
            "before": before, "after": held_out_loss(den)}  # fmt: skip


nets = {
    "DiT": build_dit("tiny", image_size=size, hidden_size=pick(32, 96), depth=pick(2, 4)),
    "U-Net": build_unet("tiny", in_channels=1, image_size=size),
}
runs = {name: train(net, seed=9) for name, net in nets.items()}
print(f"{'network':8s} {'params':>8s} {'GFLOPs/img':>10s} {'s/step':>7s} {'held-out':>15s}")
for name, r in runs.items():
    c = r["cost"]
    print(f"{name:8s} {c.parameters / 1e6:7.3f}M {c.flops / 1e9:10.4f} "
          f"{r['seconds'] / steps:7.3f} {r['before']:.3f} -> {r['after']:.3f}")  # fmt: skip
    RESULTS[f"{name.lower().replace('-', '')}_held_out_ratio"] = r["after"] / r["before"]
    assert r["after"] < 0.7 * r["before"], (name, r["before"], r["after"])
assert abs(runs["DiT"]["before"] - 1) < 0.1  # adaLN-Zero: output 0, loss E[eps^2] = 1

fig, axes = new_figure(1, 3, (11.0, 3.4))
window = max(steps // 20, 1)
for name, r in runs.items():
    smooth = torch.tensor(r["losses"]).unfold(0, window, 1).mean(1)
    axes[0, 0].plot(smooth.numpy(), label=f"{name} ({r['cost'].parameters / 1e3:.0f}k params)")
axes[0, 0].set_xlabel("step")
axes[0, 0].set_ylabel("training loss (moving average)")
axes[0, 0].legend(fontsize=8)
for ax, (name, r) in zip(axes[0, 1:], runs.items()):
    with torch.no_grad():
        xs = sample(r["den"], schedule, (16, 1, size, size), sampler="ddim", steps=20,
                    generator=seeded(10)).clamp(-1, 1)  # fmt: skip
    from difflab.viz import make_grid

    ax.imshow(make_grid(xs, nrow=4)[:, :, 0], cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{name}: DDIM, 20 steps", fontsize=9)
    ax.set_axis_off()
save(fig, "18_dit_vs_unet.png")

# %% [markdown]
# In fast mode (80 steps) both networks have only begun: their samples are still noise, and
# the numbers say only that each learns. Full mode trains 3000 steps on 4096 digits.
# At this scale the comparison is about recipes, not architectures: a few thousand pixels, a
# few hundred steps. The U-Net's convolutions build in that nearby pixels belong together;
# the DiT must learn it from the position embeddings, and it pays for attention over every
# pair of tokens ($N^2$ grows fast as the patch shrinks). The literature finds the U-Net
# ahead at small scale and transformers ahead when data, compute and model grow [Peebles & Xie
# 2023; Bao 2023]. `benchmarks/backbone_quality.py` measures the two on MNIST at equal CPU time
# (BENCHMARKS.md).

# %% [markdown]
# ## Summary
#
# * A DiT cuts the image into $p \times p$ patches (tokens of $C p^2$ values, an exact
#   reshape), adds fixed 2-D sine-cosine positions (whose dot products depend only on the
#   offset) and runs transformer blocks whose attention is
#   $\mathrm{softmax}(QK^\top/\sqrt d)V$.
# * adaLN-Zero: the noise level (and label) set a shift, scale and gate per block; the gates
#   and the output layer start at zero, so each block is the identity and the network
#   outputs 0 at initialisation, while the modulation weights still get a gradient.
# * The DiT keeps the U-Net's contract `model(x, t, cond)`: every task, process and sampler
#   drives it unchanged; `difflab presets` shows each network's parameters and FLOPs.
#
# ## Try this
#
# 1. U-ViT [Bao 2023] adds long skips: the $i$-th of the last `depth // 2` blocks first maps
#    `concat(h, skip)` (width $2D$) back to $D$ with a linear layer. Build `tiny` with
#    `long_skips=True`: is it still the identity at initialisation, and how many parameters
#    do the skips add (by hand: `depth // 2` layers of $2D \cdot D + D$)?
# 2. Halve the patch size of the tiny DiT on 16 x 16 images ($p = 2 \to 1$): the number of
#    tokens quadruples. By how much do the forward FLOPs grow? Count by hand the two terms of
#    a block that scale differently, $N(4 + 2r)D^2$ (the linear maps, $r$ = `mlp_ratio`) and
#    $2N^2D$ (the two attention products), times 2 FLOPs per multiply-add.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    plain, uvit = build_dit("tiny"), build_dit("tiny", long_skips=True)
    d, depth = plain.config.hidden_size, plain.config.depth
    extra = sum(p.numel() for p in uvit.parameters()) - sum(p.numel() for p in plain.parameters())
    RESULTS["answer_uvit_extra_params"] = float(extra)
    with torch.no_grad():
        out = uvit(x8, t8).abs().max()
    print(f"1. U-ViT adds {extra} parameters (by hand {depth // 2 * (2 * d * d + d)}); "
          f"output at init {float(out)}")  # fmt: skip
    assert extra == depth // 2 * (2 * d * d + d) and float(out) == 0

    costs, blocks = {}, {}
    for p_ in (1, 2):
        m = build_dit("tiny", image_size=16, patch_size=p_)
        costs[p_] = network_cost(m, (1, 16, 16)).flops
        n, r = (16 // p_) ** 2, m.config.mlp_ratio
        blocks[p_] = 2 * (n * (4 + 2 * r) * d * d + 2 * n * n * d)
    growth = costs[1] / costs[2]
    RESULTS["answer_patch1_flops_growth"] = growth
    by_hand_ratio = blocks[1] / blocks[2]
    print(f"2. p = 1: {growth:.1f}x the FLOPs of p = 2 (blocks by hand {by_hand_ratio:.1f}x): "
          "the N^2 attention term grows 16x, the rest 4x")  # fmt: skip
    assert 4 < growth < 16 and abs(blocks[1] / blocks[2] - growth) < 0.5

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
