"""Fit chooses the propensity floor and refuses degenerate propensities; score applies the floor and fails,
keeping the previous datasets, when the weights have no effective sample left."""

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from estimators import weights as W
from pipelines import fit, ingest, score
from schemas import pointwise
from schemas import run_dir as rd
from schemas.config import parse_config
from schemas.errors import GateError, InputError
from schemas.run_dir import RunDir
from schemas.storage import partitions, read_dataset
from tests.conftest import config_text, module_hash_key


@pytest.fixture(scope="module")
def fitted(sim_small: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("weighting")
    text = config_text(sim_small, weights={"clip": "auto", "min_ess_share": 0.5})
    cfg = parse_config(text)
    run = RunDir(root / "run")
    with module_hash_key():
        ingest.execute(run, cfg)
        diagnostics = fit.execute(run, cfg).to_manifest()["diagnostics"]
    return run, text, diagnostics


def test_auto_clip_keeps_the_configured_ess_share(fitted):
    run, text, diagnostics = fitted
    chosen = diagnostics["weights"]
    assert chosen["method"] == "auto" and 0 < chosen["clip"] < 1
    assert chosen["sample_ess_share"] >= 0.5 - 1e-9
    out = score.execute(run, parse_config(text)).to_manifest()["diagnostics"]
    assert out["clip"] == chosen["clip"]
    t = read_dataset(run.path(rd.POINTWISE), ["observed", pointwise.WEIGHT_CLIPPED, pointwise.WEIGHT_IPS])
    o = t["observed"].to_numpy() == 1
    # The sample is most units here, so the population's ESS share is close to the sample's.
    assert W.kish_ess(t[pointwise.WEIGHT_CLIPPED].to_numpy()[o]) / o.sum() >= 0.45
    assert W.kish_ess(t[pointwise.WEIGHT_IPS].to_numpy()[o]) / o.sum() < 0.5      # unclipped weights would not


def test_degenerate_weights_fail_score_and_keep_the_previous_datasets(fitted):
    run, text, _ = fitted
    score.execute(run, parse_config(text))
    before = read_dataset(run.path(rd.POINTWISE))
    with pytest.raises(GateError, match="degenerate weights: the Kish ESS of the IPS weights is"):
        score.execute(run, parse_config(text.replace("[weights]\n", "[weights]\nips_min_ess_share = 0.99\n")))
    assert read_dataset(run.path(rd.POINTWISE)).equals(before)


def test_fit_refuses_degenerate_propensities_instead_of_clipping_them():
    cfg = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[weights]\nclip = "auto"\nips_min_ess_share = 0.5\n')
    o = np.array([1.0, 0, 1, 1])
    with pytest.raises(GateError, match="NaN or outside"):
        W.choose_clip(o, np.array([0.5, np.nan, 0.4, 0.6]), cfg.weights)
    with pytest.raises(GateError, match="below the floor"):
        W.choose_clip(o, np.array([1e-7, 0.5, 0.9, 0.9]), cfg.weights)
    assert W.choose_clip(o, np.array([0.5, 0.2, 0.4, 0.6]), cfg.weights)["method"] == "auto"


@pytest.fixture(scope="module")
def logged_logs(sim_small: Path, tmp_path_factory) -> Path:
    """sim_small with the true propensity logged on each impression (as a randomised logging policy would)."""
    out = tmp_path_factory.mktemp("logged")
    truth = pq.read_table(sim_small / "truth.parquet").select(["impression_id", "propensity_true"])
    lookup = dict(zip(truth["impression_id"].to_pylist(), truth["propensity_true"].to_pylist(), strict=True))
    (out / "impressions").mkdir()
    for f in sorted((sim_small / "impressions").glob("*.parquet")):
        t = pq.read_table(f)
        logged = [lookup.get(i, 0.5) for i in t["impression_id"].to_pylist()]
        pq.write_table(t.append_column("logged_p", pa.array(logged, pa.float64())), out / "impressions" / f.name)
    shutil.copy(sim_small / "signals.jsonl.gz", out / "signals.jsonl.gz")
    shutil.copy(sim_small / "truth.parquet", out / "truth.parquet")
    return out


def test_a_logged_propensity_column_replaces_the_propensity_model(logged_logs: Path, tmp_path: Path, hash_key):
    cfg = parse_config(config_text(logged_logs, fit={"propensity_column": "logged_p"}))
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    diagnostics = fit.execute(run, cfg).to_manifest()["diagnostics"]
    assert diagnostics["propensity"]["source"] == "column logged_p"
    assert not (run.path(rd.MODELS) / rd.PROPENSITY).exists()
    assert set(diagnostics["model_seconds"]) == {"outcome"}              # no propensity model was fitted
    assert {"featurize", "nuisance_models", "confounders", "save"} <= set(diagnostics["seconds"])
    score.execute(run, cfg)
    t = read_dataset(run.path(rd.POINTWISE), ["logged_p", pointwise.PROPENSITY])
    np.testing.assert_array_equal(t["logged_p"].to_numpy(), t[pointwise.PROPENSITY].to_numpy())
    with pytest.raises(InputError, match="re-run the fit stage"):   # models fitted one way, config the other
        score.execute(run, parse_config(config_text(logged_logs)))


def test_a_logged_propensity_of_zero_is_refused(logged_logs: Path, tmp_path: Path, hash_key):
    bad = tmp_path / "bad"
    shutil.copytree(logged_logs, bad)
    f = sorted((bad / "impressions").glob("*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.schema.get_field_index("logged_p"), "logged_p",
                                pa.array([0.0] + t["logged_p"].to_pylist()[1:], pa.float64())), f)
    cfg = parse_config(config_text(bad, fit={"propensity_column": "logged_p", "max_rows": 100_000}))
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    with pytest.raises(GateError, match="propensity column 'logged_p': 1 of"):
        fit.execute(run, cfg)


def test_partitions_split_rows_by_utc_date_and_keep_them_all():
    ts = pa.array([dt.datetime(2026, 11, 1, 23, 59, tzinfo=dt.UTC), dt.datetime(2026, 11, 2, 0, 1, tzinfo=dt.UTC),
                   dt.datetime(2026, 11, 1, 1, tzinfo=dt.UTC)], pa.timestamp("us", tz="UTC"))
    t = pa.table({"ts": ts, "x": [1, 2, 3]})
    parts = partitions(t, "date")
    assert [(f, p["x"].to_pylist()) for f, p in parts] == [("date=2026-11-01", [1, 3]), ("date=2026-11-02", [2])]
    assert partitions(t, "none") == [("", t)]


def test_score_writes_date_partitions_that_readers_prune_on(fitted, tmp_path: Path):
    run, text, _ = fitted
    cfg = parse_config(text.replace("[fit]", '[output]\npartition_by = "date"\n[fit]'))
    result = score.execute(run, cfg)
    for name in (rd.POINTWISE, rd.PAIRWISE):
        files = sorted(run.path(name).rglob("*.parquet"))
        assert files and all(f.parent.name.startswith("date=") for f in files), files
        for f in files:                                      # each file holds only its folder's date
            dates = {d.strftime("%Y-%m-%d") for d in pq.read_table(f, columns=["ts"])["ts"].to_pylist()}
            assert dates == {f.parent.name.removeprefix("date=")}
    assert result.counts.pointwise == read_dataset(run.path(rd.UNITS)).num_rows
    hive = pl.scan_parquet(run.path(rd.POINTWISE) / "**" / "*.parquet", hive_partitioning=True)
    first = sorted(run.path(rd.POINTWISE).glob("date=*"))[0].name.removeprefix("date=")
    assert hive.filter(pl.col("date") == pl.lit(first).str.to_date()).select(pl.len()).collect().item() > 0
    score.execute(run, parse_config(text))                       # back to one folder: the rest of the module expects it


def test_score_streams_each_part_in_row_order_and_the_pair_buckets_do_not_change_the_pairs(fitted, monkeypatch):
    """The pointwise parts are written one units row group at a time (rows in the units' order, as many row
    groups as the units part has); with ten times as many prompt buckets the pairs are the same."""
    run, text, _ = fitted
    cfg = parse_config(text.replace("[fit]", "[output]\nrow_group_size = 1024\n[fit]"))
    score.execute(run, cfg)
    for units_file in sorted(run.path(rd.UNITS).glob("*.parquet")):
        out = run.path(rd.POINTWISE) / units_file.name
        assert pq.ParquetFile(out).num_row_groups == pq.ParquetFile(units_file).num_row_groups
        ids = ["impression_id"]
        assert pq.read_table(out, columns=ids).equals(pq.read_table(units_file, columns=ids))
    keys = ["prompt_id", "chosen_id", "rejected_id"]
    before = read_dataset(run.path(rd.PAIRWISE)).drop_columns(["run_id"]).sort_by([(k, "ascending") for k in keys])
    n_files = len(list(run.path(rd.PAIRWISE).glob("*.parquet")))
    monkeypatch.setattr(score, "PAIR_BUCKET_UNITS", max(1, read_dataset(run.path(rd.UNITS)).num_rows // 80))
    score.execute(run, cfg)
    after = read_dataset(run.path(rd.PAIRWISE)).drop_columns(["run_id"]).sort_by([(k, "ascending") for k in keys])
    assert len(list(run.path(rd.PAIRWISE).glob("*.parquet"))) > n_files
    assert before.num_rows > 0 and after.drop_columns(["weight"]).equals(before.drop_columns(["weight"]))
    # the global mean of the pair weights is summed in another order: equal to rounding
    np.testing.assert_allclose(after["weight"].to_numpy(), before["weight"].to_numpy(), rtol=1e-12)
    score.execute(run, parse_config(text))                       # back to the defaults for the rest of the module
