"""Training throughput of the image U-Nets: images per second of a full optimisation step.

One training step = forward + backward + AdamW update of an epsilon-prediction MSE loss at random
timesteps on a fixed random batch. The models are timed in interleaved rounds (so a burst of
load from other processes hits all of them alike); the table gives parameters, forward
multiply-accumulates per image (convolutions and linear layers), the best step time and the
images per second at the best and at the median step time.

    .venv/bin/python benchmarks/unet_speed.py                     # mnist-cpu preset + BasicUNet
    .venv/bin/python benchmarks/unet_speed.py --candidates        # + the candidate configs
    .venv/bin/python benchmarks/unet_speed.py --append BENCHMARKS.md
    # on a GPU: the DDPM CIFAR-10 U-Net (35.7M parameters), bf16 autocast
    python benchmarks/unet_speed.py --preset ddpm-cifar10 --device cuda --bf16 \\
        --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch
from _timing import TrainStep, time_interleaved
from torch import nn

from difflab.nn.unet import UNET_PRESETS, BasicUNet, build_unet

BASE = UNET_PRESETS["mnist-cpu"]

# Candidates for the "mnist-cpu" preset, as full configs (28x28 grayscale).
CANDIDATES: dict[str, dict] = {
    "c32 (1,2,2) r1": dict(patch_size=1, base_channels=32, channel_mult=(1, 2, 2)),
    "c24 (1,1,2) r1": dict(patch_size=1, base_channels=24, channel_mult=(1, 1, 2)),
    "c16 (1,2,2) r1": dict(patch_size=1, base_channels=16, channel_mult=(1, 2, 2)),
    "c16 (1,1,2) r1": dict(patch_size=1, base_channels=16, channel_mult=(1, 1, 2)),
    "c16 (1,1,2) r2": dict(
        patch_size=1, base_channels=16, channel_mult=(1, 1, 2), num_res_blocks=2
    ),
    # patch_size=2: the network runs at 14x14 and 7x7 on the 2x2-folded image
    "p2 c32 (1,2) r1": dict(patch_size=2, base_channels=32, channel_mult=(1, 2)),
    "p2 c48 (1,2) r1": dict(patch_size=2, base_channels=48, channel_mult=(1, 2)),
    "p2 c64 (1,2) r1": dict(patch_size=2, base_channels=64, channel_mult=(1, 2)),
    "p2 c64 (1,1) r2": dict(patch_size=2, base_channels=64, channel_mult=(1, 1), num_res_blocks=2),
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the conv and linear layers for one image of shape (C, H, W)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (module.weight.numel() // module.weight.shape[0])

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=device), torch.zeros(1, device=device))
    for h in handles:
        h.remove()
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="U-Net presets (default: mnist-cpu)")
    parser.add_argument("--candidates", action="store_true", help="also time CANDIDATES")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--append", metavar="PATH", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    presets = args.preset or ["mnist-cpu"]
    cfg0 = UNET_PRESETS[presets[0]]
    shape = (cfg0.in_channels, cfg0.image_size, cfg0.image_size)
    makers: dict[str, tuple[Callable[[], nn.Module], str]] = {
        f"UNet {p}": (lambda p=p: build_unet(p), "preset") for p in presets
    }
    if shape == (1, 28, 28):
        makers["BasicUNet"] = (lambda: BasicUNet(in_channels=1), "(32, 64, 64), k=5")
    if args.candidates:
        for name, overrides in CANDIDATES.items():
            desc = ", ".join(f"{k}={v}" for k, v in overrides.items() if getattr(BASE, k) != v)
            makers[f"UNet {name}"] = (
                lambda o=overrides: build_unet(dataclasses.replace(BASE, **o)),
                desc or "= mnist-cpu",
            )
    benches = {
        name: TrainStep(make(), shape, args.batch_size, args.device, args.bf16)
        for name, (make, _) in makers.items()
    }
    time_interleaved(benches, args.rounds, args.steps)

    lines = [
        "| model | notes | params | fwd GMAC/img | best ms/step | img/s (best) | img/s (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, bench in benches.items():
        best, median = min(bench.times), statistics.median(bench.times)
        lines.append(
            f"| {name} | {makers[name][1]} | {count_params(bench.model) / 1e6:.3f}M "
            f"| {forward_macs(bench.model, shape) / 1e9:.3f} | {1000 * best:.1f} "
            f"| {args.batch_size / best:.0f} | {args.batch_size / median:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.append:
        from _record import record

        where = f"{args.threads} CPU threads" if args.device == "cpu" else args.device
        notes = (
            f"{where}, batch {args.batch_size} of {'x'.join(map(str, shape))}, "
            f"{'bf16 autocast' if args.bf16 else 'float32'}; one step = forward + backward + "
            f"AdamW; {args.rounds} x {args.steps} timed steps per model after a warm-up step."
        )
        record("U-Net training throughput", table, path=args.append, notes=notes)


if __name__ == "__main__":
    main()
