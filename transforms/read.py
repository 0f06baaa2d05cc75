"""Read raw input files (Parquet, JSON Lines, CSV; optionally compressed) as Arrow record batches.

Each batch carries its provenance (``_file_index`` into the stage's sorted input list, ``_row_number``) so that a
rejected row can be traced back to the file and line it came from. The index, not the path, travels with every
row: a path repeated per row would be most of the bytes of a narrow table in every shuffle.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from schemas import quarantine as qr
from schemas.config import Config, expand_inputs
from schemas.errors import InputError
from transforms.outputs import SplitTags, Tagged
from transforms.privacy import key_from_env, redact_csv_text, redact_json_text
from transforms.shuffle import ArrowBatchCoder  # noqa: F401  (imported for its registration: pa.Table/RecordBatch outputs)

MALFORMED_RECORD = qr.MALFORMED_RECORD

FILE_INDEX = "_file_index"
ROW_NUMBER = "_row_number"
NESTED = "_nested"
"""Provenance of a JSON Lines row whose list or object value was turned into text in a mixed column."""
NESTED_SEP = "\x1f"
COUNTS = "counts"
"""The output tag of row counts (``transforms.outputs``), merged into the stage's counts."""
QUARANTINED = "quarantined"
"""The output tag of rows that go to quarantine (the folder is ``run_dir.QUARANTINE``, the schema
``quarantine.SCHEMA``)."""
BATCHES = "batches"
"""The output tag of the record batches read."""
_BOM = b"\xef\xbb\xbf"


def _bare_name(path: str) -> str:
    """The file name, lower case, without a compression suffix (.gz, .bz2, .zst)."""
    name = Path(path).name.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    return name


def file_format(path: str) -> str:
    """'parquet', 'json' or 'csv' from the file name (a .gz/.bz2/.zst suffix is looked through)."""
    name = _bare_name(path)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "json"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    raise InputError(f"{path}: unknown file format (expected .parquet, .jsonl[.gz] or .csv[.gz])")


class Malformed(NamedTuple):
    """A record that could not be parsed at all: its position, raw text and why."""

    row_number: int
    text: str
    reason: str


def _valid_utf8(table: pa.Table) -> bool:
    """Whether every string value and column name is valid UTF-8. pyarrow's JSON reader copies the bytes of a
    string as they are, so an invalid byte would reach Parquet unnoticed; a full validation checks every string
    array (nested ones too) and decoding the schema's names checks the names, which validation does not."""
    def names(fields: Iterable[pa.Field]) -> None:
        for field in fields:
            _ = field.name
            names(field.type.field(i) for i in range(field.type.num_fields))

    try:
        table.validate(full=True)
        names(table.schema)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return False
    return True


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: a key given twice in one object is an error, as in pyarrow's reader (at any depth,
    objects inside lists too), not json's silent last-one-wins."""
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("an object with a key given twice")
    return record


def _read_json_lines(path: str) -> tuple[pa.Table, list[Malformed]]:
    """JSON Lines line by line: the slow path, taken only when the fast reader fails on the file (a malformed
    line, a key given twice, a column whose JSON type changes between records) or its output holds invalid UTF-8.

    Each line is decoded strictly: a line that is not UTF-8 is malformed, its text the line with the bytes
    escaped. When that was all, the other lines go through the fast reader again; else each is parsed by
    ``json``, made to reject as pyarrow does a key given twice (at any depth) and an escaped lone surrogate.
    Records are counted as pyarrow counts them (non-blank lines), so row numbers match the fast path's.
    """
    lines, rows_at, bad = [], [], []
    with pa.input_stream(path, compression="detect") as stream:
        data = stream.read().removeprefix(_BOM)              # pyarrow skips a byte order mark too
    # Only "\n" ends a JSON Lines record: str.splitlines would also split inside a text at U+2028 or NEL.
    # Blank means JSON whitespace only, as for pyarrow: a line of "\f" or U+00A0 is a (malformed) record.
    index = 0
    for raw in data.split(b"\n"):
        raw = raw.removesuffix(b"\r")
        if not raw.strip(b" \t\r"):
            continue
        try:
            raw.decode("utf-8")
            lines.append(raw)
            rows_at.append(index)
        except UnicodeDecodeError:
            bad.append(Malformed(index, raw.decode("utf-8", errors="backslashreplace"), MALFORMED_RECORD))
        index += 1
    if bad and lines:                        # perhaps only bytes were wrong: the rest as the fast path reads it
        with contextlib.suppress(pa.ArrowInvalid):
            table = pajson.read_json(pa.BufferReader(b"\n".join(lines)))
            if table.num_rows == len(lines):
                return table.append_column(ROW_NUMBER, pa.array(rows_at, pa.int64())), bad
    good, records, good_rows = [], [], []
    for raw, index in zip(lines, rows_at, strict=True):
        line = raw.decode("utf-8")
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            if "\\u" in line:                    # an escaped lone surrogate decodes, but is no UTF-8 text
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            good.append(raw)
            records.append(record)
            good_rows.append(index)
        except (ValueError, RecursionError):    # UnicodeError and JSONDecodeError are ValueErrors
            bad.append(Malformed(index, line, MALFORMED_RECORD))
    bad.sort(key=lambda m: m.row_number)
    table = None
    if good:  # the good lines through the fast path's parser, so that column types are inferred alike
        with contextlib.suppress(pa.ArrowInvalid):
            table = pajson.read_json(pa.BufferReader(b"\n".join(good)))
    if table is None or table.num_rows != len(records):
        table = _table_from_records(records)
    return table.append_column(ROW_NUMBER, pa.array(good_rows, pa.int64())), bad


def _table_from_records(records: list[dict]) -> pa.Table:
    """Parsed JSON objects → a table, column by column; a column whose values do not share one type becomes
    strings (numbers, lists and objects as their JSON text), so that validation can reject just the rows of the
    wrong type. Which rows held a list or object there is kept in ``NESTED`` (the column names, joined by
    ``NESTED_SEP``): their JSON text is not a scalar that merely looks like one (``bad_type:<column>``)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    nested: list[list[str]] = [[] for _ in records]
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for i, v in enumerate(values):
                if isinstance(v, dict | list):
                    nested[i].append(name)
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                                     pa.string())
    if any(nested):
        columns[NESTED] = pa.array([NESTED_SEP.join(n) if n else None for n in nested], pa.string())
    return pa.table(columns) if columns else pa.table({"_empty": pa.nulls(len(records))}).drop_columns(["_empty"])


def _delimiter(path: str) -> str:
    """Tab for a .tsv file (compressed or not), else comma: from the name, not from anywhere in the path."""
    return "\t" if _bare_name(path).endswith(".tsv") else ","


def _csv_parse_options(delimiter: str, invalid_row_handler: Callable[[pacsv.InvalidRow], str]) -> pacsv.ParseOptions:
    """One set of options for the fast path, the slow path's re-reading and peek_schema, so that they split alike."""
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=invalid_row_handler)


def _read_csv(path: str, string_columns: Sequence[str] = ()) -> tuple[pa.Table, list[Malformed]]:
    """A CSV/TSV file; a row with the wrong number of fields, or with bytes that are not UTF-8, is set aside as
    malformed, not fatal.

    ``string_columns`` (the contract's ids and texts) are read as text, so that an id such as "007" is not
    turned into the number 7, nor a user called "NULL" into a null. Quoted values may span lines.

    pyarrow's reader alone cannot say which row was malformed (it gives no row number when values may span
    lines) and fails the file on a byte that is not UTF-8 in a text column (in another column it would infer
    binary): such a file is read again record by record (:func:`_read_csv_records`), clean files never are.
    """
    delimiter, invalid = _delimiter(path), []
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns})
    try:
        table = pacsv.read_csv(path, parse_options=_csv_parse_options(delimiter, lambda row: invalid.append(1)
                                                                      or "skip"), convert_options=convert)
        if not invalid and not any(pa.types.is_binary(t) for t in table.schema.types):
            _ = table.column_names                  # the header's names are UTF-8 too
            return table, []
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    return _read_csv_records(path, delimiter, convert)


def _csv_record_pattern(delimiter: str, width: int | None) -> re.Pattern[bytes]:
    r"""A record and its line end, split as pyarrow's parser splits them (``ParseLine`` in arrow/csv/parser.cc,
    default options): a quote opens a quoted part only at the start of a field; inside it, a doubled quote is a
    quote and line ends are text; after it, the field goes on unquoted (a quote is text there) up to a delimiter
    or a line end ("\r\n", "\r" or "\n"). Group 1 is a record of exactly ``width`` fields, group 2 any other (all of
    them when ``width`` is None), so that the regex engine, not Python, checks the widths."""
    d = re.escape(delimiter.encode())
    field = rb'(?:"[^"]*+(?:""[^"]*+)*+"?+)?+[^' + d + rb"\r\n]*+"
    exact = rb"(?!)" if width is None else field + rb"(?:" + d + field + rb"){%d}" % (width - 1)
    return re.compile(rb"(?:(" + exact + rb")|(" + field + rb"(?:" + d + field + rb")*+))(?:\r\n|\r|\n|\Z)")


def _read_csv_records(path: str, delimiter: str, convert: pacsv.ConvertOptions) -> tuple[pa.Table, list[Malformed]]:
    """The slow path of :func:`_read_csv`: split the bytes into records as pyarrow's parser does, set aside a
    record that is not UTF-8 (its text with the bytes escaped) or has the wrong number of fields, and parse the
    others with pyarrow, so that column types are inferred as for a clean file.

    Row numbers are 0-based data rows (the header is not a row; empty lines, which pyarrow skips, are not
    counted), exact also when values span lines.
    """
    with pa.input_stream(path, compression="detect") as stream:
        data = stream.read().removeprefix(_BOM)             # pyarrow skips a byte order mark too
    header = next((m for m in _csv_record_pattern(delimiter, None).finditer(data) if m.group(2)), None)
    if header is None:
        raise pa.ArrowInvalid("Empty CSV file")
    try:
        header.group(2).decode("utf-8")
    except UnicodeDecodeError as e:
        raise pa.ArrowInvalid(f"the header is not UTF-8: {e}") from e
    options = _csv_parse_options(delimiter, lambda _: "skip")
    columns = pacsv.read_csv(pa.BufferReader(header.group(0)), parse_options=options).num_columns
    good, rows_at, bad, i = [header.group(0)], [], [], 0
    for m in _csv_record_pattern(delimiter, columns).finditer(data, header.end()):
        text = m.group(2) if m.group(1) is None else m.group(1)
        if not text:                                        # an empty line
            continue
        try:
            text.decode("utf-8")
            if m.group(1) is None:
                bad.append(Malformed(i, text.decode("utf-8"), MALFORMED_RECORD))
            else:
                good.append(m.group(0))
                rows_at.append(i)
        except UnicodeDecodeError:
            bad.append(Malformed(i, text.decode("utf-8", errors="backslashreplace"), MALFORMED_RECORD))
        i += 1
    invalid = []
    table = pacsv.read_csv(pa.BufferReader(b"".join(good)), convert_options=convert,
                           parse_options=_csv_parse_options(delimiter, lambda row: invalid.append(row.text)
                                                            or "skip"))
    if invalid or table.num_rows != len(rows_at):   # cannot happen while the split follows pyarrow's parser
        raise pa.ArrowInvalid(f"records split unlike pyarrow's parser (rejected on re-reading: {invalid[:1]})")
    return table.append_column(ROW_NUMBER, pa.array(rows_at, pa.int64())), bad


def _with_provenance(batch: pa.RecordBatch | pa.Table, file_index: int, first_row: int) -> pa.Table:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    n = table.num_rows
    if ROW_NUMBER not in table.column_names:
        table = table.append_column(ROW_NUMBER, pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
    return table.append_column(FILE_INDEX, pa.array(np.full(n, file_index, dtype=np.int32)))


def read_file(path: str, *, file_index: int = 0, batch_rows: int | None = 65_536,
              malformed: list[Malformed] | None = None, string_columns: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """The parseable rows of one file as record batches with provenance columns.

    Parquet is streamed batch by batch (memory stays bounded by ``batch_rows``); JSON Lines and CSV are
    parsed whole, so that types are inferred from the whole file. A malformed JSON line or CSV row costs only
    that record: it is appended to ``malformed`` (complete once the iterator is exhausted). A file that cannot be
    opened or parsed at all is an InputError naming it. ``batch_rows=None``: JSON and CSV come in the parser's
    own blocks, without regrouping them (a copy), for a caller that concatenates the batches anyway; Parquet then
    streams batches of 65,536 rows.
    """
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            first = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows or 65_536):
                yield from _with_provenance(batch, file_index, first).to_batches()
                first += batch.num_rows
            return
        bad: list[Malformed] = []
        if fmt == "json":
            table = None
            with contextlib.suppress(pa.ArrowInvalid):
                table = pajson.read_json(path)
            if table is None or not _valid_utf8(table):
                table, bad = _read_json_lines(path)
        else:
            table, bad = _read_csv(path, string_columns)
        if malformed is not None:
            malformed.extend(bad)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e
    table = _with_provenance(table, file_index, 0)
    if batch_rows is None:                               # the parser's own blocks, without a copy
        yield from table.to_batches()
        return
    for start in range(0, table.num_rows, batch_rows):   # the parser's ~1 MB blocks, regrouped to batch_rows
        yield from table.slice(start, batch_rows).combine_chunks().to_batches()


def peek_schema(path: str) -> pa.Schema:
    """Schema of a file's columns (the Parquet footer, or the first block of a JSON/CSV file)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt == "json":
            try:
                with pajson.open_json(path) as reader:
                    schema = reader.schema
                if _valid_utf8(schema.empty_table()):                   # the names (no values yet)
                    return schema
            except (pa.ArrowInvalid, UnicodeDecodeError):
                pass
            table = _read_json_lines(path)[0]
            return table.drop_columns([c for c in (ROW_NUMBER, NESTED) if c in table.column_names]).schema
        try:
            with pacsv.open_csv(path, parse_options=_csv_parse_options(_delimiter(path), lambda _: "skip")) as reader:
                schema = reader.schema
            if not any(pa.types.is_binary(t) for t in schema.types):     # binary: bytes that are not UTF-8
                _ = schema.names
                return schema
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
        table = _read_csv(path)[0]
        return table.drop_columns([c for c in [ROW_NUMBER] if c in table.column_names]).schema
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e


def input_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The impression and signal files a run reads (for a scheduled day, ``{date}`` paths cover the days
    within ``ingest.late_window`` of it): what ingest reads and a scheduled dry run checks."""
    window = {"day": cfg.ingest.day, "late_window": cfg.ingest.late_window}
    return (expand_inputs(cfg.input.impressions, what="impressions", **window),
            expand_inputs(cfg.input.signals, what="signals", **window))


INTERNAL_COLUMNS = (FILE_INDEX, ROW_NUMBER, NESTED)
"""Names obsfeed gives its own provenance columns while it reads: an input column may not have them."""


def file_schemas(files: Sequence[str]) -> dict[str, pa.Schema]:
    """Each file's columns, peeked once (a JSON Lines file the fast reader refuses is read whole for it)."""
    return {path: peek_schema(path) for path in files}


def check_columns(files: Sequence[str], schema: pa.Schema, schemas: dict[str, pa.Schema] | None = None) -> None:
    """Fail early, naming the file, when a file lacks a required column of the contract or has a column named
    like one of obsfeed's provenance columns (``schemas``: the files' columns, if already peeked)."""
    required = [f.name for f in schema if not f.nullable]
    schemas = schemas or file_schemas(files)
    for path in files:
        names = set(schemas[path].names)
        if not names:               # an empty file: no rows to check
            continue
        internal = sorted(names & set(INTERNAL_COLUMNS))
        if internal:
            raise InputError(f"{path}: column '{internal[0]}' is a name obsfeed uses for its own provenance "
                             "columns; rename it in the input")
        missing = [c for c in required if c not in names]
        if missing:
            raise InputError(f"{path}: required column '{missing[0]}' is missing")


def malformed_rows(malformed: list[Malformed], path: str, table: str, *, user_column: str | None = None,
                   hash_key: bytes | None = None) -> pa.Table:
    """Unparseable records in the quarantine schema (``record`` is the raw text, as it was in the file, except
    that a ``user_column`` value in it is replaced by its pseudonym: ``transforms.privacy``)."""
    texts = [m.text for m in malformed]
    if user_column is not None and texts:
        if file_format(path) == "csv":
            header = _csv_header(path)
            texts = [redact_csv_text(t, header, hash_key, _delimiter(path), user_column) for t in texts]
        else:
            texts = [redact_json_text(t, hash_key, user_column) for t in texts]
    return pa.table({
        qr.TABLE: [table] * len(malformed), qr.SOURCE_FILE: [path] * len(malformed),
        qr.ROW_NUMBER: [m.row_number for m in malformed], qr.REASON: [m.reason for m in malformed],
        qr.RECORD: texts,
    }, schema=qr.SCHEMA)


def _csv_header(path: str) -> list[str]:
    with pa.input_stream(path, compression="detect") as stream:
        first = re.split(rb"\r\n|\r|\n", stream.read(1 << 20).removeprefix(_BOM), maxsplit=1)[0]
    return next(csv.reader([first.decode("utf-8", errors="replace")], delimiter=_delimiter(path)), [])


@beam.typehints.with_output_types(Tagged)
class ReadFileBatches(beam.DoFn):
    """(file index, path) in, record batches out (``batches``); unparseable records (``quarantined``), row counts
    (``counts``): each a :class:`transforms.outputs.Tagged` output."""

    def __init__(self, table: str, batch_rows: int = 65_536, string_columns: Sequence[str] = (), *,
                 user_column: str | None = None, key_env: str | None = None):
        self._table = table
        self._batch_rows, self._strings = batch_rows, list(string_columns)
        self._user_column, self._key_env, self._key = user_column, key_env, None

    def setup(self):
        if self._user_column is not None:
            self._key = key_from_env(self._key_env)      # on the worker: the pipeline graph holds no secret

    def process(self, item: tuple[int, str]):
        index, path = item
        malformed: list[Malformed] = []
        rows = 0
        for batch in read_file(path, file_index=index, batch_rows=self._batch_rows, malformed=malformed,
                               string_columns=self._strings):
            rows += batch.num_rows
            yield Tagged(BATCHES, batch)
        counts = {f"{self._table}.rows_in": rows + len(malformed)}
        if malformed:
            yield Tagged(QUARANTINED, malformed_rows(malformed, path, self._table, user_column=self._user_column,
                                                     hash_key=self._key))
            counts[f"{self._table}.rows_quarantined"] = len(malformed)
        yield Tagged(COUNTS, counts)


class RawBatches(NamedTuple):
    batches: beam.PCollection
    quarantine: beam.PCollection
    counts: beam.PCollection


class ReadRaw(beam.PTransform):
    """``files`` of one table → ``RawBatches``: RecordBatches, unparseable records, row counts.

    ``string_columns``: columns that a CSV file must keep as text (the contract's ids and texts); ``user_column``
    and ``key_env``: the raw user id a malformed record's text may hold is pseudonymised with that key.
    """

    def __init__(self, files: list[str], table: str, batch_rows: int = 65_536, string_columns: Sequence[str] = (),
                 **options):
        super().__init__()
        self._files, self._table, self._batch_rows = list(files), table, batch_rows
        self._strings, self._options = list(string_columns), options

    def expand(self, pbegin):
        # Create reshuffles several elements itself (each file may be read on another worker); one needs none.
        out = (pbegin
               | "Files" >> beam.Create(list(enumerate(self._files)))
               | "Read" >> beam.ParDo(ReadFileBatches(self._table, self._batch_rows, self._strings, **self._options))
               | "Outputs" >> SplitTags({BATCHES: pa.RecordBatch, QUARANTINED: pa.Table, COUNTS: dict}))
        return RawBatches(out[BATCHES], out[QUARANTINED], out[COUNTS])


class ReadParts(beam.PTransform):
    """A dataset's part files → (part index, Arrow table per row group), keeping each part's identity so
    that a stage can write its output with the same partitioning (and so deterministically); with
    ``groups``, ((part index, row group index), table), so that a part can be rewritten in its own row order one
    row group at a time."""

    def __init__(self, files: list[str], columns: list[str] | None = None, groups: bool = False):
        super().__init__()
        self._files, self._columns, self._groups = list(files), columns, groups

    def expand(self, pbegin):
        columns, groups = self._columns, self._groups

        def read(item: tuple[int, str]):
            index, path = item
            pf = pq.ParquetFile(path)
            for g in range(pf.num_row_groups):
                yield (index, g) if groups else index, pf.read_row_group(g, columns=columns)

        return (pbegin
                | "Parts" >> beam.Create(list(enumerate(self._files)))          # reshuffled by Create itself
                | "ReadRowGroups" >> beam.FlatMap(read).with_output_types(tuple[Any, pa.Table]))
