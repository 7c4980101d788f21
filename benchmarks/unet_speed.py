"""CPU training throughput of the image networks on 28x28 grayscale batches.

One training step = forward + backward + AdamW update of an epsilon-prediction MSE loss at random
timesteps, batch 128, 1x28x28 inputs, `torch.set_num_threads(2)` by default. The models are timed
in interleaved rounds (so a burst of load from other processes hits all of them alike); the table
gives parameters, forward multiply-accumulates per image (convolutions and linear layers), the
best step time and the images per second at the best and at the median step time.

    .venv/bin/python benchmarks/cpu_unet_speed.py                 # mnist-cpu preset + BasicUNet
    .venv/bin/python benchmarks/cpu_unet_speed.py --candidates    # + the candidate configs
    .venv/bin/python benchmarks/cpu_unet_speed.py --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from difflab.nn.unet import UNET_PRESETS, BasicUNet, build_unet

BASE = UNET_PRESETS["mnist-cpu"]

# Candidates for the "mnist-cpu" preset, as overrides of its config (levels 28 -> 14 -> 7).
CANDIDATES: dict[str, dict] = {
    "c32 (1,2,2) r1": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
    "c24 (1,1,2) r1": dict(base_channels=24, channel_mult=(1, 1, 2), num_res_blocks=1),
    "c16 (1,2,2) r1": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1),
    "c16 (1,2,4) r1": dict(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1),
    "c16 (1,1,2) r1": dict(base_channels=16, channel_mult=(1, 1, 2), num_res_blocks=1),
    "c16 (1,1,2) r2": dict(base_channels=16, channel_mult=(1, 1, 2), num_res_blocks=2),
    "c16 (1,2,2) r1 attn7": dict(
        base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,)
    ),
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module) -> int:
    """Multiply-accumulates of the conv and linear layers for one 1x28x28 image."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (module.weight.numel() // module.weight.shape[0])

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28), torch.zeros(1))
    for h in handles:
        h.remove()
    return total


class TrainStep:
    """One model, its AdamW optimiser and a fixed random batch; `run()` times one step."""

    def __init__(self, model: nn.Module, batch_size: int, channels_last: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(batch_size, 1, 28, 28, generator=gen)
        self.eps = torch.randn(batch_size, 1, 28, 28, generator=gen)
        self.t = torch.randint(0, 1000, (batch_size,), generator=gen).float()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        self.times: list[float] = []

    def run(self, record: bool = True) -> None:
        start = time.perf_counter()
        xt = 0.8 * self.x0 + 0.6 * self.eps
        loss = (self.model(xt, self.t) - self.eps).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if record:
            self.times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", action="store_true", help="also time CANDIDATES")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--append", metavar="PATH", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    makers: dict[str, tuple[Callable[[], nn.Module], str]] = {
        "UNet mnist-cpu": (lambda: build_unet("mnist-cpu"), "preset"),
        "BasicUNet": (lambda: BasicUNet(in_channels=1), "(32, 64, 64), k=5"),
    }
    if args.candidates:
        for name, overrides in CANDIDATES.items():
            desc = ", ".join(f"{k}={v}" for k, v in overrides.items() if getattr(BASE, k) != v)
            makers[f"UNet {name}"] = (
                lambda o=overrides: build_unet(dataclasses.replace(BASE, **o)),
                desc or "= mnist-cpu",
            )
    benches = {
        name: TrainStep(make(), args.batch_size, args.channels_last)
        for name, (make, _) in makers.items()
    }
    for bench in benches.values():
        bench.run(record=False)  # warm-up
    for _ in range(args.rounds):
        for bench in benches.values():
            for _ in range(args.steps):
                bench.run()

    lines = [
        "| model | notes | params | fwd MMAC/img | best ms/step | img/s (best) | img/s (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, bench in benches.items():
        best, median = min(bench.times), statistics.median(bench.times)
        lines.append(
            f"| {name} | {makers[name][1]} | {count_params(bench.model) / 1e6:.3f}M "
            f"| {forward_macs(bench.model) / 1e6:.1f} | {1000 * best:.0f} "
            f"| {args.batch_size / best:.0f} | {args.batch_size / median:.0f} |"
        )
    print("\n".join(lines))

    if args.append:
        cmd = " ".join(["python", *sys.argv])
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        header = [
            "",
            f"## CPU U-Net training throughput ({datetime.date.today().isoformat()})",
            "",
            f"`{cmd}` -- {machine}, torch {torch.__version__}, {args.threads} threads, "
            f"batch {args.batch_size}, 1x28x28, forward + backward + AdamW step, "
            f"{args.rounds} x {args.steps} timed steps per model.",
            "",
        ]
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
