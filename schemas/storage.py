"""How run-directory files are written and read: atomic directory commits, deterministic Parquet part files,
footer counts, and the clean-up of what killed writers left. No Beam here: every stage (and the Beam sinks in
``transforms/write.py``) writes through these."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.config import OutputConfig
from schemas.errors import InputError
from schemas.run_dir import DATE_PARTITION

DICTIONARY_COLUMNS = ("impression_id", "prompt_id", "response_id", "user_hash", "chosen_id", "rejected_id",
                      "model_version", "label_source", "table", "reason", "source_file")


def part_name(index: int) -> str:
    """File name of part ``index``: deterministic, so that a retried write replaces the same file."""
    return f"part-{index:05d}.parquet"


def write_part(table: pa.Table, path: Path | str, output: OutputConfig) -> None:
    """Write one Parquet file with the project's settings (zstd, row groups, dictionary-encoded ids)."""
    compression = None if output.compression == "none" else output.compression
    pq.write_table(
        table,
        str(path),
        compression=compression,
        row_group_size=output.row_group_size,
        use_dictionary=[c for c in DICTIONARY_COLUMNS if c in table.column_names],
    )


class PartWriter:
    """A part file written one table at a time, with :func:`write_part`'s settings (each table becomes row groups
    of at most ``output.row_group_size`` rows), so that a part larger than memory can be written; with
    ``partition_by = "date"`` one file per date under ``directory/date=YYYY-MM-DD/``, as :func:`partitions` splits.
    The rows keep the order they are written in."""

    def __init__(self, directory: Path | str, name: str, schema: pa.Schema, output: OutputConfig,
                 partition_by: str = "none"):
        self._dir, self._name, self._schema, self._output = Path(directory), name, schema, output
        self._partition_by = partition_by
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        for folder, rows in partitions(table.select(self._schema.names).cast(self._schema), self._partition_by):
            if folder not in self._writers:
                path = self._dir / folder / self._name
                path.parent.mkdir(parents=True, exist_ok=True)
                compression = None if self._output.compression == "none" else self._output.compression
                self._writers[folder] = pq.ParquetWriter(
                    str(path), self._schema, compression=compression,
                    use_dictionary=[c for c in DICTIONARY_COLUMNS if c in self._schema.names])
            self._writers[folder].write_table(rows, row_group_size=self._output.row_group_size)

    def close(self) -> list[str]:
        """Close every file; their paths (none when no row was written)."""
        paths = []
        for folder, writer in sorted(self._writers.items()):
            writer.close()
            paths.append(str(self._dir / folder / self._name))
        self._writers = {}
        return paths


def process_alive(pid: int | None, host: str | None) -> bool | None:
    """Whether process ``pid`` of ``host`` still runs: True / False on this host, None when it cannot be told
    from here (another host, or no pid)."""
    if host != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # it runs, as another user
        return True
    return True


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())


_MINE: set[str] = set()
"""The scratch and staging names this process made: a name with our pid that is not here is a dead process's
(a restarted container reuses pids)."""


def writer_tag() -> str:
    """``<pid>@<host>``: put in every scratch and staging name, so that clean-up can tell a dead writer's
    leftovers from a live writer's work in progress."""
    return f"{os.getpid()}@{_host()}"


def _tagged_name(prefix: str) -> str:
    name = f"{prefix}-{writer_tag()}-{uuid.uuid4().hex[:12]}"
    _MINE.add(name)
    return name


_TAGGED = re.compile(r"-(\d+)@(.*)-[0-9a-f]{12}$")


def left_by_dead_writer(path: Path) -> bool:
    """Whether the scratch or staging folder (or file) ``path`` was left by a writer that is known dead: its
    name's ``<pid>@<host>`` (:func:`writer_tag`) is a process of this host that no longer runs (or our own pid
    in a name this process did not make). Another host's, a live process's, or a name without a tag (from an
    older version, whose writer cannot be told) never is."""
    match = _TAGGED.search(path.name)
    if match is None or match.group(2) != _host():
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return path.name not in _MINE
    try:
        return process_alive(pid, socket.gethostname()) is False
    except (OverflowError, ValueError):              # not a pid this system can have
        return False


def remove_dead_scratch(root: Path | str) -> list[Path]:
    """Remove what killed writers left in run directory ``root``: scratch folders (``.ingest-*``) and
    temporary files and staging folders (``.<name>.tmp-*``) whose writer is known dead. Returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted([*root.glob(".ingest-*"), *root.glob(".*.tmp-*"), *root.glob("*/.*.tmp-*")]):
        if left_by_dead_writer(path):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def scratch_dir(root: Path | str, prefix: str) -> Path:
    """A fresh scratch folder ``<root>/.<prefix>-<writer tag>-<hex>`` (see :func:`remove_dead_scratch`)."""
    path = Path(root) / _tagged_name(f".{prefix}")
    path.mkdir(parents=True)
    return path


def recover_dir(final: Path) -> None:
    """Undo what a killed writer of ``final`` left: its staging folders are removed (only those whose writer
    is known dead: another writer's may be in progress), and if it died between the two renames of
    :func:`commit_dir` (``final`` gone, the previous one set aside) the previous one is put back."""
    parent = final.parent
    if not parent.is_dir():
        return
    for stale in parent.glob(f".{final.name}.tmp-*"):
        if left_by_dead_writer(stale):
            shutil.rmtree(stale, ignore_errors=True)
    old = sorted(parent.glob(f".{final.name}.old-*"))
    if old and not final.exists():
        os.replace(old[-1], final)
        old = old[:-1]
    for o in old:
        shutil.rmtree(o, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final`` (same filesystem, so the commit is a rename), after recovering
    from any writer of ``final`` that was killed (:func:`recover_dir`)."""
    recover_dir(final)
    tmp = final.parent / _tagged_name(f".{final.name}.tmp")
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``: a reader sees the old or the new directory, never a half-written one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Write a directory under a temporary name and rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a small text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_tagged_name(f".{path.name}.tmp"))
    tmp.write_text(text)
    os.replace(tmp, path)
    _MINE.discard(tmp.name)


def ensure_part(directory: Path | str, schema: pa.Schema, output: OutputConfig) -> Path | None:
    """Write ``part-00000.parquet`` with zero rows and ``schema`` when the dataset ``directory`` has no part
    file: an empty output is still a dataset, which every reader opens and finds empty (not missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.rglob("*.parquet")):
        return None
    path = directory / part_name(0)
    write_part(schema.empty_table(), path, output)
    return path


def parquet_files(directory: Path | str) -> list[Path]:
    """The part files of a dataset directory (in its date partitions too), sorted; a missing directory is an
    InputError naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: dataset not found (has the stage that writes it run?)")
    return sorted(directory.rglob("*.parquet"))


def partitions(table: pa.Table, partition_by: str, ts_column: str = "ts") -> list[tuple[str, pa.Table]]:
    """``(sub-folder, rows)`` for each output partition: one ``("", table)`` when not partitioned, else one
    ``("date=YYYY-MM-DD", rows of that UTC date)`` per date present."""
    if partition_by == "none" or table.num_rows == 0:
        return [("", table)]
    import pyarrow.compute as pc

    dates = pc.strftime(table[ts_column], format="%Y-%m-%d")
    return [(f"{DATE_PARTITION}={d}", table.filter(pc.equal(dates, d)))
            for d in sorted(pc.unique(dates).to_pylist())]


def read_dataset(directory: Path | str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read every part of a dataset directory, in file order."""
    files = parquet_files(directory)
    if not files:
        raise InputError(f"{directory}: dataset has no Parquet files")
    return ds.dataset([str(f) for f in files], format="parquet").to_table(columns=list(columns) if columns else None)


def count_rows(directory: Path | str) -> int:
    """Row count from the Parquet footers: what is on disk, without reading the data."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(directory))
