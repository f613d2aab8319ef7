"""Log-probabilities of whole sequences, and where a reference model's come from.

`sequence_logps` scores a batch of sequences (padded rows, or several packed into one row) with
a model: per sequence, the sum of log p(token) over its trained tokens. `Reference` is the
reference model of the preference objectives (preference.reference): the policy with its
adapters switched off, a frozen copy, or log-probabilities precomputed into the batch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.lm_head import TokenLogprobs, head_outputs

if TYPE_CHECKING:
    from dtrain.schema import Config

REFERENCE = "preference.reference_model"  # the frozen copy's key among the objective's frozen models


def sequence_count(batch: dict[str, torch.Tensor], prefix: str = "") -> int:
    """How many sequences a (preference) batch holds: its rows, or those packed into its one row."""
    if f"{prefix}position_ids" in batch:
        return int((batch[f"{prefix}position_ids"] == 0).sum())
    return batch[f"{prefix}input_ids"].shape[0]


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "",
                   whole: bool = False) -> tuple[torch.Tensor, ...]:
    """Per sequence (in the batch's order): the sum of log p(token) over its trained tokens, and
    how many there are; with `whole`, the same over all its tokens too (prompt included). `prefix`
    selects another set of sequences of the batch (kl_: KTO's)."""
    inputs = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
    labels = inputs["labels"]
    masks = [labels[:, 1:] != IGNORE_INDEX]
    if whole:  # every token but a sequence's first (and padding): the responses' labels are among them
        masks.append(inputs["position_ids"][:, 1:] != 0 if "position_ids" in inputs
                     else inputs["attention_mask"][:, 1:].bool())
        labels = F.pad(torch.where(masks[1], inputs["input_ids"][:, 1:], IGNORE_INDEX), (1, 0), value=IGNORE_INDEX)
    token_logps = head_outputs(model, inputs, TokenLogprobs(labels))  # (B, T - 1), position t scores token t + 1
    out = []
    for mask in masks:
        out += _per_sequence(token_logps * mask, mask, inputs)
    return tuple(out)


def _per_sequence(values: torch.Tensor, mask: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[sum of `values`, count of `mask`] for each sequence of the batch."""
    if "position_ids" not in inputs:  # a sequence per row
        return [values.sum(-1), mask.sum(-1)]
    # Packed into one row: sequence k is the k-th run of positions that starts at 0; a label at
    # position t + 1 belongs to the sequence of that position.
    segment = (torch.cumsum(inputs["position_ids"] == 0, dim=1) - 1)[:, 1:].reshape(-1)
    n = sequence_count(inputs)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, values.reshape(-1))
    counts = torch.zeros(n, dtype=torch.long, device=mask.device).index_add(0, segment, mask.reshape(-1).long())
    return [sums, counts]


def adapter_owner(model: nn.Module) -> Any:
    """The peft model inside a strategy's wrapper (DDP, DeepSpeed: .module; FSDP2: itself)."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError("preference.reference=adapters_disabled needs a model with adapters (peft.method)")
    return model


class Reference:
    """Where a reference's log-probabilities come from (see the module's docstring)."""

    def __init__(self, mode: str, model: nn.Module | None = None):
        self.mode, self.model = mode, model

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor], stored: tuple[str, ...],
              prefix: str = "") -> tuple[torch.Tensor, ...]:
        """The reference's summed log-probabilities of the batch's sequences (those of `prefix`),
        split into len(stored) equal parts (a pair's chosen, then its rejected); precomputed, the
        batch's tensors named `stored`."""
        if self.mode == "precomputed":
            missing = [name for name in stored if name not in batch]
            if missing:
                raise RuntimeError(f"preference.precompute_reference: the batch carries no {missing[0]}")
            return tuple(batch[name] for name in stored)
        with self.scorer(policy) as model:
            return sequence_logps(model, batch, prefix)[0].chunk(len(stored))

    @contextlib.contextmanager
    def scorer(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The model that scores as the reference: the policy with its adapters switched off (and
        in eval mode: the base's own dropout, if any, is no part of the reference), or the copy."""
        if self.mode == "adapters_disabled":
            owner = adapter_owner(policy)
            training = owner.training
            owner.eval()
            try:
                with owner.disable_adapter():
                    yield owner
            finally:
                owner.train(training)
            return
        if self.model is None:
            raise RuntimeError("this objective was built without its reference model (only to evaluate)")
        yield self.model


def reference_mode(cfg: "Config") -> str:
    """preference.reference, with auto resolved: the adapters switched off when there are adapters."""
    mode = cfg.preference.reference
    if mode == "auto":
        return "adapters_disabled" if cfg.peft.method != "none" else "copy"
    return mode
