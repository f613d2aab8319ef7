"""Evaluation: what the run's objective reports (loss, and perplexity for language models; for
classification accuracy, precision, recall, F1 and the confusion matrix), for instruction data
greedy generation scored by exact match and by whether the answer is contained, and the examples
the model gets most wrong.

Every rank evaluates its share of the split and the objective's sums are reduced, so the
numbers do not depend on the world size; sharded models (FSDP, ZeRO-3) run the same number of
forward passes on every rank.

With `eval.max_batches` (and for generation, `eval.generation.max_examples`) smaller than the
split, an evaluation scores a seeded random sample of it, not its first rows in file order
(which are often sorted by source, length or label). The sample depends only on the run's seed
and its size, so every evaluation of a run scores the same rows (its eval curve compares like
with like), and a run at another world size with the same global evaluation batch scores the
same rows too. The metrics say what was scored: eval_examples (rows scored, summed over the
ranks), eval_examples_total (rows in the split) and eval_sampled.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from dtrain.attention import uses_varlen_attention
from dtrain.data import IGNORE_INDEX
from dtrain.data.loader import eval_batches, take, to_device
from dtrain.objectives.base import ExampleScore, Objective
from dtrain.parallel.collectives import Collectives
from dtrain.precision import autocast

if TYPE_CHECKING:
    from dtrain.schema import Config

# Offsets the evaluation sample's random stream from the training order's (seeded with
# seed * 100_003 + epoch by dtrain.data.loader.BatchIterator), so the two never coincide.
SAMPLE_STREAM = 7_919


def sample_order(num_rows: int, seed: int) -> list[int]:
    """A permutation of a split's rows that depends on the run's seed alone (not on the rank,
    the world size or the step): every sample an evaluation takes is a prefix of it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + SAMPLE_STREAM)
    return torch.randperm(num_rows, generator=generator).tolist()


def sample_rows(num_rows: int, size: int | None, seed: int) -> list[int] | None:
    """`size` rows of a split drawn without replacement (seeded), in file order; None (every
    row) when `size` is None or covers the split."""
    if size is None or size >= num_rows:
        return None
    return sorted(sample_order(num_rows, seed)[:size])


def eval_batch_size(cfg: "Config") -> int:
    return cfg.eval.batch_size or cfg.train.micro_batch_size


def loss_sample_size(cfg: "Config", world_size: int) -> int | None:
    """How many rows an evaluation scores for the loss: eval.max_batches batches on each rank
    (None: the whole split). The size is that of the global evaluation batch times max_batches,
    so the same batch size and world size always give the same sample."""
    if cfg.eval.max_batches is None:
        return None
    return cfg.eval.max_batches * eval_batch_size(cfg) * world_size


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence, objective: Objective, cfg: "Config", comm: Collectives,
             tokenizer: Any, *, generator: nn.Module | None = None, collective_forward: bool = False,
             generating: Callable[[nn.Module], ContextManager[nn.Module]] | None = None,
             worst: int = 0) -> tuple[dict[str, Any], list[ExampleScore]]:
    """eval_* metrics over `examples` (or the seeded sample of them that eval.max_batches allows),
    and (on the main rank) the `worst` highest-loss examples.

    `generator`: the plain model inside any wrapper, for generation (default: `model`);
    `collective_forward`: the model is sharded, so every rank must generate as long as the longest;
    `generating`: the strategy's, which readies the module that generates (default: `generator` as it is)."""
    generator = generator if generator is not None else model
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    candidates: list[ExampleScore] = []
    sample = sample_rows(len(examples), loss_sample_size(cfg, comm.data_size), cfg.seed)
    batches = eval_batches(examples, eval_batch_size(cfg), tokenizer.pad_token_id,
                           rank=comm.data_rank, world_size=comm.data_size, max_batches=cfg.eval.max_batches,
                           flatten_packed=uses_varlen_attention(generator), ids=sample)
    scored_rows = 0  # rows this rank scored (a rank's repeated filler batch has index -1: not counted)
    for batch in batches:
        index = batch["index"]  # (left in the batch: a preference objective counts only the real pairs)
        if comm.data_leader:  # (of the ranks that share a batch, one counts its rows)
            scored_rows += int((index >= 0).sum())
        batch = to_device(batch, comm.device)
        with autocast(cfg.train.precision, comm.device):
            batch_sums, scored = objective.eval_sums(model, comm.split_batch(batch))
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0) + value.detach().double().cpu()
        if worst:
            scored = comm.gather_tokens(scored, batch["input_ids"].shape[1])
            candidates += objective.worst_examples(batch, scored, index)
            candidates = sorted(candidates, key=lambda ex: -ex.loss)[:worst]
    totals = {key: comm.data_sum(value.to(comm.device)).cpu() for key, value in sums.items()}
    scored_total = comm.all_reduce_sum(torch.tensor(scored_rows, dtype=torch.long, device=comm.device))
    metrics = {f"eval_{name}": value for name, value in objective.eval_metrics(totals).items()}
    metrics.update({"eval_examples": int(scored_total.item()), "eval_examples_total": len(examples),
                    "eval_sampled": sample is not None})
    if cfg.eval.generation.enabled:
        generation_ids = sample_rows(len(examples), cfg.eval.generation.max_examples, cfg.seed)
        with generating(model) if generating is not None else contextlib.nullcontext(generator) as module:
            metrics.update(generation_scores(module, examples, cfg, comm, tokenizer, synced=collective_forward,
                                             ids=generation_ids))
        metrics["eval_generation_examples"] = min(cfg.eval.generation.max_examples, len(examples))
    model.train()
    if worst:
        # (ranks that share a batch found the same examples: one of them speaks for it)
        mine = candidates if comm.data_leader else []
        gathered = [ex for part in comm.all_gather_object(mine) for ex in part]
        candidates = sorted(gathered, key=lambda ex: -ex.loss)[:worst] if comm.is_main else []
    return metrics, candidates


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
def generation_scores(generator: nn.Module, examples: Sequence, cfg: "Config", comm: Collectives, tokenizer: Any,
                      *, synced: bool = False, ids: Sequence[int] | None = None) -> dict[str, float]:
    """Greedy answers to the prompts of rows `ids` (default: the first `eval.generation.max_examples`):
    the fraction equal to the reference (exact_match) and containing it (contains_answer), after
    whitespace and case normalisation. `synced`: the model's forward is a collective (sharded parameters)."""
    gcfg = cfg.eval.generation
    rows = list(ids) if ids is not None else list(range(min(gcfg.max_examples, len(examples))))
    count = len(rows)
    mine = rows[comm.data_rank::comm.data_size]
    # A sharded model's forward is a collective: every rank makes the same number of calls.
    calls = math.ceil(math.ceil(count / comm.data_size) / gcfg.batch_size)
    scores = torch.zeros(3, dtype=torch.float64)  # exact, contains, counted
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for call in range(calls):
        call_ids = mine[call * gcfg.batch_size:(call + 1) * gcfg.batch_size]
        # A rank with nothing left repeats the first row, uncounted.
        prompts = take(examples, call_ids or rows[:1])
        pairs = [prompt_and_answer(list(ex.input_ids), list(ex.labels)) for ex in prompts]
        width = max(len(prompt) for prompt, _ in pairs)
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for r, (prompt, _) in enumerate(pairs):  # left-padded: every prompt ends where generation starts
            input_ids[r, width - len(prompt):] = torch.tensor(prompt)
            attention[r, width - len(prompt):] = 1
        with autocast(cfg.train.precision, comm.device), torch.compiler.set_stance("force_eager"):  # (see rollout.generate)
            output = generator.generate(input_ids=input_ids.to(comm.device), attention_mask=attention.to(comm.device),
                                        max_new_tokens=gcfg.max_new_tokens, do_sample=False, pad_token_id=pad,
                                        eos_token_id=eos, synced_gpus=synced)
        if not call_ids:
            continue
        for (_, answer), generated in zip(pairs, output[:, width:].tolist()):
            reference = _normalise(tokenizer.decode([t for t in answer if t != eos], skip_special_tokens=True))
            said = _normalise(tokenizer.decode(generated, skip_special_tokens=True))
            scores += torch.tensor([float(said == reference), float(reference in said), 1.0], dtype=torch.float64)
    scores = comm.data_sum(scores.to(comm.device)).cpu()
    counted = scores[2].clamp(min=1)
    return {"eval_exact_match": (scores[0] / counted).item(), "eval_contains_answer": (scores[1] / counted).item()}


def describe(example: ExampleScore, tokenizer: Any, label_names: list[str] | None) -> dict[str, Any]:
    """A worst example in words: the input, the expected output and what the model predicted
    (teacher-forced: its most likely token at each trained position)."""
    if label_names:
        expected, predicted = label_names[example.target_ids[0]], label_names[example.predicted_ids[0]]
    else:
        expected = tokenizer.decode(example.target_ids)
        predicted = tokenizer.decode(example.predicted_ids)
    return {"index": example.index, "loss": round(example.loss, 4), "input": tokenizer.decode(example.prompt_ids),
            "expected": expected, "predicted": predicted}
