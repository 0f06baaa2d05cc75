import datetime as dt
import json

import polars as pl
import pyarrow as pa

from schemas import impressions as imp
from schemas import signals as sig
from transforms.read import FILE_INDEX, ROW_NUMBER
from transforms.validate import coerce, quarantine_rows, signal_checks


def _signals_batch() -> pl.DataFrame:
    return pl.DataFrame({
        "event_id": ["e1", None, "e3", "e4", "e5", "e6"],
        "impression_id": ["i1", "i1", "i2", "i3", "i4", "i5"],
        "ts": ["2026-11-01T00:00:00Z", "2026-11-01T00:00:01Z", "yesterday", "2026-11-01T00:00:03.25Z",
               "2026-11-01 00:00:04", "2026-11-01T00:00:05Z"],
        "type": ["upvote", "upvote", "upvote", "thumbs_sideways", "edit", "edit"],
        "value": [None, None, None, None, 1.7, 0.25],
        FILE_INDEX: [0] * 6, ROW_NUMBER: list(range(6)),
    })


def test_coerce_gives_the_first_failing_reason_per_row():
    raw = _signals_batch()
    df, reasons = coerce(raw, sig.SIGNALS)
    reasons = pl.select(pl.coalesce(reasons, signal_checks(df, ["upvote", "edit"], ["edit"]))).to_series()
    assert reasons.to_list() == [None, "missing_required:event_id", "bad_timestamp", "unknown_signal_type",
                                 "value_out_of_range", None]
    ts = df["ts"].to_list()
    assert ts[3] == dt.datetime(2026, 11, 1, 0, 0, 3, 250000, tzinfo=dt.UTC)
    assert ts[4] == dt.datetime(2026, 11, 1, 0, 0, 4, tzinfo=dt.UTC)  # a naive timestamp is taken as UTC
    assert df.schema["ts"] == pl.Datetime("us", "UTC")


def test_missing_required_column_fails_every_row_and_types_are_coerced():
    raw = pl.DataFrame({"impression_id": [1, 2], "ts": ["2026-11-01T00:00:00Z"] * 2, "user_id": ["u", "v"],
                        "response_id": ["r", "s"], "position": ["1", "first"],
                        FILE_INDEX: [0] * 2, ROW_NUMBER: [0, 1]})
    df, reasons = coerce(raw, imp.IMPRESSIONS)
    assert reasons.to_list() == ["missing_required:prompt_id"] * 2
    raw = raw.with_columns(pl.lit("p").alias("prompt_id"))
    df, reasons = coerce(raw, imp.IMPRESSIONS)
    assert reasons.to_list() == [None, "bad_type:position"]
    assert df["impression_id"].to_list() == ["1", "2"] and df["position"].to_list() == [1, None]


def test_quarantine_keeps_the_original_record_file_and_row():
    raw = _signals_batch()
    q = quarantine_rows(raw[2:3], pl.Series(["bad_timestamp"]), "signals", ["s.jsonl"])
    row = q.to_pylist()[0]
    assert (row["table"], row["source_file"], row["row_number"], row["reason"]) == (
        "signals", "s.jsonl", 2, "bad_timestamp")
    assert json.loads(row["record"]) == {"event_id": "e3", "impression_id": "i2", "ts": "yesterday",
                                         "type": "upvote", "value": None}
    assert isinstance(q, pa.Table)
