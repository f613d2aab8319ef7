"""Parallelism strategies behind one small interface.

A strategy owns the process group and the device, wraps the plain model and its optimizer,
and provides the handful of operations the training loop needs: backward with or without
gradient sync, clipping, the optimizer step, a sum across ranks, and state dicts for
checkpoints. The loop never branches on the strategy; each strategy is one module here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtrain.parallel.base import Strategy

if TYPE_CHECKING:
    from dtrain.config import ParallelConfig

__all__ = ["Strategy", "build_strategy"]


def build_strategy(cfg: "ParallelConfig") -> Strategy:
    if cfg.strategy == "single":
        from dtrain.parallel.single import SingleDevice

        return SingleDevice(cfg)
    raise ValueError(f"parallel.strategy={cfg.strategy!r} is not available")
