"""Coerce raw batches to the input contract and route every row that fails a check to quarantine.

The checks are vectorised (polars expressions over a whole batch); the first failing check of a row is its
``reason``. Rows are never dropped here: a batch comes out as ``ok`` rows plus ``quarantine`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import apache_beam as beam
import polars as pl
import pyarrow as pa

from schemas import impressions as imp
from schemas import quarantine as qr
from schemas import signals as sig
from transforms.read import COUNTS, FILE_INDEX, QUARANTINE, ROW_NUMBER
from transforms.window import OTHER_DAY, DayWindow

CONTEXT = "context"
"""Tag of the impressions a day's run reads only to place signals (``transforms.window``): id and ts."""

_REASON = "_reason"
_PROVENANCE = (FILE_INDEX, ROW_NUMBER)


_UTC_US = pl.Datetime("us", "UTC")


def _parse_timestamp(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """ISO-8601 strings (with a zone, or naive = UTC) and datetimes → Datetime(us, UTC); failures → null."""
    if isinstance(dtype, pl.Datetime):
        expr = col.dt.cast_time_unit("us")
        return expr.dt.convert_time_zone("UTC") if dtype.time_zone else expr.dt.replace_time_zone("UTC")
    if dtype == pl.String:
        # One explicit format after normalising the date/time separator and 'Z': format inference would
        # pick the first row's format and reject the other valid spellings in the batch.
        norm = col.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", r"${1}T").str.replace(r"Z$", "+00:00")
        aware = norm.str.to_datetime(format="%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", time_zone="UTC",
                                     strict=False)
        naive = norm.str.to_datetime(format="%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False)
        return pl.coalesce(aware, naive.dt.replace_time_zone("UTC"))
    return pl.lit(None, _UTC_US)


def _timestamps(df: pl.DataFrame, name: str) -> pl.Expr:
    """The column ``name`` parsed as timestamps. The common spelling (``2026-11-01T10:00:00[.ffffff]`` with
    ``Z`` or an offset) is parsed directly; only when some value does not parse so is the batch given the
    general path (normalised separators, naive = UTC), which is several times slower."""
    dtype = df.schema[name]
    if dtype != pl.String:
        return _parse_timestamp(pl.col(name), dtype)
    fast = df[name].str.strptime(_UTC_US, format="%Y-%m-%dT%H:%M:%S%.f%#z", strict=False)
    if (fast.is_null() & df[name].is_not_null()).any():
        return pl.coalesce(pl.lit(fast), _parse_timestamp(pl.col(name), dtype))
    return pl.lit(fast)


def coerce(df: pl.DataFrame, schema: pa.Schema) -> tuple[pl.DataFrame, pl.Series]:
    """Cast ``df``'s contract columns to ``schema`` and say, per row, why it fails (null = row is fine).

    Missing columns are added as nulls (so a missing *required* column fails every row with
    ``missing_required:<col>``); columns not in the schema are kept as they are.
    """
    checks: list[pl.Expr] = []
    casts: list[pl.Expr] = []
    for field in schema:
        name = field.name
        target = pl.from_arrow(pa.array([], field.type)).dtype
        if name not in df.columns:
            casts.append(pl.lit(None, target).alias(name))
            if not field.nullable:
                checks.append(pl.lit(qr.MISSING_REQUIRED.format(column=name)))
            continue
        raw = pl.col(name)
        if isinstance(target, pl.Datetime):
            parsed = _timestamps(df, name)
            bad = qr.BAD_TIMESTAMP
        else:
            parsed = raw.cast(target, strict=False)
            bad = qr.BAD_TYPE.format(column=name)
        casts.append(parsed.alias(name))
        if not field.nullable:  # an empty or blank id is as missing as a null one (CSV writes nulls so)
            missing = raw.is_null()
            if df.schema[name] == pl.String:
                missing = missing | raw.str.contains(r"^\s*$")
            checks.append(pl.when(missing).then(pl.lit(qr.MISSING_REQUIRED.format(column=name))))
        checks.append(pl.when(raw.is_not_null() & parsed.is_null()).then(pl.lit(bad)))
    reasons = df.select(pl.coalesce(*checks).alias(_REASON) if checks else pl.lit(None, pl.String))
    return df.with_columns(casts), reasons.to_series().cast(pl.String)


def signal_checks(df: pl.DataFrame, known_types: Sequence[str], value_types: Sequence[str]) -> pl.Series:
    """Signal-specific reasons on a coerced batch: unknown type; a value-based label with value ∉ [0, 1]."""
    value = pl.col(sig.VALUE)
    return df.select(pl.coalesce(
        pl.when(~pl.col(sig.TYPE).is_in(list(known_types))).then(pl.lit(qr.UNKNOWN_SIGNAL_TYPE)),
        pl.when(pl.col(sig.TYPE).is_in(list(value_types)) & (value.is_null() | (value < 0) | (value > 1)))
        .then(pl.lit(qr.VALUE_OUT_OF_RANGE)),
    ).cast(pl.String)).to_series()


def quarantine_rows(raw: pl.DataFrame, reasons: pl.Series, table: str, files: Sequence[str]) -> pa.Table:
    """Rejected rows in the quarantine schema: original record as JSON text, file, row and reason.

    ``files`` is the table's input list, which the rows' ``_file_index`` points into.
    """
    payload = [c for c in raw.columns if c not in _PROVENANCE]
    paths = pl.Series(qr.SOURCE_FILE, list(files), pl.String).gather(raw[FILE_INDEX].cast(pl.Int64))
    out = raw.select(
        pl.lit(table).alias(qr.TABLE),
        paths,
        pl.col(ROW_NUMBER).cast(pl.Int64).alias(qr.ROW_NUMBER),
        reasons.alias(qr.REASON),
        pl.struct(payload).struct.json_encode().alias(qr.RECORD),
    )
    return out.to_arrow().cast(qr.QUARANTINE)


class Validated(NamedTuple):
    ok: beam.PCollection
    quarantine: beam.PCollection
    counts: beam.PCollection
    context: beam.PCollection


class SplitBad(beam.DoFn):
    """RecordBatch in: coerced good rows out (as an Arrow table), rejected rows tagged ``quarantine``.

    With a ``window`` (one day of a scheduled run), only the rows the day reads come out: impressions of the day
    (and those of its neighbours, id and ts only, tagged ``context``), signals within its context; a rejected
    row is quarantined by the day its ts falls in; the rest is counted as ``rows_other_day``.
    """

    def __init__(self, table: str, schema: pa.Schema, files: Sequence[str], known_types: Sequence[str] = (),
                 value_types: Sequence[str] = (), window: DayWindow | None = None):
        self._table, self._schema, self._files = table, schema, list(files)
        self._known, self._value_types = list(known_types), list(value_types)
        self._window = window

    def process(self, batch: pa.RecordBatch):
        raw = pl.from_arrow(pa.Table.from_batches([batch]))
        df, reasons = coerce(raw, self._schema)
        if self._table == "signals":
            reasons = pl.select(pl.coalesce(reasons, signal_checks(df, self._known, self._value_types))).to_series()
        bad = reasons.is_not_null()
        good, counts, w = ~bad, {}, self._window
        if w is not None:
            ts = pl.col(imp.TS)
            if self._table == "impressions":            # the neighbours' impressions: to place signals
                context = df.select(w.in_context(ts) & ~w.owns(ts)).to_series() & good
                if context.any():
                    yield beam.pvalue.TaggedOutput(CONTEXT, df.filter(context).select(imp.IMPRESSION_ID, imp.TS)
                                                   .to_arrow())
            reads = w.owns(ts) if self._table == "impressions" else w.in_context(ts)
            good = good & df.select(reads.fill_null(False)).to_series()
            bad = bad & df.select(w.owns(ts).fill_null(True)).to_series()    # unreadable ts: every day's
            counts[f"{self._table}.{OTHER_DAY}"] = raw.height - int(good.sum()) - int(bad.sum())
        n_bad = int(bad.sum())
        if n_bad:
            yield beam.pvalue.TaggedOutput(QUARANTINE, quarantine_rows(raw.filter(bad), reasons.filter(bad),
                                                                       self._table, self._files))
            counts[f"{self._table}.rows_quarantined"] = n_bad
        if counts:
            yield beam.pvalue.TaggedOutput(COUNTS, counts)
        if good.any():
            yield df.filter(good).to_arrow()


class Validate(beam.PTransform):
    """Batches of one raw table → ``Validated(ok, quarantine, counts)``."""

    def __init__(self, table: str, schema: pa.Schema, files: Sequence[str], known_types: Sequence[str] = (),
                 value_types: Sequence[str] = (), window: DayWindow | None = None):
        super().__init__()
        self._fn = SplitBad(table, schema, files, known_types, value_types, window)

    def expand(self, batches):
        out = batches | beam.ParDo(self._fn).with_outputs(QUARANTINE, COUNTS, CONTEXT, main="ok")
        return Validated(out.ok, out[QUARANTINE], out[COUNTS], out[CONTEXT])


def contract_schema(table: str) -> pa.Schema:
    """The input-contract schema of ``table`` ('impressions' or 'signals')."""
    return {"impressions": imp.IMPRESSIONS, "signals": sig.SIGNALS}[table]


def merge_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Sum count dictionaries key by key (the combiner for the ``counts`` outputs)."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total
