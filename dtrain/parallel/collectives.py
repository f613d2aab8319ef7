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
        # Which slice of the data this rank reads, of how many: its rank and the world unless
        # ranks share a batch (tensor and sequence parallel), set by the strategy from its mesh
        # (set_data_layout); and how many ranks compute the very same sums from it (tensor parallel).
        self.data_rank, self.data_size, self.data_leader, self.data_copies = rank, world_size, True, 1
        self._sequence: tuple[int, Any, int] | None = None  # (my slice, the group, its size): split_sequences

    def set_data_layout(self, data_rank: int, data_size: int, data_leader: bool, copies: int = 1) -> None:
        self.data_rank, self.data_size, self.data_leader, self.data_copies = data_rank, data_size, data_leader, copies

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- sequence parallel: each rank of a group reads a slice of every sequence of the batch

    def split_sequences(self, index: int, group: Any, degree: int) -> None:
        self._sequence = (index, group, degree)

    def split_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch on the device: a slice of each sequence under sequence
        parallel (dtrain.parallel.sequence), else the batch."""
        if self._sequence is None:
            return batch
        from dtrain.parallel.sequence import split_batch

        index, _, degree = self._sequence
        # (Padding gets id 0: it comes after each row's tokens, which causal attention never shows it.)
        return split_batch(batch, index, degree, pad_id=0)

    def gather_tokens(self, scored: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """Per-position outputs computed from `split_batch`'s part, for the whole batch (`length`:
        its sequence length)."""
        if self._sequence is None:
            return scored
        from dtrain.parallel.sequence import gather_tokens

        _, group, degree = self._sequence
        return gather_tokens(scored, group, degree, length)

    @property
    def distinct_ranks(self) -> int:
        """Ranks that compute distinct sums (all but tensor-parallel copies): the ones a strategy
        averages gradients over."""
        return self.world_size // self.data_copies

    def data_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a value each computed from its data, counting the ranks that
        compute the very same sums (tensor parallel) once: an all-reduce divided by those copies
        (exact in float64 for a power-of-two count)."""
        total = self.all_reduce_sum(value)
        return total / self.data_copies if self.data_copies > 1 else total

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
