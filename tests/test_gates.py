import datetime as dt

import pyarrow as pa

from schemas import units as un
from schemas.conform import conform
from schemas.suites import suite_columns, units_suite
from transforms.gates import failed_expectations

SCHEMA = un.units_schema(["upvote", "click"])


def _units(**overrides) -> pa.Table:
    n = 3
    cols = {
        "impression_id": ["a", "b", "c"], "prompt_id": ["p"] * n, "response_id": ["r1", "r2", "r3"],
        "user_hash": ["h"] * n, "ts": [dt.datetime(2026, 11, 1, tzinfo=dt.UTC)] * n,
        "observed": pa.array([1, 0, 1], pa.int8()), "label": [1.0, None, 0.0], "label_source": ["upvote", None, "x"],
        "n_upvote": pa.array([1, 0, 0], pa.int32()), "n_click": pa.array([0, 2, 1], pa.int32()),
    }
    cols.update(overrides)
    return conform(pa.table(cols), SCHEMA, fill_missing_nullable=True)


def test_good_units_pass_and_the_gate_reads_no_text():
    suite = units_suite(SCHEMA)
    assert failed_expectations(_units().select(suite_columns(suite)), suite) == []
    assert un.PROMPT not in suite_columns(suite) and un.RESPONSE not in suite_columns(suite)


def test_each_violation_is_named():
    bad = _units(impression_id=["a", "a", "c"], observed=pa.array([1, 2, 1], pa.int8()), label=[1.5, None, 0.0],
                 n_click=pa.array([0, -1, 1], pa.int32()))
    failures = failed_expectations(bad, units_suite(SCHEMA))
    assert len(failures) == 4, failures
    assert any(f.startswith("expect_column_values_to_be_unique(impression_id): 2") for f in failures)
    assert any(f.startswith("expect_column_values_to_be_in_set(observed): 1") for f in failures)
    assert any(f.startswith("expect_column_values_to_be_between(label): 1") for f in failures)
    assert any(f.startswith("expect_column_min_to_be_between(n_click)") for f in failures)
