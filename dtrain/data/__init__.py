"""Data stage: sources -> clean -> tokenize -> dedup -> split -> balance/augment -> pack -> batches.

`prepare_data` (dtrain/data/pipeline.py) builds or loads the cached, tokenized splits;
`BatchIterator` (loader.py) turns them into resumable batches.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of dtrain.data that defines it. Imported on first use, so that what needs one
# constant (IGNORE_INDEX, for the objectives, which config validation imports) does not pay for
# datasets and transformers, which the pipeline imports.
_EXPORTS = {
    "IGNORE_INDEX": "formats", "Example": "formats", "BatchIterator": "loader", "collate": "loader",
    "PreparedData": "pipeline", "check_sources": "pipeline", "prepare_data": "pipeline", "DataError": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dtrain.data.{_EXPORTS[name]}"), name)
