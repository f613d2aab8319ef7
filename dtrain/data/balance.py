"""Class balancing for classification training data."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Sequence


def resample_indices(labels: Sequence[int], method: str, seed: int) -> list[int]:
    """Row indices after balancing: `oversample` repeats rows of smaller classes up to the
    largest class, `undersample` keeps a random subset of each class the size of the
    smallest; the result is shuffled deterministically."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    sizes = [len(rows) for rows in by_class.values()]
    out: list[int] = []
    for label in sorted(by_class):
        rows = by_class[label]
        if method == "oversample":
            target = max(sizes)
            out += rows + [rng.choice(rows) for _ in range(target - len(rows))]
        elif method == "undersample":
            out += rng.sample(rows, min(sizes))
        else:
            raise ValueError(f"unknown balancing method {method!r}")
    rng.shuffle(out)
    return out


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse-frequency weights n / (k * n_c), normalised so a balanced set gets all 1.0.

    A class absent from the training data gets weight 0 (it has no examples to weigh)."""
    counts = Counter(labels)
    n = len(labels)
    return [n / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)]
