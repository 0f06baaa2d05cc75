"""The ingest stage on a tiny hand-made log whose every outcome is known."""

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import ingest
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import load_config
from schemas.errors import ConfigError, GateError, InputError
from schemas.run_dir import RunDir
from schemas.storage import read_dataset
from tests.conftest import HASH_KEY_ENV

T0 = "2026-11-01T10:00:00Z"


def _write_logs(folder: Path) -> None:
    imps = pa.table({
        "impression_id": ["i1", "i2", "i3", "i1", "i4"],
        "ts": pa.array([0, 0, 0, 5_000_000, 0], pa.timestamp("us", tz="UTC")),
        "user_id": ["alice", "bob", "alice", "alice", None],
        "prompt_id": ["p1", "p1", "p2", "p1", "p2"],
        "response_id": ["r1", "r2", "r3", "r1", "r4"],
        "response": ["short", "a much longer answer", "ok", "short", "x"],
        "segment": ["a", "b", "a", "a", "b"],
    })
    pq.write_table(imps, folder / "imps.parquet")
    events = [
        {"event_id": "e1", "impression_id": "i1", "ts": "1970-01-01T00:00:01Z", "type": "upvote"},
        {"event_id": "e2", "impression_id": "i1", "ts": "1970-01-01T00:00:09Z", "type": "downvote"},
        {"event_id": "e2", "impression_id": "i1", "ts": "1970-01-01T00:00:09Z", "type": "downvote"},  # replay
        {"event_id": "e3", "impression_id": "i2", "ts": "1970-01-01T00:00:02Z", "type": "copy"},
        {"event_id": "e4", "impression_id": "i3", "ts": "1970-01-01T00:00:02Z", "type": "edit", "value": 0.2},
        {"event_id": "e5", "impression_id": "nope", "ts": "1970-01-01T00:00:02Z", "type": "click"},
        {"event_id": "e6", "impression_id": "i2", "ts": "1969-12-31T23:59:00Z", "type": "click"},
        {"event_id": "e7", "impression_id": "i2", "ts": "1970-01-01T00:00:03Z", "type": "wink"},
        {"event_id": "e8", "impression_id": "i2", "ts": "not a time", "type": "click"},
    ]
    (folder / "signals.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def _config(folder: Path, *, signals: str = "signals.jsonl", max_bad: float = 0.6, unkeyed: bool = False,
            shuffle: str = "files") -> Path:
    path = folder / "cfg.toml"
    path.write_text(f'[input]\nimpressions = "imps.parquet"\nsignals = "{signals}"\n'
                    f'[privacy]\nkey_env = "{HASH_KEY_ENV}"\nallow_unkeyed = {str(unkeyed).lower()}\n'
                    f'[ingest]\nbuckets = 3\nmax_bad_fraction = {max_bad}\nshuffle = "{shuffle}"\n')
    return path


@pytest.fixture()
def logs(tmp_path: Path) -> Path:
    _write_logs(tmp_path)
    return tmp_path


def test_units_quarantine_and_counts(logs: Path, hash_key):
    run = RunDir(logs / "run")
    result = ingest.execute(run, load_config(_config(logs))).to_manifest()
    units = pl.from_arrow(read_dataset(run.path(rd.UNITS))).sort(un.IMPRESSION_ID)
    assert units[un.IMPRESSION_ID].to_list() == ["i1", "i2", "i3"]
    assert units[un.LABEL].to_list() == [0.0, None, 0.8]               # latest explicit; copy is implicit
    assert units[un.LABEL_SOURCE].to_list() == ["downvote", None, "edit"]
    assert units[un.OBSERVED].to_list() == [1, 0, 1]
    assert units["n_copy"].to_list() == [0, 1, 0] and units["n_upvote"].to_list() == [1, 0, 0]
    assert units["segment"].to_list() == ["a", "b", "a"]               # extra columns kept
    assert "user_id" not in units.columns and "alice" not in units[un.USER_HASH].to_list()
    assert units[un.USER_HASH][0] == units[un.USER_HASH][2]
    q = pl.from_arrow(read_dataset(run.path(rd.QUARANTINE))).sort("table", "row_number")
    assert q.select("table", "row_number", "reason").rows() == [
        ("impressions", 4, "missing_required:user_id"),
        ("signals", 5, "orphan_signal"), ("signals", 6, "time_travel"), ("signals", 7, "unknown_signal_type"),
        ("signals", 8, "bad_timestamp")]
    assert json.loads(q.filter(pl.col("row_number") == 8)["record"][0])["ts"] == "not a time"
    assert {Path(f).name for f in q["source_file"]} == {"imps.parquet", "signals.jsonl"}
    assert result["counts"] == {
        "impressions": {"rows_in": 5, "rows_ok": 3, "rows_quarantined": 1, "rows_duplicate": 1},
        "signals": {"rows_in": 9, "rows_ok": 4, "rows_quarantined": 4, "rows_duplicate": 1}}


def test_same_input_same_files(logs: Path, hash_key):
    cfg = load_config(_config(logs))
    for name in ("a", "b"):
        ingest.execute(RunDir(logs / name), cfg)
    for sub in (rd.UNITS, rd.QUARANTINE):
        a, b = sorted((logs / "a" / sub).glob("*")), sorted((logs / "b" / sub).glob("*"))
        assert [p.name for p in a] == [p.name for p in b]
        assert all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(a, b, strict=True))


def test_file_and_beam_shuffles_give_the_same_files_and_leave_no_scratch(logs: Path, hash_key):
    for mode in ("files", "beam"):
        ingest.execute(RunDir(logs / mode), load_config(_config(logs, shuffle=mode)))
        assert not list((logs / mode).glob(".ingest-*"))          # the spilled buckets are cleaned up
    for sub in (rd.UNITS, rd.QUARANTINE):
        a, b = sorted((logs / "files" / sub).glob("*")), sorted((logs / "beam" / sub).glob("*"))
        assert [p.name for p in a] == [p.name for p in b]
        assert all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(a, b, strict=True))


def test_too_many_bad_rows_fail_but_quarantine_is_written(logs: Path, hash_key):
    """The failed attempt's quarantine is kept for inspection in failed/quarantine; nothing is committed."""
    run = RunDir(logs / "run")
    with pytest.raises(GateError, match="44.4% of signals rows were quarantined"):
        ingest.execute(run, load_config(_config(logs, max_bad=0.1)))
    assert run.path(rd.FAILED_QUARANTINE).is_dir() and not run.path(rd.UNITS).exists()
    assert not run.path(rd.QUARANTINE).exists()


def test_refuses_to_run_without_a_hash_key(logs: Path, monkeypatch):
    monkeypatch.delenv(HASH_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{HASH_KEY_ENV} is not set"):
        ingest.execute(RunDir(logs / "run"), load_config(_config(logs)))
    result = ingest.execute(RunDir(logs / "run"), load_config(_config(logs, unkeyed=True))).to_manifest()
    assert result["counts"]["impressions"]["rows_ok"] == 3


def test_missing_required_column_names_the_file(logs: Path, hash_key):
    pq.write_table(pq.read_table(logs / "imps.parquet").drop(["prompt_id"]), logs / "imps.parquet")
    with pytest.raises(InputError, match="imps.parquet: required column 'prompt_id' is missing"):
        ingest.execute(RunDir(logs / "run"), load_config(_config(logs)))


def test_csv_input_reads_the_same(logs: Path, hash_key):
    pl.read_ndjson(logs / "signals.jsonl").write_csv(logs / "signals.csv")
    result = ingest.execute(RunDir(logs / "run"), load_config(_config(logs, signals="signals.csv"))).to_manifest()
    assert result["counts"]["signals"] == {"rows_in": 9, "rows_ok": 4, "rows_quarantined": 4, "rows_duplicate": 1}


def test_portable_runner_gives_the_same_units(logs: Path, hash_key):
    """Beam's portable job API (the path Flink and Spark clusters use), embedded and offline."""
    cfg = load_config(_config(logs))
    ingest.execute(RunDir(logs / "direct"), cfg)
    ingest.execute(RunDir(logs / "portable"), cfg,
               ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"])
    for sub in (rd.UNITS, rd.QUARANTINE):
        a = read_dataset(logs / "direct" / sub)
        b = read_dataset(logs / "portable" / sub)
        assert a.num_rows > 0 and a.equals(b)


def test_a_malformed_json_line_quarantines_that_line_only(logs: Path, hash_key):
    lines = (logs / "signals.jsonl").read_text().splitlines()
    lines.insert(3, '{"event_id": "e9", "impression_id": "i2", "ts": ')          # cut off mid-record
    lines.insert(5, "[1, 2, 3]")                                                 # valid JSON, not an object
    (logs / "signals.jsonl").write_text("\n".join(lines) + "\n\n")
    result = ingest.execute(RunDir(logs / "run"), load_config(_config(logs, max_bad=0.7))).to_manifest()
    assert result["counts"]["signals"] == {"rows_in": 11, "rows_ok": 4, "rows_quarantined": 6, "rows_duplicate": 1}
    q = pl.from_arrow(read_dataset(logs / "run" / rd.QUARANTINE)).filter(pl.col("reason").str.starts_with(
        "malformed_record")).sort("row_number")
    assert q.select("table", "row_number").rows() == [("signals", 3), ("signals", 5)]
    assert q["record"].to_list() == [lines[3], lines[5]]
    units = pl.from_arrow(read_dataset(logs / "run" / rd.UNITS)).sort(un.IMPRESSION_ID)
    assert units[un.LABEL].to_list() == [0.0, None, 0.8]                 # the good lines still count


def test_a_replay_naming_another_impression_is_still_a_duplicate(logs: Path, hash_key):
    lines = (logs / "signals.jsonl").read_text().splitlines()
    replay = json.loads(lines[2])
    assert replay["event_id"] == "e2"
    replay.update(impression_id="i3", ts="1970-01-01T00:00:30Z")   # same event id, later, another impression
    lines[2] = json.dumps(replay)
    (logs / "signals.jsonl").write_text("\n".join(lines) + "\n")
    result = ingest.execute(RunDir(logs / "run"), load_config(_config(logs))).to_manifest()
    assert result["counts"]["signals"] == {"rows_in": 9, "rows_ok": 4, "rows_quarantined": 4, "rows_duplicate": 1}
    units = pl.from_arrow(read_dataset(logs / "run" / rd.UNITS)).sort(un.IMPRESSION_ID)
    assert units["n_downvote"].to_list() == [1, 0, 0]                 # the earliest copy (on i1) was kept
    assert units[un.LABEL].to_list() == [0.0, None, 0.8]
