"""Training options around the loop: post-hoc EMA in a run and `difflab ema`, the AdamW kernel,
channels-last, and the progress bar of a time-budgeted run."""

from __future__ import annotations

import re
import time

import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.posthoc_ema import list_snapshots
from difflab.train import Trainer, lr_at

FAST = ["train.steps=60", "train.batch_size=32", "train.log_every=10", "train.ckpt_every=20",
        "train.warmup_steps=5", "model.hidden=16", "model.depth=2", "sample.n=50",
        "sample.steps=5", "sample.sampler=ddim"]  # fmt: skip
POSTHOC = ["train.posthoc_ema=0.05,0.10", "train.posthoc_ema_every=10",
           "train.posthoc_ema_keep=3"]  # fmt: skip


def _train(out, *sets: str, extra: tuple[str, ...] = ()) -> int:
    args = ["train", "--preset", "moons", "--out", str(out), "--no-progress", "--device", "cpu"]
    for s in (*FAST, *sets):
        args += ["--set", s]
    return main([*args, *extra])


def _files(run):
    return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("posthoc") / "run"
    assert _train(run, *POSTHOC) == 0
    return run


def test_a_posthoc_run_keeps_bounded_snapshots_and_its_profiles(posthoc_run):
    steps = [s.step for s in list_snapshots(posthoc_run / "posthoc-ema")]
    # every 10 steps, at most keep = 3 on the interval (doubled to 20 at step 40) + the newest
    assert steps == [20, 40, 60]
    c = ckpt.load_checkpoint(posthoc_run)
    assert {"posthoc_ema_0", "posthoc_ema_1"} <= set(c.tensors)


def test_difflab_ema_gives_a_stored_profile_back_and_writes_a_new_run(posthoc_run, capsys):
    before = _files(posthoc_run)
    out = posthoc_run.parent / "ema-0.10"
    assert main(["ema", str(posthoc_run), "--length", "0.10", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    stored = ckpt.load_checkpoint(posthoc_run).tensors["posthoc_ema_1"]
    rebuilt = ckpt.load_checkpoint(out).tensors["ema"]
    for k, v in stored.items():  # float32 snapshots, coefficients e_k up to round-off
        torch.testing.assert_close(rebuilt[k], v, rtol=1e-4, atol=1e-5)
    assert ckpt.is_finished(out) and ckpt.read_config(out) == ckpt.read_config(posthoc_run)
    assert _files(posthoc_run) == before  # the run's own files are never written
    from difflab.app.runs import load_run

    load_run(out)  # samples as any run
    # the default output lies beside the run
    assert main(["ema", str(posthoc_run), "--length", "0.07"]) == 0
    assert (posthoc_run.parent / "run-ema-0.07" / "finished.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--length", "0.5"], "sigma_rel must be in"),
        (["--length", "0.08", "--out", "{run}"], "is a run directory"),
        (["--length", "0.08", "--out", "{run}/checkpoints/x"], "inside the checkpoints/"),
        (["--length", "0.08", "--out", "{run}/config.json"], "is a file of the run"),
    ],
)
def test_difflab_ema_refuses_bad_input_in_one_line(posthoc_run, capsys, args, message):
    before = _files(posthoc_run)
    args = [a.replace("{run}", str(posthoc_run)) for a in args]
    assert main(["ema", str(posthoc_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert _files(posthoc_run) == before


def test_difflab_ema_refuses_a_run_without_snapshots(tmp_path, capsys, one_thread):
    run = tmp_path / "plain"
    assert _train(run, "train.steps=10") == 0
    assert not (run / "posthoc-ema").exists()
    assert main(["ema", str(run), "--length", "0.08"]) == 2
    err = capsys.readouterr().err
    assert "no post-hoc EMA snapshots" in err and err.count("\n") == 1
    assert main(["ema", str(tmp_path / "nothing"), "--length", "0.08"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, one_thread):
    """`train.compile_mode` is the mode torch.compile gets ("reduce-overhead": CUDA graphs of
    the compiled calls on a GPU). The compiler is stubbed: what is tested is the plumbing from
    the config to `nn.Module.compile`, which a dropped argument would break silently (the
    numerics of a compiled network are `tests/test_speed.py`'s)."""
    import difflab.inference as inference

    modes = []
    monkeypatch.setattr(inference, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
    for mode in ("reduce-overhead", "default"):
        sets = ["train.compile=true", f"train.compile_mode={mode}", "train.steps=2"]
        assert _train(tmp_path / mode, *sets) == 0
        assert modes[-1] == mode
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        _toy_trainer(compile_mode="fast")  # refused in direct use too, even with compile off


@pytest.mark.parametrize("bad", ["train.posthoc_ema=0.05", "train.posthoc_ema=0.05,0.5",
                                 "train.adamw=sgd", "train.posthoc_ema_keep=0",
                                 "train.lr_decay=step", "train.compile_mode=fast"])  # fmt: skip
def test_bad_lever_settings_are_refused_before_the_run_directory_exists(tmp_path, capsys, bad):
    assert _train(tmp_path / "run", bad) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def _toy_trainer(**options):
    from difflab.data.toy import sample_toy
    from difflab.nn.mlp import TimeMLP
    from difflab.objectives import diffusion_loss
    from difflab.parameterization import ModelDenoiser
    from difflab.schedules import DiscreteSchedule

    torch.manual_seed(0)
    model = TimeMLP(dim=2, hidden=32, depth=2)
    den = ModelDenoiser(model, DiscreteSchedule.from_name("linear", 100))
    return Trainer(
        model,
        batch_fn=lambda step, g: sample_toy("moons", 32, generator=g),
        loss_fn=lambda x0, g: (diffusion_loss(den, x0, generator=g).loss, {}),
        lr=1e-3,
        batch_size=32,
        ema_half_life_images=200,
        **options,
    )


def test_resume_with_posthoc_profiles_is_bit_exact(tmp_path):
    straight = _toy_trainer(posthoc_ema=(0.05, 0.10))
    for _ in range(12):
        straight.train_step()
    first = _toy_trainer(posthoc_ema=(0.05, 0.10))
    for _ in range(6):
        first.train_step()
    ckpt.save_checkpoint(tmp_path, step=6, tensors=first.tensors(), state=first.state())
    resumed = _toy_trainer(posthoc_ema=(0.05, 0.10))
    c = ckpt.load_checkpoint(tmp_path)
    resumed.load(c.tensors, c.state)
    for _ in range(6):
        resumed.train_step()
    assert straight.posthoc is not None and resumed.posthoc is not None
    for a, b in zip(straight.posthoc.models, resumed.posthoc.models):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    # off by default: a checkpoint holds the model and its EMA only (fingerprints unchanged)
    assert set(_toy_trainer().tensors()) == {"model", "ema"}


def test_a_time_budgeted_run_shows_its_budget_not_its_steps(tmp_path, capsys, one_thread):
    # 0.02 min = 1.2 s of a run of a million steps: the bar must speak of the budget
    extra = ("--minutes", "0.02")
    args = ["train", "--preset", "moons", "--out", str(tmp_path / "run"), "--device", "cpu"]
    for s in (*FAST, "train.steps=1000000"):  # a --set wins over --steps
        args += ["--set", s]
    assert main([*args, *extra]) == 0
    err = capsys.readouterr().err
    last = [line for line in err.replace("\r", "\n").splitlines() if "of 00:01" in line][-1]
    assert "left, step " in last and "loss=" in last, last
    assert "1000000" not in err and "1,000,000" not in err and "it/s" not in err


def test_the_budget_bar_counts_down_to_the_budget_or_the_steps(capsys):
    from difflab.app.progress import training_bar

    start = time.perf_counter() - 30.0  # 30 s into a 10-minute budget
    bar = training_bar(steps=10_000, initial=0, budget_s=600.0, start=start, disable=False)
    bar.update(100)  # 100 steps in 30 s: 9,900 steps need ~49 min, the budget ends first
    text = bar.bar.desc
    assert re.match(r"00:3[01] of 10:00, 09:(29|30) left, step 100$", text), text
    bar.close()
    start = time.perf_counter() - 30.0
    bar = training_bar(steps=200, initial=0, budget_s=600.0, start=start, disable=False)
    bar.update(100)  # 100 steps left at 0.3 s each: 00:30 left, before the budget
    assert re.search(r", 00:(29|30) left, step 100$", bar.bar.desc), bar.bar.desc
    bar.close()
    steps = training_bar(steps=50, initial=10, budget_s=None, start=start, disable=False)
    assert steps.total == 50 and steps.n == 10  # a run without a budget counts steps
    steps.close()


def _unet_trainer(**options):
    from difflab.nn.unet import build_unet
    from difflab.objectives import diffusion_loss
    from difflab.parameterization import ModelDenoiser
    from difflab.schedules import DiscreteSchedule

    torch.manual_seed(0)
    model = build_unet("tiny", image_size=16, dropout=0.0)
    den = ModelDenoiser(model, DiscreteSchedule.from_name("linear", 100))
    return Trainer(
        model,
        batch_fn=lambda step, g: torch.rand(8, 1, 16, 16, generator=g) * 2 - 1,
        loss_fn=lambda x0, g: (diffusion_loss(den, x0, generator=g).loss, {}),
        lr=2e-3,
        batch_size=8,
        ema_half_life_images=50,
        **options,
    )


@pytest.mark.parametrize(
    "options", [{"adamw": "foreach"}, {"adamw": "fused"}, {"channels_last": True}]
)
def test_throughput_levers_train_the_same_model_to_round_off(options, one_thread):
    # the same sums in another order: a lever that skipped a step, dropped weight decay or
    # left the EMA in NHWC with a transposed copy would differ by far more than round-off
    ref, lever = _unet_trainer(weight_decay=0.01), _unet_trainer(weight_decay=0.01, **options)
    for _ in range(8):
        loss_ref, loss = ref.train_step()["loss"], lever.train_step()["loss"]
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-6)
    for group in ("model", "ema"):
        a, b = ref.tensors()[group], lever.tensors()[group]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{group} {k}")
    if options.get("channels_last"):
        conv = next(p for p in lever.model.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        ema_conv = next(p for p in lever.ema.model.parameters() if p.dim() == 4)
        assert ema_conv.is_contiguous()


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_step_budget_decays_the_lr_by_the_steps_taken_before_each_step(tmp_path, decay,
                                                                          one_thread):  # fmt: skip
    assert _train(tmp_path / "run", f"train.lr_decay={decay}", "train.log_every=1") == 0
    m = ckpt.read_metrics(tmp_path / "run" / "metrics.csv")
    # the row of step s logs the rate of step index s - 1: spent (s - 1) / 60 of the budget
    for s, lr in zip(m["step"], m["lr"]):
        want = lr_at(s - 1, lr=1e-3, warmup_steps=5, decay=decay, progress=(s - 1) / 60)
        assert lr == pytest.approx(want, rel=1e-6, abs=1e-12), s
    assert m["lr"][-1] < 1e-3 * 0.02


def test_a_time_budget_decays_the_lr_by_the_time_spent(tmp_path, capsys, one_thread):
    # a million steps in 3 s: the steps' clock stays near 0, so only the time can decay it
    # (the steps as a --set: a --set wins over --steps)
    sets = ["train.lr_decay=linear", "train.log_every=1", "train.ckpt_every=100000",
            "train.steps=1000000"]  # fmt: skip
    assert _train(tmp_path / "run", *sets, extra=("--minutes", "0.05")) == 0
    m = ckpt.read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(m["step"]) > 50
    # the rate of step s is lr (1 - spent / 3 s), spent read between the clock of step s - 1's
    # row and that of step s's: so spent / 3 s = 1 - lr_s / lr lies between their fractions
    el, lr = m["elapsed_s"], m["lr"]
    for k in range(5, len(el)):  # after the 5 warm-up steps
        spent = 1 - lr[k] / 1e-3
        assert el[k - 1] / 3.0 - 1e-9 <= spent <= el[k] / 3.0 + 1e-9, (m["step"][k], spent)
    assert m["lr"][-1] < 1e-3 * 0.1
