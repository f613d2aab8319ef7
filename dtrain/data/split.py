"""Deterministic train/validation/test assignment.

Without labels each row's split comes from a hash of (seed, row content) compared with the
ratios, so a row keeps its split when data is appended and identical rows always land
together. With labels (classification) the split is stratified: within each label, rows
are ranked by the same hash and the lowest-ranked fractions go to test and validation, so
every split has the label proportions of the whole (appending may then move a few rows).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Hashable, Sequence

SPLITS = ("train", "validation", "test")


def unit_hash(key: str, seed: int) -> float:
    """A stable hash of (seed, key) mapped to [0, 1) (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(keys: Sequence[str], seed: int, val_ratio: float, test_ratio: float,
                  labels: Sequence[Hashable] | None = None) -> list[str]:
    """The split ("train" | "validation" | "test") of every row, by content key."""
    if val_ratio < 0 or test_ratio < 0 or val_ratio + test_ratio >= 1:
        raise ValueError(f"split ratios validation={val_ratio}, test={test_ratio} must be >= 0 and sum to < 1")
    hashes = [unit_hash(k, seed) for k in keys]
    if labels is None:
        return ["test" if h < test_ratio else "validation" if h < test_ratio + val_ratio else "train" for h in hashes]
    by_label: dict[Hashable, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    out = ["train"] * len(keys)
    for rows in by_label.values():
        rows.sort(key=lambda i: (hashes[i], i))
        n_test = round(len(rows) * test_ratio)
        n_val = round(len(rows) * val_ratio)
        for i in rows[:n_test]:
            out[i] = "test"
        for i in rows[n_test : n_test + n_val]:
            out[i] = "validation"
    return out
