"""Read raw input files (Parquet, JSON Lines, CSV; optionally compressed) as Arrow record batches.

Each batch carries its provenance (``_file_index`` into the stage's sorted input list, ``_row_number``) so that a
rejected row can be traced back to the file and line it came from. The index, not the path, travels with every
row: a path repeated per row would be most of the bytes of a narrow table in every shuffle.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from schemas import quarantine as qr
from schemas.errors import InputError

MALFORMED_RECORD = qr.MALFORMED_RECORD

FILE_INDEX = "_file_index"
ROW_NUMBER = "_row_number"
COUNTS = "counts"
QUARANTINE = "quarantine"


def file_format(path: str) -> str:
    """'parquet', 'json' or 'csv' from the file name (a .gz/.bz2/.zst suffix is looked through)."""
    name = Path(path).name.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
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


def _read_json_lines(path: str) -> tuple[pa.Table, list[Malformed]]:
    """JSON Lines, one record at a time: the slow path, taken only when the fast reader fails on the file
    (a malformed line, or a column whose JSON type changes between records).

    Records are counted as pyarrow counts them (non-blank lines), so row numbers match the fast path's.
    """
    good, records, rows_at, bad = [], [], [], []
    with pa.input_stream(path, compression="detect") as stream:
        # Only "\n" ends a JSON Lines record: str.splitlines would also split inside a text at U+2028 or NEL.
        lines = [line.removesuffix("\r") for line in stream.read().decode("utf-8", errors="replace").split("\n")]
    index = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            good.append(line)
            records.append(record)
            rows_at.append(index)
        except ValueError:
            bad.append(Malformed(index, line, MALFORMED_RECORD))
        index += 1
    try:  # the good lines through the fast path's parser, so that column types are inferred alike
        table = pajson.read_json(pa.BufferReader("\n".join(good).encode())) if good else pa.table({})
    except pa.ArrowInvalid:
        table = _table_from_records(records)
    return table.append_column(ROW_NUMBER, pa.array(rows_at, pa.int64())), bad


def _table_from_records(records: list[dict]) -> pa.Table:
    """Parsed JSON objects → a table, column by column; a column whose values do not share one type becomes
    strings (numbers as their JSON text), so that validation can reject just the rows of the wrong type."""
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                                     pa.string())
    return pa.table(columns) if names else pa.table({"_empty": pa.nulls(len(records))}).drop_columns(["_empty"])


def _read_csv(path: str, string_columns: Sequence[str] = ()) -> tuple[pa.Table, list[Malformed]]:
    """A CSV/TSV file; a row with the wrong number of fields is set aside as malformed, not fatal.

    ``string_columns`` (the contract's ids and texts) are read as text, so that an id such as "007" is not
    turned into the number 7, nor a user called "NULL" into a null.

    Row numbers are 0-based data rows (the header is not a row). Quoted values may span lines, and then the
    parser cannot say on which line a malformed row was: such a row is numbered after the parsed rows.
    """
    bad: list[Malformed] = []

    def invalid(row) -> str:
        bad.append(Malformed(-1 if row.number is None else row.number - 2, row.text, MALFORMED_RECORD))
        return "skip"

    delimiter = "\t" if ".tsv" in path else ","
    with pa.input_stream(path, compression="detect") as stream:
        header = stream.read(1 << 16).decode("utf-8", errors="replace").splitlines()[:1]
    names = next(csv.reader(header, delimiter=delimiter), [])
    table = pacsv.read_csv(
        path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                               invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns if c in names}))
    if not bad:
        return table, bad
    n_good = table.num_rows
    taken = {m.row_number for m in bad if m.row_number >= 0}
    rows = [i for i in range(n_good + len(taken)) if i not in taken][:n_good]
    unknown = iter(range(max([*rows, *taken, -1]) + 1, 1 << 62))   # the parser could not say where they were
    bad = [m if m.row_number >= 0 else m._replace(row_number=next(unknown)) for m in bad]
    return table.append_column(ROW_NUMBER, pa.array(rows, pa.int64())), bad


def _with_provenance(batch: pa.RecordBatch | pa.Table, file_index: int, first_row: int) -> pa.Table:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    n = table.num_rows
    if ROW_NUMBER not in table.column_names:
        table = table.append_column(ROW_NUMBER, pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
    return table.append_column(FILE_INDEX, pa.array(np.full(n, file_index, dtype=np.int32)))


def read_file(path: str, *, file_index: int = 0, batch_rows: int = 65_536, malformed: list[Malformed] | None = None,
              string_columns: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """The parseable rows of one file as record batches with provenance columns.

    Parquet is streamed batch by batch (memory stays bounded by ``batch_rows``); JSON Lines and CSV are
    parsed whole, so that types are inferred from the whole file. A malformed JSON line or CSV row costs only
    that record: it is appended to ``malformed`` (complete once the iterator is exhausted). A file that cannot be
    opened or parsed at all is an InputError naming it.
    """
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            first = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                yield from _with_provenance(batch, file_index, first).to_batches()
                first += batch.num_rows
            return
        bad: list[Malformed] = []
        if fmt == "json":
            try:
                table = pajson.read_json(path)
            except pa.ArrowInvalid:
                table, bad = _read_json_lines(path)
        else:
            table, bad = _read_csv(path, string_columns)
        if malformed is not None:
            malformed.extend(bad)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e
    yield from _with_provenance(table, file_index, 0).to_batches(max_chunksize=batch_rows)


def peek_schema(path: str) -> pa.Schema:
    """Schema of a file's columns (the Parquet footer, or the first block of a JSON/CSV file)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt == "json":
            try:
                with pajson.open_json(path) as reader:
                    return reader.schema
            except pa.ArrowInvalid:
                return _read_json_lines(path)[0].drop_columns([ROW_NUMBER]).schema
        with pacsv.open_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if ".tsv" in path else ",", newlines_in_values=True,
                invalid_row_handler=lambda _: "skip")) as reader:
            return reader.schema
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e


def malformed_rows(malformed: list[Malformed], path: str, table: str) -> pa.Table:
    """Unparseable records in the quarantine schema (``record`` is the raw text, as it was in the file)."""
    return pa.table({
        qr.TABLE: [table] * len(malformed), qr.SOURCE_FILE: [path] * len(malformed),
        qr.ROW_NUMBER: [m.row_number for m in malformed], qr.REASON: [m.reason for m in malformed],
        qr.RECORD: [m.text for m in malformed],
    }, schema=qr.QUARANTINE)


class ReadFileBatches(beam.DoFn):
    """(file index, path) in, record batches out; unparseable records on ``quarantine``, row counts on ``counts``."""

    def __init__(self, table: str, batch_rows: int = 65_536, string_columns: Sequence[str] = ()):
        self._table = table
        self._batch_rows, self._strings = batch_rows, list(string_columns)

    def process(self, item: tuple[int, str]):
        index, path = item
        malformed: list[Malformed] = []
        rows = 0
        for batch in read_file(path, file_index=index, batch_rows=self._batch_rows, malformed=malformed,
                               string_columns=self._strings):
            rows += batch.num_rows
            yield batch
        counts = {f"{self._table}.rows_in": rows + len(malformed)}
        if malformed:
            yield beam.pvalue.TaggedOutput(QUARANTINE, malformed_rows(malformed, path, self._table))
            counts[f"{self._table}.rows_quarantined"] = len(malformed)
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


class ReadRaw(beam.PTransform):
    """``files`` of one table → RecordBatches (main), unparseable records (``quarantine``), row counts (``counts``).

    ``string_columns``: columns that a CSV file must keep as text (the contract's ids and texts).
    """

    def __init__(self, files: list[str], table: str, batch_rows: int = 65_536, string_columns: Sequence[str] = ()):
        super().__init__()
        self._files, self._table, self._batch_rows = list(files), table, batch_rows
        self._strings = list(string_columns)

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(list(enumerate(self._files)))
                | "Reshuffle" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(ReadFileBatches(self._table, self._batch_rows, self._strings)).with_outputs(
                    COUNTS, QUARANTINE, main="batches"))


class ReadParts(beam.PTransform):
    """A dataset's part files → (part index, Arrow table per row group), keeping each part's identity so
    that a stage can write its output with the same partitioning (and so deterministically)."""

    def __init__(self, files: list[str], columns: list[str] | None = None):
        super().__init__()
        self._files, self._columns = list(files), columns

    def expand(self, pbegin):
        columns = self._columns

        def read(item: tuple[int, str]):
            index, path = item
            pf = pq.ParquetFile(path)
            for g in range(pf.num_row_groups):
                yield index, pf.read_row_group(g, columns=columns)

        return (pbegin
                | "Parts" >> beam.Create(list(enumerate(self._files)))
                | "Reshuffle" >> beam.Reshuffle()
                | "ReadRowGroups" >> beam.FlatMap(read))
