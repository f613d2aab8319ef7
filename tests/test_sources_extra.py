"""More sources: text paragraphs, HTML documents, plain directories, SQL queries, streamed Parquet."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dtrain.data.sources import (
    ArrowRows, DataError, RowError, StringFields, check_source, check_sql_source, iter_rows, iter_sql_rows,
    parse_sql_source, redact_url,
)


def rows_of(path: Path | str) -> list[tuple[str, object]]:
    return list(iter_rows(str(path)))


# --------------------------------------------------------------------------------------
# Plain text: one row per paragraph, at its first line


def test_text_paragraphs_with_first_line_numbers(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\nFirst paragraph,\n  second line.\n   \nSecond.\n\n\n\nThird\nends here", encoding="utf-8")
    assert rows_of(path) == [
        (f"{path}:3", {"text": "First paragraph,\n  second line."}),
        (f"{path}:6", {"text": "Second."}),
        (f"{path}:10", {"text": "Third\nends here"}),
    ]
    check_source(str(path), "data.train")


def test_markdown_crlf_and_bom(tmp_path):
    path = tmp_path / "doc.md"
    path.write_bytes("\ufeff# Title\r\n\r\nSome *text*\r\nmore\r\n\t\r\n- item\r\n".encode())
    assert rows_of(path) == [
        (f"{path}:1", {"text": "# Title"}),
        (f"{path}:3", {"text": "Some *text*\nmore"}),
        (f"{path}:6", {"text": "- item"}),
    ]


def test_text_file_without_text_is_a_row_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\t\n")
    ((where, row),) = rows_of(path)
    assert where == f"{path}:1" and isinstance(row, RowError) and str(row) == f"{path}:1: the file has no text"


def test_text_file_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok\n\ncaf\xe9\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9\)"):
        rows_of(path)


# --------------------------------------------------------------------------------------
# HTML: visible text, block breaks, title


PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  <title>  Fish &amp;
     Chips  </title>
  <style>p { color: red; }</style>
  <script>var hidden = "script text";</script>
</head>
<body>
  <nav><a href="/">Home</a> | <a href="/about">About</a></nav>
  <h1>Caf&eacute; menu</h1>
  <!-- a comment that is not shown -->
  <p>Fish   and
     <b>chips</b>, &lt;hot&gt; &amp; fresh.<br>Second line&nbsp;here.</p>
  <div>Outer text<p>Inner paragraph</p>tail</div>
  <ul><li>one</li><li>two &#x2713;</li></ul>
  <table><tr><th>Item</th><td>Price</td></tr></table>
  <pre>  keep
    this</pre>
  <p hidden>not visible</p>
  <noscript>enable JS</noscript>
  <template><p>template text</p></template>
  <script>document.write("more script")</script>
  <footer>(c) 2024</footer>
</body>
</html>
"""

PAGE_TEXT = (
    "Café menu\n\n"
    "Fish and chips, <hot> & fresh.\nSecond line\u00a0here.\n\n"
    "Outer text\n\nInner paragraph\n\ntail\n\n"
    "one\n\ntwo \u2713\n\n"
    "Item Price\n\n"
    "  keep\n    this"
)


def test_html_visible_text_exact(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(PAGE, encoding="utf-8")
    assert rows_of(path) == [(f"{path}:1", {"text": PAGE_TEXT, "title": "Fish & Chips"})]
    check_source(str(path), "data.train")


def test_html_without_title_and_malformed_markup(tmp_path):
    path = tmp_path / "broken.htm"
    path.write_text("<p>unclosed <b>bold <i>italic</p><div>after</span> the div<p>last & least", encoding="utf-8")
    assert rows_of(path) == [(f"{path}:1", {"text": "unclosed bold italic\n\nafter the div\n\nlast & least",
                                            "title": None})]


def test_html_without_visible_text_is_a_row_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.html"
    path.write_text("<html><head><title>Only a title</title></head><body><script>x()</script> \n</body></html>")
    ((where, row),) = rows_of(path)
    assert where == f"{path}:1" and isinstance(row, RowError)
    assert str(row) == f"{path}:1: no visible text in the HTML document"


def test_html_declared_non_utf8_encoding(tmp_path):
    path = tmp_path / "latin1.html"
    path.write_bytes('<meta charset="iso-8859-1"><p>Crème brûlée</p>'.encode("latin-1"))
    assert rows_of(path) == [(f"{path}:1", {"text": "Crème brûlée", "title": None})]
    bad = tmp_path / "bad.html"
    bad.write_bytes(b"<p>ok</p>\n<p>caf\xe9</p>")
    with pytest.raises(DataError, match=rf"^{bad}:2: not valid UTF-8"):
        rows_of(bad)


# --------------------------------------------------------------------------------------
# Plain directories: every supported file, recursively, in sorted order


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
    import datasets

    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (root / "a.txt").write_text("para one\n\npara two\n")
    (root / "sub" / "c.csv").write_text("text\nfrom csv\n")
    (root / "sub" / "deeper" / "e.md").write_text("deep markdown\n")
    (root / "sub" / "d.html").write_text("<title>T</title><p>from html</p>")
    datasets.Dataset.from_list([{"text": "from saved"}]).save_to_disk(str(root / "z_saved"))

    check_source(str(root), "data.train")
    got = rows_of(root)
    assert got == [
        (f"{root / 'a.txt'}:1", {"text": "para one"}),
        (f"{root / 'a.txt'}:3", {"text": "para two"}),
        (f"{root / 'b.jsonl'}:1", {"text": "from jsonl"}),
        (f"{root / 'sub' / 'c.csv'}:2", {"text": "from csv"}),
        (f"{root / 'sub' / 'd.html'}:1", {"text": "from html", "title": "T"}),
        (f"{root / 'sub' / 'deeper' / 'e.md'}:1", {"text": "deep markdown"}),
        (f"{root / 'z_saved'}:row 1", {"text": "from saved"}),
    ]
    assert rows_of(root) == got  # deterministic


def test_directory_unsupported_or_nothing_usable(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.txt").write_text("fine\n")
    (root / "data.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match=r"^data.train: .*mixed: unsupported files in the directory: data.bin;"):
        check_source(str(root), "data.train")
    with pytest.raises(DataError, match=r"unsupported files in the directory: data.bin"):
        rows_of(root)

    hidden_only = tmp_path / "hidden_only"
    hidden_only.mkdir()
    (hidden_only / ".notes.txt").write_text("hidden\n")
    with pytest.raises(DataError, match=r"^data.train: .*hidden_only is a directory but not a datasets.save_to_disk "
                                        r"directory, and holds no supported files"):
        check_source(str(hidden_only), "data.train")


# --------------------------------------------------------------------------------------
# SQL on a real SQLite file


@pytest.fixture
def sqlite_db(tmp_path) -> Path:
    path = tmp_path / "qa.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE qa (id INTEGER PRIMARY KEY, question TEXT, answer TEXT, score REAL, note TEXT)")
    con.executemany("INSERT INTO qa VALUES (?, ?, ?, ?, ?)", [
        (1, "Add 2 + 3.", "5", 0.5, None),
        (2, "Say hi.", "hi", 1.0, "greeting"),
        (3, "Échelle?", "ñé", -2.25, None),
        (4, "Subtract.", "6", 3.0, "x"),
        (5, "Last.", "end", 0.0, None),
    ])
    con.commit()
    con.close()
    return path


def test_sql_rows_are_dicts_with_aliases(sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    query = "SELECT question AS instruction, answer AS output, score, note FROM qa WHERE id <= 3 ORDER BY id"
    check_sql_source(url, query)
    assert list(iter_sql_rows(url, query)) == [
        (f"{url}:row 1", {"instruction": "Add 2 + 3.", "output": "5", "score": 0.5, "note": None}),
        (f"{url}:row 2", {"instruction": "Say hi.", "output": "hi", "score": 1.0, "note": "greeting"}),
        (f"{url}:row 3", {"instruction": "Échelle?", "output": "ñé", "score": -2.25, "note": None}),
    ]


def test_sql_streams_in_batches(sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    got = list(iter_sql_rows(url, "SELECT id FROM qa ORDER BY id;", batch_size=2))
    assert got == [(f"{url}:row {i}", {"id": i}) for i in range(1, 6)]
    it = iter_sql_rows(url, "SELECT id FROM qa ORDER BY id", batch_size=2)
    assert next(it) == (f"{url}:row 1", {"id": 1})
    it.close()  # abandoning the stream closes the connection


def test_sql_bad_query_and_missing_table_name_the_url(sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    cases = {"SELECT nope FROM qa": "no such column: nope", "SELECT * FROM missing": "no such table: missing",
             "SELEC 1": 'near "SELEC": syntax error'}
    for query, message in cases.items():
        with pytest.raises(DataError) as info:
            check_sql_source(url, query)
        assert str(info.value).startswith(f"{url}: {message}") and query in str(info.value)
        with pytest.raises(DataError) as info:
            list(iter_sql_rows(url, query))
        assert str(info.value).startswith(f"{url}: {message}")


def test_sql_statement_without_rows_is_refused_and_rolled_back(sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    with pytest.raises(DataError, match=rf"^{url}: the query returns no rows; use a SELECT"):
        list(iter_sql_rows(url, "DELETE FROM qa"))
    with sqlite3.connect(sqlite_db) as con:
        assert con.execute("SELECT count(*) FROM qa").fetchone() == (5,)


def test_sql_duplicate_columns_and_missing_file(tmp_path, sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    with pytest.raises(DataError, match=r"duplicate column names \['answer'\]; alias them"):
        list(iter_sql_rows(url, "SELECT answer, answer FROM qa"))
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(DataError, match=r"SQLite database file not found"):
        check_sql_source(f"sqlite:///{missing}", "SELECT 1")
    assert not missing.exists()  # SQLite was not allowed to create it


def test_sql_source_string_in_a_path_list(sqlite_db):
    spec = f"sql:sqlite:///{sqlite_db}::SELECT question AS text FROM qa WHERE id = 2"
    check_source(spec, "data.train")
    assert rows_of(spec) == [(f"sqlite:///{sqlite_db}:row 1", {"text": "Say hi."})]
    with pytest.raises(DataError, match=rf"^data.validation: sqlite:///{sqlite_db}: no such table: missing"):
        check_source(f"sql:sqlite:///{sqlite_db}::SELECT * FROM missing", "data.validation")
    with pytest.raises(DataError, match=r"^data.train: sql:sqlite:///x.db: expected sql:<SQLAlchemy URL>::<query>"):
        check_source("sql:sqlite:///x.db", "data.train")


def test_parse_sql_source():
    assert parse_sql_source("sql:sqlite:///a.db::SELECT x::text FROM t") == ("sqlite:///a.db", "SELECT x::text FROM t")
    assert parse_sql_source("sql:postgresql://u@[::1]:5432/db :: SELECT 1") == ("postgresql://u@[::1]:5432/db",
                                                                                 "SELECT 1")
    for bad in ("sql:sqlite:///a.db", "sql:::SELECT 1", "sql:sqlite:///a.db::  "):
        with pytest.raises(DataError, match="expected sql:<SQLAlchemy URL>::<query>"):
            parse_sql_source(bad)


# --------------------------------------------------------------------------------------
# Passwords never reach a message or a location


def test_password_redaction():
    assert redact_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert redact_url("postgresql://u:secret@h:5432/db?password=secret&sslmode=require") == \
        "postgresql://u:***@h:5432/db?password=***&sslmode=require"
    assert redact_url("sql:postgresql://u:secret@h/db::SELECT 1") == "sql:postgresql://u:***@h/db::SELECT 1"
    assert redact_url("sqlite:///a.db") == "sqlite:///a.db"
    assert "secret" not in redact_url("not a url://u:secret@host/db")
    # An environment reference is no secret: it is shown as written, and read when connecting.
    assert redact_url("postgresql://u:${PGPASS}@h/db?token=${TOK}") == "postgresql://u:${PGPASS}@h/db?token=${TOK}"


def test_password_never_in_errors(tmp_path, sqlite_db):
    for url in ("postgresql://u:secret@h/db", "postgresql+nosuchdriver://u:secret@h/db",
                f"sqlite://u:secret@/{sqlite_db}"):
        for call in (lambda: check_sql_source(url, "SELECT 1"), lambda: list(iter_sql_rows(url, "SELECT 1")),
                     lambda: check_source(f"sql:{url}::SELECT 1", "data.train"),
                     lambda: rows_of(f"sql:{url}::SELECT 1")):
            with pytest.raises(DataError) as info:
                call()
            msg = str(info.value)
            assert "secret" not in msg and ":***@" in msg, msg
    with pytest.raises(DataError, match=r"^postgresql\+nosuchdriver://u:\*\*\*@h/db: unknown database dialect"):
        check_sql_source("postgresql+nosuchdriver://u:secret@h/db", "SELECT 1")


# --------------------------------------------------------------------------------------
# Parquet and saved datasets stream in batches, with the same rows as a full read


def test_parquet_batches_give_the_same_rows(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}", "n": i if i % 7 else None, "tags": [str(i)] * (i % 3), "meta": {"k": i % 5}}
            for i in range(2500)]  # several record batches
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    expected = pq.read_table(path).to_pylist()
    assert expected == rows

    def no_full_read(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(pq, "read_table", no_full_read)
    got = rows_of(path)
    assert [row for _, row in got] == expected
    assert [where for where, _ in got] == [f"{path}:row {i}" for i in range(1, 2501)]


def test_parquet_empty_or_corrupt(tmp_path):
    empty = tmp_path / "e.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{empty}: the file is empty$"):
        rows_of(empty)
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{corrupt}: not a readable Parquet file"):
        rows_of(corrupt)


def test_saved_dataset_batches_give_the_same_rows(tmp_path):
    import datasets

    rows = [{"text": f"t{i}", "n": i} for i in range(2345)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    got = rows_of(tmp_path / "saved")
    assert [row for _, row in got] == rows
    assert got[-1][0] == f"{tmp_path / 'saved'}:row 2345"


def test_jsonl_streams_line_by_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b\\u2028c"}\r\n[1]\n{"text": "caf\xe9"}\n')
    it = iter_rows(str(path))
    assert next(it) == (f"{path}:1", {"text": "a"})
    assert next(it) == (f"{path}:3", {"text": "b\u2028c"})
    where, err = next(it)
    assert where == f"{path}:4" and isinstance(err, RowError)
    with pytest.raises(DataError, match=rf"^{path}:5: not valid UTF-8 \(byte 0xe9\)"):
        next(it)


def test_sql_check_accepts_ctes_comments_and_semicolons(sqlite_db):
    url = f"sqlite:///{sqlite_db}"
    query = "WITH good AS (SELECT * FROM qa WHERE score > 0)\nSELECT question AS text FROM good -- the positives\n;"
    check_sql_source(url, query)
    assert [row for _, row in iter_sql_rows(url, query)] == [{"text": "Add 2 + 3."}, {"text": "Say hi."},
                                                              {"text": "Subtract."}]


# --------------------------------------------------------------------------------------
# Fast path: JSONL and Parquet straight into Arrow, exactly as row by row

FIELDS = StringFields(names=("instruction", "input", "output"), required=("instruction", "output"))
GOOD = [{"instruction": f"do {i}", "input": "x" if i % 2 else None, "output": f"ok {i} caf\u00e9"} for i in range(6)]


def _fields_view(items) -> list[tuple[str, object]]:
    """(where, what the pipeline stores) for the items of iter_rows(path, FIELDS): the fields of a
    row they hold, else the whole row, or the row's error."""
    out = []
    for item in items:
        if isinstance(item, ArrowRows):
            out += [(where, ("fields", row)) for where, row in zip(item.wheres, item.table.to_pylist())]
        else:
            where, row = item
            if isinstance(row, RowError):
                out.append((where, ("error", str(row))))
            elif FIELDS.holds(row):
                out.append((where, ("fields", {k: row.get(k) for k in FIELDS.names})))
            else:
                out.append((where, ("whole", row)))
    return out


def _read_both(path: Path):
    """(fast path view, row-by-row view, number of Arrow blocks); a DataError for both is returned as its text."""
    def run(fields):
        try:
            items = list(iter_rows(str(path), fields))
        except DataError as exc:
            return f"DataError: {exc}", 0
        return _fields_view(items), sum(isinstance(i, ArrowRows) for i in items)

    (fast, blocks), (slow, no_blocks) = run(FIELDS), run(None)
    assert no_blocks == 0
    return fast, slow, blocks


def _jsonl_bytes(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


IRREGULAR_JSONL = {
    # every one of these must be read exactly as line-by-line json.loads reads it
    "crlf": b"".join(json.dumps(r).encode() + b"\r\n" for r in GOOD),
    "bom": b"\xef\xbb\xbf" + _jsonl_bytes(GOOD),
    "no final newline": _jsonl_bytes(GOOD)[:-1],
    "spaces around objects": b"".join(b"  " + json.dumps(r).encode() + b" \t\n" for r in GOOD),
    "blank line": _jsonl_bytes(GOOD[:2] + [b""] + GOOD[2:]),
    "whitespace-only line": _jsonl_bytes(GOOD[:2] + [b" \t\r"] + GOOD[2:]),
    "two objects on a line": _jsonl_bytes(GOOD[:2] + [json.dumps(GOOD[2]).encode() + json.dumps(GOOD[3]).encode()]),
    # an object over two lines plus two objects on one line: as many rows as lines, yet misaligned
    "object over two lines": _jsonl_bytes([b'{"instruction": "a",', b'"output": "b"}',
                                           json.dumps(GOOD[0]).encode() + json.dumps(GOOD[1]).encode()]),
    "carriage return between objects": _jsonl_bytes([json.dumps(GOOD[0]).encode() + b"\r"
                                                     + json.dumps(GOOD[1]).encode()]),
    "number in a field": _jsonl_bytes(GOOD[:3] + [{"instruction": "n", "output": 5}]),
    "number in the optional field": _jsonl_bytes(GOOD[:3] + [{"instruction": "n", "input": 3, "output": "o"}]),
    "required field missing": _jsonl_bytes(GOOD[:3] + [{"instruction": "n"}]),
    "required field null": _jsonl_bytes(GOOD[:3] + [{"instruction": None, "output": "o"}]),
    "repeated key": _jsonl_bytes(GOOD[:3] + [b'{"instruction": "a", "output": "b", "output": "c"}']),
    "other fields of any kind": _jsonl_bytes([{**r, "meta": {"n": [1, None, {"k": "v"}]}, "score": i * 0.5}
                                              for i, r in enumerate(GOOD)]),
    "other field changes type": _jsonl_bytes([{**r, "meta": 1 if i % 2 else "one"} for i, r in enumerate(GOOD)]),
    "repeated other key": _jsonl_bytes([b'{"instruction": "a", "output": "b", "m": 1, "m": 2}']),
    "NaN and Infinity elsewhere": _jsonl_bytes([b'{"instruction": "a", "output": "b", "m": NaN, "n": -Infinity}']),
    "escaped key and values": _jsonl_bytes([b'{"instr\\u0075ction": "\\u00e9\\ud83d\\ude00\\/\\u0000",'
                                            b' "output": "\\t"}']),
    "lone surrogate escape": _jsonl_bytes([b'{"instruction": "\\ud800", "output": "b"}']),
    "raw tab in a string": _jsonl_bytes([b'{"instruction": "a\tb", "output": "c"}']),
    "U+2028 in a string": _jsonl_bytes(['{"instruction": "a\u2028b", "output": "c"}'.encode()]),
    "trailing garbage": _jsonl_bytes(GOOD[:2] + [json.dumps(GOOD[2]).encode() + b" x"]),
    "trailing comma": _jsonl_bytes([b'{"instruction": "a", "output": "b",}']),
    "array line": _jsonl_bytes(GOOD[:2] + [b"[1, 2]"]),
    "string line": _jsonl_bytes(GOOD[:2] + [b'"text"']),
    "empty object": _jsonl_bytes(GOOD[:2] + [b"{}"]),
    "invalid UTF-8 in another field": _jsonl_bytes(GOOD[:2] + [b'{"instruction": "a", "output": "b", "m": "\xff"}']),
    "byte order mark on line 2": _jsonl_bytes(GOOD[:1]) + b"\xef\xbb\xbf" + _jsonl_bytes(GOOD[1:2]),
    "empty file": b"",
    "blank lines only": b"\n \n\r\n",
}


def test_jsonl_fast_path_reads_regular_files_as_arrow(tmp_path):
    path = tmp_path / "a.jsonl"
    long_line = _jsonl_bytes(GOOD[:2] + [{"instruction": "long", "output": "x" * 3_000_000}] + GOOD[2:])
    for name in ("plain", "crlf", "bom", "no final newline", "spaces around objects", "other fields of any kind",
                 "other field changes type", "escaped key and values", "long line"):
        path.write_bytes(IRREGULAR_JSONL.get(name, long_line if name == "long line" else _jsonl_bytes(GOOD)))
        fast, slow, blocks = _read_both(path)
        assert blocks == 1 and fast == slow, name
    assert fast[0][0] == f"{path}:1"


@pytest.mark.parametrize("name", sorted(IRREGULAR_JSONL))
def test_jsonl_fast_path_equals_line_by_line(tmp_path, name):
    path = tmp_path / "a.jsonl"
    path.write_bytes(IRREGULAR_JSONL[name])
    fast, slow, _ = _read_both(path)
    assert fast == slow


def test_jsonl_fast_path_falls_back_chunk_by_chunk(tmp_path, monkeypatch):
    """With small chunks, the chunks Arrow reads and the one it cannot interleave, and every row
    keeps its line; the bad line is reported by the line-by-line reader."""
    from dtrain.data import sources

    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 300)
    rows = [{"instruction": f"do {i}", "output": f"ok {i}"} for i in range(40)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(_jsonl_bytes(rows[:25] + [b'{"instruction": "x", "output": 5}', b"", b"not json"] + rows[25:]))
    fast, slow, blocks = _read_both(path)
    assert fast == slow and blocks >= 4
    assert fast[25] == (f"{path}:26", ("whole", {"instruction": "x", "output": 5}))
    assert fast[26] == (f"{path}:28", ("error", f"{path}:28: not valid JSON (Expecting value, column 1)"))
    assert fast[-1] == (f"{path}:43", ("fields", {"instruction": "do 39", "input": None, "output": "ok 39"}))
    path.write_bytes(_jsonl_bytes(rows[:30]) + b'{"instruction": "caf\xe9", "output": "b"}\n' + _jsonl_bytes(rows[30:]))
    fast, slow, blocks = _read_both(path)
    assert fast == slow == f"DataError: {path}:31: not valid UTF-8 (byte 0xe9); re-encode the file as UTF-8"


def test_parquet_fast_path_equals_row_by_row(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtrain.data import sources

    monkeypatch.setattr(sources, "BATCH_SIZE", 4)
    path = tmp_path / "a.parquet"
    rows = [{"instruction": f"do {i}", "output": f"ok {i}", "n": i} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), path)  # no "input" column: optional
    fast, slow, blocks = _read_both(path)
    assert fast == slow and blocks == 3 and fast[9][0] == f"{path}:row 10"
    # a null required field: that batch row by row (the error names every column), the others as Arrow
    pq.write_table(pa.Table.from_pylist(rows[:5] + [{**rows[5], "output": None}] + rows[6:]), path)
    fast, slow, blocks = _read_both(path)
    assert fast == slow and blocks == 2 and fast[5] == (f"{path}:row 6", ("whole", {**rows[5], "output": None}))
    # large strings are strings; a field of another type sends the whole file row by row
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.set_column(0, "instruction", table.column("instruction").cast(pa.large_string())), path)
    fast, slow, blocks = _read_both(path)
    assert fast == slow and blocks == 3
    pq.write_table(pa.Table.from_pylist([{**r, "input": i} for i, r in enumerate(rows)]), path)
    fast, slow, blocks = _read_both(path)
    assert fast == slow and blocks == 0


# --------------------------------------------------------------------------------------
# Through the pipeline


def test_prepare_data_reads_a_directory_of_documents(tmp_path):
    from dtrain.config import DataConfig
    from dtrain.data import prepare_data
    from dtrain.presets import byte_tokenizer

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("one two\n\nthree four\n")
    (root / "b.html").write_text("<title>B</title><p>five</p><p>six</p>")
    cfg = DataConfig.model_validate({"train": [str(root)], "format": "text", "val_ratio": 0, "test_ratio": 0,
                                     "cache_dir": str(tmp_path / "cache")})
    tok = byte_tokenizer()
    data = prepare_data(cfg, tok, 0)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in data.train["input_ids"]]
    assert sorted(texts) == ["five\n\nsix", "one two", "three four"]


@pytest.mark.parametrize("secret", ["literal", "environment"])
def test_a_database_password_is_written_nowhere_in_the_run(make_config, tmp_path, monkeypatch, secret):
    """A run trained from a database whose URL holds a secret: no file of the run directory
    (config.yaml, checkpoint manifests, metrics, TensorBoard events, report) holds it. Given as
    ${NAME}, the secret is read from the environment and the saved config keeps the reference."""
    from conftest import ALPACA

    from dtrain.train import train

    db = tmp_path / "alpaca.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE alpaca (instruction TEXT, input TEXT, output TEXT)")
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()]
    con.executemany("INSERT INTO alpaca VALUES (?, ?, ?)", [(r["instruction"], r.get("input", ""), r["output"])
                                                           for r in rows])
    con.commit()
    con.close()
    monkeypatch.setenv("DTRAIN_TEST_TOKEN", "hunter2-from-env")
    token = "hunter2-literal" if secret == "literal" else "${DTRAIN_TEST_TOKEN}"
    out = tmp_path / "run"
    # (pysqlite ignores the parameter, with a warning: it stands for a server's password here)
    cfg = make_config(f"data.train=sql:sqlite:///{db}?access_token={token}::SELECT * FROM alpaca",
                      "checkpoint.every_steps=2", "logging.tensorboard=true", "eval.every_steps=2", output_dir=out)
    train(cfg)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any("tfevents" in p.name for p in files)
    for path in files:
        data = path.read_bytes()
        assert b"hunter2" not in data, path
    saved = (out / "config.yaml").read_text()
    assert ("access_token=***" if secret == "literal" else "access_token=${DTRAIN_TEST_TOKEN}") in saved
