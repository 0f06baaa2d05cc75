"""Read and update the catalogue of a scheduled root (``schemas.catalogue``): one row per day, rewritten
atomically (a temporary file renamed over it) under the root's lock."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import catalogue as cat
from schemas import run_dir as rd


def catalogue_path(root: Path) -> Path:
    return Path(root) / rd.CATALOGUE


def read_catalogue(root: Path) -> list[dict[str, Any]]:
    """Every day's row, by date ([] for a new root)."""
    path = catalogue_path(root)
    if not path.exists():
        return []
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r[cat.DATE])


def day_row(root: Path, day: dt.date) -> dict[str, Any] | None:
    return next((r for r in read_catalogue(root) if r[cat.DATE] == day), None)


def upsert(root: Path, day: dt.date, values: Mapping[str, Any]) -> dict[str, Any]:
    """Set ``values`` on ``day``'s row (created if new; other columns kept) and write the catalogue back."""
    rows = read_catalogue(root)
    old = next((r for r in rows if r[cat.DATE] == day), None)
    row = {f.name: None for f in cat.SCHEMA} | (old or {}) | dict(values) | {cat.DATE: day}
    rows = sorted([r for r in rows if r[cat.DATE] != day] + [row], key=lambda r: r[cat.DATE])
    path = catalogue_path(root)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    pq.write_table(pa.Table.from_pylist(rows, schema=cat.SCHEMA), tmp)
    os.replace(tmp, path)
    return row
