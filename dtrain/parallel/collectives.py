"""This process's place among the ranks, and the operations across them.

Evaluation, checkpointing and data preparation need only these: who am I (rank, world size,
device, main or not) and sums, maxima, broadcasts, gathers and barriers over the ranks.
`Collectives` is one process alone (every operation returns its input); `GroupCollectives`
runs them over torch.distributed's default process group. Wrapping the model, stepping and
checkpoint I/O stay on the strategy (dtrain/parallel/base.py), which holds one of these.
"""

from __future__ import annotations

from typing import Any

import torch


class Collectives:
    """One process: rank 0 of 1, every collective a no-op."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.device, self.rank, self.world_size, self.local_rank = device, rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def main_first(self, build: Any) -> Any:
        """`build()` on the main rank, then on the others (which then find what it cached)."""
        if self.is_main:
            value = build()
        self.barrier()
        if not self.is_main:
            value = build()
        return value


class GroupCollectives(Collectives):
    """The ranks of torch.distributed's default process group (joined by the strategy)."""

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
