"""Evaluation: loss and perplexity; for classification accuracy, precision, recall, F1 and the
confusion matrix; for instruction data, greedy generation scored by exact match and by
whether the answer is contained; and the examples the model gets most wrong.

Every rank evaluates its share of the split and the sums are reduced, so the numbers do not
depend on the world size; sharded models (FSDP, ZeRO-3) run the same number of forward
passes on every rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import Config
from dtrain.data import IGNORE_INDEX
from dtrain.data.loader import eval_batches, take
from dtrain.loss import autocast, logits_and_labels, to_device, uses_varlen_attention
from dtrain.parallel import Strategy


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


@dataclass
class WorstExample:
    loss: float
    index: int
    prompt_ids: list[int]  # the input before the first trained token (the whole input for classification)
    target_ids: list[int]
    predicted_ids: list[int]


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence, cfg: Config, strategy: Strategy, tokenizer: Any, *,
             num_labels: int | None = None, worst: int = 0, generation: bool = False
             ) -> tuple[dict[str, float], list[WorstExample]]:
    """eval_* metrics over `examples`, and (on the main rank) the `worst` highest-loss examples."""
    model.eval()
    task = cfg.model.task
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, targets, correct
    confusion = torch.zeros((num_labels or 0, num_labels or 0), dtype=torch.float64)
    candidates: list[WorstExample] = []
    batches = eval_batches(examples, cfg.eval.batch_size or cfg.train.micro_batch_size, tokenizer.pad_token_id,
                           rank=strategy.rank, world_size=strategy.world_size, max_batches=cfg.eval.max_batches,
                           flatten_packed=uses_varlen_attention(strategy.unwrap(model)))
    for batch in batches:
        index = batch.pop("index")
        batch = to_device(batch, strategy.device)
        with autocast(cfg.train.precision, strategy.device):
            logits, labels = logits_and_labels(model, batch, task)
        targets = labels != IGNORE_INDEX
        token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        predicted = logits.argmax(-1)
        totals += torch.tensor([token_loss.sum().item(), targets.sum().item(),
                                ((predicted == labels) & targets).sum().item()], dtype=torch.float64)
        if task == "classification" and num_labels:
            kept = targets.cpu()
            pairs = labels.cpu()[kept] * num_labels + predicted.cpu()[kept]
            confusion += torch.bincount(pairs, minlength=num_labels**2).view(num_labels, num_labels)
        if worst:
            candidates += _per_example(batch, token_loss, predicted, labels, index, task)
            candidates = sorted(candidates, key=lambda ex: -ex.loss)[:worst]
    totals = strategy.all_reduce_sum(totals.to(strategy.device)).cpu()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    metrics = {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf}
    if task == "classification" and num_labels:
        confusion = strategy.all_reduce_sum(confusion.to(strategy.device)).cpu()
        metrics.update({f"eval_{k}": v for k, v in classification_metrics(confusion).items()})
        metrics["eval_confusion_matrix"] = confusion.long().tolist()
    if generation:
        metrics.update(generation_scores(model, examples, cfg, strategy, tokenizer))
    model.train()
    if worst:
        gathered = [ex for part in strategy.all_gather_object(candidates) for ex in part]
        candidates = sorted(gathered, key=lambda ex: -ex.loss)[:worst] if strategy.is_main else []
    return metrics, candidates


def _per_example(batch: dict[str, torch.Tensor], token_loss: torch.Tensor, predicted: torch.Tensor,
                 labels: torch.Tensor, index: torch.Tensor, task: str) -> list[WorstExample]:
    """Each example's mean loss over its targets, with what it was asked and what the model said."""
    out = []
    for row in range(labels.shape[0]):
        if index[row] < 0:
            continue
        if task == "classification":
            targets = torch.tensor([True])
            row_loss, target, guess = token_loss[row:row + 1], labels[row:row + 1], predicted[row:row + 1]
        else:
            targets = labels[row] != IGNORE_INDEX
            row_loss, target, guess = token_loss[row][targets], labels[row][targets], predicted[row][targets]
        if not targets.any():
            continue
        inputs = batch["input_ids"][row]
        if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
            inputs = inputs[batch["attention_mask"][row].bool()]
        if task != "classification":  # labels are shifted by one: target k is input token k + 1
            inputs = inputs[:int(targets.nonzero()[0]) + 1]
        out.append(WorstExample(row_loss.mean().item(), int(index[row]), inputs.tolist(), target.tolist(),
                                guess.tolist()))
    return out


# --------------------------------------------------------------------------------------
# Generative evaluation


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The prompt (tokens before the first trained one) and the reference answer (the first
    trained span) of an encoded instruction example."""
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return input_ids[:first], input_ids[first:end]


@torch.no_grad()
def generation_scores(model: nn.Module, examples: Sequence, cfg: Config, strategy: Strategy,
                      tokenizer: Any) -> dict[str, float]:
    """Greedy answers to the first `eval.generation.max_examples` prompts: the fraction equal to
    the reference (exact_match) and containing it (contains_answer), after whitespace and
    case normalisation."""
    gcfg = cfg.eval.generation
    count = min(gcfg.max_examples, len(examples))
    mine = list(range(strategy.rank, count, strategy.world_size))
    # A sharded model's forward is a collective: every rank makes the same number of calls.
    calls = math.ceil(math.ceil(count / strategy.world_size) / gcfg.batch_size)
    generator = strategy.unwrap(model)
    sharded = strategy.name in ("fsdp", "deepspeed") and strategy.world_size > 1
    scores = torch.zeros(3, dtype=torch.float64)  # exact, contains, counted
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for call in range(calls):
        ids = mine[call * gcfg.batch_size:(call + 1) * gcfg.batch_size]
        rows = take(examples, ids or [0])  # a rank with nothing left repeats example 0, uncounted
        pairs = [prompt_and_answer(list(ex.input_ids), list(ex.labels)) for ex in rows]
        width = max(len(prompt) for prompt, _ in pairs)
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for r, (prompt, _) in enumerate(pairs):  # left-padded: every prompt ends where generation starts
            input_ids[r, width - len(prompt):] = torch.tensor(prompt)
            attention[r, width - len(prompt):] = 1
        with autocast(cfg.train.precision, strategy.device):
            output = generator.generate(input_ids=input_ids.to(strategy.device), attention_mask=attention.to(strategy.device),
                                        max_new_tokens=gcfg.max_new_tokens, do_sample=False, pad_token_id=pad,
                                        eos_token_id=eos, synced_gpus=sharded)
        if not ids:
            continue
        for (_, answer), generated in zip(pairs, output[:, width:].tolist()):
            reference = _normalise(tokenizer.decode([t for t in answer if t != eos], skip_special_tokens=True))
            said = _normalise(tokenizer.decode(generated, skip_special_tokens=True))
            scores += torch.tensor([float(said == reference), float(reference in said), 1.0], dtype=torch.float64)
    scores = strategy.all_reduce_sum(scores.to(strategy.device)).cpu()
    counted = scores[2].clamp(min=1)
    return {"eval_exact_match": (scores[0] / counted).item(), "eval_contains_answer": (scores[1] / counted).item()}


def describe(example: WorstExample, tokenizer: Any, label_names: list[str] | None) -> dict[str, Any]:
    """A worst example in words: the input, the expected output and what the model predicted
    (teacher-forced: its most likely token at each trained position)."""
    if label_names:
        expected, predicted = label_names[example.target_ids[0]], label_names[example.predicted_ids[0]]
    else:
        expected = tokenizer.decode(example.target_ids)
        predicted = tokenizer.decode(example.predicted_ids)
    return {"index": example.index, "loss": round(example.loss, 4), "input": tokenizer.decode(example.prompt_ids),
            "expected": expected, "predicted": predicted}
