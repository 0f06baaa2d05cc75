"""Positivity: the overlap check on hand cases, and a planted empty stratum (one model version nobody rated)
that fit names, that `fail` refuses with exit 2, that `warn` flags and `exclude` leaves out of the datasets."""

from __future__ import annotations

import doctest
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from estimators import positivity
from estimators.positivity import TAIL_COLUMN, describe, strata_table, violated_strata, violation_mask
from pipelines import fit, report, score
from pipelines.orchestration.cli import main
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas import pairwise, pointwise
from schemas import run_dir as rd
from schemas import signals as sig
from schemas import units as un
from schemas.config import parse_config
from schemas.errors import ConfigError
from schemas.manifest import read_manifest
from schemas.run_dir import RunDir
from schemas.storage import read_dataset
from tests.conftest import HASH_KEY_ENV, config_text

# --- the pure function, on hand cases -------------------------------------------------------------------------


def _rows(**kw):
    strata = {"v": np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 2)}
    observed = np.array([1, 1, 0, 0, 0, 0, 0, 1, 1])
    p = np.array([0.5, 0.5, 0.3, 0.3, 0.004, 0.006, 0.2, 0.9, 0.9])
    args = {"floor": 0.01, "min_observed": 1, "max_tail_share": 0.5, **kw}
    return {(r["column"], r["value"]): r for r in strata_table(strata, observed, p, **args)}


def test_each_stratum_counts_its_units_observed_units_and_propensities():
    rows = _rows()
    a, b, c = rows[("v", "a")], rows[("v", "b")], rows[("v", "c")]
    assert (a["units"], a["observed"], b["units"], b["observed"], c["units"], c["observed"]) == (4, 2, 3, 0, 2, 2)
    assert a["mean_propensity"] == pytest.approx(0.4) and a["min_propensity"] == 0.3
    assert b["mean_propensity"] == pytest.approx(0.21 / 3) and b["min_propensity"] == 0.004
    assert b["share_below_floor"] == pytest.approx(2 / 3) and a["share_below_floor"] == 0
    tail = rows[(TAIL_COLUMN, "< 0.01")]
    assert (tail["units"], tail["observed"], tail["min_propensity"]) == (2, 0, 0.004)


def test_no_observed_units_or_most_propensities_below_the_floor_fail_overlap():
    rows = _rows()
    assert not rows[("v", "a")]["violated"] and rows[("v", "a")]["why"] is None
    b = rows[("v", "b")]                                        # 0 of 3 observed, and 2 of 3 p̂ below the floor
    assert b["violated"] and "0 of 3 units observed" in b["why"] and "67% of its p̂ below the floor" in b["why"]
    assert not rows[(TAIL_COLUMN, "< 0.01")]["violated"]      # 2 of 9 units, within max_tail_share = 0.5
    # Every unit of "c" is observed: fewer than min_observed, but nothing is extrapolated there.
    assert not _rows(min_observed=3)[("v", "c")]["violated"]
    # A small stratum observed at an ordinary rate is rare, not without overlap: 2 of 4 observed, fewer than 3,
    # but not fewer than floor x its units.
    assert not _rows(min_observed=3)[("v", "a")]["violated"]
    big = strata_table({"v": np.array(["a"] * 1000)}, np.r_[[1] * 2, [0] * 998], np.full(1000, 0.3), floor=0.01,
                       min_observed=5, max_tail_share=1.0)[0]
    assert big["violated"] and big["why"] == "2 of 1000 units observed (fewer than 5 and than 0.01 of its units)"
    # The tail fails overlap as a whole once it holds more than max_tail_share of the units.
    tail = _rows(max_tail_share=0.2)[(TAIL_COLUMN, "< 0.01")]
    assert tail["violated"] and "2 units (22.2%)" in tail["why"]


def test_a_stratum_of_units_that_are_mostly_below_the_floor_fails_even_with_observed_units():
    rows = strata_table({"v": np.array(["a"] * 5)}, np.array([1, 1, 1, 1, 1]), np.array([0.005] * 3 + [0.5] * 2),
                        floor=0.01, min_observed=1, max_tail_share=1.0)
    assert rows[0]["violated"] and rows[0]["why"] == "60% of its p̂ below the floor 0.01"


def test_the_table_is_json_safe_and_names_the_violations():
    rows = strata_table({"v": np.array(["a", "b"], dtype=object)}, np.array([1, 0]), np.array([0.5, 0.001]),
                        floor=0.01, min_observed=1, max_tail_share=0.1)
    assert json.loads(json.dumps(rows)) == rows
    bad = violated_strata(rows)
    assert [(r["column"], r["value"]) for r in bad] == [("v", "b"), (TAIL_COLUMN, "< 0.01")]
    assert describe(bad).startswith("v = 'b' (0 of 1 units observed (fewer than 1 and than 0.01 of its units); "
                                    "100% of its p̂ below")


def test_units_are_flagged_by_stratum_or_by_the_floor():
    strata = {"v": np.array(["a", "b", "b", "c"]), "s": np.array(["x", "x", "y", "y"])}
    violated = [{"column": "v", "value": "b"}, {"column": TAIL_COLUMN, "value": "< 0.01"}]
    flags = violation_mask(strata, np.array([0.5, 0.5, 0.5, 0.001]), violated, floor=0.01)
    assert flags.tolist() == [False, True, True, True]
    # A column fit named but the caller does not pass flags nobody; the floor still applies.
    assert violation_mask({}, np.array([0.5, 0.001]), violated, floor=0.01).tolist() == [False, True]


def test_the_docstring_examples_hold():
    assert doctest.testmod(positivity).failed == 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        strata_table({}, np.array([1, 0]), np.array([0.5]), floor=0.01, min_observed=1, max_tail_share=0.1)
    with pytest.raises(ValueError, match="stratum column 'v' has 1 values for 2 units"):
        strata_table({"v": ["a"]}, np.array([1, 0]), np.array([0.5, 0.5]), floor=0.01, min_observed=1,
                     max_tail_share=0.1)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("positivity", '"drop"', "fit.positivity"), ("positivity_floor", "0", "fit.positivity_floor"),
    ("positivity_floor", "0.5", "fit.positivity_floor"), ("min_stratum_observed", "0", "fit.min_stratum_observed"),
    ("positivity_max_tail_share", "1.5", "fit.positivity_max_tail_share")])
def test_bad_positivity_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(f'[input]\nimpressions = "x"\nsignals = "y"\n[fit]\n{key} = {value}\n')


# --- a planted empty stratum, end to end -----------------------------------------------------------------------

EMPTY = "v3"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """2,000 simulated impressions whose model version v3 was never rated: every user signal on a v3 impression
    is dropped (audit labels stay: they do not make a unit observed). Run (ingest to report) under "warn"."""
    tmp = tmp_path_factory.mktemp("positivity")
    scenario = replace(SCENARIOS["default"], n_impressions=2000, seed=5)
    logs = simulate(scenario)
    v3 = logs.impressions.filter(pc.equal(logs.impressions["model_version"], EMPTY))["impression_id"]
    drop = pc.and_(pc.is_in(logs.signals[sig.IMPRESSION_ID], value_set=v3),
                   pc.not_equal(logs.signals[sig.TYPE], "gold"))
    logs = replace(logs, signals=logs.signals.filter(pc.invert(pc.fill_null(drop, False))))
    write(logs, tmp / "data", scenario=scenario)
    cfg = tmp / "warn.toml"
    cfg.write_text(config_text(tmp / "data", fit={"hash_features": 1024, "confounder_controls": 5}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "k")
        assert main(["run", str(cfg), str(tmp / "run"), "--stages", "ingest,fit,score,report"]) == 0
    return tmp / "run", tmp / "data"


def _config(data: Path, mode: str) -> str:
    return config_text(data, fit={"hash_features": 1024, "confounder_controls": 5, "positivity": mode})


def test_fit_names_the_planted_empty_stratum(planted):
    run, _ = planted
    check = read_manifest(RunDir(run))["stages"]["fit"]["diagnostics"]["positivity"]
    bad = {(r["column"], r["value"]): r for r in check["violated"]}
    assert ("model_version", EMPTY) in bad
    v3 = bad[("model_version", EMPTY)]
    units = read_dataset(run / rd.UNITS, ["model_version", un.OBSERVED])
    is_v3 = units["model_version"].to_numpy(zero_copy_only=False) == EMPTY
    assert v3["observed"] == 0 and v3["units"] == int(is_v3.sum()) > 500     # the sample is every unit here
    assert v3["why"].startswith(f"0 of {v3['units']} units observed (fewer than 5 and than 0.01 of its units)")
    assert not any(c == "model_version" and v != EMPTY for c, v in bad)     # v1 and v2 are rated
    saved = json.loads((run / rd.POSITIVITY_FILE).read_text())
    assert saved["violated"] == check["violated"] and saved["floor"] == 0.01
    assert {(r["column"], r["value"]) for r in saved["strata"]} >= {("model_version", v) for v in ("v1", "v2", "v3")}
    assert f"{rd.MODELS}/{rd.POSITIVITY}" == rd.POSITIVITY_FILE


def test_warn_keeps_and_flags_the_units_of_the_empty_stratum(planted):
    run, _ = planted
    t = read_dataset(run / rd.POINTWISE, ["model_version", pointwise.PROPENSITY, pointwise.OVERLAP_VIOLATION])
    is_v3 = t["model_version"].to_numpy(zero_copy_only=False) == EMPTY
    flag = t[pointwise.OVERLAP_VIOLATION].to_numpy(zero_copy_only=False)
    assert t.num_rows == read_dataset(run / rd.UNITS, [un.OBSERVED]).num_rows
    assert flag[is_v3].all()
    # Elsewhere exactly the tail is flagged (no other stratum fails here: the sample is the population).
    assert np.array_equal(flag[~is_v3], t[pointwise.PROPENSITY].to_numpy()[~is_v3] < 0.01)
    d = read_manifest(RunDir(run))["stages"]["score"]["diagnostics"]["positivity"]
    assert d["flagged"] == int(flag.sum()) and d["excluded"] == 0
    assert ("model_version", EMPTY) in {(r["column"], r["value"]) for r in d["violated"]}
    stages = read_manifest(RunDir(run))["stages"]
    html = report._positivity_section(stages["fit"]["diagnostics"]["positivity"], d)
    assert "overlap fails" in html and f"<td>{EMPTY}</td>" in html and f"{d['flagged']} units flagged" in html
    assert html in (run / rd.REPORT / "index.html").read_text()


def test_fail_exits_2_naming_the_stratum_and_keeps_the_models(planted, tmp_path, capsys, monkeypatch):
    run, data = planted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / rd.POSITIVITY_FILE).read_text()
    cfg = tmp_path / "fail.toml"
    cfg.write_text(_config(data, "fail"))
    monkeypatch.setenv(HASH_KEY_ENV, "k")
    capsys.readouterr()
    assert main(["run", str(cfg), str(copy), "--stages", "fit"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fit: positivity: overlap fails in" in line and f"model_version = '{EMPTY}'" in line
    assert "fit.positivity = 'fail'" in line and "Traceback" not in line
    assert (copy / rd.POSITIVITY_FILE).read_text() == before


def test_exclude_leaves_the_stratum_out_of_the_weighted_outputs(planted, tmp_path):
    run, data = planted
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run, copy.root)
    flagged = read_dataset(run / rd.POINTWISE, [un.IMPRESSION_ID, un.OBSERVED, pointwise.OVERLAP_VIOLATION])
    flag = flagged[pointwise.OVERLAP_VIOLATION].to_numpy(zero_copy_only=False)
    dropped = set(np.asarray(flagged[un.IMPRESSION_ID].to_pylist())[flag])
    cfg = parse_config(_config(data, "exclude"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "k")
        fit.execute(copy, cfg)             # the same models; its drift reference now holds only the units score keeps
    out = score.execute(copy, cfg)
    t = read_dataset(copy.path(rd.POINTWISE), [un.IMPRESSION_ID, "model_version", un.OBSERVED, pointwise.WEIGHT_SNIPS,
                                               pointwise.OVERLAP_VIOLATION])
    assert EMPTY not in set(t["model_version"].to_pylist())
    assert not pc.any(t[pointwise.OVERLAP_VIOLATION]).as_py()
    assert set(t[un.IMPRESSION_ID].to_pylist()).isdisjoint(dropped)
    assert out.counts.excluded_no_overlap == len(dropped) == flagged.num_rows - t.num_rows
    d = out.to_manifest()["diagnostics"]["positivity"]
    assert d["excluded"] == len(dropped)
    assert d["excluded_observed"] == int((flag & (flagged[un.OBSERVED].to_numpy() == 1)).sum())
    o = t[un.OBSERVED].to_numpy() == 1          # SNIPS normalised over the units that stay
    assert t[pointwise.WEIGHT_SNIPS].to_numpy()[o].mean() == pytest.approx(1.0)
    pairs = read_dataset(copy.path(rd.PAIRWISE), [pairwise.CHOSEN_ID, pairwise.REJECTED_ID])
    assert pairs.num_rows > 0
    assert set(pairs[pairwise.CHOSEN_ID].to_pylist()).isdisjoint(dropped)
    assert set(pairs[pairwise.REJECTED_ID].to_pylist()).isdisjoint(dropped)
    assert not list((copy.path(rd.DATASETS)).glob("_no_overlap*"))      # the count file is not a dataset


def test_no_violated_stratum_means_no_report_section():
    assert report._positivity_section({"violated": [], "floor": 0.01, "mode": "warn"}, None) == ""
    assert report._positivity_section(None, None) == ""
