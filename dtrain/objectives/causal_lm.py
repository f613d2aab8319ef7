"""Next-token prediction on the trained tokens (completion-only masking is in the labels the
data stage writes: prompt and padding positions are -100)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.lm_head import CrossEntropy, Distillation, Hidden, Scores, head_outputs
from dtrain.objectives.base import (ExampleScore, Objective, cross_entropy_sum, head_format_mismatch, logits_and_labels,
                                    loss_metrics)

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config

INSTRUCTION_FORMATS = ("alpaca", "chat")  # rows with an answer that generation can be scored against


class CausalLM(Objective):
    name = "causal_lm"
    model_task = "causal_lm"
    data_formats = ("text", "alpaca", "chat")
    sums_over_tokens = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "CausalLM":
        return cls(label_smoothing=cfg.train.label_smoothing)

    @classmethod
    def check_data(cls, cfg: "Config") -> None:
        super().check_data(cfg)
        if cfg.eval.generation.enabled and cfg.data.format not in INSTRUCTION_FORMATS:
            raise ValueError("eval.generation.enabled needs instruction data with answers to check "
                             "(data.format=alpaca or chat, model.task=causal_lm)")

    format_mismatch = classmethod(head_format_mismatch)

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        generation = ["exact_match", "contains_answer"] if cfg.eval.generation.enabled else []
        return ["loss", "perplexity", *generation]

    # The loss and the scores come from the LM head through dtrain.lm_head, chunked when the
    # model's head is (model.logits). An objective built on this one that needs the full logits
    # (a z-loss over the normaliser) has them from `predict`, and their loss from `loss_of`.

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_labels(model, batch, shift=True)

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels, label_smoothing=self.label_smoothing)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return head_outputs(model, batch, CrossEntropy(batch["labels"], self.label_smoothing))

    def distillation_loss(self, model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], *,
                          alpha: float, temperature: float) -> torch.Tensor:
        """dtrain.objectives.distillation's loss, over the vocabulary: the student's head computes
        it chunk by chunk with the teacher's logits of the same positions."""
        with torch.no_grad():
            teacher_output = head_outputs(teacher, batch, Hidden())
        return head_outputs(model, batch, Distillation(batch["labels"], teacher_output, alpha, temperature,
                                                       self.label_smoothing))

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        scored = head_outputs(model, batch, Scores(batch["labels"]))
        targets = scored["labels"] != IGNORE_INDEX
        return {"loss": scored["token_loss"].sum(), "targets": targets.sum()}, scored

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        return loss_metrics(sums)

    def worst_examples(self, batch: dict[str, torch.Tensor], scored: Any, index: torch.Tensor) -> list[ExampleScore]:
        """Each example's mean loss over its targets, with its prompt, its answer and the model's
        teacher-forced prediction of it (target k is input token k + 1)."""
        out = []
        labels, token_loss, predicted = scored["labels"], scored["token_loss"], scored["predicted"]
        for row in range(labels.shape[0]):
            targets = labels[row] != IGNORE_INDEX
            if index[row] < 0 or not targets.any():
                continue
            inputs = batch["input_ids"][row]
            if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
                inputs = inputs[batch["attention_mask"][row].bool()]
            inputs = inputs[:int(targets.nonzero()[0]) + 1]
            out.append(ExampleScore(token_loss[row][targets].mean().item(), int(index[row]), inputs.tolist(),
                                    labels[row][targets].tolist(), predicted[row][targets].tolist()))
        return out
