"""The command line: bad input gives one line on stderr, a non-zero exit, and changes nothing."""

import json

import numpy as np
import pytest

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.app.config import PRESETS, RunConfig, apply_overrides, get_preset

FAST = [
    "--set",
    "train.steps=30",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.log_every=10",
    "--set",
    "train.ckpt_every=10",
    "--set",
    "model.hidden=32",
    "--set",
    "model.depth=2",
    "--set",
    "sample.n=100",
    "--set",
    "sample.steps=10",
    "--set",
    "sample.sampler=ddim",
]


def _one_line_error(capsys, code, expected_code=2):
    assert code == expected_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err
    return err


def test_config_round_trip_and_overrides():
    for name, cfg in PRESETS.items():
        again = RunConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg, name
    cfg = apply_overrides(get_preset("mnist-eps"), ["train.lr=3e-4", "model.learned_variance=true"])
    assert cfg.train.lr == 3e-4 and cfg.model.learned_variance is True
    with pytest.raises(ValueError, match="choose one of"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ValueError, match="expects a number"):
        apply_overrides(cfg, ["train.lr=fast"])


def test_bad_threshold_in_config(capsys, tmp_path):
    code = main(["train", "--preset", "moons", "--out", str(tmp_path / "r"),
                 "--set", "sample.threshold=soft", *FAST])  # fmt: skip
    assert "sample.threshold" in _one_line_error(capsys, code)
    assert not (tmp_path / "r").exists()


def test_unknown_preset(capsys, tmp_path):
    err = _one_line_error(capsys, main(["train", "--preset", "nope", "--out", str(tmp_path / "r")]))
    assert "unknown preset 'nope'" in err and "swissroll" in err
    assert not (tmp_path / "r").exists()


def test_negative_steps(capsys, tmp_path):
    err = _one_line_error(capsys, main(["train", "--steps", "-5", "--out", str(tmp_path / "r")]))
    assert "--steps must be positive" in err
    assert not (tmp_path / "r").exists()


def test_sample_without_checkpoint(capsys, tmp_path):
    err = _one_line_error(capsys, main(["sample", str(tmp_path / "missing")]))
    assert "config.json: not found" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, main(["sample", str(tmp_path / "empty")]))
    assert "config.json: not found" in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--preset", "moons", "--out", str(run), "--no-progress", *FAST])
    assert code == 0
    return run


def test_train_then_sample(trained_run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    args = ["sample", str(trained_run), "--n", "50", "--steps", "5", "--sampler", "ddim"]
    assert main([*args, "--out", str(out), "--seed", "3", "--gif"]) == 0
    x = np.load(out)["samples"]
    assert x.shape == (50, 2) and np.isfinite(x).all()
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".gif").exists()
    # a seed reproduces the samples exactly
    assert main([*args, "--out", str(tmp_path / "t.npz"), "--seed", "3"]) == 0
    assert np.array_equal(np.load(tmp_path / "t.npz")["samples"], x)
    # --threshold clip keeps every sample in [-1, 1] (moons data reach beyond it)
    assert np.abs(x).max() > 1
    assert (
        main([*args, "--out", str(tmp_path / "c.npz"), "--seed", "3", "--threshold", "clip"]) == 0
    )
    assert np.abs(np.load(tmp_path / "c.npz")["samples"]).max() <= 1


def test_finished_run_is_not_overwritten(trained_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    err = _one_line_error(capsys, main(["train", "--preset", "moons", "--out", str(trained_run)]))
    assert "finished run" in err
    err = _one_line_error(capsys, main(["train", "--resume", str(trained_run)]))
    assert "finished" in err
    assert before == {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}


def test_runs_of_older_versions_with_eta_zero_still_load(trained_run, tmp_path):
    """Older runs stored sample.eta = 0.0 for every sampler; it means "not set" for ddpm."""
    import shutil

    from difflab.app.runs import read_run_config

    copy = tmp_path / "old"
    shutil.copytree(trained_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["sample"].update(sampler="ddpm", eta=0.0)
    (copy / "config.json").write_text(json.dumps(cfg))
    assert read_run_config(copy).sample.eta is None
    out = tmp_path / "s.npz"
    assert main(["sample", str(copy), "--n", "8", "--steps", "3", "--out", str(out)]) == 0
    cfg["sample"].update(sampler="ddim", eta=0.0)  # DDIM's eta = 0 is kept
    (copy / "config.json").write_text(json.dumps(cfg))
    assert read_run_config(copy).sample.eta == 0.0


def test_truncated_checkpoint(trained_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    latest = ckpt.latest_checkpoint(copy)
    for old in (copy / "checkpoints").glob("step-*"):
        if old != latest:
            shutil.rmtree(old)
    f = latest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    err = _one_line_error(capsys, main(["sample", str(copy)]))
    assert "model.safetensors" in err


def test_bad_sampler_and_class(trained_run, capsys):
    err = _one_line_error(capsys, main(["sample", str(trained_run), "--sampler", "magic"]))
    assert "choose one of" in err or "valid" in err
    err = _one_line_error(capsys, main(["sample", str(trained_run), "--class", "3"]))
    assert "class-conditional" in err
    err = _one_line_error(
        capsys, main(["sample", str(trained_run), "--sampler", "ddpm", "--eta", "0.5"])
    )
    assert "sampler 'ddpm' has no option 'eta'" in err


def test_sample_eta_in_config_needs_a_sampler_with_eta(capsys, tmp_path):
    code = main(["train", "--preset", "moons", "--out", str(tmp_path / "r"), *FAST,
                 "--set", "sample.sampler=ddpm", "--set", "sample.eta=0.5"])  # fmt: skip
    assert "sample.eta is set but sampler 'ddpm' has no eta" in _one_line_error(capsys, code)
    assert not (tmp_path / "r").exists()


def test_sample_help_names_every_sampler():
    from difflab.app.cli import SAMPLER_NAMES
    from difflab.samplers import SAMPLERS

    assert SAMPLER_NAMES == tuple(SAMPLERS)


def test_presets_and_viz(capsys, tmp_path):
    assert main(["presets"]) == 0
    assert "swissroll" in capsys.readouterr().out
    assert main(["viz", "schedules", "--out", str(tmp_path / "s.png"), "--T", "100"]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_eval_and_nll(trained_run, capsys):
    assert main(["eval", str(trained_run), "--n", "300", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "sliced_wasserstein_data_vs_data" in out
    args = ["nll", str(trained_run), "--n", "40", "--vlb-stride", "50", "--ode-steps", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("vlb: ") and "ode: " in out and "nats" in out
    _one_line_error(capsys, main(["nll", str(trained_run), "--n", "0"]))


def _count_config_work(monkeypatch) -> dict:
    """Counts of the config's validations (of a config not yet valid), run-kind look-ups and
    schedule builds, wherever they are called from."""
    import difflab.app.build as build
    import difflab.app.kinds as kinds
    import difflab.app.runs as runs

    counts = {"validate": 0, "kind_of": 0, "build_schedule": 0}
    real_validate = RunConfig.validate

    def validate(self):
        counts["validate"] += not self.__dict__.get("_valid")
        return real_validate(self)

    monkeypatch.setattr(RunConfig, "validate", validate)
    wrapped = [("kind_of", kinds.kind_of, (kinds, runs)),
               ("build_schedule", build.build_schedule, (build, kinds, runs))]  # fmt: skip
    for name, real, modules in wrapped:

        def counted(*args, _name=name, _real=real, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        for module in modules:
            monkeypatch.setattr(module, name, counted)
    return counts


def test_a_config_is_checked_once_per_command(tmp_path, monkeypatch):
    """One `train` validated its config three times and looked up its kind and built its
    schedule up to three times; now the config is checked once where it is made (presets and
    --set, or a run's config.json) and the layers below take the checked config."""
    counts = _count_config_work(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--preset", "moons", "--out", str(run), "--no-progress", *FAST]) == 0
    assert counts == {"validate": 1, "kind_of": 1, "build_schedule": 1}
    counts.update(validate=0, kind_of=0, build_schedule=0)
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "8", "--steps", "2", "--out", str(out)]) == 0
    assert counts == {"validate": 1, "kind_of": 1, "build_schedule": 1}
