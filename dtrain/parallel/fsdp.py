"""FSDP2: parameters, gradients and optimizer state sharded across ranks; with parallel.mesh,
HSDP and tensor parallel too.

Applied the torchtitan way, as functions on the plain model over a named device mesh: tensor
parallel over "tp" first (tensor.py), then `fully_shard` on every transformer block and on the
root over the data-parallel dimensions, so that one block's parameters are gathered at a time.
Over ("dp_replicate", "dp_shard") that is HSDP: sharded within a replica, all-reduced across
replicas. LoRA (peft) is applied before sharding, so only adapter weights train; activation
checkpointing is enabled on the model before sharding too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from dtrain.parallel.distributed import Distributed
from dtrain.parallel.mesh import SEQUENCE, TENSOR, ParallelDims
from dtrain.parallel.sequence import apply_sp
from dtrain.parallel.tensor import apply_tp

if TYPE_CHECKING:
    from dtrain.schema import Config, FsdpConfig, ParallelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(model: nn.Module, mesh: Any, cfg: "FsdpConfig", bf16: bool) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from dtrain.model import transformer_blocks

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=DTYPES[cfg.reduce_dtype] if bf16 else None)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
    return model


class FSDP(Distributed):
    name = "fsdp"
    shards_optimizer_state = True
    runs_under_ray_train = True
    arranges_by_mesh = True

    def __init__(self, cfg: "ParallelConfig", *, bf16: bool = False):
        mesh = cfg.mesh
        super().__init__(cfg, lambda world: ParallelDims.from_config(mesh.replicate, mesh.shard, mesh.tensor, world,
                                                                     sequence=mesh.sequence))
        self.cfg = cfg.fsdp
        self.bf16 = bf16
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.comm.world_size))
        if self.dims.size(TENSOR) > per_node:  # (valid, but every layer then waits on the slower link)
            log.warning("parallel.mesh.tensor=%d is more than the %d processes of a node: its collectives, two per "
                        "sub-layer, cross nodes; keep tensor within a node and put nodes on replicate or shard",
                        self.dims.size(TENSOR), per_node)
        self._mesh: Any = None
        self._sharded_mesh: Any = None

    @classmethod
    def from_config(cls, cfg: "Config") -> "FSDP":
        return cls(cfg.parallel, bf16=cfg.train.precision == "bf16")

    @classmethod
    def memory_layout(cls, cfg: "Config") -> tuple[int, bool]:
        return 0, cfg.parallel.fsdp.cpu_offload

    @property
    def shards_parameters(self) -> bool:
        return True

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        super().check_config(cfg)
        if cfg.parallel.mesh.tensor > 1:
            tensor = f"parallel.mesh.tensor={cfg.parallel.mesh.tensor}"
            if cfg.peft.method in ("qlora", "dora"):
                raise ValueError(f"peft.method={cfg.peft.method} with {tensor} is not supported (tensor parallel "
                                 "splits plain linear layers and LoRA only); use peft.method=lora, or tensor 1")
            if cfg.eval.generation.enabled:
                raise ValueError(f"eval.generation.enabled with {tensor} is not supported (sequence parallel "
                                 "splits the tokens, and generation decodes one at a time); turn it off, or use "
                                 "tensor 1")
            if cfg.model.compile:
                raise ValueError(f"model.compile with {tensor} is not supported yet; set model.compile=false")
        if cfg.parallel.mesh.sequence > 1:
            sequence = f"parallel.mesh.sequence={cfg.parallel.mesh.sequence}"
            if cfg.parallel.mesh.tensor > 1:
                raise ValueError(f"{sequence} with parallel.mesh.tensor={cfg.parallel.mesh.tensor} is not supported "
                                 "yet (both split the attention heads); use one of them")
            if cfg.eval.generation.enabled:
                raise ValueError(f"eval.generation.enabled with {sequence} is not supported (generation decodes "
                                 "whole sequences one token at a time); turn it off, or use sequence 1")
            if cfg.model.compile or cfg.model.attn_implementation == "eager":
                key = "model.compile" if cfg.model.compile else "model.attn_implementation=eager"
                raise ValueError(f"{key} with {sequence} is not supported: sequence parallel runs its own "
                                 "attention (SDPA, all-to-all over the heads); unset it")

    def mesh(self) -> Any:
        """The device mesh (built once, by every rank)."""
        if self._mesh is None:
            self._mesh = self.dims.build(self.device.type)
        return self._mesh

    def _parallelize(self, model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model, sharded; and the parameters tensor parallel holds in another row order."""
        mesh = self.mesh()
        reordered = {}
        if TENSOR in self.dims.names:
            reordered = apply_tp(model, mesh[TENSOR])
        if SEQUENCE in self.dims.names:
            model = apply_sp(model, mesh[SEQUENCE])
            self.comm.split_sequences(self.dims.coordinates(self.comm.rank)[SEQUENCE], mesh[SEQUENCE].get_group(),
                                      self.dims.size(SEQUENCE))
        # Over one data dimension (shard) or two (replicate x shard: HSDP); also moves the shards
        # to the mesh's device.
        return apply_fsdp(model, self._fsdp_mesh(), self.cfg, self.bf16), reordered

    def _fsdp_mesh(self) -> Any:
        """The dimensions FSDP shards and reduces over: the data-parallel ones, and with sequence
        parallel its ranks too (they hold the same weights, each with the gradient of its tokens:
        torchtitan's dp_shard_cp), flattened once."""
        mesh, sharded = self.mesh(), self.dims.data_parallel_names
        if SEQUENCE in self.dims.names:
            if self._sharded_mesh is None:
                self._sharded_mesh = mesh["dp_shard", SEQUENCE]._flatten("dp_shard_sp")
            sharded = tuple("dp_shard_sp" if name == "dp_shard" else name for name in sharded)
        return mesh[sharded]

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        model, self.reordered = self._parallelize(model)
        return model, make_optimizer(model)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return self._parallelize(model)[0].eval()  # sharded like the student

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _reshard(model)
        return super().trainable_parameters(model)

    def state_bytes(self, model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
        _reshard(model)
        return super().state_bytes(model, optimizer)

    @contextlib.contextmanager
    def generating(self, model: nn.Module) -> Iterator[nn.Module]:
        # A peft model's generate calls the model inside it, past the root's FSDP hooks: the root's
        # own parameters (embeddings, final norm, head) are gathered for the whole generation, each
        # block's still only while it runs. (Before the first training step no forward has been
        # through the root yet, which is when FSDP marks it the root: done here, or the first block
        # called would take itself for one. A private call: torch is pinned.)
        model._get_fsdp_state()._lazy_init()
        model.unshard()
        try:
            yield model
        finally:
            _reshard(model)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        # Without sync, FSDP keeps unsharded gradients across micro-batches and
        # reduce-scatters once, on the last one.
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def _reshard(model: nn.Module) -> None:
    """Put every block back in its sharded state. A block that keeps its parameters gathered
    after forward (reshard_after_forward=False) stays gathered after an evaluation, which has
    no backward to reshard it; its parameters would then not be the ones the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
