"""The Python entry to trained runs: ``dl.load_run(path).sample(...)`` and ``.evaluate(...)``
are what ``difflab sample`` and ``difflab eval`` compute, to the bit."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import difflab as dl
from difflab.app.cli import main

FAST = ["--no-progress", "--set", "train.steps=20", "--set", "train.batch_size=64", "--set",
        "model.hidden=32", "--set", "model.depth=2", "--set", "train.ckpt_every=10", "--set",
        "sample.n=50", "--set", "sample.steps=5", "--set", "sample.sampler=ddim"]  # fmt: skip
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    assert main(["train", "--preset", "moons", "--out", str(run), *FAST]) == 0
    return run


def test_sample_is_what_the_cli_writes_for_the_same_seed(run_dir, tmp_path):
    """A bug that makes the API and the CLI differ (another seed, the run's eta or threshold
    not applied on one side, samples drawn in another batch order) breaks the equality; a
    second seed must differ, so that the equality is not of a constant."""
    run = dl.load_run(run_dir)
    assert isinstance(run, dl.Run) and run.kind.name == "diffusion-2d"
    x = run.sample(n=40, sampler="dpm++2m-sde", steps=4, seed=3, batch_size=16, eta=0.5)
    out = tmp_path / "s.npz"
    argv = ["sample", str(run_dir), "--n", "40", "--sampler", "dpm++2m-sde", "--steps", "4",
            "--seed", "3", "--batch-size", "16", "--eta", "0.5", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert x.shape == (40, 2) and x.dtype == torch.float32
    assert np.array_equal(np.load(out)["samples"], x.numpy())
    # the defaults are the run's sampler and steps, as for `difflab sample RUN`
    assert torch.equal(run.sample(n=8, seed=1), run.sample(n=8, sampler="ddim", steps=5, seed=1))
    assert not torch.equal(run.sample(n=8, seed=1), run.sample(n=8, seed=2))


def test_evaluate_is_what_difflab_eval_prints(run_dir, capsys):
    res = dl.load_run(run_dir).evaluate(n=64, steps=3, seed=2)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--n", "64", "--steps", "3", "--seed", "2",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == res
    assert res["n"] == 64 and "sliced_wasserstein_data_vs_data" in res


@pytest.mark.parametrize(
    "options, words",
    [
        ({"n": 0}, "n must be"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": 2.0}, "class-conditional"),
        ({"inputs": torch.zeros(2, 2)}, "--input is for image-to-image"),
        ({"aug_level": 0.1}, "super-resolution runs"),
        ({"classifier": "nowhere"}, "nowhere"),
    ],
)
def test_bad_requests_are_refused_before_any_sample_is_drawn(run_dir, monkeypatch, options, words):
    import difflab.app.kinds as kinds

    monkeypatch.setattr(kinds, "draw_samples", lambda *a, **k: pytest.fail("sampled"))
    run = dl.load_run(run_dir)
    with pytest.raises((ValueError, dl.checkpoint.CheckpointError), match=re.escape(words)):
        run.sample(**options)


def test_the_readme_example_of_a_trained_run_runs(run_dir):
    """The README's Python block of a trained run, on the tiny run (its path and sizes
    replaced; without the guided line, which needs a class-conditional run)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "load_run" in b)
    code = "\n".join(line for line in code.splitlines() if "guidance=" not in line)
    code = re.sub(r'load_run\("[^"]*"\)', f"load_run({str(run_dir)!r})", code)
    code = code.replace("n=16", "n=8").replace("steps=50", "steps=3").replace("n=1000", "n=32")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    assert ns["x"].shape == (8, 2)
