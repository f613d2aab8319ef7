"""Split assignment and class balancing, on inputs whose outcome is known exactly."""

from collections import Counter

import pytest

from dtrain.data.balance import class_weights, resample_indices
from dtrain.data.split import assign_splits, unit_hash


def test_unit_hash_is_stable_and_seeded():
    assert unit_hash("row", 1) == unit_hash("row", 1)  # not Python's salted hash()
    assert unit_hash("row", 1) != unit_hash("row", 2)
    assert unit_hash("row", 0) == 0.1888287336677118  # pinned: splits must not move between releases


def test_split_is_by_hash_threshold_and_deterministic():
    keys = [f"example {i}" for i in range(2000)]
    splits = assign_splits(keys, seed=7, val_ratio=0.15, test_ratio=0.15)
    for key, split in zip(keys, splits):
        h = unit_hash(key, 7)
        assert split == ("test" if h < 0.15 else "validation" if h < 0.30 else "train")
    counts = Counter(splits)
    assert 0.12 < counts["validation"] / 2000 < 0.18 and 0.12 < counts["test"] / 2000 < 0.18
    assert splits == assign_splits(keys, seed=7, val_ratio=0.15, test_ratio=0.15)
    assert splits != assign_splits(keys, seed=8, val_ratio=0.15, test_ratio=0.15)


def test_split_is_stable_when_data_is_appended():
    keys = [f"example {i}" for i in range(500)]
    before = assign_splits(keys, seed=0, val_ratio=0.2, test_ratio=0.1)
    after = assign_splits(keys + [f"new {i}" for i in range(300)], seed=0, val_ratio=0.2, test_ratio=0.1)
    assert after[:500] == before


def test_identical_rows_land_in_the_same_split():
    splits = assign_splits(["same text"] * 10 + ["other"], seed=3, val_ratio=0.3, test_ratio=0.3)
    assert len(set(splits[:10])) == 1


def test_stratified_split_keeps_label_proportions_exactly():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    keys = [f"row {i}" for i in range(100)]
    splits = assign_splits(keys, seed=1, val_ratio=0.2, test_ratio=0.1, labels=labels)
    per = Counter(zip(labels, splits))
    assert (per["a", "validation"], per["a", "test"], per["a", "train"]) == (12, 6, 42)
    assert (per["b", "validation"], per["b", "test"], per["b", "train"]) == (6, 3, 21)
    assert (per["c", "validation"], per["c", "test"], per["c", "train"]) == (2, 1, 7)


def test_bad_ratios_are_rejected():
    with pytest.raises(ValueError, match="sum to < 1"):
        assign_splits(["x"], seed=0, val_ratio=0.6, test_ratio=0.5)


def test_oversample_and_undersample():
    labels = [0] * 6 + [1] * 2 + [2] * 4
    over = resample_indices(labels, "oversample", seed=0)
    assert Counter(labels[i] for i in over) == {0: 6, 1: 6, 2: 6}
    assert set(over) == set(range(12))  # every original row survives
    under = resample_indices(labels, "undersample", seed=0)
    assert Counter(labels[i] for i in under) == {0: 2, 1: 2, 2: 2}
    assert len(set(under)) == 6
    assert over == resample_indices(labels, "oversample", seed=0)


def test_class_weights_are_inverse_frequency():
    weights = class_weights([0] * 6 + [1] * 2 + [2] * 4, 4)
    assert weights == pytest.approx([12 / (4 * 6), 12 / (4 * 2), 12 / (4 * 4), 0.0])
    assert class_weights([0, 1, 0, 1], 2) == [1.0, 1.0]
