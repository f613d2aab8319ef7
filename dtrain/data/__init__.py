"""Data stage: sources -> clean -> tokenize -> dedup -> split -> balance/augment -> pack -> batches.

`prepare_data` (dtrain/data/pipeline.py) builds or loads the cached, tokenized splits;
`BatchIterator` (loader.py) turns them into resumable batches.
"""

from __future__ import annotations

from dtrain.data.formats import IGNORE_INDEX, Example
from dtrain.data.loader import BatchIterator, collate
from dtrain.data.pipeline import PreparedData, check_sources, prepare_data
from dtrain.data.sources import DataError

__all__ = [
    "IGNORE_INDEX", "BatchIterator", "DataError", "Example", "PreparedData", "check_sources", "collate",
    "prepare_data",
]
