"""Run directories and checkpoints: round trips, verification, crash safety, metrics logs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import difflab.checkpoint as ckpt_mod
from difflab.checkpoint import (
    CheckpointError,
    MetricsLog,
    atomic_write_json,
    atomic_write_text,
    is_finished,
    latest_checkpoint,
    load_checkpoint,
    mark_finished,
    prepare_run_dir,
    read_config,
    read_metrics,
    save_checkpoint,
    verify_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern of a tensor, so NaNs and signed zeros compare exactly."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def small(step: int) -> dict:
    return {"model": {"w": torch.full((3, 4), float(step)), "b": torch.arange(step + 1)}}


def ckpt_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
    }


# ----------------------------------------------------------------------------- round trips
def test_round_trip_is_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    weird = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.5])
    model = {
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "special": weird,
        "special_bf16": weird.bfloat16(),
        "i64": torch.randint(-(2**62), 2**62, (6,), generator=g),
        "u8": torch.randint(0, 256, (3, 3), dtype=torch.uint8, generator=g),
        "mask": torch.rand(8, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    ema = {k: v.clone() + 1 for k, v in model.items() if v.is_floating_point()}
    gen_state = torch.Generator().manual_seed(123).get_state()
    state = {
        "step": 1000,
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3, generator=g)}}, "lr": 1e-4},
        "rng": {"torch": gen_state, "python": random.Random(5).getstate()},
        "history": [1.5, None, "text", True, (1, 2)],
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "shape": torch.Size([2, 3]),
    }
    path = save_checkpoint(tmp_path, step=1000, tensors={"model": model, "ema": ema}, state=state)
    assert path == tmp_path / "checkpoints" / "step-00001000"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "manifest.json",
        "model.safetensors",
        "state.pt",
    ]
    for source in (tmp_path, path):
        ck = load_checkpoint(source)
        assert ck.step == 1000 and ck.path == path
        assert set(ck.tensors) == {"model", "ema"}
        for group, tensors in (("model", model), ("ema", ema)):
            assert set(ck.tensors[group]) == set(tensors)
            for name, t in tensors.items():
                assert_bit_equal(ck.tensors[group][name], t)
        s = ck.state
        assert s["step"] == 1000 and s["optimizer"]["lr"] == 1e-4
        assert_bit_equal(
            s["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
        )
        assert_bit_equal(s["rng"]["torch"], gen_state)
        assert s["rng"]["python"] == state["rng"]["python"]
        assert s["history"] == state["history"]
        assert s["dtype"] == torch.bfloat16 and s["device"] == torch.device("cpu")
        assert s["shape"] == torch.Size([2, 3])
    # the restored generator state reproduces the same random numbers
    g1 = torch.Generator().manual_seed(123)
    g2 = torch.Generator()
    g2.set_state(ck.state["rng"]["torch"])
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1000 and manifest["format_version"] == ckpt_mod.FORMAT_VERSION
    for name, info in manifest["files"].items():
        assert info["size"] == (path / name).stat().st_size
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_shared_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "tied_a": base,
        "tied_b": base,  # same tensor under two names (tied weights)
        "row": base[1],  # a view into a larger storage
        "transposed": base.t(),  # non-contiguous
        "every_other": base[:, ::2],
    }
    save_checkpoint(tmp_path, step=1, tensors={"model": tensors}, state={})
    loaded = load_checkpoint(tmp_path).tensors["model"]
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_state_that_weights_only_cannot_read_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['loss'\].*numpy"):
        save_checkpoint(tmp_path, step=1, tensors=small(1), state={"loss": np.float64(1.0)})
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\]"):
        save_checkpoint(tmp_path, step=1, tensors=small(1), state={"rng": [1, np.zeros(3)]})
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step": -1}, "step"),
        ({"step": 1.0}, "step"),
        ({"keep": 0}, "keep"),
        ({"tensors": {"../evil": {}}}, "group name"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"step": 1, "tensors": small(1), "state": {}, **kwargs}
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, **args)


# ----------------------------------------------------------------------------- latest and pruning
def test_latest_is_followed_and_missing_or_dangling_latest_falls_back(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, tensors=small(step), state={"s": step}, keep=None)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000003"
    assert latest_checkpoint(tmp_path) == root / "step-00000003"
    atomic_write_text(root / "latest", "step-00000002\n")  # latest decides, not the largest step
    assert load_checkpoint(tmp_path).step == 2
    atomic_write_text(root / "latest", "step-00000099\n")  # dangling
    assert load_checkpoint(tmp_path).step == 3
    (root / "latest").unlink()  # missing
    assert latest_checkpoint(tmp_path) == root / "step-00000003"
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.state == {"s": 3}
    assert torch.equal(ck.tensors["model"]["w"], small(3)["model"]["w"])
    # the fallback skips a checkpoint that fails verification
    with open(root / "step-00000003" / "model.safetensors", "ab") as f:
        f.write(b"x")
    assert load_checkpoint(tmp_path).step == 2
    # the checkpoints/ directory itself is accepted too
    assert load_checkpoint(root).step == 2


def test_keep_prunes_older_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step=step, tensors=small(step), state={})
        newest = [f"step-{s:08d}" for s in (10, 20, 30, 40) if s <= step][-2:]
        assert ckpt_dirs(tmp_path) == newest
    save_checkpoint(tmp_path, step=50, tensors=small(50), state={}, keep=1)
    assert ckpt_dirs(tmp_path) == ["step-00000050"]
    save_checkpoint(tmp_path, step=60, tensors=small(60), state={}, keep=None)
    save_checkpoint(tmp_path, step=70, tensors=small(70), state={}, keep=None)
    assert ckpt_dirs(tmp_path) == ["step-00000050", "step-00000060", "step-00000070"]


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, step=5, tensors=small(5), state={"v": "old"})
    save_checkpoint(tmp_path, step=5, tensors=small(6), state={"v": "new"}, keep=1)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 5 and ck.state == {"v": "new"}
    assert torch.equal(ck.tensors["model"]["w"], small(6)["model"]["w"])
    assert ckpt_dirs(tmp_path) == ["step-00000005"]


# ----------------------------------------------------------------------------- verification errors
def test_truncated_file_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, step=7, tensors=small(7), state={})
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fname", ["model.safetensors", "state.pt"])
def test_flipped_byte_is_reported(tmp_path, fname):
    path = save_checkpoint(tmp_path, step=7, tensors=small(7), state={"a": torch.ones(4)})
    f = path / fname
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{fname.replace('.', r'[.]')}.*SHA-256"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify_checkpoint(path)


def test_unreadable_manifest_and_missing_file(tmp_path):
    path = save_checkpoint(tmp_path, step=7, tensors=small(7), state={})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json.*unreadable manifest"):
        load_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps({"format_version": 99, "step": 7, "files": {}}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def test_missing_run_dir_or_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_checkpoint(tmp_path / "nope")
    assert latest_checkpoint(tmp_path / "nope") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------- crash safety
class InjectedCrash(BaseException):
    """Stands for the process dying at one file-system operation."""


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_crash_at_every_file_operation_keeps_a_loadable_checkpoint(tmp_path, monkeypatch, resave):
    save_checkpoint(tmp_path, step=1, tensors=small(1), state={"s": 1}, keep=1)
    new_step = 1 if resave else 2
    calls = {"n": 0, "fail_at": 0}

    def faulty(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise InjectedCrash(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    for name in ("replace", "rename", "fsync"):
        monkeypatch.setattr(os, name, faulty(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", faulty(shutil.rmtree))
    monkeypatch.setattr(ckpt_mod, "write_file", faulty(ckpt_mod.write_file))
    monkeypatch.setattr(torch, "save", faulty(torch.save))

    crashes = 0
    for fail_at in range(1, 100):
        calls.update(n=0, fail_at=fail_at)
        try:
            save_checkpoint(tmp_path, step=new_step, tensors=small(10), state={"s": 10}, keep=1)
        except InjectedCrash:
            crashes += 1
        else:
            break
        finally:
            calls["fail_at"] = 0
        ck = load_checkpoint(tmp_path)  # the old or the new checkpoint, never a mix
        assert ck.path.name == f"step-{ck.step:08d}"
        expected = small(10) if ck.state["s"] == 10 else small(1)
        assert ck.state["s"] in (1, 10) and ck.step in (1, new_step)
        assert torch.equal(ck.tensors["model"]["w"], expected["model"]["w"])
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert crashes >= 8  # every write, fsync and rename was interrupted once
    ck = load_checkpoint(tmp_path)
    assert ck.step == new_step and ck.state == {"s": 10}


def test_leftover_temporary_directory_does_not_confuse_loading(tmp_path):
    save_checkpoint(tmp_path, step=1, tensors=small(1), state={"s": 1}, keep=None)
    newer = save_checkpoint(tmp_path, step=2, tensors=small(2), state={"s": 2}, keep=None)
    root = tmp_path / "checkpoints"
    # a complete-looking copy left under a temporary name, and `latest` gone
    newer.rename(root / ".tmp-step-00000002-abc")
    (root / "latest").unlink()
    (root / ".latest.abc.tmp").write_text("step-00000002")  # an interrupted write of `latest`
    assert load_checkpoint(tmp_path).step == 1
    save_checkpoint(tmp_path, step=3, tensors=small(3), state={"s": 3})
    # leftovers are cleaned up by the next save
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000003"]


SAVE_AND_KILL = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    from difflab.checkpoint import load_checkpoint, save_checkpoint

    run = sys.argv[1]
    rng = random.Random(1234)

    def save(step):
        tensors = {"model": {"w": torch.full((64, 8), float(step)), "b": torch.arange(step % 5)}}
        save_checkpoint(run, step=step, tensors=tensors, state={"step": step}, keep=2)

    save(0)
    last, seen = 0, []
    for trial in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                step = last
                while True:
                    step += 1
                    save(step)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ck = load_checkpoint(run)
        assert ck.state["step"] == ck.step >= last, (ck.step, last)
        assert torch.equal(ck.tensors["model"]["w"], torch.full((64, 8), float(ck.step)))
        assert torch.equal(ck.tensors["model"]["b"], torch.arange(ck.step % 5))
        last = ck.step
        seen.append(ck.step)
    print(json.dumps(seen))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_while_saving_always_leaves_a_loadable_checkpoint(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_AND_KILL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(steps) == 8 and steps == sorted(steps) and steps[-1] > 0
    assert load_checkpoint(tmp_path).step == steps[-1]


# ----------------------------------------------------------------------------- run directories
def test_prepare_run_dir_new_and_resume(tmp_path):
    run = tmp_path / "a" / "run"
    config = {"model": "unet", "lr": 2e-4, "channels": [64, 128]}
    prepare_run_dir(run, config=config, resume=False)
    assert read_config(run) == config
    assert not is_finished(run)
    assert prepare_run_dir(run, config={"ignored": 1}, resume=True) is None
    assert read_config(run) == config
    mark_finished(run, {"step": 10})
    assert is_finished(run)
    assert json.loads((run / "finished.json").read_text()) == {"step": 10}


def test_prepare_run_dir_refuses_and_never_modifies(tmp_path):
    unfinished = tmp_path / "unfinished"
    prepare_run_dir(unfinished, config={"a": 1}, resume=False)
    save_checkpoint(unfinished, step=1, tensors=small(1), state={})
    finished = tmp_path / "finished"
    prepare_run_dir(finished, config={"a": 1}, resume=False)
    mark_finished(finished, {"step": 1})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    cases = [
        (finished, "already holds a finished run; use a new --out directory"),
        (unfinished, "unfinished run; pass --resume"),
        (other, "not empty"),
    ]
    for run, message in cases:
        before = snapshot(run)
        with pytest.raises(CheckpointError, match=message) as info:
            prepare_run_dir(run, config={"b": 2}, resume=False)
        assert str(run) in str(info.value) and "\n" not in str(info.value)
        assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="no such run directory"):
        prepare_run_dir(tmp_path / "missing", config={}, resume=True)
    with pytest.raises(CheckpointError, match="no config.json"):
        prepare_run_dir(other, config={}, resume=True)
    with pytest.raises(TypeError, match="JSON"):
        prepare_run_dir(tmp_path / "new", config={"x": object()}, resume=False)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_run_dir(empty, config={"c": 3}, resume=False)
    assert read_config(empty) == {"c": 3}


def test_read_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_config(tmp_path)
    atomic_write_json(tmp_path / "config.json", [1, 2])
    with pytest.raises(CheckpointError, match="JSON object"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- metrics
def test_metrics_log_appends_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsLog(path, ["step", "loss", "lr"]) as log:
        for step in range(1, 11):
            log.append(step=step, loss=1.0 / step, lr=1e-3)
        log.append({"step": 11})  # missing columns are left empty
    assert read_metrics(path)["step"] == [float(s) for s in range(1, 12)]
    assert np.isnan(read_metrics(path)["loss"][-1])
    with open(path, "a") as f:
        f.write("12,0.0")  # a partial row left by a crash
    with MetricsLog(path, ["step", "loss", "lr"], resume_step=6) as log:
        for step in (7, 8):
            log.append(step=step, loss=0.5, lr=1e-3)
    lines = path.read_text().splitlines()
    assert lines[0] == "step,loss,lr" and lines.count("step,loss,lr") == 1
    metrics = read_metrics(path)
    assert metrics["step"] == [float(s) for s in range(1, 9)]
    assert metrics["loss"][:6] == [1.0 / s for s in range(1, 7)]  # floats round-trip exactly
    assert metrics["loss"][6:] == [0.5, 0.5]


def test_metrics_log_errors(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsLog(path, ["step", "loss"]) as log:
        with pytest.raises(ValueError, match="unknown metrics"):
            log.append(step=1, acc=0.5)
    with pytest.raises(CheckpointError, match="columns"):
        MetricsLog(path, ["step", "loss", "extra"])
    with pytest.raises(ValueError, match="step"):
        MetricsLog(tmp_path / "m2.csv", ["loss"], resume_step=3)
    with pytest.raises(CheckpointError, match="not found"):
        read_metrics(tmp_path / "missing.csv")
