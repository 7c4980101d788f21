"""The training-step timer shared by the throughput benchmarks (unet_speed, backbone_speed,
backbone_quality): one model's full optimisation step on a fixed random batch, and the
interleaved rounds that time several models alike."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn


class TrainStep:
    """One model, its AdamW optimiser and a fixed random batch; `run()` times one step.

    One step = forward + backward + AdamW update of an epsilon-prediction MSE loss at random
    timesteps (x_t = 0.8 x0 + 0.6 eps), optionally under bf16 autocast.
    """

    def __init__(self, model: nn.Module, shape, batch_size: int, device, bf16: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(batch_size, *shape, generator=gen).to(device)
        self.eps = torch.randn(batch_size, *shape, generator=gen).to(device)
        self.t = torch.randint(0, 1000, (batch_size,), generator=gen).float().to(device)
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        self.device, self.bf16 = torch.device(device), bf16
        self.batch_size = batch_size
        self.times: list[float] = []

    def run(self, record: bool = True) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        sync()
        start = time.perf_counter()
        xt = 0.8 * self.x0 + 0.6 * self.eps
        with autocast:
            loss = (self.model(xt, self.t).float() - self.eps).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync()
        if record:
            self.times.append(time.perf_counter() - start)

    def images_per_second(self) -> tuple[float, float]:
        """Images per second at the best and at the median timed step."""
        return (
            self.batch_size / min(self.times),
            self.batch_size / statistics.median(self.times),
        )


def time_interleaved(
    benches: Mapping[str, TrainStep],
    rounds: int,
    steps: int,
    log: Callable[[str], None] | None = None,
) -> None:
    """One untimed warm-up step each, then ``rounds`` rounds of ``steps`` timed steps per model
    in turn, so that a burst of load from other processes hits every model alike."""
    for i, bench in enumerate(benches.values()):
        bench.run(record=False)
        if log:
            log(f"warm-up {i + 1}/{len(benches)}")
    for r in range(rounds):
        for bench in benches.values():
            for _ in range(steps):
                bench.run()
        if log:
            log(f"round {r + 1}/{rounds}")
