"""DistributedDataParallel: a full replica per rank, gradients all-reduced in backward.

During gradient accumulation the all-reduce runs only on the last micro-batch (`no_sync`
on the others), so accumulation costs one reduction per optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from dtrain.parallel.distributed import Distributed
from dtrain.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from dtrain.schema import Config, ParallelConfig

log = logging.getLogger(__name__)


class DDP(Distributed):
    name = "ddp"
    runs_under_ray_train = True

    def __init__(self, cfg: "ParallelConfig"):
        super().__init__(cfg, lambda world: ParallelDims.of(dp_replicate=world))
        if self.comm.world_size == 1:  # valid, and what a forgotten --nproc looks like
            log.warning("parallel.strategy=ddp in one process: there is nothing to replicate across, so this "
                        "trains as parallel.strategy=single would, with DDP's overhead; start more processes "
                        "(dtrain train CONFIG --nproc N) or set parallel.strategy=single")

    @classmethod
    def from_config(cls, cfg: "Config") -> "DDP":
        return cls(cfg.parallel)

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        if not _is_quantized(model):  # bitsandbytes places 4-bit weights on load; .to() would refuse
            model = model.to(self.device)
        ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # LoRA leaves most parameters frozen; DDP only buckets those that train.
            find_unused_parameters=False,
        )
        return ddp, make_optimizer(ddp)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        return contextlib.nullcontext() if enabled else model.no_sync()


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
