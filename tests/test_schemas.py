import pyarrow as pa
import pytest

from schemas import impressions as imp
from schemas import pairwise, pointwise
from schemas import units as un
from schemas.conform import conform, required_names
from schemas.errors import SchemaError


def _impressions(**drop):
    cols = {
        "impression_id": ["a", "b"], "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC")),
        "user_id": [1, 2], "prompt_id": ["p", "p"], "response_id": ["r1", "r2"], "extra": [0.5, 1.5],
    }
    return pa.table({k: v for k, v in cols.items() if k not in drop})


def test_conform_casts_fills_and_orders():
    t = conform(_impressions(), imp.SCHEMA)
    assert t.schema.names == imp.SCHEMA.names
    assert t["user_id"].to_pylist() == ["1", "2"]                  # ints → strings for ids
    assert t["prompt"].null_count == 2                              # missing nullable column filled
    assert conform(_impressions(), imp.SCHEMA, keep_extra=True).column_names[-1] == "extra"


def test_conform_names_the_missing_required_column():
    with pytest.raises(SchemaError, match="impressions.parquet: required column 'prompt_id' is missing"):
        conform(_impressions(prompt_id=True), imp.SCHEMA, where="impressions.parquet")


def test_conform_rejects_nulls_in_required_columns():
    t = _impressions().set_column(0, "impression_id", pa.array(["a", None]))
    with pytest.raises(SchemaError, match="'impression_id' has 1 nulls"):
        conform(t, imp.SCHEMA)


def test_derived_schemas_extend_units():
    units = un.units_schema(["upvote", "click"], [pa.field("user_segment", pa.string())])
    assert units.names[-3:] == ["n_click", "n_upvote", "user_segment"]
    assert {un.IMPRESSION_ID, un.OBSERVED, un.TS} <= set(required_names(units))
    point = pointwise.pointwise_schema(units)
    assert point.names[: len(units)] == units.names
    assert {
        pointwise.PROPENSITY,
        pointwise.WEIGHT_IPS,
        pointwise.WEIGHT_SNIPS,
        pointwise.WEIGHT_CLIPPED,
        pointwise.TARGET_DR,
        pointwise.FOLD,
    } <= set(point.names)
    assert {pairwise.PROMPT, pairwise.CHOSEN, pairwise.REJECTED, pairwise.WEIGHT, pairwise.MARGIN} <= set(
        pairwise.SCHEMA.names
    )
    assert all(s.metadata[b"obsfeed.table"] for s in (units, point, pairwise.SCHEMA))


def test_every_output_column_is_documented():
    """Analysts read the docs from the Parquet field metadata: every column of units, pointwise and pairwise."""
    units = un.units_schema(["upvote", "click"])
    for schema in (units, pointwise.pointwise_schema(units), pairwise.SCHEMA):
        undocumented = [f.name for f in schema if not (f.metadata or {}).get(b"doc")]
        assert undocumented == [], undocumented
