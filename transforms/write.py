"""Write keyed Arrow tables as deterministic Parquet part files (one per bucket), and small JSON results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam
import pyarrow as pa

from schemas.config import OutputConfig
from transforms.io import decode_table, part_name, write_part


class WriteBucketParts(beam.DoFn):
    """(bucket, [tables or their IPC bytes]) → ``directory/part-<bucket>.parquet``, rows sorted by ``sort_by``.

    The file name comes from the bucket, so a retried bundle rewrites the same file and the same input always
    gives the same files, whatever the runner's parallelism.
    """

    def __init__(self, directory: str, schema: pa.Schema, sort_by: Sequence[str], output: OutputConfig):
        self._dir, self._schema, self._sort = directory, schema, [(c, "ascending") for c in sort_by]
        self._output = output

    def process(self, element):
        bucket, tables = element
        tables = [t.select(self._schema.names).cast(self._schema) for t in map(decode_table, tables) if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables).sort_by(self._sort)
        path = Path(self._dir) / part_name(bucket)
        write_part(table, path, self._output)
        yield str(path)


class WriteJson(beam.DoFn):
    """Write one JSON document (e.g. the merged counts) to ``path``."""

    def __init__(self, path: str):
        self._path = path

    def process(self, doc):
        Path(self._path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        yield self._path
