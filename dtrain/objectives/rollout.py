"""Rollouts: completions the policy samples for prompts, and the batches GRPO trains on.

Generation is the model's own `generate` (KV cache, stop at EOS) on the plain model inside the
strategy's wrapper: under FSDP2 and ZeRO-3 that model's forward still gathers each layer's shards
as it goes (never the whole model on one rank), so every rank makes the same number of forward
calls (`synced_gpus`: a rank whose completions have all ended keeps stepping until the slowest
has). With LoRA, the adapters are used in place: nothing merged, nothing copied.

Sampling is seeded per completion, not per rank: completion j of the prompt in row i of the
split, in epoch e, draws its noise from a generator seeded with (seed, e, i, j), and picks
argmax(logits / temperature + Gumbel noise) (within top-p), which is a sample of
softmax(logits / temperature). So the same run samples the same completions on one process or
on eight, and a resumed run samples what the uninterrupted one would have: the sampling state is
the data position, which the checkpoint holds.

`Rollouts` is the training loop's batch iterator for GRPO: it draws the prompts of a step's
micro-batches, completes and scores them (the objective's `rollout`), and hands the micro-batches
out grpo.num_iterations times (PPO epochs on the same completions, with the log-probabilities of
the policy that sampled them kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from dtrain.data.formats import IGNORE_INDEX

if TYPE_CHECKING:
    from dtrain.data.loader import BatchIterator

SEED_MIX = 1_000_003


def completion_seed(seed: int, epoch: int, row: int, generation: int) -> int:
    """The sampling seed of completion `generation` of split row `row` in `epoch`."""
    return (((seed * SEED_MIX + epoch) * SEED_MIX + row) * 64 + generation) % (2**63 - 1)


class SeededSampling:
    """A logits processor that makes greedy decoding sample: scores / temperature (top-p
    filtered) plus Gumbel noise drawn from each row's own generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))


@torch.no_grad()
def generate(generator: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             pad_id: int, eos_id: int | None, synced: bool, seeds: list[int] | None = None, temperature: float = 1.0,
             top_p: float = 1.0, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completions of left-padded prompts, each `repeats` times (its rows one after the other):
    (ids, mask, ended), the ids right-padded, the mask covering each completion up to and
    including its EOS, `ended` whether it reached one. Sampled with `seeds` (one per completion),
    greedy without.

    With repeats > 1 a prompt is read once: its KV cache, up to its last token, is computed for
    the distinct prompts and copied to each of its completions' rows, which `generate` continues
    from (a group of 8 costs one prompt's prefill, not 8)."""
    from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=eos_id)
    processors = LogitsProcessorList(
        [SeededSampling(seeds, temperature, top_p, input_ids.device)] if seeds is not None else [])
    training = generator.training
    generator.eval()
    # Blocks compiled for training (model.compile) would recompile for every length the KV cache
    # grows through, up to dynamo's limit: generation runs them eagerly.
    try:
        with torch.compiler.set_stance("force_eager"):
            cache = None
            if repeats > 1 and input_ids.shape[1] > 1:
                cache = DynamicCache()
                prefix_mask = attention_mask[:, :-1]
                # (the model `generate` itself calls: a peft model's generate runs its base model, adapters in place)
                model = generator.get_base_model() if hasattr(generator, "get_base_model") else generator
                model(input_ids=input_ids[:, :-1], attention_mask=prefix_mask, cache=cache, use_cache=True,
                      position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0))
                cache.batch_repeat_interleave(repeats)
            input_ids, attention_mask = input_ids.repeat_interleave(repeats, 0), attention_mask.repeat_interleave(repeats, 0)
            output = generator.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                        logits_processor=processors, synced_gpus=synced, cache=cache)
    finally:
        generator.train(training)
    completion = output[:, input_ids.shape[1]:]
    is_eos = completion == eos_id if eos_id is not None else torch.zeros_like(completion, dtype=torch.bool)
    ended = is_eos.any(-1)
    first_eos = torch.where(ended, is_eos.int().argmax(-1), completion.shape[1])
    mask = torch.arange(completion.shape[1], device=completion.device)[None, :] <= first_eos[:, None]
    return torch.where(mask, completion, pad_id), mask.long(), ended


def sequences(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
              completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompts and their completions as one batch: labels on the completion tokens only, and
    positions counted over the real tokens (as generation counted them)."""
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX),
                        torch.where(completion_mask.bool(), completion_ids, IGNORE_INDEX)], dim=1)
    return {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1), "attention_mask": attention_mask,
            "labels": labels, "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}


def flattened(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sequences of a padded batch as one padding-free row for variable-length attention
    (positions restarting at each; a sequence begins with its prompt, whose labels are ignored, so
    no token is scored across a boundary), and `sequence`: which one each token belongs to."""
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(-1)
    return {"input_ids": batch["input_ids"][keep][None], "labels": batch["labels"][keep][None],
            "position_ids": batch["position_ids"][keep][None],
            "sequence": torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)[None]}


def shared_prefix_row(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each prompt once and its completions after it, as one padding-free row for an attention
    that reads shared prefixes (dtrain.attention.shared_prefix_kwargs): per group, the prompt
    but its last token (the prefix), then each completion preceded by that last token (a
    segment), so that, as in a row of its own, the position before each completion token is the
    one that scores it. The same positions (RoPE) and labels as `sequences`, the prompt's keys
    and values computed once for the group. `prefix_segments`: each group's lengths;
    `sequence`: the completion each token belongs to (the prefix: its group's first, unscored).
    prompt_ids: the distinct prompts (left-padded); completions: group after group."""
    group = len(completion_ids) // len(prompt_ids)
    ids, labels, positions, owners, lengths = [], [], [], [], []
    for i, (prompt, keep) in enumerate(zip(prompt_ids, prompt_mask.bool())):
        prompt = prompt[keep]
        prefix = len(prompt) - 1
        ids.append(prompt[:-1])
        labels.append(torch.full_like(prompt[:-1], IGNORE_INDEX))
        positions.append(torch.arange(prefix, device=prompt.device))
        owners.append(torch.full_like(prompt[:-1], i * group))
        segments = []
        for j in range(i * group, (i + 1) * group):
            completion = completion_ids[j][completion_mask[j].bool()]
            ids.append(torch.cat([prompt[-1:], completion]))
            labels.append(torch.cat([prompt.new_full((1,), IGNORE_INDEX), completion]))
            positions.append(torch.arange(prefix, prefix + 1 + len(completion), device=prompt.device))
            owners.append(torch.full_like(ids[-1], j))
            segments.append(1 + len(completion))
        lengths.append([prefix, *segments])
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None], "sequence": torch.cat(owners)[None],
            "prefix_segments": torch.tensor(lengths, dtype=torch.long, device=prompt_ids.device)}


def target_owner(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """For each scored position of the batch (t scores token t + 1), the sequence it scores."""
    if "sequence" in batch:
        return batch["sequence"][:, 1:]
    rows, width = batch["input_ids"].shape
    return torch.arange(rows, device=batch["input_ids"].device)[:, None].expand(rows, width - 1)


class Rollouts:
    """GRPO's training batches (see the module's docstring): an iterator with the data
    position's state, like the BatchIterator of prompts it draws from."""

    def __init__(self, prompts: "BatchIterator", objective: Any, grad_accum_steps: int, num_iterations: int):
        self.prompts, self.objective = prompts, objective
        self.grad_accum_steps, self.num_iterations = grad_accum_steps, num_iterations
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.drawn = 0  # micro-batches handed out
        self.batches_per_epoch = prompts.batches_per_epoch * num_iterations

    @property
    def cycle(self) -> int:
        return self.grad_accum_steps * self.num_iterations

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.drawn % self.cycle == 0:
            step = self.drawn // self.grad_accum_steps + 1  # the optimizer step these completions are made for
            self.buffer = []
            for _ in range(self.grad_accum_steps):
                prompts = next(self.prompts)
                self.buffer.append(self.objective.rollout(prompts, epoch=self.prompts.epoch, step=step,
                                                          steps=self.num_iterations))
        batch = self.buffer[self.drawn % self.grad_accum_steps]
        self.drawn += 1
        return batch

    @property
    def epoch_progress(self) -> float:
        return self.prompts.epoch_progress

    def state_dict(self) -> dict[str, Any]:
        """The prompts' position, and in the middle of a cycle (num_iterations > 1) the completions
        still to be trained on, every rank's (gathered: collective)."""
        state: dict[str, Any] = {"prompts": self.prompts.state_dict(), "drawn": self.drawn}
        if self.drawn % self.cycle:
            buffers = self.objective.comm.all_gather_object([{k: v.cpu() for k, v in b.items()} for b in self.buffer])
            state["buffers"] = buffers
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.drawn = state["drawn"]
        if self.drawn % self.cycle:
            comm = self.objective.comm
            if len(state["buffers"]) != comm.world_size:
                raise ValueError(
                    f"the checkpoint was saved in the middle of grpo.num_iterations={self.num_iterations} updates on "
                    f"one batch of completions, by {len(state['buffers'])} processes; resume it with as many (this "
                    f"run has {comm.world_size}), or from a checkpoint at a multiple of {self.num_iterations} steps")
            self.buffer = [{k: v.to(comm.device) for k, v in b.items()} for b in state["buffers"][comm.rank]]
