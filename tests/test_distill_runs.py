"""Distillation runs through the command line: ``difflab distill`` on a tiny trained teacher,
sampling the student in 1 and 2 steps, bit-exact resume, the teacher stored in the run, and
the one-line refusals (a missing teacher, a teacher of other data, a sampler that does not
apply). The formulas themselves are tested against oracles in tests/test_distill.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.app.runs import load_run
from helpers import write_bar_images

TEACHER_SETS = ["train.batch_size=64", "train.log_every=10", "train.ckpt_every=20",
                "train.warmup_steps=5", "model.hidden=32", "model.depth=2", "sample.n=100",
                "sample.steps=8", "sample.sampler=ddim", "diffusion.T=100"]  # fmt: skip
STUDENT_SETS = ["train.log_every=5", "train.ckpt_every=10", "sample.n=100",
                "distill.teacher_steps=4", "distill.levels=6"]  # fmt: skip


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "teacher"
    args = ["train", "--preset", "moons", "--out", str(out), "--steps", "40", "--no-progress"]
    assert main([*args, *_sets(TEACHER_SETS)]) == 0
    return out


METHODS = {  # a shared run of each method, 20 steps
    "progressive": ["--method", "progressive"],
    "consistency": ["--method", "consistency"],
    "ect": ["--method", "consistency", "--consistency", "ect"],
}


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory) -> dict[str, Path]:
    """The run of each method, made when a test first asks for it."""
    root = tmp_path_factory.mktemp("students")

    class Runs(dict):
        def __missing__(self, name: str) -> Path:
            assert _distill(teacher, root / name, *METHODS[name]) == 0
            self[name] = root / name
            return self[name]

    return Runs()


def _distill(teacher: Path, out: Path, *options: str, steps: int = 20) -> int:
    return main(["distill", str(teacher), *options, "--out", str(out), "--steps", str(steps),
                 "--no-progress", *_sets(STUDENT_SETS)])  # fmt: skip


def _samples(run: Path, tmp_path: Path, *extra: str) -> np.ndarray:
    out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
    assert main(["sample", str(run), "--n", "50", "--out", str(out), "--no-progress",
                 *extra]) == 0  # fmt: skip
    with np.load(out) as f:
        return f["samples"]


@pytest.mark.parametrize("method", list(METHODS))
def test_distil_then_sample_in_1_and_2_steps(teacher, runs, tmp_path, method):
    run = runs[method]
    assert ckpt.is_finished(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["kind"] == "distill" and cfg["distill"]["method"] == METHODS[method][1]
    frozen = json.loads(cfg["model"]["frozen"])["teacher"]
    assert frozen["path"] == str(teacher.resolve()) and len(frozen["sha256"]) == 64
    for steps in ("1", "2"):
        x = _samples(run, tmp_path, "--steps", steps)
        assert x.shape == (50, 2) and np.isfinite(x).all()
    info = json.loads((run / "finished.json").read_text())
    if method == "progressive":  # 4 -> 2 -> 1 steps: two rounds, each recorded
        assert [r["steps"] for r in info["rounds"]] == [2, 1]
        assert all(r["train_steps"] == 10 and r["loss"] > 0 for r in info["rounds"])


def test_the_student_starts_as_the_teacher_and_keeps_it_frozen(teacher, runs):
    """A progressive run (v student of an eps teacher): the stored teacher equals the teacher
    run's EMA weights after training; the student has moved away from them."""
    t = ckpt.load_checkpoint(teacher).tensors["ema"]
    s = ckpt.load_checkpoint(runs["progressive"]).tensors["ema"]
    assert all(torch.equal(s[f"teacher.{k}"], v) for k, v in t.items())
    assert any(not torch.equal(s[f"student.{k}"], v) for k, v in t.items())


@pytest.mark.parametrize("method", ["consistency", "ect"])
def test_a_consistency_student_of_an_eps_teacher_predicts_v(teacher, runs, method):
    """At t_max one unit of network output moves a consistency student's one-step sample by
    sigma(T) (s - s_min) / s (a v student's x0 = alpha x - sigma v, read through
    c_out^CM / c_out^EDM), not by the eps student's sigma(T) / alpha(T): an eps student's
    one-step samples are its eps error amplified 1 / alpha(T) (157x on the DDPM schedule)."""
    assert json.loads((teacher / "config.json").read_text())["model"]["parameterization"] == "eps"
    built = load_run(runs[method])
    assert built.cfg.model.parameterization == "v"

    class Constant(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.value = value

        def forward(self, x, t, cond=None):
            return torch.full_like(x, self.value)

    sched = built.schedule
    t_max = torch.full((4,), float(sched.t_max), dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def one_step(value: float) -> torch.Tensor:
        den = built.kind.denoiser(built.cfg, SimpleNamespace(student=Constant(value)), sched)
        return den(x, t_max).x0

    gain = (one_step(1.0) - one_step(0.0)).abs()
    sigma, alpha = float(sched.sigma(t_max[:1])), float(sched.alpha(t_max[:1]))
    s, s_min = sigma / alpha, float(sched.sigma_min)
    assert torch.allclose(gain, torch.full_like(gain, sigma * (s - s_min) / s), rtol=1e-6)
    assert sigma / alpha > 1.2 * sigma  # the eps student's gain would differ


def test_sampling_works_after_the_teacher_is_deleted(teacher, tmp_path):
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher, moved)
    run = tmp_path / "c"
    assert _distill(moved, run, "--method", "consistency", steps=10) == 0
    before = _samples(run, tmp_path, "--steps", "1")
    shutil.rmtree(moved)
    assert np.array_equal(_samples(run, tmp_path, "--steps", "1"), before)
    assert load_run(run).kind.name == "distill-2d"


@pytest.mark.parametrize("method", ["progressive", "ect"])
def test_an_interrupted_run_resumes_bit_exactly(teacher, runs, tmp_path, monkeypatch, method):
    """A run killed after its step-10 checkpoint (as by kill -9: nothing saved on the way out),
    resumed to its 20 steps, equals the uninterrupted run bit for bit: weights, EMA (with the
    progressive round and the ECT step in the model's buffers) and optimizer state."""
    import difflab.train as trainer_module

    ref, cut = runs[method], tmp_path / "cut"
    real_step = trainer_module.Trainer.train_step

    def killed_at_10(self):
        if self.step == 10:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", killed_at_10)
    assert _distill(teacher, cut, *METHODS[method]) == 130
    assert ckpt.load_checkpoint(cut).step == 10 and not ckpt.is_finished(cut)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)
    assert main(["distill", "--resume", str(cut), "--no-progress"]) == 0
    a, b = ckpt.load_checkpoint(ref), ckpt.load_checkpoint(cut)
    assert a.step == b.step == 20
    for group in ("model", "ema"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])
    moments = [(a.state["optimizer"]["state"][i], b.state["optimizer"]["state"][i])
               for i in a.state["optimizer"]["state"]]  # fmt: skip
    assert all(torch.equal(x[k], y[k]) for x, y in moments for k in x)


IMAGE_SETS = ["data.image_size=16", "data.channels=1", "model.preset=tiny-ddpm",
              "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2", "sample.steps=4",
              "sample.sampler=ddim", "train.warmup_steps=1", "diffusion.T=100"]  # fmt: skip
STUDENT_IMAGE = ["--steps", "4", "--batch-size", "4", "--no-progress", *_sets(STUDENT_SETS)]


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill-images")
    write_bar_images(root / "imgs", n=16)
    teacher = root / "teacher"
    data = ["--data-dir", str(root / "imgs")]
    code = main(["train", "--preset", "folder", "--out", str(teacher), *data, "--steps", "2",
                 "--no-progress", *_sets(IMAGE_SETS)])  # fmt: skip
    assert code == 0
    return teacher


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_an_image_teacher_distils_and_samples_in_1_and_2_steps(image_teacher, tmp_path, method):
    run = tmp_path / method
    code = main(["distill", str(image_teacher), "--method", method, "--out", str(run),
                 *STUDENT_IMAGE])  # fmt: skip
    assert code == 0
    assert (run / "samples.png").is_file()
    for steps in ("1", "2"):
        x = _samples(run, tmp_path, "--steps", steps)
        assert x.shape == (50, 1, 16, 16) and x.dtype == np.uint8


def test_a_diffusers_teacher_is_imported_and_distilled(image_teacher, tmp_path):
    """A diffusers folder (the image teacher exported) is distilled after an import into a
    temporary run, which is gone afterwards; the stored teacher has the exported weights."""
    exported = tmp_path / "exported"
    assert main(["export", str(image_teacher), str(exported)]) == 0
    run = tmp_path / "student"
    data = ["--preset", "folder", "--data-dir", str(image_teacher.parent / "imgs"),
            "--set", "data.image_size=16", "--set", "data.channels=1"]  # fmt: skip
    code = main(["distill", str(exported), "--out", str(run), *data, *STUDENT_IMAGE])
    assert code == 0
    frozen = json.loads(json.loads((run / "config.json").read_text())["model"]["frozen"])
    assert not Path(frozen["teacher"]["path"]).exists()
    a = ckpt.load_checkpoint(image_teacher).tensors["ema"]
    b = ckpt.load_checkpoint(run).tensors["ema"]
    assert all(torch.allclose(b[f"teacher.{k}"], v, atol=1e-6) for k, v in a.items())
    assert _samples(run, tmp_path, "--steps", "1").shape == (50, 1, 16, 16)


def test_reflow_of_a_diffusion_teacher_is_refused_in_one_line(teacher, tmp_path, capsys):
    err = _one_line_error(capsys, _distill(teacher, tmp_path / "r", "--method", "reflow"))
    assert "flow-matching" in err and "'linear'" in err and not (tmp_path / "r").exists()


FLOW_TEACHER_SETS = ["train.batch_size=64", "train.log_every=10", "train.ckpt_every=20",
                     "train.warmup_steps=5", "model.hidden=32", "model.depth=2", "sample.n=100",
                     "sample.steps=8"]  # fmt: skip
REFLOW = ["--method", "reflow", "--set", "distill.reflow_pairs=96", "--set",
          "distill.reflow_steps=4"]  # fmt: skip


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reflow") / "teacher"
    args = ["train", "--preset", "swissroll-fm", "--out", str(out), "--steps", "40",
            "--no-progress"]  # fmt: skip
    assert main([*args, *_sets(FLOW_TEACHER_SETS)]) == 0
    return out


def test_reflow_trains_on_the_teachers_ode_pairs_and_samples_in_one_step(
    flow_teacher, tmp_path, monkeypatch, capsys
):
    """The stored pairs are (noise, the teacher's 4-step flow-heun ODE solution from it): the
    oracle is difflab.distill.reflow.reflow_pairs on the teacher run itself, on all 96 pairs
    at once where the run drew them in chunks of 40 (the last one partial), printing a line
    per chunk; the report gives the straightness of both flows; the student samples with one
    Euler step by default."""
    import difflab.app.distill as distill_task
    from difflab.distill.reflow import reflow_pairs

    monkeypatch.setattr(distill_task, "PAIR_CHUNK", 40)
    run = tmp_path / "reflow"
    assert _distill(flow_teacher, run, *REFLOW) == 0
    out = capsys.readouterr().out
    assert "reflow: drawing 96 pairs from the teacher's ODE (4 flow-heun steps each)" in out
    assert [line.split(",")[0] for line in out.splitlines() if " of 96 pairs" in line] == [
        "reflow: 40 of 96 pairs", "reflow: 80 of 96 pairs", "reflow: 96 of 96 pairs"
    ]  # fmt: skip
    tensors = ckpt.load_checkpoint(run).tensors["model"]
    noise, x0 = tensors["pair_noise"], tensors["pair_x0"]
    assert noise.shape == x0.shape == (96, 2)
    assert abs(float(noise.mean())) < 0.3 and abs(float(noise.std()) - 1) < 0.2
    t = load_run(flow_teacher)
    _, expect = reflow_pairs(t.denoiser, t.schedule, noise, steps=4, sampler="flow-heun")
    assert torch.allclose(x0, expect, atol=1e-5)
    _, fewer = reflow_pairs(t.denoiser, t.schedule, noise, steps=2, sampler="flow-heun")
    assert not torch.allclose(x0, fewer, atol=1e-3)  # the step count is the configured one
    report = json.loads((run / "finished.json").read_text())
    s = report.get("straightness") or report["report"]["straightness"]
    assert s["teacher"] > 0 and s["student"] > 0
    built = load_run(run)
    assert (built.cfg.sample.sampler, built.cfg.sample.steps) == ("flow-euler", 1)
    assert _samples(run, tmp_path).shape == (50, 2)
    assert _samples(run, tmp_path, "--steps", "2").shape == (50, 2)


@pytest.mark.parametrize("mode", ["cd", "ect"])
def test_consistency_of_a_flow_teacher_is_refused_before_the_run_exists(
    flow_teacher, tmp_path, capsys, mode
):
    """The flow schedule reaches pure noise at t = 1 (EDM sigma = inf), where Karras levels
    and the consistency parameterisation have no finite top level: refused in one line that
    names the methods that work, before the run directory exists (it used to fail in
    training, after the directory was made, or give NaN samples)."""
    out = tmp_path / "student"
    code = _distill(flow_teacher, out, "--method", "consistency", "--consistency", mode)
    err = _one_line_error(capsys, code)
    assert "diffusion.schedule='flow'" in err and "reflow or progressive" in err
    assert not out.exists()


def test_progressive_distillation_of_a_flow_teacher_samples_in_1_and_2_steps(
    flow_teacher, tmp_path
):
    """The mnist preset is a flow-matching run: progressive distillation takes it as it takes
    an eps teacher (a v student on the teacher's schedule, two rounds 4 -> 2 -> 1)."""
    run = tmp_path / "student"
    assert _distill(flow_teacher, run, "--method", "progressive") == 0
    built = load_run(run)
    assert built.cfg.model.parameterization == "v" and built.cfg.diffusion.schedule == "flow"
    info = json.loads((run / "finished.json").read_text())
    assert [r["steps"] for r in info["rounds"]] == [2, 1]
    for steps in ("1", "2"):
        x = _samples(run, tmp_path, "--steps", steps)
        assert x.shape == (50, 2) and np.isfinite(x).all()


def test_a_student_saved_without_pair_buffers_still_loads(runs):
    """Runs distilled before reflow existed have no ``pair_noise`` / ``pair_x0``, and neither
    has a non-reflow model: they load unchanged, while a reflow model still needs its pairs."""
    from difflab.app.distill import DistillModel

    model = load_run(runs["progressive"]).model
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("pair_")}
    model.load_state_dict(old)  # strict
    net = torch.nn.Linear(2, 2)
    reflow = DistillModel(net, net, rounds=0, ref_shape=(1, 2), pair_shape=(3, 2))
    state = {k: v for k, v in reflow.state_dict().items() if not k.startswith("pair_")}
    with pytest.raises(RuntimeError, match="pair_noise"):
        reflow.load_state_dict(state)


@pytest.mark.slow
def test_a_reflow_run_killed_by_sigkill_resumes_bit_exactly(flow_teacher, tmp_path):
    """A real kill -9 of a ``difflab distill`` process at an arbitrary moment after its first
    checkpoint; ``--resume`` then ends with the uninterrupted run's weights, EMA and pairs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def distill(out: Path) -> subprocess.Popen:
        args = [sys.executable, "-m", "difflab", "distill", str(flow_teacher), *REFLOW, "--out",
                str(out), "--steps", "120", "--no-progress", *_sets(STUDENT_SETS)]  # fmt: skip
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert distill(ref).wait(timeout=400) == 0
    killed = distill(cut)
    deadline = time.time() + 300
    while ckpt.latest_checkpoint(cut) is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not ckpt.is_finished(cut) and ckpt.load_checkpoint(cut).step < 120
    args = [sys.executable, "-m", "difflab", "distill", "--resume", str(cut), "--no-progress"]
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    a, b = ckpt.load_checkpoint(ref), ckpt.load_checkpoint(cut)
    assert a.step == b.step == 120
    for group in ("model", "ema"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])


def test_a_missing_teacher_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, _distill(tmp_path / "nowhere", tmp_path / "r"))
    assert "nowhere" in err and "no such run directory" in err
    assert not (tmp_path / "r").exists()


def test_a_teacher_of_other_data_is_refused_before_the_run_exists(teacher, tmp_path, capsys):
    code = _distill(teacher, tmp_path / "r", "--set", "data.name=mnist")
    err = _one_line_error(capsys, code)
    assert "shape" in err or "data" in err
    assert not (tmp_path / "r").exists()


def test_a_teacher_that_is_not_a_diffusion_run_is_refused(tmp_path, capsys):
    clf = tmp_path / "clf"
    (clf / "checkpoints").mkdir(parents=True)
    cfg = json.loads(json.dumps(_preset_dict("mnist-classifier")))
    (clf / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(capsys, _distill(clf, tmp_path / "r", "--method", "progressive"))
    assert "classifier run" in err


def _preset_dict(name: str) -> dict:
    from difflab.app.config import get_preset

    return get_preset(name).to_dict()


def test_samplers_that_do_not_apply_are_refused_in_one_line(teacher, runs, capsys):
    run = runs["consistency"]
    capsys.readouterr()
    err = _one_line_error(capsys, main(["sample", str(run), "--sampler", "ddim", "--n", "4"]))
    assert "consistency" in err
    err = _one_line_error(capsys, main(["sample", str(run), "--steps", "3", "--n", "4"]))
    assert "1, 2, 4" in err
    err = _one_line_error(capsys, main(["sample", str(teacher), "--sampler", "consistency"]))
    assert "needs a consistency model" in err
