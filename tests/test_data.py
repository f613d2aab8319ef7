"""The data stage: sources -> formats (exact token ids and label masks) -> splits -> batches.

Token ids are computed independently of the tokenizer where possible: the shipped byte
tokenizer maps each UTF-8 byte to 4 + (rank of its GPT-2 byte symbol), BOS=1, EOS=2, PAD=0.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import ALPACA, CHAT, CLASSIFICATION, TEXT, write_jsonl
from dtrain.config import DataConfig
from dtrain.data import IGNORE_INDEX, BatchIterator, DataError, Example, collate, prepare_data
from dtrain.data.formats import ALPACA_PROMPT, Encoder, alpaca_prompt
from dtrain.data.loader import eval_batches
from dtrain.data.sources import iter_rows

PAD, BOS, EOS = 0, 1, 2
M = IGNORE_INDEX


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


def prep(tok, paths, seed: int = 0, **kw):
    paths = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    kw.setdefault("val_ratio", 0.0)
    return prepare_data(dcfg(train=paths, **kw), tok, seed)


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
    prompt_ids = [BOS] + byte_ids(alpaca_prompt(row["instruction"], row["input"]))
    completion_ids = byte_ids(row["output"]) + [EOS]
    return prompt_ids + completion_ids, [M] * len(prompt_ids) + completion_ids


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
    assert data.stats == {"rows": 4, "skipped": 0, "too_long": 0, "truncated": 0}
    assert len(data.train) == 4 and data.validation == []
    for row, ex in zip(ROWS, data.train):
        ids, labels = expected_alpaca(row)
        assert ex.input_ids == ids
        assert ex.labels == labels
        assert ex.input_ids[0] == BOS and ex.labels[-1] == EOS and ex.input_ids[-1] == EOS
        assert ex.truncated is False
    # the same ids as the tokenizer's own, row 0 spelled out
    prompt = alpaca_prompt("Add the numbers.", "2 + 3")
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok("5", add_special_tokens=False)["input_ids"]
    assert completion_ids == [ord("5") - 29]
    assert data.train[0].labels == [M] * len(prompt_ids) + completion_ids + [EOS]
    assert len(prompt_ids) == len(prompt.encode()) + 1


def test_alpaca_train_on_prompt_labels_equal_ids(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", ROWS), train_on_prompt=True)
    for row, ex in zip(ROWS, data.train):
        ids, _ = expected_alpaca(row)
        assert ex.input_ids == ids and ex.labels == ids


def test_alpaca_without_eos(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", ROWS), add_eos=False)
    for row, ex in zip(ROWS, data.train):
        ids, labels = expected_alpaca(row)
        assert ex.input_ids == ids[:-1] and ex.labels == labels[:-1]
        assert EOS not in ex.input_ids


def test_alpaca_custom_field_names(tmp_path, tok):
    rows = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in ROWS]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), instruction_field="q", input_field="ctx",
                output_field="a")
    assert [(ex.input_ids, ex.labels) for ex in data.train] == [expected_alpaca(r) for r in ROWS]


def test_alpaca_missing_or_empty_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], {"instruction": "x"}, {"instruction": "x", "output": "  "},
                                             {"instruction": 5, "output": "y"}, ROWS[1]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: missing field 'output'") and "data.on_error=skip" in msg
    data = prep(tok, path, on_error="skip")
    assert data.stats["skipped"] == 3 and data.stats["rows"] == 5
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "'output' is empty" in data.skipped[1]
    assert "'instruction' must be a string, got int" in data.skipped[2]
    assert [ex.input_ids for ex in data.train] == [expected_alpaca(ROWS[0])[0], expected_alpaca(ROWS[1])[0]]


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
    assert data.stats["skipped"] == 4 and len(data.train) == 1
    assert data.skipped[0] == f"{path}:1: no assistant message: nothing to train on"
    assert data.skipped[1].startswith(f"{path}:2: field 'messages' must be a non-empty list")
    assert data.skipped[2].startswith(f"{path}:3: messages[0] must be")
    assert data.skipped[3].startswith(f"{path}:4: missing field 'messages'")
    assert trained_spans(tok, data.train[0]) == ["b</s>"]


# --------------------------------------------------------------------------------------
# text


def test_text_labels_equal_ids_with_bos_and_eos(tmp_path, tok):
    texts = ["28 + 82 = 110", "héllo wörld"]
    data = prep(tok, write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), format="text")
    for text, ex in zip(texts, data.train):
        assert ex.input_ids == [BOS] + byte_ids(text) + [EOS]
        assert ex.labels == ex.input_ids
    data = prep(tok, write_jsonl(tmp_path / "t2.jsonl", [{"body": texts[0]}]), format="text", text_field="body",
                add_eos=False)
    assert data.train[0].input_ids == data.train[0].labels == [BOS] + byte_ids(texts[0])


def test_text_empty_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "   "}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'text' is empty"):
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
    assert [ex.labels for ex in data.train] == [1, 0, 2, 1]
    assert data.train[0].input_ids == [BOS] + byte_ids("5 vs 3")  # no EOS for classification
    assert "train labels: equal=1, first=2, second=1" in data.summary()


def test_classification_label_order_from_config(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "first"], ["b", "equal"], ["c", "second"]])
    data = prep(tok, path, format="classification", labels=["second", "first", "equal", "never"])
    assert data.label_names == ["second", "first", "equal", "never"]
    assert [ex.labels for ex in data.train] == [1, 2, 0]


def test_classification_unknown_label_names_file_line_field(tmp_path, tok):
    path = write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "first"], ["b", "maybe"], ["c", "second"]])
    with pytest.raises(DataError) as info:
        prep(tok, path, format="classification", labels=["first", "second"])
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: field 'label': label 'maybe' is not one of ['first', 'second']")


def test_classification_validation_label_unseen_in_train(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "y": "pos"}, {"text": "b", "y": "neg"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "y": "pos"}, {"text": "d", "y": "meh"}])
    with pytest.raises(DataError, match=rf"^{val}:2: field 'y': label 'meh'"):
        prep(tok, train, format="classification", label_field="y", validation=[str(val)])


def test_classification_non_string_labels_and_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x" * 20, "label": 1}, {"text": "y", "label": 0}])
    data = prep(tok, path, format="classification", max_seq_len=8)
    assert data.label_names == ["0", "1"]
    assert [ex.labels for ex in data.train] == [1, 0]
    assert data.train[0].input_ids == [BOS] + byte_ids("x" * 7) and data.train[0].truncated
    assert data.stats["truncated"] == 1 and data.stats["too_long"] == 0


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
        assert [(ex.input_ids, ex.labels) for ex in data.train] == expected, kind
        assert data.stats["rows"] == 4, kind


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
    assert [trained_spans(tok, ex) for ex in data.train] == [["b</s>"], ["e</s>"]]


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
    with pytest.raises(DataError, match="data.train: .*plain_dir is a directory but not a datasets.save_to_disk"):
        prep(tok, tmp_path / "plain_dir")
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"data.train: .*d.txt: unsupported file type '.txt'"):
        prep(tok, tmp_path / "d.txt")
    with pytest.raises(DataError, match="data.train: no training files given"):
        prepare_data(dcfg(train=[]), tok, 0)


# --------------------------------------------------------------------------------------
# Bad input


def test_truncated_jsonl_line_fails_with_file_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], '{"instruction": "Say hi.", "output": "h', ROWS[2]])
    with pytest.raises(DataError) as info:
        prep(tok, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: not valid JSON")
    assert "data.on_error=skip" in msg


def test_truncated_jsonl_line_skipped_and_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], '{"instruction": "Say hi.", "output": "h', ROWS[2], "[1, 2]"])
    data = prep(tok, path, on_error="skip")
    assert data.stats == {"rows": 4, "skipped": 2, "too_long": 0, "truncated": 0}
    assert len(data.skipped) == 2
    assert data.skipped[0].startswith(f"{path}:2: not valid JSON (Unterminated string")
    assert data.skipped[1] == f"{path}:4: expected a JSON object per line"
    assert [ex.input_ids for ex in data.train] == [expected_alpaca(ROWS[0])[0], expected_alpaca(ROWS[2])[0]]
    assert "2 malformed rows skipped" in data.summary()


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
    assert [trained_spans(tok, ex) for ex in data.train] == [["ok</s>"], ["d</s>"]]
    assert data.train[0].input_ids[: len(byte_ids(alpaca_prompt("Two\nlines", None))) + 1] == \
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
    assert [(ex.input_ids, ex.labels) for ex in data.train] == [expected_alpaca(ROWS[0])]


def test_missing_data_files_name_the_key(tmp_path, tok):
    with pytest.raises(DataError, match=r"^data.train: file not found: .*nope.jsonl$"):
        prep(tok, tmp_path / "nope.jsonl")
    train = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match=r"^data.validation: file not found: .*val.jsonl$"):
        prep(tok, train, validation=[str(tmp_path / "val.jsonl")])


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"^data.train: no usable training examples"):
        prep(tok, path, on_error="skip")


# --------------------------------------------------------------------------------------
# Truncation to max_seq_len


def _instruction_for_prompt_len(n_tokens: int) -> str:
    """An instruction whose alpaca prompt (with BOS) is exactly n_tokens long."""
    base = 1 + len(alpaca_prompt("", None).encode())
    assert n_tokens > base
    return "x" * (n_tokens - base)


def test_truncation_drops_examples_without_trained_tokens(tmp_path, tok):
    L = 200
    rows = [
        ROWS[1],  # fits
        {"instruction": _instruction_for_prompt_len(L), "output": "12345"},  # completion starts at L: dropped
        {"instruction": _instruction_for_prompt_len(L - 2), "output": "12345"},  # 2 completion tokens kept
        {"instruction": _instruction_for_prompt_len(L + 30), "output": "1"},  # prompt alone too long
        {"instruction": _instruction_for_prompt_len(L - 7), "output": "123456"},  # exactly L with EOS: not truncated
        {"instruction": _instruction_for_prompt_len(L - 1), "output": "9"},  # one trained token, at position L-1
    ]
    data = prep(tok, write_jsonl(tmp_path / "a.jsonl", rows), max_seq_len=L)
    assert data.stats == {"rows": 6, "skipped": 0, "too_long": 2, "truncated": 2}
    assert len(data.train) == 4
    fits, partial, exact, last = data.train
    assert (fits.input_ids, fits.labels) == expected_alpaca({**ROWS[1]}) and not fits.truncated

    assert partial.truncated and len(partial.input_ids) == L and len(partial.labels) == L
    assert partial.labels == [M] * (L - 2) + byte_ids("12")
    assert partial.input_ids == expected_alpaca({"input": None, **rows[2]})[0][:L]

    assert not exact.truncated and len(exact.input_ids) == L
    assert exact.labels[-7:] == byte_ids("123456") + [EOS]

    assert last.truncated and last.labels == [M] * (L - 1) + byte_ids("9")
    assert "2 dropped (no trained token within max_seq_len), 2 truncated" in data.summary()


def test_truncation_text_format(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "t.jsonl", [{"text": "0123456789" * 3}]), format="text",
                max_seq_len=16)
    ex = data.train[0]
    assert ex.input_ids == ex.labels == ([BOS] + byte_ids("0123456789" * 3))[:16]
    assert ex.truncated and data.stats["truncated"] == 1


# --------------------------------------------------------------------------------------
# Train / validation split


def _unique_rows(n: int) -> list[dict]:
    return [{"instruction": "Add.", "input": f"{i} + 1", "output": str(i + 1)} for i in range(n)]


def _keys(examples) -> list[tuple[int, ...]]:
    return [tuple(ex.input_ids) for ex in examples]


def test_split_is_seeded_disjoint_and_sized(tmp_path, tok):
    rows = _unique_rows(40)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    a = prep(tok, path, seed=0, val_ratio=0.25)
    b = prep(tok, path, seed=0, val_ratio=0.25)
    c = prep(tok, path, seed=1, val_ratio=0.25)
    assert (len(a.train), len(a.validation)) == (30, 10)
    assert _keys(a.train) == _keys(b.train) and _keys(a.validation) == _keys(b.validation)
    assert set(_keys(a.validation)) != set(_keys(c.validation))
    for d in (a, c):
        assert not set(_keys(d.train)) & set(_keys(d.validation))
        assert sorted(_keys(d.train) + _keys(d.validation)) == sorted(tuple(expected_alpaca(r)[0]) for r in rows)
        # both halves keep the file order
        all_keys = [tuple(expected_alpaca(r)[0]) for r in rows]
        assert _keys(d.train) == [k for k in all_keys if k in set(_keys(d.train))]
    assert len(prep(tok, path, val_ratio=0.1).validation) == 4
    assert len(prep(tok, path, val_ratio=0.0).validation) == 0


def test_split_of_small_data_keeps_one_validation_example(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", _unique_rows(3))
    data = prep(tok, path, val_ratio=0.1)
    assert (len(data.train), len(data.validation)) == (2, 1)
    data = prep(tok, write_jsonl(tmp_path / "b.jsonl", _unique_rows(1)), val_ratio=0.1)
    assert (len(data.train), len(data.validation)) == (1, 0)


def test_explicit_validation_files_are_used_as_given(tmp_path, tok):
    rows = _unique_rows(8)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:5])
    val = write_jsonl(tmp_path / "val.jsonl", rows[5:])
    data = prep(tok, train, val_ratio=0.5, validation=[str(val)])
    assert _keys(data.train) == [tuple(expected_alpaca(r)[0]) for r in rows[:5]]
    assert _keys(data.validation) == [tuple(expected_alpaca(r)[0]) for r in rows[5:]]
    assert data.stats["rows"] == 8


def test_several_train_files_are_concatenated_in_order(tmp_path, tok):
    rows = _unique_rows(6)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:2])
    b = write_csv(tmp_path / "b.csv", list(rows[0]), [list(r.values()) for r in rows[2:]])
    data = prep(tok, [a, b])
    assert _keys(data.train) == [tuple(expected_alpaca(r)[0]) for r in rows]


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
    assert state == {"epoch": 1, "index": 1, "seed": 5, "num_examples": 11}
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


# --------------------------------------------------------------------------------------
# prepare_data with full configs and the shipped example data


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_alpaca_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config()
    tok = load_tokenizer(cfg.model)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = _lines(ALPACA)
    assert data.stats == {"rows": len(rows), "skipped": 0, "too_long": 0, "truncated": 0}
    assert len(data.validation) == round(len(rows) * cfg.data.val_ratio) == 300
    assert len(data.train) == len(rows) - 300
    expected = {tuple(expected_alpaca({"input": None, **r})[0]): expected_alpaca({"input": None, **r})[1]
                for r in rows}
    for ex in data.train + data.validation:
        assert expected[tuple(ex.input_ids)] == ex.labels
    again = prepare_data(cfg.data, tok, cfg.seed)
    assert _keys(again.validation) == _keys(data.validation)
    other = prepare_data(cfg.data, tok, cfg.seed + 1)
    assert _keys(other.validation) != _keys(data.validation)


def test_prepare_chat_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=chat", f"data.train={CHAT}", "data.val_ratio=0")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = _lines(CHAT)
    assert len(data.train) == len(rows) and data.validation == []
    for row, ex in zip(rows, data.train):
        answers = [m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant"]
        assert trained_spans(tok, ex) == answers
        assert ex.labels[-1] == EOS


def test_prepare_text_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=text", f"data.train={TEXT}", "data.val_ratio=0", "data.add_eos=false")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    rows = _lines(TEXT)
    assert [ex.input_ids for ex in data.train] == [[BOS] + byte_ids(r["text"]) for r in rows]
    assert all(ex.labels == ex.input_ids for ex in data.train)


def test_prepare_classification_example_data_from_config(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.format=classification", "model.task=classification", f"data.train={CLASSIFICATION}",
                      "data.val_ratio=0")
    tok = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tok, cfg.seed)
    with open(CLASSIFICATION, newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    assert data.label_names == names == ["equal", "first", "second"]
    assert [ex.labels for ex in data.train] == [names.index(r["label"]) for r in rows]
    assert [ex.input_ids for ex in data.train] == [[BOS] + byte_ids(r["text"]) for r in rows]


def test_prepare_rows_per_file_reads_a_sample(make_config):
    from dtrain.model import load_tokenizer

    cfg = make_config("data.val_ratio=0")
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.seed, rows_per_file=7)
    assert data.stats["rows"] == 7 and len(data.train) == 7
    rows = _lines(ALPACA)[:7]
    assert [ex.input_ids for ex in data.train] == [expected_alpaca({"input": None, **r})[0] for r in rows]
