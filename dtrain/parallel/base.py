"""The interface every strategy implements (see dtrain/parallel/__init__.py).

The defaults are those of a torch module trained by a torch optimizer in one process;
`ddp` and `fsdp` change only what differs (wrapping, gradient sync, collectives), and
`deepspeed` hands the step and the checkpoint to its engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.optim import Optimizer


class Strategy:
    name = "base"
    rank = 0
    world_size = 1
    local_rank = 0
    device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- model and optimizer

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        """Move/shard/wrap the plain model, then build its optimizer over the wrapped parameters.

        Returns the model to call in the loop and the torch optimizer whose param_groups
        the LR scheduler drives."""
        raise NotImplementedError

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain (possibly peft-wrapped) model inside any wrapper."""
        return model

    # ---- one optimizer step

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        """Context for one micro-batch's forward and backward; gradients are only reduced
        across ranks when `enabled` (the last micro-batch of an accumulation step)."""
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, model: nn.Module, optimizer: Optimizer, max_norm: float | None,
                       skip: bool = False) -> tuple[float, bool]:
        """Clip, step unless the gradient (or, with `skip`, the loss) is not finite, zero the
        gradients. Returns (global gradient norm before clipping, whether the update was applied)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = _full(norm).item()
        applied = not skip and torch.isfinite(torch.tensor(norm)).item()
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    # ---- collectives (no-ops in one process)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    # ---- state

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter and buffer as a full CPU tensor, on the main rank (collective;
        other ranks may get an empty dict). Keys are those of `unwrap(model).state_dict()`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path) -> None:
        """Write the trainable parameters and the optimizer state under `path`, each rank its
        own shard, in parallel (collective). Frozen weights come from model.path on resume."""
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = self._dcp_state(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path / "dcp", no_dist=_no_dist())

    def load_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path) -> None:
        """Load what save_checkpoint wrote, resharding to this run's world size and strategy."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optim_state = self._dcp_state(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=_no_dist())
        # Not strict: the frozen weights are absent by design. Every trainable one is there,
        # since dcp.load fails on a key the checkpoint lacks.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_dcp_options(strict=False))

    def _dcp_state(self, model: nn.Module, optimizer: Optimizer) -> tuple[dict, dict]:
        """Model (trainable parameters only) and optimizer state dicts, keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=_dcp_options())
        # ignore_frozen_params misses a frozen tensor's second name (a tied lm_head): keep
        # exactly the names under which a parameter trains.
        trainable = {n for n, p in self.unwrap(model).named_parameters(remove_duplicate=False) if p.requires_grad}
        return {k: v for k, v in model_state.items() if k in trainable}, optim_state

    def state_bytes(self, model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
        """Bytes this rank holds for parameters and optimizer state (master copies included)."""
        params = list(model.parameters())
        return {"parameters": sum(_local(p).numel() * p.element_size() for p in params),
                "optimizer": _optimizer_bytes(optimizer, {id(p) for p in params})}

    def shutdown(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Helpers shared by the torch strategies


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) tensor stored on this rank."""
    return t.to_local() if hasattr(t, "to_local") else t


def _optimizer_bytes(optimizer: Optimizer, model_param_ids: set[int]) -> int:
    """Optimizer state tensors, plus parameters the optimizer keeps apart from the model
    (the fp32 master partitions of ZeRO)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in model_param_ids:
                total += _local(p).numel() * p.element_size()
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += _local(value).numel() * value.element_size()
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    """The value of a (possibly DTensor) reduction result."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _no_dist() -> bool:
    """One process without a process group (the single strategy): DCP reads and writes alone."""
    return not torch.distributed.is_initialized()


def _dcp_options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what trains is checkpointed: frozen weights (a LoRA base) come from model.path.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)

