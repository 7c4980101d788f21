"""The code base is ruff clean (lint and format)."""

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
