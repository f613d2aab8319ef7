"""The process group every multi-process strategy joins, and leaves again.

Joining the process group that torchrun (or srun, or Ray Train) set up:
torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a distributed
strategy started without them (plain `python -m dtrain.train` with strategy ddp) runs as a
one-process group, which is useful for debugging the same code path.

Whoever creates the default group destroys it: a strategy that found one already there (Ray
Train's workers, a test harness running several trainings in one job) leaves it as it was.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from dtrain.parallel.base import Strategy
from dtrain.parallel.collectives import GroupCollectives
from dtrain.parallel.mesh import ParallelDims
from dtrain.parallel.single import pick_device
from dtrain.schema import ConfigError

if TYPE_CHECKING:
    from dtrain.schema import ParallelConfig

_described_here: dict[str, str] = {}  # the launcher variables this process set itself (a group of one)


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


def init_process_group(cfg: "ParallelConfig") -> tuple[GroupCollectives, bool]:
    """Join (or reuse) the default process group, one device per process. Returns the
    collectives and whether this call created the group (and so must destroy it)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        ours = _described_here and all(os.environ.get(k) == v for k, v in _described_here.items())
        if "WORLD_SIZE" not in os.environ or ours:
            # No launcher: a group of one, described the way torchrun would (DeepSpeed reads these
            # too), on a port of its own each time (a group made here before may still hold its port).
            _described_here.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=str(_free_port()))
            os.environ.update(_described_here)
        dist.init_process_group(backend_for(device, cfg.backend), device_id=device if device.type == "cuda" else None)
    comm = GroupCollectives(device, dist.get_rank(), dist.get_world_size(), local_rank)
    return comm, created


def destroy_process_group(clean: bool = True) -> None:
    """Tear the default group down. With `clean` (every rank is here), wait for the others first:
    exiting without that aborts intermittently (`terminate called without an active exception`)
    under gloo. After an error on some ranks only, a barrier would wait forever: no barrier."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


class Distributed(Strategy):
    """A strategy whose ranks are the processes of the default process group."""

    multi_process = True

    def __init__(self, cfg: "ParallelConfig", dims: Callable[[int], ParallelDims]):
        comm, self._owns_group = init_process_group(cfg)
        try:
            layout = dims(comm.world_size)
        except ValueError as exc:  # the configured mesh does not fit this world: leave the group first
            self.close(clean=True)
            raise ConfigError(str(exc)) from None
        super().__init__(comm, layout)
        self._checkpoint_group: Any = None

    def close(self, clean: bool) -> None:
        if self._owns_group:
            destroy_process_group(clean)

    def checkpoint_group(self) -> Any:
        # An async save runs its collectives from a background thread: on a group of their
        # own they never interleave with the training step's (created once, by every rank).
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group
