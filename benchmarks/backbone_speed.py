"""Training throughput of the backbones (U-Net, DiT, U-ViT): images per second of a full step.

One training step = forward + backward + AdamW update of an epsilon-prediction MSE loss at random
timesteps on a fixed random batch (`_timing.TrainStep`). The networks are timed in
interleaved rounds (so a burst of load from other processes hits all of them alike); the table
gives parameters, forward GFLOPs per image (`difflab.nn.cost.network_cost`: 2 per multiply-add,
attention included), the best step time and images per second at the best and the median step.

    .venv/bin/python benchmarks/backbone_speed.py                 # MNIST pixels: U-Net, DiT, U-ViT
    .venv/bin/python benchmarks/backbone_speed.py --nets unet:mnist-latent,dit:mnist-latent-dit
    .venv/bin/python benchmarks/backbone_speed.py --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _timing import TrainStep, time_interleaved
from torch import nn

from difflab.nn.cost import network_cost
from difflab.nn.dit import DIT_PRESETS, build_dit
from difflab.nn.unet import UNET_PRESETS, build_unet

BUILDERS: dict[str, tuple[dict, Callable[[str], nn.Module]]] = {
    "unet": (UNET_PRESETS, build_unet),
    "dit": (DIT_PRESETS, build_dit),
}


def parse_nets(text: str) -> list[tuple[str, str]]:
    """ "unet:mnist-cpu,dit:mnist-dit" -> [("unet", "mnist-cpu"), ("dit", "mnist-dit")], with
    one shared data shape; an unknown family or preset is an argparse error."""
    nets, shapes = [], set()
    for item in text.split(","):
        family, _, preset = item.strip().partition(":")
        if family not in BUILDERS:
            raise argparse.ArgumentTypeError(
                f"unknown network family {family!r} in {item!r}; valid: {', '.join(BUILDERS)}"
            )
        presets = BUILDERS[family][0]
        if preset not in presets:
            raise argparse.ArgumentTypeError(
                f"unknown {family} preset {preset!r}; valid: {', '.join(presets)}"
            )
        cfg = presets[preset]
        shapes.add((cfg.in_channels, cfg.image_size, cfg.image_size))
        nets.append((family, preset))
    if len(shapes) != 1:
        raise argparse.ArgumentTypeError(f"the networks must share one data shape, got {shapes}")
    return nets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets",
        type=parse_nets,
        default=parse_nets("unet:mnist-cpu,dit:mnist-dit,dit:mnist-uvit"),
        help="family:preset list, one data shape (default: unet:mnist-cpu,dit:mnist-dit,"
        "dit:mnist-uvit)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--append", metavar="PATH", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--batch-size, --rounds and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {}
    for family, preset in args.nets:
        presets, build = BUILDERS[family]
        cfg = presets[preset]
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        models[f"{family} {preset}"] = build(preset)
    costs = {name: network_cost(m, shape) for name, m in models.items()}
    benches = {
        name: TrainStep(m, shape, args.batch_size, args.device, args.bf16)
        for name, m in models.items()
    }
    time_interleaved(benches, args.rounds, args.steps, log=lambda m: print(m, flush=True))

    lines = [
        "| network | params | fwd GFLOPs/img | best ms/step | img/s (best) | img/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, bench in benches.items():
        best, median = min(bench.times), statistics.median(bench.times)
        lines.append(
            f"| {name} | {costs[name].parameters / 1e6:.3f}M | {costs[name].flops / 1e9:.3f} "
            f"| {1000 * best:.1f} | {args.batch_size / best:.0f} "
            f"| {args.batch_size / median:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.append:
        from _record import record

        where = f"{args.threads} CPU threads" if args.device == "cpu" else args.device
        notes = (
            f"{where}, batch {args.batch_size} of {'x'.join(map(str, shape))}, "
            f"{'bf16 autocast' if args.bf16 else 'float32'}; one step = forward + backward + "
            f"AdamW on random data; {args.rounds} x {args.steps} timed steps per network after "
            "a warm-up step, interleaved."
        )
        record(
            "Backbone training throughput (U-Net, DiT, U-ViT)", table, path=args.append, notes=notes
        )


if __name__ == "__main__":
    main()
