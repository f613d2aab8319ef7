"""Read rows from files, remembering where each came from ("file:line") for error messages."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A problem with the data, naming the file, line and field."""


class RowError(ValueError):
    """A malformed row. `where` is "file:line"; the run fails or skips it (data.on_error)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_source(path: str, key: str) -> None:
    p = Path(path)
    if p.is_dir():
        if not (p / "dataset_info.json").is_file() and not (p / "dataset_dict.json").is_file():
            raise DataError(f"{key}: {path} is a directory but not a datasets.save_to_disk directory")
        return
    if not p.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{key}: {path}: unsupported file type {p.suffix!r}; use one of {sorted(SUFFIXES)}")


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8") from None


def iter_rows(path: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """Yield (where, row) for every row of a file; a row that cannot be parsed is a RowError."""
    p = Path(path)
    if p.is_dir():
        yield from _iter_saved_dataset(path)
        return
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    kind = SUFFIXES[p.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield f"{path}:row {i + 1}", row
        return
    text = _decode(raw, path)
    if kind == "jsonl":
        # split on \n only: U+2028 and friends are legal inside JSON strings (\r is JSON whitespace)
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, RowError(where, f"not valid JSON ({exc.msg}, column {exc.colno})")
                continue
            yield where, row if isinstance(row, dict) else RowError(where, "expected a JSON object per line")
    elif kind == "json":
        yield from _iter_json_array(text, path)
    elif kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # more cells than header columns
                yield where, RowError(where, f"{len(row) - 1 + len(row[None])} cells but {len(row) - 1} columns")
                continue
            # Short rows give None for the missing cells: treat those columns as absent.
            yield where, {k: v for k, v in row.items() if v is not None}


def _iter_json_array(text: str, path: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """Decode a JSON array element by element so each row keeps its line number."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}:1: expected a JSON array of objects")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Unlike a JSONL line, the rest of the array cannot be parsed: never skippable.
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        yield where, row if isinstance(row, dict) else RowError(where, "expected a JSON object")


def _iter_saved_dataset(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split; point at one split's directory")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}:row {i + 1}", row
