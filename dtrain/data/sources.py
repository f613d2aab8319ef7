"""Read rows from files, directories and SQL queries, remembering where each came from ("file:line").

Source kinds (a path's suffix decides; `check_source` / `iter_rows` take any of them):

- `.jsonl` (one object a line), `.json` (an array of objects), `.csv` (header row): one row per record.
- `.parquet`: streamed by record batch; where = "file:row N".
- `.txt`, `.md`: one row `{"text": paragraph}` per paragraph. A paragraph is a run of non-blank
  lines (a blank line is empty or whitespace only); its lines are kept as written, joined by
  "\n" (no Markdown rendering: a fenced code block with blank lines is split like any text).
  where = "file:line" of the paragraph's first line.
- `.html`, `.htm`: one row `{"text": visible text, "title": <title> or None}` per document,
  where = "file:1". Parsed with BeautifulSoup's stdlib "html.parser" (lenient with malformed
  markup, and the same tree everywhere, unlike lxml/html5lib which may or may not be installed).
- A `datasets.save_to_disk` directory (train split of a DatasetDict); where = "dir:row N".
- Any other directory: read recursively, every supported file (and saved-dataset subdirectory)
  in sorted path order; hidden names (".*") are ignored, other unsupported files are an error.
- `sql:<SQLAlchemy URL>::<query>`: the rows of a query (see `iter_sql_rows`), e.g.
  `sql:sqlite:///data/qa.db::SELECT q AS instruction, a AS output FROM qa`. The URL ends at the
  first "::" outside square brackets (so an IPv6 host `[::1]` and a `x::text` cast both work).
  `${NAME}` in the URL is the environment variable NAME, read when connecting: a password given
  so is never in the config at all. A literal one is shown and saved as `***` (`redact_url`).

Fast path: given `StringFields`, `iter_rows` hands over runs of JSONL lines and Parquet record
batches that Arrow parses in C++ as `ArrowRows` blocks (the fields as string columns) instead of
one dict per row, when that is exact: the same rows, values and locations as row by row. Anything
irregular (a malformed line, a field of another type, a blank line, invalid UTF-8, ...) sends that
part of the file down the row-by-row path, which reports the problem with file and line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

if TYPE_CHECKING:
    import pyarrow as pa
    from bs4 import Tag
    from sqlalchemy.engine import Engine


class DataError(ValueError):
    """A problem with the data, naming the file, line and field."""


class RowError(ValueError):
    """A malformed row. `where` is "file:line"; the run fails or skips it (data.on_error)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


SUFFIXES = {
    ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
    ".txt": "text", ".md": "text", ".html": "html", ".htm": "html",
}
SQL_PREFIX = "sql:"
BATCH_SIZE = 1000  # rows per Arrow record batch / SQL fetchmany
JSONL_CHUNK_BYTES = 16 << 20  # JSONL is read (and handed to Arrow) in runs of whole lines this long


@dataclass(frozen=True)
class StringFields:
    """Fields a reader may hand over as Arrow string columns instead of row dicts: rows in which
    each of `names` is a string, or absent or null where it is not `required`."""

    names: tuple[str, ...]
    required: tuple[str, ...]

    def holds(self, row: dict[str, Any]) -> bool:
        return (all(isinstance(row.get(name), str) for name in self.required)
                and all(row.get(name) is None or isinstance(row.get(name), str) for name in self.names))


@dataclass
class ArrowRows:
    """Consecutive rows read straight into Arrow: `table` has one string column per field of the
    StringFields (null where a row lacks it), `wheres` each row's location."""

    table: pa.Table
    wheres: list[str]

    def head(self, n: int) -> ArrowRows:
        return ArrowRows(self.table.slice(0, n), self.wheres[:n])


Row = tuple[str, Union[dict[str, Any], RowError]]


def check_source(path: str, key: str) -> None:
    """Fail early (DataError starting with `key`) if `path` cannot be read as a source."""
    if is_sql_source(path):
        try:
            check_sql_source(*parse_sql_source(path))
        except DataError as exc:
            raise DataError(f"{key}: {exc}") from None
        return
    p = Path(path)
    if p.is_dir():
        if not _is_saved_dataset(p):
            _dir_sources(p, key)
        return
    if not p.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{key}: {path}: unsupported file type {p.suffix!r}; use one of {sorted(SUFFIXES)}")


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


def _dir_sources(root: Path, key: str = "") -> list[Path]:
    """Supported files and saved-dataset subdirectories under `root`, recursively, in sorted order.

    Hidden names are skipped; any other unsupported file, or nothing usable at all, is a DataError.
    """
    found: list[Path] = []
    unsupported: list[Path] = []
    seen: set[Path] = set()

    def walk(d: Path) -> None:
        real = d.resolve()
        if real in seen:  # a symlink loop
            return
        seen.add(real)
        for entry in sorted(d.iterdir(), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not _is_saved_dataset(entry):
                walk(entry)
            elif entry.is_dir():
                found.append(entry)
            elif entry.suffix.lower() in SUFFIXES:
                found.append(entry)
            else:
                unsupported.append(entry)

    walk(root)
    prefix = f"{key}: " if key else ""
    if unsupported:
        names = ", ".join(str(u.relative_to(root)) for u in unsupported[:10])
        more = f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
        raise DataError(f"{prefix}{root}: unsupported files in the directory: {names}{more}; supported: "
                        f"{sorted(SUFFIXES)} (hidden files are ignored)")
    if not found:
        raise DataError(f"{prefix}{root} is a directory but not a datasets.save_to_disk directory, and holds no "
                        f"supported files ({sorted(SUFFIXES)})")
    return found


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8") from None


def iter_rows(path: str, fields: StringFields | None = None) -> Iterator[Row | ArrowRows]:
    """Yield (where, row) for every row of a source; a row that cannot be parsed is a RowError.

    With `fields`, runs of rows that Arrow reads exactly come as ArrowRows blocks instead (see
    the module's docstring); without, every row comes as (where, row).
    """
    if is_sql_source(path):
        yield from iter_sql_rows(*parse_sql_source(path))
        return
    p = Path(path)
    if p.is_dir():
        if _is_saved_dataset(p):
            yield from _iter_saved_dataset(path)
        else:
            for sub in _dir_sources(p):
                yield from iter_rows(str(sub), fields)
        return
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of {sorted(SUFFIXES)}")
    if kind == "parquet":
        yield from _iter_parquet(path, fields)
        return
    if kind == "jsonl":
        yield from _iter_jsonl(path, fields)
        return
    raw = p.read_bytes()
    if kind == "html":
        yield from _iter_html(raw, path)
        return
    if not raw.strip():
        if kind == "text":  # a document, like an HTML file without text: a (skippable) bad row
            yield f"{path}:1", RowError(f"{path}:1", "the file has no text")
            return
        raise DataError(f"{path}: the file is empty")
    text = _decode(raw, path)
    if kind == "text":
        yield from _iter_paragraphs(text, path)
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


def _iter_jsonl(path: str, fields: StringFields | None = None) -> Iterator[Row | ArrowRows]:
    """Stream a JSONL file line by line, split on the newline byte only (U+2028 and friends are
    legal inside JSON strings; a carriage return is JSON whitespace). With `fields`, each run of
    lines that Arrow reads exactly comes as one ArrowRows block."""
    any_content = False
    lineno = 1  # of the chunk's first line
    for chunk in _line_chunks(path):
        lines = chunk.split(b"\n")
        if chunk.endswith(b"\n"):
            lines.pop()  # the final line break ends a line, it does not start one
        block = _jsonl_arrow_rows(chunk, lines, path, lineno, fields) if fields is not None else None
        if block is not None:
            any_content = True
            yield block
        else:
            for offset, raw in enumerate(lines):
                any_content = any_content or bool(raw.strip())
                yield from _jsonl_line(raw, path, lineno + offset)
        lineno += len(lines)
    if not any_content:
        raise DataError(f"{path}: the file is empty")


def _line_chunks(path: str) -> Iterator[bytes]:
    """The file in runs of whole lines of about JSONL_CHUNK_BYTES (a longer line is a run of its
    own; the last run may lack a final line break), without a UTF-8 byte order mark at the start."""
    with open(path, "rb") as f:
        pending = f.read(JSONL_CHUNK_BYTES)
        if pending.startswith(codecs.BOM_UTF8):
            pending = pending[len(codecs.BOM_UTF8):]
        while block := f.read(JSONL_CHUNK_BYTES):
            end = pending.rfind(b"\n") + 1
            if end:
                yield pending[:end]
            pending = pending[end:] + block
        if pending:
            yield pending


def _jsonl_line(raw: bytes, path: str, lineno: int) -> Iterator[Row]:
    """The row of one JSONL line (none for a blank line)."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")  # the line break is not part of the JSON text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                        "re-encode the file as UTF-8") from None
    if not line.strip():
        return
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        yield where, RowError(where, f"not valid JSON ({exc.msg}, column {exc.colno})")
        return
    yield where, row if isinstance(row, dict) else RowError(where, "expected a JSON object per line")


def _jsonl_arrow_rows(chunk: bytes, lines: list[bytes], path: str, lineno: int,
                      fields: StringFields) -> ArrowRows | None:
    """The chunk's rows parsed by Arrow, or None unless that gives exactly what line-by-line
    json.loads gives for `fields`. Arrow skips blank lines, reads an object spread over several
    lines and several objects on one line, and does not check the UTF-8 of fields it skips; so
    every line must be one object ({...}) that Arrow reads as one row, the bytes valid UTF-8,
    and every required field present. Arrow itself refuses a field of another type (the schema
    says string) and a repeated key."""
    import pyarrow as pa
    import pyarrow.json as pa_json

    for line in lines:
        line = line.strip(b" \t\r")  # JSON whitespace; \n cannot occur
        if not (line.startswith(b"{") and line.endswith(b"}")):
            return None
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return None
    schema = pa.schema([(name, pa.string()) for name in fields.names])
    # Arrow parses blocks of whole lines in parallel; a line longer than a block would fail.
    block_size = max(1 << 20, max(map(len, lines)) + 1)
    try:
        table = pa_json.read_json(pa.BufferReader(chunk), read_options=pa_json.ReadOptions(block_size=block_size),
                                  parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                                                     unexpected_field_behavior="ignore"))
    except pa.ArrowException:
        return None
    if table.num_rows != len(lines) or any(table.column(name).null_count for name in fields.required):
        return None
    return ArrowRows(table, [f"{path}:{lineno + i}" for i in range(len(lines))])


def _iter_parquet(path: str, fields: StringFields | None = None) -> Iterator[Row | ArrowRows]:
    """Stream a Parquet file record batch by record batch (never the whole table in memory).
    With `fields`, a batch whose fields are string columns (required ones without nulls) comes
    as one ArrowRows block."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        parquet = pq.ParquetFile(path)
        as_arrow = fields is not None and _parquet_has_string_fields(parquet.schema_arrow, fields)
        i = 0
        for batch in parquet.iter_batches(batch_size=BATCH_SIZE):
            block = _parquet_arrow_rows(batch, fields, path, i) if as_arrow else None
            if block is not None:
                i += batch.num_rows
                yield block
                continue
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:row {i}", row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _parquet_has_string_fields(schema: pa.Schema, fields: StringFields) -> bool:
    """Each field is one string column, or absent where it is not required."""
    import pyarrow as pa

    for name in fields.names:
        found = schema.get_all_field_indices(name)
        if not found and name in fields.required:
            return False
        if found and (len(found) > 1 or not (pa.types.is_string(schema.field(found[0]).type)
                                             or pa.types.is_large_string(schema.field(found[0]).type))):
            return False
    return True


def _parquet_arrow_rows(batch: pa.RecordBatch, fields: StringFields, path: str, start: int) -> ArrowRows | None:
    import pyarrow as pa

    names = batch.schema.names
    if any(batch.column(name).null_count for name in fields.required):
        return None  # row by row, so that each such row gets its error
    columns = [batch.column(name).cast(pa.string()) if name in names else pa.nulls(batch.num_rows, pa.string())
               for name in fields.names]
    return ArrowRows(pa.Table.from_arrays(columns, names=list(fields.names)),
                     [f"{path}:row {start + i}" for i in range(1, batch.num_rows + 1)])


def _iter_saved_dataset(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a save_to_disk dataset (memory-mapped Arrow) in batches."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split; point at one split's directory")
        ds = ds["train"]
    i = 0
    for batch in ds.iter(batch_size=BATCH_SIZE):
        for values in zip(*batch.values()):
            i += 1
            yield f"{path}:row {i}", dict(zip(batch, values))


# --------------------------------------------------------------------------------------
# Plain text and HTML documents


def _iter_paragraphs(text: str, path: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """One {"text": ...} row per blank-line separated paragraph, at its first line's number."""
    start, lines = 0, []
    # split on newlines only (as editors count lines, unlike str.splitlines); CRLF's \r is dropped
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            yield f"{path}:{start}", {"text": "\n".join(lines)}
            lines = []
    if lines:
        yield f"{path}:{start}", {"text": "\n".join(lines)}
    elif not start:
        yield f"{path}:1", RowError(f"{path}:1", "the file has no text")


_HTML_DROP = frozenset({"script", "style", "noscript", "head", "nav", "footer", "template", "title"})
_HTML_BLOCKS = frozenset(
    "address article aside blockquote body caption center dd details dialog div dl dt fieldset figcaption figure "
    "form h1 h2 h3 h4 h5 h6 header hgroup hr html li main menu ol p pre section summary table tbody tfoot thead "
    "tr ul".split()
)
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace; U+00A0 (&nbsp;) is kept
_BREAK = object()  # a paragraph break between block elements


class _Pre(str):
    """The text of a <pre> element: kept verbatim."""


def _iter_html(raw: bytes, path: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    from bs4 import BeautifulSoup

    where = f"{path}:1"
    soup = BeautifulSoup(_decode_html(raw, path), "html.parser")
    title_tag = soup.find("title")
    title = _HTML_SPACE.sub(" ", title_tag.get_text()).strip(" ") if title_tag is not None else ""
    text = _join_html_pieces(_html_pieces(soup))
    if not text:
        yield where, RowError(where, "no visible text in the HTML document")
        return
    yield where, {"text": text, "title": title or None}


def _decode_html(raw: bytes, path: str) -> str:
    """UTF-8 (BOM allowed); else the encoding the document declares (<meta charset>); else an error."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from bs4.dammit import EncodingDetector

    declared = EncodingDetector.find_declared_encoding(raw, is_html=True)
    if declared:
        try:
            return raw.decode(declared)
        except (LookupError, UnicodeDecodeError):
            pass
    return _decode(raw, path)  # raises, naming the line


def _html_pieces(root: Tag) -> list[Any]:
    """Visible text of `root` in document order: strings, a newline for <br>, _BREAK around blocks.

    Iterative (an explicit stack), so deeply nested malformed markup cannot hit the recursion limit.
    """
    from bs4 import NavigableString, Tag
    from bs4.element import PreformattedString  # comments, doctypes, CDATA, processing instructions

    pieces: list[Any] = []
    stack = [(root, iter(root.children))]
    while stack:
        tag, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            if tag.name in _HTML_BLOCKS:
                pieces.append(_BREAK)
        elif isinstance(child, NavigableString):
            if not isinstance(child, PreformattedString):
                pieces.append(_HTML_SPACE.sub(" ", str(child)))
        elif isinstance(child, Tag) and child.name not in _HTML_DROP and not child.has_attr("hidden"):
            if child.name == "br":
                pieces.append("\n")
            elif child.name == "pre":
                pieces += [_BREAK, _Pre(child.get_text()), _BREAK]
            else:
                if child.name in ("td", "th"):
                    pieces.append(" ")
                if child.name in _HTML_BLOCKS:
                    pieces.append(_BREAK)
                stack.append((child, iter(child.children)))
    return pieces


def _join_html_pieces(pieces: list[Any]) -> str:
    """Blocks separated by a blank line; inside a block, spaces collapsed and lines stripped."""
    blocks: list[str] = []
    current: list[str] = []

    def flush() -> None:
        lines = [re.sub(" +", " ", line).strip(" ") for line in "".join(current).split("\n")]
        current.clear()
        block = "\n".join(lines).strip("\n")
        if block:
            blocks.append(block)

    for piece in pieces:
        if piece is _BREAK:
            flush()
        elif isinstance(piece, _Pre):
            flush()
            if piece.strip():
                blocks.append(piece.strip("\r\n"))
        else:
            current.append(piece)
    flush()
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------
# SQL (SQLAlchemy)

_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(url: str) -> str:
    """`url` with each `${NAME}` replaced by the environment variable NAME (DataError if unset)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise DataError(f"{redact_url(url)}: the environment variable {name} (${{{name}}} in the URL) is not set")
        return os.environ[name]

    return _ENV_REFERENCE.sub(value, url)


def _keep(value: str | None) -> bool:
    """A secret written as ${NAME} is a reference, not the secret: it may be shown."""
    return value is not None and _ENV_REFERENCE.fullmatch(value) is not None
_LIMIT_DIALECTS = frozenset({"sqlite", "postgresql", "mysql", "mariadb", "duckdb"})


def is_sql_source(path: str) -> bool:
    return path.startswith(SQL_PREFIX)


def _split_sql_spec(spec: str) -> tuple[str, str] | None:
    m = re.match(r"((?:\[[^\]]*\]|[^\[])*?)::(.*)", spec[len(SQL_PREFIX):], re.DOTALL)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).strip()


def parse_sql_source(spec: str) -> tuple[str, str]:
    """Split "sql:<url>::<query>" into (url, query); the URL ends at the first "::" outside [...]."""
    parts = _split_sql_spec(spec)
    if parts is None:
        raise DataError(f"{redact_url(spec)}: expected sql:<SQLAlchemy URL>::<query>, "
                        "e.g. sql:sqlite:///data.db::SELECT text FROM docs")
    return parts


def redact_url(url: str) -> str:
    """The URL (or sql:<url>::<query> source) with its password and password-like query
    parameters replaced by ***."""
    if is_sql_source(url):
        parts = _split_sql_spec(url)
        if parts is None:
            return SQL_PREFIX + redact_url(url[len(SQL_PREFIX):])
        return f"{SQL_PREFIX}{redact_url(parts[0])}::{parts[1]}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        # unparseable: hide everything between "://" and the last "@" (over-hiding is safe)
        return re.sub(r"(?<=://).*@", "***@", url, count=1)
    if parsed.query:
        parsed = parsed.set(query={k: ("***" if _SECRET_PARAM.search(k) and not _keep(v) else v)
                                   for k, v in parsed.query.items()})
    shown = parsed.render_as_string(hide_password=not _keep(parsed.password))
    return shown.replace("%2A%2A%2A", "***").replace("%24%7B", "${").replace("%7D", "}")


def _scrub(message: str, url: str) -> str:
    """`message` without the URL's password, should a driver echo it."""
    from sqlalchemy.engine import make_url

    try:  # (the secrets as the driver saw them: environment references expanded)
        parsed = make_url(_ENV_REFERENCE.sub(lambda m: os.environ.get(m.group(1), m.group(0)), url))
    except Exception:  # noqa: BLE001 - an unparseable URL has no parsed password to scrub
        return message
    secrets = [parsed.password] + [v for k, v in parsed.query.items() if _SECRET_PARAM.search(k)]
    for secret in secrets:
        for value in (secret,) if isinstance(secret, str) else (secret or ()):  # a repeated parameter: a tuple
            if value:
                message = message.replace(value, "***")
    return message


def _db_error(url: str, exc: Exception, query: str | None = None) -> DataError:
    """A DataError naming the redacted URL, the database's own message and (short) the query."""
    from sqlalchemy.exc import DBAPIError

    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = [line for line in str(orig).splitlines() if line.strip()]
    message = _scrub(lines[0].strip() if lines else type(orig).__name__, url)
    if query is not None:
        short = " ".join(query.split())
        message += f" (query: {short[:200]}{'...' if len(short) > 200 else ''})"
    return DataError(f"{redact_url(url)}: {message}")


def _engine(url: str) -> Engine:
    """An engine for `url`, or a DataError (bad URL, unknown dialect, driver missing, no SQLite file)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    name = redact_url(url)
    url = expand_env(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise DataError(f"{name}: not a valid SQLAlchemy database URL "
                        "(dialect+driver://user:password@host/database)") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        uri = str(parsed.query.get("uri", "")).lower() in ("true", "1")
        # SQLite would silently create a missing file; an empty new database is never what was meant
        if db and db != ":memory:" and not uri and not db.startswith("file:") and not Path(db).is_file():
            raise DataError(f"{name}: SQLite database file not found: {db}")
    try:
        return create_engine(parsed)
    except NoSuchModuleError:
        raise DataError(f"{name}: unknown database dialect or driver {parsed.drivername!r}") from None
    except ImportError as exc:
        raise DataError(f"{name}: the database driver is not installed ({exc})") from None
    except ArgumentError as exc:
        raise _db_error(url, exc) from None


def _check_columns(keys: list[str], url: str) -> None:
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise DataError(f"{redact_url(url)}: the query returns duplicate column names {dupes}; alias them (AS ...)")


def check_sql_source(url: str, query: str) -> None:
    """Connect and validate `query` cheaply: run it wrapped as `SELECT * FROM (query) LIMIT 0` where
    the dialect allows (SQLite, PostgreSQL, MySQL/MariaDB, DuckDB). If that fails, or elsewhere, the
    query itself is run and only its column names are read, so an error is the database's own message
    about the query as written. Nothing is committed. Raises DataError naming the redacted URL."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            result = None
            if engine.dialect.name in _LIMIT_DIALECTS:
                probe = f"SELECT * FROM (\n{query.strip().rstrip(';')}\n) AS dtrain_check LIMIT 0"
                try:
                    result = conn.execute(text(probe))
                except SQLAlchemyError:
                    conn.rollback()  # e.g. PostgreSQL refuses more statements in a failed transaction
            if result is None:
                result = conn.execution_options(stream_results=True).execute(text(query))
            if not result.returns_rows:
                raise DataError(f"{redact_url(url)}: the query returns no rows; use a SELECT")
            _check_columns(list(result.keys()), url)
            result.close()
    except SQLAlchemyError as exc:
        raise _db_error(url, exc, query) from None
    finally:
        engine.dispose()


def iter_sql_rows(url: str, query: str, *, batch_size: int = BATCH_SIZE) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream the rows of `query` as dicts keyed by column name (aliases included), `batch_size`
    at a time (a server-side cursor where the driver has one); where = "<redacted url>:row N".

    `query` is SQLAlchemy `text()`: a literal ":name" must be written "\\:name". The connection is
    closed without committing. Errors raise DataError naming the redacted URL and the database's message.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    name = redact_url(url)
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(text(query))
            if not result.returns_rows:
                raise DataError(f"{name}: the query returns no rows; use a SELECT")
            _check_columns(list(result.keys()), url)
            rows = result.mappings()
            i = 0
            while batch := rows.fetchmany(batch_size):
                for row in batch:
                    i += 1
                    yield f"{name}:row {i}", dict(row)
    except SQLAlchemyError as exc:
        raise _db_error(url, exc, query) from None
    finally:
        engine.dispose()
