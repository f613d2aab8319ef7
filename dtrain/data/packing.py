"""Sequence packing: several examples per row, each attending only to itself.

A packed row concatenates examples; `position_ids` restart at 0 for each one. Two layouts:

- mask (SDPA, eager): rows padded to the longest, with a block-diagonal causal attention
  mask (boolean, True = may attend, shape [B, 1, L, L]) that transformers passes through.
- flattened (flash-attention 2, sdpa_varlen): the whole micro-batch as one row of shape
  [1, total tokens] and no mask at all, so no padding either; the loss passes the example
  boundaries (read off the restarting position_ids) to the variable-length kernels, or to
  SDPA run per example (dtrain/attention.py).

The first token of every example gets label -100, since with the one-token shift it would be
predicted from the previous example's last token. The loss of a packed batch therefore
equals the sum of the examples' losses run one by one (tests/test_packing_equivalence.py
checks it token by token, for both layouts).
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence

import torch

from dtrain.data.formats import IGNORE_INDEX, Example


def pack_examples(lengths: Sequence[int], max_seq_len: int, *, shuffle_seed: int | None = None) -> list[list[int]]:
    """Indices of the examples (given by their token counts) in each packed row
    (best-fit decreasing; deterministic).

    Each example goes to the fullest row that still has room for it, longest examples first,
    which leaves almost no gaps on long-tailed length distributions. With a seed, the order
    of the rows is shuffled so that a row's length does not follow its position.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_seq_len={max_seq_len} (truncate first)")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(bins)
    return bins


def collate_flattened(rows: list[list[Example]]) -> dict[str, torch.Tensor]:
    """All examples of the packed rows as one padding-free sequence: input_ids, labels and
    position_ids of shape [1, total tokens]; no attention mask (the variable-length layout)."""
    examples = [ex for row in rows for ex in row]
    input_ids = torch.tensor([[t for ex in examples for t in ex.input_ids]])
    labels = torch.tensor([[t for ex in examples for t in ex.labels]])
    position_ids = torch.cat([torch.arange(len(ex.input_ids)) for ex in examples]).unsqueeze(0)
    labels[position_ids == 0] = IGNORE_INDEX  # never predicted across an example boundary
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for packed rows: input_ids, labels, position_ids and a block-diagonal mask."""
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, 1, width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex.input_ids)
            end = start + n
            input_ids[r, start:end] = torch.tensor(ex.input_ids)
            labels[r, start:end] = torch.tensor(ex.labels)
            labels[r, start] = IGNORE_INDEX  # never predicted across an example boundary
            position_ids[r, start:end] = torch.arange(n)
            mask[r, 0, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            start = end
        # Padding attends to itself only: no fully masked row (which makes SDPA return NaN).
        pad = torch.arange(start, width)
        mask[r, 0, pad, pad] = True
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int) -> list[int]:
    """An epoch order in which each batch holds examples of similar length.

    Shuffle, cut into mega-batches of 50 batches, sort each by length, then shuffle the
    batches: little padding, yet the order still changes every epoch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * batch_size
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    # Keep the (possibly short) last batch last, so that dropping an incomplete batch drops it.
    tail = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return [i for b in full + tail for i in b]
