"""The interface every strategy implements (see dtrain/parallel/__init__.py)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.optim import Optimizer


class Strategy:
    """Defaults are those of a single process; distributed strategies override what differs."""

    name = "base"
    rank = 0
    world_size = 1
    device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        """Move/shard/wrap the plain model, then build its optimizer over the wrapped parameters."""
        raise NotImplementedError

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain (possibly peft-wrapped) model inside any wrapper."""
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        """Context for a backward pass; gradient all-reduce is skipped when not enabled."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Total gradient norm before clipping (inf when max_norm is None and a grad is inf)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: Optimizer) -> None:
        optimizer.step()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors of the parameters that train: what a checkpoint must restore."""
        return {n: p.detach() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
        if params.keys() != state.keys():
            missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
            raise ValueError(f"checkpoint parameters differ from the model: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != state[name].shape:
                    raise ValueError(f"checkpoint parameter {name} has shape {tuple(state[name].shape)}, model has {tuple(p.shape)}")
                p.copy_(state[name])

    def optimizer_state_dict(self, model: nn.Module, optimizer: Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
