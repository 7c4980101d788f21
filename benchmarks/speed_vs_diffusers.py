"""difflab against diffusers on the same network: training and sampling images per second.

difflab's U-Net preset (default `ddpm-cifar10`, the DDPM CIFAR-10 network, 35.7M parameters)
and diffusers' `UNet2DModel` built from it by difflab.interop (diffusers_config_from_unet,
state_dict_to_diffusers) are the same function: the script first checks that both give the
same output on the same input (diffusers' timestep k is difflab's t = k + 1) and stops if not.
Then, for each library, eager and compiled (torch.compile, default mode, the same for both):

* training: images/s of a full step (epsilon-prediction MSE at random timesteps, forward +
  backward + AdamW), the model in train mode (dropout on);
* sampling: images/s of DDIM at equal NFE from the same noise, each library's own loop
  (difflab.samplers.sample; diffusers' DDIMScheduler.step over UNet2DModel), both under
  torch.inference_mode with x0 clipped to [-1, 1];
* the achieved FLOP/s (FLOPs per image from torch.utils.flop_counter) as a fraction of this
  machine's matmul peak, measured in the same run (the best of square float32 matmuls, or
  bfloat16 with --bf16);
* peak memory: on CUDA the peak allocated by the step, on a CPU the growth of the process's
  peak resident set over its level before the first step (each measurement runs in its own
  process, so peaks and compilation caches do not leak between them).

Measurements are repeated in interleaved rounds (--repeats) and the best kept, so a burst of
load from other processes does not decide a ratio.

    # see that it works (minutes on a CPU; the toy-sized preset compiles quickly)
    .venv/bin/python benchmarks/speed_vs_diffusers.py --preset tiny-ddpm --batch-size 8 \\
        --sample-batch 8 --nfe 2 --steps 2
    # the CPU measurement, on an idle machine
    .venv/bin/python benchmarks/speed_vs_diffusers.py --device cpu --batch-size 8 \\
        --sample-batch 16 --nfe 10 --steps 5 --repeats 2 --append BENCHMARKS.md
    # on a GPU
    python benchmarks/speed_vs_diffusers.py --device cuda --batch-size 128 --sample-batch 256 \\
        --nfe 50 --steps 20 --bf16 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.inference import compile_network, inference_context
from difflab.interop import diffusers_config_from_unet, state_dict_to_diffusers
from difflab.nn.unet import UNET_PRESETS, UNet
from difflab.parameterization import ModelDenoiser
from difflab.samplers import sample
from difflab.schedules import DiscreteSchedule

LIBRARIES = ("difflab", "diffusers")


# ------------------------------------------------------------------------------ the twins
def build_twins(preset: str, seed: int = 0) -> tuple[UNet, Any]:
    """difflab's U-Net of ``preset`` with seeded random weights, and diffusers' UNet2DModel
    holding the same weights. The weights are perturbed away from their initialisation, whose
    zero last layer would make every output zero (and any two networks agree)."""
    import diffusers

    cfg = UNET_PRESETS[preset]
    torch.manual_seed(seed)
    ours = UNet(**asdict(cfg))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = {k: v for k, v in diffusers_config_from_unet(cfg).items() if not k.startswith("_")}
    theirs = diffusers.UNet2DModel(**config)
    theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict(), cfg))
    return ours, theirs


def check_same_function(preset: str) -> tuple[float, float]:
    """Largest difference of the two outputs on a random batch at three timesteps, and the
    largest output."""
    ours, theirs = build_twins(preset)
    ours.eval(), theirs.eval()
    cfg = UNET_PRESETS[preset]
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    k = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = ours(x, (k + 1).float())
        diff = (out - theirs(x, k).sample).abs().max().item()
    return diff, out.abs().max().item()


def _call(library: str, model: Any, xt: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The network's epsilon at diffusers timestep k (difflab t = k + 1)."""
    if library == "difflab":
        return model(xt, (k + 1).to(xt.dtype))
    return model(xt, k).sample


# ------------------------------------------------------------------------------ measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def matmul_peak(device: torch.device, bf16: bool, n: int, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` square n x n matmuls (float32, or bfloat16)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _proc_status(key: str) -> int | None:
    """A size field of /proc/self/status (Linux) in bytes, or None."""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status("VmHWM")  # peak resident set, reset by _reset_peak
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak(device: torch.device) -> int:
    """The level the next peak is measured from: on a CPU the resident set now, with the
    peak reset to it (Linux: writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _proc_status("VmRSS")
    return rss if rss is not None else _peak_bytes(device)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Sampling, then training, of one library in one mode (runs in a fresh process)."""
    torch.set_num_threads(job["threads"])
    device, bf16 = torch.device(job["device"]), job["bf16"]
    ours, theirs = build_twins(job["preset"])
    library = job["library"]
    model = (ours if library == "difflab" else theirs).to(device)
    del ours, theirs  # the peaks are measured from the level after this
    if job["compile"]:
        compile_network(model, device) if library == "difflab" else model.compile()
    cfg = UNET_PRESETS[job["preset"]]
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out = {k: job[k] for k in ("library", "compile")}
    # sampling first: on a CPU memory freed by a step stays with the process and is reused,
    # so the smaller peak has to be measured first
    out.update(_sampling(library, model, shape, job, device, bf16))
    out.update(_training(library, model, shape, job, device, bf16))
    return out


def _training(library, model, shape, job, device, bf16) -> dict[str, float]:
    b = job["batch_size"]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    k = torch.randint(0, 1000, (b,), generator=g)
    x0, eps, k = x0.to(device), eps.to(device), k.to(device)
    abar = DiscreteSchedule.from_name("linear", 1000).alpha_bar.float().to(device)[k + 1]
    xt = abar.sqrt()[:, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None] * eps
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)

    def step() -> None:
        with _autocast(device, bf16):
            loss = (_call(library, model, xt, k).float() - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base = _reset_peak(device)
    step()  # warm-up (and compilation)
    times = []
    for _ in range(job["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = _peak_bytes(device) - base
    with FlopCounterMode(display=False) as fc:  # eager FLOPs of one image, forward + backward
        with _autocast(device, bf16):
            loss = _call(library, _eager(model), xt[:1], k[:1]).float().square().mean()
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return {"train_ips": b / min(times), "train_ips_median": b / statistics.median(times),
            "train_flops": fc.get_total_flops(), "train_peak": peak}  # fmt: skip


def _eager(model: Any) -> Any:
    """The module's forward without its compiled call (``nn.Module.compile`` wraps only
    ``__call__``): FlopCounterMode counts the eager aten ops."""
    return model.forward


def _sampling(library, model, shape, job, device, bf16) -> dict[str, float]:
    b, nfe = job["sample_batch"], job["nfe"]
    model.eval()
    noise = torch.randn(b, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    run = _difflab_ddim if library == "difflab" else _diffusers_ddim

    def once() -> torch.Tensor:
        with inference_context(device, bf16=bf16):
            return run(model, noise, nfe, device)

    base = _reset_peak(device)
    once()  # warm-up (and compilation)
    times = []
    for _ in range(job["sample_calls"]):
        _sync(device)
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = _peak_bytes(device) - base
    with FlopCounterMode(display=False) as fc, torch.inference_mode(), _autocast(device, bf16):
        _call(library, _eager(model), noise[:1], torch.zeros(1, dtype=torch.long, device=device))
    return {"sample_ips": b / min(times), "sample_flops": nfe * fc.get_total_flops(),
            "sample_peak": peak}  # fmt: skip


def _difflab_ddim(model, noise, nfe, device) -> torch.Tensor:
    schedule = DiscreteSchedule.from_name("linear", 1000)
    den = ModelDenoiser(model, schedule, parameterization="eps")
    return sample(den, schedule, noise.shape, sampler="ddim", steps=nfe, x_init=noise,
                  device=device, threshold="clip")  # fmt: skip


def _diffusers_ddim(model, noise, nfe, device) -> torch.Tensor:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(nfe)
    x = noise
    for k in scheduler.timesteps:
        eps = model(x, k.to(device)).sample
        x = scheduler.step(eps, k, x).prev_sample
    return x


# ------------------------------------------------------------------------------ the report
def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def report(results: list[dict], peak: float, args: argparse.Namespace) -> str:
    lines = [
        "| library | mode | train img/s | train % of peak | train peak MiB "
        f"| sample img/s (DDIM, {args.nfe} NFE) | sample % of peak | sample peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['library']} | {'compiled' if r['compile'] else 'eager'} "
            f"| {r['train_ips']:.2f} | {100 * r['train_ips'] * r['train_flops'] / peak:.1f} "
            f"| {_fmt_mb(r['train_peak'])} | {r['sample_ips']:.2f} "
            f"| {100 * r['sample_ips'] * r['sample_flops'] / peak:.1f} "
            f"| {_fmt_mb(r['sample_peak'])} |"
        )
    ratios = []
    for mode in sorted({r["compile"] for r in results}):
        by = {r["library"]: r for r in results if r["compile"] == mode}
        if set(by) == set(LIBRARIES):
            name = "compiled" if mode else "eager"
            tr = by["difflab"]["train_ips"] / by["diffusers"]["train_ips"]
            sa = by["difflab"]["sample_ips"] / by["diffusers"]["sample_ips"]
            ratios.append(f"{name}: difflab / diffusers = {tr:.2f}x training, {sa:.2f}x sampling")
    return "\n".join(lines) + "\n\n" + "; ".join(ratios) + "."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10", help="difflab U-Net preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--nfe", type=int, default=10, help="DDIM steps (network evaluations)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--sample-calls", type=int, default=2, help="timed sampling calls")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--matmul-size", type=int, default=0, help="default 2048 CPU, 8192 GPU")
    parser.add_argument("--append", metavar="PATH", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    diff, scale = check_same_function(args.preset)
    print(f"same network: largest output difference {diff:.2e} (outputs up to {scale:.2f})")
    if diff > 1e-4 * max(scale, 1.0) or scale == 0:
        sys.exit(f"the twins differ by {diff:.2e}: fix difflab.interop before comparing speed")
    n_params = sum(p.numel() for p in build_twins(args.preset)[0].parameters())
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_peak(device, args.bf16, size)
    print(f"{n_params / 1e6:.1f}M parameters; matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)

    jobs = [
        {**vars(args), "library": lib, "compile": comp}
        for comp in ((False,) if args.no_compile else (False, True))
        for lib in LIBRARIES
    ]
    best: dict[tuple, dict] = {}
    ctx = mp.get_context("spawn")
    for _ in range(args.repeats):
        for job in jobs:
            with ctx.Pool(1) as pool:
                r = pool.apply(measure, (job,))
            print(f"  {r['library']} {'compiled' if r['compile'] else 'eager'}: "
                  f"train {r['train_ips']:.2f} img/s, sample {r['sample_ips']:.2f} img/s",
                  flush=True)  # fmt: skip
            key = (r["library"], r["compile"])
            prev = best.get(key)
            best[key] = r if prev is None else _best_of(prev, r)
    table = report(list(best.values()), peak, args)
    print(table)
    if args.append:
        from _record import record

        where = f"{args.threads} CPU threads" if device.type == "cpu" else args.device
        notes = (
            f"{where}; U-Net `{args.preset}` ({n_params / 1e6:.1f}M parameters) and its "
            f"diffusers UNet2DModel twin (largest output difference {diff:.1e}); training batch "
            f"{args.batch_size}, {'bf16 autocast' if args.bf16 else 'float32'}, best of "
            f"{args.steps} steps x {args.repeats} rounds; sampling batch {args.sample_batch}, "
            f"DDIM {args.nfe} NFE; matmul peak {peak / 1e9:.1f} GFLOP/s ({size}x{size})."
        )
        record("Speed against diffusers on the same network", table, path=args.append, notes=notes)


def _best_of(a: dict, b: dict) -> dict:
    """Per measurement, the faster of two rounds (peaks: the smaller)."""
    out = dict(a)
    for key in ("train_ips", "sample_ips"):
        out[key] = max(a[key], b[key])
    for key in ("train_peak", "sample_peak"):
        out[key] = min(a[key], b[key])
    return out


if __name__ == "__main__":
    with contextlib.suppress(RuntimeError):
        mp.set_start_method("spawn")
    main()
