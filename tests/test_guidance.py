"""Guidance wrappers and noise-aware classifiers, checked against closed forms.

* classifier-free guidance: the scale-0/1 identities, linearity in the scale, a no-op with
  identical branches, and for two unit-covariance Gaussians the exact guided law N(s mu, I);
* classifier guidance: the shift of eps by -s sigma grad log p(y | x_t) for a classifier with
  quadratic logits, and, with an exact Gaussian denoiser and the exact noisy likelihood of a
  linear-Gaussian observation, samples from the Bayes posterior p(x0 | y);
* the noise-aware classifier: a fresh one predicts uniformly (loss log K), training lowers
  the loss and is reproducible, safetensors round trip;
* the CLI: class-conditional and classifier runs on a synthetic digit set, guided sampling and
  the guidance-sweep figure.
"""

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.classifier import (
    build_classifier,
    classifier_loss,
    load_classifier,
    noisy_accuracy,
    save_classifier,
    train_noisy_classifier,
)
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance
from difflab.nn.mlp import TimeMLP
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import ModelDenoiser, Prediction
from difflab.samplers import SAMPLERS, sample
from difflab.schedules import DiscreteSchedule, EDMSchedule

F64 = torch.float64
SCHED = DiscreteSchedule.from_name("linear", 1000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small networks on a busy 2-core machine: one thread avoids OpenMP contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_mlp(num_classes: int = 3, seed: int = 0) -> ModelDenoiser:
    torch.manual_seed(seed)
    net = TimeMLP(dim=2, hidden=16, depth=2, num_classes=num_classes)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised layers would hide the labels
            p.normal_(0, 0.3)
    return ModelDenoiser(net, SCHED)


# ----------------------------------------------------------------------------- classifier-free
def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    den = _random_mlp()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((6,), 400.0, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cond, uncond = den(x, t, labels), den(x, t, torch.full((6,), 3))
    assert not torch.allclose(cond.eps, uncond.eps)  # the labels matter
    for scale, ref in ((0.0, uncond), (1.0, cond)):
        out = ClassifierFreeGuidance(den, scale=scale, null_label=3)(x, t, labels)
        torch.testing.assert_close(out.eps, ref.eps)
        torch.testing.assert_close(out.x0, ref.x0)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(-3, 10))
def test_cfg_is_the_linear_extrapolation_and_keeps_x0_eps_consistent(scale):
    den = _random_mlp()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    t = torch.full((4,), 250.0, dtype=F64)
    labels = torch.tensor([2, 0, 1, 1])
    out = ClassifierFreeGuidance(den, scale=scale, null_label=3)(x, t, labels)
    c, u = den(x, t, labels), den(x, t, torch.full((4,), 3))
    torch.testing.assert_close(out.eps, u.eps + scale * (c.eps - u.eps))  # Eq. (6)
    alpha, sigma = SCHED.alpha_sigma(torch.tensor(250.0, dtype=F64))
    torch.testing.assert_close(out.x0, (x - float(sigma) * out.eps) / float(alpha))


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(-5, 20))
def test_cfg_with_identical_branches_is_a_no_op(scale):
    den = GaussianDenoiser(torch.tensor([1.0, -2.0]), torch.eye(2) * 0.5, SCHED)  # ignores cond
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.full((5,), 700.0, dtype=F64)
    out = ClassifierFreeGuidance(den, scale=scale, null_label=9)(x, t, torch.zeros(5).long())
    ref = den(x, t)
    torch.testing.assert_close(out.eps, ref.eps)
    torch.testing.assert_close(out.x0, ref.x0)


def test_cfg_takes_the_learned_variance_from_the_conditional_branch():
    """With a learned variance [Nichol & Dhariwal 2021, Eq. 15] guidance moves eps only; the
    variance fraction is the conditional branch's at every scale (as GLIDE samples), so at
    scale 1 guided ancestral sampling with ``variance="learned"`` is conditional sampling.

    Oracle: the conditional call itself. Bugs caught: var_frac taken from the unconditional
    half (``chunk(2)[1]``), or extrapolated like eps (wrong at scales other than 1), or
    dropped (the learned-variance sampler then refuses).
    """
    torch.manual_seed(7)
    net = TimeMLP(dim=2, hidden=16, depth=2, out_dim=4, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    den = ModelDenoiser(net, SCHED, learned_variance=True)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((6,), 400.0, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cond, uncond = den(x, t, labels), den(x, t, torch.full((6,), 3))
    assert (cond.var_frac - uncond.var_frac).abs().min() > 1e-3  # the branches differ
    for scale in (0.0, 1.0, 3.0):
        out = ClassifierFreeGuidance(den, scale=scale, null_label=3)(x, t, labels)
        torch.testing.assert_close(out.var_frac, cond.var_frac)

    def draw(d):
        g = torch.Generator().manual_seed(8)
        return sample(d, SCHED, (6, 2), sampler="ddpm", steps=10, generator=g, cond=labels,
                      variance="learned")  # fmt: skip

    guided = ClassifierFreeGuidance(den, scale=1.0, null_label=3)
    torch.testing.assert_close(draw(guided), draw(den))


def test_cfg_passes_other_cond_entries_to_both_branches():
    seen = []

    def den(xt, t, cond):
        seen.append(cond)
        return Prediction(x0=xt * 0, eps=xt)

    x = torch.randn(2, 1, 4, 4)
    image = torch.randn(2, 3, 4, 4)
    cfg = ClassifierFreeGuidance(den, scale=2.0, null_label=5)
    cfg(x, torch.ones(2), {"class": torch.tensor([1, 2]), "image": image})
    (c,) = seen
    assert c["class"].tolist() == [1, 2, 5, 5]
    assert torch.equal(c["image"], torch.cat([image, image]))
    with pytest.raises(ValueError, match="class labels"):
        cfg(x, torch.ones(2), None)


class TwoGaussians:
    """Exact denoisers of N(mu, I) (label 0) and N(0, I) (label 1 = null), per sample."""

    def __init__(self, mu: torch.Tensor, schedule) -> None:
        d = mu.numel()
        self.cond = GaussianDenoiser(mu, torch.eye(d), schedule)
        self.uncond = GaussianDenoiser(torch.zeros(d), torch.eye(d), schedule)

    def __call__(self, xt, t, cond=None):
        null = torch.as_tensor(cond) == 1
        a, b = self.cond(xt, t), self.uncond(xt, t)
        pick = null.reshape(-1, *([1] * (xt.ndim - 1)))
        return Prediction(x0=torch.where(pick, b.x0, a.x0), eps=torch.where(pick, b.eps, a.eps))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_cfg_between_unit_gaussians_is_the_exact_denoiser_of_the_scaled_mean(sampler):
    # With unit covariance (VP) the noised laws have scores -(x - alpha mu) and -x, so the
    # guided score -(x - alpha s mu) is that of N(s mu, I) at every noise level: guidance must
    # give the exact denoiser of N(s mu, I), and every sampler the same samples as that oracle.
    mu, scale, n = torch.tensor([1.0, -0.5], dtype=F64), 3.0, 200
    den = ClassifierFreeGuidance(TwoGaussians(mu, SCHED), scale=scale, null_label=1)
    oracle = GaussianDenoiser(scale * mu, torch.eye(2), SCHED)
    labels = torch.zeros(n, dtype=torch.long)
    x = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(5)) * 999 + 1
    torch.testing.assert_close(den(x, t, labels).eps, oracle(x, t).eps)

    def draw(d, cond):
        g = torch.Generator().manual_seed(6)
        return sample(d, SCHED, (n, 2), sampler=sampler, steps=8, generator=g, dtype=F64,
                      cond=cond)  # fmt: skip

    torch.testing.assert_close(draw(den, labels), draw(oracle, None))


# ----------------------------------------------------------------------------- classifier
class QuadraticLogits(torch.nn.Module):
    """logits_k = -|x - c_k|^2 / (2 tau^2): grad log p(y | x) = (c_y - sum_k p_k c_k) / tau^2."""

    def __init__(self, centres: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.centres, self.tau = centres, tau

    def forward(self, x, t):
        d = x.reshape(x.shape[0], 1, -1) - self.centres.reshape(1, self.centres.shape[0], -1)
        return -(d**2).sum(-1) / (2 * self.tau**2)


@pytest.mark.parametrize("schedule", [SCHED, EDMSchedule()], ids=["ddpm", "edm"])
def test_classifier_guidance_shifts_eps_by_the_analytic_gradient(schedule):
    centres = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.0, -1.0]], dtype=F64)
    tau, scale = 0.7, 2.5
    clf = QuadraticLogits(centres, tau)
    base = GaussianDenoiser(torch.zeros(2), torch.eye(2), schedule)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    t_val = 300.0 if schedule is SCHED else 1.5
    t = torch.full((3,), t_val, dtype=F64)
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():  # as inside a sampler
        out = ClassifierGuidance(base, clf, schedule, scale=scale, labels=y)(x, t)
    logits = -((x[:, None] - centres[None]) ** 2).sum(-1) / (2 * tau**2)
    p = torch.softmax(logits, 1)
    grad = (centres[y] - p @ centres) / tau**2  # the gradient of the log-softmax, by hand
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t_val, dtype=F64))
    ref = base(x, t)
    torch.testing.assert_close(out.eps, ref.eps - scale * sigma * grad)  # Eq. (14)
    torch.testing.assert_close(out.x0, (x - sigma * out.eps) / alpha)


def test_classifier_guidance_labels_from_cond_and_errors():
    clf = QuadraticLogits(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64), 1.0)
    base = GaussianDenoiser(torch.zeros(2), torch.eye(2), SCHED)
    x, t = torch.randn(2, 2, dtype=F64), torch.full((2,), 100.0, dtype=F64)
    y = torch.tensor([1, 0])
    a = ClassifierGuidance(base, clf, SCHED, scale=1.0)(x, t, y)
    b = ClassifierGuidance(base, clf, SCHED, scale=1.0, labels=y)(x, t)
    torch.testing.assert_close(a.eps, b.eps)
    zero = ClassifierGuidance(base, clf, SCHED, scale=0.0, labels=y)(x, t)
    torch.testing.assert_close(zero.eps, base(x, t).eps)
    with pytest.raises(ValueError, match="target labels"):
        ClassifierGuidance(base, clf, SCHED, scale=1.0)(x, t)
    with pytest.raises(ValueError, match="2 entries"):
        ClassifierGuidance(base, clf, SCHED, scale=1.0, labels=torch.tensor([0, 1, 1]))(x, t)


class LinearGaussianLikelihood:
    """Exact log p(y | x_t) for x0 ~ N(m, C) and y = a . x0 + r n, n ~ N(0, 1).

    (x0, x_t) are jointly Gaussian, so y | x_t ~ N(a . E[x0 | x_t], a^T Cov[x0 | x_t] a + r^2)
    with E[x0 | x_t] = m + alpha C S^-1 (x_t - alpha m), Cov = C - alpha^2 C S^-1 C,
    S = alpha^2 C + sigma^2 I [Bishop 2006, Eq. 2.115-2.116].
    """

    def __init__(self, m, C, a, r, schedule) -> None:
        self.m, self.C, self.a, self.r, self.schedule = m, C, a, r, schedule

    def log_likelihood(self, xt, t, y):
        alpha, sigma = self.schedule.alpha_sigma(t[:1])
        alpha, sigma = float(alpha), float(sigma)
        S = alpha**2 * self.C + sigma**2 * torch.eye(self.m.numel(), dtype=F64)
        gain = alpha * self.C @ torch.linalg.inv(S)
        mean = self.m + (xt - alpha * self.m) @ gain.T
        cov = self.C - alpha * gain @ self.C
        var = self.a @ cov @ self.a + self.r**2
        return -((y - mean @ self.a) ** 2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun"])
def test_exact_classifier_guidance_samples_the_bayes_posterior(sampler):
    m = torch.tensor([0.5, -1.0], dtype=F64)
    C = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    a, r, y_obs = torch.tensor([1.0, -0.5], dtype=F64), 0.4, 1.5
    lik = LinearGaussianLikelihood(m, C, a, r, SCHED)
    den = ClassifierGuidance(GaussianDenoiser(m, C, SCHED), lik, SCHED, scale=1.0,
                             labels=torch.tensor(y_obs, dtype=F64))  # fmt: skip
    n = 3000
    steps = {"ddim": 50, "ddpm": 200, "heun": 25}[sampler]
    x = sample(den, SCHED, (n, 2), sampler=sampler, steps=steps, dtype=F64,
               generator=torch.Generator().manual_seed(6))  # fmt: skip
    # Bayes' rule for the linear-Gaussian observation
    k = C @ a / (a @ C @ a + r**2)
    mean_post = m + k * (y_obs - a @ m)
    cov_post = C - torch.outer(k, a @ C)
    se = torch.sqrt(torch.diag(cov_post) / n)
    torch.testing.assert_close(x.mean(0), mean_post, atol=float(5 * se.max()) + 0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov_post, atol=0.04, rtol=0.1)
    # and it differs from the prior, which the test would otherwise not notice
    assert float((mean_post - m).abs().max()) > 10 * float(se.max())


# ----------------------------------------------------------------------------- noisy classifier
def _two_class_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images: class 0 a bright left half, class 1 a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, :, :4] = 0.8
    x[labels == 1, :, :, 4:] = 0.8
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1), labels


def _tiny_classifier(num_classes: int = 2):
    torch.manual_seed(0)
    return build_classifier("tiny", num_classes=num_classes, image_size=8, dropout=0.0)


def test_fresh_classifier_predicts_uniformly_and_training_lowers_the_loss(tmp_path):
    x, y = _two_class_images(64, seed=0)
    clf = _tiny_classifier()
    t = torch.full((64,), 50.0, dtype=F64)

    def loss_at(net):
        g = torch.Generator().manual_seed(9)
        return float(classifier_loss(net, x, y, SCHED, generator=g, t=t)[0].detach())

    assert loss_at(clf) == pytest.approx(math.log(2), abs=1e-6)  # zero output layer
    trained = train_noisy_classifier(clf, x, y, SCHED, steps=20, batch_size=32, lr=1e-2, seed=1)
    assert loss_at(trained) < 0.5 * math.log(2)
    acc = noisy_accuracy(trained, x, y, SCHED, ts=[1.0, 1000.0])
    assert acc[1.0] > 0.9 and acc[1000.0] < 0.8  # nothing is left to classify at t = T
    # a seed reproduces the weights; the file round trip reproduces the logits
    a, b = (train_noisy_classifier(_tiny_classifier(), x, y, SCHED, steps=3, batch_size=32,
                                   lr=1e-2, seed=1) for _ in range(2))  # fmt: skip
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    loaded = load_classifier(save_classifier(trained, tmp_path / "clf.safetensors"))
    tt = torch.full((64,), 30.0)
    assert torch.equal(loaded(x, tt), trained(x, tt))


def test_classifier_input_errors(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        build_classifier("mnist-cpu", num_classes=10, image_size=30)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        build_classifier("tiny", num_classes=1, image_size=8)
    with pytest.raises(ValueError, match="valid"):
        build_classifier("huge", num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        _tiny_classifier()(torch.randn(2, 3, 8, 8), torch.ones(2))
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a valid classifier"):
        load_classifier(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- label dropout
def test_runner_drops_labels_with_the_configured_probability():
    from difflab.app.build import Built
    from difflab.app.config import apply_overrides, get_preset
    from difflab.app.kinds import kind_of
    from difflab.app.training import make_loss_fn

    seen = []

    class Recorder(ModelDenoiser):
        def network_output(self, xt, t, cond=None):
            seen.append(cond.clone())
            return self.model(xt, t.to(xt.dtype), cond)

    cfg = apply_overrides(get_preset("mnist-cond"), ["model.label_dropout=0.3"])
    net = TimeMLP(dim=2, hidden=8, depth=1, num_classes=10)
    built = Built(
        cfg, kind_of(cfg), SCHED, net, Recorder(net, SCHED), (2,), None, torch.device("cpu")
    )
    loss_fn = make_loss_fn(built, {})
    labels = torch.arange(4000) % 10
    batch = (torch.randn(4000, 2), labels)
    loss_fn(batch, torch.Generator().manual_seed(0))
    loss_fn(batch, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], seen[1])  # deterministic given the step generator
    dropped = seen[0] == 10
    assert torch.equal(seen[0][~dropped], labels[~dropped])  # kept labels are untouched
    se = math.sqrt(0.3 * 0.7 / 4000)
    assert abs(float(dropped.double().mean()) - 0.3) < 5 * se


# ----------------------------------------------------------------------------- CLI
FAST = [
    "--no-progress", "--steps", "4",
    "--set", "data.image_size=8", "--set", "data.channels=1", "--set", "model.preset=tiny",
    "--set", "train.batch_size=16", "--set", "train.log_every=2", "--set", "train.ckpt_every=100",
    "--set", "sample.steps=3", "--set", "sample.sampler=ddim",
]  # fmt: skip


def write_synthetic_mnist(folder: Path, n_train: int = 60, n_test: int = 40) -> Path:
    """MNIST-format IDX files of 28x28 uint8 'digits': class k is a bar at rows 2k+3..2k+5."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 3 : 2 * k + 6, 4:24] = 255
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
            header += struct.pack(f">{arr.ndim}I", *arr.shape)
            blob = gzip.compress(header + arr.astype(np.uint8).tobytes())
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(blob)
    return folder


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    from difflab.app.cli import main

    root = tmp_path_factory.mktemp("guided")
    data = write_synthetic_mnist(root / "mnist")
    runs = {}
    for preset in ("mnist-cond", "mnist-classifier"):
        runs[preset] = root / preset
        args = ["train", "--preset", preset, "--data-dir", str(data), "--out", str(runs[preset])]
        assert main(args + FAST) == 0
    return runs


def test_cli_guided_sampling_and_sweep(digit_runs, tmp_path, capsys):
    from difflab.app.cli import main

    cond, clf = str(digit_runs["mnist-cond"]), str(digit_runs["mnist-classifier"])
    common = ["--steps", "3", "--sampler", "ddim"]
    out = tmp_path / "g.npz"
    assert main(["sample", cond, "--class", "3", "--guidance", "2", "--n", "5", "--out", str(out),
                 *common]) == 0  # fmt: skip
    assert np.load(out)["samples"].shape == (5, 1, 8, 8)
    out = tmp_path / "c.npz"
    assert main(["sample", cond, "--class", "3", "--classifier", clf, "--classifier-scale", "3",
                 "--n", "4", "--out", str(out), *common]) == 0  # fmt: skip
    assert np.load(out)["samples"].shape == (4, 1, 8, 8)
    out = tmp_path / "sweep.npz"
    assert main(["sample", cond, "--guidance-sweep", "0,1,3", "--n", "20", "--out", str(out),
                 *common]) == 0  # fmt: skip
    sweep = np.load(out)
    assert sweep["samples"].shape == (3, 10, 2, 1, 8, 8)
    assert sweep["scales"].tolist() == [0.0, 1.0, 3.0]
    assert out.with_suffix(".png").stat().st_size > 0
    capsys.readouterr()
    for bad, msg in (
        (["sample", clf], "classifier run"),
        (["sample", cond, "--classifier", cond, "--class", "1"], "not a classifier run"),
        (["sample", cond, "--guidance-sweep", "0,x"], "expects numbers"),
        (["sample", cond, "--class", "10"], "0..9"),
    ):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
