"""A DoFn's several outputs as Tagged elements routed by SplitTags (transforms/outputs.py)."""

from __future__ import annotations

import pickle

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that, equal_to

from transforms import outputs, shuffle
from transforms.outputs import SplitTags, Tagged, TaggedCoder

TABLE = pa.table({"impression_id": ["a", "b", "c"], "x": [1.0, None, 3.0]}).slice(1, 2)


@pytest.mark.parametrize("value", [TABLE, TABLE.combine_chunks().to_batches()[0], TABLE.schema.empty_table(),
                                   (7, TABLE), (-1, TABLE), (True, TABLE), (1 << 70, TABLE),
                                   {"signals.rows_in": 3}, "text"],
                         ids=["table", "batch", "empty_table", "keyed_table", "negative_key", "bool_key", "big_key",
                              "counts", "text"])
def test_the_coder_gives_back_the_tag_and_the_value(value):
    coder = beam.coders.registry.get_coder(Tagged)
    assert isinstance(coder, TaggedCoder)
    back = coder.decode(coder.encode(Tagged("quarantined", value)))
    assert back.tag == "quarantined" and type(back.value) is type(value)
    if isinstance(value, tuple):
        assert type(back.value[0]) is type(value[0]) and back.value[0] == value[0]
        assert back.value[1].equals(value[1])
    elif isinstance(value, pa.Table | pa.RecordBatch):
        assert back.value.equals(value)
    else:
        assert back.value == value
    again = pickle.loads(pickle.dumps(Tagged("ok", value)))      # how Dask ships an element between workers
    assert again.tag == "ok"


def test_an_empty_record_batch_survives_the_coder():
    batch = pa.RecordBatch.from_pylist([], schema=TABLE.schema)
    back = TaggedCoder().decode(TaggedCoder().encode(Tagged("batches", batch)))
    assert isinstance(back.value, pa.RecordBatch) and back.value.num_rows == 0 and back.value.schema == TABLE.schema


def test_estimating_a_size_encodes_no_table(monkeypatch):
    coder = TaggedCoder()
    monkeypatch.setattr(outputs, "encode_table", lambda t: pytest.fail("estimating a size encoded the table"))
    monkeypatch.setattr(shuffle, "encode_table", lambda t: pytest.fail("estimating a size encoded the table"))
    assert coder.estimate_size(Tagged("ok", TABLE)) == TABLE.nbytes
    assert coder.estimate_size(Tagged("units", (3, TABLE))) == 8 + TABLE.nbytes
    assert 0 < coder.estimate_size(Tagged("counts", {"a": 1})) < 64


def _emit(x: int):
    yield Tagged("even" if x % 2 == 0 else "odd", x)
    if x == 0:
        yield Tagged("table", TABLE)


def test_split_tags_routes_each_value_to_its_own_output_with_its_coder():
    with beam.Pipeline() as p:
        out = (p | beam.Create(range(6)) | beam.FlatMap(_emit).with_output_types(Tagged)
               | SplitTags({"even": int, "odd": int, "table": pa.Table}))
        assert out["table"].element_type == pa.Table
        assert_that(out["even"], equal_to([0, 2, 4]), label="even")
        assert_that(out["odd"], equal_to([1, 3, 5]), label="odd")
        assert_that(out["table"] | beam.Map(lambda t: t.num_rows), equal_to([2]), label="table")


def test_a_tag_that_no_step_reads_fails_the_pipeline_instead_of_being_dropped():
    with pytest.raises(Exception, match="an output tagged 'odd', which no step reads"), beam.Pipeline() as p:
        _ = (p | beam.Create(range(3)) | beam.FlatMap(_emit).with_output_types(Tagged)
             | SplitTags({"even": int, "table": pa.Table}))
