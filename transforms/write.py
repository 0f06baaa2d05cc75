"""Write keyed Arrow tables as deterministic Parquet part files (one per bucket), and small JSON results."""

from __future__ import annotations

import collections
import json
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import OutputConfig
from schemas.storage import part_name, partitions, write_part
from transforms.shuffle import decode_table


class BackgroundWrites:
    """Writes run in background threads, so that encoding and compressing a file (Arrow writing to its own files
    releases the GIL) overlaps the work on the next element; at most ``threads`` files are held waiting. A DoFn
    creates one in ``setup`` and calls :meth:`drain` in ``finish_bundle``: a bundle is complete only once its files
    are written, and a failed write fails the bundle (which the runner retries)."""

    def __init__(self, threads: int = 2):
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="obsfeed-write")
        self._pending: collections.deque[Future] = collections.deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._threads:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class WritesInBackground(beam.DoFn):
    """A DoFn whose file writes go through one :class:`BackgroundWrites` (``self._writes``): created in
    ``setup``, waited for in ``finish_bundle``, closed in ``teardown``."""

    def setup(self):
        self._writes = BackgroundWrites()

    def finish_bundle(self):
        self._writes.drain()

    def teardown(self):
        self._writes.close()


def write_part_atomically(table: pa.Table, path: Path, output: OutputConfig) -> None:
    """:func:`schemas.storage.write_part` to a temporary name beside ``path``, then renamed onto it: a retried
    bundle whose failed attempt is still writing in the background never leaves a torn part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_part(table, tmp, output)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class WriteBucketParts(WritesInBackground):
    """(bucket, [tables or their IPC bytes]) → ``directory/part-<bucket>.parquet``, rows sorted by ``sort_by``
    (``partitioned`` and ``output.partition_by = "date"``: ``directory/date=YYYY-MM-DD/part-<bucket>.parquet``).

    The file name comes from the bucket, so a retried bundle rewrites the same file and the same input always
    gives the same files, whatever the runner's parallelism. The paths come out as the parts are handed to the
    background writers, and a part is on disk once the bundle is finished: a step that reads the files must come
    after a grouping (the paths' consumers here only count them).
    """

    def __init__(self, directory: str, schema: pa.Schema, sort_by: Sequence[str], output: OutputConfig,
                 partitioned: bool = False):
        self._dir, self._schema, self._sort = directory, schema, [(c, "ascending") for c in sort_by]
        self._output = output
        self._partition_by = output.partition_by if partitioned else "none"

    def process(self, element):
        bucket, tables = element
        tables = [t.select(self._schema.names).cast(self._schema) for t in map(decode_table, tables) if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables)
        if not already_sorted(table, self._sort):          # JoinAndLabel's units come sorted: skip the copy
            table = table.sort_by(self._sort)
        for folder, rows in partitions(table, self._partition_by):
            path = Path(self._dir) / folder / part_name(bucket)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writes.submit(write_part_atomically, rows, path, self._output)
            yield str(path)


def already_sorted(table: pa.Table, sort_keys: Sequence[tuple[str, str]]) -> bool:
    """Whether ``table`` is in ``sort_keys`` order already, for one ascending key without nulls (else False):
    a stable sort would then leave it as it is, and sorting a table of texts costs a copy of every column."""
    if len(sort_keys) != 1 or sort_keys[0][1] != "ascending" or table.num_rows < 2:
        return table.num_rows < 2
    key = table[sort_keys[0][0]]
    if key.null_count:
        return False
    return bool(pc.all(pc.less_equal(key[:-1], key[1:])).as_py())


class WriteJson(beam.DoFn):
    """Write one JSON document (e.g. the merged counts) to ``path``."""

    def __init__(self, path: str):
        self._path = path

    def process(self, doc):
        Path(self._path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        yield self._path
