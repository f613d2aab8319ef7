"""The data stage: sources -> clean -> formats (exact token ids and label masks) -> dedup -> splits -> batches.

Token ids are computed independently of the tokenizer where possible: the shipped byte
tokenizer maps each UTF-8 byte to 4 + (rank of its GPT-2 byte symbol), BOS=1, EOS=2, PAD=0.

`prepare_data` returns Arrow datasets (columns input_ids + labels, or input_ids + label);
tests that need every row in train, in file order, set val_ratio = test_ratio = 0.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ALPACA, CHAT, CLASSIFICATION, TEXT, write_jsonl
from dtrain.config import DataConfig
from dtrain.data import IGNORE_INDEX, BatchIterator, DataError, Example, collate, prepare_data
from dtrain.data.formats import ALPACA_PROMPT, Encoder, TooLong, alpaca_prompt
from dtrain.data.loader import eval_batches
from dtrain.data.sources import iter_rows
from dtrain.data.split import assign_splits, unit_hash
from dtrain.presets import byte_tokenizer

PAD, BOS, EOS = 0, 1, 2
M = IGNORE_INDEX
SPLITS = ("train", "validation", "test")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_B2U = _bytes_to_unicode()
_ALPHABET = sorted(_B2U.values())
BYTE_ID = {b: 4 + _ALPHABET.index(u) for b, u in _B2U.items()}


def byte_ids(text: str) -> list[int]:
    return [BYTE_ID[b] for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tok():
    from dtrain.presets import byte_tokenizer

    return byte_tokenizer()


def dcfg(**kw) -> DataConfig:
    return DataConfig.model_validate(kw)


def prep(tok, paths, seed: int = 0, *, rows_per_file: int | None = None, use_cache: bool = True, **kw):
    """prepare_data on these training sources; everything stays in train unless ratios are given."""
    paths = [p if isinstance(p, dict) else str(p) for p in (paths if isinstance(paths, list) else [paths])]
    kw.setdefault("val_ratio", 0.0)
    kw.setdefault("test_ratio", 0.0)
    return prepare_data(dcfg(train=paths, **kw), tok, seed, rows_per_file=rows_per_file, use_cache=use_cache)


def col(ds, name: str) -> list:
    """A column of a prepared split as a plain list."""
    return list(ds[name])


def examples(ds) -> list[Example]:
    """The rows of a prepared split as Examples (labels: token list, or class index)."""
    labels = col(ds, "labels" if "labels" in ds.column_names else "label")
    return [Example(ids, lab) for ids, lab in zip(col(ds, "input_ids"), labels)]


def pairs(ds) -> list[tuple[list[int], list[int] | int]]:
    return [(ex.input_ids, ex.labels) for ex in examples(ds)]


def trained_spans(tok, ex: Example) -> list[str]:
    """Decode each contiguous run of trained labels (special tokens kept)."""
    spans, cur = [], []
    for label in ex.labels:
        if label == M:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(label)
    if cur:
        spans.append(cur)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


ROWS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Subtract.", "input": "10 - 4", "output": "6"},
    {"instruction": "Échelle?", "input": "ü", "output": "ñé"},
]


def expected_alpaca(row: dict) -> tuple[list[int], list[int]]:
    prompt_ids = [BOS] + byte_ids(alpaca_prompt(row["instruction"], row.get("input")))
    completion_ids = byte_ids(row["output"]) + [EOS]
    return prompt_ids + completion_ids, [M] * len(prompt_ids) + completion_ids


def alpaca_key(row: dict) -> str:
    """The content key of an alpaca row (dedup + split): its three text fields joined by U+001F."""
    return "\x1f".join([row["instruction"], row.get("input") or "", row["output"]])


def dedup_first(rows: list, key) -> list:
    """Rows whose key (casefolded, whitespace collapsed) is seen for the first time, in order."""
    seen, out = set(), []
    for r in rows:
        k = " ".join(key(r).casefold().split())
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def by_split(rows: list, keys: list[str], seed: int, val: float, test: float, labels=None) -> dict[str, list]:
    """The rows of each split, in file order, as the hash split assigns them."""
    assigned = assign_splits(keys, seed, val_ratio=val, test_ratio=test, labels=labels)
    return {s: [r for r, a in zip(rows, assigned) if a == s] for s in SPLITS}


NO_DROPS_STEPS = lambda n: [("read", n, {}), ("clean + tokenize", n, {}),  # noqa: E731
                            ("exact duplicate", n, {"exact_duplicate": 0}), ("split", n, {})]


# --------------------------------------------------------------------------------------
# The tokenizer the expectations rest on


def test_byte_tokenizer_ids_are_the_byte_table(tok):
    for text in ["a", "Hello, world!", " 12 + 3\n", "ünï ✓ 😀"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == byte_ids(text)
        assert tok(text)["input_ids"] == [BOS] + byte_ids(text)
    assert byte_ids("a!~") == [ord("a") - 29, ord("!") - 29, ord("~") - 29]  # printable ASCII: symbol == byte
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    assert len(tok) == 260


# --------------------------------------------------------------------------------------
# alpaca: completion-only masking, exact


def test_alpaca_prompt_text():
    assert alpaca_prompt("Do it.", None) == ALPACA_PROMPT.format(instruction="Do it.")
    assert alpaca_prompt("Do it.", "") == alpaca_prompt("Do it.", None)
    p = alpaca_prompt("Add.", "2 + 3")
    assert p.endswith("### Instruction:\nAdd.\n\n### Input:\n2 + 3\n\n### Response:\n")
    assert "paired with an input" in p and "paired with an input" not in alpaca_prompt("Add.", None)


def test_alpaca_labels_exact(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    data = prep(tok, path)
    assert data.stats == {"rows": 4, "exact_duplicate": 0}
    assert data.steps == NO_DROPS_STEPS(4)
    assert (len(data.train), len(data.validation), len(data.test)) == (4, 0, 0)
    assert data.train.column_names == ["input_ids", "labels"] and data.label_names is None
    assert not data.packed and data.skipped == [] and data.class_weights is None
    for row, ex in zip(ROWS, examples(data.train)):
        ids, labels = expected_alpaca(row)
        assert ex.input_ids == ids
        assert ex.labels == labels
        assert ex.input_ids[0] == BOS and ex.labels[-1] == EOS and ex.input_ids[-1] == EOS
    assert data.lengths_before_packing == [len(expected_alpaca(r)[0]) for r in ROWS]
    # the same ids as the tokenizer's own, row 0 spelled out
    prompt = alpaca_prompt("Add the numbers.", "2 + 3")
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok("5", add_special_tokens=False)["input_ids"]
    assert completion_ids == [ord("5") - 29]
    assert data.train[0]["labels"] == [M] * len(prompt_ids) + completion_ids + [EOS]
    assert len(prompt_ids) == len(prompt.encode()) + 1
    assert data.summary() == "data: 4 rows -> 4 train / 0 validation / 0 test examples; dropped: none; 0 truncated to max_seq_len"


def test_encoder_alpaca_directly_matches_the_pipeline(tmp_path, tok):
    cfg = dcfg()
    got = Encoder(cfg, tok).encode_many([dict(r) for r in ROWS], [f"f:{i}" for i in range(1, 5)])
    assert [(ex.input_ids, ex.labels, ex.truncated) for ex in got] == [(*expected_alpaca(r), False) for r in ROWS]
    assert Encoder(cfg, tok)(dict(ROWS[0]), "f:1").input_ids == expected_alpaca(ROWS[0])[0]


def test_alpaca_train_on_prompt_labels_equal_ids(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", ROWS), train_on_prompt=True)
    assert len(data.train) == 4
    for row, ex in zip(ROWS, examples(data.train)):
        ids, _ = expected_alpaca(row)
        assert ex.input_ids == ids and ex.labels == ids


def test_alpaca_without_eos(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", ROWS), add_eos=False)
    assert len(data.train) == 4
    for row, ex in zip(ROWS, examples(data.train)):
        ids, labels = expected_alpaca(row)
        assert ex.input_ids == ids[:-1] and ex.labels == labels[:-1]
        assert EOS not in ex.input_ids


def test_alpaca_custom_field_names(tmp_path, tok):
    rows = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in ROWS]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), instruction_field="q", input_field="ctx",
                output_field="a")
    assert pairs(data.train) == [expected_alpaca(r) for r in ROWS]


def test_alpaca_missing_or_empty_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], {"instruction": "x"}, {"instruction": "x", "output": "  "},
                                             {"instruction": 5, "output": "y"}, ROWS[1]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    assert str(info.value) == (f"{path}:2: missing field 'output' (present: ['instruction']) (and 2 more); "
                               "set data.on_error=skip to skip and count such rows")
    data = prep(tok, path, on_error="skip")
    assert data.stats == {"rows": 5, "malformed": 3, "exact_duplicate": 0}
    assert data.steps[1] == ("clean + tokenize", 2, {"malformed": 3})
    assert data.skipped == [
        f"{path}:2: missing field 'output' (present: ['instruction'])",
        f"{path}:3: field 'output' is empty: nothing to train on",
        f"{path}:4: field 'instruction' must be a string, got int",
    ]
    assert col(data.train, "input_ids") == [expected_alpaca(ROWS[0])[0], expected_alpaca(ROWS[1])[0]]


def test_one_malformed_row_message_has_no_count(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], ROWS[1], {"instruction": "x"}])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    assert str(info.value) == (f"{path}:3: missing field 'output' (present: ['instruction']); "
                               "set data.on_error=skip to skip and count such rows")


# --------------------------------------------------------------------------------------
# chat


SYSTEM = {"role": "system", "content": "You are a calculator."}


def test_chat_trains_only_the_assistant_answer_and_eos(tok):
    enc = Encoder(dcfg(format="chat"), tok)
    messages = [SYSTEM, {"role": "user", "content": "What is 71 - 39?"}, {"role": "assistant", "content": "32"}]
    ex = enc({"messages": messages}, "f:1")
    rendered = "<|system|>\nYou are a calculator.\n<|user|>\nWhat is 71 - 39?\n<|assistant|>\n32"
    assert ex.input_ids == [BOS] + byte_ids(rendered) + [EOS]
    n_prompt = 1 + len(byte_ids(rendered)) - 2
    assert ex.labels == [M] * n_prompt + byte_ids("32") + [EOS]
    assert trained_spans(tok, ex) == ["32</s>"]


def test_chat_two_assistant_turns_are_both_trained(tok):
    enc = Encoder(dcfg(format="chat"), tok)
    messages = [SYSTEM, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "times 21?"}, {"role": "assistant", "content": "42"}]
    ex = enc({"messages": messages}, "f:1")
    assert trained_spans(tok, ex) == ["2</s>", "42</s>"]
    assert sum(label != M for label in ex.labels) == 2 + 3
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == (
        "<s><|system|>\nYou are a calculator.\n<|user|>\n1+1?\n<|assistant|>\n2</s>"
        "<|user|>\ntimes 21?\n<|assistant|>\n42</s>"
    )
    assert all(label in (M, t) for label, t in zip(ex.labels, ex.input_ids))


def test_chat_train_on_prompt(tok):
    enc = Encoder(dcfg(format="chat", train_on_prompt=True), tok)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = enc({"messages": messages}, "f:1")
    assert ex.labels == ex.input_ids
    assert ex.input_ids == [BOS] + byte_ids("<|user|>\nhi\n<|assistant|>\nyo") + [EOS]


def test_chat_conversation_ending_with_user_turn_trains_only_assistant(tok):
    enc = Encoder(dcfg(format="chat"), tok)
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "thanks"}]
    ex = enc({"messages": messages}, "f:1")
    assert trained_spans(tok, ex) == ["2</s>"]


def test_chat_through_the_pipeline_equals_the_encoder(tmp_path, tok):
    convs = [[SYSTEM, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "3*3?"}, {"role": "assistant", "content": "9"}]]
    data = prep(tok, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs]), format="chat")
    enc = Encoder(dcfg(format="chat"), tok)
    assert pairs(data.train) == [(e.input_ids, e.labels) for e in (enc({"messages": m}, "f:1") for m in convs)]
    assert [trained_spans(tok, ex) for ex in examples(data.train)] == [["2</s>"], ["yo</s>", "9</s>"]]


def test_chat_bad_rows(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": []},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"conversation": []},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = prep(tok, path, format="chat", on_error="skip")
    assert data.stats == {"rows": 5, "malformed": 4, "exact_duplicate": 0} and len(data.train) == 1
    assert data.skipped[0] == f"{path}:1: no assistant message: nothing to train on"
    assert data.skipped[1].startswith(f"{path}:2: field 'messages' must be a non-empty list")
    assert data.skipped[2].startswith(f"{path}:3: messages[0] must be")
    assert data.skipped[3].startswith(f"{path}:4: missing field 'messages'")
    assert len(data.skipped) == 4
    assert trained_spans(tok, examples(data.train)[0]) == ["b</s>"]
    with pytest.raises(DataError, match=rf"^{path}:1: no assistant message: nothing to train on \(and 3 more\); "):
        prep(tok, path, format="chat")


# --------------------------------------------------------------------------------------
# text


def test_text_labels_equal_ids_with_bos_and_eos(tmp_path, tok):
    texts = ["28 + 82 = 110", "héllo wörld"]
    data = prep(tok, write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), format="text")
    assert len(data.train) == 2
    for text, ex in zip(texts, examples(data.train)):
        assert ex.input_ids == [BOS] + byte_ids(text) + [EOS]
        assert ex.labels == ex.input_ids
    data = prep(tok, write_jsonl(tmp_path / "t2.jsonl", [{"body": texts[0]}]), format="text", text_field="body",
                add_eos=False)
    assert col(data.train, "input_ids") == col(data.train, "labels") == [[BOS] + byte_ids(texts[0])]


def test_text_empty_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "   "}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'text' is empty; set data.on_error=skip"):
        prep(tok, path, format="text")


# --------------------------------------------------------------------------------------
# classification


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_classification_label_index_from_sorted_label_set(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"],
                     [["5 vs 3", "first"], ["1 vs 1", "equal"], ["2 vs 9", "second"], ["7 vs 0", "first"]])
    data = prep(tok, path, format="classification")
    assert data.label_names == ["equal", "first", "second"]
    assert data.train.column_names == ["input_ids", "label"]
    assert col(data.train, "label") == [1, 0, 2, 1]
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(t) for t in ("5 vs 3", "1 vs 1", "2 vs 9", "7 vs 0")]
    assert Counter(col(data.train, "label")) == {0: 1, 1: 2, 2: 1}  # equal=1, first=2, second=1


def test_classification_label_order_from_config(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "first"], ["b", "equal"], ["c", "second"]])
    data = prep(tok, path, format="classification", labels=["second", "first", "equal", "never"])
    assert data.label_names == ["second", "first", "equal", "never"]
    assert col(data.train, "label") == [1, 2, 0]


def test_classification_unknown_label_names_file_line_field(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "first"], ["b", "maybe"], ["c", "second"]])
    with pytest.raises(DataError) as info:
        prep(tok, path, format="classification", labels=["first", "second"])
    assert str(info.value) == (f"{path}:3: field 'label': label 'maybe' is not one of ['first', 'second']; "
                               "set data.on_error=skip to skip and count such rows")


def test_classification_validation_label_unseen_in_train(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "y": "pos"}, {"text": "b", "y": "neg"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "y": "pos"}, {"text": "d", "y": "meh"}])
    with pytest.raises(DataError, match=rf"^{val}:2: field 'y': label 'meh' is not one of \['neg', 'pos'\]"):
        prep(tok, train, format="classification", label_field="y", validation=[str(val)])


def test_classification_non_string_labels_and_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x" * 20, "label": 1}, {"text": "y", "label": 0}])
    data = prep(tok, path, format="classification", max_seq_len=8)
    assert data.label_names == ["0", "1"]
    assert col(data.train, "label") == [1, 0]
    assert col(data.train, "input_ids") == [[BOS] + byte_ids("x" * 7), [BOS, BYTE_ID[ord("y")]]]
    assert data.stats == {"rows": 2, "exact_duplicate": 0}  # truncated, not dropped
    # the truncation flag (the encoder's)
    enc = Encoder(dcfg(format="classification", max_seq_len=8), tok, ["0", "1"])
    got = enc.encode_many([{"text": "x" * 20, "label": 1}, {"text": "y", "label": 0}], ["f:1", "f:2"])
    assert [(e.input_ids, e.labels, e.truncated) for e in got] == [
        ([BOS] + byte_ids("x" * 7), 1, True), ([BOS, BYTE_ID[ord("y")]], 0, False)]


# --------------------------------------------------------------------------------------
# Sources: every file type gives the same rows


def _write_all_sources(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["csv"] = write_csv(tmp_path / "d.csv", list(rows[0]), [list(r.values()) for r in rows])
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["saved"] = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    paths["saved_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(paths["saved_dict"]))
    return paths


def test_every_source_type_loads_the_same_rows(tmp_path, tok):
    paths = _write_all_sources(tmp_path, ROWS)
    expected = [expected_alpaca(r) for r in ROWS]
    for kind, path in paths.items():
        assert [row for _, row in iter_rows(str(path))] == ROWS, kind
        data = prep(tok, path)
        assert pairs(data.train) == expected, kind
        assert data.stats == {"rows": 4, "exact_duplicate": 0}, kind


def test_where_of_each_source(tmp_path):
    paths = _write_all_sources(tmp_path, ROWS)
    where = {kind: [w for w, _ in iter_rows(str(p))] for kind, p in paths.items()}
    assert where["jsonl"] == [f"{paths['jsonl']}:{i}" for i in (1, 2, 3, 4)]
    assert where["csv"] == [f"{paths['csv']}:{i}" for i in (2, 3, 4, 5)]  # line 1 is the header
    # indent=2: "[" on line 1, then each 3-key object takes 5 lines
    assert where["json"] == [f"{paths['json']}:{i}" for i in (2, 7, 12, 17)]
    assert where["parquet"] == [f"{paths['parquet']}:row {i}" for i in (1, 2, 3, 4)]
    assert where["saved"] == [f"{paths['saved']}:row {i}" for i in (1, 2, 3, 4)]


def test_json_array_line_numbers_in_errors(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c"},\n  7,\n'
                    '  {"instruction": "d",\n   "output": "e"}\n]\n')
    assert [w for w, _ in iter_rows(str(path))] == [f"{path}:{i}" for i in (2, 4, 5, 6)]
    data = prep(tok, path, on_error="skip")
    assert data.skipped == [f"{path}:4: missing field 'output' (present: ['instruction'])",
                            f"{path}:5: expected a JSON object"]
    assert [trained_spans(tok, ex) for ex in examples(data.train)] == [["b</s>"], ["e</s>"]]
    with pytest.raises(DataError, match=rf"^{path}:4: missing field 'output' \(present: \['instruction'\]\) "
                                        r"\(and 1 more\); set data.on_error=skip"):
        prep(tok, path)


def test_json_array_syntax_error_line(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        prep(tok, path)
    path.write_text('{"instruction": "a"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON array"):
        prep(tok, path)


def test_source_checks(tmp_path, tok):
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="^data.train: .*plain_dir is a directory but not a datasets.save_to_disk"):
        prep(tok, tmp_path / "plain_dir")
    (tmp_path / "d.xyz").write_text("hello\n")
    with pytest.raises(DataError, match=r"^data.train: .*d.xyz: unsupported file type '.xyz'"):
        prep(tok, tmp_path / "d.xyz")
    with pytest.raises(DataError, match="^data.train: no training sources given"):
        prepare_data(dcfg(train=[]), tok, 0)


def test_txt_source_is_one_text_row_per_paragraph(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("hello\nworld\n\n\nsecond  paragraph\n")
    data = prep(tok, path, format="text")
    assert col(data.train, "input_ids") == [[BOS] + byte_ids("hello\nworld") + [EOS],
                                       [BOS] + byte_ids("second paragraph") + [EOS]]  # whitespace collapsed
    with pytest.raises(DataError, match=rf"^{path}:1: missing field 'instruction' \(present: \['text'\]\) "
                                        r"\(and 1 more\)"):
        prep(tok, path)  # alpaca wants instruction/output


# --------------------------------------------------------------------------------------
# Bad input


def test_truncated_jsonl_line_fails_with_file_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], '{"instruction": "Say hi.", "output": "h', ROWS[2]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: not valid JSON (")
    assert msg.endswith("; set data.on_error=skip to skip and count such rows") and "more)" not in msg


def test_truncated_jsonl_line_error_names_the_unterminated_string(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], '{"instruction": "Say hi.", "output": "h', ROWS[2]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    assert str(info.value) == (f"{path}:2: not valid JSON (Unterminated string starting at, column 38); "
                               "set data.on_error=skip to skip and count such rows")
    data = prep(tok, path, on_error="skip")
    assert data.skipped == [f"{path}:2: not valid JSON (Unterminated string starting at, column 38)"]


def test_truncated_jsonl_line_skipped_and_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], '{"instruction": "Say hi.", "output": "h', ROWS[2], "[1, 2]"])
    data = prep(tok, path, on_error="skip")
    assert data.stats == {"rows": 4, "malformed": 2, "exact_duplicate": 0}
    assert data.steps == [("read", 4, {}), ("clean + tokenize", 2, {"malformed": 2}),
                          ("exact duplicate", 2, {"exact_duplicate": 0}), ("split", 2, {})]
    assert len(data.skipped) == 2
    assert data.skipped[0].startswith(f"{path}:2: not valid JSON (")
    assert data.skipped[1] == f"{path}:4: expected a JSON object per line"
    assert col(data.train, "input_ids") == [expected_alpaca(ROWS[0])[0], expected_alpaca(ROWS[2])[0]]
    assert data.summary() == "data: 4 rows -> 2 train / 0 validation / 0 test examples; dropped: 2 malformed; 0 truncated to max_seq_len"


def test_jsonl_blank_lines_keep_line_numbers(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\r\n\r\n" + json.dumps({"instruction": "x"}) + "\r\n")
    assert [w for w, _ in iter_rows(str(path))] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'output'"):
        prep(tok, path)


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path, tok):
    rows = [{"text": "a\u2028b"}, {"text": "c\x85d"}, {"text": "e"}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert list(iter_rows(str(path))) == [(f"{path}:{i + 1}", r) for i, r in enumerate(rows)]
    # cleaning turns those separators into \n
    data = prep(tok, path, format="text")
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(t) + [EOS] for t in ("a\nb", "c\nd", "e")]


def test_csv_missing_cell_names_file_line_field(tmp_path, tok):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nAdd.,1 + 1,2\nSay hi.\nSub.,3 - 1,2\n")
    with pytest.raises(DataError) as info:
        prep(tok, path)
    # `input` is optional in alpaca; `output` is the missing required field
    assert str(info.value).startswith(f"{path}:3: missing field 'output' (present: ['instruction'])")
    path.write_text("instruction,input,output\nAdd.,1 + 1,2\nSay hi.,\nSub.,3 - 1,2\n")
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'output' \(present: \['input', 'instruction'\]\)"):
        prep(tok, path)


def test_csv_missing_column_names_field(tmp_path, tok):
    path = write_csv(tmp_path / "a.csv", ["instruction", "answer"], [["Add.", "2"]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: missing field 'output'") and "['answer', 'instruction']" in msg


def test_csv_too_many_cells_and_quoted_newlines(tmp_path, tok):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"Two\nlines",ok\nA,b,c\nB,d\n')
    data = prep(tok, path, on_error="skip")
    assert data.skipped == [f"{path}:4: 3 cells but 2 columns"]
    exs = examples(data.train)
    assert [trained_spans(tok, ex) for ex in exs] == [["ok</s>"], ["d</s>"]]
    assert exs[0].input_ids[: len(byte_ids(alpaca_prompt("Two\nlines", None))) + 1] == \
        [BOS] + byte_ids(alpaca_prompt("Two\nlines", None))


def test_empty_file_is_an_error(tmp_path, tok):
    for name in ("e.jsonl", "e.csv", "e.json"):
        path = tmp_path / name
        path.write_text("\n  \n")
        with pytest.raises(DataError, match=rf"^{path}: the file is empty$"):
            prep(tok, path)


def test_non_utf8_bytes_name_file_and_line(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                     b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9\)"):
        prep(tok, path)
    csv_path = tmp_path / "a.csv"
    csv_path.write_bytes(b"instruction,output\n\xff,b\n")
    with pytest.raises(DataError, match=rf"^{csv_path}:2: not valid UTF-8 \(byte 0xff\)"):
        prep(tok, csv_path)


def test_utf8_bom_is_accepted(tmp_path, tok):
    path = tmp_path / "a.csv"
    path.write_bytes("\ufeffinstruction,input,output\nAdd the numbers.,2 + 3,5\n".encode())
    data = prep(tok, path)
    assert pairs(data.train) == [expected_alpaca(ROWS[0])]


def test_missing_data_files_name_the_key(tmp_path, tok):
    with pytest.raises(DataError, match=r"^data.train: file not found: .*nope.jsonl$"):
        prep(tok, tmp_path / "nope.jsonl")
    train = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match=r"^data.validation: file not found: .*val.jsonl$"):
        prep(tok, train, validation=[str(tmp_path / "val.jsonl")])
    with pytest.raises(DataError, match=r"^data.test: file not found: .*test.jsonl$"):
        prep(tok, train, test=[str(tmp_path / "test.jsonl")])


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"^data.train: no usable training examples \(\{'malformed': 2\}\)$"):
        prep(tok, path, on_error="skip")


# --------------------------------------------------------------------------------------
# Truncation to max_seq_len


def _instruction_for_prompt_len(n_tokens: int) -> str:
    """An instruction whose alpaca prompt (with BOS) is exactly n_tokens long."""
    base = 1 + len(alpaca_prompt("", None).encode())
    assert n_tokens > base
    return "x" * (n_tokens - base)


L = 200
TRUNCATION_ROWS = [
    ROWS[1],  # fits
    {"instruction": _instruction_for_prompt_len(L), "output": "12345"},  # completion starts at L: dropped
    {"instruction": _instruction_for_prompt_len(L - 2), "output": "12345"},  # 2 completion tokens kept
    {"instruction": _instruction_for_prompt_len(L + 30), "output": "1"},  # prompt alone too long
    {"instruction": _instruction_for_prompt_len(L - 7), "output": "123456"},  # exactly L with EOS: not truncated
    {"instruction": _instruction_for_prompt_len(L - 1), "output": "9"},  # one trained token, at position L-1
]


def test_encoder_truncation_flags_and_too_long(tok):
    got = Encoder(dcfg(max_seq_len=L), tok).encode_many([dict(r) for r in TRUNCATION_ROWS],
                                                         [f"f:{i}" for i in range(1, 7)])
    assert [type(g).__name__ for g in got] == ["Example", "TooLong", "Example", "TooLong", "Example", "Example"]
    assert [g.truncated for g in got if isinstance(g, Example)] == [False, True, False, True]
    with pytest.raises(TooLong):
        Encoder(dcfg(max_seq_len=L), tok)(dict(TRUNCATION_ROWS[1]), "f:2")


def test_truncation_drops_examples_without_trained_tokens(tmp_path, tok):
    rows = TRUNCATION_ROWS
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), max_seq_len=L)
    assert data.stats == {"rows": 6, "too_long": 2, "exact_duplicate": 0}
    assert data.steps[1] == ("clean + tokenize", 4, {"too_long": 2})
    assert len(data.train) == 4
    fits, partial, exact, last = examples(data.train)
    assert (fits.input_ids, fits.labels) == expected_alpaca({**ROWS[1]})

    assert len(partial.input_ids) == L and len(partial.labels) == L
    assert partial.labels == [M] * (L - 2) + byte_ids("12")
    assert partial.input_ids == expected_alpaca(rows[2])[0][:L]

    assert len(exact.input_ids) == L and exact.input_ids == expected_alpaca(rows[4])[0]
    assert exact.labels[-7:] == byte_ids("123456") + [EOS]

    assert last.labels == [M] * (L - 1) + byte_ids("9")
    assert data.lengths_before_packing == [len(expected_alpaca(ROWS[1])[0]), L, L, L]
    assert data.summary() == "data: 6 rows -> 4 train / 0 validation / 0 test examples; dropped: 2 too_long; 2 truncated to max_seq_len"


def test_truncation_text_format(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "t.jsonl", [{"text": "0123456789" * 3}]), format="text",
                max_seq_len=16)
    ex = examples(data.train)[0]
    assert ex.input_ids == ex.labels == ([BOS] + byte_ids("0123456789" * 3))[:16]
    assert data.stats == {"rows": 1, "exact_duplicate": 0}  # truncated, nothing dropped


# --------------------------------------------------------------------------------------
# Cleaning: normalisation, boilerplate, token-count limits


def test_unicode_and_whitespace_normalisation_is_on_by_default(tmp_path, tok):
    raw = {"instruction": "  Add   the\u00a0numbers.  ", "input": "１２ +\t3", "output": "１５\r\n"}
    path = write_jsonl(tmp_path / "a.jsonl", [raw])
    data = prep(tok, path)
    assert pairs(data.train) == [expected_alpaca({"instruction": "Add the numbers.", "input": "12 + 3",
                                                  "output": "15"})]
    # off: only line breaks (and invisible characters) are normalised
    data = prep(tok, path, clean={"unicode": "none", "whitespace": False})
    assert pairs(data.train) == [expected_alpaca({**raw, "output": "１５\n"})]
    # NFC keeps compatibility characters (full-width digits) but whitespace still collapses
    data = prep(tok, path, clean={"unicode": "NFC"})
    assert pairs(data.train) == [expected_alpaca({"instruction": "Add the numbers.", "input": "１２ + 3",
                                                  "output": "１５"})]


def test_boilerplate_rows_are_dropped_by_default(tmp_path, tok):
    rows = [
        ROWS[0],
        {"instruction": "Capital of France?", "output": "As an AI language model, I cannot browse. It is Paris."},
        {"instruction": "As an AI language model, answer: 1+1?", "output": "2"},  # not in the response: kept
        {"instruction": "Feelings?", "output": "I DON’T have personal   feelings."},  # case, curly ', spaces
        {"instruction": "Q?", "output": "It has an AI model inside."},  # "has an AI" is not "As an AI"
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prep(tok, path)
    assert data.stats == {"rows": 5, "boilerplate": 2, "exact_duplicate": 0}
    assert data.steps[1] == ("clean + tokenize", 3, {"boilerplate": 2})
    assert pairs(data.train) == [expected_alpaca(r) for r in (rows[0], rows[2], rows[4])]
    assert data.skipped == []  # boilerplate is a drop, not a malformed row
    off = prep(tok, path, clean={"boilerplate": "off"})
    assert off.stats == {"rows": 5, "exact_duplicate": 0}
    assert pairs(off.train) == [expected_alpaca({**r, "output": " ".join(r["output"].split())}) for r in rows]


def test_boilerplate_strip_removes_the_sentence(tmp_path, tok):
    rows = [{"instruction": "Capital of France?",
             "output": "As an AI language model, I can't browse. However, it is Paris."},
            ROWS[0]]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), clean={"boilerplate": "strip"})
    assert data.stats == {"rows": 2, "exact_duplicate": 0}
    assert pairs(data.train) == [expected_alpaca({**rows[0], "output": "However, it is Paris."}),
                                 expected_alpaca(ROWS[0])]


def test_boilerplate_custom_phrases(tmp_path, tok):
    rows = [{"instruction": "a", "output": "Great question! 4."}, {"instruction": "b", "output": "As an AI model."}]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), clean={"boilerplate_phrases": ["great question"]})
    assert data.stats == {"rows": 2, "boilerplate": 1, "exact_duplicate": 0}
    assert pairs(data.train) == [expected_alpaca(rows[1])]


def test_boilerplate_strip_of_a_whole_response_drops_the_row(tmp_path, tok):
    rows = [ROWS[0], {"instruction": "Opinion?", "output": "As an AI language model, I have no opinion."}]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), clean={"boilerplate": "strip"})
    assert data.stats == {"rows": 2, "boilerplate": 1, "exact_duplicate": 0}
    assert pairs(data.train) == [expected_alpaca(ROWS[0])]


def test_chat_boilerplate_strip_of_a_whole_answer_drops_the_row(tmp_path, tok):
    convs = [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
             [{"role": "user", "content": "Opinion?"},
              {"role": "assistant", "content": "As an AI language model, I have no opinion."}]]
    data = prep(tok, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs]), format="chat",
                clean={"boilerplate": "strip"})
    assert data.stats == {"rows": 2, "boilerplate": 1, "exact_duplicate": 0}
    assert [trained_spans(tok, ex) for ex in examples(data.train)] == [["2</s>"]]


def test_chat_boilerplate_only_in_assistant_turns(tmp_path, tok):
    convs = [
        [{"role": "user", "content": "As an AI language model, what is 1+1?"}, {"role": "assistant", "content": "2"}],
        [{"role": "user", "content": "1+2?"},
         {"role": "assistant", "content": "As an AI language model, I can't see. It is 3."}],
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    data = prep(tok, path, format="chat")
    assert data.stats == {"rows": 2, "boilerplate": 1, "exact_duplicate": 0}
    assert [trained_spans(tok, ex) for ex in examples(data.train)] == [["2</s>"]]
    data = prep(tok, path, format="chat", clean={"boilerplate": "strip"})
    assert [trained_spans(tok, ex) for ex in examples(data.train)] == [["2</s>"], ["It is 3.</s>"]]


def test_min_and_max_tokens_drop_and_count(tmp_path, tok):
    texts = ["a" * k for k in range(1, 7)]  # BOS + k + EOS: 3..8 tokens
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    data = prep(tok, path, format="text", clean={"min_tokens": 5, "max_tokens": 7})
    assert data.stats == {"rows": 6, "min_tokens": 2, "max_tokens": 1, "exact_duplicate": 0}
    assert data.steps[1] == ("clean + tokenize", 3, {"min_tokens": 2, "max_tokens": 1})
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(t) + [EOS] for t in texts[2:5]]
    assert col(prep(tok, path, format="text", clean={"min_tokens": 8}).train, "input_ids") == [
        [BOS] + byte_ids(texts[5]) + [EOS]]
    # counted after truncation: max_seq_len 8 keeps every row at <= 8 tokens
    data = prep(tok, path, format="text", max_seq_len=8, clean={"max_tokens": 8})
    assert data.stats == {"rows": 6, "exact_duplicate": 0}


# --------------------------------------------------------------------------------------
# Exact dedup


def test_exact_dedup_within_train_after_normalisation(tmp_path, tok):
    rows = [ROWS[0], ROWS[1], {**ROWS[0], "input": "2  +  3"}, {**ROWS[1], "instruction": "SAY HI."}, ROWS[2],
            ROWS[0]]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prep(tok, path)
    assert data.stats == {"rows": 6, "exact_duplicate": 3}
    assert data.steps == [("read", 6, {}), ("clean + tokenize", 6, {}), ("exact duplicate", 3, {"exact_duplicate": 3}),
                          ("split", 3, {})]
    assert pairs(data.train) == [expected_alpaca(r) for r in (ROWS[0], ROWS[1], ROWS[2])]  # first occurrences
    assert data.summary() == "data: 6 rows -> 3 train / 0 validation / 0 test examples; dropped: 3 exact_duplicate; 0 truncated to max_seq_len"
    off = prep(tok, path, clean={"exact_dedup": False})
    assert off.stats == {"rows": 6} and len(off.steps) == 3
    assert col(off.train, "input_ids")[2] == expected_alpaca(ROWS[0])[0]  # "2  +  3" normalised to "2 + 3"
    assert col(off.train, "input_ids")[3] == expected_alpaca({**ROWS[1], "instruction": "SAY HI."})[0]


def test_classification_dedup_ignores_the_label(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"],
                     [["1 vs 2", "second"], ["1 vs 2", "first"], ["3 vs 3", "equal"]])
    data = prep(tok, path, format="classification")
    assert data.stats == {"rows": 3, "exact_duplicate": 1}
    assert data.label_names == ["equal", "first", "second"]
    assert pairs(data.train) == [([BOS] + byte_ids("1 vs 2"), 2), ([BOS] + byte_ids("3 vs 3"), 0)]


def test_exact_dedup_across_splits_keeps_the_eval_rows(tmp_path, tok):
    u = _unique_rows(10)
    train = write_jsonl(tmp_path / "train.jsonl", [u[0], u[1], u[7], u[1], {**u[0], "instruction": "ADD."}, u[9], u[2]])
    val = write_jsonl(tmp_path / "val.jsonl", [u[7], u[7], u[8]])
    test = write_jsonl(tmp_path / "test.jsonl", [u[9]])
    # explicit validation and test sources: the ratios are not used
    data = prep(tok, train, val_ratio=0.5, test_ratio=0.3, validation=[str(val)], test=[str(test)])
    assert data.stats == {"rows": 11, "exact_duplicate": 4}
    assert data.steps[2] == ("exact duplicate", 7, {"exact_duplicate": 4})
    assert col(data.train, "input_ids") == [expected_alpaca(r)[0] for r in (u[0], u[1], u[2])]
    assert col(data.validation, "input_ids") == [expected_alpaca(r)[0] for r in (u[7], u[7], u[8])]  # kept as given
    assert col(data.test, "input_ids") == [expected_alpaca(u[9])[0]]
    off = prep(tok, train, validation=[str(val)], test=[str(test)], clean={"exact_dedup": False})
    assert (len(off.train), len(off.validation), len(off.test)) == (7, 3, 1)


def test_near_dedup_when_enabled(tmp_path, tok):
    base = "The quick brown fox jumps over the lazy dog near the old river bank today."
    rows = [{"text": base}, {"text": base.replace("today", "todau")}, {"text": "Something entirely different."}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    data = prep(tok, path, format="text", clean={"near_dedup": True})
    assert data.stats == {"rows": 3, "exact_duplicate": 0, "near_duplicate": 1}
    assert data.steps[3] == ("near duplicate", 2, {"near_duplicate": 1})
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(r["text"]) + [EOS] for r in (rows[0], rows[2])]


# --------------------------------------------------------------------------------------
# Train / validation / test split (by content hash)


def _unique_rows(n: int) -> list[dict]:
    return [{"instruction": "Add.", "input": f"{i} + 1", "output": str(i + 1)} for i in range(n)]


def _ids(rows: list[dict]) -> list[list[int]]:
    return [expected_alpaca(r)[0] for r in rows]


def test_content_key_is_the_joined_text_fields():
    from dtrain.data.pipeline import content_key

    assert content_key(dict(ROWS[0]), dcfg()) == alpaca_key(ROWS[0]) == "Add the numbers.\x1f2 + 3\x1f5"
    assert content_key({"instruction": "a", "output": "b"}, dcfg()) == "a\x1f\x1fb"
    assert content_key({"text": "t", "label": "x"}, dcfg(format="classification")) == "t"


def test_split_follows_the_content_hash(tmp_path, tok):
    rows = _unique_rows(60)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    keys = [alpaca_key(r) for r in rows]
    for seed in (0, 1):
        data = prep(tok, path, seed=seed, val_ratio=0.25, test_ratio=0.15)
        expected = by_split(rows, keys, seed, 0.25, 0.15)
        assert all(expected[s] for s in SPLITS)
        for s in SPLITS:  # each split in file order
            assert col(getattr(data, s), "input_ids") == _ids(expected[s]), (seed, s)
        # spelled out for one row: the split comes from unit_hash(seed, key) against the ratios
        h = unit_hash(keys[0], seed)
        split0 = "test" if h < 0.15 else "validation" if h < 0.40 else "train"
        assert _ids(rows[:1])[0] in col(getattr(data, split0), "input_ids")
        assert data.stats == {"rows": 60, "exact_duplicate": 0}
        assert data.steps[-1] == ("split", 60, {})
    a = prep(tok, path, seed=0, val_ratio=0.25, test_ratio=0.15, use_cache=False)
    b = prep(tok, path, seed=1, val_ratio=0.25, test_ratio=0.15)
    assert col(a.validation, "input_ids") != col(b.validation, "input_ids")
    # disjoint, and together every row once
    for d in (a, b):
        all_ids = col(d.train, "input_ids") + col(d.validation, "input_ids") + col(d.test, "input_ids")
        assert sorted(all_ids) == sorted(_ids(rows)) and len({tuple(x) for x in all_ids}) == 60
    assert (len(prep(tok, path, val_ratio=0.25).test), len(prep(tok, path, test_ratio=0.25).validation)) == (0, 0)


def test_split_sizes_follow_the_ratios_on_2000_rows(tmp_path, tok):
    rows = _unique_rows(2000)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare_data(dcfg(train=[str(path)]), tok, 0)  # the defaults: 0.15 / 0.15
    sizes = {s: len(getattr(data, s)) for s in SPLITS}
    expected = by_split(rows, [alpaca_key(r) for r in rows], 0, 0.15, 0.15)
    assert sizes == {s: len(expected[s]) for s in SPLITS}
    assert sum(sizes.values()) == 2000
    assert abs(sizes["validation"] / 2000 - 0.15) < 0.025 and abs(sizes["test"] / 2000 - 0.15) < 0.025
    assert data.summary() == (f"data: 2000 rows -> {sizes['train']} train / {sizes['validation']} validation / "
                              f"{sizes['test']} test examples; dropped: none; 0 truncated to max_seq_len")


def test_split_is_stable_when_rows_are_appended(tmp_path, tok):
    rows = _unique_rows(80)
    small = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows[:50]), val_ratio=0.2, test_ratio=0.2)
    large = prep(tok, write_jsonl(tmp_path / "b.jsonl", rows), val_ratio=0.2, test_ratio=0.2)
    first50 = {tuple(x) for x in _ids(rows[:50])}
    for s in SPLITS:
        kept = [x for x in col(getattr(large, s), "input_ids") if tuple(x) in first50]
        assert kept == col(getattr(small, s), "input_ids"), s


def test_all_rows_hashed_out_of_train_is_an_error(tmp_path, tok):
    row = next(r for r in _unique_rows(100) if unit_hash(alpaca_key(r), 0) < 0.15)  # lands in test
    with pytest.raises(DataError, match=r"^data.train: no usable training examples"):
        prep(tok, write_jsonl(tmp_path / "a.jsonl", [row]), test_ratio=0.15)


def test_explicit_validation_files_are_used_as_given(tmp_path, tok):
    rows = _unique_rows(8)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:5])
    val = write_jsonl(tmp_path / "val.jsonl", rows[5:])
    data = prep(tok, train, val_ratio=0.5, validation=[str(val)])
    assert col(data.train, "input_ids") == _ids(rows[:5])
    assert col(data.validation, "input_ids") == _ids(rows[5:])
    assert len(data.test) == 0
    assert data.stats == {"rows": 8, "exact_duplicate": 0}


def test_explicit_validation_file_and_test_carved_by_ratio(tmp_path, tok):
    rows = _unique_rows(60)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:50])
    val = write_jsonl(tmp_path / "val.jsonl", rows[50:])
    data = prep(tok, train, val_ratio=0.5, test_ratio=0.3, validation=[str(val)])
    expected = by_split(rows[:50], [alpaca_key(r) for r in rows[:50]], 0, 0.0, 0.3)
    assert expected["validation"] == [] and 0 < len(expected["test"]) < 50
    assert col(data.validation, "input_ids") == _ids(rows[50:])
    assert col(data.test, "input_ids") == _ids(expected["test"])
    assert col(data.train, "input_ids") == _ids(expected["train"])
    # and a test file: test used as given, validation carved by val_ratio
    test = write_jsonl(tmp_path / "test.jsonl", rows[50:])
    data = prep(tok, train, val_ratio=0.3, test_ratio=0.5, test=[str(test)])
    expected = by_split(rows[:50], [alpaca_key(r) for r in rows[:50]], 0, 0.3, 0.0)
    assert col(data.test, "input_ids") == _ids(rows[50:])
    assert col(data.validation, "input_ids") == _ids(expected["validation"])
    assert col(data.train, "input_ids") == _ids(expected["train"])


def test_several_train_files_are_concatenated_in_order(tmp_path, tok):
    rows = _unique_rows(6)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:2])
    b = write_csv(tmp_path / "b.csv", list(rows[0]), [list(r.values()) for r in rows[2:]])
    data = prep(tok, [a, b])
    assert col(data.train, "input_ids") == _ids(rows)


def test_classification_split_is_stratified(tmp_path, tok):
    counts = {"a": 40, "b": 20, "c": 100}
    rows = [{"text": f"{label} {i}", "label": label} for i in range(100) for label in counts if i < counts[label]]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = prep(tok, path, format="classification", val_ratio=0.25, test_ratio=0.1)
    per_split = {s: Counter(col(getattr(data, s), "label")) for s in SPLITS}
    assert per_split["validation"] == {0: 10, 1: 5, 2: 25}
    assert per_split["test"] == {0: 4, 1: 2, 2: 10}
    assert per_split["train"] == {0: 26, 1: 13, 2: 65}
    expected = by_split(rows, [r["text"] for r in rows], 0, 0.25, 0.1, labels=[r["label"] for r in rows])
    for s in SPLITS:
        assert col(getattr(data, s), "input_ids") == [[BOS] + byte_ids(r["text"]) for r in expected[s]], s


# --------------------------------------------------------------------------------------
# Source weights and class balance (train split only)


def test_source_weight_two_repeats_the_rows(tmp_path, tok):
    rows = _unique_rows(10)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:4])
    b = write_jsonl(tmp_path / "b.jsonl", rows[4:])
    data = prep(tok, [{"path": str(a), "weight": 2}, b])
    assert col(data.train, "input_ids") == _ids(rows[:4]) * 2 + _ids(rows[4:])
    assert data.steps[-1] == ("mix sources by weight", 14, {})
    assert data.stats == {"rows": 10, "exact_duplicate": 0}
    assert "mix sources by weight" not in [s for s, _, _ in prep(tok, [a, b]).steps]


def test_source_weight_below_one_samples_the_rows(tmp_path, tok):
    rows = _unique_rows(10)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:4])
    b = write_jsonl(tmp_path / "b.jsonl", rows[4:])
    data = prep(tok, [a, {"path": str(b), "weight": 0.5}])
    got = col(data.train, "input_ids")
    assert len(got) == 4 + 3 and got[:4] == _ids(rows[:4])
    assert len({tuple(x) for x in got[4:]}) == 3 and all(x in _ids(rows[4:]) for x in got[4:])
    assert data.steps[-1] == ("mix sources by weight", 7, {})
    again = prep(tok, [a, {"path": str(b), "weight": 0.5}], use_cache=False)
    assert col(again.train, "input_ids") == got  # seeded
    # 1.5: every row once plus half of them again
    data = prep(tok, [{"path": str(a), "weight": 1.5}, b])
    got = col(data.train, "input_ids")
    assert len(got) == 4 + 2 + 6 and got[:4] == _ids(rows[:4]) and got[6:] == _ids(rows[4:])
    assert len({tuple(x) for x in got[4:6]}) == 2 and all(x in _ids(rows[:4]) for x in got[4:6])


def test_source_weights_leave_validation_and_test_alone(tmp_path, tok):
    rows = _unique_rows(40)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:20])
    b = write_jsonl(tmp_path / "b.jsonl", rows[20:])
    plain = prep(tok, [a, b], val_ratio=0.2, test_ratio=0.2)
    weighted = prep(tok, [{"path": str(a), "weight": 2}, b], val_ratio=0.2, test_ratio=0.2)
    assert col(weighted.validation, "input_ids") == col(plain.validation, "input_ids")
    assert col(weighted.test, "input_ids") == col(plain.test, "input_ids")
    train_a = [x for x in col(plain.train, "input_ids") if x in _ids(rows[:20])]
    train_b = [x for x in col(plain.train, "input_ids") if x in _ids(rows[20:])]
    assert col(weighted.train, "input_ids") == train_a * 2 + train_b


def _balance_file(tmp_path: Path) -> tuple[Path, list[tuple[list[int], int]]]:
    labels = ["a"] * 6 + ["b"] * 2 + ["c"] * 4
    rows = [{"text": f"row {i}", "label": lab} for i, lab in enumerate(labels)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    return path, [([BOS] + byte_ids(r["text"]), "abc".index(r["label"])) for r in rows]


def test_balance_oversample(tmp_path, tok):
    path, originals = _balance_file(tmp_path)
    data = prep(tok, path, format="classification", balance="oversample")
    got = pairs(data.train)
    assert Counter(lab for _, lab in got) == {0: 6, 1: 6, 2: 6}
    assert all(p in originals for p in got) and all(p in got for p in originals)  # every row survives
    assert data.steps[-1] == ("oversample", 18, {}) and data.class_weights is None


def test_balance_undersample(tmp_path, tok):
    path, originals = _balance_file(tmp_path)
    data = prep(tok, path, format="classification", balance="undersample")
    got = pairs(data.train)
    assert Counter(lab for _, lab in got) == {0: 2, 1: 2, 2: 2}
    assert all(p in originals for p in got) and len({tuple(ids) for ids, _ in got}) == 6
    assert [p for p in originals if p[1] == 1] == sorted((p for p in got if p[1] == 1), key=originals.index)
    assert data.steps[-1] == ("undersample", 6, {})


def test_balance_class_weights(tmp_path, tok):
    path, originals = _balance_file(tmp_path)
    data = prep(tok, path, format="classification", balance="class_weights")
    assert pairs(data.train) == originals  # the data is unchanged
    assert data.class_weights == pytest.approx([12 / (3 * 6), 12 / (3 * 2), 12 / (3 * 4)])
    assert data.steps[-1] == ("split", 12, {})
    cached = prep(tok, path, format="classification", balance="class_weights")
    assert cached.from_cache and cached.class_weights == data.class_weights


# --------------------------------------------------------------------------------------
# The cache


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_cache_reuses_an_unchanged_build(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS + ['{"bad'])
    cache = tmp_path / "cache"
    kw = dict(on_error="skip", cache_dir=str(cache), val_ratio=0.25)
    a = prep(tok, path, **kw)
    assert not a.from_cache and Path(a.cache_path).parent == cache and _entries(cache) == [Path(a.cache_path).name]
    b = prep(tok, path, **kw)
    assert b.from_cache and b.cache_path == a.cache_path and _entries(cache) == [Path(a.cache_path).name]
    for s in SPLITS:
        assert pairs(getattr(b, s)) == pairs(getattr(a, s)), s
    assert sum(len(getattr(b, s)) for s in SPLITS) == 4
    assert b.steps == a.steps and b.stats == a.stats == {"rows": 5, "malformed": 1, "exact_duplicate": 0}
    assert b.skipped == a.skipped and len(a.skipped) == 1 and a.skipped[0].startswith(f"{path}:5: not valid JSON")
    assert b.label_names is None and b.packed is False and b.lengths_before_packing == a.lengths_before_packing
    assert b.summary() == a.summary() + f" (cached: {a.cache_path})"
    # options that do not change the prepared data share the entry
    for extra in ({"num_proc": 2}, {"shuffle": False}):
        assert prep(tok, path, **kw, **extra).from_cache, extra


def test_the_reports_figures_are_rendered_once_per_cache_entry(tmp_path, tok, monkeypatch):
    from dtrain.data import report

    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    kw = dict(cache_dir=str(tmp_path / "cache"), val_ratio=0.25)
    report.write_report(prep(tok, path, **kw), tok, tmp_path / "run1", batch_size=2, max_seq_len=64, seed=0)
    figure = (tmp_path / "run1" / "data_lengths.png").read_bytes()
    assert figure.startswith(b"\x89PNG")
    cached = prep(tok, path, **kw)
    assert (Path(cached.cache_path) / "figures" / "data_lengths.png").read_bytes() == figure

    def no_drawing(*args, **kwargs):
        raise AssertionError("the figure was drawn again")

    monkeypatch.setattr(report, "_histogram", no_drawing)
    report.write_report(cached, tok, tmp_path / "run2", batch_size=4, max_seq_len=64, seed=1)
    assert (tmp_path / "run2" / "data_lengths.png").read_bytes() == figure
    # The markdown is written afresh for each run (its padding figure depends on the batch size).
    assert "batches of 4" in (tmp_path / "run2" / "data_report.md").read_text()
    assert not [p for p in (tmp_path / "run2").iterdir() if p.name.startswith(".")]  # (no temporary left)


def test_cache_default_location_is_under_dtrain_cache(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", ROWS[:2]))
    assert Path(data.cache_path).parent == Path(os.environ["DTRAIN_CACHE"]) / "data"


def test_cache_key_changes_with_content_and_options(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cache = tmp_path / "cache"
    first = prep(tok, path, cache_dir=str(cache))
    assert not first.from_cache
    # one byte of the file: "5" -> "6"
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"output": "5"', b'"output": "6"', 1))
    assert len(path.read_bytes()) == len(original)
    changed = prep(tok, path, cache_dir=str(cache))
    assert not changed.from_cache and changed.cache_path != first.cache_path
    assert col(changed.train, "input_ids")[0] == expected_alpaca({**ROWS[0], "output": "6"})[0]
    # an option, the seed, the sample size: each a new entry
    paths = {first.cache_path, changed.cache_path}
    for kw in ({"max_seq_len": 300}, {"seed": 1}, {"rows_per_file": 2}, {"clean": {"exact_dedup": False}},
               {"on_error": "skip"}):
        other = prep(tok, path, cache_dir=str(cache), **kw)
        assert not other.from_cache and other.cache_path not in paths, kw
        paths.add(other.cache_path)
    assert len(_entries(cache)) == len(paths) == 7
    # the original content again: its entry is found
    path.write_bytes(original)
    again = prep(tok, path, cache_dir=str(cache))
    assert again.from_cache and again.cache_path == first.cache_path


def test_use_cache_false_rebuilds(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    cache = tmp_path / "cache"
    a = prep(tok, path, cache_dir=str(cache))
    b = prep(tok, path, cache_dir=str(cache), use_cache=False)
    assert not b.from_cache and b.cache_path == a.cache_path and pairs(b.train) == pairs(a.train)
    assert _entries(cache) == [Path(a.cache_path).name]  # no temporary directory left behind
    assert prep(tok, path, cache_dir=str(cache)).from_cache


def test_use_cache_false_sees_a_changed_database(tmp_path, tok):
    db = tmp_path / "q.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (text TEXT)")
        con.executemany("INSERT INTO t VALUES (?)", [("one",), ("two",)])
    con.close()
    spec = f"sql:sqlite:///{db}::SELECT text FROM t ORDER BY rowid"
    kw = dict(format="text", cache_dir=str(tmp_path / "cache"))
    assert col(prep(tok, spec, **kw).train, "input_ids") == [[BOS] + byte_ids(t) + [EOS] for t in ("one", "two")]
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO t VALUES ('three')")
    con.close()
    assert prep(tok, spec, **kw).from_cache  # a database is not hashed: the entry is reused
    fresh = prep(tok, spec, use_cache=False, **kw)
    assert col(fresh.train, "input_ids") == [[BOS] + byte_ids(t) + [EOS] for t in ("one", "two", "three")]
    assert col(prep(tok, spec, **kw).train, "input_ids") == col(fresh.train, "input_ids")


def test_num_proc_gives_the_same_data(tmp_path, tok):
    rows = _unique_rows(300)
    path = write_jsonl(tmp_path / "a.jsonl", rows[:150] + ['{"bad'] + rows[150:])
    kw = dict(on_error="skip", val_ratio=0.2, test_ratio=0.1)
    one = prep(tok, path, cache_dir=str(tmp_path / "c1"), **kw)
    two = prep(tok, path, cache_dir=str(tmp_path / "c2"), num_proc=2, **kw)
    assert not two.from_cache
    for s in SPLITS:
        assert pairs(getattr(two, s)) == pairs(getattr(one, s)), s
    assert two.skipped == one.skipped and len(one.skipped) == 1
    assert one.skipped[0].startswith(f"{path}:151: not valid JSON (")
    assert two.steps == one.steps


# --------------------------------------------------------------------------------------
# Fast paths: plain rows as Arrow string columns, JSONL and Parquet read by Arrow

VARIED_ROWS = [
    {"instruction": "Ｔｏｔａｌ： １２３", "input": "", "output": "ﬁne x²\u200b ok"},
    {"instruction": "tabs\tand  spaces ", "input": None, "output": "line1\r\nline2\n\n\n\nline3  "},
    {"instruction": "q", "output": "As an AI language model, I can't. However, 2 + 2 = 4."},
    {"instruction": "dup", "input": "x", "output": "same"},
    {"instruction": "DUP ", "input": "x", "output": "same"},
    {"instruction": "num", "output": 5},
    {"instruction": "missing output"},
    {"instruction": "empty", "output": "   "},
    {"instruction": 7, "output": "seven"},
    {"instruction": "i", "input": 3, "output": "o"},
    {"instruction": "long " * 80, "output": "short"},
    {"instruction": "s", "output": "long answer " * 40},
    {"instruction": "meta", "output": "with meta", "meta": {"a": [1, 2]}},
    {"instruction": "eos", "output": "</s>"},
] + [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else f"{i} + {i + 1}", "output": str(2 * i + 1)}
     for i in range(60)]


def _prepared(data) -> dict:
    return {"splits": {s: pairs(getattr(data, s)) for s in SPLITS}, "steps": data.steps, "skipped": data.skipped,
            "truncated": data.truncated, "lengths": data.lengths_before_packing, "packed": data.packed}


def _without_fast_paths(monkeypatch, run):
    """`run()` with every row stored whole, as JSON, and read row by row (as before the fast paths)."""
    from dtrain.data import pipeline

    with monkeypatch.context() as m:
        m.setattr(pipeline, "plain_fields", lambda cfg: None)
        return run()


@pytest.mark.parametrize("kw", [
    {},
    {"train_on_prompt": True, "add_eos": False, "max_seq_len": 64},
    {"clean": {"boilerplate": "strip", "unicode": "none", "whitespace": False, "min_tokens": 60}},
    {"packing": True, "max_seq_len": 400},
    {"augment": {"copies": 1, "synonyms": "SYN"}},
    {"num_proc": 2},
], ids=["default", "prompt-no-eos-short", "cleaning-options", "packing", "augment", "num_proc"])
def test_fast_paths_give_the_same_prepared_data(tmp_path, tok, monkeypatch, kw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "augment" in kw:
        synonyms = tmp_path / "syn.txt"
        synonyms.write_text("add, sum\nnumbers, figures\nanswer, reply\n")
        kw = {**kw, "augment": {**kw["augment"], "synonyms": str(synonyms)}}
    # a file with bad lines (read line by line), one Arrow reads whole, and a Parquet file
    jsonl = write_jsonl(tmp_path / "a.jsonl", VARIED_ROWS + ['{"bad'])
    plain = [r for r in VARIED_ROWS if "output" in r and set(r) <= {"instruction", "input", "output"}
             and all(isinstance(v, (str, type(None))) for v in r.values())]
    regular = write_jsonl(tmp_path / "b.jsonl", plain[1::2])
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(plain[::2]), parquet)
    kw = dict(on_error="skip", val_ratio=0.2, test_ratio=0.1, max_seq_len=kw.pop("max_seq_len", 400), **kw)
    fast = prep(tok, [jsonl, regular, parquet], cache_dir=str(tmp_path / "fast"), **kw)
    slow = _without_fast_paths(monkeypatch, lambda: prep(tok, [jsonl, regular, parquet],
                                                         cache_dir=str(tmp_path / "slow"), **kw))
    assert _prepared(fast) == _prepared(slow)
    assert fast.skipped == [
        f"{jsonl}:6: field 'output' must be a string, got int",
        f"{jsonl}:7: missing field 'output' (present: ['instruction'])",
        f"{jsonl}:8: field 'output' is empty: nothing to train on",
        f"{jsonl}:9: field 'instruction' must be a string, got int",
        f"{jsonl}:10: field 'input' must be a string, got int",
        f"{jsonl}:75: not valid JSON (Unterminated string starting at, column 2)",
        f"{regular}:3: field 'output' is empty: nothing to train on",  # a plain row: its error comes from the encoder
    ]


def test_fast_paths_give_the_same_text_data_and_errors(tmp_path, tok, monkeypatch):
    rows = [{"text": f"Paragraph {i}:  some words\n\n\nmore"} for i in range(30)] + [{"text": "  "}, {"text": 3}, {}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    kw = dict(format="text", val_ratio=0.2, max_seq_len=20)
    fast = prep(tok, path, cache_dir=str(tmp_path / "fast"), on_error="skip", **kw)
    slow = _without_fast_paths(monkeypatch, lambda: prep(tok, path, cache_dir=str(tmp_path / "slow"), on_error="skip",
                                                         **kw))
    assert _prepared(fast) == _prepared(slow) and len(fast.skipped) == 3
    with pytest.raises(DataError) as fast_error:
        prep(tok, path, use_cache=False, **kw)
    with pytest.raises(DataError) as slow_error:
        _without_fast_paths(monkeypatch, lambda: prep(tok, path, use_cache=False, **kw))
    assert str(fast_error.value) == str(slow_error.value) == (
        f"{path}:31: field 'text' is empty (and 2 more); set data.on_error=skip to skip and count such rows")


def test_rows_are_kept_whole_when_augmentation_edits_other_fields():
    """EDA draws from one random stream per copy across its fields, so a field outside the format
    changes what the format's fields get: then the whole row must be stored."""
    from dtrain.data.pipeline import plain_fields
    from dtrain.data.sources import StringFields

    assert plain_fields(dcfg()) == StringFields(("instruction", "input", "output"), ("instruction", "output"))
    assert plain_fields(dcfg(augment={"copies": 1})) == plain_fields(dcfg())  # default: the instruction
    assert plain_fields(dcfg(augment={"copies": 1, "fields": ["output", "input"]})) == plain_fields(dcfg())
    assert plain_fields(dcfg(augment={"copies": 1, "fields": ["meta", "instruction"]})) is None
    assert plain_fields(dcfg(format="text", text_field="body")) == StringFields(("body",), ("body",))
    assert plain_fields(dcfg(format="chat")) is None and plain_fields(dcfg(format="classification")) is None


def test_bad_line_after_arrow_chunks_names_its_line(tmp_path, tok, monkeypatch):
    from dtrain.data import sources

    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 500)
    rows = _unique_rows(100)
    path = write_jsonl(tmp_path / "a.jsonl", rows[:80] + [{"instruction": "x", "output": ["a list"]}] + rows[80:])
    with pytest.raises(DataError, match=rf"^{path}:81: field 'output' must be a string, got list; set data.on_error"):
        prep(tok, path)
    data = prep(tok, path, on_error="skip")
    assert pairs(data.train) == [expected_alpaca(r) for r in rows]


def test_take_gathers_rows_across_chunks_in_any_order():
    import random

    import pyarrow as pa

    from dtrain.data.pipeline import _take

    lists = [[i] * (i % 5) for i in range(50)]
    table = pa.Table.from_batches([pa.record_batch({"x": lists[i:i + 7], "n": list(range(i, min(i + 7, 50)))})
                                   for i in range(0, 50, 7)])
    rng = random.Random(0)
    for indices in (list(range(50)), [3, 9, 10, 49], [rng.randrange(50) for _ in range(120)], []):
        got = pa.Table.from_batches(list(_take(table, indices, ["x", "n"], batch_rows=16)), schema=table.schema)
        assert got.to_pydict() == {"x": [lists[i] for i in indices], "n": indices}
        assert all(b.num_rows <= 16 for b in _take(table, indices, ["x"], batch_rows=16))


def test_encoder_ids_equal_the_tokenizers_with_a_merging_bpe():
    """A BPE with merges, not only the byte tokenizer: prompt and completion ids are the tokenizer's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in _unique_rows(200)] * 3
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    rows = _unique_rows(40) + [{"instruction": "Ünïcödé?", "input": "", "output": "👩\u200d💻 done"}]
    got = Encoder(dcfg(max_seq_len=512), tok).encode_many(rows, [f"f:{i}" for i in range(len(rows))])
    for row, ex in zip(rows, got):
        prompt = tok(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        completion = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(prompt) < len(alpaca_prompt(row["instruction"], row["input"]).encode())  # merges happened
        assert ex.input_ids == prompt + completion and ex.labels == [M] * len(prompt) + completion


# --------------------------------------------------------------------------------------
# Batching


def _examples(n: int) -> list[Example]:
    # example i: input ids [10+i] * (1 + i % 3), labels = ids except the first
    return [Example([10 + i] * (1 + i % 3), [M] + [10 + i] * (i % 3)) for i in range(n)]


def _ids_of(batch) -> list[int]:
    return [int(x) - 10 for x in batch["input_ids"][:, 0]]


def test_collate_pads_exactly():
    batch = collate([Example([5, 6], [M, 6]), Example([7, 8, 9, 4], [7, 8, 9, 4]), Example([3], [3])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 4], [3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[M, 6, M, M], [7, 8, 9, 4], [3, M, M, M]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    batch = collate([Example([5, 6], [M, 6])], pad_id=7)
    assert batch["input_ids"].tolist() == [[5, 6]]
    cls = collate([Example([5, 6], 2), Example([1], 0)], pad_id=9)
    assert cls["input_ids"].tolist() == [[5, 6], [1, 9]]
    assert cls["labels"].tolist() == [2, 0] and cls["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_batch_iterator_unshuffled_order_drops_last_partial_batch():
    it = BatchIterator(_examples(10), batch_size=4, pad_id=PAD, shuffle=False, seed=0)
    assert it.batches_per_epoch == 2
    got = [_ids_of(next(it)) for _ in range(5)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert it.epoch == 2 and it.index == 1 and it.epoch_progress == 2.5


def test_batch_iterator_batch_contents_and_padding():
    it = BatchIterator(_examples(6), batch_size=3, pad_id=PAD, shuffle=False, seed=0)
    batch = next(it)  # examples 0, 1, 2: lengths 1, 2, 3
    assert batch["input_ids"].tolist() == [[10, 0, 0], [11, 11, 0], [12, 12, 12]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[M, M, M], [M, 11, M], [M, 12, 12]]


def test_batch_iterator_shuffles_every_epoch_by_seed():
    def epochs(seed, n_epochs=3):
        it = BatchIterator(_examples(12), batch_size=4, pad_id=PAD, shuffle=True, seed=seed)
        return [sum((_ids_of(next(it)) for _ in range(3)), []) for _ in range(n_epochs)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b
    for e in range(3):
        assert sorted(a[e]) == list(range(12))  # each epoch is a permutation
    assert a[0] != a[1] != a[2]
    assert a[0] != c[0]
    assert a[0] != list(range(12))


def test_batch_iterator_shuffled_epoch_drops_different_examples():
    it = BatchIterator(_examples(10), batch_size=3, pad_id=PAD, shuffle=True, seed=3)
    epoch0 = sum((_ids_of(next(it)) for _ in range(3)), [])
    assert len(epoch0) == 9 and len(set(epoch0)) == 9  # one example left out, no repeats
    assert it.epoch == 0 and it.index == 3
    next(it)
    assert it.epoch == 1 and it.index == 1


def test_batch_iterator_resume_gives_the_same_batches():
    examples = _examples(11)
    a = BatchIterator(examples, batch_size=4, pad_id=PAD, shuffle=True, seed=5)
    for _ in range(3):  # 2 batches per epoch: now mid-epoch 1
        next(a)
    state = a.state_dict()
    assert state == {"epoch": 1, "index": 1, "seed": 5, "num_examples": 11, "global_batch": 4}
    state = json.loads(json.dumps(state))  # as stored in a checkpoint
    expected = [next(a) for _ in range(10)]  # crosses several epoch boundaries

    b = BatchIterator(examples, batch_size=4, pad_id=PAD, shuffle=True, seed=5)
    next(b)  # its own position must not matter
    b.load_state_dict(state)
    got = [next(b) for _ in range(10)]
    for x, y in zip(expected, got):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(x[key], y[key])
    assert b.state_dict() == a.state_dict()
    # and resuming at an epoch end starts the next epoch
    c = BatchIterator(examples, batch_size=4, pad_id=PAD, shuffle=True, seed=5)
    c.load_state_dict({"epoch": 1, "index": 2, "seed": 5, "num_examples": 11})
    d = BatchIterator(examples, batch_size=4, pad_id=PAD, shuffle=True, seed=5)
    for _ in range(4):
        next(d)
    assert torch.equal(next(c)["input_ids"], next(d)["input_ids"])


def test_batch_iterator_resumes_at_another_world_size_after_the_same_examples():
    """Saved at 1 rank x 2 examples, resumed at 2 ranks x 2 (global batch 4): the next global
    batch starts where the saved run would have gone on, rounded down to a whole batch."""
    examples = _examples(40)
    one = BatchIterator(examples, batch_size=2, pad_id=PAD, shuffle=True, seed=3)
    for _ in range(6):  # 12 examples consumed
        next(one)
    state = one.state_dict()
    ranks = [BatchIterator(examples, batch_size=2, pad_id=PAD, shuffle=True, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for it in ranks:
        it.load_state_dict(state)
        assert (it.epoch, it.index) == (0, 3)  # 12 examples = 3 global batches of 4
    def rows(batch):
        return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    expected = rows(next(one)) + rows(next(one))
    got = [row for it in ranks for row in rows(next(it))]
    assert got == expected


def test_batch_iterator_rejects_a_state_for_other_data():
    it = BatchIterator(_examples(8), batch_size=2, pad_id=PAD, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="data or seed changed"):
        it.load_state_dict({"epoch": 0, "index": 1, "seed": 1, "num_examples": 9})
    with pytest.raises(ValueError, match="data or seed changed"):
        it.load_state_dict({"epoch": 0, "index": 1, "seed": 2, "num_examples": 8})


def test_batch_iterator_too_small_dataset():
    with pytest.raises(ValueError, match=r"3 training examples is fewer than one global micro-batch"):
        BatchIterator(_examples(3), batch_size=4, pad_id=PAD, shuffle=True, seed=0)
    with pytest.raises(ValueError, match=r"train.micro_batch_size=2 x 2 ranks"):
        BatchIterator(_examples(3), batch_size=2, pad_id=PAD, shuffle=True, seed=0, world_size=2)
    it = BatchIterator(_examples(4), batch_size=4, pad_id=PAD, shuffle=False, seed=0)
    assert _ids_of(next(it)) == _ids_of(next(it)) == [0, 1, 2, 3]


def test_batch_iterator_ranks_split_the_global_batch():
    examples = _examples(13)
    whole = BatchIterator(examples, batch_size=4, pad_id=PAD, shuffle=True, seed=7)
    r0 = BatchIterator(examples, batch_size=2, pad_id=PAD, shuffle=True, seed=7, rank=0, world_size=2)
    r1 = BatchIterator(examples, batch_size=2, pad_id=PAD, shuffle=True, seed=7, rank=1, world_size=2)
    for _ in range(7):
        assert _ids_of(next(whole)) == _ids_of(next(r0)) + _ids_of(next(r1))


def test_eval_batches_cover_every_example_in_order():
    examples = _examples(10)
    batches = list(eval_batches(examples, 4, PAD))
    assert [_ids_of(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(eval_batches(examples, 4, PAD, max_batches=2))) == 2
    r0 = [_ids_of(b) for b in eval_batches(examples, 3, PAD, rank=0, world_size=2)]
    r1 = [_ids_of(b) for b in eval_batches(examples, 3, PAD, rank=1, world_size=2)]
    assert r0 == [[0, 1, 2], [6, 7, 8]] and r1 == [[3, 4, 5], [9]]


def test_batch_iterator_over_a_prepared_dataset_equals_over_examples(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", _unique_rows(11)))
    as_list = examples(data.train)
    for shuffle in (False, True):
        a = BatchIterator(data.train, batch_size=4, pad_id=PAD, shuffle=shuffle, seed=3)
        b = BatchIterator(as_list, batch_size=4, pad_id=PAD, shuffle=shuffle, seed=3)
        assert a.batches_per_epoch == b.batches_per_epoch == 2
        for _ in range(5):
            x, y = next(a), next(b)
            for key in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(x[key], y[key]), (shuffle, key)
    got = list(eval_batches(data.train, 4, PAD))
    want = list(eval_batches(as_list, 4, PAD))
    assert len(got) == 3 and all(torch.equal(g["labels"], w["labels"]) for g, w in zip(got, want))
    first = collate(as_list[:4], PAD)
    assert torch.equal(got[0]["input_ids"], first["input_ids"])


def test_batch_iterator_over_a_classification_dataset(tmp_path, tok):
    path, originals = _balance_file(tmp_path)
    data = prep(tok, path, format="classification")
    batch = next(BatchIterator(data.train, batch_size=3, pad_id=PAD, shuffle=False, seed=0))
    assert batch["labels"].tolist() == [lab for _, lab in originals[:3]]
    width = max(len(ids) for ids, _ in originals[:3])
    assert batch["input_ids"].tolist() == [ids + [PAD] * (width - len(ids)) for ids, _ in originals[:3]]


# --------------------------------------------------------------------------------------
# prepare_data with full configs and the shipped example data


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_alpaca_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config()
    tok = load_tokenizer(cfg.model)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    assert (cfg.data.val_ratio, cfg.data.test_ratio) == (0.15, 0.15)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = _lines(ALPACA)
    unique = dedup_first(rows, alpaca_key)
    assert (len(rows), len(unique)) == (2000, 1860)
    assert data.stats == {"rows": 2000, "exact_duplicate": 140}
    expected = by_split(unique, [alpaca_key(r) for r in unique], cfg.seed, 0.15, 0.15)
    for s in SPLITS:
        assert pairs(getattr(data, s)) == [expected_alpaca(r) for r in expected[s]], s
    assert abs(len(data.validation) / 1860 - 0.15) < 0.03 and abs(len(data.test) / 1860 - 0.15) < 0.03
    again = prepare_data(cfg.data, tok, cfg.seed)
    assert again.from_cache and col(again.validation, "input_ids") == col(data.validation, "input_ids")
    other = prepare_data(cfg.data, tok, cfg.seed + 1)
    assert col(other.validation, "input_ids") != col(data.validation, "input_ids")
    assert len(other.train) + len(other.validation) + len(other.test) == 1860


def test_prepare_chat_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=chat", f"data.train={CHAT}", "data.val_ratio=0", "data.test_ratio=0")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = dedup_first(_lines(CHAT), lambda r: json.dumps(r["messages"]))
    assert data.stats == {"rows": 1000, "exact_duplicate": 1000 - len(rows)} and len(rows) == 957
    assert len(data.train) == len(rows) and len(data.validation) == len(data.test) == 0
    for row, ex in zip(rows, examples(data.train)):
        answers = [m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant"]
        assert trained_spans(tok, ex) == answers
        assert ex.labels[-1] == EOS


def test_prepare_text_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=text", f"data.train={TEXT}", "data.val_ratio=0", "data.test_ratio=0",
                      "data.add_eos=false")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = dedup_first(_lines(TEXT), lambda r: r["text"])
    assert data.stats == {"rows": 1000, "exact_duplicate": 42} and len(rows) == 958
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(r["text"]) for r in rows]
    assert col(data.train, "labels") == col(data.train, "input_ids")


def test_prepare_classification_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=classification", "model.task=classification", f"data.train={CLASSIFICATION}",
                      "data.val_ratio=0", "data.test_ratio=0")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    with open(CLASSIFICATION, newline="") as f:
        all_rows = list(csv.DictReader(f))
    rows = dedup_first(all_rows, lambda r: r["text"])
    assert data.stats == {"rows": 1000, "exact_duplicate": 65} and len(rows) == 935
    names = sorted({r["label"] for r in all_rows})
    assert data.label_names == names == ["equal", "first", "second"]
    assert col(data.train, "label") == [names.index(r["label"]) for r in rows]
    assert col(data.train, "input_ids") == [[BOS] + byte_ids(r["text"]) for r in rows]


def test_prepare_classification_example_data_stratified(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=classification", "model.task=classification", f"data.train={CLASSIFICATION}")
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    with open(CLASSIFICATION, newline="") as f:
        rows = dedup_first(list(csv.DictReader(f)), lambda r: r["text"])
    total = Counter(r["label"] for r in rows)
    for s in ("validation", "test"):
        got = Counter(data.label_names[i] for i in col(getattr(data, s), "label"))
        assert got == {name: round(n * 0.15) for name, n in total.items()}, s


def test_prepare_rows_per_file_reads_a_sample(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.val_ratio=0", "data.test_ratio=0")
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed, rows_per_file=7)
    assert data.stats == {"rows": 7, "exact_duplicate": 0} and len(data.train) == 7
    rows = _lines(ALPACA)[:7]
    assert col(data.train, "input_ids") == [expected_alpaca(r)[0] for r in rows]


def test_an_unreadable_cache_entry_is_rebuilt(tmp_path):
    """An entry written by another dtrain version (or damaged) is rebuilt, never fatal."""
    import json as _json

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(6)])
    cfg = DataConfig(train=[str(path)], format="text", val_ratio=0, test_ratio=0, cache_dir=str(tmp_path / "c"))
    first = prepare_data(cfg, byte_tokenizer(), 0)
    meta_path = Path(first.cache_path) / "meta.json"
    meta = _json.loads(meta_path.read_text())
    del meta["truncated"]
    meta_path.write_text(_json.dumps(meta))
    again = prepare_data(cfg, byte_tokenizer(), 0)
    assert not again.from_cache and again.cache_path == first.cache_path
    assert col(again.train, "input_ids") == col(first.train, "input_ids")
    assert prepare_data(cfg, byte_tokenizer(), 0).from_cache  # the rebuilt entry is readable
