"""FSDP2: parameters, gradients and optimizer state sharded across ranks.

Applied the torchtitan way, as a function on the plain model: `fully_shard` on every
transformer block, then on the root, so that one block's parameters are gathered at a time.
LoRA (peft) is applied before sharding, so only adapter weights train; activation
checkpointing is enabled on the model before sharding too.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.optim import Optimizer

from dtrain.config import FsdpConfig, ParallelConfig
from dtrain.model import transformer_blocks
from dtrain.parallel.distributed import Distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(model: nn.Module, mesh, cfg: FsdpConfig, bf16: bool) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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

    def __init__(self, cfg: ParallelConfig, *, bf16: bool = False):
        super().__init__(cfg)
        self.cfg = cfg.fsdp
        self.bf16 = bf16

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        model = apply_fsdp(model, mesh, self.cfg, self.bf16)  # also moves the shards to the mesh's device
        return model, make_optimizer(model)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh

        model.requires_grad_(False)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        return apply_fsdp(model, mesh, self.cfg, self.bf16).eval()  # sharded like the student

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _reshard(model)
        return super().trainable_parameters(model)

    def state_bytes(self, model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
        _reshard(model)
        return super().state_bytes(model, optimizer)

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
