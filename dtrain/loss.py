"""The loss of one micro-batch, and the small batch helpers the loop and evaluation share."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.attention import NAME as SDPA_VARLEN, varlen_kwargs
from dtrain.data import IGNORE_INDEX
from dtrain.distill import kl_sum

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def logits_and_labels(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and the labels they predict (shifted by one token for causal LM)."""
    # Packed batches add position_ids (restarting per example) and a block-diagonal mask, or
    # (flattened, for flash-attention) no mask. No KV cache: nothing is generated here.
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "attention_mask" not in batch and "position_ids" in batch and batch["input_ids"].shape[0] == 1:
        # Flattened: the example boundaries once per forward, in the keyword arguments that
        # flash-attention and sdpa_varlen take (each layer would otherwise derive them again).
        inputs.update(varlen_kwargs(batch["position_ids"]))
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    if task == "causal_lm":
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def loss_and_counts(model: nn.Module, batch: dict[str, torch.Tensor], task: str,
                    class_weights: torch.Tensor | None = None, *, label_smoothing: float = 0.0,
                    teacher: nn.Module | None = None, distill: Any = None) -> tuple[torch.Tensor, int, int]:
    """(summed loss, number of loss targets, number of correct predictions) for one micro-batch.

    The loss is a *sum* so that the caller can normalise by the number of targets in the
    whole optimizer step: k micro-batches of any lengths then give exactly the gradient
    of one batch k times larger. With a teacher, the sum mixes in the distillation term.
    """
    logits, labels = logits_and_labels(model, batch, task)
    targets = labels != IGNORE_INDEX
    # Class weights (data.balance=class_weights) scale each example's loss; the sum is
    # still normalised by the number of examples, so weights near 1 keep the usual scale.
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum", weight=class_weights, label_smoothing=label_smoothing)
    if teacher is not None:
        with torch.no_grad():
            teacher_logits, _ = logits_and_labels(teacher, batch, task)
        soft = kl_sum(logits, teacher_logits, targets, distill.temperature)
        loss = distill.alpha * soft + (1.0 - distill.alpha) * loss
    correct = ((logits.argmax(-1) == labels) & targets).sum().item()
    return loss, int(targets.sum().item()), int(correct)


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Non-padding tokens of a batch (packed batches carry a 4-D mask, so count from the ids)."""
    mask = batch.get("attention_mask")
    if mask is None:  # flattened packing: one row, no padding at all
        return batch["input_ids"].numel()
    if mask.dim() == 2:
        return int(mask.sum().item())
    return int((batch["input_ids"] != pad_id).sum().item())


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum().item())


def uses_varlen_attention(model: nn.Module) -> bool:
    """Flash-attention 2 and sdpa_varlen take packed examples as one flattened, padding-free
    sequence (`model`: the plain model, not a strategy's wrapper)."""
    return getattr(model.config, "_attn_implementation", None) in ("flash_attention_2", SDPA_VARLEN)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
