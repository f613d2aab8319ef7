"""The process group, and the collectives every multi-process strategy shares.

Joining the process group that torchrun (or srun, or Ray Train) set up:
torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a distributed
strategy started without them (plain `python -m dtrain.train` with strategy ddp) runs as a
one-process group, which is useful for debugging the same code path.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dtrain.config import ParallelConfig
from dtrain.parallel.base import Strategy
from dtrain.parallel.single import pick_device


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device, requested: str) -> str:
    if requested != "auto":
        if requested == "nccl" and device.type != "cuda":
            raise RuntimeError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
        return requested
    # On CUDA, gloo still serves CPU tensors (object collectives, CPU offload).
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_process_group(cfg: ParallelConfig) -> ProcessGroupInfo:
    """Join (or reuse) the default process group; one device per process."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            # No launcher: a group of one, described the way torchrun would (DeepSpeed reads these too).
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        dist.init_process_group(backend_for(device, cfg.backend), device_id=device if device.type == "cuda" else None)
    return ProcessGroupInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_process_group() -> None:
    """Every rank waits for the others, then tears down: exiting without this aborts
    intermittently (`terminate called without an active exception`) under gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Distributed(Strategy):
    """Rank, device and collectives from the default process group."""

    def __init__(self, cfg: ParallelConfig):
        info = init_process_group(cfg)
        self.rank, self.world_size, self.local_rank, self.device = (
            info.rank, info.world_size, info.local_rank, info.device)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def broadcast_object(self, obj: Any) -> Any:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def checkpoint_group(self) -> Any:
        # An async save runs its collectives from a background thread: on a group of their
        # own they never interleave with the training step's (created once, by every rank).
        if getattr(self, "_checkpoint_group", None) is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    def shutdown(self) -> None:
        destroy_process_group()
