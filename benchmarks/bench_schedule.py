"""Scheduled-run benchmark (issue 9): a week of logs run day by day against one run over the whole week.

The same simulated week (``simulate.spread_over_days``) is processed three ways, each with ingest, fit and score:
one run over everything; seven daily runs reading the input through one glob (each day reads the whole week
and keeps its own rows); seven daily runs over logs stored by day (``{date}`` paths: each day reads the days
within its late window). The ratios are the price of a nightly schedule and what storing logs by day saves.
The union of the days' units is checked against the single run's.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from benchmarks.bench_estimators import CACHE
from benchmarks.bench_realdata import quiet_work_dir
from pipelines.orchestration.catalogue import read_catalogue
from pipelines.orchestration.cli import main as cli
from pipelines.sources.simulator import Scenario, simulate, spread_over_days
from schemas import impressions as imp
from schemas import run_dir as rd
from schemas import units as un
from schemas.stages import INGEST, stage_result

FIRST_DAY = dt.date(2026, 11, 1)
CONFIG = """
[input]
impressions = "{impressions}"
signals = "{signals}"
[ingest]
late_window = {late}
buckets = 4
[privacy]
allow_unkeyed = true
[fit]
folds = 3
"""


def _write(logs, out: Path, by_day: bool) -> None:
    """The week as one set of files, or as folders date=D/ (impressions by their day, signals by arrival)."""
    for name, table in (("impressions", logs.impressions), ("signals", logs.signals)):
        frame = pl.from_arrow(table)
        if not by_day:
            (out / name).mkdir(parents=True)
            frame.write_parquet(out / name / "part-0.parquet")
            continue
        day = frame[imp.TS].dt.date().fill_null(FIRST_DAY)
        for d in day.unique().to_list():
            (out / name / f"date={d}").mkdir(parents=True)
            frame.filter(day == d).write_parquet(out / name / f"date={d}" / "part-0.parquet")


def _timed(args: list[Any]) -> float:
    started = time.perf_counter()
    if cli([str(a) for a in args]) != 0:
        raise RuntimeError(f"obsfeed {' '.join(map(str, args))} failed")
    return time.perf_counter() - started


def bench_schedule(n: int = 70_000, days: int = 7, late: int = 3) -> dict[str, Any]:
    shutil.rmtree(CACHE / "schedule-work", ignore_errors=True)
    work = quiet_work_dir("schedule-work")
    logs = spread_over_days(simulate(Scenario(n_impressions=n, seed=0)), days)
    last = FIRST_DAY + dt.timedelta(days=days - 1)
    stages = ["--stages", "ingest,fit,score"]
    configs = {}
    for layout, by_day in (("glob", False), ("by_day", True)):
        _write(logs, work / layout, by_day)
        pattern = "{table}/date={{date}}/*.parquet" if by_day else "{table}/*.parquet"
        configs[layout] = work / layout / "config.toml"
        configs[layout].write_text(CONFIG.format(impressions=pattern.format(table="impressions"),
                                                 signals=pattern.format(table="signals"), late=late))
    seconds = {"single run over the week": _timed(["run", configs["glob"], work / "single", *stages])}
    for layout, label in (("glob", "daily, one glob over the week"), ("by_day", "daily, logs stored by day")):
        seconds[label] = _timed(["run", configs[layout], work / f"root-{layout}", "--from", FIRST_DAY, "--to", last,
                                 *stages])
    single = pl.read_parquet(work / "single" / rd.UNITS)
    rows_read = {}
    for layout in ("glob", "by_day"):
        union = pl.scan_parquet(work / f"root-{layout}" / rd.UNITS, hive_partitioning=True).collect()
        if sorted(union[un.IMPRESSION_ID]) != sorted(single[un.IMPRESSION_ID]):
            raise AssertionError(f"{layout}: the days' units are not the single run's")
        if any(r["status"] != "ok" for r in read_catalogue(work / f"root-{layout}")):
            raise AssertionError(f"{layout}: a day is not ok")
        total = 0
        for d in range(days):
            manifest = (work / f"root-{layout}" / rd.DAYS / str(FIRST_DAY + dt.timedelta(days=d)) / rd.MANIFEST)
            ingest = stage_result(json.loads(manifest.read_text()), INGEST)
            total += sum(c.rows_in for c in ingest.counts.values())
        rows_read[layout] = total
    input_rows = sum(pq.read_metadata(f).num_rows for f in (work / "glob").rglob("*.parquet"))
    shutil.rmtree(work, ignore_errors=True)
    base = seconds["single run over the week"]
    return {"n": n, "days": days, "late_window": late, "units": single.height,
            "ratios": {k: v / base for k, v in seconds.items()},
            "rows_read_per_input_row": {k: v / input_rows for k, v in rows_read.items()}}


def schedule_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| late window | how the week is run | wall time ÷ one run over the week | input rows read ÷ input rows |",
             "|---|---|---|---|"]
    for result in results:
        reads = {"daily, one glob over the week": result["rows_read_per_input_row"]["glob"],
                 "daily, logs stored by day": result["rows_read_per_input_row"]["by_day"]}
        for name, ratio in result["ratios"].items():
            lines.append(f"| {result['late_window']} days | {name} | {ratio:.2f} | {reads.get(name, 1.0):.2f} |")
    return lines
