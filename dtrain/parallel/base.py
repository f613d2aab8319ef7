"""The interface every strategy implements (see dtrain/parallel/__init__.py).

The defaults are those of a torch module trained by a torch optimizer in one process;
`ddp` and `fsdp` change only what differs (wrapping, gradient sync, the process group), and
`deepspeed` hands the step and the checkpoint to its engine.

What a strategy can do is said by the capabilities at the top of `Strategy`: code outside
dtrain/parallel/ asks those (`strategy.shards_parameters`), never the strategy's name.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from dtrain.parallel.collectives import Collectives
from dtrain.parallel.mesh import TENSOR, ParallelDims

if TYPE_CHECKING:
    from dtrain.schema import Config


class Strategy:
    name: ClassVar[str] = "base"

    # ---- what it can do
    multi_process: ClassVar[bool] = False  # its ranks are processes of one process group
    shards_optimizer_state: ClassVar[bool] = False  # each rank keeps a part of the optimizer state
    supports_qlora: ClassVar[bool] = True  # can train (and checkpoint) a bitsandbytes 4-bit base
    runs_under_ray_train: ClassVar[bool] = False  # joins the process group Ray Train's workers set up
    engine_checkpoint: ClassVar[bool] = False  # checkpoints in an engine's own format (not torch.distributed's)
    arranges_by_mesh: ClassVar[bool] = False  # lays its ranks out as parallel.mesh says (HSDP, tensor parallel)

    comm: Collectives
    dims: ParallelDims  # how the ranks are arranged (the device mesh's named dimensions)
    # Parameters `wrap` left with their rows in another order than the model's (tensor parallel's
    # fused projections), by name -> that order. Checkpoints and full state dicts hold
    # the model's order, so that any layout reads them.
    reordered: dict[str, torch.Tensor]

    def __init__(self, comm: Collectives, dims: ParallelDims):
        self.comm, self.dims = comm, dims
        self.reordered = {}
        comm.set_data_layout(dims.dp_rank(comm.rank), dims.dp_size, dims.is_data_leader(comm.rank), dims.size(TENSOR))

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds a part of every parameter (gathered for compute)."""
        return False

    @property
    def collective_forward(self) -> bool:
        """A forward pass is a collective: every rank must make the same number of them."""
        return self.shards_parameters and self.comm.world_size > 1

    # ---- building and ending

    @classmethod
    def from_config(cls, cfg: "Config") -> "Strategy":
        """The strategy `cfg` asks for, joining (or starting) its process group."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Refuse (ValueError, naming the keys and the fix) what this strategy cannot do with the
        rest of `cfg`; called when the config is loaded, before any work starts."""
        if cfg.parallel.deepspeed_config is not None:
            raise ValueError(f"parallel.deepspeed_config is only used with parallel.strategy=deepspeed "
                             f"(strategy is {cfg.parallel.strategy}); remove it or set parallel.strategy=deepspeed")

    @classmethod
    def memory_layout(cls, cfg: "Config") -> tuple[int, bool]:
        """(ZeRO stage or 0, offload to CPU): which row of `dtrain estimate`'s table `cfg` runs as."""
        return 0, False

    def close(self, clean: bool) -> None:
        """End what this strategy started (its process group). `clean`: every rank got here
        together, so they can wait for each other first."""

    # ---- model and optimizer

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer]) -> tuple[nn.Module, Optimizer]:
        """Move/shard/wrap the plain model, then build its optimizer over the wrapped parameters.

        Returns the model to call in the loop and the torch optimizer whose param_groups
        the LR scheduler drives."""
        raise NotImplementedError

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """A model that only runs forward (a distillation teacher): placed (or sharded) like the
        trained one, in eval mode, without gradients."""
        model.requires_grad_(False)
        return model.to(self.device).eval()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain (possibly peft-wrapped) model inside any wrapper."""
        return model

    @contextlib.contextmanager
    def generating(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module to call `generate` on, ready for as long as the context lasts (when
        `collective_forward`, every rank must make the same number of forward passes: synced_gpus)."""
        yield self.unwrap(model)

    # ---- one optimizer step

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        """Context for one micro-batch's forward and backward; gradients are only reduced
        across ranks when `enabled` (the last micro-batch of an accumulation step)."""
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, model: nn.Module, optimizer: Optimizer, max_norm: float | None,
                       skip: bool = False, l1: float = 0.0) -> tuple[float, bool]:
        """Add the L1 subgradient, clip, step unless the gradient (or, with `skip`, the loss) is
        not finite, zero the gradients. Returns (global gradient norm before clipping, whether
        the update was applied)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if l1:
            # d/dw of l1 * |w|, added once the gradients are reduced: the same on every rank
            # (and for a sharded parameter, on its shard), so exact under every torch strategy.
            for p in params:
                if p.ndim >= 2:
                    p.grad.add_(p.detach().sign(), alpha=l1)
        norm = _clip_grad_norm(params, max_norm)
        applied = not skip and torch.isfinite(torch.tensor(norm)).item()
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    # ---- state

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters that train, by name (sharded ones as DTensors).

        Never through model.state_dict(): serialising a bitsandbytes 4-bit layer on the CPU
        backend re-lays out its weight in place and changes its later outputs (by ~1e-3), so
        a QLoRA run that saved a checkpoint would no longer match one that resumed from it."""
        return {name: p for name, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def full_state_dict(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full CPU tensors on the main rank (collective; other ranks get an empty dict), keyed
        like `unwrap(model).state_dict()`: every parameter and buffer, or with `trainable_only`
        (what an adapter's save needs) only the parameters that train."""
        if trainable_only:
            # full_tensor() all-gathers a sharded parameter: every rank calls it, in the same order.
            full = {name: _full(p.detach()) for name, p in self.trainable_parameters(model).items()}
            full = self._in_file_order(full)
            return {name: t.cpu() for name, t in full.items()} if self.comm.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return self._in_file_order(
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))

    def _in_file_order(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from dtrain.parallel.tensor import file_order

        return {name: file_order(t, self.reordered[name]) if name in self.reordered else t
                for name, t in tensors.items()}

    def _optimizer_in_file_order(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of an optimizer state dict (keyed by parameter name) with every per-row tensor of
        a reordered parameter in the model's order. (Copied: its inner dicts can be the optimizer's
        own state.)"""
        from dtrain.parallel.tensor import file_order

        if not self.reordered:
            return state
        per_param = dict(state["state"])
        for name, order in self.reordered.items():
            if name in per_param:
                per_param[name] = {key: file_order(value, order)
                                   if torch.is_tensor(value) and value.dim() and value.shape[0] == order.numel()
                                   else value for key, value in per_param[name].items()}
        return {**state, "state": per_param}

    def save_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path, async_save: bool = False) -> Any:
        """Write the trainable parameters and the optimizer state under `path`, each rank its
        own shard, in parallel (collective). Frozen weights come from model.path on resume.
        With `async_save`, returns the future of a background write (the state is copied first,
        so training may go on); else None once written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        params = self.trainable_parameters(model)  # first: a strategy may reshard here
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_trainable_only())
        state = {"model": self._in_file_order(params), "optimizer": self._optimizer_in_file_order(optimizer_state)}
        with _single_process_is_meant():
            if async_save:
                return dcp.async_save(state, checkpoint_id=path / "dcp", no_dist=_no_dist(),
                                      process_group=self.checkpoint_group())
            dcp.save(state, checkpoint_id=path / "dcp", no_dist=_no_dist())
        return None

    def checkpoint_group(self) -> Any:
        """Process group for background checkpoint collectives (None: the default, or none)."""
        return None

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint's manifest should record about the strategy that wrote it."""
        return {}

    def prepare_resume(self, path: Path, manifest: dict[str, Any]) -> None:
        """Called before `wrap` when resuming from `path` (torch.distributed checkpoints
        reshard on load: nothing to do)."""

    def load_checkpoint(self, model: nn.Module, optimizer: Optimizer, path: Path) -> None:
        """Load what save_checkpoint wrote, resharding to this run's world size and strategy.
        The parameters are read in place; dcp.load fails on any name the checkpoint lacks."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from dtrain.parallel.tensor import model_order
        from dtrain.safe_load import dcp_load

        params = {name: p.detach() for name, p in self.trainable_parameters(model).items()}
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_trainable_only())
        # Read into tensors in the checkpoint's (the model's) row order, then put the rows back in
        # the order this run holds them in.
        state = {"model": self._in_file_order(params), "optimizer": self._optimizer_in_file_order(optimizer_state)}
        with _single_process_is_meant():
            dcp_load(state, path / "dcp", no_dist=_no_dist())  # (safe_load: a checkpoint runs no code)
        loaded = state["optimizer"]["state"]
        with torch.no_grad():
            for name, order in self.reordered.items():
                _local(params[name]).copy_(_local(model_order(state["model"][name], order, params[name])))
                held = optimizer_state["state"].get(name, {})
                loaded[name] = {key: model_order(value, order, held[key]) if value is not held[key] else value
                                for key, value in loaded.get(name, {}).items()}
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_trainable_only())

    def state_bytes(self, model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
        """Bytes this rank holds for parameters and optimizer state (master copies included)."""
        params = list(model.parameters())
        return {"parameters": sum(_local(p).numel() * p.element_size() for p in params),
                "optimizer": _optimizer_bytes(optimizer, {id(p) for p in params})}



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


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global gradient norm before clipping (and the gradients clipped to `max_norm`). Under
    tensor parallel the gradients live on two device meshes (the blocks' on data x tensor, the
    embeddings' and the head's on the data dimensions alone), which torch's clip cannot stack:
    each mesh's norm is taken first, then the norm of those."""
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if len(by_mesh) <= 1:
        if max_norm is None:
            return _full(torch.nn.utils.get_total_norm([p.grad for p in params])).item()
        return _full(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
    norms = [_full(torch.nn.utils.get_total_norm([p.grad for p in group])).item() for group in by_mesh.values()]
    total = sum(n * n for n in norms) ** 0.5
    if max_norm is not None:
        coefficient = min(1.0, max_norm / (total + 1e-6))  # (torch's clip_grad_norm_ formula)
        for p in params:
            p.grad.mul_(coefficient)
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    """The value of a (possibly DTensor) reduction result."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _no_dist() -> bool:
    """One process without a process group (the single strategy): DCP reads and writes alone."""
    return not torch.distributed.is_initialized()


def _trainable_only() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The optimizer only holds what trains; its state is keyed by the names of those parameters.
    return StateDictOptions(ignore_frozen_params=True)
