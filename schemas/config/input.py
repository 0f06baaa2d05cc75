"""``[input]``: the log files a run reads, and how a pattern (file, glob, folder, ``{date}``) becomes files."""

from __future__ import annotations

import datetime as dt
import glob
from pathlib import Path

from pydantic import Field, field_validator

from schemas.config.base import Section
from schemas.errors import ConfigError, InputError


class InputConfig(Section):
    impressions: list[str] = Field(min_length=1, description="files or globs, relative to the config file")
    signals: list[str] = Field(min_length=1)
    truth: str | None = Field(None, description="simulator ground truth, used only by `evaluate`")

    @field_validator("impressions", "signals", mode="before")
    @classmethod
    def _as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


DATE_FIELD = "{date}"
"""In an input path, the logical day of a scheduled run (YYYY-MM-DD): logs stored by day, e.g.
``logs/impressions/date={date}/*.parquet``, are then read for the days a run needs, not the whole history."""


def expand_inputs(patterns: list[str], *, what: str, day: dt.date | None = None, late_window: int = 0,
                  ) -> list[str]:
    """Expand files/globs/folders (:func:`_matches`) to a sorted list of files; none found is an error naming the
    pattern.

    A pattern with ``{date}`` is read for each day from ``day - late_window`` to ``day + late_window`` (the
    days whose rows a scheduled day owns or must see: ``transforms.window``); only ``day`` itself must
    have files. Without a ``day`` such a pattern is an error: it needs ``--date``.
    """
    files: list[str] = []
    for pattern in patterns:
        if DATE_FIELD in pattern:
            if day is None:
                raise ConfigError(f"{pattern}: an input path with {DATE_FIELD} needs a scheduled run (--date)")
            for offset in range(-late_window, late_window + 1):
                d = day + dt.timedelta(days=offset)
                found = _matches(pattern.replace(DATE_FIELD, d.isoformat()))
                if not found and offset == 0:
                    raise InputError(f"{pattern}: no {what} input file found for {d}")
                files.extend(found)
            continue
        matched = _matches(pattern)
        if not matched:
            raise InputError(f"{pattern}: no {what} input file found")
        files.extend(matched)
    return files


def _matches(pattern: str) -> list[str]:
    """The files of a file, glob or folder, sorted. A folder (or a folder a glob matches) is read as polars,
    pyarrow and DuckDB read a dataset: every data file below it, hive-style ``date=.../`` folders included,
    skipping entries whose name starts with '.' or '_' (``_SUCCESS``, ``.part-0.crc``, ``_temporary/``) and files
    of other formats. The formats are those of ``transforms.read.file_format``: keep the two lists alike."""
    formats = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".tsv")

    def is_data(name: str) -> bool:
        name = name.lower()
        for suffix in (".gz", ".bz2", ".zst"):
            name = name.removesuffix(suffix)
        return name.endswith(formats)

    files = []
    for found in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]):
        path = Path(found)
        if path.is_file():
            files.append(found)
        elif path.is_dir():
            files.extend(str(f) for f in path.rglob("*") if f.is_file() and is_data(f.name)
                         and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts))
    return sorted(files)
