"""Append a benchmark table to BENCHMARKS.md with the command, machine, versions and date."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


def machine() -> str:
    """A one-line description of this machine and the software versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if torch.cuda.is_available():
        dev += f", GPU {torch.cuda.get_device_name(0)}"
    return f"{dev}, Python {platform.python_version()}"


def record(title: str, table: str, *, path: str | Path = "BENCHMARKS.md", notes: str = "") -> None:
    """Append a section: title, command, machine, date, the table and notes."""
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    text = (
        f"\n## {title}\n\n"
        f"- command: `{cmd}`\n"
        f"- machine: {machine()}\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"{table.rstrip()}\n"
    )
    if notes:
        text += f"\n{notes.rstrip()}\n"
    p = Path(path)
    if not p.exists():
        p.write_text("# Benchmarks\n\nMeasured figures only; each section names its command.\n")
    with p.open("a") as f:
        f.write(text)
