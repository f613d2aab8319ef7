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
TENSOR = "tp"  # ranks that hold slices of the same layers and read the same batch
SEQUENCE = "sp"  # ranks that read the same batch, each a slice of its sequences
KNOWN = (*DATA_PARALLEL, SEQUENCE, TENSOR)
# How the config (parallel.mesh.*) names each dimension.
CONFIG_NAMES = {"dp_replicate": "replicate", "dp_shard": "shard", SEQUENCE: "sequence", TENSOR: "tensor"}


def check_heads_divide(config: Any, dimension: str, degree: int, why: str) -> None:
    """ConfigError (naming parallel.mesh.<dimension>, the model's head count and the fix) unless the
    model's attention and KV heads divide by `degree`: tensor and sequence parallel give each rank
    whole heads. `config`: the model's (text) config."""
    from dtrain.schema import ConfigError

    heads = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for key, count in heads.items():
        if count % degree:
            raise ConfigError(f"parallel.mesh.{dimension}={degree} does not divide the model's {key}={count}: "
                              f"{why}; choose a degree that divides {count}")


@dataclass(frozen=True)
class ParallelDims:
    sizes: tuple[tuple[str, int], ...]  # (name, size) from outermost to innermost

    @classmethod
    def of(cls, **sizes: int) -> "ParallelDims":
        unknown = [name for name in sizes if name not in KNOWN]
        if unknown:
            raise ValueError(f"unknown mesh dimensions {unknown}; known: {', '.join(KNOWN)}")
        return cls(tuple(sizes.items()))

    @classmethod
    def from_config(cls, replicate: int, shard: int, tensor: int, world_size: int, sequence: int = 1) -> "ParallelDims":
        """replicate x shard x sequence x tensor over `world_size` processes (shard -1: what is
        left), laid out replicate-major and tensor-minor: a tensor- or sequence-parallel group is
        consecutive ranks (one node), a replica spans nodes only when it must. ValueError when the
        sizes do not fit the world."""
        fixed = replicate * sequence * tensor
        named = f"replicate {replicate} x " + (f"sequence {sequence} x " if sequence > 1 else "") + f"tensor {tensor}"
        if shard == -1:
            if world_size % fixed:
                raise ValueError(f"parallel.mesh: {named} = {fixed} does not divide the {world_size} processes of "
                                 "this run; choose sizes whose product divides it")
            shard = world_size // fixed
        if fixed * shard != world_size:
            raise ValueError(
                f"parallel.mesh: {named.replace(' x ', f' x shard {shard} x ', 1)} = {fixed * shard} processes, "
                f"but this run has {world_size} (nodes x processes per node); change the sizes, or set "
                "parallel.mesh.shard=-1 to shard over whatever is left")
        sizes = {"dp_replicate": replicate} if replicate > 1 else {}
        sizes["dp_shard"] = shard
        if sequence > 1:
            sizes[SEQUENCE] = sequence
        if tensor > 1:
            sizes[TENSOR] = tensor
        return cls.of(**sizes)

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

    def size(self, name: str) -> int:
        return dict(self.sizes).get(name, 1)

    @property
    def data_parallel_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name in DATA_PARALLEL)

    def describe(self) -> str:
        """E.g. `replicate 2 x shard 2 x tensor 2`: the layout printed at start and by the dry run."""
        return " x ".join(f"{CONFIG_NAMES[name]} {size}" for name, size in self.sizes)

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

    def is_data_leader(self, rank: int) -> bool:
        """The first of the ranks that read the same batch (its position along every other dimension is 0)."""
        return all(index == 0 for name, index in self.coordinates(rank).items() if name not in DATA_PARALLEL)

    def build(self, device_type: str) -> Any:
        """The torch DeviceMesh with these named dimensions (collective: every rank calls it)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, tuple(size for _, size in self.sizes), mesh_dim_names=self.names)
