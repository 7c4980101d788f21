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


def test_readme_links_every_tutorial_in_order():
    text = README.read_text()
    tutorials = sorted(p.name for p in (README.parent / "tutorials").glob("[0-9][0-9]_*.py"))
    linked = re.findall(r"\]\(tutorials/([0-9][0-9]_[^)]+\.py)\)", text)
    assert linked == tutorials


def test_readme_images_exist_and_are_small():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert len(images) >= 3, "the README shows sample grids, a denoising GIF and a schedule plot"
    for rel in images:
        path = README.parent / rel
        assert path.is_file(), rel
        assert path.stat().st_size < 600_000, f"{rel} is too large to commit"
