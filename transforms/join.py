"""Dedup, join and label, one hash bucket of impression ids at a time (docs/input-contract.md, docs/performance.md).

Elements are Arrow tables keyed by a stable bucket of ``impression_id``; a bucket holds every impression and
signal of its ids, so dedup, the join and label resolution are local polars operations on whole batches.
(A per-row ``CoGroupByKey`` is ~5x slower on the DirectRunner: docs/performance.md.) The runner groups only small
elements: each bucket's sub-table is Arrow IPC bytes, or the path of an Arrow file holding it (``spill_dir``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import apache_beam as beam
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas import impressions as imp
from schemas import quarantine as qr
from schemas import signals as sig
from schemas import units as un
from schemas.conform import conform
from schemas.hashing import bucket_of
from transforms.outputs import Tagged
from transforms.privacy import Pseudonyms, key_from_env, pseudonymise
from transforms.read import COUNTS, FILE_INDEX, ROW_NUMBER
from transforms.shuffle import decode_table, encode_table, spill_path, write_spill
from transforms.validate import CONTEXT, QUARANTINED, quarantine_rows
from transforms.window import OTHER_DAY, DayWindow
from transforms.write import WritesInBackground

LabelRule = float | str
_IMP_TS = "_impression_ts"


class KeyByBucket(WritesInBackground):
    """Arrow table → (bucket, sub-table) per bucket present, by a stable hash of ``key``.

    With ``key=None`` (quarantine rows) the rows are spread by where they came from. The sub-table travels as
    Arrow IPC bytes through the runner's shuffle, or, with ``spill_dir``, is written to a file there and only
    its path is shuffled (:func:`transforms.shuffle.spill_table`); the consumer reads either with ``decode_table``.
    Spill files are written in background threads and complete when the bundle is (``finish_bundle``), so the
    output must cross a grouping before anything reads the files, as every use here does.
    """

    def __init__(self, buckets: int, key: str | None, spill_dir: str | None = None):
        self._buckets, self._key, self._spill = buckets, key, spill_dir

    def process(self, table: pa.Table):
        if self._key is None:
            ids = pc.binary_join_element_wise(table[qr.SOURCE_FILE], table[qr.ROW_NUMBER].cast(pa.string()), ":")
        else:
            ids = table[self._key]
        for k, part in split_by_bucket(table, ids, self._buckets):
            if self._spill is None:
                yield k, encode_table(part)
            else:
                path = spill_path(self._spill, k)
                self._writes.submit(write_spill, part, path)
                yield k, path


def split_by_bucket(table: pa.Table, ids: pa.Array | pa.ChunkedArray, buckets: int) -> Iterator[tuple[int, pa.Table]]:
    """(bucket, rows) for each of ``buckets`` stable hash buckets of ``ids`` (one per row) present in ``table``,
    rows in table order."""
    b = bucket_of(ids, buckets)
    order = np.argsort(b, kind="stable")            # one gather, then a zero-copy slice per bucket
    bounds = np.searchsorted(b[order], np.arange(buckets + 1))
    table = table.take(pa.array(order))
    for k in range(buckets):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if hi > lo:
            yield k, table.slice(lo, hi - lo)


def dedup(df: pl.DataFrame, key: str) -> pl.DataFrame:
    """Keep one row per ``key``: the earliest ``ts``, ties broken by file and row (deterministic)."""
    return df.sort([key, imp.TS, FILE_INDEX, ROW_NUMBER]).unique(subset=[key], keep="first", maintain_order=True)


def label_expr(rules: Mapping[str, LabelRule]) -> pl.Expr:
    """Label of each signal from the config's type → rule map (a number, 'value' or '1 - value')."""
    expr = pl.lit(None, pl.Float64)
    for t, rule in rules.items():
        if rule == "value":
            value = pl.col(sig.VALUE)
        elif rule == "1 - value":
            value = 1.0 - pl.col(sig.VALUE)
        else:
            value = pl.lit(float(rule))
        expr = pl.when(pl.col(sig.TYPE) == t).then(value).otherwise(expr)
    return expr


Aggregate = Literal["latest", "mean", "majority"]
_RATER, _EXPLICIT = "_rater", "_explicit"
MEAN_OF_VOTES, MAJORITY_OF_VOTES = "mean_of_votes", "majority_of_votes"
"""``label_source`` of a unit whose label combines two or more raters' votes."""


def resolve_labels(signals: pl.DataFrame, rules: Mapping[str, LabelRule], explicit: Sequence[str],
                   observe: Sequence[str], *, aggregate: Aggregate = "mean",
                   prior: tuple[float, float] | None = None) -> pl.DataFrame:
    """One label per impression from its raters' votes; implicit signals count only without any vote.

    A vote is an explicit signal; its rater is the signal's ``user_id`` (null or absent: the impression's user,
    see :func:`build_units`). Each rater's latest vote is theirs (a mind change replaces, it does not add), then
    ``aggregate`` combines the raters' labels y_1..y_n:

    * ``latest``: the latest vote of any rater (ties by event id), as when one vote was all there was;
    * ``mean``: ȳ, or (Σ y_i + a) / (n + a + b) with a Beta(a, b) ``prior`` (the posterior mean of a
      Bernoulli rate, which shrinks units with few votes towards a / (a + b));
    * ``majority``: 1 if more raters are above 0.5 than below, 0 if fewer, 0.5 on a tie (0.5 itself abstains).

    A unit without votes takes its latest implicit signal's label (no prior). Only types in ``observe`` make a
    unit observed. Returns ``impression_id, label, label_source, n_votes`` (raters whose vote counted).

    >>> import datetime as dt
    >>> t = [dt.datetime(2026, 11, 1, 0, 0, s, tzinfo=dt.UTC) for s in range(4)]
    >>> s = pl.DataFrame({"event_id": ["e0", "e1", "e2", "e3"], "impression_id": ["a"] * 4, "ts": t,
    ...                   "type": ["downvote", "upvote", "upvote", "downvote"], "value": [None] * 4,
    ...                   "user_id": ["u1", "u1", "u2", "u3"]})
    >>> resolve_labels(s, {"upvote": 1.0, "downvote": 0.0}, ["upvote", "downvote"], ["upvote", "downvote"],
    ...                aggregate="mean").rows()       # u1 changed their mind: votes 1, 1, 0
    [('a', 0.6666666666666666, 'mean_of_votes', 3)]
    """
    if prior is not None and aggregate != "mean":
        raise ValueError(f"a prior shrinks a mean of votes, not aggregate = {aggregate!r}")
    rater = pl.col(sig.RATER) if sig.RATER in signals.columns else pl.lit(None, pl.String)
    cand = (signals.filter(pl.col(sig.TYPE).is_in(list(observe)))
            .with_columns(label_expr(rules).alias(un.LABEL), pl.col(sig.TYPE).is_in(list(explicit)).alias(_EXPLICIT),
                          rater.alias(_RATER)))
    order = [sig.TS, sig.EVENT_ID]
    # Each rater's latest vote (null raters are one rater: the impression's user).
    votes = (cand.filter(pl.col(_EXPLICIT)).sort([imp.IMPRESSION_ID, _RATER, *order], nulls_last=True)
             .group_by([imp.IMPRESSION_ID, _RATER], maintain_order=True)
             .agg(pl.col(un.LABEL).last(), pl.col(sig.TYPE).last(), *(pl.col(c).last() for c in order)))
    latest = pl.col(un.LABEL).sort_by(order).last()
    y, n = pl.col(un.LABEL), pl.len().cast(pl.Int32)
    if aggregate == "latest":
        label = latest
    elif aggregate == "mean":
        label = y.mean() if prior is None else (y.sum() + prior[0]) / (pl.len() + prior[0] + prior[1])
    else:
        ups, downs = (y > 0.5).sum(), (y < 0.5).sum()
        label = pl.when(ups > downs).then(1.0).when(ups < downs).then(0.0).otherwise(0.5)
    combined = {"mean": MEAN_OF_VOTES, "majority": MAJORITY_OF_VOTES}.get(aggregate)
    last_type = pl.col(sig.TYPE).sort_by(order).last()
    source = last_type if combined is None else pl.when(n > 1).then(pl.lit(combined)).otherwise(last_type)
    voted = (votes.group_by(imp.IMPRESSION_ID, maintain_order=True)
             .agg(label.cast(pl.Float64).alias(un.LABEL), source.alias(un.LABEL_SOURCE), n.alias(un.N_VOTES)))
    implicit = (cand.filter(~pl.col(_EXPLICIT)).join(voted.select(imp.IMPRESSION_ID), on=imp.IMPRESSION_ID,
                                                     how="anti")
                .sort([imp.IMPRESSION_ID, *order])
                .group_by(imp.IMPRESSION_ID, maintain_order=True)
                .agg(pl.col(un.LABEL).last(), pl.col(sig.TYPE).last().alias(un.LABEL_SOURCE),
                     pl.lit(0, pl.Int32).alias(un.N_VOTES)))
    return pl.concat([voted, implicit], how="vertical_relaxed")


def _with_raters(sigs: pl.DataFrame, imps: pl.DataFrame) -> pl.DataFrame:
    """The signals with a rater on every row: their ``user_id``, or the impression's user where it is null or
    absent (so that a null and the user's own id are one rater). Used only to resolve labels: never output."""
    if sig.RATER not in sigs.columns or sigs.height == 0:
        return sigs
    users = imps.select(imp.IMPRESSION_ID, pl.col(imp.USER_ID).alias("_impression_user"))
    return (sigs.join(users, on=imp.IMPRESSION_ID, how="left")
            .with_columns(pl.coalesce(sig.RATER, "_impression_user").alias(sig.RATER)).drop("_impression_user"))


def gold_labels(signals: pl.DataFrame, gold: str | None) -> pl.DataFrame:
    """The audited label of each audited impression: the value of its latest ``gold`` signal."""
    if gold is None:
        return pl.DataFrame(schema={imp.IMPRESSION_ID: pl.String, un.LABEL_GOLD: pl.Float64})
    return (signals.filter(pl.col(sig.TYPE) == gold).sort([imp.IMPRESSION_ID, sig.TS, sig.EVENT_ID])
            .group_by(imp.IMPRESSION_ID, maintain_order=True).agg(pl.col(sig.VALUE).last().alias(un.LABEL_GOLD)))


def build_units(imps: pl.DataFrame, sigs: pl.DataFrame | None, *, rules: Mapping[str, LabelRule],
                explicit: Sequence[str], observe: Sequence[str], known_types: Sequence[str],
                unobserved_label: float | None, hash_key: bytes | None, units_schema: pa.Schema,
                gold: str | None = None, aggregate: Aggregate = "mean",
                prior: tuple[float, float] | None = None, pseudonyms: Pseudonyms | None = None) -> pa.Table:
    """Deduplicated impressions + their valid signals → units: per-type counts, resolved label (``aggregate``
    and ``prior``: :func:`resolve_labels`), number of votes, observed flag, gold label, pseudonymised user (the
    raw user id, the signals' rater ids and provenance columns are dropped), sorted by impression id."""
    if sigs is None:
        sigs = pl.DataFrame(schema={imp.IMPRESSION_ID: pl.String, sig.EVENT_ID: pl.String, sig.TYPE: pl.String,
                                    sig.TS: pl.Datetime("us", "UTC"), sig.VALUE: pl.Float64})
    per_type = sigs.group_by(imp.IMPRESSION_ID).agg(
        (pl.col(sig.TYPE) == t).sum().cast(pl.Int32).alias(un.count_column(t)) for t in known_types)
    labels = resolve_labels(_with_raters(sigs, imps), rules, explicit, observe, aggregate=aggregate, prior=prior)
    df = (imps.join(per_type, on=imp.IMPRESSION_ID, how="left")
          .join(labels, on=imp.IMPRESSION_ID, how="left")
          .join(gold_labels(sigs, gold), on=imp.IMPRESSION_ID, how="left")
          .with_columns(*(pl.col(un.count_column(t)).fill_null(0) for t in known_types),
                        pl.col(un.N_VOTES).fill_null(0)))
    observed = pl.col(un.LABEL).is_not_null()
    if unobserved_label is not None:  # click-through framing: every impression is labelled
        df = df.with_columns(pl.col(un.LABEL_SOURCE).fill_null(pl.lit("unobserved_default")),
                             pl.col(un.LABEL).fill_null(unobserved_label))
        observed = pl.lit(True)
    df = df.with_columns(observed.cast(pl.Int8).alias(un.OBSERVED),
                         pseudonymise(df[imp.USER_ID], hash_key, pseudonyms).alias(un.USER_HASH))
    df = df.drop(imp.USER_ID, FILE_INDEX, ROW_NUMBER).sort(imp.IMPRESSION_ID)
    return conform(df.to_arrow(), units_schema, where="units")


ROWS, UNITS = "rows", "units"
"""Output tags (:class:`transforms.outputs.Tagged`): DedupByKey's kept rows, JoinAndLabel's (bucket, units)."""


@beam.typehints.with_output_types(Tagged)
class DedupByKey(beam.DoFn):
    """(bucket of ``key``, [tables]) → the rows that survive dedup on ``key`` (``rows``), and the duplicate count
    (``counts``).

    Signals are deduplicated in their own shuffle, keyed by event id, so that a replay is caught even when it
    names another impression than the original (it then never reaches that impression's bucket).
    """

    def __init__(self, key: str, table: str):
        self._key, self._table = key, table

    def process(self, element):
        _, tables = element
        raw = _concat(tables)
        if raw is None:
            return
        kept = dedup(raw, self._key)
        yield Tagged(COUNTS, {f"{self._table}.rows_duplicate": raw.height - kept.height})
        yield Tagged(ROWS, kept.to_arrow())


@beam.typehints.with_output_types(Tagged)
class JoinAndLabel(beam.DoFn):
    """(bucket, {impressions: [...], signals: [...]}) → (bucket, units table) (``units``); orphans and time
    travellers (``quarantined``); row counts (``counts``).

    The HMAC key is read from the environment variable ``key_env`` on the worker (in ``setup``), never stored
    in the DoFn: a serialised pipeline (a Dataflow job graph, a Flink jar) then holds no secret. On a remote
    runner, set the variable in the workers' environment.
    """

    def __init__(self, *, rules: Mapping[str, LabelRule], explicit: Sequence[str], observe: Sequence[str],
                 known_types: Sequence[str], unobserved_label: float | None, key_env: str | None,
                 units_schema: pa.Schema, signal_files: Sequence[str], gold: str | None = None,
                 window: DayWindow | None = None, aggregate: Aggregate = "mean",
                 prior: tuple[float, float] | None = None):
        self._rules, self._explicit, self._observe = dict(rules), list(explicit), list(observe)
        self._aggregate, self._prior = aggregate, prior
        self._known, self._unobserved_label = list(known_types), unobserved_label
        self._key_env, self._schema, self._signal_files = key_env, units_schema, list(signal_files)
        self._gold, self._window = gold, window
        self._key: bytes | None = None

    def setup(self):
        self._key = key_from_env(self._key_env)
        self._pseudonyms = Pseudonyms()

    def process(self, element):
        bucket, groups = element
        imps_raw = _concat(groups["impressions"])
        sigs_raw = _concat(groups["signals"])
        counts: dict[str, int] = {}
        context = _concat(groups.get(CONTEXT, [])) if self._window is not None else None
        imps = None
        if imps_raw is not None:
            imps = dedup(imps_raw, imp.IMPRESSION_ID)
            counts["impressions.rows_duplicate"] = imps_raw.height - imps.height
            if context is not None:                # an earlier copy on a neighbouring day is the one that counts
                imps, counts["impressions." + OTHER_DAY] = _not_first_copy(imps, context)
        if sigs_raw is not None:
            sigs = sigs_raw                      # already one row per event id: see DedupByKey
            lookup = (imps.select(imp.IMPRESSION_ID, pl.col(imp.TS).alias(_IMP_TS)) if imps is not None
                      else pl.DataFrame(schema={imp.IMPRESSION_ID: pl.String, _IMP_TS: pl.Datetime("us", "UTC")}))
            sigs = sigs.join(lookup, on=imp.IMPRESSION_ID, how="left")
            if self._window is not None:
                sigs, counts["signals." + OTHER_DAY] = self._not_this_day(sigs, context)
            reason = (pl.when(pl.col(_IMP_TS).is_null()).then(pl.lit(qr.ORPHAN_SIGNAL))
                      .when(pl.col(sig.TS) < pl.col(_IMP_TS)).then(pl.lit(qr.TIME_TRAVEL)))
            sigs = sigs.with_columns(reason.alias("_reason"))
            bad = sigs.filter(pl.col("_reason").is_not_null())
            if bad.height:
                yield Tagged(QUARANTINED, quarantine_rows(bad.drop("_reason", _IMP_TS), bad["_reason"], "signals",
                                                          self._signal_files, self._key))
                counts["signals.rows_quarantined"] = bad.height
            sigs = sigs.filter(pl.col("_reason").is_null()).drop("_reason", _IMP_TS)
        if imps is not None and imps.height:
            units = build_units(imps, sigs if sigs_raw is not None else None, rules=self._rules,
                                explicit=self._explicit, observe=self._observe, known_types=self._known,
                                unobserved_label=self._unobserved_label, hash_key=self._key,
                                units_schema=self._schema, gold=self._gold, aggregate=self._aggregate,
                                prior=self._prior, pseudonyms=self._pseudonyms)
            counts["signals.rows_ok"] = sum(pc.sum(units[un.count_column(t)]).as_py() for t in self._known)
            yield Tagged(UNITS, (bucket, units))
        elif sigs_raw is not None:
            counts["signals.rows_ok"] = 0
        yield Tagged(COUNTS, counts)


    def _not_this_day(self, sigs: pl.DataFrame, context: pl.DataFrame | None) -> tuple[pl.DataFrame, int]:
        """Drop the signals that belong to another day: those of a neighbouring day's impression, and those
        with no impression whose own ts is outside the day (their day reports them as orphans)."""
        unmatched = pl.col(_IMP_TS).is_null()
        neighbour = (pl.col(imp.IMPRESSION_ID).is_in(context[imp.IMPRESSION_ID].implode()) if context is not None
                     else pl.lit(False))
        other = unmatched & (neighbour | ~self._window.owns(pl.col(sig.TS)))
        n_other = int(sigs.select(other.sum()).item())
        return sigs.filter(~other), n_other


def _not_first_copy(imps: pl.DataFrame, context: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Drop the day's impressions whose id a neighbouring day logged earlier (that day owns the unit), and say
    how many: as one run over everything keeps the earliest copy."""
    first = context.group_by(imp.IMPRESSION_ID).agg(pl.col(imp.TS).min().alias("_first"))
    later = (imps.join(first, on=imp.IMPRESSION_ID, how="inner").filter(pl.col("_first") < pl.col(imp.TS))
             .select(imp.IMPRESSION_ID))
    kept = imps.join(later, on=imp.IMPRESSION_ID, how="anti")
    return kept, imps.height - kept.height


def _concat(tables: Sequence[bytes | pa.Table]) -> pl.DataFrame | None:
    tables = [t for t in map(decode_table, tables) if t.num_rows]
    if not tables:
        return None
    return pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
