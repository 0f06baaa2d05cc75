"""Ingest stage: raw impressions + signals → validated, deduplicated, joined, labelled units (docs/input-contract.md).

`build` is the Beam graph (no argv, environment or printing: tests drive it); `run` resolves inputs, runs
the graph with the caller's Beam options, checks the row-count invariant and commits the outputs atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from schemas import impressions as imp
from schemas import pointwise
from schemas import quarantine as qr
from schemas import run_dir as rd
from schemas import signals as sig
from schemas import units as un
from schemas.config import Config
from schemas.errors import GateError, InputError
from schemas.manifest import describe_inputs
from schemas.run_dir import RunDir
from schemas.stages import IngestDiagnostics, IngestResult
from schemas.storage import (
    commit_dir,
    count_rows,
    ensure_part,
    parquet_files,
    read_dataset,
    scratch_dir,
    staging_dir,
)
from schemas.suites import units_suite
from transforms.gates import gate_failures, prefetch_gx, raw_id_leaks, raw_user_fields
from transforms.join import ROWS, UNITS, DedupByKey, JoinAndLabel, KeyByBucket
from transforms.outputs import SplitTags
from transforms.privacy import key_from_env
from transforms.read import COUNTS, INTERNAL_COLUMNS, ReadRaw, check_columns, file_schemas, input_files
from transforms.runner import pipeline
from transforms.validate import CONTEXT, QUARANTINED, Validate, merge_counts
from transforms.window import OTHER_DAY, DayWindow
from transforms.write import WriteBucketParts, WriteJson

TABLES = ("impressions", "signals")


def extra_fields(schemas: dict[str, pa.Schema], known_types: Sequence[str] = ()) -> list[pa.Field]:
    """Impression columns beyond the contract (e.g. features), kept on the units, typed over every file: a
    column whose type differs between files is float64 when every type is numeric, else text
    (``transforms.validate.conform_extras``).

    A column named like one obsfeed writes itself (``user_hash``, ``n_upvote``, ``weight_ips``, ...) is refused
    up front: it would be silently replaced, or clash in the output schema; so is a user id nested in a column.
    """
    declared = set(imp.SCHEMA.names)
    types: dict[str, set[pa.DataType]] = {}
    for schema in schemas.values():
        for f in schema:
            if f.name in declared:
                continue
            t = f.type
            if pa.types.is_large_string(t) or pa.types.is_dictionary(t):
                t = pa.string()
            elif pa.types.is_large_binary(t):
                t = pa.binary()
            if not pa.types.is_null(t):                 # an all-null column of one file says nothing of its type
                types.setdefault(f.name, set()).add(t)
            else:
                types.setdefault(f.name, set())
    reserved = set(pointwise.pointwise_schema(un.units_schema(known_types)).names) | set(INTERNAL_COLUMNS)
    clash = sorted(set(types) & reserved)
    if clash:
        raise InputError(f"{next(iter(schemas))}: impression column{'s' if len(clash) > 1 else ''} {', '.join(clash)} "
                         "would clash with obsfeed's own output columns; rename "
                         f"{'them' if len(clash) > 1 else 'it'} in the input")
    for path, schema in schemas.items():
        nested = [p for p in raw_user_fields(schema) if p != imp.USER_ID]      # the contract's own column aside
        if nested:
            raise InputError(f"{path}: column {nested[0]!r} would carry raw user ids into the units; drop it or "
                             "move the id to the user_id column")
    return [pa.field(name, _common_type(ts)) for name, ts in types.items()]


def _common_type(types: set[pa.DataType]) -> pa.DataType:
    """One type for a column over files: its type, float64 for numbers of several types, else text."""
    if not types:                     # null in every file's first block: the values that follow are kept as text
        return pa.string()
    if len(types) == 1:
        return next(iter(types))
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    return pa.string()


def key_env(cfg: Config) -> str | None:
    """The environment variable holding the HMAC key for user ids, checked here so that a missing key fails
    before the pipeline starts; None when it is unset and the config explicitly allows unkeyed hashing."""
    if os.environ.get(cfg.privacy.key_env) or not cfg.privacy.allow_unkeyed:
        key_from_env(cfg.privacy.key_env)
        return cfg.privacy.key_env
    return None


def build(p: beam.Pipeline, cfg: Config, *, impression_files: Sequence[str], signal_files: Sequence[str],
          units_schema: pa.Schema, key_env: str | None, units_dir: str, quarantine_dir: str,
          counts_path: str, scratch_dir: str) -> None:
    """The ingest graph: read → validate → dedup events by event id → bucket by impression → dedup impressions
    + join + label → write units, quarantine, counts."""
    ing, buckets = cfg.ingest, cfg.ingest.buckets
    window = DayWindow.of(ing.day, ing.late_window)
    spill = {"events": f"{scratch_dir}/events", "impressions": f"{scratch_dir}/impressions",
             "signals": f"{scratch_dir}/signals", "context": f"{scratch_dir}/context"} if ing.shuffle == "files" else {}
    imps = p | "ReadImpressions" >> ReadRaw(list(impression_files), "impressions",
                                            string_columns=_string_columns(imp.SCHEMA),
                                            user_column=imp.USER_ID, key_env=key_env)
    sigs = p | "ReadSignals" >> ReadRaw(list(signal_files), "signals", string_columns=_string_columns(sig.SCHEMA),
                                        user_column=imp.USER_ID, key_env=key_env)   # a user id logged there too
    extra = pa.schema([f for f in units_schema if f.name not in un.units_schema(ing.known_types).names])
    v_imps = imps.batches | "ValidateImpressions" >> Validate("impressions", imp.SCHEMA, impression_files,
                                                              window=window, ts_unit=ing.ts_unit, extra=extra,
                                                              key_env=key_env)
    v_sigs = sigs.batches | "ValidateSignals" >> Validate("signals", sig.SCHEMA, signal_files, ing.known_types,
                                                          ing.value_types, window=window, ts_unit=ing.ts_unit,
                                                          key_env=key_env)
    unique_sigs = (v_sigs.ok
                   | "BucketEvents" >> beam.ParDo(KeyByBucket(buckets, sig.EVENT_ID, spill.get("events")))
                   | "GroupEvents" >> beam.GroupByKey()
                   | "DedupEvents" >> beam.ParDo(DedupByKey(sig.EVENT_ID, "signals"))
                   | "DedupOutputs" >> SplitTags({ROWS: pa.Table, COUNTS: dict}))
    keyed = {
        "impressions": v_imps.ok | "BucketImpressions" >> beam.ParDo(
            KeyByBucket(buckets, imp.IMPRESSION_ID, spill.get("impressions"))),
        "signals": unique_sigs[ROWS] | "BucketSignals" >> beam.ParDo(
            KeyByBucket(buckets, sig.IMPRESSION_ID, spill.get("signals"))),
    }
    if window is not None:                  # the neighbouring days' impressions, to place each signal in its day
        keyed[CONTEXT] = v_imps.context | "BucketContext" >> beam.ParDo(
            KeyByBucket(buckets, imp.IMPRESSION_ID, spill.get("context")))
    joined = (keyed | "CoGroupBuckets" >> beam.CoGroupByKey()
              | "JoinAndLabel" >> beam.ParDo(JoinAndLabel(
                  rules=ing.labels, explicit=ing.explicit, observe=ing.observe_types, known_types=ing.known_types,
                  gold=ing.gold, window=window, aggregate=ing.aggregate, prior=ing.prior,
                  unobserved_label=ing.unobserved_label, key_env=key_env, units_schema=units_schema,
                  signal_files=signal_files))
              | "JoinOutputs" >> SplitTags({UNITS: tuple[int, pa.Table], QUARANTINED: pa.Table, COUNTS: dict}))
    written = [joined[UNITS]
               | "AsGroups" >> beam.MapTuple(lambda k, t: (k, [t])).with_output_types(tuple[int, list[pa.Table]])
               | "WriteUnits" >> beam.ParDo(WriteBucketParts(units_dir, units_schema, [un.IMPRESSION_ID],
                                                             cfg.output))]
    written.append(
        (imps.quarantine, sigs.quarantine, v_imps.quarantine, v_sigs.quarantine, joined[QUARANTINED])
        | "FlattenQuarantine" >> beam.Flatten()
        | "BucketQuarantine" >> beam.ParDo(KeyByBucket(buckets, None))
        | "GroupQuarantine" >> beam.GroupByKey()
        | "WriteQuarantine" >> beam.ParDo(WriteBucketParts(
            quarantine_dir, qr.SCHEMA, [qr.TABLE, qr.SOURCE_FILE, qr.ROW_NUMBER], cfg.output)))
    written.append(
        (imps.counts, sigs.counts, v_imps.counts, v_sigs.counts, unique_sigs[COUNTS], joined[COUNTS])
        | "FlattenCounts" >> beam.Flatten()
        | "MergeCounts" >> beam.CombineGlobally(merge_counts).without_defaults()     # every file gives counts
        | "WriteCounts" >> beam.ParDo(WriteJson(counts_path)))
    # One terminal step that every sink feeds: a runner that computes only the graph's last step (Beam 2.77's
    # DaskRunner) still writes everything. The DoFns' several outputs are Tagged elements (transforms.outputs).
    _ = tuple(written) | "Written" >> beam.Flatten()


def _string_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_string(f.type)]


def reconcile(counts: dict[str, int], units_rows: int, quarantined: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per-table row counts, checking ``rows_in = rows_ok + rows_quarantined + rows_duplicate
    + rows_other_day`` (the last: rows that belong to another day of a scheduled run; 0 otherwise)."""
    out = {}
    for table in TABLES:
        c = {
            "rows_in": counts.get(f"{table}.rows_in", 0),
            "rows_ok": units_rows if table == "impressions" else counts.get("signals.rows_ok", 0),
            "rows_quarantined": quarantined.get(table, 0),
            "rows_duplicate": counts.get(f"{table}.rows_duplicate", 0),
        }
        if f"{table}.{OTHER_DAY}" in counts:               # a scheduled day's run
            c[OTHER_DAY] = counts[f"{table}.{OTHER_DAY}"]
        if c["rows_in"] != c["rows_ok"] + c["rows_quarantined"] + c["rows_duplicate"] + c.get(OTHER_DAY, 0):
            raise RuntimeError(f"ingest lost rows of {table}: {c} does not reconcile")
        out[table] = c
    return out


def execute(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> IngestResult:
    """Run the ingest graph with the caller's Beam options and commit ``units/`` and ``quarantine/``."""
    impression_files, signal_files = input_files(cfg)
    impression_schemas = file_schemas(impression_files)
    check_columns(impression_files, imp.SCHEMA, impression_schemas)
    check_columns(signal_files, sig.SCHEMA)
    env = key_env(cfg)
    schema = un.units_schema(cfg.ingest.known_types, extra_fields(impression_schemas, cfg.ingest.known_types))
    units_final, quarantine_final = run.path(rd.UNITS), run.path(rd.QUARANTINE)
    units_tmp, quarantine_tmp = staging_dir(units_final), staging_dir(quarantine_final)
    scratch = scratch_dir(run.root, "ingest")
    prefetch_gx()                                         # imported while the pipeline runs, for the units gate
    hashing = ThreadPoolExecutor(1, thread_name_prefix="hash-inputs")    # the inputs' sha256, beside the pipeline
    inputs = hashing.submit(describe_inputs, [*impression_files, *signal_files])
    hashing.shutdown(wait=False)
    start = time.perf_counter()
    try:
        with pipeline(beam_args) as p:
            build(p, cfg, impression_files=impression_files, signal_files=signal_files, units_schema=schema,
                  key_env=env, units_dir=str(units_tmp), quarantine_dir=str(quarantine_tmp),
                  counts_path=str(scratch / "counts.json"), scratch_dir=str(scratch / "shuffle"))
        ensure_part(quarantine_tmp, qr.SCHEMA, cfg.output)       # an empty quarantine is still a dataset
        counts = json.loads((scratch / "counts.json").read_text())
        quarantined = _quarantine_by_table(quarantine_tmp)
        table_counts = reconcile(counts, count_rows(units_tmp), quarantined)
        read = {t: c["rows_in"] - c.get(OTHER_DAY, 0) for t, c in table_counts.items()}   # this day's rows
        bad = {t: table_counts[t]["rows_quarantined"] / n if n else 0.0 for t, n in read.items()}
        worst = max(bad, key=bad.get)
        if bad[worst] > cfg.ingest.max_bad_fraction:
            leaked = raw_id_leaks({"quarantine": quarantine_tmp})
            if leaked:
                raise GateError(f"ingest: {leaked}")
            failed = run.path(rd.FAILED_QUARANTINE)
            commit_dir(quarantine_tmp, failed)
            raise GateError(f"ingest: {bad[worst]:.1%} of {worst} rows were quarantined, above "
                            f"ingest.max_bad_fraction = {cfg.ingest.max_bad_fraction:.1%}; see {failed} (the "
                            "previous outputs are left in place)")
        pipeline_s = time.perf_counter() - start
        suite = units_suite(schema)
        failures = gate_failures(parquet_files(units_tmp), suite) if count_rows(units_tmp) else []
        gate_s = time.perf_counter() - start - pipeline_s
        if failures:
            raise GateError(f"ingest: the units gate failed ({len(failures)} expectations): " + "; ".join(failures))
        ensure_part(units_tmp, schema, cfg.output)
        leaked = raw_id_leaks({"units": units_tmp, "quarantine": quarantine_tmp})
        if leaked:
            raise GateError(f"ingest: {leaked}")
        # Committed only now that every gate passed: a failed ingest leaves units/ and quarantine/ as they were.
        commit_dir(quarantine_tmp, quarantine_final)
        commit_dir(units_tmp, units_final)
        shutil.rmtree(run.path(rd.FAILED_QUARANTINE), ignore_errors=True)
    finally:
        for d in (units_tmp, quarantine_tmp, scratch):
            shutil.rmtree(d, ignore_errors=True)
    return IngestResult(
        inputs=inputs.result(),
        outputs=[str(units_final), str(quarantine_final)],
        counts=table_counts,
        diagnostics=IngestDiagnostics(
            **_unit_diagnostics(units_final), votes=votes_diagnostics(units_final, cfg),
            quarantine_reasons=_reasons(quarantine_final), bad_fraction=bad,
            gate={"suite": suite.name, "expectations": len(suite.expectations), "failed": 0},
            seconds={"pipeline": round(pipeline_s, 3), "units_gate": round(gate_s, 3)}),
    )


def _quarantine_by_table(directory: Path) -> dict[str, int]:
    if not any(directory.glob("*.parquet")):
        return {}
    t = read_dataset(directory, [qr.TABLE])
    return {r["values"]: r["counts"] for r in pc.value_counts(t[qr.TABLE]).to_pylist()}


def _reasons(directory: Path) -> dict[str, int]:
    if not any(directory.glob("*.parquet")):
        return {}
    t = read_dataset(directory, [qr.TABLE, qr.REASON])
    keys = pc.binary_join_element_wise(t[qr.TABLE], t[qr.REASON], ":")
    return dict(sorted((r["values"], r["counts"]) for r in pc.value_counts(keys).to_pylist()))


def _unit_diagnostics(directory: Path) -> dict[str, Any]:
    t = read_dataset(directory, [un.OBSERVED, un.LABEL, un.LABEL_SOURCE])
    n = t.num_rows
    observed = int(pc.sum(t[un.OBSERVED]).as_py() or 0)
    sources = pc.value_counts(pc.fill_null(t[un.LABEL_SOURCE], "none")).to_pylist()
    return {"units": n, "observed": observed, "observed_rate": observed / n if n else 0.0,
            "mean_label_observed": pc.mean(t[un.LABEL]).as_py(),
            "label_source": dict(sorted((r["values"], r["counts"]) for r in sources))}


VOTE_BINS = ("0", "1", "2", "3", "4", "5+")
"""The votes-per-unit bins of the ingest diagnostics (``votes.units_by_votes``)."""


def votes_diagnostics(directory: Path, cfg: Config) -> dict[str, Any]:
    """How many raters' votes each unit's label rests on: units by ``n_votes`` (0, 1, ..., 5+), the mean over
    the voted units, and how the votes were combined (``ingest.aggregate``, ``ingest.prior``)."""
    t = read_dataset(directory, [un.N_VOTES])
    n = t[un.N_VOTES].to_numpy()
    voted = n[n > 0]
    return {"aggregate": cfg.ingest.aggregate, "prior": list(cfg.ingest.prior) if cfg.ingest.prior else None,
            "units_by_votes": {b: int((n >= 5).sum() if b == "5+" else (n == int(b)).sum()) for b in VOTE_BINS},
            "mean_votes_of_voted_units": float(voted.mean()) if voted.size else 0.0,
            "units_with_several_votes": int((n >= 2).sum())}
