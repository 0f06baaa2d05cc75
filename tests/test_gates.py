import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import pairwise, pointwise
from schemas import units as un
from schemas.conform import conform
from schemas.suites import pairwise_suite, pointwise_suite, suite_columns, units_suite
from transforms import gates
from transforms.gates import arrow_failures, failed_expectations, gate_failures

SCHEMA = un.units_schema(["upvote", "click"])


def _units(**overrides) -> pa.Table:
    n = 3
    cols = {
        "impression_id": ["a", "b", "c"], "prompt_id": ["p"] * n, "response_id": ["r1", "r2", "r3"],
        "user_hash": ["h"] * n, "ts": [dt.datetime(2026, 11, 1, tzinfo=dt.UTC)] * n,
        "observed": pa.array([1, 0, 1], pa.int8()), "label": [1.0, None, 0.0], "label_source": ["upvote", None, "x"],
        "n_upvote": pa.array([1, 0, 0], pa.int32()), "n_click": pa.array([0, 2, 1], pa.int32()),
        "n_votes": pa.array([1, 0, 0], pa.int32()),
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


def _points(**overrides) -> pa.Table:
    cols = {
        "impression_id": ["a", "b", "c"],
        "observed": [1, 0, 1],
        pointwise.PROPENSITY: [0.5, 0.2, 1.0],
        pointwise.WEIGHT_IPS: [2.0, 0.0, 1.0],
        pointwise.WEIGHT_CLIPPED: [2.0, 0.0, 1.0],
        pointwise.WEIGHT_SNIPS: [1.3, 0.0, 0.7],
        pointwise.WEIGHT_STABILIZED: [1.3, 0.0, 0.7],
        pointwise.TARGET_DR: [0.9, 0.4, -0.2],
        pointwise.TARGET_NOISE_CORRECTED: [1.1, 0.4, -0.5],
        pointwise.TARGET_DECONFOUNDED: [1.0, 0.3, -0.4],
    }
    cols.update(overrides)
    return pa.table(cols)


def _pairs(**overrides) -> pa.Table:
    cols = {pairwise.CHOSEN_ID: ["a", "c"], pairwise.REJECTED_ID: ["b", "d"], pairwise.CHOSEN_TARGET: [1.0, 0.9],
            pairwise.REJECTED_TARGET: [0.0, 0.3], pairwise.MARGIN: [1.0, 0.6], pairwise.WEIGHT: [1.2, 0.8],
            pairwise.CHOSEN_PROPENSITY: [0.5, 0.1], pairwise.REJECTED_PROPENSITY: [0.3, 1.0]}
    cols.update(overrides)
    return pa.table(cols)


def test_the_output_gates_pass_good_datasets_and_read_no_text():
    assert failed_expectations(_points(), pointwise_suite()) == []
    assert failed_expectations(_pairs(), pairwise_suite(0.5)) == []
    for suite in (pointwise_suite(), pairwise_suite(0.5)):
        assert not {un.PROMPT, un.RESPONSE, pairwise.CHOSEN, pairwise.REJECTED} & set(suite_columns(suite))


def test_the_pointwise_gate_refuses_bad_weights_and_propensities():
    bad = _points(**{pointwise.PROPENSITY: [0.0, 0.2, 1.0], pointwise.WEIGHT_IPS: [float("inf"), 0.0, 1.0],
                     pointwise.WEIGHT_SNIPS: [1.3, -0.1, 0.7], pointwise.TARGET_DR: [float("nan"), 0.4, -0.2]})
    failures = failed_expectations(bad, pointwise_suite())
    assert any("between(propensity): 1" in f for f in failures), failures
    assert any("between(weight_ips): 1" in f for f in failures), failures
    assert any("between(weight_snips): 1" in f for f in failures), failures
    assert any("not_be_null(target_dr): 1" in f for f in failures), failures


def test_the_pairwise_gate_refuses_self_pairs_thin_margins_and_bad_weights():
    bad = _pairs(**{pairwise.REJECTED_ID: ["a", "d"], pairwise.MARGIN: [1.0, 0.4], pairwise.WEIGHT: [-1.0, 0.8],
                    pairwise.REJECTED_TARGET: [0.0, 0.95]})
    failures = failed_expectations(bad, pairwise_suite(0.5))
    assert len(failures) == 4, failures
    assert any(f.startswith("expect_select_column_values_to_be_unique_within_record") for f in failures)
    assert any("between(margin): 1" in f for f in failures)
    assert any("between(weight): 1" in f for f in failures)
    assert any(f.startswith("expect_column_pair_values_a_to_be_greater_than_b") for f in failures)


NAN, INF = float("nan"), float("inf")
PLANTED = [
    ("units", lambda: _units(impression_id=["a", "a", "c"], observed=pa.array([1, 2, 1], pa.int8()),
                             label=[1.5, None, 0.0], n_click=pa.array([0, -1, 1], pa.int32())),
     lambda: units_suite(SCHEMA)),
    ("units nulls", lambda: _units(label=[-0.0, 1.0, NAN], n_upvote=pa.array([-3, -7, 0], pa.int32())).set_column(
        0, "impression_id", pa.array(["a", None, "c"])), lambda: units_suite(SCHEMA)),
    ("pointwise", lambda: _points(**{pointwise.PROPENSITY: [0.0, 0.2, 1.0000001], pointwise.WEIGHT_IPS: [INF, 0.0, 1.0],
                                     pointwise.WEIGHT_SNIPS: [1.3, -0.1, NAN], pointwise.TARGET_DR: [NAN, -INF, -0.2],
                                     "impression_id": ["a", "b", "a"], "observed": [1, 0, -1]}), pointwise_suite),
    ("pairwise", lambda: _pairs(**{pairwise.REJECTED_ID: ["a", "d"], pairwise.MARGIN: [1.0, 0.4],
                                   pairwise.WEIGHT: [-1.0, NAN], pairwise.REJECTED_TARGET: [1.0, NAN],
                                   pairwise.CHOSEN_PROPENSITY: [0.0, 1.0]}), lambda: pairwise_suite(0.5)),
]


@pytest.mark.parametrize("case", PLANTED, ids=[c[0] for c in PLANTED])
def test_arrow_and_gx_find_the_same_failures_with_the_same_counts(case):
    _, table, suite = case
    table, suite = table(), suite()
    gx_lines = failed_expectations(table, suite)
    assert gx_lines, "the planted table must fail"
    assert sorted(arrow_failures(table, suite)) == sorted(gx_lines)


def test_the_gate_checks_every_row_of_every_part_beyond_the_gx_sample(tmp_path):
    good = _units()
    bad = _units(impression_id=["x", "x", "z"], label=[1.0, None, 2.0])
    files = []
    for i, t in enumerate((good, bad, bad)):
        files.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(t, files[-1])
    failures = gate_failures(files, units_suite(SCHEMA), sample_rows=3)      # GX sees the first part only
    assert sorted(failures) == ["expect_column_values_to_be_between(label): 2",
                                "expect_column_values_to_be_unique(impression_id): 4"]
    assert gate_failures(files[:1], units_suite(SCHEMA)) == []


def test_the_minimum_of_a_count_is_the_least_over_the_parts(tmp_path):
    files = []
    for i, low in enumerate((-2, 0, -5)):
        files.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(_units(impression_id=[f"{i}a", f"{i}b", f"{i}c"], n_click=pa.array([3, low, 1], pa.int32())),
                       files[-1])
    assert gate_failures(files, units_suite(SCHEMA)) == ["expect_column_min_to_be_between(n_click): -5"]


def test_what_gx_finds_on_the_sample_fails_the_gate_even_when_arrow_passes(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    pq.write_table(_units(observed=pa.array([1, 3, 1], pa.int8())), path)
    monkeypatch.setattr(gates, "arrow_result", lambda table, e: (True, 0))
    assert gate_failures([path], units_suite(SCHEMA)) == [
        "expect_column_values_to_be_in_set(observed): 1 (GX, on a sample of 3 rows)"]


def test_the_gx_worker_process_finds_what_gx_here_finds_and_a_dead_worker_falls_back(monkeypatch):
    bad = _units(impression_id=["a", "a", "c"], label=[1.5, None, 0.0])
    suite = units_suite(SCHEMA)
    here = failed_expectations(bad, suite)
    assert len(here) == 2
    monkeypatch.setattr(gates, "_gx_worker", None)
    gates.prefetch_gx()
    worker = gates._gx_worker
    assert worker is not None
    assert gates._gx_failures(bad, suite) == here
    assert gates._gx_failures(_units(), suite) == []
    worker.kill()
    worker._proc.wait()
    assert gates._gx_failures(bad, suite) == here          # validated in this process instead
    assert gates._gx_worker is None


def test_an_error_inside_the_gx_worker_is_raised_not_mistaken_for_a_dead_worker(monkeypatch):
    from schemas.suites import Expectation, Suite

    monkeypatch.setattr(gates, "_gx_worker", None)
    gates.prefetch_gx()
    worker = gates._gx_worker
    unknown = Suite("bad", (Expectation("expect_nothing_of_the_sort", {"column": "label"}),))
    with pytest.raises(RuntimeError, match="failed in the GX worker process"):
        gates._gx_failures(_units(), unknown)
    assert gates._gx_worker is worker                      # still alive and still used
    assert gates._gx_failures(_units(), units_suite(SCHEMA)) == []
