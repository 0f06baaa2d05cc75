"""Messy inputs as users have them: each odd value costs only its row (quarantined with a reason), an input that
cannot be read at all is exit 2 with one line naming the file and the problem, and never exit 1.

One test per case of the hostile-input battery; each runs the ingest stage in-process on a few hundred rows and
checks the exit code, the message or the quarantine reason, and the row-count invariant.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.orchestration.cli import main
from pipelines.sources.simulator import SCENARIOS, simulate
from schemas import run_dir as rd
from tests.conftest import HASH_KEY_ENV, config_text

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def logs() -> tuple[list[dict], list[dict]]:
    """300 clean simulated impressions and their signals as JSON-ready records (timestamps as ISO text)."""
    s = simulate(replace(SCENARIOS["clean"], n_impressions=300, seed=3))

    def records(t: pa.Table) -> list[dict]:
        rows = t.to_pylist()
        for r in rows:
            r["ts"] = r["ts"].isoformat().replace("+00:00", "Z")
        return rows

    return records(s.impressions), records(s.signals)


def _jsonl(path: Path, rows: list[dict | str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(line + b"\n")
    return path


def _ingest(tmp_path: Path, capsys, impressions: str | Path, signals: str | Path, **sections) -> tuple[int, str]:
    cfg = tmp_path / "cfg.toml"
    text = config_text(tmp_path, **sections).replace(f'"{tmp_path}/impressions/*.parquet"', f'"{impressions}"')
    cfg.write_text(text.replace(f'"{tmp_path}/signals.jsonl.gz"', f'"{signals}"'))
    code = main(["run", str(cfg), str(tmp_path / "run"), "--stages", "ingest"])
    return code, capsys.readouterr().err


def _run(tmp_path: Path, capsys, monkeypatch, imps: list, sigs: list, **sections) -> tuple[int, str]:
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    return _ingest(tmp_path, capsys, _jsonl(tmp_path / "in" / "impressions.jsonl", imps),
                   _jsonl(tmp_path / "in" / "signals.jsonl", sigs), **sections)


def _quarantine(tmp_path: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "run" / rd.QUARANTINE / "**" / "*.parquet")


def _counts(tmp_path: Path) -> dict:
    counts = json.loads((tmp_path / "run" / rd.MANIFEST).read_text())["stages"]["ingest"]["counts"]
    for c in counts.values():
        assert c["rows_in"] == c["rows_ok"] + c["rows_quarantined"] + c["rows_duplicate"], c
    return counts


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("obsfeed ")]
    assert lines, err
    assert all(n in lines[-1] for n in needles), lines[-1]
    assert "Traceback" not in err and "internal error" not in err
    return lines[-1]


def test_invalid_utf8_in_a_json_lines_record_quarantines_that_line(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    bad = json.dumps(imps[5]).encode().replace(b'"response": "', b'"response": "caf\xe9 ')
    code, err = _run(tmp_path, capsys, monkeypatch, [*imps[:5], bad, *imps[6:]], sigs)
    assert code == 0, err
    q = _quarantine(tmp_path)
    assert q["reason"].to_list() == ["malformed_record"] and q["row_number"].to_list() == [5]
    assert "caf\\xe9" in q["record"][0]                                  # the raw byte, escaped
    assert imps[5]["user_id"] not in q["record"][0] and '"user_hash": "' in q["record"][0]   # pseudonymised
    assert _counts(tmp_path)["impressions"]["rows_quarantined"] == 1
    units = pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet")     # the units read back as valid text
    assert units.height == len(imps) - 1


def test_position_with_a_fraction_or_negative_is_rejected_not_truncated(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    imps = [dict(r) for r in imps]
    imps[0]["position"], imps[1]["position"] = 2.5, -3
    code, err = _run(tmp_path, capsys, monkeypatch, imps, sigs)
    assert code == 0, err
    q = _quarantine(tmp_path).filter(pl.col("table") == "impressions")   # (their signals become orphans)
    assert dict(zip(q["row_number"], q["reason"], strict=True)) == {0: "bad_type:position", 1: "value_out_of_range"}
    _counts(tmp_path)


def test_duplicate_keys_in_a_json_record_are_malformed(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    dup = json.dumps(imps[3])[:-1] + ', "prompt_id": "another"}'
    code, err = _run(tmp_path, capsys, monkeypatch, [*imps[:3], dup, *imps[4:]], sigs)
    assert code == 0, err
    q = _quarantine(tmp_path)
    assert q["reason"].to_list() == ["malformed_record"] and q["row_number"].to_list() == [3]
    _counts(tmp_path)


def test_a_list_where_an_id_belongs_is_a_bad_type(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    imps = [dict(r) for r in imps]
    imps[7]["impression_id"] = ["a", "b"]
    code, err = _run(tmp_path, capsys, monkeypatch, imps, sigs)
    assert code == 0, err
    q = _quarantine(tmp_path).filter(pl.col("table") == "impressions")
    assert q["reason"].to_list() == ["bad_type:impression_id"]
    _counts(tmp_path)


@pytest.mark.parametrize("value", [{"score": 1}, [0.5]], ids=["object", "list"])
def test_a_signal_value_that_is_an_object_or_list_is_a_bad_type(tmp_path, capsys, monkeypatch, logs, value):
    imps, sigs = logs
    sigs = [dict(r) for r in sigs]
    sigs[2]["value"] = value
    code, err = _run(tmp_path, capsys, monkeypatch, imps, sigs)
    assert code == 0, err
    q = _quarantine(tmp_path)
    assert q.filter(pl.col("row_number") == 2)["reason"].to_list() == ["bad_type:value"]
    _counts(tmp_path)


def test_a_quarantined_impression_carries_the_pseudonym_never_the_raw_user_id(tmp_path, capsys, monkeypatch,
                                                                            logs):
    imps, sigs = logs
    imps = [dict(r) for r in imps]
    users = [r["user_id"] for r in imps]
    bad = next(i for i, u in enumerate(users) if users.count(u) > 1)      # a user with other, valid units
    raw_user = imps[bad]["user_id"]
    imps[bad]["ts"] = "not a time"
    code, err = _run(tmp_path, capsys, monkeypatch, imps, sigs)
    assert code == 0, err
    record = json.loads(_quarantine(tmp_path).filter(pl.col("table") == "impressions")["record"][0])
    assert "user_id" not in record and raw_user not in json.dumps(record)
    units = pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet")
    assert record["user_hash"] in units["user_hash"].to_list()       # the same pseudonym as the user's units


def test_an_extra_binary_column_is_kept_and_quarantined_as_base64(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    table = pa.Table.from_pylist(imps).append_column("blob", pa.array([b"\x00\xff%d" % i for i in range(len(imps))]))
    table = table.set_column(table.schema.get_field_index("ts"), "ts",
                             pa.array(["bad" if i == 9 else r["ts"] for i, r in enumerate(imps)]))
    path = tmp_path / "in" / "impressions.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    code, err = _ingest(tmp_path, capsys, path, _jsonl(tmp_path / "in" / "signals.jsonl", sigs))
    assert code == 0, err
    record = json.loads(_quarantine(tmp_path).filter(pl.col("table") == "impressions")["record"][0])
    assert base64.b64decode(record["blob"]) == b"\x00\xff9"
    units = pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet")
    assert units.schema["blob"] == pl.Binary and units.height == len(imps) - 1
    _counts(tmp_path)


def test_an_extra_column_whose_type_differs_between_files_is_kept_as_text(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    half = len(imps) // 2
    first = [{**r, "user_segment": i} for i, r in enumerate(imps[:half])]
    second = [{**r, "user_segment": f"s{i}"} for i, r in enumerate(imps[half:])]
    _jsonl(tmp_path / "in" / "imps" / "a.jsonl", first)
    _jsonl(tmp_path / "in" / "imps" / "b.jsonl", second)
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    code, err = _ingest(tmp_path, capsys, tmp_path / "in" / "imps" / "*.jsonl",
                        _jsonl(tmp_path / "in" / "signals.jsonl", sigs))
    assert code == 0, err
    units = pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet")
    assert units.schema["user_segment"] == pl.String
    assert set(units["user_segment"]) == {*map(str, range(half)), *(f"s{i}" for i in range(len(imps) - half))}


@pytest.mark.parametrize("column", ["n_upvote", "user_hash", "weight_ips"])
def test_an_extra_column_named_like_an_output_column_is_refused_up_front(tmp_path, capsys, monkeypatch, logs,
                                                                        column):
    imps, sigs = logs
    code, err = _run(tmp_path, capsys, monkeypatch, [{**r, column: 1} for r in imps], sigs)
    assert code == 2
    _one_line(err, "impressions.jsonl", column, "clash")
    assert not (tmp_path / "run" / rd.UNITS).exists()


def test_a_non_utf8_byte_in_a_csv_file_quarantines_that_row(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    path = tmp_path / "in" / "impressions.csv"
    path.parent.mkdir(parents=True)
    pl.DataFrame(imps).write_csv(path)
    lines = path.read_bytes().split(b"\n")
    lines[11] = lines[11].replace(b",", b",\xff", 1)           # data row 10
    path.write_bytes(b"\n".join(lines))
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    code, err = _ingest(tmp_path, capsys, path, _jsonl(tmp_path / "in" / "signals.jsonl", sigs))
    assert code == 0, err
    q = _quarantine(tmp_path).filter(pl.col("table") == "impressions")
    assert q["reason"].to_list() == ["malformed_record"] and q["row_number"].to_list() == [10]
    assert "\\xff" in q["record"][0]
    assert imps[10]["user_id"] not in q["record"][0]                    # the user field is pseudonymised
    _counts(tmp_path)


@pytest.mark.parametrize(("unit", "convert"), [
    ("s", lambda t: int(t.timestamp())), ("ms", lambda t: int(t.timestamp() * 1000)),
    ("auto", lambda t: int(t.timestamp() * 1000)), ("auto", lambda t: t.date().isoformat())],
    ids=["seconds", "milliseconds", "inferred-ms", "dates"])
def test_timestamps_as_epoch_numbers_or_dates(tmp_path, capsys, monkeypatch, logs, unit, convert):
    import datetime as dt

    imps, sigs = logs

    def as_epoch(rows: list[dict]) -> list[dict]:
        return [{**r, "ts": convert(dt.datetime.fromisoformat(r["ts"].replace("Z", "+00:00")))} for r in rows]

    imps_e = as_epoch(imps)
    # dates alone: a signal on the impression's day would often be "before" it; keep the signals' times
    sigs_e = sigs if isinstance(imps_e[0]["ts"], str) else as_epoch(sigs)
    code, err = _run(tmp_path, capsys, monkeypatch, imps_e, sigs_e, ingest={"ts_unit": unit})
    assert code == 0, err
    units = pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet")
    assert units.height == len(imps)
    first = dt.datetime.fromisoformat(imps[0]["ts"].replace("Z", "+00:00"))
    got = units.filter(pl.col("impression_id") == imps[0]["impression_id"])["ts"][0]
    if isinstance(imps_e[0]["ts"], str):
        assert got == dt.datetime.combine(first.date(), dt.time(), dt.UTC)
    else:
        assert abs((got - first).total_seconds()) < 1
    _counts(tmp_path)


def test_iso_only_refuses_epoch_numbers(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    imps = [{**r, "ts": 1_790_000_000} if i == 0 else r for i, r in enumerate(imps)]
    code, err = _run(tmp_path, capsys, monkeypatch, imps, sigs, ingest={"ts_unit": "iso"})
    assert code == 0, err
    assert _quarantine(tmp_path).filter(pl.col("table") == "impressions")["reason"].to_list() == ["bad_timestamp"]


def test_an_input_path_that_is_a_folder_of_parquet_files(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    folder = tmp_path / "in" / "imps"
    for i, part in enumerate((imps[:100], imps[100:])):
        (folder / f"date=2026-11-0{i + 1}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), folder / f"date=2026-11-0{i + 1}" / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    code, err = _ingest(tmp_path, capsys, folder, _jsonl(tmp_path / "in" / "signals.jsonl", sigs))
    assert code == 0, err
    assert pl.read_parquet(tmp_path / "run" / rd.UNITS / "*.parquet").height == len(imps)
    _counts(tmp_path)


def test_gzip_json_lines_with_an_invalid_byte(tmp_path, capsys, monkeypatch, logs):
    imps, sigs = logs
    path = tmp_path / "in" / "signals.jsonl.gz"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(r).encode() for r in sigs]
    lines[1] = lines[1].replace(b'"type": "', b'"type": "\xc3(')
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    code, err = _ingest(tmp_path, capsys, _jsonl(tmp_path / "in" / "impressions.jsonl", imps), path)
    assert code == 0, err
    q = _quarantine(tmp_path)
    assert q["reason"].to_list() == ["malformed_record"] and q["row_number"].to_list() == [1]
    _counts(tmp_path)
