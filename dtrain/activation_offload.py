"""Activation offloading: what the decoder saves for backward is kept in host memory.

With activation checkpointing a layer's saved activations are its input alone, 2 bytes x hidden
per token and layer in bf16: 1 GiB for an 8B Llama at 2 x 2048 tokens, which offloading takes off
the GPU (torchtune's `enable_activation_offloading`). Without checkpointing every saved tensor of
the decoder goes (much more copying, and the GPU still holds the ones in flight).

`enable(model)` registers hooks on the model's decoder (not on its LM head: the loss's tensors are
few and needed at once) that put `saved_tensors_hooks` around each forward pass:

  pack    a saved tensor of the compute device of at least MIN_BYTES, not a parameter, is copied
          to host memory: on CUDA into pinned memory on a side stream, so that the copy overlaps
          the next layers' compute (record_stream keeps the GPU memory from reuse until the copy
          is done, and autograd then drops it);
  unpack  in backward, the copy is brought back to the device (on CUDA after the side stream's
          copy, non-blocking from pinned memory).

On a CPU device host memory is device memory: the tensors are copied all the same, which costs
time and saves nothing, but runs the same code (the tests use it to show that the gradients do
not change). Evaluation and generation run without autograd and save nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

MIN_BYTES = 64 * 1024  # smaller tensors (per-token statistics, RoPE tables) are not worth a copy


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that keep saved tensors of `device` in host memory (see the module)."""

    def __init__(self, device: torch.device, stream: Any = None):
        self.device, self.stream = device, stream
        self.offloaded_bytes = 0  # (for the tests and the estimator's check)
        # A tensor saved by several operations (a norm's input: by pow and by mul) is copied once:
        # id -> (a weak reference to the tensor, its copy); the reference tells a live tensor from
        # a new one that took a freed tensor's id.
        self.copies: dict[int, tuple[weakref.ref, tuple[torch.device, torch.Tensor]]] = {}
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device != self.device or nbytes < MIN_BYTES or isinstance(tensor, nn.Parameter):
            return tensor
        seen = self.copies.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            return seen[1]
        self.offloaded_bytes += nbytes
        if self.stream is None:  # CPU
            packed = (tensor.device, tensor.clone())
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # the allocator keeps its memory until the copy has run
            packed = (tensor.device, host)
        self.copies[id(tensor)] = (weakref.ref(tensor), packed)
        return packed

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if self.stream is None:
            return host
        torch.cuda.current_stream(device).wait_stream(self.stream)
        return host.to(device, non_blocking=True)


def enable(model: nn.Module, device: torch.device) -> None:
    """Offload the saved activations of `model`'s decoder (the module its get_decoder() returns,
    or the model itself) during every forward pass with autograd."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder = decoder if isinstance(decoder, nn.Module) else model
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    active: list[OffloadHooks] = []

    def enter(module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            hooks = OffloadHooks(device, stream)
            hooks.__enter__()
            active.append(hooks)
            decoder.last_offload = hooks

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if active:
            hooks = active.pop()
            hooks.__exit__(None, None, None)
            hooks.copies = {}  # (autograd holds what it needs; a storage freed now may be reused)

    decoder.register_forward_pre_hook(enter)
    decoder.register_forward_hook(leave, always_call=True)  # (also when the forward pass raises)
