"""The data stage: sources -> clean -> encode -> dedup -> split -> mix/balance/augment -> pack.

Rows stream from the sources into Arrow (a `datasets.Dataset` on disk, memory-mapped), and
cleaning + tokenization run as one batched, optionally multi-process `map`; only the short
content keys used for deduplication and splitting are held in memory. Every step counts
what it drops and why (`PreparedData.steps`), which the report renders.

The result is cached under a key derived from the inputs' content and every option that
affects it (`cache_key`): an unchanged run reuses it, a changed file or option rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datasets import Dataset, Features, Sequence, Value, load_from_disk
from transformers import PreTrainedTokenizerBase

from dtrain.config import DataConfig, SourceConfig
from dtrain.data import clean
from dtrain.data.balance import class_weights, resample_indices
from dtrain.data.formats import Encoder, RowError, TooLong
from dtrain.data.sources import DataError, check_source, iter_rows

log = logging.getLogger(__name__)

PIPELINE_VERSION = "2"  # bump when the pipeline's output or cache layout changes for the same inputs

RAW_FEATURES = Features({
    "row": Value("string"), "where": Value("string"), "source": Value("int32"),
    "split": Value("string"), "error": Value("string"),
})
ENCODED_FEATURES = Features({
    "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")), "label": Value("int32"),
    "key": Value("string"), "where": Value("string"), "source": Value("int32"), "split": Value("string"),
    "drop": Value("string"), "truncated": Value("bool"), "n_tokens": Value("int32"),
})


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


def _iter_source(src: SourceConfig) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    if src.path is not None:
        return iter_rows(src.path)
    from dtrain.data.sources import iter_sql_rows

    return iter_sql_rows(src.url, src.query)


def _raw_rows(sources: list[tuple[SourceConfig, str]], rows_per_file: int | None) -> Iterator[dict[str, Any]]:
    for index, (src, split) in enumerate(sources):
        for n, (where, row) in enumerate(_iter_source(src)):
            if rows_per_file is not None and n >= rows_per_file:
                break
            if isinstance(row, RowError):
                yield {"row": None, "where": where, "source": index, "split": split, "error": str(row)}
            else:
                yield {"row": json.dumps(row, default=str), "where": where, "source": index, "split": split,
                       "error": None}


# --------------------------------------------------------------------------------------
# Clean + encode (one batched map)


def _text_fields(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(all text fields, completion fields) of the format; chat is handled by message content."""
    if cfg.format == "alpaca":
        return [cfg.instruction_field, cfg.input_field, cfg.output_field], [cfg.output_field]
    return [cfg.text_field], [cfg.text_field]


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
            row[name] = norm(row[name])
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


def content_key(row: dict[str, Any], cfg: DataConfig) -> str:
    """The text that identifies a row for dedup and split assignment (label excluded)."""
    if cfg.format == "chat":
        messages = row.get(cfg.messages_field) or []
        return "\x1e".join(f"{m.get('role')}:{m.get('content')}" for m in messages if isinstance(m, dict))
    fields, _ = _text_fields(cfg)
    return "\x1f".join(str(row.get(name) or "") for name in fields)


def _clean_and_encode(batch: dict[str, list], *, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                      label_names: list[str] | None) -> dict[str, list]:
    phrases = tuple(cfg.clean.boilerplate_phrases or clean.DEFAULT_BOILERPLATE)
    encoder = Encoder(cfg, tokenizer, label_names)
    n = len(batch["where"])
    out: dict[str, list] = {k: [None] * n for k in ENCODED_FEATURES}
    out.update(where=batch["where"], source=batch["source"], split=batch["split"])
    rows, wheres, todo = [], [], []
    for i in range(n):
        if batch["error"][i] is not None:
            out["drop"][i] = "malformed:" + batch["error"][i]
            continue
        row = json.loads(batch["row"][i])
        reason = _clean_row(row, cfg, phrases)
        out["key"][i] = content_key(row, cfg)
        if reason:
            out["drop"][i] = reason
            continue
        rows.append(row)
        wheres.append(batch["where"][i])
        todo.append(i)
    for i, result in zip(todo, encoder.encode_many(rows, wheres)):
        if isinstance(result, RowError):
            out["drop"][i] = f"malformed:{result}"
        elif isinstance(result, TooLong):
            out["drop"][i] = "too_long"
        else:
            n_tokens = len(result.input_ids)
            out["n_tokens"][i] = n_tokens
            if n_tokens < cfg.clean.min_tokens:
                out["drop"][i] = "min_tokens"
            elif cfg.clean.max_tokens is not None and n_tokens > cfg.clean.max_tokens:
                out["drop"][i] = "max_tokens"
            out["input_ids"][i] = result.input_ids
            out["truncated"][i] = result.truncated
            if isinstance(result.labels, list):
                out["labels"][i] = result.labels
            else:
                out["label"][i] = result.labels
    return out


# --------------------------------------------------------------------------------------
# The stage


def label_names_of(cfg: DataConfig, rows_per_file: int | None = None) -> list[str]:
    """The label set: data.labels, or every label in the training sources, sorted."""
    if cfg.labels:
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


def build(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, workdir: Path,
          rows_per_file: int | None = None) -> PreparedData:
    """Run every step of the stage; Arrow files go under `workdir`."""
    from dtrain.data.split import assign_splits

    check_sources(cfg)
    sources = all_sources(cfg)
    label_names = label_names_of(cfg, rows_per_file) if cfg.format == "classification" else None
    steps: list[tuple[str, int, dict[str, int]]] = []

    raw = _write_raw(_raw_rows(sources, rows_per_file), workdir / "raw.arrow")
    if len(raw) == 0:
        raise DataError(f"data: the sources {[_source_name(s) for s, _ in sources]} hold no rows")
    steps.append(("read", len(raw), {}))
    encoded = raw.map(
        _clean_and_encode, batched=True, batch_size=1000, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=raw.column_names, features=ENCODED_FEATURES, desc="clean + tokenize",
        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "label_names": label_names},
        cache_file_name=str(workdir / "encoded.arrow"),
    )

    # Malformed rows fail the run (naming file and line) or are skipped and counted.
    drops = column(encoded, "drop")
    malformed = [d.removeprefix("malformed:") for d in drops if d and d.startswith("malformed:")]
    if malformed and cfg.on_error == "fail":
        more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
        raise DataError(f"{malformed[0]}{more}; set data.on_error=skip to skip and count such rows")
    reasons = Counter("malformed" if d.startswith("malformed:") else d for d in drops if d)
    alive = [i for i, d in enumerate(drops) if d is None]
    truncated = sum(1 for i, t in enumerate(column(encoded, "truncated")) if t and drops[i] is None)
    steps.append(("clean + tokenize", len(alive), dict(reasons)))

    # Dedup within and across splits: rows of explicit validation/test sources win, so a
    # training row that repeats one of them is the one removed (nothing leaks).
    view = encoded.select_columns(["key", "split", "label"]).select(alive)
    keys = {name: column(view, name) for name in ("key", "split", "label")}
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
        alive = [alive[j] for j in keep]
        keys = {k: [v[j] for j in keep] for k, v in keys.items()}
        protected = [protected[j] for j in keep]
        steps.append((name.replace("_", " "), len(alive), {name: len(dup_of) - len(keep)}))

    # Split rows of training sources by content hash (stratified by label when classifying).
    to_split = [j for j, s in enumerate(keys["split"]) if s == ""]
    assigned = assign_splits(
        [keys["key"][j] for j in to_split], seed,
        val_ratio=cfg.val_ratio if not cfg.validation else 0.0, test_ratio=cfg.test_ratio if not cfg.test else 0.0,
        labels=[keys["label"][j] for j in to_split] if label_names else None,
    )
    split_of = list(keys["split"])
    for j, s in zip(to_split, assigned):
        split_of[j] = s
    by_split = {s: [alive[j] for j, sp in enumerate(split_of) if sp == s] for s in ("train", "validation", "test")}
    steps.append(("split", len(alive), {}))

    rng = random.Random(seed)
    train_idx = by_split["train"]
    weights = {i: src.weight for i, (src, _) in enumerate(sources)}
    if any(w != 1.0 for w in weights.values()):
        sources_of = column(encoded.select(train_idx), "source")
        per_source: dict[int, list[int]] = {}
        for idx, src in zip(train_idx, sources_of):
            per_source.setdefault(src, []).append(idx)
        train_idx = _mix(per_source, weights, rng)
        steps.append(("mix sources by weight", len(train_idx), {}))

    train = encoded.select(train_idx)
    weights_out = None
    if label_names and cfg.balance in ("oversample", "undersample"):
        train = train.select(resample_indices(column(train, "label"), cfg.balance, seed))
        steps.append((cfg.balance, len(train), {}))
    elif label_names and cfg.balance == "class_weights":
        weights_out = class_weights(column(train, "label"), len(label_names))

    if cfg.augment.copies > 0:
        train = _augment(train, raw, train_idx, cfg, tokenizer, label_names, seed, workdir)
        steps.append(("augment (EDA)", len(train), {}))

    columns = ["input_ids", "labels"] if not label_names else ["input_ids", "label"]
    splits = {
        "train": train.select_columns(columns),
        "validation": encoded.select(by_split["validation"]).select_columns(columns),
        "test": encoded.select(by_split["test"]).select_columns(columns),
    }
    if len(splits["train"]) == 0:
        raise DataError(f"data.train: no usable training examples ({dict(reasons)})")
    lengths = column(train, "n_tokens")  # computed while encoding: no need to pull token lists into Python
    packed = False
    if cfg.packing and not label_names:
        from dtrain.data.packing import pack_examples

        bins = pack_examples(lengths, cfg.max_seq_len, shuffle_seed=seed)
        splits["train"] = _materialise_bins(splits["train"], bins, workdir)
        packed = True
        steps.append(("pack", len(splits["train"]), {}))
    skipped = list(malformed) if cfg.on_error == "skip" else []
    return PreparedData(splits["train"], splits["validation"], splits["test"], label_names, weights_out, packed,
                        steps, skipped, lengths, truncated)


def _write_raw(rows: Iterator[dict[str, Any]], path: Path, batch_size: int = 2000) -> Dataset:
    """Stream rows into an Arrow file in record batches, then memory-map it as a Dataset.

    (Dataset.from_generator encodes every row through `Features` one by one, which costs
    more than parsing the rows; these columns are plain strings and ints.)
    """
    import pyarrow as pa

    schema = RAW_FEATURES.arrow_schema
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: dict[str, list] = {name: [] for name in schema.names}
        for row in rows:
            for name in schema.names:
                batch[name].append(row[name])
            if len(batch["where"]) >= batch_size:
                writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
                batch = {name: [] for name in schema.names}
        if batch["where"]:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    return Dataset.from_file(str(path))


def column(ds: Dataset, name: str) -> list:
    """A whole column as a Python list, through Arrow (iterating a datasets Column formats row by row)."""
    return ds.with_format("arrow")[name].to_pylist()


def _from_generator(fn: Any, features: Features, cache_dir: Path, **kwargs: Any) -> Dataset:
    """Dataset.from_generator, re-raising our own errors (file, line, field) unwrapped."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(fn, features=features, cache_dir=str(cache_dir), **kwargs)
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, (DataError, RowError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _materialise_bins(train: Dataset, bins: list[list[int]], workdir: Path) -> Dataset:
    def rows() -> Iterator[dict[str, Any]]:
        for b in bins:
            items = train[b]  # one Arrow take per bin
            ids, labels, lens = [], [], []
            for ex_ids, ex_labels in zip(items["input_ids"], items["labels"]):
                ids += ex_ids
                labels += ex_labels
                lens.append(len(ex_ids))
            yield {"input_ids": ids, "labels": labels, "seq_lens": lens}

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "seq_lens": Sequence(Value("int32"))})
    return _from_generator(rows, features, workdir / "packed")


def _augment(train: Dataset, raw: Dataset, train_idx: list[int], cfg: DataConfig,
             tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None, seed: int, workdir: Path) -> Dataset:
    """EDA copies of the training rows' text fields (train split only), encoded like the originals."""
    from datasets import concatenate_datasets

    from dtrain.data.augment import eda, load_synonym_file, load_wordnet

    a = cfg.augment
    synonyms = load_wordnet() if a.synonyms == "wordnet" else load_synonym_file(a.synonyms)
    fields = a.fields or (_text_fields(cfg)[0] if cfg.format != "alpaca" else [cfg.instruction_field])
    original_rows = raw.select(train_idx)

    def copies() -> Iterator[dict[str, Any]]:
        for i, record in enumerate(original_rows):
            row = json.loads(record["row"])
            for c in range(a.copies):
                rng = random.Random(f"{seed}:{record['where']}:{c}")
                new = dict(row)
                for name in fields:
                    if isinstance(new.get(name), str):
                        new[name] = eda(new[name], rng, synonyms, p_replace=a.p_replace, p_insert=a.p_insert,
                                        p_swap=a.p_swap, p_delete=a.p_delete)
                yield {"row": json.dumps(new), "where": f"{record['where']} (augmented {c + 1})",
                       "source": record["source"], "split": "train", "error": None}

    extra_raw = _from_generator(copies, RAW_FEATURES, workdir / "augment")
    extra = extra_raw.map(_clean_and_encode, batched=True, remove_columns=extra_raw.column_names,
                          features=ENCODED_FEATURES,
                          fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "label_names": label_names})
    extra = extra.filter(lambda d: d is None, input_columns="drop")
    return concatenate_datasets([train, extra])


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        data = build(cfg, tokenizer, seed, tmp / "work", rows_per_file)
        for name in ("train", "validation", "test"):
            getattr(data, name).save_to_disk(str(tmp / name))
        meta = {"features": {n: getattr(data, n).features.to_dict() for n in ("train", "validation", "test")},
                "sizes": {n: len(getattr(data, n)) for n in ("train", "validation", "test")},"label_names": data.label_names, "class_weights": data.class_weights, "packed": data.packed,
                "steps": data.steps, "skipped": data.skipped, "lengths_before_packing": data.lengths_before_packing,
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
    # datasets cannot reload a saved empty split: rebuild those from their features
    splits = {name: load_from_disk(str(path / name)) if meta["sizes"][name]
              else Dataset.from_dict({k: [] for k in meta["features"][name]}, features=Features.from_dict(meta["features"][name]))
              for name in ("train", "validation", "test")}
    return PreparedData(
        splits["train"], splits["validation"], splits["test"], meta["label_names"], meta["class_weights"],
        meta["packed"], [tuple(s) for s in meta["steps"]], meta["skipped"], meta["lengths_before_packing"],
        meta["truncated"], cache_path=str(path), from_cache=True,
    )
