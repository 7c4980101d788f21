"""Distillation runs through the command line: ``difflab distill`` on a tiny trained teacher,
sampling the student in 1 and 2 steps, bit-exact resume, the teacher stored in the run, and
the one-line refusals (a missing teacher, a teacher of other data, a sampler that does not
apply). The formulas themselves are tested against oracles in tests/test_distill.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def _distill(teacher: Path, out: Path, method: str, *extra: str, steps: int = 20) -> int:
    return main(["distill", str(teacher), "--method", method, "--out", str(out),
                 "--steps", str(steps), "--no-progress", *_sets(STUDENT_SETS), *extra])  # fmt: skip


def _samples(run: Path, tmp_path: Path, *extra: str) -> np.ndarray:
    out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
    assert main(["sample", str(run), "--n", "50", "--out", str(out), "--no-progress",
                 *extra]) == 0  # fmt: skip
    with np.load(out) as f:
        return f["samples"]


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_distil_then_sample_in_1_and_2_steps(teacher, tmp_path, method):
    run = tmp_path / method
    assert _distill(teacher, run, method) == 0
    assert ckpt.is_finished(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["kind"] == "distill" and cfg["distill"]["method"] == method
    frozen = json.loads(cfg["model"]["frozen"])["teacher"]
    assert frozen["path"] == str(teacher.resolve()) and len(frozen["sha256"]) == 64
    for steps in ("1", "2"):
        x = _samples(run, tmp_path, "--steps", steps)
        assert x.shape == (50, 2) and np.isfinite(x).all()
    info = json.loads((run / "finished.json").read_text())
    if method == "progressive":  # 4 -> 2 -> 1 steps: two rounds, each recorded
        assert [r["steps"] for r in info["rounds"]] == [2, 1]
        assert all(r["train_steps"] == 10 and r["loss"] > 0 for r in info["rounds"])


def test_the_student_starts_as_the_teacher_and_keeps_it_frozen(teacher, tmp_path):
    """Step 0 of a progressive run (v student of an eps teacher): student = teacher weights;
    after training the stored teacher still equals the teacher run's EMA weights."""
    run = tmp_path / "p"
    assert _distill(teacher, run, "progressive", steps=10) == 0
    t = ckpt.load_checkpoint(teacher).tensors["ema"]
    s = ckpt.load_checkpoint(run).tensors["ema"]
    assert all(torch.equal(s[f"teacher.{k}"], v) for k, v in t.items())
    assert any(not torch.equal(s[f"student.{k}"], v) for k, v in t.items())


def test_sampling_works_after_the_teacher_is_deleted(teacher, tmp_path):
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher, moved)
    run = tmp_path / "c"
    assert _distill(moved, run, "consistency", steps=10) == 0
    before = _samples(run, tmp_path, "--steps", "1")
    shutil.rmtree(moved)
    assert np.array_equal(_samples(run, tmp_path, "--steps", "1"), before)
    built = load_run(run)
    assert built.kind.name == "distill-2d"


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_an_interrupted_run_resumes_bit_exactly(teacher, tmp_path, monkeypatch, method):
    """A run killed after its step-10 checkpoint (as by kill -9: nothing saved on the way out),
    resumed to its 20 steps, equals the uninterrupted run bit for bit: weights, EMA (with the
    round state and the ECT step in the model's buffers) and optimizer state."""
    import difflab.train as trainer_module

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _distill(teacher, ref, method, "--consistency", "ect") == 0
    real_step = trainer_module.Trainer.train_step

    def killed_at_10(self):
        if self.step == 10:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", killed_at_10)
    assert _distill(teacher, cut, method, "--consistency", "ect") == 130
    assert ckpt.load_checkpoint(cut).step == 10 and not ckpt.is_finished(cut)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)
    assert main(["distill", "--resume", str(cut), "--no-progress"]) == 0
    a, b = ckpt.load_checkpoint(ref), ckpt.load_checkpoint(cut)
    assert a.step == b.step == 20
    for group in ("model", "ema"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group])
    assert json.dumps(a.state["optimizer"]["state"], default=str) == json.dumps(
        b.state["optimizer"]["state"], default=str
    )


def test_ect_tuning_runs_and_samples(teacher, tmp_path):
    run = tmp_path / "ect"
    assert _distill(teacher, run, "consistency", "--consistency", "ect", steps=10) == 0
    assert _samples(run, tmp_path, "--steps", "2").shape == (50, 2)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_an_image_teacher_distils_and_samples_in_1_and_2_steps(tmp_path, method):
    write_bar_images(tmp_path / "imgs", n=16)
    teacher = tmp_path / "teacher"
    sets = ["data.image_size=16", "data.channels=1", "model.preset=tiny-ddpm",
            "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2", "sample.steps=4",
            "sample.sampler=ddim", "train.warmup_steps=1", "diffusion.T=100"]  # fmt: skip
    data = ["--data-dir", str(tmp_path / "imgs")]
    code = main(["train", "--preset", "folder", "--out", str(teacher), *data, "--steps", "2",
                 "--no-progress", *_sets(sets)])  # fmt: skip
    assert code == 0
    run = tmp_path / method
    code = main(["distill", str(teacher), "--method", method, "--out", str(run), "--steps", "4",
                 "--batch-size", "4", "--no-progress", *_sets(STUDENT_SETS)])  # fmt: skip
    assert code == 0
    assert (run / "samples.png").is_file()
    for steps in ("1", "2"):
        x = _samples(run, tmp_path, "--steps", steps)
        assert x.shape == (50, 1, 16, 16) and x.dtype == np.uint8


def test_reflow_is_refused_in_one_line(teacher, tmp_path, capsys):
    err = _one_line_error(capsys, _distill(teacher, tmp_path / "r", "reflow"))
    assert "difflab.distill.reflow" in err and not (tmp_path / "r").exists()


def test_a_missing_teacher_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, _distill(tmp_path / "nowhere", tmp_path / "r", "consistency"))
    assert "nowhere" in err and "no such run directory" in err
    assert not (tmp_path / "r").exists()


def test_a_teacher_of_other_data_is_refused_before_the_run_exists(teacher, tmp_path, capsys):
    code = _distill(teacher, tmp_path / "r", "consistency", "--set", "data.name=mnist")
    err = _one_line_error(capsys, code)
    assert "shape" in err or "data" in err
    assert not (tmp_path / "r").exists()


def test_a_teacher_that_is_not_a_diffusion_run_is_refused(tmp_path, capsys):
    clf = tmp_path / "clf"
    (clf / "checkpoints").mkdir(parents=True)
    cfg = json.loads(json.dumps(_preset_dict("mnist-classifier")))
    (clf / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(capsys, _distill(clf, tmp_path / "r", "progressive"))
    assert "classifier run" in err


def _preset_dict(name: str) -> dict:
    from difflab.app.config import get_preset

    return get_preset(name).to_dict()


def test_samplers_that_do_not_apply_are_refused_in_one_line(teacher, tmp_path, capsys):
    run = tmp_path / "c"
    assert _distill(teacher, run, "consistency", steps=5) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, main(["sample", str(run), "--sampler", "ddim", "--n", "4"]))
    assert "consistency" in err
    err = _one_line_error(capsys, main(["sample", str(run), "--steps", "3", "--n", "4"]))
    assert "1, 2, 4" in err
    err = _one_line_error(capsys, main(["sample", str(teacher), "--sampler", "consistency"]))
    assert "needs a consistency model" in err
