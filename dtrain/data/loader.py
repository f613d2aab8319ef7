"""Batching with an exactly resumable position.

The order of epoch `e` is a permutation seeded by (seed, e), so the iterator's whole state
is two integers: the epoch and the index of the next batch in it. Each rank takes its
slice of every global batch, so the global batch (and the loss curve) does not depend on
the number of ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Iterator, Sequence

import torch

from dtrain.data.formats import IGNORE_INDEX, Example


@dataclass
class Pair:
    """A preference pair: the prompt + chosen and the prompt + rejected sequences (prompt masked),
    and, once precomputed (preference.precompute_reference), the reference's log-probabilities."""

    chosen: Example
    rejected: Example
    reference: dict[str, float] = field(default_factory=dict)


@dataclass
class Judged:
    """An unpaired preference (KTO): the sequence, whether its completion is desirable, and the
    mismatched sequence that estimates the KL term: this prompt with the next row's completion
    (made when the data is prepared: dtrain.data.pipeline)."""

    example: Example
    desirable: int
    mismatched: Example
    reference: dict[str, float] = field(default_factory=dict)


@dataclass
class Prompt:
    """A prompt to complete (data.format=prompt) and which row of its split it is: the rollout
    reads the row's other fields from there and seeds its sampling with it."""

    example: Example
    index: int
    document: str  # the row and where it came from, as JSON ({"where": ..., "row": {...}})


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


def take(data: Any, ids: list[int]) -> list[Example] | list[list[Example]] | list[Pair] | list[Judged]:
    """Rows `ids` of a list of Examples or of a prepared Arrow dataset.

    A packed row (with `seq_lens`) comes back as the list of Examples it holds; a preference row
    as a Pair, an unpaired preference row as Judged, a prompt row as Prompt."""
    if isinstance(data, list):
        return [data[i] for i in ids]
    cols = data[ids]  # one Arrow take for the whole batch
    present = [c for c in REFERENCE_COLUMNS if c in cols]  # (precomputed reference log-probabilities)
    references = ([dict(zip(present, values)) for values in zip(*(cols[c] for c in present))] if present
                  else [{} for _ in ids])
    if "seq_lens" in cols:
        rows = []
        for ids_, labels, lens in zip(cols["input_ids"], cols["labels"], cols["seq_lens"]):
            starts = accumulate(lens[:-1], initial=0)  # offset of each example in the row
            rows.append([Example(ids_[a : a + n], labels[a : a + n]) for a, n in zip(starts, lens)])
        return rows
    if "rejected_ids" in cols:
        return [Pair(Example(c, cl), Example(r, rl), ref) for c, cl, r, rl, ref in
                zip(cols["input_ids"], cols["labels"], cols["rejected_ids"], cols["rejected_labels"], references)]
    if "row" in cols:
        return [Prompt(Example(i, l), index, document)
                for i, l, index, document in zip(cols["input_ids"], cols["labels"], ids, cols["row"])]
    if "kl_ids" in cols:
        return [Judged(Example(i, l), d, Example(k, kl), ref) for i, l, d, k, kl, ref in
                zip(cols["input_ids"], cols["labels"], cols["label"], cols["kl_ids"], cols["kl_labels"], references)]
    labels = cols["labels"] if "labels" in cols else cols["label"]
    return [Example(i, l) for i, l in zip(cols["input_ids"], labels)]


def collate_rows(rows: list, pad_id: int, flatten_packed: bool = False, pack: bool = False) -> dict[str, torch.Tensor]:
    """Padded examples, or packed rows (masked, or flattened for variable-length attention);
    preference pairs and judged completions as their objectives read them (`pack`: each
    micro-batch of them in one packed row)."""
    if rows and isinstance(rows[0], (Pair, Judged)):
        return collate_preference(rows, pad_id, pack=pack, flatten=flatten_packed)
    if rows and isinstance(rows[0], Prompt):
        return collate_prompts(rows, pad_id)
    if rows and isinstance(rows[0], list):  # packed rows
        from dtrain.data.packing import collate_flattened, collate_packed

        return collate_flattened(rows) if flatten_packed else collate_packed(rows, pad_id)
    return collate(rows, pad_id)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention 0 and label -100."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = isinstance(examples[0].labels, list)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        attention_mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(ex.labels)
    if not token_labels:
        labels = torch.tensor([ex.labels for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(rows: list[Prompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (each ends where its completion will begin), with their row indices."""
    width = max(len(row.example.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        n = len(row.example.input_ids)
        input_ids[i, width - n:] = torch.tensor(row.example.input_ids)
        attention_mask[i, width - n:] = 1
    # The rows themselves (JSON, for the reward functions) travel as UTF-8 bytes, zero-padded.
    documents = [row.document.encode() for row in rows]
    row_utf8 = torch.zeros((len(rows), max(len(d) for d in documents)), dtype=torch.uint8)
    for i, document in enumerate(documents):
        row_utf8[i, :len(document)] = torch.frombuffer(bytearray(document), dtype=torch.uint8)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.full_like(input_ids, IGNORE_INDEX), "index": torch.tensor([row.index for row in rows]),
            "row_utf8": row_utf8}


def batch_rows(row_utf8: torch.Tensor) -> list[dict[str, Any]]:
    """The rows a batch of prompts carries (collate_prompts): {"where": file:line, "row": {...}} each."""
    return [json.loads(bytes(r[r != 0].tolist()).decode()) for r in row_utf8.cpu()]


def collate_sequences(examples: list[Example], pad_id: int, *, pack: bool = False,
                      flatten: bool = False) -> dict[str, torch.Tensor]:
    """Sequences padded to the longest, or (`pack`) all of them in one packed row: flattened for
    variable-length attention, or with a block-diagonal mask."""
    from dtrain.data.packing import collate_flattened, collate_packed

    if not pack:
        return collate(examples, pad_id)
    return collate_flattened([examples]) if flatten else collate_packed([examples], pad_id)


def collate_preference(rows: list, pad_id: int, *, pack: bool = False, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Preference pairs as 2B sequences, the B chosen then the B rejected (one forward pass for
    both, in TRL's order); judged completions (KTO) as their B sequences with `desirable`, and the
    B mismatched sequences that estimate the KL term as kl_input_ids, kl_labels, ... Packed
    (data.packing), a micro-batch is one row whose sequences attend only to themselves. Precomputed
    reference log-probabilities come along as ref_* tensors."""
    if isinstance(rows[0], Pair):
        batch = collate_sequences([p.chosen for p in rows] + [p.rejected for p in rows], pad_id, pack=pack,
                                  flatten=flatten)
    else:
        batch = collate_sequences([j.example for j in rows], pad_id, pack=pack, flatten=flatten)
        batch["desirable"] = torch.tensor([j.desirable for j in rows], dtype=torch.long)
        mismatched = collate_sequences([j.mismatched for j in rows], pad_id, pack=pack, flatten=flatten)
        batch.update({f"kl_{name}": value for name, value in mismatched.items()})
    for name in rows[0].reference:
        batch[name] = torch.tensor([row.reference[name] for row in rows], dtype=torch.float32)
    return batch


class BatchIterator:
    """Endless training batches: epoch after epoch, incomplete last global batch dropped."""

    def __init__(self, examples: Sequence, batch_size: int, pad_id: int, *, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1, group_by_length: bool = False, flatten_packed: bool = False,
                 pack: bool = False):
        global_batch = batch_size * world_size
        if len(examples) < global_batch:
            raise ValueError(
                f"{len(examples)} training examples is fewer than one global micro-batch "
                f"(train.micro_batch_size={batch_size} x {world_size} ranks)"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_by_length = group_by_length
        self.flatten_packed = flatten_packed
        self.pack = pack  # preference data: each micro-batch in one packed row
        self._lengths: list[int] | None = None
        self.batches_per_epoch = len(examples) // global_batch
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.group_by_length:
                from dtrain.data.packing import length_grouped_order

                if self._lengths is None:
                    ids = self.examples["input_ids"] if not isinstance(self.examples, list) else [
                        ex.input_ids for ex in self.examples]
                    self._lengths = [len(x) for x in ids]
                global_batch = self.batch_size * self.world_size
                self._order = length_grouped_order(self._lengths, global_batch, self.seed * 100_003 + self.epoch)
            elif self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
                self._order = torch.randperm(len(self.examples), generator=gen).tolist()
            else:
                self._order = list(range(len(self.examples)))
        return self._order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        global_batch = self.batch_size * self.world_size
        start = self.index * global_batch + self.rank * self.batch_size
        ids = self._epoch_order()[start : start + self.batch_size]
        self.index += 1
        return collate_rows(take(self.examples, ids), self.pad_id, self.flatten_packed, self.pack)

    @property
    def epoch_progress(self) -> float:
        """Fractional epochs consumed so far."""
        return self.epoch + self.index / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.examples),
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data position is for {state['num_examples']} examples (seed {state['seed']}), "
                f"this run has {len(self.examples)} (seed {self.seed}): the data or seed changed"
            )
        index = state["index"]
        saved_batch, global_batch = state.get("global_batch", self.batch_size * self.world_size), self.batch_size * self.world_size
        if saved_batch != global_batch:
            # Another world size (or micro-batch): continue after the same number of examples
            # of this epoch's order, rounded down to a whole global batch.
            index = index * saved_batch // global_batch
        self.epoch, self.index, self._order = state["epoch"], index, None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """Non-padding tokens of a batch (packed batches carry a 4-D mask, so count from the ids)."""
    mask = batch.get("attention_mask")
    if mask is None:  # flattened packing: one row, no padding at all
        return batch["input_ids"].numel()
    if mask.dim() == 2:
        return int(mask.sum().item())
    return int((batch["input_ids"] != pad_id).sum().item())


def eval_batches(examples: Sequence, batch_size: int, pad_id: int, *, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None, flatten_packed: bool = False,
                 ids: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every example once, in order (or only rows `ids`, in their order: a sample of the split);
    rank r takes every world_size-th batch, so the ranks score disjoint parts of the same rows.

    Every rank yields the same number of batches, because a sharded model's forward is a
    collective: a rank with no batch left repeats one with all its labels ignored (it adds
    nothing to the loss or the counts)."""
    rows = list(range(len(examples))) if ids is None else list(ids)
    starts = list(range(0, len(rows), batch_size))
    per_rank = -(-len(starts) // world_size)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for n in range(per_rank):
        index = n * world_size + rank
        start = starts[index] if index < len(starts) else 0
        batch_ids = rows[start : start + batch_size]
        batch = collate_rows(take(examples, batch_ids), pad_id, flatten_packed)
        batch["index"] = torch.tensor(batch_ids)  # which examples these are (-1: a repeat that counts for nothing)
        if index >= len(starts):
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            batch["index"] = torch.full_like(batch["index"], -1)
        yield batch
