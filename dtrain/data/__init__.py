"""Data stage: rows from files -> tokenized examples -> train/validation splits -> batches."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from dtrain.config import DataConfig
from dtrain.data.formats import IGNORE_INDEX, Encoder, Example, TooLong
from dtrain.data.loader import BatchIterator, collate
from dtrain.data.sources import DataError, RowError, check_source, iter_rows

__all__ = [
    "IGNORE_INDEX", "BatchIterator", "DataError", "Example", "PreparedData", "collate", "prepare_data",
]


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    label_names: list[str] | None
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of skipped rows

    def summary(self) -> str:
        s = self.stats
        text = (
            f"data: {s['rows']} rows -> {len(self.train)} train / {len(self.validation)} validation examples; "
            f"{s['skipped']} malformed rows skipped, {s['too_long']} dropped (no trained token within max_seq_len), "
            f"{s['truncated']} truncated"
        )
        if self.label_names:
            counts = Counter(ex.labels for ex in self.train)
            text += "; train labels: " + ", ".join(f"{n}={counts.get(i, 0)}" for i, n in enumerate(self.label_names))
        return text


def check_sources(cfg: DataConfig) -> None:
    if not cfg.train:
        raise DataError("data.train: no training files given")
    for key in ("train", "validation"):
        for src in getattr(cfg, key):
            check_source(src.path, f"data.{key}")


def _label_names(cfg: DataConfig) -> list[str]:
    """The label set: data.labels, or every label in the training files, sorted."""
    if cfg.labels:
        return list(cfg.labels)
    seen = set()
    for src in cfg.train:
        for _, row in iter_rows(src.path):
            if isinstance(row, dict) and row.get(cfg.label_field) is not None:
                seen.add(str(row[cfg.label_field]))
    if not seen:
        raise DataError(f"data.label_field: no row of {cfg.train} has a {cfg.label_field!r} field")
    return sorted(seen)


def _encode_files(paths: list[str], encoder: Encoder, cfg: DataConfig, stats: Counter, skipped: list[str],
                  limit: int | None) -> list[Example]:
    examples: list[Example] = []
    for path in paths:
        for n, (where, row) in enumerate(iter_rows(path)):
            if limit is not None and n >= limit:
                break
            stats["rows"] += 1
            try:
                if isinstance(row, RowError):
                    raise row
                example = encoder(row, where)
            except RowError as exc:
                if cfg.on_error == "fail":
                    raise DataError(f"{exc} (set data.on_error=skip to skip such rows)") from None
                stats["skipped"] += 1
                skipped.append(str(exc))
                continue
            except TooLong:
                stats["too_long"] += 1
                continue
            stats["truncated"] += example.truncated
            examples.append(example)
    return examples


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                 rows_per_file: int | None = None) -> PreparedData:
    """Read, validate and tokenize the data; split off validation when none is given.

    `rows_per_file` reads only the first rows of each file (the dry run's sample).
    """
    check_sources(cfg)
    label_names = _label_names(cfg) if cfg.format == "classification" else None
    encoder = Encoder(cfg, tokenizer, label_names)
    stats: Counter = Counter(rows=0, skipped=0, too_long=0, truncated=0)
    skipped: list[str] = []
    train = _encode_files([s.path for s in cfg.train], encoder, cfg, stats, skipped, rows_per_file)
    if cfg.validation:
        validation = _encode_files([s.path for s in cfg.validation], encoder, cfg, stats, skipped, rows_per_file)
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = round(len(train) * cfg.val_ratio)
        if cfg.val_ratio > 0 and len(train) >= 2:
            n_val = max(1, n_val)
        val_ids = set(order[:n_val])
        validation = [ex for i, ex in enumerate(train) if i in val_ids]
        train = [ex for i, ex in enumerate(train) if i not in val_ids]
    if not train:
        raise DataError(f"data.train: no usable training examples in {cfg.train} ({dict(stats)})")
    return PreparedData(train, validation, label_names, dict(stats), skipped)
