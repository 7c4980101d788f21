"""Sampling speed of the mnist preset's network: images per second under each inference lever.

One call draws a batch with a sampler (default SDE-DPM-Solver++(2M), 10 steps) from the
`mnist-cpu` U-Net (random weights: speed does not depend on them) through the same code path
as `difflab sample` (difflab.samplers.sample with the run's thresholding). Each lever of
difflab.inference is applied alone on top of the eager baseline (torch.no_grad, float32, NCHW,
no compile), then all that helped (at the best and the median call) together, then that
setting at other batch sizes. The settings are timed in interleaved rounds (so a burst of load
from other processes hits all of them alike); the table gives the first call (compilation
included), the best and median call, images per second at the best and median call, and each
setting's largest difference from the baseline's samples (same seed, same noise). On CUDA a
CUDA-graph row (difflab.inference.GraphedNetwork: one captured graph replayed per step, under
inference_mode) is added.

    .venv/bin/python benchmarks/sampling_speed.py
    .venv/bin/python benchmarks/sampling_speed.py --batch-sizes 64,1000 --append BENCHMARKS.md
    .venv/bin/python benchmarks/sampling_speed.py --default-batches 64,250,500,1000  # defaults
    python benchmarks/sampling_speed.py --device cuda --batch-size 1000      # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from difflab.inference import (
    GraphedNetwork,
    compile_network,
    compile_unavailable,
    inference_context,
)
from difflab.nn.unet import build_unet
from difflab.parameterization import ModelDenoiser
from difflab.samplers import nfe, sample
from difflab.schedules import DiscreteSchedule


@dataclass(frozen=True)
class Setting:
    name: str
    inference_mode: bool = False
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False
    cuda_graph: bool = False


LEVERS = [
    Setting("eager (no_grad, fp32)"),
    Setting("inference_mode", inference_mode=True),
    Setting("channels-last", channels_last=True),
    Setting("compile", compile=True),
    Setting("bf16 autocast", bf16=True),
    Setting("CUDA graph", inference_mode=True, cuda_graph=True),  # CUDA only
]


class SampleCall:
    """One setting: its own copy of the network and a timed `run()` of one sampling call."""

    def __init__(self, setting: Setting, args: argparse.Namespace, batch_size: int) -> None:
        torch.manual_seed(0)  # the same weights for every setting, moved off their
        model = build_unet("mnist-cpu")  # initialisation, whose zero last layer outputs zeros
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model = model.to(args.device).eval()
        if setting.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if setting.compile:
            compile_network(model, args.device)
        if setting.cuda_graph:
            model = GraphedNetwork(model)
        self.setting, self.args, self.batch_size = setting, args, batch_size
        self.schedule = DiscreteSchedule.from_name("linear", 1000)
        self.denoiser = ModelDenoiser(model, self.schedule, parameterization="eps")
        self.device = torch.device(args.device)
        self.times: list[float] = []
        self.first = float("nan")
        self.out: torch.Tensor | None = None

    def run(self, record: bool = True) -> None:
        s = self.setting
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        grad_off = (
            inference_context(self.device, bf16=s.bf16)
            if s.inference_mode
            else _no_grad(self.device, s.bf16)
        )
        sync()
        start = time.perf_counter()
        with grad_off:
            x = sample(
                self.denoiser, self.schedule, (self.batch_size, 1, 28, 28),
                sampler=self.args.sampler, steps=self.args.steps, device=self.device,
                generator=torch.Generator().manual_seed(0), threshold="clip",
            )  # fmt: skip
        sync()
        elapsed = time.perf_counter() - start
        if record:
            self.times.append(elapsed)
        else:
            self.first, self.out = elapsed, x.float().cpu()


@contextlib.contextmanager
def _no_grad(device: torch.device, bf16: bool):
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield


def time_settings(calls: dict[str, SampleCall], rounds: int) -> None:
    for call in calls.values():
        call.run(record=False)  # warm-up (and compilation)
    for _ in range(rounds):
        for call in calls.values():
            call.run()


HEADER = [
    "| setting | batch | first call s | best s | median s | img/s (best) | img/s (median) "
    "| max abs diff |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def table_rows(calls: dict[str, SampleCall], references: dict[int, torch.Tensor]) -> list[str]:
    """One table row per call; its samples are compared with the eager samples of the *same*
    batch size (a stochastic sampler's noise stream depends on the batch size)."""
    rows = []
    for name, c in calls.items():
        best, median = min(c.times), statistics.median(c.times)
        reference = references[c.batch_size]
        diff = (c.out - reference).abs().max().item() if c.out is not None else 0
        rows.append(
            f"| {name} | {c.batch_size} | {c.first:.2f} | {best:.2f} | {median:.2f} "
            f"| {c.batch_size / best:.0f} | {c.batch_size / median:.0f} | {diff:.1e} |"
        )
    return rows


def _batches(text: str) -> list[int]:
    """A comma-separated list of positive batch sizes (argparse type: bad input is one line)."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = [0]
    if not all(b > 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"expected positive integers B1,B2,..., got {text!r}")
    return sizes


def compare_defaults(args: argparse.Namespace, batches: list[int]) -> None:
    """inference_mode with and without channels-last at each batch size, timed in interleaved
    rounds, each row against the eager samples of its batch size."""
    candidates = [LEVERS[1], Setting("inference_mode + channels-last", True, channels_last=True)]
    calls = {f"{s.name}, batch {b}": SampleCall(s, args, b) for b in batches for s in candidates}
    time_settings(calls, args.rounds)
    references = {}
    for b in batches:
        ref = SampleCall(LEVERS[0], args, b)
        ref.run(record=False)
        assert ref.out is not None
        references[b] = ref.out
    table = "\n".join([*HEADER, *table_rows(calls, references)])
    print(table)
    if args.append:
        _append(args, table, "Sampling speed: default levers per batch size")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", default="dpm++2m-sde")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=250, help="batch of the lever rows")
    parser.add_argument(
        "--batch-sizes", type=_batches, default=[], help="more batch sizes for the best setting"
    )
    parser.add_argument(
        "--default-batches",
        type=_batches,
        default=[],
        metavar="B1,B2,...",
        help="only compare inference_mode with and without channels-last at these batch sizes "
        "(the candidates for difflab's default)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--append", metavar="PATH", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.default_batches:
        return compare_defaults(args, args.default_batches)
    cuda = torch.device(args.device).type == "cuda"
    levers = [
        s
        for s in LEVERS
        if not (s.compile and compile_unavailable(args.device)) and (cuda or not s.cuda_graph)
    ]
    calls = {s.name: SampleCall(s, args, args.batch_size) for s in levers}
    time_settings(calls, args.rounds)
    base = calls[LEVERS[0].name]
    helped = [  # faster at the best and at the median call
        c.setting
        for c in calls.values()
        if min(c.times) < 0.95 * min(base.times)
        and statistics.median(c.times) < 0.95 * statistics.median(base.times)
    ]
    best = Setting(
        "together: " + (" + ".join(s.name for s in helped) or "none helped"),
        inference_mode=any(s.inference_mode for s in helped),
        channels_last=any(s.channels_last for s in helped),
        compile=any(s.compile for s in helped),
        bf16=any(s.bf16 for s in helped),
        cuda_graph=any(s.cuda_graph for s in helped),
    )
    more = {best.name: SampleCall(best, args, args.batch_size)} if len(helped) > 1 else {}
    for b in args.batch_sizes:
        more[f"{best.name if helped else base.setting.name}, batch {b}"] = SampleCall(
            best if helped else base.setting, args, b
        )
    time_settings(more, args.rounds)

    assert base.out is not None
    lines = [*HEADER, *table_rows(calls, {args.batch_size: base.out})]
    if more:
        references = {args.batch_size: base.out}
        for b in {c.batch_size for c in more.values()} - set(references):
            ref = SampleCall(LEVERS[0], args, b)
            ref.run(record=False)
            assert ref.out is not None
            references[b] = ref.out
        lines += table_rows(more, references)
    table = "\n".join(lines)
    print(table)
    if args.append:
        _append(args, table, "Sampling speed of the mnist network")


def _append(args: argparse.Namespace, table: str, title: str) -> None:
    from _record import record

    where = f"{args.threads} CPU threads" if args.device == "cpu" else args.device
    notes = (
        f"{where}; U-Net `mnist-cpu` (random weights), {args.sampler} with {args.steps} "
        f"steps ({nfe(args.sampler, args.steps)} NFE) per call, threshold clip; "
        f"{args.rounds} timed calls per setting after a first call; max abs diff: against "
        "the eager float32 samples from the same noise (pixels in [-1, 1])."
    )
    record(title, table, path=args.append, notes=notes)


if __name__ == "__main__":
    main()
