"""Parallelism strategies behind one small interface.

A strategy owns the process group and the device, wraps the plain model and its optimizer,
and provides the handful of operations the training loop needs: a gradient-sync context
for accumulation, backward, the optimizer step (with clipping and the non-finite guard),
sums across ranks, and sharded checkpoints. The loop never branches on the strategy; each
strategy is one module here:

    single.py     one process, one device (the reference)
    ddp.py        DistributedDataParallel
    fsdp.py       FSDP2 (fully_shard per transformer block, then the root)
    deepspeed.py  DeepSpeed ZeRO-1/2/3, with offload
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtrain.parallel.base import Strategy

if TYPE_CHECKING:
    from dtrain.config import Config

__all__ = ["Strategy", "build_strategy"]


def build_strategy(cfg: "Config") -> Strategy:
    strategy = cfg.parallel.strategy
    if strategy == "single":
        from dtrain.parallel.single import SingleDevice

        return SingleDevice(cfg.parallel)
    if strategy == "ddp":
        from dtrain.parallel.ddp import DDP

        return DDP(cfg.parallel)
    if strategy == "fsdp":
        from dtrain.parallel.fsdp import FSDP

        return FSDP(cfg.parallel, bf16=cfg.train.precision == "bf16")
    if strategy == "deepspeed":
        from dtrain.parallel.deepspeed import DeepSpeed

        return DeepSpeed(cfg)
    raise ValueError(f"parallel.strategy={strategy!r} is not available")
