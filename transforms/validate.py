"""Coerce raw batches to the input contract and route every row that fails a check to quarantine.

The checks are vectorised (polars expressions over a whole batch); the first failing check of a row is its
``reason``. Rows are never dropped here: a batch comes out as ``ok`` rows plus ``quarantine`` rows.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import apache_beam as beam
import polars as pl
import pyarrow as pa

from schemas import impressions as imp
from schemas import quarantine as qr
from schemas import signals as sig
from schemas import units as un
from transforms.outputs import SplitTags, Tagged
from transforms.privacy import key_from_env, pseudonymise
from transforms.read import COUNTS, FILE_INDEX, NESTED, NESTED_SEP, QUARANTINED, ROW_NUMBER
from transforms.window import OTHER_DAY, DayWindow

OK = "ok"
"""Tag of the rows that passed every check."""
CONTEXT = "context"
"""Tag of the impressions a day's run reads only to place signals (``transforms.window``): id and ts."""

_REASON = "_reason"
_PROVENANCE = (FILE_INDEX, ROW_NUMBER, NESTED)


_UTC_US = pl.Datetime("us", "UTC")

_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _is_nested(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.List | pl.Array | pl.Struct) or dtype == pl.Object


def _has_binary(dtype: pl.DataType) -> bool:
    """Bytes anywhere in the type (polars cannot write them as JSON)."""
    if dtype == pl.Binary or dtype == pl.Object:
        return True
    if isinstance(dtype, pl.List | pl.Array):
        return _has_binary(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_has_binary(f.dtype) for f in dtype.fields)
    return False


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if isinstance(value, pl.Series):                      # a list value, as map_elements hands it over
        return value.to_list()
    return str(value)


_TEXT_SOURCES = (pl.String, pl.Boolean)
"""Besides numbers: the types a value may be written in and still be read as text (an id) exactly."""


def _epoch_us(col: pl.Expr, dtype: pl.DataType, unit: str) -> pl.Expr:
    """Epoch numbers → microseconds (Int64); integers stay exact, floats are rounded to the microsecond.
    ``unit`` is ``ingest.ts_unit``: 's', 'ms', 'us', or 'auto', by magnitude per value (below 1e11 seconds, below
    1e14 milliseconds, below 1e17 microseconds, else nanoseconds; 1e11 s is the year 5138, 1e11 ms is 1973)."""
    if dtype.is_integer():
        x = col.cast(pl.Int64, strict=False)
        if unit != "auto":                   # beyond the range of microseconds in an Int64: not a time
            return pl.when(x.abs() < (2**63 - 1) // _US_PER[unit]).then(x * _US_PER[unit])
        a = x.abs()
        return (pl.when(a < 10**11).then(x * 1_000_000).when(a < 10**14).then(x * 1_000)
                .when(a < 10**17).then(x).otherwise(x // 1_000))
    x = col.cast(pl.Float64)
    if unit == "auto":
        a = x.abs()
        factor = pl.when(a < 1e11).then(1e6).when(a < 1e14).then(1e3).when(a < 1e17).then(1.0).otherwise(1e-3)
    else:
        factor = pl.lit(float(_US_PER[unit]))
    us = x * factor
    return pl.when(us.is_finite() & (us.abs() < 9.2e18)).then(us.round().cast(pl.Int64))


def _from_epoch(col: pl.Expr, dtype: pl.DataType, unit: str) -> pl.Expr:
    if unit == "iso":
        return pl.lit(None, _UTC_US)
    return pl.from_epoch(_epoch_us(col, dtype, unit), time_unit="us").dt.replace_time_zone("UTC")


def _parse_timestamp(col: pl.Expr, dtype: pl.DataType, unit: str = "auto") -> pl.Expr:
    """ISO-8601 strings (with a zone, or naive = UTC; a date alone is its midnight), dates, datetimes and epoch
    numbers (``unit``: see ``_epoch_us``; 'iso' refuses numbers) → Datetime(us, UTC); failures → null."""
    if isinstance(dtype, pl.Datetime):
        expr = col.dt.cast_time_unit("us")
        return expr.dt.convert_time_zone("UTC") if dtype.time_zone else expr.dt.replace_time_zone("UTC")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        return _from_epoch(col, dtype, unit)
    if dtype == pl.String:
        # One explicit format after normalising the date/time separator and 'Z': format inference would
        # pick the first row's format and reject the other valid spellings in the batch.
        norm = col.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", r"${1}T").str.replace(r"Z$", "+00:00")
        aware = norm.str.to_datetime(format="%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", time_zone="UTC",
                                     strict=False)
        naive = norm.str.to_datetime(format="%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False)
        day = norm.str.to_date(format="%Y-%m-%d", strict=False).cast(pl.Datetime("us"))
        number = pl.when(norm.str.contains(r"^-?\d+(\.\d+)?$")).then(norm.cast(pl.Float64, strict=False))
        return pl.coalesce(aware, naive.dt.replace_time_zone("UTC"), day.dt.replace_time_zone("UTC"),
                           _from_epoch(number, pl.Float64, unit))
    return pl.lit(None, _UTC_US)


def _timestamps(df: pl.DataFrame, name: str, unit: str = "auto") -> pl.Expr:
    """The column ``name`` parsed as timestamps. The common spelling (``2026-11-01T10:00:00[.ffffff]`` with
    ``Z`` or an offset) is parsed directly; only when some value does not parse so is the batch given the
    general path (normalised separators, naive = UTC, dates, epoch numbers), which is several times slower."""
    dtype = df.schema[name]
    if dtype != pl.String:
        return _parse_timestamp(pl.col(name), dtype, unit)
    fast = df[name].str.strptime(_UTC_US, format="%Y-%m-%dT%H:%M:%S%.f%#z", strict=False)
    if (fast.is_null() & df[name].is_not_null()).any():
        return pl.coalesce(pl.lit(fast), _parse_timestamp(pl.col(name), dtype, unit))
    return pl.lit(fast)


def _binary_as_text(values: pl.Series) -> pl.Series:
    """Bytes → text where they are valid UTF-8, else null (so the row is rejected, not the batch)."""
    def text(b: bytes | None) -> str | None:
        try:
            return None if b is None else b.decode("utf-8")
        except UnicodeDecodeError:
            return None

    return pl.Series(values.name, [text(b) for b in values.to_list()], pl.String)


def _cast(df: pl.DataFrame, name: str, target: pl.DataType) -> pl.Expr:
    """``name`` cast to a scalar contract type; a value that does not convert exactly is null. A nested value
    (a JSON list or object) is not a scalar; a float or decimal is an integer only when it has no fraction
    (2.5 is not silently 2); a date, time, duration or boolean is not a number, nor a date or duration an id."""
    raw, dtype = pl.col(name), df.schema[name]
    if dtype == pl.Binary and target == pl.String:
        return pl.lit(_binary_as_text(df[name]))
    if target == pl.String:
        ok = dtype.is_numeric() or dtype in _TEXT_SOURCES
    else:
        ok = dtype.is_numeric() or dtype == pl.String
    if not ok:
        return pl.lit(None, target)
    if target.is_integer() and (dtype.is_float() or dtype.is_decimal()):
        x = raw.cast(pl.Float64)
        return pl.when(x == x.floor()).then(raw.cast(target, strict=False))
    return raw.cast(target, strict=False)


def _evaluated(df: pl.DataFrame, expr: pl.Expr, name: str, target: pl.DataType) -> pl.Expr:
    """``expr`` computed now, or all null if polars cannot compute it for this column's type (every value is
    then rejected with the column's reason, and the batch goes on)."""
    try:
        values = df.select(expr.alias(name)).to_series().cast(target, strict=False)
        return pl.lit(values[0], target) if values.len() == 1 != df.height else pl.lit(values)
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, ArithmeticError, ValueError, TypeError):
        return pl.lit(None, target)


def coerce(df: pl.DataFrame, schema: pa.Schema, ts_unit: str = "auto") -> tuple[pl.DataFrame, pl.Series]:
    """Cast ``df``'s contract columns to ``schema`` and say, per row, why it fails (null = row is fine).

    Missing columns are added as nulls (so a missing *required* column fails every row with
    ``missing_required:<col>``); columns not in the schema are kept as they are. A field with ``min`` in its
    metadata rejects smaller values as ``value_out_of_range``.
    """
    checks: list[pl.Expr] = []
    casts: list[pl.Expr] = []
    categorical = [c for c, t in df.schema.items() if isinstance(t, pl.Categorical | pl.Enum)]
    if categorical:                                       # dictionary-encoded text is text
        df = df.with_columns(pl.col(categorical).cast(pl.String))
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
            parsed = pl.lit(None, target) if _is_nested(df.schema[name]) else _timestamps(df, name, ts_unit)
            bad = qr.BAD_TIMESTAMP
        else:
            parsed = _cast(df, name, target)
            bad = qr.BAD_TYPE.format(column=name)
        if NESTED in df.columns:     # a list or object the reader had to write as text (transforms.read)
            parsed = pl.when(pl.col(NESTED).str.split(NESTED_SEP).list.contains(name).fill_null(False)).then(
                pl.lit(None, target)).otherwise(parsed)
        parsed = _evaluated(df, parsed, name, target)
        casts.append(parsed.alias(name))
        if not field.nullable:  # an empty or blank id is as missing as a null one (CSV writes nulls so)
            missing = raw.is_null()
            if df.schema[name] == pl.String:
                missing = missing | raw.str.contains(r"^\s*$")
            checks.append(pl.when(missing).then(pl.lit(qr.MISSING_REQUIRED.format(column=name))))
        checks.append(pl.when(raw.is_not_null() & parsed.is_null()).then(pl.lit(bad)))
        low = (field.metadata or {}).get(b"min")
        if low is not None:
            checks.append(pl.when(parsed < float(low)).then(pl.lit(qr.VALUE_OUT_OF_RANGE)))
    reasons = df.select(pl.coalesce(*checks).alias(_REASON) if checks else pl.lit(None, pl.String))
    return df.with_columns(casts).drop(NESTED, strict=False), reasons.to_series().cast(pl.String)


def conform_extras(df: pl.DataFrame, extra: pa.Schema) -> tuple[pl.DataFrame, pl.Series]:
    """Cast the kept non-contract columns to the types chosen over every input file (``extra``), and say per
    row which value does not convert (``bad_type:<column>``, null = fine). A column whose type differs between
    files is text (numbers as written, lists and objects as JSON, bytes as base64), so that files of one table
    always concatenate; a value a file's first block did not announce (a word in a column of booleans) costs
    its row, not the run."""
    casts, checks = [], []
    for field in extra:
        if field.name not in df.columns:
            continue
        target = pl.from_arrow(pa.array([], field.type)).dtype
        dtype = df.schema[field.name]
        if dtype == target:
            continue
        col = pl.col(field.name)
        if target == pl.String:
            expr = _as_text(col, dtype)
        elif target == pl.Boolean and dtype == pl.String:     # JSON/CSV spellings of a boolean
            word = col.str.strip_chars().str.to_lowercase()
            expr = pl.when(word == "true").then(True).when(word == "false").then(False)
        else:
            expr = col.cast(target, strict=False)
        cast = _evaluated(df, expr, field.name, target)
        casts.append(cast.alias(field.name))
        checks.append(pl.when(col.is_not_null() & cast.is_null()).then(pl.lit(qr.BAD_TYPE.format(column=field.name))))
    reasons = df.select(pl.coalesce(*checks) if checks else pl.lit(None, pl.String)).to_series().cast(pl.String)
    return (df.with_columns(casts) if casts else df), reasons


def _as_text(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A column of any type as text: JSON for nested values, base64 for bytes, the value's text otherwise."""
    if _has_binary(dtype) and dtype != pl.Binary:        # JSON with base64 bytes, value by value
        return col.map_elements(lambda v: json.dumps(v, default=_json_default), return_dtype=pl.String,
                                skip_nulls=True)
    if _is_nested(dtype):
        return (pl.struct(col.alias("v")).struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")
                .replace("null", None))
    if dtype == pl.Binary:
        return col.bin.encode("base64")
    return col.cast(pl.String)


def signal_checks(df: pl.DataFrame, known_types: Sequence[str], value_types: Sequence[str]) -> pl.Series:
    """Signal-specific reasons on a coerced batch: unknown type; a value-based label with value ∉ [0, 1]."""
    value = pl.col(sig.VALUE)
    return df.select(pl.coalesce(
        pl.when(~pl.col(sig.TYPE).is_in(list(known_types))).then(pl.lit(qr.UNKNOWN_SIGNAL_TYPE)),
        pl.when(pl.col(sig.TYPE).is_in(list(value_types)) & (value.is_null() | (value < 0) | (value > 1)))
        .then(pl.lit(qr.VALUE_OUT_OF_RANGE)),
    ).cast(pl.String)).to_series()


def quarantine_rows(raw: pl.DataFrame, reasons: pl.Series, table: str, files: Sequence[str],
                    hash_key: bytes | None = None) -> pa.Table:
    """Rejected rows in the quarantine schema: original record as JSON text, file, row and reason.

    ``files`` is the table's input list, which the rows' ``_file_index`` points into. The raw user id never
    reaches the record: it becomes ``user_hash``, the pseudonym the units carry (``hash_key`` as for the
    units), so that a rejected row can still be matched to its user. Bytes are written as base64.
    """
    payload = [c for c in raw.columns if c not in _PROVENANCE]
    paths = pl.Series(qr.SOURCE_FILE, list(files), pl.String).gather(raw[FILE_INDEX].cast(pl.Int64))
    fields = []
    for c in payload:
        dtype = raw.schema[c]
        if c == un.USER_HASH and imp.USER_ID in payload:       # the raw id's pseudonym takes this name
            continue
        if c == imp.USER_ID:
            users = raw[c] if dtype == pl.String else raw.select(_as_text(pl.col(c), dtype)).to_series()
            fields.append(pl.lit(pseudonymise(users, hash_key)).alias(un.USER_HASH))
        elif _has_binary(dtype):
            fields.append(_as_text(pl.col(c), dtype).alias(c))
        else:
            fields.append(pl.col(c))
    out = raw.select(
        pl.lit(table).alias(qr.TABLE),
        paths,
        pl.col(ROW_NUMBER).cast(pl.Int64).alias(qr.ROW_NUMBER),
        reasons.alias(qr.REASON),
        (pl.struct(fields).struct.json_encode() if fields else pl.lit("{}")).alias(qr.RECORD),
    )
    return out.to_arrow().cast(qr.SCHEMA)


class Validated(NamedTuple):
    ok: beam.PCollection
    quarantine: beam.PCollection
    counts: beam.PCollection
    context: beam.PCollection


@beam.typehints.with_output_types(Tagged)
class SplitBad(beam.DoFn):
    """RecordBatch in: coerced good rows out (``ok``, an Arrow table), rejected rows (``quarantined``) and counts
    (``counts``), each a :class:`transforms.outputs.Tagged` output.

    With a ``window`` (one day of a scheduled run), only the rows the day reads come out: impressions of the day
    (and those of its neighbours, id and ts only, tagged ``context``), signals within its context; a rejected
    row is quarantined by the day its ts falls in; the rest is counted as ``rows_other_day``.
    """

    def __init__(self, table: str, schema: pa.Schema, files: Sequence[str], known_types: Sequence[str] = (),
                 value_types: Sequence[str] = (), window: DayWindow | None = None, *, ts_unit: str = "auto",
                 extra: pa.Schema | None = None, key_env: str | None = None):
        self._table, self._schema, self._files = table, schema, list(files)
        self._known, self._value_types = list(known_types), list(value_types)
        self._window, self._ts_unit, self._extra, self._key_env = window, ts_unit, extra, key_env
        self._key: bytes | None = None

    def setup(self):
        self._key = key_from_env(self._key_env)   # read on the worker, never stored in the pipeline graph

    def process(self, batch: pa.RecordBatch):
        raw = pl.from_arrow(pa.Table.from_batches([batch]))
        df, reasons = coerce(raw, self._schema, self._ts_unit)
        if self._extra is not None:
            df, odd = conform_extras(df, self._extra)
            reasons = pl.select(pl.coalesce(reasons, odd)).to_series()
        if self._table == "signals":
            reasons = pl.select(pl.coalesce(reasons, signal_checks(df, self._known, self._value_types))).to_series()
        bad = reasons.is_not_null()
        good, counts, w = ~bad, {}, self._window
        if w is not None:
            ts = pl.col(imp.TS)
            if self._table == "impressions":            # the neighbours' impressions: to place signals
                context = df.select(w.in_context(ts) & ~w.owns(ts)).to_series() & good
                if context.any():
                    yield Tagged(CONTEXT, df.filter(context).select(imp.IMPRESSION_ID, imp.TS).to_arrow())
            reads = w.owns(ts) if self._table == "impressions" else w.in_context(ts)
            good = good & df.select(reads.fill_null(False)).to_series()
            bad = bad & df.select(w.owns(ts).fill_null(True)).to_series()    # unreadable ts: every day's
            counts[f"{self._table}.{OTHER_DAY}"] = raw.height - int(good.sum()) - int(bad.sum())
        n_bad = int(bad.sum())
        if n_bad:
            yield Tagged(QUARANTINED, quarantine_rows(raw.filter(bad), reasons.filter(bad), self._table,
                                                      self._files, self._key))
            counts[f"{self._table}.rows_quarantined"] = n_bad
        if counts:
            yield Tagged(COUNTS, counts)
        if good.any():
            yield Tagged(OK, df.filter(good).to_arrow())


class Validate(beam.PTransform):
    """Batches of one raw table → ``Validated(ok, quarantine, counts, context)``."""

    def __init__(self, table: str, schema: pa.Schema, files: Sequence[str], known_types: Sequence[str] = (),
                 value_types: Sequence[str] = (), window: DayWindow | None = None, **options):
        super().__init__()
        self._fn = SplitBad(table, schema, files, known_types, value_types, window, **options)

    def expand(self, batches):
        out = (batches | beam.ParDo(self._fn)
               | "Outputs" >> SplitTags({OK: pa.Table, QUARANTINED: pa.Table, COUNTS: dict, CONTEXT: pa.Table}))
        return Validated(out[OK], out[QUARANTINED], out[COUNTS], out[CONTEXT])


def contract_schema(table: str) -> pa.Schema:
    """The input-contract schema of ``table`` ('impressions' or 'signals')."""
    return {"impressions": imp.SCHEMA, "signals": sig.SCHEMA}[table]


def merge_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Sum count dictionaries key by key (the combiner for the ``counts`` outputs)."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total
