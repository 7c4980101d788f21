"""Data-parallel training with torchrun on CPU (gloo, 2 processes): ranks in sync, resumable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difflab import checkpoint as ckpt

SETS = [
    "train.batch_size=64",
    "train.log_every=10",
    "train.ckpt_every=10",
    "train.warmup_steps=5",
    "model.hidden=32",
    "model.depth=2",
    "sample.n=200",
    "sample.steps=10",
    "sample.sampler=ddim",
]


def _torchrun(*args, steps=None):
    sets = [a for s in SETS for a in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "difflab",
        *args,
        "--no-progress",
    ]
    if args[0] == "train" and "--resume" not in args:
        cmd += sets
    if steps is not None:
        cmd += ["--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill_processes_naming(arg: str) -> None:
    """SIGKILL every process whose command line contains ``arg``, and wait until they are gone
    (a surviving worker would still hold the run directory's lock)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if proc.name.isdigit() and int(proc.name) != os.getpid() and arg.encode() in cmd:
                pids.append(int(proc.name))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_resume(tmp_path):
    run = tmp_path / "run"
    p = _torchrun("train", "--preset", "moons", "--out", str(run), steps=400)
    deadline = time.time() + 180
    while ckpt.latest_checkpoint(run) is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.latest_checkpoint(run) is not None, p.communicate()[1]
    os.killpg(p.pid, signal.SIGKILL)  # the launcher ...
    _kill_processes_naming(str(run))  # ... and both workers (torchrun gives them own groups)
    p.wait()
    killed_at = ckpt.load_checkpoint(run).step
    assert killed_at < 400 and not ckpt.is_finished(run)
    p = _torchrun("train", "--resume", str(run), steps=60 if killed_at < 60 else killed_at + 20)
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    info = json.loads((run / "finished.json").read_text())
    assert info["world_size"] == 2
    assert info["ranks_in_sync"] is True
    assert info["step"] > killed_at
    steps = ckpt.read_metrics(run / "metrics.csv")["step"]
    assert steps == sorted(set(steps))


IMAGE_SETS = ["data.image_size=16", "model.preset=tiny", "model.ae_preset=tiny", "data.limit=40",
              "train.batch_size=8", "train.log_every=2", "train.ckpt_every=100",
              "train.warmup_steps=1", "sample.n=4", "sample.steps=2", "sample.sampler=ddim",
              "sample.eta=none"]  # fmt: skip


def _check_torchrun_trains(preset: str, run: Path, data: Path, *sets: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "difflab", "train", "--preset", preset, "--out", str(run), "--steps", "4",
           "--data-dir", str(data), "--no-progress", "--device", "cpu"]  # fmt: skip
    cmd += [a for s in (*IMAGE_SETS, *sets) for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (preset, out.stderr[-3000:])
    info = json.loads((run / "finished.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True, preset


@pytest.mark.slow
def test_every_image_task_trains_data_parallel(tmp_path):
    """A classifier, an autoencoder, a latent run on it, a base and an SR run on the base: each
    trains in 2 gloo processes whose weights stay identical (the gradients are all-reduced)."""
    from test_fingerprints import _write_mnist

    data = _write_mnist(tmp_path / "mnist")
    _check_torchrun_trains("mnist-classifier", tmp_path / "clf", data)
    _check_torchrun_trains("mnist-ae", tmp_path / "ae", data)
    _check_torchrun_trains("mnist-latent", tmp_path / "latent", data,
                    f"model.autoencoder={tmp_path / 'ae'}")  # fmt: skip
    _check_torchrun_trains("mnist-14", tmp_path / "base", data)
    _check_torchrun_trains("mnist-sr", tmp_path / "sr", data, f"model.base={tmp_path / 'base'}")


@pytest.mark.slow
def test_a_time_budget_decays_the_lr_alike_on_every_rank(tmp_path):
    """The time clock of the LR decay is the slowest rank's (one all-reduce), so the ranks
    take the same step sizes and their weights stay identical."""
    run = tmp_path / "run"
    p = _torchrun("train", "--preset", "moons", "--out", str(run), "--minutes", "0.05",
                  "--set", "train.lr_decay=cosine", steps=1_000_000)  # fmt: skip
    out, err = p.communicate(timeout=400)
    assert p.returncode == 0, err[-3000:]
    info = json.loads((run / "finished.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True
    assert info["stopped_early"] == "time budget"
    lrs = ckpt.read_metrics(run / "metrics.csv")["lr"]
    assert lrs[-1] < 0.2 * max(lrs)
