"""A fault battery: divergence, concurrent writers, SIGTERM, a full disk, bad values and files.

Each test reproduces a failure that once lost data or ended in a traceback, and checks the
guarantee that replaced it (docs/DESIGN.md, "What survives which fault"): nothing written is
lost, nothing non-finite is saved or sampled, every failure is one line and a non-zero exit,
and bad input is refused before a run directory exists.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.app.config import apply_overrides, get_preset
from difflab.safe_io import MetricsLog, read_metrics

SMALL = [
    "train.batch_size=64",
    "train.log_every=10",
    "train.ckpt_every=10",
    "train.warmup_steps=5",
    "model.hidden=32",
    "model.depth=2",
    "sample.n=100",
    "sample.steps=10",
    "sample.sampler=ddim",
]


def _sets(*items: str) -> list[str]:
    return [a for s in (*SMALL, *items) for a in ("--set", s)]


def _train(out: Path, *items: str, extra: tuple[str, ...] = ()) -> int:
    return main(["train", "--preset", "moons", "--out", str(out), "--no-progress",
                 *_sets(*items), *extra])  # fmt: skip


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err
    return err


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "difflab", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    assert _train(out, "train.steps=30") == 0
    return out


# ----------------------------------------------------------------------------- divergence
def _poison_after(monkeypatch, n_good: int) -> None:
    """Make the training loss NaN from step ``n_good + 1`` on."""
    import difflab.app.training as runner

    real = runner.make_loss_fn

    def poisoned(built, extra_state):
        fn, calls = real(built, extra_state), {"n": 0}

        def loss_fn(batch, g):
            calls["n"] += 1
            loss, logs = fn(batch, g)
            return (loss * float("nan") if calls["n"] > n_good else loss), logs

        return loss_fn

    monkeypatch.setattr(runner, "make_loss_fn", poisoned)


def test_divergence_between_misaligned_intervals_saves_nothing_non_finite(tmp_path, monkeypatch):
    """The loss turns NaN at step 26 with checkpoints every 20 and log rows every 100 steps:
    the step-40 save is refused (no non-finite state is ever saved, nothing older pruned for
    it), and the message names the checkpoint that is really kept."""
    from difflab.app.training import train_run
    from difflab.train import TrainingDiverged

    _poison_after(monkeypatch, 25)
    cfg = apply_overrides(get_preset("moons"), [*SMALL, "train.steps=300",
                          "train.ckpt_every=20", "train.log_every=100"])  # fmt: skip
    with pytest.raises(TrainingDiverged, match="step 40.*step-00000020, is kept"):
        train_run(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    c = ckpt.load_checkpoint(tmp_path / "r")
    assert c.step == 20
    assert [p.name for p in (tmp_path / "r" / "checkpoints").glob("step-*")] == ["step-00000020"]
    for group in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in c.tensors[group].values())


def test_divergence_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    _poison_after(monkeypatch, 4)
    err = _one_line_error(
        capsys, _train(tmp_path / "r", "train.steps=300", "train.ckpt_every=1000")
    )
    assert "diverged" in err and "no checkpoint had been written" in err
    assert ckpt.latest_checkpoint(tmp_path / "r") is None


def test_a_huge_learning_rate_never_leaves_a_non_finite_checkpoint(tmp_path, capsys):
    """lr 1e6 without warm-up: the weights blow up; the run ends in one line or finishes, and
    every checkpoint it leaves is finite."""
    out = tmp_path / "r"
    code = _train(out, "train.steps=200", "train.ckpt_every=20", "train.log_every=100",
                  "train.warmup_steps=0", extra=("--lr", "1e6"))  # fmt: skip
    if code != 0:
        assert "diverge" in _one_line_error(capsys, code)
    for step_dir in (out / "checkpoints").glob("step-*"):
        c = ckpt.load_checkpoint(step_dir)
        for group in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in c.tensors[group].values())


def _non_finite(obj, where: str = "") -> list[str]:
    """The names of the floating tensors in a nested state that hold a NaN or an inf."""
    if isinstance(obj, torch.Tensor):
        return [where] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _non_finite(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in _non_finite(v, f"{where}[{i}]")]
    return []


def test_divergence_never_saves_a_non_finite_optimizer_state(tmp_path, capsys):
    """lr 1e6 without clipping or warm-up, a checkpoint every step: Adam's exp_avg_sq turns
    infinite a step before the weights do; no checkpoint holds it (weights, EMA, optimizer)."""
    out = tmp_path / "r"
    code = _train(out, "train.steps=50", "train.ckpt_every=1", "train.log_every=1",
                  "train.grad_clip=0", "train.warmup_steps=0", extra=("--lr", "1e6"))  # fmt: skip
    assert "diverged" in _one_line_error(capsys, code)
    for step_dir in (out / "checkpoints").glob("step-*"):
        c = ckpt.load_checkpoint(step_dir)
        assert _non_finite(c.tensors) == [] and _non_finite(c.state) == [], step_dir


def test_sample_and_eval_refuse_non_finite_weights(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((run / "config.json").read_text())
    c = ckpt.load_checkpoint(run)
    nan = {
        g: {k: torch.full_like(v, float("nan")) for k, v in t.items()} for g, t in c.tensors.items()
    }
    ckpt.save_checkpoint(bad, step=c.step, tensors=nan, state=c.state)
    for cmd in (["sample", str(bad), "--n", "4"], ["eval", str(bad), "--n", "10"]):
        err = _one_line_error(capsys, main(cmd))
        assert "not finite" in err
    assert not list(bad.glob("samples-*"))


# ----------------------------------------------------------------------------- concurrent writers
def test_a_second_writer_of_a_run_is_refused_with_the_pid(tmp_path):
    out = tmp_path / "r"
    first = _cli("train", "--preset", "moons", "--out", str(out), "--no-progress",
                 *_sets("train.steps=100000"))  # fmt: skip
    try:
        _wait_for(lambda: ckpt.latest_checkpoint(out) is not None)
        second = _cli("train", "--resume", str(out), "--no-progress")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"PID {first.pid}" in err and "in use" in err and len(err.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130


def _same(a, b) -> bool:
    """Nested states (dicts, lists, tensors, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_sigterm_at_every_point_of_a_step_saves_one_step_boundary(tmp_path, monkeypatch):
    """SIGTERM delivered at each line that the training loop and the Trainer execute during
    one step (a trace hook sends it, not timing luck): the checkpoint saved on the way out
    holds the weights, EMA, optimizer state and step count of one step boundary, equal bit
    for bit to the uninterrupted run's state at that step."""
    import copy

    import difflab.app.training as runner
    import difflab.train as trainer_module
    from difflab.app.training import train_run

    monkeypatch.setattr(runner, "_finish", lambda *a, **k: {})  # the report is not at stake
    sets = [*SMALL, "train.steps=4", "train.log_every=1", "train.warmup_steps=2"]
    states: dict[int, tuple] = {}
    real_save = ckpt.save_checkpoint

    def recording(run_dir, *, step, tensors, state, **kw):
        states.setdefault(step, copy.deepcopy((tensors, state)))
        return real_save(run_dir, step=step, tensors=tensors, state=state, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    quiet = {"progress": False, "log": lambda s: None}
    train_run(apply_overrides(get_preset("moons"), [*sets, "train.ckpt_every=1"]),
              tmp_path / "ref", **quiet)  # fmt: skip
    assert sorted(states) == [1, 2, 3, 4]
    cfg = apply_overrides(get_preset("moons"), [*sets, "train.ckpt_every=1000"])
    files = {runner.__file__, trainer_module.__file__}
    real_step = trainer_module.Trainer.train_step

    def run_with_signal_at(k: int) -> int:
        """Send SIGTERM at the k-th distinct line traced in step 2 (the third step); return
        -1, or the number of distinct lines of that step when k is beyond them."""
        lines: list = []

        def local(frame, event, arg):
            if event == "line" and (frame.f_code.co_filename, frame.f_lineno) not in lines:
                if len(lines) == k:
                    os.kill(os.getpid(), signal.SIGTERM)
                lines.append((frame.f_code.co_filename, frame.f_lineno))
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename in files else None

        def train_step(self):  # trace from the start of step 2 to the start of step 3
            if self.step in (2, 3):
                sys.settrace(tracer if self.step == 2 else None)
                loop = sys._getframe(1)
                loop.f_trace = local if self.step == 2 else None
                if self.step == 2:
                    loop.f_trace_lines = True
            return real_step(self)

        monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
        out = tmp_path / f"k{k}"
        try:
            train_run(cfg, out, **quiet)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if len(lines) <= k:
            return len(lines)
        c = ckpt.load_checkpoint(out)
        tensors, state = states[c.step]
        assert _same(c.tensors, tensors) and _same(c.state, state), (k, c.step)
        return -1

    k = 0
    while (n := run_with_signal_at(k)) < 0:
        k += 1
    assert n == k > 20  # every line of the step was tried


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    """A real SIGTERM at whatever moment it lands: the run stops at a step boundary (see the
    test above for every moment of a step), and resumed to S steps it equals a run of S steps.
    The run is long enough that the signal always lands while it trains."""
    items = ("train.ckpt_every=100000", "train.log_every=10")
    term = _cli("train", "--preset", "moons", "--out", str(tmp_path / "t"), "--no-progress",
                *_sets("train.steps=100000", *items))  # fmt: skip
    metrics = tmp_path / "t" / "metrics.csv"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3)
    term.send_signal(signal.SIGTERM)
    _, err = term.communicate(timeout=120)
    assert term.returncode == 130 and "interrupted" in err
    stopped = ckpt.load_checkpoint(tmp_path / "t").step  # saved on SIGTERM (no periodic ones)
    assert stopped >= 30
    total = stopped + 25
    resumed = _cli("train", "--resume", str(tmp_path / "t"), "--steps", str(total),
                   "--no-progress")  # fmt: skip
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ref = _cli("train", "--preset", "moons", "--out", str(tmp_path / "ref"), "--no-progress",
               *_sets(f"train.steps={total}", *items))  # fmt: skip
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    a = ckpt.load_checkpoint(tmp_path / "ref")
    b = ckpt.load_checkpoint(tmp_path / "t")
    assert a.step == b.step == total
    assert _same(a.tensors, b.tensors) and _same(a.state, b.state)


def test_two_samplers_writing_one_file_leave_a_complete_file(run, tmp_path):
    out = tmp_path / "same.npz"
    procs = [_cli("sample", str(run), "--n", "300", "--seed", str(i), "--out", str(out))
             for i in range(3)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with np.load(out) as data:
        assert data["samples"].shape == (300, 2)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_sample_write_that_fails_keeps_the_earlier_file(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "8", "--out", str(out), "--no-progress"]) == 0
    before = out.read_bytes()

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    # (no progress bar: the bar of the finished sampling would precede the error line)
    args = ["sample", str(run), "--n", "8", "--out", str(out), "--no-progress"]
    err = _one_line_error(capsys, main(args))
    assert "No space left on device" in err and str(out) in err
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_output_path_is_checked_before_sampling(run, tmp_path, capsys, monkeypatch):
    import difflab.app.sampling as sampling

    def never(*a, **k):
        raise AssertionError("sampled before checking the output path")

    monkeypatch.setattr(sampling, "draw_samples", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_error(capsys, main(["sample", str(run), "--out", str(blocker / "s.npz")]))
    assert str(blocker) in err


def test_out_may_name_an_existing_folder(run, tmp_path, capsys):
    assert main(["sample", str(run), "--n", "8", "--out", str(tmp_path)]) == 0
    written = capsys.readouterr().out.split()[1]
    assert Path(written).parent == tmp_path and Path(written).is_file()


# ----------------------------------------------------------------------------- full disk
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    tmp_path, capsys, monkeypatch
):
    real = ckpt.write_file
    calls = {"n": 0}

    def full_after_first_checkpoint(path, data):
        if Path(path).parent.name.startswith(".tmp-step-00000020"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        calls["n"] += 1
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_file", full_after_first_checkpoint)
    err = _one_line_error(capsys, _train(tmp_path / "r", "train.steps=40"))
    assert "No space left on device" in err and "step-00000020" in err
    assert calls["n"] > 0
    c = ckpt.load_checkpoint(tmp_path / "r")
    assert c.step == 10
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "train.ckpt_every=0"], "train.ckpt_every"),
        (["--set", "train.log_every=0"], "train.log_every"),
        (["--set", "train.ckpt_every=-1"], "train.ckpt_every"),
        (["--set", "train.max_minutes=-1"], "train.max_minutes"),
        (["--set", "diffusion.T=0"], "diffusion.T"),
        (["--set", "model.hidden=0"], "model.hidden"),
        (["--set", "sample.n=0"], "sample.n"),
        (["--set", "diffusion.schedule=wobbly"], "diffusion.schedule"),
        (["--set", "diffusion.beta_end=1.5"], "diffusion.beta_end"),
        (["--set", "diffusion.beta_start=0.02", "--set", "diffusion.beta_end=0.01"], "below"),
        (["--set", "diffusion.beta_start=0.5"], "below beta_end (0.02)"),  # the default end
        (["--set", "diffusion.schedule=cosine", "--set", "diffusion.beta_end=0.01"], "cosine"),
        (["--set", "model.kind=transformer"], "model.kind"),
        (["--set", "data.name=imagenet"], "data.name"),
        (["--lr", "nan"], "--lr"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_values_are_refused_before_the_run_directory_exists(tmp_path, capsys, args, expected):
    out = tmp_path / "r"
    err = _one_line_error(capsys, _train(out, "train.steps=10", extra=tuple(args)))
    assert expected in err
    assert not out.exists()


def test_corrupt_dataset_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03 not an idx file"))
    out = tmp_path / "r"
    code = main(["train", "--preset", "mnist", "--out", str(out), "--data-dir", str(data),
                 "--no-progress"])  # fmt: skip
    err = _one_line_error(capsys, code)
    assert "mnist" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--guidance", "nan"], "--guidance"),
        (["--device", "tpu"], "tpu"),
        (["--eta", "-1"], "--eta"),
    ],
)
def test_bad_sample_values_are_one_line(run, capsys, args, expected):
    assert expected in _one_line_error(capsys, main(["sample", str(run), "--n", "4", *args]))


def _edited(run: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "checkpoints").symlink_to(run / "checkpoints")
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["train"].update(lr="fast"), "train.lr"),
        (lambda c: c.update(model=[1, 2]), "'model'"),
        (lambda c: c["model"].update(hidden=48), "do not fit"),
        (lambda c: c["diffusion"].update(T=True), "diffusion.T"),
    ],
)
def test_hand_edited_config_is_one_line(run, tmp_path, capsys, edit, expected):
    copy = _edited(run, tmp_path, edit)
    assert expected in _one_line_error(capsys, main(["sample", str(copy), "--n", "4"]))


# ----------------------------------------------------------------------------- checkpoints
def _two_checkpoints(tmp_path: Path) -> Path:
    out = tmp_path / "r"
    assert _train(out, "train.steps=20", "train.ckpt_every=10") == 0
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-00000010", "step-00000020"]
    return out


def test_a_corrupt_newest_checkpoint_falls_back_and_says_so(tmp_path, capsys):
    out = _two_checkpoints(tmp_path)
    capsys.readouterr()
    f = out / "checkpoints" / "step-00000020" / "ema.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0
    err = capsys.readouterr().err
    assert "step-00000020" in err and "SHA-256" in err and "using step-00000010" in err


def test_a_missing_newest_manifest_falls_back_and_says_so(tmp_path, capsys):
    out = _two_checkpoints(tmp_path)
    capsys.readouterr()
    (out / "checkpoints" / "step-00000020" / "manifest.json").unlink()
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0
    err = capsys.readouterr().err
    assert "step-00000020" in err and "manifest missing" in err and "using step-00000010" in err


def test_a_finished_run_can_be_extended_bit_exactly(tmp_path):
    ref, ext = tmp_path / "ref", tmp_path / "ext"
    assert _train(ref, "train.steps=50") == 0
    assert _train(ext, "train.steps=30") == 0
    assert main(["train", "--resume", str(ext), "--steps", "50", "--no-progress"]) == 0
    assert ckpt.is_finished(ext)
    a = ckpt.load_checkpoint(ref).tensors
    b = ckpt.load_checkpoint(ext).tensors
    for group in ("model", "ema"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group])
    assert read_metrics(ext / "metrics.csv")["step"] == [10, 20, 30, 40, 50]


def test_extending_needs_a_larger_budget(run, capsys):
    err = _one_line_error(capsys, main(["train", "--resume", str(run), "--steps", "30"]))
    assert "step 30" in err
    err = _one_line_error(capsys, main(["train", "--resume", str(run)]))
    assert "finished" in err


def test_data_dir_is_stored_resolved_and_may_change_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "moons", "--out", "r", "--data-dir", "data",
                 "--no-progress", *_sets("train.steps=20")])  # fmt: skip
    assert code == 0
    stored = json.loads((tmp_path / "r" / "config.json").read_text())["data"]["data_dir"]
    assert stored == str(tmp_path / "data")
    code = main(["train", "--resume", "r", "--steps", "30", "--data-dir", "elsewhere",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    stored = json.loads((tmp_path / "r" / "config.json").read_text())["data"]["data_dir"]
    assert stored == str(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------- printing and files
def test_a_closed_stdout_never_breaks_a_run(tmp_path):
    out = tmp_path / "r"
    p = _cli("train", "--preset", "moons", "--out", str(out), "--no-progress",
             *_sets("train.steps=40"))  # fmt: skip
    assert p.stdout is not None
    p.stdout.readline()
    p.stdout.close()  # as `difflab train ... | head -1` does
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert ckpt.is_finished(out)


def test_metrics_with_a_bom_and_crlf_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"\xef\xbb\xbfstep,loss\r\n10,1.0\r\n20,0.5\r\n30,0.4\r\n")
    with MetricsLog(path, ["step", "loss"], resume_step=20) as log:
        log.append(step=30, loss=0.3)
    assert path.read_bytes() == b"step,loss\n10,1.0\n20,0.5\n30,0.3\n"
    assert read_metrics(path)["step"] == [10, 20, 30]


def test_undecodable_metrics_name_the_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"step,loss\n10,\xff\xfe\n")
    with pytest.raises(ckpt.CheckpointError, match="metrics.csv.*UTF-8"):
        MetricsLog(path, ["step", "loss"], resume_step=10)


# ----------------------------------------------------------------------------- unfinished runs
def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(run, tmp_path, capsys):
    """Killed after the step-30 checkpoint but before finished.json: resume writes the report
    (samples, figures, quality) and finished.json instead of asking for a larger --steps."""
    import shutil

    copy = tmp_path / "u"
    shutil.copytree(run, copy)
    (copy / "finished.json").unlink()
    for name in ("samples.png", "loss.png"):
        (copy / name).unlink()
    before = ckpt.load_checkpoint(copy)
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 0, capsys.readouterr().err
    assert ckpt.is_finished(copy)
    assert json.loads((copy / "finished.json").read_text())["step"] == 30
    assert (copy / "samples.png").is_file() and (copy / "loss.png").is_file()
    after = ckpt.load_checkpoint(copy)
    assert after.step == 30
    assert all(torch.equal(before.tensors["ema"][k], after.tensors["ema"][k])
               for k in before.tensors["ema"])  # fmt: skip
    assert read_metrics(copy / "metrics.csv")["step"] == [10, 20, 30]


def test_resume_with_every_checkpoint_corrupt_is_refused(tmp_path, capsys):
    """Every checkpoint corrupt: resume refuses in one line naming what it skipped, instead of
    silently training again from step 0 over the run's files."""
    out = _two_checkpoints(tmp_path)
    (out / "finished.json").unlink()
    for step_dir in (out / "checkpoints").glob("step-*"):
        f = step_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-8])
    capsys.readouterr()
    metrics = (out / "metrics.csv").read_bytes()
    err = _one_line_error(capsys, main(["train", "--resume", str(out), "--no-progress"]))
    assert "no complete checkpoint" in err and "truncated" in err
    assert (out / "metrics.csv").read_bytes() == metrics
    assert not ckpt.is_finished(out)


def test_resume_before_the_first_checkpoint_starts_at_step_0_and_says_so(tmp_path, capsys):
    out = tmp_path / "r"
    assert _train(out, "train.steps=20", "train.ckpt_every=10") == 0
    (out / "finished.json").unlink()
    import shutil

    shutil.rmtree(out / "checkpoints")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().out
    assert ckpt.load_checkpoint(out).step == 20


# ----------------------------------------------------------------------------- outputs on a run
@pytest.mark.parametrize(
    "out, expected",
    [
        ("checkpoints/step-00000030/model.safetensors", "inside the checkpoints/ folder"),
        ("config.json", "file of the run directory"),
        ("config.npz", "config.json is a file of the run directory"),  # the timing JSON
        ("samples.npz", "samples.png is a file of the run directory"),  # the run's own figure
    ],
)
def test_sample_output_on_a_file_of_the_run_is_refused_before_sampling(
    run, tmp_path, capsys, monkeypatch, out, expected
):
    import shutil

    import difflab.app.sampling as sampling

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    monkeypatch.setattr(sampling, "draw_samples", lambda *a, **k: pytest.fail("sampled"))
    args = ["sample", str(copy), "--n", "8", "--no-progress", "--out", str(copy / out)]
    assert expected in _one_line_error(capsys, main(args))
    assert all(p.read_bytes() == data for p, data in before.items())


def test_sample_outputs_in_a_run_directory_are_new_files(run, tmp_path):
    """New files beside the run's own are fine; a default name never replaces one."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    args = ["sample", str(copy), "--n", "8", "--no-progress"]
    assert main(args) == 0 and main(args) == 0 and main([*args, "--out", str(copy)]) == 0
    assert len(list(copy.glob("samples-*.npz"))) == 3
    assert main([*args, "--out", str(copy / "metrics.npz")]) == 0  # beside metrics.csv
    assert all(p.read_bytes() == data for p, data in before.items())


def test_sample_output_in_the_data_directory_is_refused(run, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    copy = _edited(run, tmp_path, lambda c: c["data"].update(data_dir=str(data)))
    err = _one_line_error(capsys, main(["sample", str(copy), "--n", "4", "--out",
                                        str(data / "s.npz")]))  # fmt: skip
    assert "data directory" in err
    assert not list(data.iterdir())


def test_export_never_replaces_a_run_or_a_folder_that_is_not_an_export(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    cases = [
        (copy, "is a run directory"),
        (copy / "checkpoints", "file of the run"),
        (other, "not an exported folder"),
        (tmp_path, "not an exported folder"),
    ]
    for out, expected in cases:
        err = _one_line_error(capsys, main(["export", str(copy), str(out), "--overwrite"]))
        assert expected in err
    assert (other / "keep.txt").read_text() == "mine"
    assert ckpt.load_checkpoint(copy).step == 30 and ckpt.is_finished(copy)


def test_viz_and_a_new_run_never_land_on_a_run(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = (copy / "config.json").read_bytes()
    err = _one_line_error(capsys, main(["viz", "schedules", "--out", str(copy / "config.json")]))
    assert "file of the run directory" in err
    err = _one_line_error(capsys, _train(copy / "checkpoints" / "new", "train.steps=10"))
    assert "inside the checkpoints/ folder" in err
    assert (copy / "config.json").read_bytes() == config
    assert not (copy / "checkpoints" / "new").exists()


@pytest.mark.parametrize("what", ["train", "sample"])
def test_a_closed_stderr_never_breaks_a_run(run, tmp_path, what):
    """`difflab train ... 2>&1 | head -1`: the progress bar's stream closes; the work goes on."""
    out = tmp_path / ("r" if what == "train" else "s.npz")
    if what == "train":
        args = ["train", "--preset", "moons", "--out", str(out), *_sets("train.steps=300")]
    else:
        args = ["sample", str(run), "--n", "2000", "--batch-size", "100", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "difflab", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert p.stdout is not None
    p.stdout.read(10)
    p.stdout.close()  # as `| head -c 10` does
    assert p.wait(timeout=300) == 0
    assert ckpt.is_finished(out) if what == "train" else out.is_file()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["diffusion"].pop("schedule"), "diffusion.schedule"),
        (lambda c: c.pop("diffusion"), "'diffusion' section"),
        (lambda c: c["model"].pop("parameterization"), "model.parameterization"),
        (lambda c: c.clear(), "no 'preset'"),
    ],
)
def test_a_stored_config_missing_a_key_is_refused(run, tmp_path, capsys, edit, expected):
    """A default would sample another model: the missing key is named instead."""
    copy = _edited(run, tmp_path, edit)
    for cmd in (["sample", str(copy), "--n", "4"], ["train", "--resume", str(copy)]):
        err = _one_line_error(capsys, main(cmd))
        assert expected in err and "config.json" in err
    assert not list(copy.glob("samples-*"))


def test_a_stored_config_of_the_first_format_still_loads(run, tmp_path):
    """Keys added after the first run format (beta range, thresholding, ...) take defaults."""
    from difflab.app.config import STORED_KEYS
    from difflab.app.runs import read_run_config

    def first_format(c):
        for section, keys in STORED_KEYS.items():
            c[section] = {k: v for k, v in c[section].items() if k in keys}

    copy = _edited(run, tmp_path, first_format)
    assert read_run_config(copy) == read_run_config(run)
    assert main(["sample", str(copy), "--n", "4", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- late errors
def test_nll_of_a_classifier_run_is_one_line(tmp_path, capsys, monkeypatch):
    """A classifier is no model of the data: `difflab nll` refuses it before any work (it
    ended in "'NoneType' object is not callable")."""
    import difflab.app.evaluate as evaluate
    import difflab.app.runs as runs
    from difflab.app.runs import build

    cfg = apply_overrides(get_preset("mnist-classifier"), ["train.device=cpu"])
    clf = build(cfg, load_data=False)
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: clf)
    monkeypatch.setattr(evaluate, "_held_out", lambda b, n, seed: torch.zeros(n, 1, 28, 28))
    err = _one_line_error(capsys, main(["nll", str(tmp_path), "--n", "4", "--no-progress"]))
    assert "classifier" in err


def test_an_option_the_run_would_ignore_is_refused(run, tmp_path, capsys):
    """`sample 2-D_RUN --input FILE` drew unconditional samples; `--set model.autoencoder=RUN`
    on a pixel preset trained a pixel U-Net."""
    (tmp_path / "x.npz").write_bytes(b"")
    err = _one_line_error(capsys, main(["sample", str(run), "--n", "4",
                                        "--input", str(tmp_path / "x.npz")]))  # fmt: skip
    assert "--input" in err
    out = tmp_path / "r"
    err = _one_line_error(capsys, _train(out, "train.steps=10", f"model.autoencoder={run}"))
    assert "model.autoencoder" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["model"].update(hidden=10**12), "model.hidden must be in 1..4096"),
        (lambda c: c["diffusion"].update(T=10**15), "diffusion.T must be in 1..1000000"),
    ],
)
def test_a_huge_size_in_a_config_is_refused_before_allocating(
    run, tmp_path, capsys, edit, expected
):
    """A hand-edited size ended in "DefaultCPUAllocator: can't allocate memory"."""
    copy = _edited(run, tmp_path, edit)
    assert expected in _one_line_error(capsys, main(["sample", str(copy), "--n", "4"]))


def test_viz_refuses_a_huge_T_before_allocating(tmp_path, capsys):
    out = tmp_path / "s.png"
    err = _one_line_error(capsys, main(["viz", "schedules", "--T", "10000000000",
                                        "--out", str(out)]))  # fmt: skip
    assert "--T must be in 1..1000000" in err and not out.exists()


def test_sample_refuses_what_cannot_fit_in_memory_or_on_the_disk(
    run, tmp_path, capsys, monkeypatch
):
    """`sample --n 100000000000` ran on for hours towards 800 GB of samples."""
    import shutil

    import difflab.app.sampling as sampling
    import difflab.safe_io as safe_io

    monkeypatch.setattr(sampling, "draw_samples", lambda *a, **k: pytest.fail("sampled"))
    out = tmp_path / "s.npz"
    err = _one_line_error(capsys, main(["sample", str(run), "--n", "100000000000",
                                        "--out", str(out)]))  # fmt: skip
    assert "800 GB of memory" in err
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(safe_io.shutil, "disk_usage", lambda p: free)
    err = _one_line_error(capsys, main(["sample", str(run), "--n", "200", "--out", str(out)]))
    assert str(out) in err and "1.6e-06 GB" in err and "1e-06 GB free" in err
    assert not out.exists()


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST IDX file (gzipped) holding the uint8 ``array``."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_eval_checks_its_data_before_any_sample_is_drawn(tmp_path, capsys, monkeypatch):
    """A truncated t10k file was reported after 115 s of sampling and classifier training."""
    import difflab.app.kinds as kinds
    import difflab.app.runs as runs
    from difflab.app.runs import build

    data = tmp_path / "mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
        _idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (20,)))
    t10k = data / "t10k-images-idx3-ubyte.gz"
    t10k.write_bytes(gzip.compress(gzip.decompress(t10k.read_bytes())[:5000]))
    built = build(apply_overrides(get_preset("mnist"), ["train.device=cpu"]), load_data=False)
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: built)
    monkeypatch.setattr(kinds, "draw_samples", lambda *a, **k: pytest.fail("sampled"))
    err = _one_line_error(capsys, main(["eval", str(tmp_path), "--data-dir", str(data),
                                        "--n", "4", "--no-progress"]))  # fmt: skip
    assert "t10k-images-idx3-ubyte.gz" in err and "truncated" in err


@pytest.mark.parametrize("command", ["sample", "eval", "nll", "train"])
def test_a_huge_seed_is_one_line_naming_the_range(run, tmp_path, capsys, command):
    """It ended in "Overflow when unpacking long long"."""
    seed = str(10**23)
    if command == "train":
        out = tmp_path / "r"
        err = _one_line_error(capsys, _train(out, "train.steps=10", extra=("--seed", seed)))
        assert "train.seed must be in 0..4294967295" in err and not out.exists()
    else:
        err = _one_line_error(capsys, main([command, str(run), "--n", "4", "--seed", seed]))
        assert "--seed must be in 0..4294967295" in err


def _full_disk_open(name: str):
    """``open`` that gives /dev/full (every write fails with ENOSPC) for files named ``name``."""
    import builtins

    def fake(path, *args, **kwargs):
        full = Path(path).name == name or Path(path).name.startswith(name)
        return builtins.open("/dev/full" if full else path, *args, **kwargs)

    return fake


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("where", [".lock", "metrics.csv", "events.out.tfevents"])
def test_a_disk_full_from_the_start_names_the_file(tmp_path, capsys, monkeypatch, where):
    """The first writes of a run (its lock's PID, the metrics header, the TensorBoard file)
    failed with "No space left on device" naming no file."""
    import difflab.safe_io as safe_io
    import difflab.tensorboard as tensorboard

    if where == ".lock":  # /dev/full cannot be truncated: fail the write itself

        def full(f):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt.RunLock, "_write_pid", staticmethod(full))
    module = safe_io if where == "metrics.csv" else tensorboard
    monkeypatch.setattr(module, "open", _full_disk_open(where), raising=False)
    err = _one_line_error(capsys, _train(tmp_path / "r", "train.steps=10"))
    assert "No space left on device" in err and str(tmp_path / "r") in err and where in err


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_ctrl_c_during_sample_or_eval_says_what_it_leaves(
    run, tmp_path, capsys, monkeypatch, command
):
    """It said "the last checkpoint is kept (resume with --resume)", which is about training."""
    import difflab.app.kinds as kinds
    import difflab.app.sampling as sampling

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "draw_samples", interrupted)
    monkeypatch.setattr(kinds, "draw_samples", interrupted)
    out = tmp_path / "s.npz"
    args = ["--out", str(out)] if command == "sample" else []
    assert main([command, str(run), "--n", "4", "--no-progress", *args]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: interrupted; no partial file is left") and "\n" not in err
    assert "checkpoint" not in err
    assert not list(tmp_path.iterdir())


def test_an_unreadable_image_in_a_folder_is_one_clean_line(tmp_path, capsys, monkeypatch):
    """It was Python's two-line UserWarning with the library's source line."""
    from PIL import Image

    import difflab.app.cli as cli
    from difflab.data.images import load_image_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")

    def read(args):
        return 0 if len(load_image_dataset("folder", data_dir=folder, channels=1)) == 1 else 1

    monkeypatch.setitem(cli.COMMANDS, "presets", read)
    assert main(["presets"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: warning: skipping unreadable image") and "\n" not in err
    assert str(folder / "b.png") in err and "UserWarning" not in err


def test_a_run_killed_at_its_first_rename_is_started_again(tmp_path, capsys):
    """A kill before config.json's first rename left `.lock` and `.config.json.*.tmp`, which
    both `--resume` ("no config.json") and a rerun ("not empty") refused."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("12345\n")
    (out / ".config.json.k2j4x.tmp").write_text('{"preset": "mo')
    err = _one_line_error(capsys, main(["train", "--resume", str(out), "--no-progress"]))
    assert "never started" in err and f"--out {out}" in err
    assert _train(out, "train.steps=10") == 0
    assert ckpt.is_finished(out) and not list(out.glob(".config.json.*"))


def test_two_exports_to_one_folder_without_overwrite_cannot_both_succeed(tmp_path, monkeypatch):
    """Both checked that the folder was absent, then the second moved the first's aside:
    both exited 0. Without overwrite the final rename refuses an existing folder."""
    import dataclasses

    import difflab.interop.diffusers_export as export
    from difflab.nn.unet import UNET_PRESETS, UNet
    from difflab.schedules import DiscreteSchedule

    net = UNet(**dataclasses.asdict(UNET_PRESETS["tiny-ddpm"]))
    schedule = DiscreteSchedule.from_name("linear", 1000)

    def write(out):
        kw = {"unet_config": net.config, "state_dict": net.state_dict(), "schedule": schedule}
        return export.export_to_diffusers(out, **kw)

    out = tmp_path / "exported"
    real_fsync, raced = export.fsync_dir, []

    def other_export_finishes_first(path):  # just before the rename into place
        if not raced and Path(path).name.startswith(".tmp-"):
            raced.append(True)
            write(out)
            (out / "first.txt").write_text("the first export")
        real_fsync(path)

    monkeypatch.setattr(export, "fsync_dir", other_export_finishes_first)
    with pytest.raises(ValueError, match="exists and is not empty"):
        write(out)
    assert (out / "first.txt").is_file() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary folder left
