"""The device mesh, described by its named dimensions.

A strategy says how it arranges the world's ranks as an ordered mapping of dimension names to
sizes, the torchtitan way: DDP is `{"dp_replicate": N}` (whole replicas), FSDP and ZeRO are
`{"dp_shard": N}` (each rank a shard). Both together (HSDP) is `{"dp_replicate": R,
"dp_shard": S}`; tensor parallelism is one more dimension, `"tp"`. The product of the sizes is
the world size; the data-parallel dimensions decide which slice of each global batch a rank
reads. Adding a dimension is a new entry here and a new `apply_*` function, not a new strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DATA_PARALLEL = ("dp_replicate", "dp_shard")  # the dimensions over which the batch is split


@dataclass(frozen=True)
class ParallelDims:
    sizes: tuple[tuple[str, int], ...]  # (name, size) from outermost to innermost

    @classmethod
    def of(cls, **sizes: int) -> "ParallelDims":
        unknown = [name for name in sizes if name not in DATA_PARALLEL]
        if unknown:
            raise ValueError(f"unknown mesh dimensions {unknown}; known: {', '.join(DATA_PARALLEL)}")
        return cls(tuple(sizes.items()))

    @property
    def world_size(self) -> int:
        return math.prod(size for _, size in self.sizes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @property
    def dp_size(self) -> int:
        """Ranks that read different data (every data-parallel dimension multiplied)."""
        return math.prod(size for name, size in self.sizes if name in DATA_PARALLEL)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Global rank `rank`'s position along each dimension (row-major, as init_device_mesh lays it out)."""
        position = {}
        for name, size in reversed(self.sizes):
            position[name], rank = rank % size, rank // size
        return position

    def dp_rank(self, rank: int) -> int:
        """Which slice of each global batch rank `rank` reads: its index along the data-parallel dimensions."""
        position, index = self.coordinates(rank), 0
        for name, size in self.sizes:
            if name in DATA_PARALLEL:
                index = index * size + position[name]
        return index

    def build(self, device_type: str) -> Any:
        """The torch DeviceMesh with these named dimensions (collective: every rank calls it)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, tuple(size for _, size in self.sizes), mesh_dim_names=self.names)
