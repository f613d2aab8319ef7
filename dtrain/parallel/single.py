"""One process, one device: the reference every other strategy must match."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from dtrain.parallel.base import Strategy
from dtrain.parallel.collectives import Collectives
from dtrain.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from dtrain.schema import Config, ParallelConfig


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        from dtrain.schema import ConfigError

        raise ConfigError("parallel.device=cuda but torch sees no CUDA device (a CPU build of torch, or no GPU "
                          "visible to this process); use parallel.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class SingleDevice(Strategy):
    name = "single"

    def __init__(self, cfg: "ParallelConfig"):
        super().__init__(Collectives(pick_device(cfg.device)), ParallelDims.of(dp_replicate=1))

    @classmethod
    def from_config(cls, cfg: "Config") -> "SingleDevice":
        return cls(cfg.parallel)

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        model = model.to(self.device)
        return model, make_optimizer(model)
