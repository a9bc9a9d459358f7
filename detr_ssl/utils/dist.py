"""Process groups for torchrun (``env://``) and the few collectives the engine needs.

Every function also works in a plain single-process run, where the collectives are identities,
so the engine calls them unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job, and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group described by torchrun's RANK/WORLD_SIZE/LOCAL_RANK.

    Without those variables (``python main.py``) nothing is initialised. Under torchrun each
    process takes the GPU of its local rank (backend NCCL), or stays on the CPU (backend Gloo).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method="env://", rank=rank, world_size=world_size)
    process_device = torch.device("cuda", local_rank) if on_cuda else torch.device(device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=process_device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def reduce_dict(values: dict[str, Tensor], average: bool = True) -> dict[str, Tensor]:
    """Sum (or average) same-keyed scalar tensors over all processes, for logging.

    Keys are sorted so that every process stacks them in the same order.
    """
    world_size = get_world_size()
    if world_size < 2:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k] for k in keys])
    dist.all_reduce(stacked)
    if average:
        stacked /= world_size
    return dict(zip(keys, stacked))


@torch.no_grad()
def max_over_processes(value: int, device: torch.device | str) -> int:
    """The largest ``value`` of all processes; ``device`` must suit the backend (CUDA for NCCL)."""
    if get_world_size() < 2:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_object(obj: Any) -> list[Any]:
    """The picklable ``obj`` of every process, indexed by rank."""
    if get_world_size() < 2:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if _initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of ``main``), so torchrun exits cleanly."""
    if _initialized():
        dist.destroy_process_group()
