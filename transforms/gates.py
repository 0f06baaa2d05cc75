"""The data gates: an expectation suite checked on every row with Arrow, part file by part file, and by Great
Expectations on a sample of those rows (which expectations failed); and no raw user id in any output.

Every row is checked with Arrow (:func:`arrow_results`), one part file at a time, so a gate costs a fraction of a
second per million rows and holds one part's gate columns in memory, however large the dataset. GX validates the
same suite (``Suite.to_gx``) on a sample of the rows: what GX finds there that Arrow did not also fails the gate,
so the two engines are held to the same contract (``tests/test_gates.py`` checks they agree on every planted
violation). Uniqueness is checked within each part: obsfeed's parts are hash buckets of the unique key, so equal
keys always land in the same part.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import quarantine as qr
from schemas.storage import read_dataset
from schemas.suites import RAW_ID_KEY, RAW_USER_COLUMNS, Expectation, Suite, suite_columns

logger = logging.getLogger(__name__)

GX_SAMPLE_ROWS = 20_000
"""Rows GX validates per gate: the first rows of each part, as evenly as the parts allow."""


class _GxWorker:
    """A child Python process that imports GX at once and then validates the tables it is sent.

    Why a process: importing GX takes about 2 s of Python; in a thread of the stage's process it held the GIL
    from the pipeline for as long as it saved at the gate (measured at 1M impressions). A plain subprocess, not
    ``multiprocessing``: a spawned ``multiprocessing`` child re-imports the caller's main script, which would re-run
    a script that calls a stage at its top level. Requests and replies are framed pickles (a magic tag and a
    length) over the child's stdin and a private copy of its stdout; its own fd 1 points at stderr, so nothing the
    child prints can reach the replies. A reply is ``("ok", failures)`` or ``("error", traceback)``.
    """

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-c", "from transforms.gates import _serve_gx; _serve_gx()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def failures(self, table: pa.Table, suite: Suite) -> list[str]:
        _send(self._proc.stdin, (table, suite))
        status, body = _receive(self._proc.stdout)
        if status != "ok":
            raise RuntimeError(f"Great Expectations failed in the GX worker process:\n{body}")
        return body

    def close(self) -> None:
        try:
            self._proc.stdin.close()                       # the worker's loop ends at end of input
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        self._proc.kill()


_MAGIC = b"OBSFGX1\n"


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_MAGIC + struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    head = stream.read(len(_MAGIC) + 8)
    if len(head) < len(_MAGIC) + 8:
        raise EOFError("the GX worker process exited")
    if not head.startswith(_MAGIC):
        raise EOFError(f"the GX worker process wrote something else than a reply: {head!r}")
    size = struct.unpack("<Q", head[len(_MAGIC):])[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the GX worker process exited mid-reply")
    return pickle.loads(data)


def _serve_gx() -> None:
    """The GX worker's loop (see :class:`_GxWorker`): import GX, then answer each request until stdin closes.

    At a lower CPU priority: the import should fill the cores the stage's pipeline leaves idle, not take them."""
    os.nice(10)
    replies = os.fdopen(os.dup(1), "wb")                  # the reply channel, before anything can print
    os.dup2(2, 1)                                          # what GX (or C code) prints goes to stderr
    sys.stdout = sys.stderr
    importlib.import_module("great_expectations")
    stdin = sys.stdin.buffer
    while True:
        try:
            table, suite = _receive(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", failed_expectations(table, suite))
        except Exception:  # noqa: BLE001  (reported to the stage's process, which raises it)
            reply = ("error", traceback.format_exc())
        _send(replies, reply)


_gx_worker: _GxWorker | None = None


def prefetch_gx() -> None:
    """Start the GX worker process (:class:`_GxWorker`) now, so that GX is imported there while the stage's
    pipeline runs; every later gate of this process uses it."""
    global _gx_worker
    if _gx_worker is None:
        try:
            _gx_worker = _GxWorker()
            atexit.register(_gx_worker.close)
        except OSError as e:                               # cannot start a process here: validate in-process
            logger.warning("cannot start the GX worker process (%s); gates validate in this process", e)


def _gx_failures(table: pa.Table, suite: Suite) -> list[str]:
    """:func:`failed_expectations` in the GX worker process when :func:`prefetch_gx` started one, else here."""
    global _gx_worker
    if _gx_worker is not None:
        try:
            return _gx_worker.failures(table, suite)
        except (EOFError, OSError, pickle.UnpicklingError) as e:   # the worker died (killed, out of memory)
            logger.warning("the GX worker process failed (%s); validating the gate's sample in this process", e)
            _gx_worker.kill()
            _gx_worker = None
    return failed_expectations(table, suite)


def failed_expectations(table: pa.Table, suite: Suite) -> list[str]:
    """Validate ``table`` against ``suite`` in an ephemeral GX context; one line per failed expectation.

    GX is imported here (seconds), so that only a stage that runs a gate pays for it.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets this logger to INFO itself and announces a temporary docs folder on every context.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    gx_suite = suite.to_gx()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("obsfeed")
             .add_dataframe_asset(suite.name)
             .add_batch_definition_whole_dataframe("all")
             .get_batch(batch_parameters={"dataframe": table.to_pandas()}))
    # Pass/fail alone is the cheap question; the details (counts of unexpected values) only when it failed.
    if batch.validate(gx_suite, result_format="BOOLEAN_ONLY").success:
        return []
    result = batch.validate(gx_suite, result_format="SUMMARY")
    failures = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            detail = r.result.get("unexpected_count", r.result.get("observed_value", ""))
            failures.append(f"{cfg.type}({cfg.kwargs.get('column')}): {detail}")
    return failures


def _present(col: pa.ChunkedArray) -> np.ndarray:
    """Rows with a value: not null and, for floats, not NaN (GX reads a column through pandas, where NaN is null)."""
    ok = col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_floating(col.type):
        ok &= ~pc.fill_null(pc.is_nan(col), True).to_numpy(zero_copy_only=False)
    return ok


def _values(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


def arrow_result(table: pa.Table, e: Expectation) -> tuple[bool, float]:
    """(success, detail) of one expectation on ``table`` with GX's semantics: the number of unexpected rows for
    a per-row expectation (nulls skipped, as GX does), the observed minimum for ``expect_column_min_to_be_between``."""
    k = e.kwargs
    if e.type == "expect_column_min_to_be_between":
        col = table[k["column"]]
        present = _present(col)
        if not present.any():
            return True, float("nan")
        low = float(_values(col)[present].min())
        ok = (k.get("min_value") is None or low >= k["min_value"]) and (k.get("max_value") is None
                                                                          or low <= k["max_value"])
        return ok, low
    if e.type == "expect_column_pair_values_a_to_be_greater_than_b":
        a, b = table[k["column_A"]], table[k["column_B"]]
        pa_, pb = _present(a), _present(b)
        greater = np.zeros(len(pa_), dtype=bool)
        both = pa_ & pb
        greater[both] = _values(a)[both] > _values(b)[both]
        bad = int(((pa_ | pb) & ~greater).sum())
        return bad == 0, bad
    if e.type == "expect_select_column_values_to_be_unique_within_record":
        cols = [table[c] for c in k["column_list"]]
        same = np.zeros(table.num_rows, dtype=bool)
        for i in range(len(cols)):
            for j in range(i + 1, len(cols)):
                same |= pc.fill_null(pc.equal(cols[i], cols[j]), False).to_numpy(zero_copy_only=False)
        bad = int(same.sum())
        return bad == 0, bad
    col = table[k["column"]]
    present = _present(col)
    if e.type == "expect_column_values_to_not_be_null":
        bad = int((~present).sum())
    elif e.type == "expect_column_values_to_be_unique":
        counts = pc.value_counts(col.filter(pa.array(present)))
        n = counts.field("counts").to_numpy()
        bad = int(n[n > 1].sum())
    elif e.type == "expect_column_values_to_be_in_set":
        inside = pc.fill_null(pc.is_in(col, value_set=pa.array(k["value_set"]).cast(col.type)), False)
        bad = int((present & ~inside.to_numpy(zero_copy_only=False)).sum())
    elif e.type == "expect_column_values_to_be_between":
        v = np.where(present, _values(col), 0).astype(float)
        out = np.zeros(len(v), dtype=bool)
        if k.get("min_value") is not None:
            out |= (v <= k["min_value"]) if k.get("strict_min") else (v < k["min_value"])
        if k.get("max_value") is not None:
            out |= (v >= k["max_value"]) if k.get("strict_max") else (v > k["max_value"])
        bad = int((present & out).sum())
    else:
        raise ValueError(f"the Arrow gate does not know the expectation {e.type!r}")
    return bad == 0, bad


def arrow_results(table: pa.Table, suite: Suite) -> list[tuple[bool, float]]:
    """:func:`arrow_result` of each of the suite's expectations, in order."""
    return [arrow_result(table, e) for e in suite.expectations]


def arrow_failures(table: pa.Table, suite: Suite) -> list[str]:
    """One line per expectation ``table`` fails, checked with Arrow, worded as :func:`failed_expectations` words
    GX's."""
    return [f"{e.label()}: {_fmt(d)}" for e, (ok, d) in zip(suite.expectations, arrow_results(table, suite),
                                                           strict=True) if not ok]


def gate_failures(files: Sequence[Path | str], suite: Suite, *, sample_rows: int = GX_SAMPLE_ROWS) -> list[str]:
    """One line per failed expectation (``type(column): detail``) over every row of the part ``files``, read one
    part at a time (only the suite's columns): Arrow's counts summed (minima: the least) over the parts, then what
    GX finds on a sample of ``sample_rows`` rows (the first rows of each part) that Arrow did not."""
    files = [str(f) for f in files]
    if not files:
        return []
    columns = suite_columns(suite)
    results, sample, per_part = [], [], -(-sample_rows // len(files))
    for f in files:
        table = pq.read_table(f, columns=columns)
        results.append(arrow_results(table, suite))
        sample.append(table.take(np.arange(min(per_part, table.num_rows))))   # a copy: a slice would keep the part
    lines, failed = [], set()
    for i, e in enumerate(suite.expectations):
        details = np.array([r[i][1] for r in results], dtype=float)
        if all(r[i][0] for r in results):
            continue
        minimum = e.type == "expect_column_min_to_be_between"
        failed.add(e.label())
        lines.append(f"{e.label()}: {_fmt(np.nanmin(details) if minimum else details.sum())}")
    n = sum(t.num_rows for t in sample)
    lines += [f"{line} (GX, on a sample of {n:,} rows)"
              for line in _gx_failures(pa.concat_tables(sample), suite) if line.split(":")[0] not in failed]
    return lines


def _fmt(d: float) -> str:
    return str(int(d)) if float(d).is_integer() else f"{d:g}"


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
