import datetime as dt
import pickle

import polars as pl
import pyarrow as pa
import pytest

from schemas import units as un
from schemas.errors import ConfigError
from transforms.join import (
    JoinAndLabel,
    KeyByBucket,
    dedup,
    gold_labels,
    resolve_labels,
)
from transforms.privacy import key_from_env, pseudonymise
from transforms.read import FILE_INDEX, ROW_NUMBER
from transforms.shuffle import decode_table, encode_table

RULES = {"upvote": 1.0, "downvote": 0.0, "edit": "1 - value", "copy": 1.0, "regenerate": 0.0}
EXPLICIT = ["upvote", "downvote", "edit"]


def _t(s: int) -> dt.datetime:
    return dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=s)


def _signals(rows):
    return pl.DataFrame(rows, schema=["event_id", "impression_id", "ts", "type", "value"], orient="row")


def test_latest_explicit_wins_and_implicit_only_without_explicit():
    s = _signals([
        ("e1", "a", _t(1), "upvote", None), ("e2", "a", _t(5), "downvote", None), ("e3", "a", _t(9), "copy", None),
        ("e4", "b", _t(1), "copy", None), ("e5", "b", _t(2), "regenerate", None),
        ("e6", "c", _t(1), "edit", 0.25),
        ("e7", "d", _t(1), "click", None),
    ])
    observe = ["upvote", "downvote", "edit", "copy", "regenerate"]
    got = {r[un.IMPRESSION_ID]: (r[un.LABEL], r[un.LABEL_SOURCE])
           for r in resolve_labels(s, RULES, EXPLICIT, observe).to_dicts()}
    assert got == {"a": (0.0, "downvote"), "b": (0.0, "regenerate"), "c": (0.75, "edit")}
    # With the default observe list (explicit types only), implicit signals do not observe a unit.
    got = {r[un.IMPRESSION_ID] for r in resolve_labels(s, RULES, EXPLICIT, EXPLICIT).to_dicts()}
    assert got == {"a", "c"}


def test_the_latest_gold_signal_is_the_gold_label_and_never_the_users():
    s = _signals([
        ("e1", "a", _t(1), "upvote", None), ("g1", "a", _t(50), "gold", 0.0), ("g2", "a", _t(90), "gold", 1.0),
        ("g3", "b", _t(2), "gold", 0.0),
    ])
    assert gold_labels(s, "gold").sort(un.IMPRESSION_ID).rows() == [("a", 1.0), ("b", 0.0)]
    assert gold_labels(s, None).height == 0
    got = {r[un.IMPRESSION_ID]: r[un.LABEL] for r in resolve_labels(s, RULES, EXPLICIT, EXPLICIT).to_dicts()}
    assert got == {"a": 1.0}                                   # b has a gold label only: not observed


def test_dedup_keeps_the_earliest_and_is_order_independent():
    df = pl.DataFrame({"impression_id": ["x", "x", "y"], "ts": [_t(5), _t(1), _t(3)], "v": [1, 2, 3],
                       FILE_INDEX: [0, 0, 0], ROW_NUMBER: [0, 1, 2]})
    a = dedup(df, "impression_id")
    b = dedup(df.reverse(), "impression_id")
    assert a.equals(b) and a["v"].to_list() == [2, 3]


def test_pseudonymise_is_keyed_and_stable():
    users = pl.Series(["u1", "u2", "u1"])
    k1 = pseudonymise(users, b"key-1").to_list()
    assert k1[0] == k1[2] != k1[1]
    assert pseudonymise(users, b"key-2").to_list()[0] != k1[0]
    assert pseudonymise(users, None).to_list()[0] != k1[0]
    assert not set(k1) & {"u1", "u2"} and len(k1[0]) == 32


def test_the_hmac_key_is_read_on_the_worker_and_never_pickled(monkeypatch):
    monkeypatch.setenv("OBSFEED_TEST_SECRET", "s3cret-key-value")
    fn = JoinAndLabel(rules=RULES, explicit=EXPLICIT, observe=EXPLICIT, known_types=list(RULES),
                      unobserved_label=None, key_env="OBSFEED_TEST_SECRET",
                      units_schema=un.units_schema(list(RULES)), signal_files=["s.jsonl"])
    assert b"s3cret" not in pickle.dumps(fn)             # what a runner ships to its workers
    fn.setup()
    assert fn._key == b"s3cret-key-value"
    monkeypatch.delenv("OBSFEED_TEST_SECRET")
    with pytest.raises(ConfigError, match="OBSFEED_TEST_SECRET is not set"):
        key_from_env("OBSFEED_TEST_SECRET")
    assert key_from_env(None) is None                    # explicitly unkeyed


def test_tables_travel_through_a_shuffle_as_arrow_ipc_bytes():
    table = pa.table({"impression_id": ["a", "b", "c"], "x": [1.0, None, 3.0]})
    sliced = table.slice(1, 2)
    data = encode_table(sliced)
    assert isinstance(data, bytes) and decode_table(data).equals(sliced)
    assert decode_table(table) is table
    bucketed = dict(KeyByBucket(4, "impression_id").process(table))
    back = pa.concat_tables(decode_table(b) for b in bucketed.values()).sort_by("impression_id")
    assert back.equals(table)


def test_arrow_elements_get_arrow_coders_that_never_encode_to_estimate_a_size(monkeypatch):
    import apache_beam as beam

    from schemas import impressions as imp
    from transforms import shuffle
    from transforms.validate import Validate

    table = pa.table({"impression_id": ["a", "b", "c"], "x": [1.0, None, 3.0]}).slice(1, 2)
    table_coder, batch_coder = beam.coders.registry.get_coder(pa.Table), beam.coders.registry.get_coder(pa.RecordBatch)
    assert isinstance(table_coder, shuffle.ArrowTableCoder) and isinstance(batch_coder, shuffle.ArrowBatchCoder)
    assert table_coder.decode(table_coder.encode(table)).equals(table)
    batch = table.combine_chunks().to_batches()[0]
    assert batch_coder.decode(batch_coder.encode(batch)).equals(batch)
    # The DoFns that emit tables declare so: their PCollections carry the coder instead of a pickler.
    v = beam.Pipeline() | beam.Create([batch]) | Validate("impressions", imp.SCHEMA, [])
    assert v.ok.element_type == v.quarantine.element_type == v.context.element_type == pa.Table
    monkeypatch.setattr(shuffle, "encode_table", lambda t: pytest.fail("estimating a size encoded the table"))
    assert table_coder.estimate_size(table) == table.nbytes and batch_coder.estimate_size(batch) == batch.nbytes


def test_keyed_tables_cross_a_group_by_key_with_the_arrow_coder():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    table = pa.table({"impression_id": ["a", "b", "c"], "x": [1.0, None, 3.0]})
    with beam.Pipeline() as p:
        out = (p | beam.Create([(0, table.slice(0, 1)), (0, table.slice(1, 2)), (1, table)]).with_output_types(
                   tuple[int, pa.Table])
               | beam.GroupByKey()
               | beam.MapTuple(lambda k, ts: (k, sorted(pa.concat_tables(ts).column("impression_id").to_pylist()))))
        assert_that(out, equal_to([(0, ["a", "b", "c"]), (1, ["a", "b", "c"])]))


def test_key_by_bucket_spills_in_the_background_and_the_bundle_waits_for_the_files(tmp_path):
    table = pa.table({"impression_id": [f"i{k}" for k in range(200)], "x": list(range(200))})
    fn = KeyByBucket(4, "impression_id", str(tmp_path))
    fn.setup()
    keyed = list(fn.process(table))
    fn.finish_bundle()                             # every spill is on disk once the bundle is finished
    fn.teardown()
    assert sorted(k for k, _ in keyed) == [0, 1, 2, 3]
    back = pa.concat_tables(decode_table(path) for _, path in keyed).sort_by("x")
    assert back.equals(table)
    assert len(list(tmp_path.iterdir())) == 4


def test_a_failed_background_write_fails_the_bundle(tmp_path):
    from transforms.write import BackgroundWrites

    def write(path, fail):
        if fail:
            raise OSError("disk full")
        path.write_text("ok")

    writes = BackgroundWrites(threads=2)
    for i in range(5):
        writes.submit(write, tmp_path / f"f{i}", False)
    writes.drain()
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"f{i}" for i in range(5)]
    writes.submit(write, tmp_path / "bad", True)
    with pytest.raises(OSError, match="disk full"):
        writes.drain()
    writes.close()


def test_pseudonyms_are_per_user_and_nulls_stay_null():
    users = pl.Series("user_id", ["u1", None, "u2", "u1"])
    out = pseudonymise(users, b"k")
    assert out.name == "user_id" and out[1] is None and out[0] == out[3] != out[2] and len(out[0]) == 32
    assert pseudonymise(pl.Series("user_id", [], dtype=pl.String), b"k").to_list() == []


def test_known_pseudonyms_are_reused_and_stay_bounded():
    from transforms.privacy import Pseudonyms

    users = pl.Series("user_id", ["u1", None, "u2", "u1"])
    known = Pseudonyms(max_users=4)
    first = pseudonymise(users, b"k", known)
    assert first.to_list() == pseudonymise(users, b"k").to_list() and set(known.frame["u"]) == {"u1", "u2"}
    known.frame = known.frame.with_columns(                    # a known user is looked up, not hashed again
        h=pl.when(pl.col("u") == "u1").then(pl.lit("looked-up")).otherwise(pl.col("h")))
    again = pseudonymise(users, b"k", known)
    assert again[0] == again[3] == "looked-up" and again[2] == first[2] and again[1] is None and len(known) == 2
    more = pl.Series("user_id", ["u3", "u4", "u5"])
    assert pseudonymise(more, b"k", known).to_list() == pseudonymise(more, b"k").to_list()
    assert set(known.frame["u"]) == {"u3", "u4", "u5"}        # emptied first: 2 known + 3 new > max_users
    for nulls in (pl.Series("user_id", [None, None], dtype=pl.String), pl.Series("user_id", [None, None])):
        assert pseudonymise(nulls, b"k", known).to_list() == pseudonymise(nulls, b"k").to_list() == [None] * 2


def test_parts_already_in_order_are_written_without_sorting_and_others_are_sorted():
    from transforms.write import already_sorted

    asc = [("impression_id", "ascending")]
    t = pa.table({"impression_id": ["a", "b", "b", "c"], "x": [1, 2, 3, 4]})
    assert already_sorted(t, asc) and already_sorted(t.slice(0, 1), asc) and already_sorted(t.slice(0, 0), asc)
    assert not already_sorted(t.take([1, 0, 2, 3]), asc)
    assert not already_sorted(pa.table({"impression_id": ["a", None], "x": [1, 2]}), asc)       # nulls: sort
    assert not already_sorted(t, [("impression_id", "ascending"), ("x", "ascending")])          # several keys
    assert not already_sorted(t, [("impression_id", "descending")])


def test_a_part_is_written_under_a_temporary_name_and_renamed(tmp_path):
    from schemas.config import OutputConfig
    from transforms.write import write_part_atomically

    table = pa.table({"impression_id": ["a", "b"], "x": [1.0, 2.0]})
    path = tmp_path / "part-00000.parquet"
    write_part_atomically(table, path, OutputConfig())
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
    import pyarrow.parquet as pq

    assert pq.read_table(path).equals(table)
