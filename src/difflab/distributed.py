"""Data-parallel training across processes and machines, on top of torch.distributed.

``torchrun --nproc_per_node=N -m difflab train ...`` starts N processes; torchrun's rendezvous
(``--nnodes``, ``--rdzv_endpoint``) extends this to several machines. Each process reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment, joins the process group (NCCL
on CUDA, gloo on CPU), trains on its slice of every global batch under
DistributedDataParallel, and only rank 0 writes logs, checkpoints and figures.

The global batch of step k is the same as in a single-process run (same examples, same
order); each rank takes the rows ``rank::world_size``. The diffusion noise of each rank comes
from its own generator, so noise is not repeated across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "init_from_env",
    "all_mean",
    "all_max",
    "barrier",
    "ranks_in_sync",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def all_mean(x: Tensor, info: DistInfo) -> Tensor:
    """The mean of ``x`` over ranks (identity for one process)."""
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world_size


def all_max(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest ``value`` over the ranks, on every rank (one all-reduce)."""
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds bit-identical parameters."""
    if not info.enabled:
        return True
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
