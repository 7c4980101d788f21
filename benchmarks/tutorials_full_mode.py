"""Run the tutorials as scripts and record each one's wall time and whether every check passed.

The test suite runs the tutorials in fast mode only (tests/test_tutorials.py); full mode, the
default of a tutorial run as a script, trains longer on real data where it finds it and is what
some of their text describes. This script runs each selected tutorial in its own process
(``python tutorials/NN_name.py``, with the answers to the exercises), one after the other, with
a time limit per tutorial, and prints (or appends to BENCHMARKS.md) a table: tutorial, mode,
wall and CPU seconds, passed or the last line of its error.

    .venv/bin/python benchmarks/tutorials_full_mode.py --data-dir ../shared/data \
        --append BENCHMARKS.md
    .venv/bin/python benchmarks/tutorials_full_mode.py --only 11,12,13 --timeout 3600
    .venv/bin/python benchmarks/tutorials_full_mode.py --fast --only 01   # a quick try
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


def _selection(text: str | None) -> list[Path]:
    if not text:
        return TUTORIALS
    by_number = {p.name[:2]: p for p in TUTORIALS}
    wanted = [part.strip().zfill(2) for part in text.split(",") if part.strip()]
    unknown = [n for n in wanted if n not in by_number]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown tutorial number(s) {', '.join(unknown) or repr(text)}; "
            f"available: {', '.join(sorted(by_number))}"
        )
    return [by_number[n] for n in wanted]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the time limit must be positive, got {text}")
    return value


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(
    path: Path, *, fast: bool, timeout: float, env: dict[str, str], log_dir: Path | None = None
) -> tuple[float, float, str]:
    """Run one tutorial; returns (wall seconds, CPU seconds (user + sys), "passed" or a one-line
    reason). With ``log_dir``, its printed output (the figures its text quotes) goes to
    ``NN_name.log``. The CPU seconds are the tutorial's cost on a machine shared with other
    jobs, where the wall seconds also count the others' time."""
    cpu0 = _child_cpu_seconds()
    seconds, result = _run(path, fast=fast, timeout=timeout, env=env, log_dir=log_dir)
    return seconds, _child_cpu_seconds() - cpu0, result


def _run(
    path: Path, *, fast: bool, timeout: float, env: dict[str, str], log_dir: Path | None
) -> tuple[float, str]:
    # unbuffered: a run stopped at the time limit still leaves what it printed in the log
    run_env = dict(env, DIFFLAB_ANSWERS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if fast:
        run_env["DIFFLAB_FAST"] = "1"
    else:
        run_env.pop("DIFFLAB_FAST", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(path)], cwd=path.parent, env=run_env, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        _write_log(log_dir, path, err.stdout, err.stderr)
        return time.perf_counter() - start, f"stopped after the {timeout:.0f} s limit"
    seconds = time.perf_counter() - start
    _write_log(log_dir, path, proc.stdout, proc.stderr)
    if proc.returncode == 0:
        return seconds, "passed"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return seconds, f"failed: {lines[-1].strip() if lines else f'exit {proc.returncode}'}"


def _write_log(log_dir: Path | None, path: Path, stdout, stderr) -> None:
    if log_dir is None:
        return
    text = "".join(
        part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
        for part in (stdout, stderr)
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{path.stem}.log").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=_selection, default=None, metavar="NN,NN",
                        help="tutorial numbers to run (default: all)")  # fmt: skip
    parser.add_argument("--fast", action="store_true", help="fast mode instead of full mode")
    parser.add_argument("--timeout", type=_positive, default=7200.0,
                        help="seconds allowed per tutorial (default 7200)")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="real data for full mode (DIFFLAB_DATA_DIR)")  # fmt: skip
    parser.add_argument("--append", type=Path, default=None, metavar="BENCHMARKS.md")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="write each tutorial's printed output to DIR/NN_name.log")  # fmt: skip
    parser.add_argument("--notes", default="", help="a line recorded under the table")
    args = parser.parse_args(argv)
    paths = args.only or TUTORIALS
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.data_dir is not None:
        env["DIFFLAB_DATA_DIR"] = str(args.data_dir.resolve())
    mode = "fast" if args.fast else "full"
    rows = ["| tutorial | mode | wall seconds | CPU seconds | result |", "|---|---|---:|---:|---|"]
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ({mode} mode) ...", flush=True)
        seconds, cpu, result = run_one(
            path, fast=args.fast, timeout=args.timeout, env=env, log_dir=args.log_dir
        )
        print(f"    {seconds:.0f} s ({cpu:.0f} CPU s): {result}", flush=True)
        rows.append(
            f"| `{path.name}` | {mode} | {seconds:.0f} | {cpu:.0f} | {result.replace('|', '/')} |"
        )
    table = "\n".join(rows)
    print(table)
    if args.append is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _record import record

        record(f"Tutorials in {mode} mode", table, path=args.append, notes=args.notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
