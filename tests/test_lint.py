"""The code base is ruff clean (lint and format), and the GPU-only script stays in step with
what it calls."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    return [exe] if exe else None


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff_clean(args):
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    dirs = [d for d in ("src", "tests", "benchmarks", "tutorials") if (ROOT / d).exists()]
    proc = subprocess.run(ruff + args + dirs, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("doc", ["README.md", "docs/HOWTO.md", "docs/diffusers.md"])
def test_python_blocks_of_the_docs_are_ruff_formatted(doc):
    """A reader copies these blocks: they are formatted as the code base is."""
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)
    assert blocks, f"{doc} has no python block"
    for code in blocks:
        proc = subprocess.run(ruff + ["format", "--diff", "-"], cwd=ROOT, input=code,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, f"{doc}:\n{proc.stdout}"


def test_the_gpu_checks_call_what_exists():
    """`benchmarks/gpu_checks.sh` runs only on a GPU, which CI never has: it must at least parse,
    call benchmark scripts that exist with options they define, and set config keys that a
    run accepts, or it would rot unseen until the day a GPU is lent."""
    from difflab.app.config import apply_overrides, get_preset
    from difflab.app.runs import check_config

    script = ROOT / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    calls = re.findall(r"\$py (benchmarks/\w+\.py)([^\n|]*)", text)
    assert {c[0] for c in calls} == {"benchmarks/mnist_quality.py",
                                     "benchmarks/speed_vs_diffusers.py"}  # fmt: skip
    for path, args in calls:
        source = (ROOT / path).read_text()
        for option in re.findall(r"(--[a-z][a-z0-9-]*)", args):
            assert f'"{option}"' in source, f"{path} has no option {option}"
        sets = re.findall(r"--set (\S+)", args)
        check_config(apply_overrides(get_preset("mnist"), sets))
    assert "tests/test_speed.py -k cuda" in text
