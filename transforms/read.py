"""Read raw input files (Parquet, JSON Lines, CSV; optionally compressed) as Arrow record batches.

Each batch carries its provenance (``_source_file``, ``_row_number``) so that a rejected row can be traced back
to the file and line it came from.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from schemas.errors import InputError

SOURCE_FILE = "_source_file"
ROW_NUMBER = "_row_number"
COUNTS = "counts"


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


def read_file(path: str, *, batch_rows: int = 65_536) -> list[pa.RecordBatch]:
    """All rows of one file as record batches with provenance columns."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "json":
            table = pajson.read_json(path)
        else:
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
                delimiter="\t" if ".tsv" in path else ","))
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e
    n = table.num_rows
    table = table.append_column(SOURCE_FILE, pa.array([path] * n, pa.string()) if n else
                                pa.array([], pa.string()))
    table = table.append_column(ROW_NUMBER, pa.array(range(n), pa.int64()))
    return table.to_batches(max_chunksize=batch_rows)


def peek_schema(path: str) -> pa.Schema:
    """Schema of a file's columns (the Parquet footer, or the first block of a JSON/CSV file)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt == "json":
            with pajson.open_json(path) as reader:
                return reader.schema
        with pacsv.open_csv(path) as reader:
            return reader.schema
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read {fmt}: {e}") from e


class ReadFileBatches(beam.DoFn):
    """File path in, record batches out; counts rows read per table on the ``counts`` output."""

    def __init__(self, table: str, batch_rows: int = 65_536):
        self._table = table
        self._batch_rows = batch_rows

    def process(self, path: str):
        total = 0
        for batch in read_file(path, batch_rows=self._batch_rows):
            total += batch.num_rows
            yield batch
        yield beam.pvalue.TaggedOutput(COUNTS, {f"{self._table}.rows_in": total})


class ReadRaw(beam.PTransform):
    """``files`` of one table → PCollection of RecordBatches (main) and row counts (``counts``)."""

    def __init__(self, files: list[str], table: str, batch_rows: int = 65_536):
        super().__init__()
        self._files, self._table, self._batch_rows = list(files), table, batch_rows

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(self._files)
                | "Reshuffle" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(ReadFileBatches(self._table, self._batch_rows)).with_outputs(
                    COUNTS, main="batches"))


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
