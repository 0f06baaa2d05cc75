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
    df, reasons = coerce(raw, sig.SCHEMA)
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
    df, reasons = coerce(raw, imp.SCHEMA)
    assert reasons.to_list() == ["missing_required:prompt_id"] * 2
    raw = raw.with_columns(pl.lit("p").alias("prompt_id"))
    df, reasons = coerce(raw, imp.SCHEMA)
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


def test_coerce_never_raises_on_odd_column_types_it_rejects_their_values():
    import decimal

    raw = pl.DataFrame({
        "impression_id": pl.Series([dt.timedelta(1), None], dtype=pl.Duration("us")),
        "ts": pl.Series(["2026-11-01T00:00:00Z", "2026-11-01"], dtype=pl.Categorical),
        "user_id": ["u", "v"], "prompt_id": ["p", "p"], "response_id": ["r", "s"],
        "position": pl.Series([decimal.Decimal("2.5"), decimal.Decimal("1")], dtype=pl.Decimal(10, 1)),
        FILE_INDEX: [0, 0], ROW_NUMBER: [0, 1]})
    df, reasons = coerce(raw, imp.SCHEMA)
    assert reasons.to_list() == ["bad_type:impression_id", "missing_required:impression_id"]
    assert df["ts"].to_list() == [dt.datetime(2026, 11, 1, tzinfo=dt.UTC)] * 2        # categorical text is text
    assert df["position"].to_list() == [None, 1]                                       # 2.5 is not 2
    huge = pl.DataFrame({**{c: ["x"] for c in ("impression_id", "user_id", "prompt_id", "response_id")},
                         "ts": pl.Series([2**63 + 5], dtype=pl.UInt64), FILE_INDEX: [0], ROW_NUMBER: [0]})
    assert coerce(huge, imp.SCHEMA, ts_unit="s")[1].to_list() == ["bad_timestamp"]


def test_extra_columns_that_do_not_convert_cost_their_row_and_bytes_in_lists_are_base64():
    from transforms.validate import conform_extras

    raw = pl.DataFrame({"is_bot": ["true", "maybe", None]})
    df, reasons = conform_extras(raw, pa.schema([pa.field("is_bot", pa.bool_())]))
    assert df["is_bot"].to_list() == [True, None, None] and reasons.to_list() == [None, "bad_type:is_bot", None]
    batch = pl.DataFrame({"blobs": [[b"\x00\xff"], None], "user_id": ["u", "v"],
                          FILE_INDEX: [0, 0], ROW_NUMBER: [0, 1]})
    q = quarantine_rows(batch, pl.Series(["bad_timestamp"] * 2), "impressions", ["f.parquet"], b"key")
    first = json.loads(q.to_pylist()[0]["record"])
    assert json.loads(first["blobs"]) == ["AP8="] and "user_id" not in first and len(first["user_hash"]) == 32


def test_malformed_text_keeps_no_raw_user_id():
    from transforms.gates import raw_user_fields
    from transforms.privacy import redact_json_text

    assert "alice" not in redact_json_text('{"user_id": "alice", "ts": ', b"k")
    for text in ('{"user\\u005fid": "alice", "ts": }', '{"user_id": {"id": "alice"}, ', '{"user_id": "alice smith',
                 "{'user_id': 'alice'}", '{"user_id": ["alice", "bob"], '):
        assert redact_json_text(text, b"k").startswith("<withheld: "), text
    schema = pa.schema([pa.field("ctx", pa.struct([pa.field("user_id", pa.string())])),
                        pa.field("events", pa.list_(pa.struct([pa.field("user_id", pa.string())])))])
    assert raw_user_fields(schema) == ["ctx.user_id", "events[].user_id"]
