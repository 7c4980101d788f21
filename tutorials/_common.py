"""Small helpers shared by the tutorials: fast mode, output folder, figures, data folder.

* ``DIFFLAB_FAST=1``           small sizes, so that every tutorial runs in a few seconds;
* ``DIFFLAB_TUTORIAL_OUT=DIR`` where figures are written (default ``tutorials/_out/``);
* ``DIFFLAB_DATA_DIR=DIR`` or ``--data-dir DIR`` on the command line: a folder with real data
  (e.g. ``DIR/mnist``), used in full mode only. ``../shared/data`` next to the repository is
  looked at too.

Everything is read at call time, so a process may run several tutorials with different settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


def is_fast() -> bool:
    """True when ``DIFFLAB_FAST`` is set to something other than "", "0" or "false"."""
    return os.environ.get("DIFFLAB_FAST", "").strip().lower() not in ("", "0", "false", "no")


def pick(fast: Any, full: Any) -> Any:
    """``fast`` in fast mode, ``full`` otherwise."""
    return fast if is_fast() else full


def out_dir() -> Path:
    """The folder figures go to (created if missing)."""
    path = Path(os.environ.get("DIFFLAB_TUTORIAL_OUT") or _HERE / "_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def out_path(name: str) -> Path:
    """``out_dir() / name``."""
    return out_dir() / name


def data_dir() -> Path | None:
    """A real-data folder from ``--data-dir``, ``DIFFLAB_DATA_DIR`` or ``../shared/data``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-dir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    for candidate in (args.data_dir, os.environ.get("DIFFLAB_DATA_DIR")):
        if candidate:
            return Path(candidate)
    shared = _HERE.parent.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (5.0, 4.0)):
    """A matplotlib Figure on the Agg canvas (no pyplot, no window) and its 2-D axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save(fig: Any, name: str, dpi: int = 110) -> Path:
    """Save a Figure as ``out_dir() / name``, print where it went and, in a notebook, show it."""
    path = out_path(name)
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
    if _in_ipython():
        from IPython.display import display

        display(fig)
    return path


def _in_ipython() -> bool:
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None
