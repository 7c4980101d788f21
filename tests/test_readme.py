"""The README's Python example runs as written (with fewer training steps)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert "range(3000)" in code
    code = code.replace("range(3000)", "range(30)").replace("(5000, 2)", "(200, 2)")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    x = ns["x"]
    assert x.shape == (200, 2) and torch.isfinite(x).all()
