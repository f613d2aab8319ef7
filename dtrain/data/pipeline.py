"""The data stage: sources -> clean -> encode -> dedup -> split -> mix/balance/augment -> pack.

Rows stream from the sources into Arrow (a `datasets.Dataset` on disk, memory-mapped), and
cleaning + tokenization run as one batched, optionally multi-process `map` that builds its
output as Arrow arrays; only the short content keys used for deduplication and splitting are
held in memory. The splits are gathered from the encoded file straight into the cache entry's
Arrow files. Every step counts what it drops and why (`PreparedData.steps`), which the report
renders.

The result is cached under a key derived from the inputs' content and every option that
affects it (`cache_key`): an unchanged run reuses it, a changed file or option rebuilds it.
An entry is a directory: train.arrow, validation.arrow, test.arrow (memory-mapped when loaded)
and meta.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence as SequenceOf

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from dtrain.schema import DataConfig, SourceConfig
from dtrain.data import clean
from dtrain.data.balance import class_weights, resample_indices
from dtrain.data.formats import IGNORE_INDEX, Encoder, RowError, TooLong
from dtrain.data.preference import PREFERENCE_FORMATS, PreferenceEncoder, prompt_length
from dtrain.data.prompts import PromptEncoder
from dtrain.data.sources import ArrowRows, DataError, Row, StringFields, check_source, iter_rows
from dtrain.data.split import assign_splits

log = logging.getLogger(__name__)

# Bump when the pipeline's output or cache layout changes for the same inputs.
# 3: splits are Arrow stream files (train.arrow, ...) instead of save_to_disk directories.
# (The data report's figures are kept in the entry too, under figures/: bump when they change.)
PIPELINE_VERSION = "3"

ENCODED_FEATURES = Features({
    "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")), "label": Value("int32"),
    "rejected_ids": Sequence(Value("int32")), "rejected_labels": Sequence(Value("int32")),
    "key": Value("string"), "group": Value("string"), "source": Value("int32"), "split": Value("string"),
    "drop": Value("string"), "truncated": Value("bool"), "n_tokens": Value("int32"),
    "row": Value("string"),  # data.format=prompt: the row (JSON) and where it came from, for the reward functions
})
PACKED_FEATURES = Features({
    "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")), "seq_lens": Sequence(Value("int32")),
})
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_COLUMNS = {  # what each format's prepared splits hold
    **{fmt: ["input_ids", "labels"] for fmt in ("text", "alpaca", "chat")},
    "classification": ["input_ids", "label"],
    "preference": ["input_ids", "labels", "rejected_ids", "rejected_labels"],  # chosen, rejected
    "unpaired_preference": ["input_ids", "labels", "label"],  # label: 1 desirable, 0 undesirable
    "prompt": ["input_ids", "labels", "row"],  # the prompt's tokens (nothing trained), the row
}


@dataclass
class PreparedData:
    """Tokenized splits (Arrow datasets with input_ids / labels / label columns) and their story."""

    train: Dataset
    validation: Dataset
    test: Dataset
    label_names: list[str] | None
    class_weights: list[float] | None = None
    packed: bool = False
    steps: list[tuple[str, int, dict[str, int]]] = field(default_factory=list)  # (step, rows out, drops by reason)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of skipped malformed rows
    lengths_before_packing: list[int] = field(default_factory=list)
    truncated: int = 0  # kept examples cut to max_seq_len
    cache_path: str | None = None
    from_cache: bool = False

    @property
    def stats(self) -> dict[str, int]:
        drops: Counter = Counter()
        for _, _, reasons in self.steps:
            drops.update(reasons)
        return {"rows": self.steps[0][1] if self.steps else 0, **drops}

    def summary(self) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in self.stats.items() if reason != "rows" and n) or "none"
        text = (f"data: {self.stats['rows']} rows -> {len(self.train)} train / {len(self.validation)} validation / "
                f"{len(self.test)} test {'packed sequences' if self.packed else 'examples'}; dropped: {drops}; "
                f"{self.truncated} truncated to max_seq_len")
        if self.from_cache:
            text += f" (cached: {self.cache_path})"
        return text


# --------------------------------------------------------------------------------------
# Sources


def _source_name(src: SourceConfig) -> str:
    """How a source is shown to people: paths as given, database URLs without passwords."""
    from dtrain.data.sources import is_sql_source, redact_url

    if src.path is not None:
        return redact_url(src.path) if is_sql_source(src.path) else src.path
    return redact_url(src.url)


def all_sources(cfg: DataConfig) -> list[tuple[SourceConfig, str]]:
    """(source, split) for every configured source; split "" means: split by ratio."""
    return ([(s, "") for s in cfg.train] + [(s, "validation") for s in cfg.validation]
            + [(s, "test") for s in cfg.test])


def check_sources(cfg: DataConfig) -> None:
    if not cfg.train:
        raise DataError("data.train: no training sources given")
    for key in ("train", "validation", "test"):
        for src in getattr(cfg, key):
            if src.path is not None:
                check_source(src.path, f"data.{key}")
            else:
                from dtrain.data.sources import check_sql_source

                check_sql_source(src.url, src.query)


def _iter_source(src: SourceConfig, fields: StringFields | None = None) -> Iterator[Row | ArrowRows]:
    if src.path is not None:
        return iter_rows(src.path, fields)
    from dtrain.data.sources import iter_sql_rows

    return iter_sql_rows(src.url, src.query)


# --------------------------------------------------------------------------------------
# The raw table: every row read, one Arrow row each


def plain_fields(cfg: DataConfig) -> StringFields | None:
    """The string fields that are all a text or alpaca row is made of; None for chat and
    classification. Rows whose fields are plain strings are stored as those strings, in a
    struct column ("fields"), which costs less than a JSON document per row to write and to
    read back, and lets the readers hand JSONL and Parquet over as Arrow columns. Any other
    row is kept whole, as JSON ("row"), and the encoder reports what is wrong with it.

    Nothing but these fields affects what a text or alpaca row becomes, except with EDA on
    other fields: their random edits shift the draws for these, so then rows are kept whole too.
    """
    if cfg.format == "alpaca":
        names = (cfg.instruction_field, cfg.input_field, cfg.output_field)
        required = (cfg.instruction_field, cfg.output_field)
    elif cfg.format == "text":
        names = required = (cfg.text_field,)
    else:
        return None
    if cfg.augment.copies > 0 and not set(cfg.augment.fields or ()) <= set(names):
        return None
    return StringFields(tuple(dict.fromkeys(names)), required)


def raw_features(plain: StringFields | None) -> Features:
    """Columns of the raw table: where the row came from, and either its error, its plain
    fields ("fields") or the whole row as JSON ("row")."""
    features = {"where": Value("string"), "source": Value("int32"), "split": Value("string"),
                "error": Value("string"), "row": Value("string")}
    if plain is not None:
        features["fields"] = {name: Value("string") for name in plain.names}
    return Features(features)


def _raw_batches(sources: list[tuple[SourceConfig, str]], plain: StringFields | None, rows_per_file: int | None,
                 batch_size: int = 2000) -> Iterator[pa.RecordBatch]:
    schema = raw_features(plain).arrow_schema
    columns: dict[str, list] = {name: [] for name in schema.names}
    for index, (src, split) in enumerate(sources):
        n = 0  # rows read from this source
        for item in _iter_source(src, plain):
            if rows_per_file is not None and n >= rows_per_file:
                break
            if isinstance(item, ArrowRows):  # keep the order: rows collected so far go first
                if columns["where"]:
                    yield pa.RecordBatch.from_pydict(columns, schema=schema)
                    columns = {name: [] for name in schema.names}
                block = item if rows_per_file is None else item.head(rows_per_file - n)
                yield _arrow_rows_batch(block, index, split, plain, schema)
                n += len(block.wheres)
                continue
            where, row = item
            _add_raw_row(columns, where, row, index, split, plain)
            n += 1
            if len(columns["where"]) >= batch_size:
                yield pa.RecordBatch.from_pydict(columns, schema=schema)
                columns = {name: [] for name in schema.names}
    if columns["where"]:
        yield pa.RecordBatch.from_pydict(columns, schema=schema)


def _arrow_rows_batch(block: ArrowRows, source: int, split: str, plain: StringFields,
                      schema: pa.Schema) -> pa.RecordBatch:
    n = len(block.wheres)
    fields = pa.StructArray.from_arrays([block.table.column(name).combine_chunks() for name in plain.names],
                                        names=list(plain.names))
    return pa.RecordBatch.from_arrays([
        pa.array(block.wheres, pa.string()), pa.array(np.full(n, source, dtype=np.int32)),
        pa.array([split] * n, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string()), fields,
    ], schema=schema)


def _add_raw_row(columns: dict[str, list], where: str, row: dict[str, Any] | RowError, source: int, split: str,
                 plain: StringFields | None) -> None:
    error = document = fields = None
    if isinstance(row, RowError):
        error = str(row)
    elif plain is not None and plain.holds(row):
        fields = {name: row.get(name) for name in plain.names}
    else:
        document = json.dumps(row, default=str)
    columns["where"].append(where)
    columns["source"].append(source)
    columns["split"].append(split)
    columns["error"].append(error)
    columns["row"].append(document)
    if plain is not None:
        columns["fields"].append(fields)


def _write_raw(batches: Iterable[pa.RecordBatch], path: Path, features: Features) -> Dataset:
    """Stream record batches into an Arrow file and memory-map it as a Dataset.

    (Dataset.from_generator encodes every row through `Features` one by one, which costs
    more than reading the rows.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return Dataset.from_file(str(path))


def _raw_rows_of(batch: pa.Table) -> list[dict[str, Any] | None]:
    """The rows of a raw batch as dicts (plain fields, or the whole row); None for an error row."""
    errors = batch.column("error").to_pylist()
    documents = batch.column("row").to_pylist()
    fields = batch.column("fields").to_pylist() if "fields" in batch.column_names else [None] * batch.num_rows
    rows: list[dict[str, Any] | None] = []
    for error, document, plain in zip(errors, documents, fields):
        if error is not None:
            rows.append(None)
        else:
            rows.append(json.loads(document) if document is not None else plain)
    return rows


# --------------------------------------------------------------------------------------
# Clean + encode (one batched map)


def _text_fields(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(all text fields, completion fields) of the format; chat is handled by message content. A
    preference pair's rejected response is no completion here: it may well be boilerplate."""
    if cfg.format == "alpaca":
        return [cfg.instruction_field, cfg.input_field, cfg.output_field], [cfg.output_field]
    if cfg.format == "preference":
        return [cfg.prompt_field, cfg.chosen_field, cfg.rejected_field], [cfg.chosen_field]
    if cfg.format == "unpaired_preference":
        return [cfg.prompt_field, cfg.completion_field], [cfg.completion_field]
    if cfg.format == "prompt":
        return [cfg.prompt_field], []
    return [cfg.text_field], [cfg.text_field]


def _normalize_value(value: Any, norm: Any) -> Any:
    """A text field's value normalised: a string, or each message's content (preference rows hold either)."""
    if isinstance(value, str):
        return norm(value)
    messages = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m["content"] = norm(m["content"])
    return value


def _clean_row(row: dict[str, Any], cfg: DataConfig, phrases: tuple[str, ...]) -> str | None:
    """Normalise the row's text in place; returns a drop reason or None."""
    c = cfg.clean
    form = None if c.unicode == "none" else c.unicode

    def norm(text: Any) -> Any:
        return clean.normalize_text(text, form, c.whitespace) if isinstance(text, str) else text

    if cfg.format == "chat":
        messages = row.get(cfg.messages_field)
        if isinstance(messages, list):
            for m in messages:
                if isinstance(m, dict):
                    m["content"] = norm(m.get("content"))
                    if c.boilerplate != "off" and m.get("role") == "assistant" and isinstance(m["content"], str):
                        if clean.find_boilerplate(m["content"], phrases):
                            if c.boilerplate == "drop":
                                return "boilerplate"
                            m["content"] = clean.strip_boilerplate(m["content"], phrases)
                            if not m["content"]:  # the whole answer was boilerplate
                                return "boilerplate"
        return None
    fields, completion_fields = _text_fields(cfg)
    for name in fields:
        if name in row:
            value = row[name]
            row[name] = _normalize_value(value, norm)
            if cfg.format == "prompt" and isinstance(value, str) and row[name]:
                # A prompt's end is where its completion begins ("### Response:\n"): kept as it was.
                row[name] += value[len(value.rstrip()):]
    if cfg.format == "unpaired_preference" and row.get(cfg.label_field) in (False, 0, "false"):
        completion_fields = []  # an undesirable completion is meant to be one
    if c.boilerplate != "off":
        for name in completion_fields:
            text = row.get(name)
            if isinstance(text, str) and clean.find_boilerplate(text, phrases):
                if c.boilerplate == "drop":
                    return "boilerplate"
                row[name] = clean.strip_boilerplate(text, phrases)
                if not row[name]:  # the whole response was boilerplate
                    return "boilerplate"
    return None


def _key_text(value: Any) -> str:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return "\x1e".join(f"{m.get('role')}:{m.get('content')}" for m in value if isinstance(m, dict))
    return str(value or "")


def content_key(row: dict[str, Any], cfg: DataConfig) -> str:
    """The text that identifies a row for dedup (label excluded, but for an unpaired preference,
    where the same completion may be judged both ways only once)."""
    if cfg.format == "chat":
        return _key_text(row.get(cfg.messages_field) or [])
    fields, _ = _text_fields(cfg)
    extra = [str(row.get(cfg.label_field))] if cfg.format == "unpaired_preference" else []
    if cfg.format == "prompt":  # the same prompt with another answer (or other fields) is another row
        extra = [json.dumps({k: v for k, v in row.items() if k != cfg.prompt_field}, sort_keys=True, default=str)]
    return "\x1f".join([_key_text(row.get(name)) for name in fields] + extra)


def group_key(row: dict[str, Any], cfg: DataConfig) -> str:
    """What decides a row's split: its content, or for preference data its prompt, so that every
    pair (or judged completion) of one prompt lands in the same split and none leaks."""
    if cfg.format in ("preference", "unpaired_preference", "prompt"):
        prompt = row.get(cfg.prompt_field)
        if prompt is None:  # whole conversations: their shared first message stands for the prompt
            first = row.get(cfg.chosen_field)
            prompt = first[:1] if isinstance(first, list) else first
        return "prompt\x1f" + _key_text(prompt)
    return content_key(row, cfg)


def _clean_and_encode(batch: pa.Table, *, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                      label_names: list[str] | None) -> pa.Table:
    """Raw rows -> ENCODED_FEATURES: a drop reason ("malformed:<file:line: why>", "boilerplate", ...)
    or None, the content key, and the token ids and labels, built as Arrow arrays."""
    phrases = tuple(cfg.clean.boilerplate_phrases or clean.DEFAULT_BOILERPLATE)
    n = batch.num_rows
    errors = batch.column("error").to_pylist()
    wheres = batch.column("where").to_pylist()
    drop: list[str | None] = [None] * n
    keys: list[str | None] = [None] * n
    groups: list[str | None] = [None] * n
    rows, row_wheres, todo = [], [], []
    for i, row in enumerate(_raw_rows_of(batch)):
        if row is None:
            drop[i] = "malformed:" + errors[i]
            continue
        reason = _clean_row(row, cfg, phrases)
        keys[i], groups[i] = content_key(row, cfg), group_key(row, cfg)
        if reason:
            drop[i] = reason
            continue
        rows.append(row)
        row_wheres.append(wheres[i])
        todo.append(i)
    encoder = (PreferenceEncoder(cfg, tokenizer) if cfg.format in PREFERENCE_FORMATS
               else PromptEncoder(cfg, tokenizer) if cfg.format == "prompt" else Encoder(cfg, tokenizer, label_names))
    encoded = encoder.encode_batch(rows, row_wheres)

    lengths, offsets = _row_offsets(n, todo, encoded.offsets)
    rejected = encoded.rejected
    rejected_lengths, rejected_offsets = _row_offsets(n, todo, rejected.offsets) if rejected else (None, None)
    n_tokens: list[int | None] = [None] * n
    truncated: list[bool | None] = [None] * n
    documents: list[str | None] = [None] * n
    if cfg.format == "prompt":
        for j, i in enumerate(todo):
            documents[i] = json.dumps({"where": row_wheres[j], "row": rows[j]}, default=str)
    classes: list[int | None] = [None] * n
    for j, i in enumerate(todo):
        error = encoded.errors[j]
        if isinstance(error, RowError):
            drop[i] = f"malformed:{error}"
        elif isinstance(error, TooLong):
            drop[i] = "too_long"
        else:
            # (a pair: its longer sequence, what max_seq_len and the token filters are about)
            n_tokens[i] = int(lengths[i] if rejected is None else max(lengths[i], rejected_lengths[i]))
            truncated[i] = encoded.truncated[j] or (rejected is not None and rejected.truncated[j])
            if encoded.classes is not None:
                classes[i] = encoded.classes[j]
            if n_tokens[i] < cfg.clean.min_tokens:
                drop[i] = "min_tokens"
            elif cfg.clean.max_tokens is not None and n_tokens[i] > cfg.clean.max_tokens:
                drop[i] = "max_tokens"
    offsets_array = pa.array(offsets)
    token_lists = pa.list_(pa.int32())
    if rejected is not None:
        rejected_offsets = pa.array(rejected_offsets)
        rejected_columns = [pa.ListArray.from_arrays(rejected_offsets, pa.array(rejected.ids)),
                            pa.ListArray.from_arrays(rejected_offsets, pa.array(rejected.labels))]
    else:
        rejected_columns = [pa.nulls(n, token_lists), pa.nulls(n, token_lists)]
    return pa.Table.from_arrays([
        pa.ListArray.from_arrays(offsets_array, pa.array(encoded.ids)),
        (pa.ListArray.from_arrays(offsets_array, pa.array(encoded.labels)) if encoded.labels is not None
         else pa.nulls(n, token_lists)),
        pa.array(classes, pa.int32()),
        *rejected_columns,
        pa.array(keys, pa.string()),
        pa.array(groups, pa.string()),
        batch.column("source").combine_chunks(),
        batch.column("split").combine_chunks(),
        pa.array(drop, pa.string()),
        pa.array(truncated, pa.bool_()),
        pa.array(n_tokens, pa.int32()),
        pa.array(documents, pa.string()),
    ], schema=ENCODED_FEATURES.arrow_schema)


def _row_offsets(n: int, todo: list[int], encoded_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and list offsets of n rows, of which rows `todo` hold the encoded sequences (the
    others, dropped, get empty lists)."""
    lengths = np.zeros(n, dtype=np.int32)
    lengths[todo] = np.diff(encoded_offsets)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return lengths, offsets


def _encode(raw: Dataset, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None,
            path: Path, num_proc: int | None = None) -> pa.Table:
    """Clean + encode every raw row (ENCODED_FEATURES, row for row), written to `path`."""
    encoded = raw.with_format("arrow").map(
        _clean_and_encode, batched=True, batch_size=1000, num_proc=num_proc,
        remove_columns=raw.column_names, features=ENCODED_FEATURES, desc="clean + tokenize",
        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "label_names": label_names},
        # A fresh file, read once: no need for datasets to hash the tokenizer to name (or reuse) it.
        cache_file_name=str(path), new_fingerprint=uuid.uuid4().hex, load_from_cache_file=False,
    )
    return encoded.data.table


# --------------------------------------------------------------------------------------
# The stage


def label_names_of(cfg: DataConfig, rows_per_file: int | None = None) -> list[str]:
    """The label set: data.labels, or every label in the training sources, sorted."""
    if cfg.labels:
        if len(cfg.labels) < 2:  # (one label would make transformers build a regression head)
            raise DataError(f"data.labels: {cfg.labels} names one class; a classifier needs at least two")
        return list(cfg.labels)
    seen = set()
    for src in cfg.train:
        for n, (_, row) in enumerate(_iter_source(src)):
            if rows_per_file is not None and n >= rows_per_file:
                break
            if isinstance(row, dict) and row.get(cfg.label_field) is not None:
                seen.add(str(row[cfg.label_field]))
    if not seen:
        raise DataError(f"data.label_field: no training row has a {cfg.label_field!r} field")
    if len(seen) < 2:
        raise DataError(f"data.label_field: every training row has the {cfg.label_field!r} {seen.pop()!r}; a "
                        "classifier needs at least two classes (data.labels names them all)")
    return sorted(seen)


def _mix(indices_by_source: dict[int, list[int]], weights: dict[int, float], rng: random.Random) -> list[int]:
    """Each source's rows repeated floor(w) times plus a random fraction (w mod 1) of them."""
    out: list[int] = []
    for source, rows in sorted(indices_by_source.items()):
        w = weights[source]
        whole, frac = int(w), w - int(w)
        out += rows * whole
        out += rng.sample(rows, round(frac * len(rows)))
    return out


def build(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, workdir: Path, out_dir: Path,
          rows_per_file: int | None = None) -> PreparedData:
    """Run every step of the stage: intermediate Arrow files go under `workdir`, the splits to
    `out_dir`/{train,validation,test}.arrow."""
    check_sources(cfg)
    sources = all_sources(cfg)
    label_names = label_names_of(cfg, rows_per_file) if cfg.format == "classification" else None
    steps: list[tuple[str, int, dict[str, int]]] = []

    plain = plain_fields(cfg)
    raw = _write_raw(_raw_batches(sources, plain, rows_per_file), workdir / "raw.arrow", raw_features(plain))
    if len(raw) == 0:
        raise DataError(f"data: the sources {[_source_name(s) for s, _ in sources]} hold no rows")
    steps.append(("read", len(raw), {}))
    encoded = _encode(raw, cfg, tokenizer, label_names, workdir / "encoded.arrow",
                      num_proc=cfg.num_proc if cfg.num_proc > 1 else None)

    # Malformed rows fail the run (naming file and line) or are skipped and counted.
    drops = encoded.column("drop").to_pylist()
    malformed = [d.removeprefix("malformed:") for d in drops if d and d.startswith("malformed:")]
    if malformed and cfg.on_error == "fail":
        more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
        raise DataError(f"{malformed[0]}{more}; set data.on_error=skip to skip and count such rows")
    reasons = Counter("malformed" if d.startswith("malformed:") else d for d in drops if d)
    alive = [i for i, d in enumerate(drops) if d is None]
    truncated = sum(1 for i, t in enumerate(encoded.column("truncated").to_pylist()) if t and drops[i] is None)
    steps.append(("clean + tokenize", len(alive), dict(reasons)))

    # Dedup within and across splits: rows of explicit validation/test sources win, so a
    # training row that repeats one of them is the one removed (nothing leaks).
    keys = {name: _pick(encoded.column(name).to_pylist(), alive) for name in ("key", "group", "split", "label")}
    protected = [s != "" for s in keys["split"]]
    for name, enabled, finder in (
        ("exact_duplicate", cfg.clean.exact_dedup, lambda k, p: clean.exact_duplicates(k, protected=p)),
        ("near_duplicate", cfg.clean.near_dedup,
         lambda k, p: clean.near_duplicates(k, threshold=cfg.clean.near_dedup_threshold, seed=seed, protected=p)),
    ):
        if not enabled:
            continue
        dup_of = finder(keys["key"], protected)
        keep = [j for j, d in enumerate(dup_of) if d is None]
        alive = _pick(alive, keep)
        keys = {k: _pick(v, keep) for k, v in keys.items()}
        protected = _pick(protected, keep)
        steps.append((name.replace("_", " "), len(alive), {name: len(dup_of) - len(keep)}))

    # Split rows of training sources by the hash of their content (of their prompt, for preference
    # data), stratified by label when classifying.
    to_split = [j for j, s in enumerate(keys["split"]) if s == ""]
    assigned = assign_splits(
        _pick(keys["group"], to_split), seed,
        val_ratio=cfg.val_ratio if not cfg.validation else 0.0, test_ratio=cfg.test_ratio if not cfg.test else 0.0,
        labels=_pick(keys["label"], to_split) if label_names else None,
    )
    split_of = list(keys["split"])
    for j, s in zip(to_split, assigned):
        split_of[j] = s
    by_split = {s: [alive[j] for j, sp in enumerate(split_of) if sp == s] for s in SPLIT_NAMES}
    steps.append(("split", len(alive), {}))

    rng = random.Random(seed)
    train_idx = by_split["train"]
    weights = {i: src.weight for i, (src, _) in enumerate(sources)}
    if any(w != 1.0 for w in weights.values()):
        per_source: dict[int, list[int]] = {}
        for idx, src in zip(train_idx, _pick(encoded.column("source").to_pylist(), train_idx)):
            per_source.setdefault(src, []).append(idx)
        train_idx = _mix(per_source, weights, rng)
        steps.append(("mix sources by weight", len(train_idx), {}))

    augment_from = train_idx  # EDA copies are made of the mixed rows, before class balancing
    weights_out = None
    if label_names and cfg.balance in ("oversample", "undersample"):
        train_idx = _pick(train_idx, resample_indices(_pick(encoded.column("label").to_pylist(), train_idx),
                                                      cfg.balance, seed))
        steps.append((cfg.balance, len(train_idx), {}))
    elif label_names and cfg.balance == "class_weights":
        weights_out = class_weights(_pick(encoded.column("label").to_pylist(), train_idx), len(label_names))

    # Train rows: the kept encoded rows, then the EDA copies (encoded the same way).
    train_parts = [(encoded, train_idx)]
    if cfg.augment.copies > 0:
        extra = _augment(raw, augment_from, cfg, tokenizer, label_names, seed, workdir)
        train_parts.append((extra, range(extra.num_rows)))
        steps.append(("augment (EDA)", len(train_idx) + extra.num_rows, {}))
    n_train = sum(len(rows) for _, rows in train_parts)
    if n_train == 0:
        hint = (f"; {reasons['too_long']} rows had no trained token left within data.max_seq_len={cfg.max_seq_len}: "
                "raise it" if reasons.get("too_long") else "")
        raise DataError(f"data.train: no usable training examples ({dict(reasons)}){hint}")
    # computed while encoding: no need to pull token lists into Python
    lengths = [n for table, rows in train_parts for n in _pick(table.column("n_tokens").to_pylist(), rows)]

    columns = SPLIT_COLUMNS[cfg.format]
    split_features = Features({name: ENCODED_FEATURES[name] for name in columns})
    out_dir.mkdir(parents=True, exist_ok=True)
    # (pairs, and GRPO's completions: packed per batch)
    packed = cfg.packing and cfg.format not in ("classification", "prompt", *PREFERENCE_FORMATS)
    _write_split(workdir / "train.arrow" if packed else out_dir / "train.arrow", split_features,
                 (batch for table, rows in train_parts for batch in _take(table, rows, columns)))
    for name in ("validation", "test"):
        _write_split(out_dir / f"{name}.arrow", split_features, _take(encoded, by_split[name], columns))
    if packed:
        from dtrain.data.packing import pack_examples

        bins = pack_examples(lengths, cfg.max_seq_len, shuffle_seed=seed)
        examples = Dataset.from_file(str(workdir / "train.arrow")).data.table
        _write_split(out_dir / "train.arrow", PACKED_FEATURES, _packed_rows(examples, bins))
        steps.append(("pack", len(bins), {}))
    if cfg.format == "unpaired_preference":
        for name in SPLIT_NAMES:
            _add_mismatched(out_dir / f"{name}.arrow", cfg.max_seq_len)
    skipped = list(malformed) if cfg.on_error == "skip" else []
    splits = {name: Dataset.from_file(str(out_dir / f"{name}.arrow")) for name in SPLIT_NAMES}
    return PreparedData(splits["train"], splits["validation"], splits["test"], label_names, weights_out, packed,
                        steps, skipped, lengths, truncated)


def _pick(values: SequenceOf[Any], indices: Iterable[int]) -> list[Any]:
    return [values[i] for i in indices]


def _take(table: pa.Table, indices: SequenceOf[int], columns: list[str],
          batch_rows: int = 1000) -> Iterator[pa.RecordBatch]:
    """Rows `indices` (any order, repeats allowed) of `columns`, as record batches of at most
    `batch_rows` rows.

    pa.Table.take would first concatenate every chunk of a list column: time in the size of
    the whole table for each call, and int32 offsets that overflow past 2**31 tokens. Here each
    batch takes from the chunks its rows live in, then restores their order if it changed.
    """
    chunks = table.select(columns).to_batches()
    starts = np.cumsum([0] + [c.num_rows for c in chunks])
    indices = np.asarray(indices, dtype=np.int64)
    for lo in range(0, len(indices), batch_rows):
        part = indices[lo:lo + batch_rows]
        chunk_of = np.searchsorted(starts, part, side="right") - 1
        order = np.argsort(chunk_of, kind="stable")  # rows grouped by chunk, in this order
        pieces = [chunks[c].take(pa.array(part[order][chunk_of[order] == c] - starts[c]))
                  for c in np.unique(chunk_of)]
        if np.all(order[1:] > order[:-1]):  # chunk by chunk already (as when indices ascend)
            yield from pieces
            continue
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        yield from pa.Table.from_batches(pieces, schema=chunks[0].schema).take(pa.array(restore)).to_batches()


def _packed_rows(examples: pa.Table, bins: list[list[int]], bins_per_batch: int = 256) -> Iterator[pa.RecordBatch]:
    """One row per bin: its examples' input_ids and labels concatenated, and their lengths (seq_lens)."""
    for lo in range(0, len(bins), bins_per_batch):
        group = bins[lo:lo + bins_per_batch]
        taken = pa.Table.from_batches(list(_take(examples, [i for b in group for i in b], ["input_ids", "labels"])))
        ids = taken.column("input_ids").combine_chunks()
        labels = taken.column("labels").combine_chunks()
        seq_lens = np.diff(ids.offsets.to_numpy())  # examples' lengths, in bin order
        bin_ends = np.cumsum([len(b) for b in group])
        example_offsets = np.concatenate([[0], bin_ends]).astype(np.int32)
        token_offsets = np.concatenate([[0], np.cumsum(seq_lens)[bin_ends - 1]]).astype(np.int32)
        yield pa.RecordBatch.from_arrays([
            pa.ListArray.from_arrays(pa.array(token_offsets), ids.flatten()),
            pa.ListArray.from_arrays(pa.array(token_offsets), labels.flatten()),
            pa.ListArray.from_arrays(pa.array(example_offsets), pa.array(seq_lens.astype(np.int32))),
        ], schema=PACKED_FEATURES.arrow_schema)


def _add_mismatched(path: Path, max_seq_len: int) -> None:
    """KTO's mismatched sequences, as columns kl_ids / kl_labels of an unpaired split: each row's
    prompt with the next row's completion (the last row's: the first's), cut to max_seq_len. Fixed
    with the data, so that the KL estimate of a batch does not depend on how it is split."""
    table = Dataset.from_file(str(path)).data.table
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    kl_ids, kl_labels = [], []
    for i in range(len(ids)):
        j = (i + 1) % len(ids)
        prompt, start = prompt_length(labels[i]), prompt_length(labels[j])
        sequence = (ids[i][:prompt] + ids[j][start:])[:max_seq_len]
        kl_ids.append(sequence)
        kl_labels.append([IGNORE_INDEX] * min(prompt, len(sequence)) + sequence[prompt:])
    features = Features({**{name: ENCODED_FEATURES[name] for name in SPLIT_COLUMNS["unpaired_preference"]},
                         "kl_ids": Sequence(Value("int32")), "kl_labels": Sequence(Value("int32"))})
    table = table.append_column("kl_ids", pa.array(kl_ids, pa.list_(pa.int32()))).append_column(
        "kl_labels", pa.array(kl_labels, pa.list_(pa.int32())))
    tmp = path.with_suffix(".kl.arrow")
    _write_split(tmp, features, table.to_batches())
    os.replace(tmp, path)


def _write_split(path: Path, features: Features, batches: Iterable[pa.RecordBatch]) -> None:
    """An Arrow stream file, as Dataset.from_file memory-maps it; the schema carries the features."""
    schema = features.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))


def _augment(raw: Dataset, train_idx: list[int], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
             label_names: list[str] | None, seed: int, workdir: Path) -> pa.Table:
    """EDA copies of the training rows' text fields (train split only), encoded like the originals;
    the kept ones, as ENCODED_FEATURES rows."""
    from dtrain.data.augment import eda, load_synonym_file, load_wordnet

    a = cfg.augment
    synonyms = load_wordnet() if a.synonyms == "wordnet" else load_synonym_file(a.synonyms)
    fields = a.fields or (_text_fields(cfg)[0] if cfg.format != "alpaca" else [cfg.instruction_field])
    plain = plain_fields(cfg)

    def copies() -> Iterator[pa.RecordBatch]:
        schema = raw_features(plain).arrow_schema
        columns: dict[str, list] = {name: [] for name in schema.names}
        for batch in _take(raw.data.table, train_idx, raw.column_names):
            batch = pa.Table.from_batches([batch])
            for row, where, source in zip(_raw_rows_of(batch), batch.column("where").to_pylist(),
                                          batch.column("source").to_pylist()):
                for c in range(a.copies):
                    rng = random.Random(f"{seed}:{where}:{c}")
                    new = dict(row)
                    for name in fields:
                        if isinstance(new.get(name), str):
                            new[name] = eda(new[name], rng, synonyms, p_replace=a.p_replace, p_insert=a.p_insert,
                                            p_swap=a.p_swap, p_delete=a.p_delete)
                    _add_raw_row(columns, f"{where} (augmented {c + 1})", new, source, "train", plain)
            yield pa.RecordBatch.from_pydict(columns, schema=schema)
            columns = {name: [] for name in schema.names}

    extra_raw = _write_raw(copies(), workdir / "augment-raw.arrow", raw_features(plain))
    extra = _encode(extra_raw, cfg, tokenizer, label_names, workdir / "augment-encoded.arrow")
    return extra.filter(pc.is_null(extra.column("drop")))


# --------------------------------------------------------------------------------------
# Cache


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, rows_per_file: int | None) -> str:
    """Hash of the inputs' content and of every option that changes the prepared data."""
    h = hashlib.sha256()
    options = cfg.model_dump(mode="json", exclude={"cache_dir", "num_proc", "shuffle"})
    h.update(json.dumps([PIPELINE_VERSION, options, seed, rows_per_file], sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(str(tokenizer.chat_template).encode())
    from dtrain.data.sources import is_sql_source

    for src, _ in all_sources(cfg):
        if src.path is None or is_sql_source(src.path):
            # A database is not hashed: the cache is rebuilt when the URL or query changes.
            h.update(f"{src.path}\x00{src.url}\x00{src.query}".encode())
            continue
        p = Path(src.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            _file_digest(f, h)
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DTRAIN_CACHE", Path.home() / ".cache" / "dtrain")) / "data"


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                 rows_per_file: int | None = None, use_cache: bool = True) -> PreparedData:
    """Prepared splits for this config: from the cache when its key matches, else built and cached."""
    import sys

    import datasets

    if not sys.stderr.isatty():  # progress bars only where a person watches
        datasets.disable_progress_bars()
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    check_sources(cfg)
    key = cache_key(cfg, tokenizer, seed, rows_per_file)
    final = root / key
    if use_cache and (final / "meta.json").is_file():
        try:
            return _load_cached(final)
        except (KeyError, ValueError, OSError) as exc:  # written by another dtrain version, or damaged
            log.warning("data cache entry %s is unreadable (%s); rebuilding it", final, exc)
            use_cache = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=root))
        probe.rmdir()
    except OSError as exc:
        key = "data.cache_dir" if cfg.cache_dir else "the DTRAIN_CACHE environment variable (default ~/.cache/dtrain)"
        raise DataError(f"the prepared-data cache {root} cannot be written ({exc.strerror}): point {key} at a "
                        "writable directory") from None
    log.info("preparing the data into the cache %s (later runs with the same data settings reuse it)", final)
    # Named before it exists and made inside the try: a preemption signal (an exception raised
    # anywhere, mkdir included) then never leaves a half-built entry behind.
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        data = build(cfg, tokenizer, seed, tmp / "work", tmp, rows_per_file)
        meta = {"sizes": {n: len(getattr(data, n)) for n in SPLIT_NAMES}, "label_names": data.label_names,
                "class_weights": data.class_weights, "packed": data.packed, "steps": data.steps,
                "skipped": data.skipped, "lengths_before_packing": data.lengths_before_packing,
                "truncated": data.truncated}
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(tmp / "work", ignore_errors=True)
        if final.exists() and use_cache:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if final.exists():  # use_cache=False: this fresh build replaces the old entry
                stale = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=root))
                os.rename(final, stale / "entry")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = _load_cached(final)
    result.from_cache = False
    return result


def _load_cached(path: Path) -> PreparedData:
    meta = json.loads((path / "meta.json").read_text())
    splits = {name: Dataset.from_file(str(path / f"{name}.arrow")) for name in SPLIT_NAMES}
    for name, ds in splits.items():
        if len(ds) != meta["sizes"][name]:
            raise ValueError(f"{name}.arrow holds {len(ds)} rows, meta.json says {meta['sizes'][name]}")
    return PreparedData(
        splits["train"], splits["validation"], splits["test"], meta["label_names"], meta["class_weights"],
        meta["packed"], [tuple(s) for s in meta["steps"]], meta["skipped"], meta["lengths_before_packing"],
        meta["truncated"], cache_path=str(path), from_cache=True,
    )
