"""Sequence classification: the head's cross-entropy over the classes, one label per example;
evaluated by the loss, accuracy, macro precision / recall / F1, micro F1 and the confusion matrix
(no perplexity: that is a language model's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtrain.data.formats import IGNORE_INDEX
from dtrain.objectives.base import (ExampleScore, Objective, cross_entropy_sum, head_format_mismatch, kl_sum,
                                    logits_and_labels, mean_loss, scored_labels)

if TYPE_CHECKING:
    from dtrain.data.pipeline import PreparedData
    from dtrain.schema import Config

METRICS = ["accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro"]


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Metrics of a confusion matrix (rows: true class, columns: predicted class).
    Macro averages weigh every class alike (a class never predicted has precision 0);
    micro F1 pools all decisions, which for single-label classification is the accuracy."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), torch.zeros_like(actual))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    present = actual > 0  # classes absent from the split do not enter the macro averages
    total = confusion.sum().clamp(min=1)
    accuracy = (true_positive.sum() / total).item()
    return {"accuracy": accuracy, "precision_macro": precision[present].mean().item(),
            "recall_macro": recall[present].mean().item(), "f1_macro": f1[present].mean().item(),
            "f1_micro": accuracy}


class Classification(Objective):
    name = "classification"
    model_task = "classification"
    data_formats = ("classification",)

    def __init__(self, num_labels: int, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.num_labels, self.class_weights, self.label_smoothing = num_labels, class_weights, label_smoothing

    @classmethod
    def from_config(cls, cfg: "Config", data: "PreparedData", frozen: dict[str, nn.Module]) -> "Classification":
        # Class weights (data.balance=class_weights) scale each example's loss; the sum is still
        # normalised by the number of examples, so weights near 1 keep the usual scale.
        weights = torch.tensor(data.class_weights) if data.class_weights is not None else None
        return cls(len(data.label_names), weights, label_smoothing=cfg.train.label_smoothing)

    format_mismatch = classmethod(head_format_mismatch)

    @classmethod
    def check_data(cls, cfg: "Config") -> None:
        super().check_data(cfg)
        if cfg.eval.generation.enabled:
            raise ValueError("eval.generation.enabled scores generated answers: a classifier generates none; "
                             "its eval reports accuracy and F1 (set eval.generation.enabled=false)")

    @classmethod
    def metric_names(cls, cfg: "Config") -> list[str]:
        # No perplexity: exp of a per-example cross-entropy over a few classes is no perplexity of anything.
        return ["loss", *METRICS]

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_labels(model, batch, shift=False)

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return cross_entropy_sum(logits, labels, weight=weight, label_smoothing=self.label_smoothing)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum().item())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_of(*self.predict(model, batch))

    def distillation_loss(self, model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], *,
                          alpha: float, temperature: float) -> torch.Tensor:
        """dtrain.objectives.distillation's loss, over the classes."""
        logits, labels = self.predict(model, batch)
        with torch.no_grad():
            teacher_logits, _ = self.predict(teacher, batch)
        soft = kl_sum(logits, teacher_logits, labels != IGNORE_INDEX, temperature)
        return alpha * soft + (1.0 - alpha) * self.loss_of(logits, labels)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        scored = scored_labels(*self.predict(model, batch))
        labels, n = scored["labels"], self.num_labels
        targets = labels != IGNORE_INDEX
        pairs = labels[targets] * n + scored["predicted"][targets]
        confusion = torch.bincount(pairs.cpu(), minlength=n * n).view(n, n)
        return {"loss": scored["token_loss"].sum(), "targets": targets.sum(), "confusion": confusion}, scored

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"loss": mean_loss(sums), **classification_metrics(sums["confusion"]),
                "confusion_matrix": sums["confusion"].long().tolist()}

    def worst_examples(self, batch: dict[str, torch.Tensor], scored: Any, index: torch.Tensor) -> list[ExampleScore]:
        """Each example's loss, with its whole input, its class and the predicted one."""
        out = []
        labels, token_loss, predicted = scored["labels"], scored["token_loss"], scored["predicted"]
        for row in range(labels.shape[0]):
            if index[row] < 0:
                continue
            inputs = batch["input_ids"][row]
            if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
                inputs = inputs[batch["attention_mask"][row].bool()]
            out.append(ExampleScore(token_loss[row].item(), int(index[row]), inputs.tolist(),
                                    [int(labels[row])], [int(predicted[row])]))
        return out
