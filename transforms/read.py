"""Read raw input files (Parquet, JSON Lines, CSV; optionally compressed) as Arrow record batches.

Each batch carries its provenance (``_file_index`` into the stage's sorted input list, ``_row_number``) so that a
rejected row can be traced back to the file and line it came from. The index, not the path, travels with every
row: a path repeated per row would be most of the bytes of a narrow table in every shuffle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
    """JSON Lines, one record at a time: the slow path, taken only when the file has a malformed record.

    Records are counted as pyarrow counts them (non-blank lines), so row numbers match the fast path's.
    """
    good, rows_at, bad = [], [], []
    with pa.input_stream(path, compression="detect") as stream:
        lines = stream.read().decode("utf-8", errors="replace").splitlines()
    index = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            good.append(line)
            rows_at.append(index)
        except ValueError as e:
            bad.append(Malformed(index, line, f"{MALFORMED_RECORD}: {e}"[:200]))
        index += 1
    # The good lines go through the same parser as the fast path, so column types are inferred alike.
    table = pajson.read_json(pa.BufferReader("\n".join(good).encode())) if good else pa.table({})
    return table.append_column(ROW_NUMBER, pa.array(rows_at, pa.int64())), bad


def _with_provenance(batch: pa.RecordBatch | pa.Table, file_index: int, first_row: int) -> pa.Table:
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    n = table.num_rows
    if ROW_NUMBER not in table.column_names:
        table = table.append_column(ROW_NUMBER, pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
    return table.append_column(FILE_INDEX, pa.array(np.full(n, file_index, dtype=np.int32)))


def read_file(path: str, *, file_index: int = 0, batch_rows: int = 65_536,
              malformed: list[Malformed] | None = None) -> Iterator[pa.RecordBatch]:
    """The parseable rows of one file as record batches with provenance columns.

    Parquet is streamed batch by batch (memory stays bounded by ``batch_rows``); JSON Lines and CSV are
    parsed whole, so that types are inferred from the whole file. A malformed JSON line costs only that
    line: it is appended to ``malformed`` (complete once the iterator is exhausted). A file that cannot be
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
        if fmt == "json":
            try:
                table = pajson.read_json(path)
            except pa.ArrowInvalid:
                table, bad = _read_json_lines(path)
                if malformed is not None:
                    malformed.extend(bad)
        else:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if ".tsv" in path else ","))
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
        with pacsv.open_csv(path) as reader:
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

    def __init__(self, table: str, batch_rows: int = 65_536):
        self._table = table
        self._batch_rows = batch_rows

    def process(self, item: tuple[int, str]):
        index, path = item
        malformed: list[Malformed] = []
        rows = 0
        for batch in read_file(path, file_index=index, batch_rows=self._batch_rows, malformed=malformed):
            rows += batch.num_rows
            yield batch
        counts = {f"{self._table}.rows_in": rows + len(malformed)}
        if malformed:
            yield beam.pvalue.TaggedOutput(QUARANTINE, malformed_rows(malformed, path, self._table))
            counts[f"{self._table}.rows_quarantined"] = len(malformed)
        yield beam.pvalue.TaggedOutput(COUNTS, counts)


class ReadRaw(beam.PTransform):
    """``files`` of one table → RecordBatches (main), unparseable records (``quarantine``), row counts (``counts``)."""

    def __init__(self, files: list[str], table: str, batch_rows: int = 65_536):
        super().__init__()
        self._files, self._table, self._batch_rows = list(files), table, batch_rows

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(list(enumerate(self._files)))
                | "Reshuffle" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(ReadFileBatches(self._table, self._batch_rows)).with_outputs(
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
