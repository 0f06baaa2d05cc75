"""The data gates: a Great Expectations suite on an Arrow table (which expectations failed), and no raw user id
in any output."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import quarantine as qr
from schemas.storage import read_dataset
from schemas.suites import RAW_ID_KEY, RAW_USER_COLUMNS

if TYPE_CHECKING:
    import great_expectations as gx


def failed_expectations(table: pa.Table, suite: gx.ExpectationSuite) -> list[str]:
    """Validate ``table`` against ``suite`` in an ephemeral GX context; one line per failed expectation.

    GX is imported here (seconds), so that only a stage that runs a gate pays for it.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets this logger to INFO itself and announces a temporary docs folder on every context.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("obsfeed")
             .add_dataframe_asset(suite.name)
             .add_batch_definition_whole_dataframe("all")
             .get_batch(batch_parameters={"dataframe": table.to_pandas()}))
    # Pass/fail alone is the cheap question; the details (counts of unexpected values) only when it failed.
    if batch.validate(suite, result_format="BOOLEAN_ONLY").success:
        return []
    result = batch.validate(suite, result_format="SUMMARY")
    failures = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            detail = r.result.get("unexpected_count", r.result.get("observed_value", ""))
            failures.append(f"{cfg.type}({cfg.kwargs.get('column')}): {detail}")
    return failures


def raw_user_fields(schema: pa.Schema) -> list[str]:
    """The paths of fields named like a raw user id at any depth (``ctx.user_id``, ``events[].user_id``)."""
    found: list[str] = []

    def walk(field: pa.Field, path: str) -> None:
        if field.name in RAW_USER_COLUMNS:
            found.append(path)
        t = field.type
        if pa.types.is_struct(t):
            for i in range(t.num_fields):
                walk(t.field(i), f"{path}.{t.field(i).name}")
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            walk(t.value_field, f"{path}[]")
        elif pa.types.is_map(t):
            walk(t.item_field, f"{path}{{}}")

    for f in schema:
        walk(f, f.name)
    return found


def raw_id_leaks(datasets: dict[str, Path]) -> str | None:
    """Why a staged output would carry a raw user id, or None: a raw user column in any dataset's schema, or a
    quarantine record that names ``user_id`` (records carry ``user_hash``, the units' pseudonym). Checked on
    every output table before it is committed."""
    for name, directory in datasets.items():
        files = sorted(Path(directory).rglob("*.parquet"))
        for f in files:
            leaked = raw_user_fields(pq.read_schema(f))
            if leaked:
                return f"{name} would carry the raw user id column {leaked[0]!r} ({f.name})"
        if files and qr.RECORD in pq.read_schema(files[0]).names:
            records = read_dataset(directory, [qr.RECORD])[qr.RECORD]
            hits = pc.sum(pc.match_substring_regex(records, RAW_ID_KEY)).as_py() or 0
            if hits:
                return f"{name}: {hits} record(s) would carry a raw user id (a {RAW_USER_COLUMNS[0]!r} key)"
    return None
