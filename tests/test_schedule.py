"""Scheduled runs (issue 9): five simulated days with late signals, a re-run that picks them up and changes only
its day, a killed backfill that resumes, two schedulers on one root, model reuse with drift gates, and the union
of the days against one run over everything."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.orchestration.catalogue import read_catalogue
from pipelines.orchestration.cli import main
from pipelines.sources.simulator import Scenario, simulate, spread_over_days, write_signals
from schemas import impressions as imp
from schemas import run_dir as rd
from schemas import signals as sig
from schemas import units as un
from schemas.manifest import stale_stages
from schemas.stages import STAGES as ALL_STAGES

pytestmark = pytest.mark.e2e

DAY1 = dt.date(2026, 11, 1)
DAYS = [DAY1 + dt.timedelta(days=i) for i in range(5)]
LATE = 3
CUT = dt.datetime(2026, 11, 6, tzinfo=dt.UTC)
"""Signals up to here have arrived when days 1-5 first run; the rest arrive later."""
ROOT = Path(__file__).resolve().parents[1]


def write_days(out: Path) -> dict[str, object]:
    """Five days of logs from one simulation (``simulate.spread_over_days``). Signals before CUT go to
    signals/early.parquet; later ones to pending-late.jsonl.gz, which the test moves in when they arrive.
    Some day-3 units without feedback get an upvote after CUT but within day 3's late window: late signals
    that must become labels on a re-run."""
    logs = spread_over_days(simulate(Scenario(n_impressions=3000, seed=7, gold_share=0.2)), len(DAYS))
    imps, sigs = logs.impressions, logs.signals
    day_of = np.array([(d.date() - DAY1).days for d in imps[imp.TS].to_pylist()])
    id_day = dict(zip(imps[imp.IMPRESSION_ID].to_pylist(), day_of.tolist(), strict=True))
    signalled = set(sigs[sig.IMPRESSION_ID].to_pylist())
    day3 = [i for i, d in id_day.items() if d == 2 and i not in signalled][:40]
    late_votes = pa.table({sig.EVENT_ID: [f"late-{i}" for i in day3], sig.IMPRESSION_ID: day3,
                           sig.TS: pa.array([dt.datetime(2026, 11, 6, 12, tzinfo=dt.UTC)] * len(day3),
                                            imp.TIMESTAMP),
                           sig.TYPE: ["upvote"] * len(day3), sig.VALUE: pa.array([None] * len(day3), pa.float64())},
                          schema=sigs.schema)
    sigs = pa.concat_tables([sigs, late_votes])
    # A logging replay: one day-1 impression again the next day (same id). One run over everything keeps the
    # earliest copy; so must the days.
    first = int(np.flatnonzero(day_of == 0)[0])
    replay = imps.slice(first, 1)
    replay = replay.set_column(replay.schema.get_field_index(imp.TS), imp.TS,
                               pa.array([replay[imp.TS][0].as_py() + dt.timedelta(days=1)], imp.TIMESTAMP))
    imps = pa.concat_tables([imps, replay])
    (out / "impressions").mkdir(parents=True)
    pq.write_table(imps, out / "impressions" / "part-0.parquet")
    (out / "signals").mkdir()
    early = pa.compute.less(sigs[sig.TS], pa.scalar(CUT, imp.TIMESTAMP))
    pq.write_table(sigs.filter(early), out / "signals" / "early.parquet")
    write_signals(sigs.filter(pa.compute.invert(early)), out / "pending-late.jsonl.gz")
    (out / "config.toml").write_text(f"""
[input]
impressions = "impressions/*.parquet"
signals = "signals/*"
[ingest]
late_window = {LATE}
buckets = 2
[privacy]
allow_unkeyed = true
[fit]
folds = 3
ngram_max = 1
hash_features = 1024
confounder_controls = 5
[score]
buckets = 2
[train]
epochs = 2
hash_features = 1024
""")
    return {"late_votes": set(day3), "replayed": replay[imp.IMPRESSION_ID][0].as_py()}


def arrive_late(data: Path) -> None:
    os.replace(data / "pending-late.jsonl.gz", data / "signals" / "late.jsonl.gz")


def cli(*args: object) -> int:
    return main([str(a) for a in args])


STAGES = "ingest,fit,score"


@pytest.fixture(scope="module")
def five_days(tmp_path_factory):
    """Days 1-5 run once (the late signals not yet arrived); what the tests start from."""
    data = tmp_path_factory.mktemp("logs")
    info = write_days(data)
    root = tmp_path_factory.mktemp("root") / "nightly"
    assert cli("run", data / "config.toml", root, "--from", DAYS[0], "--to", DAYS[-1], "--stages", STAGES) == 0
    return data, root, info


def _partition_files(root: Path, day: dt.date) -> dict[str, list[tuple[str, int]]]:
    """Each partitioned dataset's files for ``day``, with their inode: a replaced partition has new files."""
    out = {}
    for name in rd.PARTITIONED:
        folder = root / name / f"date={day.isoformat()}"
        out[name] = sorted((p.name, p.stat().st_ino) for p in folder.glob("*.parquet"))
    return out


def test_days_accumulate_as_hive_partitions_with_a_catalogue(five_days, capsys):
    data, root, _ = five_days
    rows = read_catalogue(root)
    assert [r["date"] for r in rows] == DAYS and all(r["status"] == "ok" and r["attempt"] == 1 for r in rows)
    units = pl.scan_parquet(root / rd.UNITS, hive_partitioning=True).collect()
    per_day = units.group_by("date").len().sort("date")
    assert per_day["date"].to_list() == DAYS
    assert per_day["len"].to_list() == [r["units"] for r in rows]
    assert (units[imp.TS].dt.date() == units["date"]).all(), "every unit sits in its impression's day"
    points = pl.scan_parquet(root / rd.POINTWISE, hive_partitioning=True).select("date").collect()
    assert points.height == units.height
    for day in DAYS:
        manifest = json.loads((root / rd.DAYS / day.isoformat() / rd.MANIFEST).read_text())
        assert manifest["schedule"]["day"] == day.isoformat()
        counts = manifest["stages"]["ingest"]["counts"]
        for table in ("impressions", "signals"):   # every input row is this day's, or counted as another's
            c = counts[table]
            assert c["rows_in"] == c["rows_ok"] + c["rows_quarantined"] + c["rows_duplicate"] + c["rows_other_day"]
    assert not (root / rd.WORK).exists() and not (root / rd.LOCK).exists()
    capsys.readouterr()
    assert cli("runs", root) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 + len(DAYS) and all(line.split()[1] == "ok" for line in listed[1:])


def _copy(five_days, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A private copy of the logs and the root, for a test that changes them."""
    data, root, info = five_days
    shutil.copytree(data, tmp_path / "logs")
    shutil.copytree(root, tmp_path / "nightly")
    return tmp_path / "logs", tmp_path / "nightly", info


def test_rerun_of_a_day_picks_up_late_signals_and_changes_only_that_day(five_days, tmp_path):
    data, root, info = _copy(five_days, tmp_path)
    before = {d: _partition_files(root, d) for d in DAYS}
    units_before = pl.read_parquet(root / rd.UNITS / f"date={DAYS[2]}")
    assert cli("run", data / "config.toml", root, "--date", DAYS[2], "--stages", STAGES) == 0
    assert {d: _partition_files(root, d) for d in DAYS} == before, "an ok day is skipped without --force"
    arrive_late(data)
    assert cli("run", data / "config.toml", root, "--date", DAYS[2], "--stages", STAGES, "--force") == 0
    after = {d: _partition_files(root, d) for d in DAYS}
    assert all(after[d] == before[d] for d in DAYS if d != DAYS[2])
    assert all(after[DAYS[2]][n] != before[DAYS[2]][n] for n in (rd.UNITS, rd.POINTWISE))
    units = pl.read_parquet(root / rd.UNITS / f"date={DAYS[2]}")
    voted = sorted(info["late_votes"] & set(units_before[un.IMPRESSION_ID]))   # a malformed row never was a unit
    late = units.filter(pl.col(un.IMPRESSION_ID).is_in(voted))
    assert late.height == len(voted) >= 30
    assert (late[un.OBSERVED] == 1).all() and (late[un.LABEL] == 1.0).all() and (late["n_upvote"] == 1).all()
    was = units_before.filter(pl.col(un.IMPRESSION_ID).is_in(voted))
    assert (was[un.OBSERVED] == 0).all()
    assert units[un.OBSERVED].sum() > units_before[un.OBSERVED].sum()
    row = next(r for r in read_catalogue(root) if r["date"] == DAYS[2])
    assert row["attempt"] == 2 and row["status"] == "ok" and row["observed"] == units[un.OBSERVED].sum()


def test_union_of_days_equals_one_run_over_everything_but_the_late_window(five_days, tmp_path):
    data, root, _ = five_days
    whole = tmp_path / "whole"
    assert cli("run", data / "config.toml", whole, "--stages", "ingest") == 0
    single = pl.read_parquet(whole / rd.UNITS)
    daily = pl.scan_parquet(root / rd.UNITS, hive_partitioning=True).collect().drop("date")
    assert sorted(daily[un.IMPRESSION_ID]) == sorted(single[un.IMPRESSION_ID])     # each unit once
    replayed = daily.filter(pl.col(un.IMPRESSION_ID) == five_days[2]["replayed"])
    assert replayed[imp.TS].dt.date().to_list() == [DAYS[0]], "the earliest copy of a replayed impression"
    # The late-window effect, computed from the raw input: signals that arrived (before CUT) more than LATE
    # days after their impression's day; a daily run never sees them.
    imps = pl.read_parquet(data / "impressions" / "part-0.parquet").unique(imp.IMPRESSION_ID)
    sigs = pl.read_parquet(data / "signals" / "early.parquet")
    late = (sigs.join(imps.select(imp.IMPRESSION_ID, pl.col(imp.TS).alias("imp_ts")), on=imp.IMPRESSION_ID)
            .filter(pl.col(sig.TS) >= pl.col("imp_ts").dt.truncate("1d") + pl.duration(days=1 + LATE)))
    affected = set(late[imp.IMPRESSION_ID])
    assert affected, "the simulation has signals after the late window (gold audits a few days later)"
    columns = [c for c in single.columns if c not in ("run_id",)]
    joined = single.select(columns).join(daily.select(columns), on=un.IMPRESSION_ID, suffix="_daily")
    differs = pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_daily")) for c in columns
                                 if c != un.IMPRESSION_ID])
    changed = set(joined.filter(differs)[un.IMPRESSION_ID])
    assert changed <= affected, f"units differ without a late signal: {sorted(changed - affected)[:5]}"
    n_late = late.group_by(imp.IMPRESSION_ID).len()
    counts = [c for c in columns if c.startswith(un.COUNT_PREFIX)]
    check = joined.join(n_late, on=imp.IMPRESSION_ID).select(
        pl.col("len"), pl.sum_horizontal(counts).alias("whole"),
        pl.sum_horizontal([f"{c}_daily" for c in counts]).alias("daily"))
    assert (check["whole"] - check["daily"] == check["len"]).all(), "exactly the late signals are missing"


def _obsfeed(*args: object, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.orchestration.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)


def test_killed_backfill_leaves_a_stale_lock_and_resumes_where_it_stopped(five_days, tmp_path):
    data, _, _ = five_days
    root = tmp_path / "nightly"
    proc = _obsfeed("run", data / "config.toml", root, "--from", DAYS[0], "--to", DAYS[-1], "--stages", "ingest")

    def second_day_running() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the backfill ended before it was killed: {proc.communicate()}")
        rows = read_catalogue(root) if (root / rd.CATALOGUE).exists() else []
        return len(rows) >= 2 and rows[0]["status"] == "ok"

    _wait_for(second_day_running)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = read_catalogue(root)
    done = [r["date"] for r in rows if r["status"] == "ok"]
    assert DAYS[0] in done and len(done) < len(DAYS)
    # the killed run's lock is stale: refused with a clear message (exit 2) until cleared
    assert cli("run", data / "config.toml", root, "--from", DAYS[0], "--to", DAYS[-1], "--stages", "ingest") == 2
    assert cli("unlock", root) == 0 and not (root / rd.LOCK).exists()
    before = {d: _partition_files(root, d) for d in done}
    assert cli("run", data / "config.toml", root, "--from", DAYS[0], "--to", DAYS[-1], "--stages", "ingest") == 0
    rows = read_catalogue(root)
    assert [r["status"] for r in rows] == ["ok"] * len(DAYS)
    assert all(r["attempt"] == 1 for r in rows if r["date"] in done), "finished days were not run again"
    assert {d: _partition_files(root, d) for d in done} == before
    killed = [r for r in rows if r["date"] not in done and r["attempt"] == 2]
    assert len(killed) <= 1                            # the day it was killed in (if it had started) ran again
    assert not (root / rd.WORK).exists()


def test_two_schedulers_on_one_root_one_wins_one_exits_2(five_days, tmp_path, capsys):
    data, _, _ = five_days
    root = tmp_path / "nightly"
    first = _obsfeed("run", data / "config.toml", root, "--date", DAYS[0], "--stages", "ingest,fit,score")
    _wait_for(lambda: (root / rd.LOCK).exists() or first.poll() is not None)
    assert first.poll() is None, "the first run must still hold the lock"
    assert cli("run", data / "config.toml", root, "--date", DAYS[0], "--stages", "ingest") == 2
    assert "another run holds" in capsys.readouterr().err
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert [r["status"] for r in read_catalogue(root)] == ["ok"] and not (root / rd.LOCK).exists()
    assert cli("unlock", root) == 0                    # no lock: nothing to do, not an error


def test_models_fitted_on_a_window_score_later_days_with_drift_checks(five_days, tmp_path, capsys):
    data, root, _ = _copy(five_days, tmp_path)
    assert cli("fit", root, "--from", DAYS[0], "--to", DAYS[1]) == 0
    fits = root / rd.FITS / f"{DAYS[0]}_{DAYS[1]}"
    reference = json.loads((fits / rd.MODELS / "reference.json").read_text())
    assert (reference["first_day"], reference["last_day"]) == (str(DAYS[0]), str(DAYS[1]))
    assert cli("run", data / "config.toml", root, "--date", DAYS[3], "--force", "--stages",
               "ingest,fit,score,report", "--models-from", fits) == 0
    report = (root / rd.DAYS / str(DAYS[3]) / rd.REPORT / "index.html").read_text()
    assert "reused from" in report and f"Drift against the fit window {DAYS[0]}" in report
    manifest = json.loads((root / rd.DAYS / str(DAYS[3]) / rd.MANIFEST).read_text())
    assert manifest["stages"]["fit"]["reused_from"] == str(fits / rd.MODELS)
    assert stale_stages(manifest, ALL_STAGES) == []              # reused models consumed nothing of this day
    assert manifest["schedule"]["models_from"] == str(fits / rd.MODELS)
    drift = manifest["stages"]["score"]["diagnostics"]["drift"]
    assert drift["reference"]["first_day"] == str(DAYS[0]) and drift["breaches"] == []
    assert 0 <= drift["propensity_psi"] < 0.25 and drift["label_rate_shift"] < 0.1
    row = next(r for r in read_catalogue(root) if r["date"] == DAYS[3])
    assert row["models_from"] == str(fits / rd.MODELS) and row["propensity_psi"] == drift["propensity_psi"]
    # a gate tighter than the day's drift fails the day (exit 2); its published partitions stay as they were
    strict = data / "strict.toml"
    strict.write_text((data / "config.toml").read_text() + "[drift]\nmax_signal_mix_shift = 0.000001\n")
    before = _partition_files(root, DAYS[4])
    capsys.readouterr()
    assert cli("run", strict, root, "--date", DAYS[4], "--force", "--stages", "ingest,fit,score",
               "--models-from", fits) == 2
    assert "signal_mix_shift" in capsys.readouterr().err
    row = next(r for r in read_catalogue(root) if r["date"] == DAYS[4])
    assert row["status"] == "failed" and "drift" in row["error"]
    assert _partition_files(root, DAYS[4]) == before
    assert cli("run", data / "config.toml", root, "--date", DAYS[4], "--models-from", tmp_path) == 2


def test_dry_run_and_json_logs(five_days, tmp_path, capsys):
    data, root, _ = five_days
    capsys.readouterr()
    assert cli("run", data / "config.toml", root, "--from", DAYS[3], "--to", DAYS[4] + dt.timedelta(days=1),
               "--dry-run", "--log-format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [d["action"] for d in plan["days"]] == ["skip", "skip", "run"] and plan["lock"] == "free"
    assert not (root / rd.DAYS / str(DAYS[4] + dt.timedelta(days=1))).exists(), "a dry run writes nothing"
    fresh = tmp_path / "fresh"
    assert cli("run", data / "config.toml", fresh, "--date", DAYS[0], "--stages", "ingest",
               "--log-format", "json") == 0
    err = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in err]       # every stderr line is a JSON object
    assert {"ts", "level", "msg"} <= set(records[0])
    assert any(r.get("event") == "day_done" and r.get("day") == str(DAYS[0]) for r in records)
    with pytest.raises(SystemExit) as bad_date:                # argparse's own exit: 2, as for any bad flag
        cli("run", data / "config.toml", fresh, "--date", "2026-13-01")
    assert bad_date.value.code == 2
    assert cli("run", data / "config.toml", fresh, "--date", DAYS[0], "--from", DAYS[0], "--to", DAYS[1],
               "--log-format", "json") == 2
    last = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert last["level"] == "error" and last["exit_code"] == 2 and "--date" in last["msg"]


def test_logs_stored_by_day_are_read_for_the_window_only(five_days, tmp_path):
    """With ``{date}`` in the input paths a day reads the files of the days within its late window, not the
    whole history, and builds the same units as from one glob over everything."""
    data, root, _ = five_days
    logs = tmp_path / "by-day"
    for table, files in (("impressions", ["impressions/part-0.parquet"]), ("signals", ["signals/early.parquet"])):
        frame = pl.concat([pl.read_parquet(data / f) for f in files])
        day = frame[imp.TS].dt.date().fill_null(DAYS[0])
        for d in day.unique().to_list():
            (logs / table / f"date={d}").mkdir(parents=True)
            frame.filter(day == d).write_parquet(logs / table / f"date={d}" / "part-0.parquet")
    config = (data / "config.toml").read_text()
    config = config.replace('impressions = "impressions/*.parquet"', 'impressions = "impressions/date={date}/*"')
    config = config.replace('signals = "signals/*"', 'signals = "signals/date={date}/*"')
    (logs / "config.toml").write_text(config)
    assert cli("run", logs / "config.toml", tmp_path / "plain", "--stages", "ingest") == 2   # {date} needs --date
    out = tmp_path / "nightly"
    assert cli("run", logs / "config.toml", out, "--from", DAYS[0], "--to", DAYS[-1], "--stages", "ingest") == 0
    manifest = json.loads((out / rd.DAYS / str(DAYS[2]) / rd.MANIFEST).read_text())
    read = [i["path"] for i in manifest["stages"]["ingest"]["inputs"]]
    window = {str(DAYS[2] + dt.timedelta(days=k)) for k in range(-LATE, LATE + 1)}
    assert read and all(p.split("date=")[1][:10] in window for p in read)
    for d in DAYS:
        mine = pl.read_parquet(out / rd.UNITS / f"date={d}").sort(un.IMPRESSION_ID)
        theirs = pl.read_parquet(root / rd.UNITS / f"date={d}").sort(un.IMPRESSION_ID)
        assert mine.equals(theirs), d
    assert cli("run", logs / "config.toml", out, "--date", DAYS[-1] + dt.timedelta(days=1), "--dry-run") == 2
