"""Running the cohort pipeline on several processes (``torchrun``): one process per GPU, on one or more nodes.

Under ``torchrun`` the environment holds RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` joins the process
group (NCCL on CUDA, gloo on the CPU). Per-case work is sharded over the ranks (`shard`; each rank writes
its own cases' files, then all meet at a `barrier`), work done once (classifier training) runs on rank 0
while the others wait, and the U-Net trains with DistributedDataParallel (see `clisc.cohort.unet`).
Without ``torchrun`` every function here is the single-process no-op.
"""
from __future__ import annotations

import datetime
import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Rank 0 trains the classifier while the others wait at a barrier: allow hours, not the default 10-30 min.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun``; the device this process uses.

    On CUDA each process takes GPU ``LOCAL_RANK`` (the backend is NCCL); on the CPU the backend is gloo.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one, starting at ``rank``."""
    return list(items[rank()::world_size()])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over all ranks (``value`` itself in a single process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (gradients averaged over them)."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
