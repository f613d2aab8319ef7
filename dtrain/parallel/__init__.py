"""Parallelism strategies behind one small interface.

A strategy owns the process group and the device, wraps the plain model and its optimizer,
and provides the handful of operations the training loop needs: a gradient-sync context
for accumulation, backward, the optimizer step (with clipping and the non-finite guard),
and sharded checkpoints. Sums, broadcasts and barriers across the ranks are its `comm`
(collectives.py); how the ranks are arranged is its `dims` (mesh.py). The loop never branches
on the strategy, and no code outside this package compares its name: it asks the strategy's
capabilities (base.py). Each strategy is one module here and one entry in STRATEGIES:

    single.py     one process, one device (the reference)
    ddp.py        DistributedDataParallel
    fsdp.py       FSDP2 (fully_shard per transformer block, then the root); HSDP, tensor and
                  sequence parallel over parallel.mesh (tensor.py: the plans per architecture;
                  sequence.py: Ulysses)
    deepspeed.py  DeepSpeed ZeRO-1/2/3, with offload

    with build_strategy(cfg) as strategy:   # joins the process group; leaves it on every exit path
        ...
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from dtrain.parallel.base import Strategy
from dtrain.parallel.ddp import DDP
from dtrain.parallel.deepspeed import DeepSpeed
from dtrain.parallel.fsdp import FSDP
from dtrain.parallel.single import SingleDevice

if TYPE_CHECKING:
    from dtrain.schema import Config

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "check_config", "strategy_class"]

# parallel.strategy -> its class (the schema's allowed values; a test keeps the two equal)
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (SingleDevice, DDP, FSDP, DeepSpeed)}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"parallel.strategy={name!r} is not available; one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def check_config(cfg: "Config") -> None:
    """What the configured strategy cannot do with the rest of the config (ValueError): the rules
    every strategy's capabilities imply, then the strategy's own."""
    cls = strategy_class(cfg.parallel.strategy)
    optim = cfg.optim.name
    if optim != "adamw" and cls.shards_optimizer_state:
        unsharded = " or ".join(name for name, other in STRATEGIES.items() if not other.shards_optimizer_state)
        raise ValueError(
            f"optim.name={optim} (bitsandbytes) with parallel.strategy={cls.name} is not supported: its state "
            f"cannot be sharded; use optim.name=adamw with {cls.name}, or {optim} with {unsharded}")
    if not cls.arranges_by_mesh and not cfg.parallel.mesh.is_default:
        meshed = " or ".join(f"parallel.strategy={name}" for name, other in STRATEGIES.items() if other.arranges_by_mesh)
        raise ValueError(f"parallel.mesh (replicate x shard x tensor) with parallel.strategy={cls.name} is not "
                         f"supported; remove parallel.mesh, or use {meshed}")
    cls.check_config(cfg)


@contextlib.contextmanager
def build_strategy(cfg: "Config") -> Iterator[Strategy]:
    """The strategy `cfg` asks for, for the length of the `with` block: its process group (when it
    made one) is destroyed on every way out. Leaving normally, or by an exception that every rank
    raises together (`on_every_rank`: a preemption, the NaN guard), the ranks first wait for each
    other; after an error on some ranks only they do not, as the others may never arrive."""
    strategy = strategy_class(cfg.parallel.strategy).from_config(cfg)
    try:
        yield strategy
    except BaseException as exc:
        strategy.close(clean=getattr(exc, "on_every_rank", False))
        raise
    strategy.close(clean=True)
