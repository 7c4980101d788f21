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
# # 9. Guidance: classifier-free and classifier guidance
#
# A conditional diffusion model learns $p(x_0 \mid y)$, e.g. one class of images. *Guidance*
# trades diversity for fidelity to $y$ by sharpening the conditional. Through the score
# $\nabla_{x_t} \log p_t$ and Tweedie's formula $\hat\epsilon = -\sigma_t \nabla_{x_t} \log
# p_t(x_t)$, Bayes' rule $p(x_t \mid y) \propto p(x_t)\,p(y \mid x_t)$ becomes
#
# $$\nabla \log p(x_t \mid y) = \nabla \log p(x_t) + \nabla \log p(y \mid x_t).$$
#
# * **Classifier guidance** [Dhariwal & Nichol 2021, Sec. 4] multiplies the classifier term by
#   a scale $s$: $\hat\epsilon \leftarrow \hat\epsilon - s\,\sigma_t \nabla_{x_t} \log p_\phi(y
#   \mid x_t)$ (their Eq. 14), with a classifier $p_\phi$ trained on *noisy* inputs $x_t$.
# * **Classifier-free guidance** (CFG) [Ho & Salimans 2021] needs no classifier: one network
#   is trained both with the label and, a fraction of the time, with a "null" label, and then
#   mixes the two predictions:
#   $\hat\epsilon = \hat\epsilon_\varnothing + s\,(\hat\epsilon_y - \hat\epsilon_\varnothing)$.
#   Since $\hat\epsilon_y - \hat\epsilon_\varnothing = -\sigma_t \nabla \log p(y \mid x_t)$ for
#   exact models, this is classifier guidance with the model's *implicit* classifier.
#
# $s = 0$ is the unconditional model, $s = 1$ the conditional one, $s > 1$ guides (the paper's
# $w$ is $s - 1$). difflab implements both as denoiser wrappers (`ClassifierFreeGuidance`,
# `ClassifierGuidance`), so every sampler can use them.
#
# The test bed: the 8-Gaussians data, with the component index as the label. Everything is
# exact: the unconditional denoiser is the mixture's posterior mean (`GMMDenoiser`), the
# conditional one that of component $y$ (`GaussianDenoiser`), and the noisy classifier
# $p(y \mid x_t)$ is Bayes' rule on the noised mixture. So the identities above can be checked
# to rounding error. At the end a small network is trained with label dropout, as in practice.

# %%
import math

import torch
from _common import answers_wanted, is_fast, new_figure, out_path, pick, save, use_threads

from difflab import viz
from difflab.data.toy import eight_gaussians_gmm
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance
from difflab.nn.mlp import TimeMLP
from difflab.objectives import diffusion_loss
from difflab.oracles import GaussianDenoiser, GMMDenoiser
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule

THREADS = use_threads(1)  # tiny matrix products: one thread is fastest; restored at the end
F64 = torch.float64
T = 1000
RESULTS: dict[str, float] = {}
gen = torch.Generator().manual_seed(0)
sched = DiscreteSchedule.from_name("linear", T)
gmm = eight_gaussians_gmm()
K = gmm.num_components
NULL = K  # the "no label" label
STD = 0.15  # every component is N(mu_k, 0.15^2 I)


class ExactConditionalDenoiser:
    """E[x0 | x_t, y]: component y's Gaussian posterior mean, or the mixture's for y = NULL."""

    def __init__(self) -> None:
        self.components = [
            GaussianDenoiser(gmm.means[k], gmm.covariances[k], sched) for k in range(K)
        ]
        self.mixture = GMMDenoiser(gmm, sched)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, cond=None) -> Prediction:
        labels = torch.full((xt.shape[0],), NULL) if cond is None else torch.as_tensor(cond)
        t = torch.as_tensor(t, dtype=F64).expand(xt.shape[0])
        x0, eps = torch.empty_like(xt), torch.empty_like(xt)
        for k in labels.unique().tolist():
            rows = labels == k
            den = self.mixture if k == NULL else self.components[k]
            pred = den(xt[rows], t[rows])
            x0[rows], eps[rows] = pred.x0, pred.eps
        return Prediction(x0=x0, eps=eps)


exact = ExactConditionalDenoiser()

# %% [markdown]
# ## 1. The two identities of classifier-free guidance
#
# With scale 0 the guided prediction must be the unconditional one, with scale 1 the
# conditional one, for every $x_t$, $t$ and label; and so must the samples drawn with the same
# noise by a deterministic sampler.

# %%
n = 512
xt = 2 * torch.randn(n, 2, dtype=F64, generator=gen)
t = torch.randint(1, T + 1, (n,), generator=gen).to(F64)
y = torch.randint(0, K, (n,), generator=gen)
unconditional, conditional = exact(xt, t), exact(xt, t, y)
for scale, target, name in ((0.0, unconditional, "scale0_vs_unconditional"),
                            (1.0, conditional, "scale1_vs_conditional")):  # fmt: skip
    guided = ClassifierFreeGuidance(exact, scale=scale, null_label=NULL)(xt, t, y)
    RESULTS[f"cfg_{name}_max_abs"] = max(
        float((guided.x0 - target.x0).abs().max()), float((guided.eps - target.eps).abs().max())
    )
    print(f"CFG {name}: max |difference| = {RESULTS[f'cfg_{name}_max_abs']:.1e}")
    assert RESULTS[f"cfg_{name}_max_abs"] < 1e-12


def draw(denoiser, labels: torch.Tensor, *, seed: int = 3, sampler: str = "dpm++2m", steps=40):
    """Deterministic samples (float64) for the given requested labels (B,)."""
    return sample(
        denoiser, sched, (labels.shape[0], 2), sampler=sampler, steps=steps, cond=labels,
        generator=torch.Generator().manual_seed(seed), dtype=F64,
    )  # fmt: skip


n_samples = pick(2000, 8000)
requested = torch.arange(n_samples) % K  # every class equally often
x_uncond = draw(exact.mixture, requested)  # the mixture denoiser ignores the labels
x_cond = draw(exact, requested)
for scale, target, name in ((0.0, x_uncond, "scale0"), (1.0, x_cond, "scale1")):
    guided = draw(ClassifierFreeGuidance(exact, scale=scale, null_label=NULL), requested)
    RESULTS[f"cfg_samples_{name}_max_abs"] = float((guided - target).abs().max())
    assert RESULTS[f"cfg_samples_{name}_max_abs"] < 1e-10
worst = max(RESULTS["cfg_samples_scale0_max_abs"], RESULTS["cfg_samples_scale1_max_abs"])
print(f"samples: scale 0 = unconditional, scale 1 = conditional to {worst:.1e}")

# %% [markdown]
# ## 2. What larger scales do
#
# We sweep the scale and measure, for each sample, whether it lands in the requested component
# (the nearest mean is the requested one). Two values are known in closed form:
#
# * at $s = 0$ the label is ignored, and by the 8-fold symmetry of the data (which the sampler
#   keeps) the nearest mean is the requested one with probability exactly $1/8$;
# * at $s = 1$ the samples follow $\mathcal{N}(\mu_y, 0.15^2 I)$, and a 2-D standard normal
#   lies within radius 1 with probability $1 - e^{-1/2} \approx 0.393$: that fraction of the
#   samples must lie within $0.15$ of the requested mean.
#
# Both are checked within 4 standard errors. Between 0 and 1 the fraction in the requested
# component rises to 1. Beyond 1, guidance sharpens $p(x \mid y)\,p(y \mid x)^{s-1}$: the
# spread of each class shrinks (measured around the class's own sample mean), and the class
# also **moves away from the others**, outwards along the ring (the mean radial offset from
# $\mu_y$ grows), because $p(y \mid x)$ keeps growing away from the other components. Samples
# become more distinctive than the class itself: less diverse, and not centred on $\mu_y$.

# %%
scales = [0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0]
by_scale, stats = {}, {}


def guidance_stats(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """(share in the requested component, share within one sd of mu_y, class sd around the
    class's own sample mean (per coordinate), mean outward shift from mu_y along the ring)."""
    x, mu = x.double(), gmm.means[labels]
    outward = mu / mu.norm(dim=1, keepdim=True)  # unit vector from the origin to mu_y
    in_comp = float((torch.cdist(x, gmm.means).argmin(1) == labels).double().mean())
    within = float(((x - mu).norm(dim=1) < STD).double().mean())
    class_means = torch.stack([x[labels == k].mean(0) for k in range(K)])
    spread = float((x - class_means[labels]).pow(2).mean().sqrt())
    return in_comp, within, spread, float(((x - mu) * outward).sum(1).mean())


for scale in scales:
    x = draw(ClassifierFreeGuidance(exact, scale=scale, null_label=NULL), requested)
    by_scale[scale] = x
    stats[scale] = in_comp, within, spread, shift = guidance_stats(x, requested)
    print(
        f"scale {scale:4.2f}: in requested component {in_comp:.3f}, within 1 sd of mu_y "
        f"{within:.3f}, class sd {spread:.3f} (data: {STD}), outward shift {shift:+.3f}"
    )
p0 = stats[0.0][0]
RESULTS["scale0_in_component_z"] = (p0 - 1 / K) / math.sqrt((1 / K) * (1 - 1 / K) / n_samples)
p_in = 1 - math.exp(-0.5)
RESULTS["scale1_within_1sd_z"] = (stats[1.0][1] - p_in) / math.sqrt(p_in * (1 - p_in) / n_samples)
for scale in scales:
    for i, name in enumerate(("in_component", "within_1sd", "class_sd", "outward_shift")):
        RESULTS[f"{name}_scale{scale:g}"] = stats[scale][i]
assert abs(RESULTS["scale0_in_component_z"]) < 4
assert abs(RESULTS["scale1_within_1sd_z"]) < 4
rising = [stats[s][0] for s in scales if s <= 1]
assert all(a < b for a, b in zip(rising, rising[1:])), rising  # rises from 1/8 ...
assert all(stats[s][0] > 0.99 for s in scales if s >= 1)  # ... to 1
guided = [s for s in scales if s >= 1]
spreads, shifts = [stats[s][2] for s in guided], [stats[s][3] for s in guided]
assert all(a > b for a, b in zip(spreads, spreads[1:])), spreads  # classes shrink
assert all(a < b for a, b in zip(shifts, shifts[1:])), shifts  # and move outwards

cols = [0.0, 1.0, 3.0, 8.0]
fig = viz.scatter_grid(
    [[by_scale[s] for s in cols]], ["exact denoisers"], [f"scale {s:g}" for s in cols],
    lim=2.3, s=0.8,
)  # fmt: skip
save(fig, "09_cfg_scales.png")

# %% [markdown]
# ## 3. Classifier guidance, with the exact noisy classifier
#
# For this data the noisy classifier is known: the noised law of component $k$ is
# $\mathcal{N}(\alpha_t \mu_k, (\alpha_t^2\, 0.15^2 + \sigma_t^2) I)$, so
# $\log p(y \mid x_t) = \log w_y + \log \mathcal{N}(x_t; \alpha_t\mu_y, \cdot) -
# \log\sum_k w_k \mathcal{N}(x_t; \alpha_t\mu_k, \cdot)$. `ClassifierGuidance` takes its
# gradient with autograd. Checked:
#
# * at scale 1 the unconditional denoiser plus the classifier **is** the conditional denoiser
#   (Bayes' rule for scores);
# * at every scale it equals classifier-free guidance of the exact models (the implicit
#   classifier is the true one), for predictions and for samples.


# %%
class NoisyClassifier:
    """Exact log p(y | x_t) for the noised 8-Gaussians mixture, differentiable in x_t."""

    def log_likelihood(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (c.to(xt.dtype)[:, None] for c in sched.alpha_sigma(t.to(F64)))
        var = alpha**2 * STD**2 + sigma**2  # (B, 1)
        d2 = ((xt[:, None, :] - alpha[:, None] * gmm.means.to(xt.dtype)) ** 2).sum(-1)  # (B, K)
        log_joint = gmm.weights.log().to(xt.dtype) - d2 / (2 * var) - torch.log(2 * math.pi * var)
        log_post = log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)
        return log_post.gather(1, y.long()[:, None])[:, 0]


classifier = NoisyClassifier()
for scale in (0.0, 1.0, 3.0, 8.0):
    cg = ClassifierGuidance(exact.mixture, classifier, sched, scale=scale, labels=y)(xt, t)
    cfg = ClassifierFreeGuidance(exact, scale=scale, null_label=NULL)(xt, t, y)
    RESULTS[f"cg_vs_cfg_scale{scale:g}_max_abs"] = float((cg.eps - cfg.eps).abs().max())
    print(f"scale {scale:g}: max |classifier guidance - CFG| (eps) = "
          f"{RESULTS[f'cg_vs_cfg_scale{scale:g}_max_abs']:.1e}")  # fmt: skip
    assert RESULTS[f"cg_vs_cfg_scale{scale:g}_max_abs"] < 1e-9
cg1 = ClassifierGuidance(exact.mixture, classifier, sched, scale=1.0, labels=y)(xt, t)
RESULTS["cg_scale1_vs_conditional_max_abs"] = float((cg1.x0 - conditional.x0).abs().max())
assert RESULTS["cg_scale1_vs_conditional_max_abs"] < 1e-9

x_cg = draw(ClassifierGuidance(exact.mixture, classifier, sched, scale=3.0, labels=requested),
            requested)  # fmt: skip
RESULTS["cg_vs_cfg_samples_scale3_max_abs"] = float((x_cg - by_scale[3.0]).abs().max())
print(f"samples at scale 3: max |classifier guidance - CFG| = "
      f"{RESULTS['cg_vs_cfg_samples_scale3_max_abs']:.1e}")  # fmt: skip
assert RESULTS["cg_vs_cfg_samples_scale3_max_abs"] < 1e-8

# %% [markdown]
# In practice neither model is exact. Classifier guidance needs a separately trained classifier
# on noisy inputs, and its gradients can be adversarial rather than semantic; classifier-free
# guidance needs only label dropout during training, which is why it is the standard. Their
# scales also mean different things once the models are learned: CFG's implicit classifier
# comes from the difference of two denoiser outputs.
#
# ## 4. A trained class-conditional network
#
# A `TimeMLP` with a label embedding (and a null label) is trained on (point, component)
# pairs; 10% of the labels are replaced by the null label, so the same network learns the
# unconditional model too [Ho & Salimans 2021, Algorithm 1]. Then we sweep the scale with
# `ClassifierFreeGuidance` as above and check what section 3 found with the exact model: the
# label is followed from scale 1 on, and from scale 1 to 3 each class shrinks and moves
# outwards. (The share within one sd of $\mu_y$ is printed but not a test: as a class moves
# outwards it can fall, and with full mode's longer training it does.)

# %%
torch.manual_seed(0)
net = TimeMLP(2, hidden=pick(64, 128), depth=pick(2, 3), num_classes=K)
model = ModelDenoiser(net, sched, parameterization="v")
steps, batch, p_uncond = pick(300, 6000), pick(256, 512), 0.1
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps, pct_start=0.1)
for _ in range(steps):
    labels = torch.randint(0, K, (batch,), generator=gen)
    x0 = gmm.means[labels].float() + STD * torch.randn(batch, 2, generator=gen)
    drop = torch.rand(batch, generator=gen) < p_uncond
    loss = diffusion_loss(model, x0, cond=torch.where(drop, NULL, labels), generator=gen).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lr_sched.step()
model.eval()

n_trained = pick(1000, 4000)
req = torch.arange(n_trained) % K
trained = {}
for scale in (0.0, 1.0, 3.0):
    cfg = ClassifierFreeGuidance(model, scale=scale, null_label=NULL)
    with torch.no_grad():
        x = sample(cfg, sched, (n_trained, 2), sampler="dpm++2m", steps=25, cond=req,
                   generator=torch.Generator().manual_seed(4))  # fmt: skip
    trained[scale] = x
    in_comp, within_sd, spread, shift = guidance_stats(x, req)  # as in section 3
    RESULTS[f"trained_in_component_scale{scale:g}"] = in_comp
    RESULTS[f"trained_within_1sd_scale{scale:g}"] = within_sd
    RESULTS[f"trained_class_sd_scale{scale:g}"] = spread
    RESULTS[f"trained_outward_shift_scale{scale:g}"] = shift
    print(f"trained, scale {scale:g}: in requested component {in_comp:.3f}, within 1 sd "
          f"{within_sd:.3f}, class sd {spread:.3f}, outward shift {shift:+.3f}")  # fmt: skip
assert RESULTS["trained_in_component_scale1"] > RESULTS["trained_in_component_scale0"] + 0.3
assert RESULTS["trained_class_sd_scale3"] < RESULTS["trained_class_sd_scale1"]  # shrinks
assert RESULTS["trained_outward_shift_scale3"] > RESULTS["trained_outward_shift_scale1"]

fig, axes = new_figure(1, 2, (10, 4))
ax = axes[0, 0]
ax.plot(scales, [stats[s][0] for s in scales], "o-", label="fraction in requested component")
ax.plot(scales, [stats[s][2] / STD for s in scales], "s-", label="class sd / data sd")
ax.plot(scales, [stats[s][3] / STD for s in scales], "^-", label="outward shift / data sd")
ax.axvline(1.0, color="k", ls=":", lw=0.8)
ax.set(xlabel="guidance scale s", title="exact denoisers")
ax.legend(fontsize=8)
ax = axes[0, 1]
for i, scale in enumerate((0.0, 1.0, 3.0)):
    pts = trained[scale].numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=0.6, alpha=0.5, color=f"C{i}", label=f"scale {scale:g}")
ax.set(title="trained MLP + CFG", xlim=(-2.3, 2.3), ylim=(-2.3, 2.3))
ax.set_aspect("equal")
ax.legend(fontsize=8, markerscale=8)
save(fig, "09_guidance_summary.png")

# %% [markdown]
# ## Summary
#
# * Classifier-free guidance combines the conditional and unconditional predictions,
#   $\hat\epsilon_\text{uncond} + s(\hat\epsilon_\text{cond} - \hat\epsilon_\text{uncond})$: scale
#   0 is the unconditional model, scale 1 the conditional one, and larger scales push samples
#   towards the requested class, concentrating them and moving them away from the others.
# * Classifier guidance with the exact noisy classifier is the same thing: it equals CFG at
#   every scale.
# * One network trained with label dropout provides both predictions, and its samples follow
#   the requested label.
#
# ## Try this
#
# 1. Guidance is linear in the scale: check that the guided $\hat x_0$ at scale 3 is
#    $\hat x_{0,\text{uncond}} + 3(\hat x_{0,\text{cond}} - \hat x_{0,\text{uncond}})$.
# 2. At which scale is the guided prediction the midpoint of the conditional and unconditional
#    ones? Check it.
#
# The next cell works them out when `DIFFLAB_ANSWERS=1` is set (the tests set it).

# %%
if answers_wanted():
    errs = {}
    for scale, name in ((3.0, "scale3_extrapolates"), (0.5, "scale_half_is_midpoint")):
        guided = ClassifierFreeGuidance(exact, scale=scale, null_label=NULL)(xt, t, y)
        expected = unconditional.x0 + scale * (conditional.x0 - unconditional.x0)
        RESULTS[f"answer_{name}_max_abs"] = float((guided.x0 - expected).abs().max())
        assert RESULTS[f"answer_{name}_max_abs"] < 1e-12
    midpoint = (conditional.x0 + unconditional.x0) / 2
    guided_half = ClassifierFreeGuidance(exact, scale=0.5, null_label=NULL)(xt, t, y)
    assert float((guided_half.x0 - midpoint).abs().max()) < 1e-12
    print("1. scale 3 extrapolates linearly; 2. scale 1/2 gives the midpoint (both to 1e-12)")

# %%
torch.set_num_threads(THREADS)
print(f"figures in {out_path('')}; fast mode: {is_fast()}; {len(RESULTS)} checked numbers")
