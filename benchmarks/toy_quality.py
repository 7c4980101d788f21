"""Sample quality of the 2-D presets: sliced Wasserstein distance to fresh data.

For each preset: train with the preset's defaults, draw 5,000 samples with its sampler and
compare their sliced Wasserstein distance to fresh data (averaged over 5 fresh sets) with the
distance between two fresh data sets of the same size (averaged over 5 pairs).

    .venv/bin/python benchmarks/toy_quality.py --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time

from difflab.app.config import apply_overrides, get_preset
from difflab.app.training import train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["swissroll", "swissroll-sd2015"])
    ap.add_argument("--set", action="append", default=[], help="config override")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()
    rows = [
        "| preset | steps | train+report s | SW samples vs data | SW data vs data | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.presets:
        cfg = apply_overrides(get_preset(name), args.set)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = train_run(cfg, f"{tmp}/run", progress=False, log=lambda s: None)
            dt = time.perf_counter() - t0
        q = res.metrics["quality"]
        sw, ref = q["sliced_wasserstein"], q["sliced_wasserstein_data_vs_data"]
        rows.append(f"| {name} | {res.step} | {dt:.0f} | {sw:.4f} | {ref:.4f} | {sw / ref:.2f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.append:
        from _record import record

        record(
            "2-D sample quality (sliced Wasserstein, n = 5,000)",
            table,
            path=args.append,
            notes="Acceptance: ratio <= 2 for the default preset, <= 3 for the 2015 model.",
        )


if __name__ == "__main__":
    main()
