"""Trainer: EMA half-life, warm-up, exact resume, divergence handling, crash recovery."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from difflab import checkpoint as ckpt
from difflab.app.config import apply_overrides, get_preset
from difflab.train import EMA, Trainer, lr_at

FAST = [
    "train.steps=60",
    "train.batch_size=64",
    "train.log_every=10",
    "train.ckpt_every=20",
    "train.warmup_steps=5",
    "model.hidden=32",
    "model.depth=2",
    "sample.n=200",
    "sample.steps=20",
    "sample.sampler=ddim",
]


def test_ema_half_life_in_images():
    src = nn.Linear(3, 1)
    ema = EMA(src, half_life_images=1000.0)
    init = ema.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.fill_(2.0)
    k, batch = 25, 40  # 1000 images = exactly one half-life
    for _ in range(k):
        ema.update(src, batch_size=batch)
    expected = 2.0 + (init - 2.0) * 0.5 ** (k * batch / 1000.0)
    assert torch.allclose(ema.model.weight, expected, atol=1e-6)
    # the decay per step depends on the batch size so that images, not steps, count
    assert EMA(src, half_life_images=500).decay(500) == pytest.approx(0.5)
    assert EMA(src, half_life_images=0).decay(128) == 0.0


def test_ema_rampup_limits_the_half_life_early():
    """EDM ramp-up: half-life min(H, r * images seen); the EMA weight of the random start
    after n images is prod_k beta_k, which the ramp-up makes vanish even for n << H."""
    src = nn.Linear(3, 1)
    ema = EMA(src, half_life_images=10_000.0, rampup_ratio=0.1)
    assert ema.half_life(500) == pytest.approx(50.0)
    assert ema.half_life(10**6) == pytest.approx(10_000.0)
    assert ema.decay(50, images_seen=500) == pytest.approx(0.5)
    init = ema.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.fill_(2.0)
    batch, start_weight = 10, torch.tensor(1.0, dtype=torch.float64)
    for k in range(1, 41):
        ema.update(src, batch_size=batch, images_seen=k * batch)
        start_weight *= 0.5 ** (batch / min(10_000.0, 0.1 * k * batch))
    expected = 2.0 + (init - 2.0) * float(start_weight)
    assert torch.allclose(ema.model.weight, expected, atol=1e-6)
    assert float(start_weight) < 1e-6  # without ramp-up it would be 0.5 ** (400 / 10000) ~ 0.97
    with pytest.raises(ValueError, match="ramp-up"):
        EMA(src, half_life_images=1.0, rampup_ratio=0.0)


def test_lr_warmup():
    assert lr_at(0, lr=1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(500, lr=1.0, warmup_steps=10) == 1.0
    assert lr_at(0, lr=1.0, warmup_steps=0) == 1.0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_lr_decay_is_the_closed_form_of_the_budget_spent(p):
    # cosine: lr (1 + cos(pi p)) / 2 [SGDR eq. 5, eta_min = 0]; linear: lr (1 - p); after warm-up
    assert lr_at(50, lr=2.0, warmup_steps=10, decay="cosine", progress=p) == pytest.approx(
        (1 + math.cos(math.pi * p)), abs=1e-12
    )
    assert lr_at(50, lr=2.0, warmup_steps=10, decay="linear", progress=p) == pytest.approx(
        2.0 * (1 - p), abs=1e-12
    )
    assert lr_at(50, lr=2.0, warmup_steps=10, decay="none", progress=p) == 2.0
    # during warm-up the two factors multiply
    assert lr_at(4, lr=2.0, warmup_steps=10, decay="linear", progress=p) == pytest.approx(
        2.0 * 0.5 * (1 - p), abs=1e-12
    )


def test_lr_decay_values_at_its_ends_and_outside():
    assert lr_at(99, lr=1.0, warmup_steps=0, decay="cosine", progress=0.5) == pytest.approx(0.5)
    assert lr_at(99, lr=1.0, warmup_steps=0, decay="cosine", progress=1.7) == pytest.approx(0.0)
    assert lr_at(99, lr=1.0, warmup_steps=0, decay="linear", progress=-0.3) == 1.0
    with pytest.raises(KeyError):
        lr_at(0, lr=1.0, warmup_steps=0, decay="step")


class _LinearLoss(nn.Module):
    """loss = c . w, so dloss/dw = c exactly whatever w is."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros_like(c))

    def loss(self, batch, g):
        return (self.c * self.w).sum(), {}


@pytest.mark.parametrize("norm,clip", [(10.0, 1.0), (0.5, 1.0), (10.0, None)])
def test_gradient_is_clipped_before_the_optimizer_step(norm, clip):
    """Gradient clipping rescales g to clip * g / |g| when |g| > clip, *before* AdamW reads it.
    Oracle: with loss c . w the gradient is c exactly, and after one AdamW step (no weight
    decay) exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2 [Kingma & Ba 2015, Alg. 1].
    The parameter update alone cannot tell: Adam's first step is lr * g / |g| per coordinate.
    Tolerance 1e-6 relative: clip_grad_norm_ divides by |g| + 1e-6; clipping after the step
    leaves exp_avg |g| / clip = 10 times too large."""
    c = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64)  # |c| = 13
    c = c * norm / 13.0
    model = _LinearLoss(c)
    tr = Trainer(
        model,
        batch_fn=lambda step, g: None,
        loss_fn=model.loss,
        lr=0.1,
        batch_size=1,
        grad_clip=clip,
    )
    logs = tr.train_step()
    factor = clip / norm if clip is not None and norm > clip else 1.0
    g = c * factor
    state = tr.optimizer.state[model.w]
    beta1, beta2 = tr.optimizer.param_groups[0]["betas"]
    assert torch.allclose(state["exp_avg"], (1 - beta1) * g, rtol=1e-6, atol=0)
    assert torch.allclose(state["exp_avg_sq"], (1 - beta2) * g**2, rtol=2e-6, atol=0)
    assert torch.allclose(model.w.grad, g, rtol=1e-6, atol=0)
    expected_norm = norm if clip is not None else 0.0  # the log holds the norm before clipping
    assert float(logs["grad_norm"]) == pytest.approx(expected_norm, rel=1e-12)


def _toy_trainer(seed=0):
    from difflab.data.toy import sample_toy
    from difflab.nn.mlp import TimeMLP
    from difflab.objectives import diffusion_loss
    from difflab.parameterization import ModelDenoiser
    from difflab.schedules import DiscreteSchedule

    torch.manual_seed(seed)
    model = TimeMLP(dim=2, hidden=32, depth=2)
    den = ModelDenoiser(model, DiscreteSchedule.from_name("linear", 100))

    def batch_fn(step, g):
        return sample_toy("moons", 32, generator=g)

    def loss_fn(x0, g):
        return diffusion_loss(den, x0, generator=g).loss, {}

    return Trainer(
        model,
        batch_fn=batch_fn,
        loss_fn=loss_fn,
        lr=1e-3,
        batch_size=32,
        warmup_steps=3,
        ema_half_life_images=200,
        seed=seed,
    )


def test_resume_is_bit_exact(tmp_path):
    straight = _toy_trainer()
    losses_straight = [float(straight.train_step()["loss"]) for _ in range(12)]

    first = _toy_trainer()
    for _ in range(6):
        first.train_step()
    ckpt.save_checkpoint(tmp_path, step=first.step, tensors=first.tensors(), state=first.state())
    resumed = _toy_trainer(seed=0)
    c = ckpt.load_checkpoint(tmp_path)
    resumed.load(c.tensors, c.state)
    assert resumed.step == 6
    losses_resumed = [float(resumed.train_step()["loss"]) for _ in range(6)]
    assert losses_resumed == losses_straight[6:]  # bit for bit
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.parameters(), resumed.ema.model.parameters()):
        assert torch.equal(a, b)


def test_training_reduces_the_loss():
    tr = _toy_trainer()
    losses = [float(tr.train_step()["loss"]) for _ in range(300)]
    assert sum(losses[-50:]) / 50 < 0.8 * sum(losses[:20]) / 20


def _cfg(*extra):
    return apply_overrides(get_preset("moons"), FAST + list(extra))


def test_train_run_writes_a_complete_run_dir(tmp_path):
    from difflab.app.training import train_run

    res = train_run(_cfg(), tmp_path / "run", progress=False, log=lambda s: None)
    run = tmp_path / "run"
    for name in ["config.json", "metrics.csv", "loss.png", "samples.png", "forward_reverse.png"]:
        assert (run / name).stat().st_size > 0, name
    assert (run / "denoising.gif").stat().st_size > 0
    assert ckpt.is_finished(run)
    assert ckpt.load_checkpoint(run).step == 60
    m = ckpt.read_metrics(run / "metrics.csv")
    assert m["step"] == [10, 20, 30, 40, 50, 60]
    assert all(math.isfinite(v) for v in m["loss"])
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert res.metrics["quality"]["sliced_wasserstein"] > 0
    # a finished run is never overwritten
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="finished"):
        train_run(_cfg(), run, progress=False, log=lambda s: None)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import difflab.app.training as runner

    real = runner.make_loss_fn

    def poisoned(built, extra_state):
        fn = real(built, extra_state)
        calls = {"n": 0}

        def loss_fn(batch, g):
            calls["n"] += 1
            loss, logs = fn(batch, g)
            return (loss * math.nan if calls["n"] > 45 else loss), logs

        return loss_fn

    monkeypatch.setattr(runner, "make_loss_fn", poisoned)
    from difflab.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="step 50"):
        runner.train_run(_cfg(), tmp_path / "run", progress=False, log=lambda s: None)
    c = ckpt.load_checkpoint(tmp_path / "run")
    assert c.step == 40
    assert all(torch.isfinite(v).all() for v in c.tensors["model"].values())
    assert not ckpt.is_finished(tmp_path / "run")


def _cli(*args, cwd=None, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "difflab", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _final_weights(run):
    return ckpt.load_checkpoint(run).tensors["model"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    sets = [a for s in FAST + ["train.steps=200", "train.ckpt_every=10"] for a in ("--set", s)]
    ref = _cli("train", "--preset", "moons", "--out", str(tmp_path / "ref"), "--no-progress", *sets)
    killed = _cli(
        "train", "--preset", "moons", "--out", str(tmp_path / "k"), "--no-progress", *sets
    )
    # kill at an arbitrary moment after the first checkpoint exists
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(tmp_path / "k") is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not ckpt.is_finished(tmp_path / "k")
    step_at_kill = ckpt.load_checkpoint(tmp_path / "k").step
    assert step_at_kill < 200
    resumed = _cli("train", "--resume", str(tmp_path / "k"), "--no-progress")
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    ref_out, ref_err = ref.communicate(timeout=400)
    assert ref.returncode == 0, ref_err
    a, b = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "k")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = ckpt.read_metrics(Path(tmp_path / "k" / "metrics.csv"))["step"]
    assert steps == sorted(set(steps)) and steps[-1] == 200
